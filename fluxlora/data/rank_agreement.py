"""How several processes that split the caching work agree that every cache file exists before training starts.

Each rank caches its share, writing a small progress file as it goes and a done marker at the end (both atomic,
both tagged with the build id: a hash of the whole dataset, so markers of an older build never count). A rank that
finished waits for the others' markers; it gives up, naming the rank, when one of them shows no progress for
`stall_timeout` seconds. This works on one machine or a shared folder, without a process group.
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable

from fluxlora.atomic import atomic_write_text
from fluxlora.errors import StageTimeoutError

log = logging.getLogger(__name__)

_POLL_S = 0.2


def _progress_file(folder: Path, rank: int) -> Path:
    return folder / f".progress.rank{rank}.json"


def _done_file(folder: Path, rank: int) -> Path:
    return folder / f".done.rank{rank}.json"


def announce_progress(folder: Path, rank: int, build_id: str, done: int, total: int) -> None:
    atomic_write_text(_progress_file(folder, rank), json.dumps({"build": build_id, "done": done, "total": total}))


def announce_done(folder: Path, rank: int, build_id: str, keys: dict[str, str]) -> None:
    """Mark this rank's share as cached; `keys` (file name → content key) go into rank 0's manifest."""
    atomic_write_text(_done_file(folder, rank), json.dumps({"build": build_id, "keys": keys}))


def _read(file: Path) -> dict:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def wait_for_ranks(folder: Path, rank: int, world_size: int, build_id: str, stall_timeout: float,
                   progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Wait until every rank's done marker for `build_id` is there and return their keys (file name → content key);
    raise `StageTimeoutError('cache agreement')` naming the first rank that made no progress for `stall_timeout`
    seconds."""
    pending = {r for r in range(world_size) if r != rank}
    keys: dict[str, str] = {}
    last_seen: dict[int, tuple[str, float]] = {r: ("", time.monotonic()) for r in pending}
    while pending:
        now = time.monotonic()
        for r in sorted(pending):
            done = _read(_done_file(folder, r))
            if done.get("build") == build_id:
                keys.update(done.get("keys", {}))
                pending.discard(r)
                continue
            state = _read(_progress_file(folder, r))
            seen = json.dumps(state, sort_keys=True) if state.get("build") == build_id else ""
            if seen != last_seen[r][0]:
                last_seen[r] = (seen, now)
            elif now - last_seen[r][1] > stall_timeout:
                where = f"{state.get('done')}/{state.get('total')} files" if seen else "no progress file"
                raise StageTimeoutError("cache agreement", stall_timeout,
                                        f"rank {r} cached nothing new in {folder} ({where}); is it still running?")
        if progress is not None:
            progress(world_size - len(pending), world_size)
        if pending:
            time.sleep(_POLL_S)
    log.info("rank %d: all %d ranks finished caching", rank, world_size)
    return keys
