"""Which rank of a multi-process run is missing, told from the heartbeat files every rank keeps.

A collective that times out (or fails because a peer's connection closed) says nothing useful about *who* did not
arrive. Every rank's watchdog rewrites its own heartbeat file (rank 0: ``heartbeat.json``, rank R:
``heartbeat.rankR.json`` beside it) with its pid, host, stage, step and, when it ends, its state and error. A rank that
sees a collective fail reads the others' files: a peer whose process is gone died, one that recorded an error of its
own failed first, one still running without having failed never arrived (it is stalled). Works on one machine or on
several that share the output folder; on separate disks the message says the file is missing.

Example::

    ranks, text, verdict = diagnose(Path("outputs/x/heartbeat.json"), rank=0, world_size=2)
    # (1,), "rank 1 did not arrive (pid 4242 on host a: last heartbeat 10.3s ago in stage 'training_step' at step 3)"
"""

from __future__ import annotations

import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fluxlora.heartbeat import beat_where, read_beat

COLLECTIVE_MARKERS = ("gloo", "nccl", "timed out", "connection closed", "connection reset", "broken pipe",
                      "distributed", "process group", "processgroup", "collective", "socket", "store")
"""Words of the errors a failed collective raises (gloo, NCCL, the TCP store); lower case."""

_ENDED = ("exception", "stalled", "failed")


def heartbeat_path(base: str | Path, rank: int) -> Path:
    """Rank 0 keeps `base` (what the supervisor reads); rank R writes `<stem>.rankR<suffix>` beside it."""
    base = Path(base)
    return base if rank == 0 else base.with_name(f"{base.stem}.rank{rank}{base.suffix}")


def looks_collective(text: str) -> bool:
    """True when an error message comes from a failed collective or the store, not from the rank's own work."""
    low = text.lower()
    return any(m in low for m in COLLECTIVE_MARKERS)


def pid_alive(pid: Optional[int], host: Optional[str]) -> Optional[bool]:
    """Whether `pid` runs; None when it is on another host (or unknown)."""
    if not pid or host not in (None, socket.gethostname()):
        return None
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped by its launcher) is dead too
        with open(f"/proc/{int(pid)}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


@dataclass
class PeerState:
    """What one rank's heartbeat file says about it."""

    rank: int
    verdict: str
    """missing (no file) | dead | failed (its own error) | survivor (a collective failed there too) | stalled
    (its watchdog fired) | finished | running."""
    text: str
    where: str = ""
    """Its pid, host and last heartbeat."""


def peer_state(base: Path, rank: int, now: Optional[float] = None) -> PeerState:
    path = heartbeat_path(base, rank)
    beat = read_beat(path)
    if not beat:
        return PeerState(rank, "missing", f"rank {rank} wrote no heartbeat file ({path})")
    now = time.time() if now is None else now
    where = beat_where(beat, now)
    who = f"pid {beat.get('pid')}" + (f" on host {beat['host']}" if beat.get("host") else "")
    state, error = str(beat.get("state", "running")), str(beat.get("error") or "")
    error = error if len(error) <= 300 else error[:300] + " ..."
    alive = pid_alive(beat.get("pid"), beat.get("host"))
    if state == "stalled":
        return PeerState(rank, "stalled", f"rank {rank} stalled: its watchdog fired ({who}: {where})")
    if state in _ENDED and error:
        kind = "survivor" if looks_collective(error) else "failed"
        return PeerState(rank, kind, f"rank {rank} failed ({who}: {where}): {error}")
    if state in _ENDED:
        return PeerState(rank, "failed", f"rank {rank} ended with state '{state}' ({who}: {where})")
    if alive is False:
        return PeerState(rank, "dead" if state == "running" else "finished",
                         f"rank {rank} died ({who} is gone; {where})" if state == "running"
                         else f"rank {rank} has ended ({state}; {where})")
    if state != "running":
        return PeerState(rank, "finished", f"rank {rank} has ended ({state}; {who}: {where})")
    return PeerState(rank, "running", f"rank {rank} did not arrive ({who}: {where})", f"{who}: {where}")


_CULPRITS = ("dead", "failed", "stalled", "missing", "running")


def diagnose(base: str | Path, rank: int, world_size: int,
             settle_s: float = 2.0) -> tuple[tuple[int, ...], str, str]:
    """Name the rank(s) a failed collective waited for: (ranks, one-line text, verdict of the named ranks).

    Peers that failed in a collective themselves are survivors; waits up to `settle_s` for peers that are still
    running to record their own failure, so that only the ranks that never arrived are named. The verdict is
    `failed` when they ended with an error of their own, else dead/stalled/running/missing/unknown.
    """
    base = Path(base)
    peers = [r for r in range(world_size) if r != rank]
    deadline = time.monotonic() + settle_s
    while True:
        states = [peer_state(base, r) for r in peers]
        if time.monotonic() >= deadline or not any(s.verdict == "running" for s in states):
            break
        time.sleep(0.1)
    # the rank that caused it first: dead or failed on its own beats stalled beats merely not arrived
    for verdicts in (("dead", "failed", "stalled"), ("running", "missing")):
        named = [s for s in states if s.verdict in verdicts]
        if named:
            kind = "failed" if all(s.verdict == "failed" for s in named) else named[0].verdict
            return tuple(s.rank for s in named), "; ".join(s.text for s in named), kind
    if not states:
        return (), "no other rank", "unknown"
    # every other rank gave up in a collective too: from their side, this rank is the one that did not arrive
    return (), "the other ranks gave up waiting for this one (" + "; ".join(s.text for s in states) + ")", "unknown"


def peers_summary(base: str | Path, rank: int, world_size: int) -> str:
    """The other ranks' last heartbeats, for a watchdog message."""
    now = time.time()
    states = [peer_state(Path(base), r, now) for r in range(world_size) if r != rank]
    return "; ".join(f"rank {s.rank} is running ({s.where})" if s.verdict == "running" else s.text for s in states)
