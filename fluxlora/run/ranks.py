"""The ranks of a multi-process run, as the run sees them: starting the local ranks, naming the rank a failed
collective waited for, ending the process group, and telling the ranks' log lines apart."""

from __future__ import annotations

import logging
import os
import sys
import threading
from pathlib import Path
from typing import Any

from omegaconf import DictConfig

from fluxlora.distributed.health import diagnose
from fluxlora.distributed.launch import RankLauncher
from fluxlora.distributed.settings import DistributedSettings, RankInfo
from fluxlora.errors import FluxLoraError, RankFailedError
from fluxlora.run.hydra_job import is_multirun

log = logging.getLogger("fluxlora")


def start_ranks(cfg: DictConfig, info: RankInfo, dist: DistributedSettings, name: str,
                 watchdog: Any) -> RankLauncher:
    """Rank 0 of `python -m fluxlora trainer.devices=N` starts the other local ranks now, before the model loads."""
    node = (cfg.get("callbacks") or {}).get("watchdog")
    group: RankLauncher | None = None

    def end_group(message: str) -> None:  # the observer thread: a rank died and this one did not fail by itself
        text = (f"stage 'distributed' failed: {message}; ending the other ranks. The last checkpoint is intact: run "
                "again with resume=auto (python -m fluxlora.supervise does it)")
        log.error("%s", text)
        print(f"fluxlora: error: {text}", file=sys.stderr, flush=True)
        if watchdog is not None:
            watchdog.stop("failed", error=text)
        group.kill_all()
        os._exit(RankFailedError.exit_code)

    # in a sweep the job must fail as an exception Hydra records: the training thread gets until its own
    # collectives time out; a single run ends at once
    grace = dist.setup_timeout_s + 60 if is_multirun() else 5.0
    group = RankLauncher(info.devices, info.num_nodes, name, node.get("heartbeat_file") if node else None,
                         end_group, grace_s=grace)
    group.start()
    if watchdog is not None:
        watchdog.before_exit.append(group.kill_all)
    return group


def rank_failure(e: BaseException, cfg: DictConfig, info: RankInfo, strategy) -> FluxLoraError:
    """A failed collective as a message that names the rank(s) it waited for."""
    node = (cfg.get("callbacks") or {}).get("watchdog")
    seen = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if node is None or not node.get("heartbeat_file"):
        ranks, who, verdict = (), "another rank did not arrive (callbacks.watchdog is off: no heartbeat files to " \
                                    "tell which)", "running"
    else:
        ranks, who, verdict = diagnose(Path(str(node.heartbeat_file)), info.rank, info.world_size)
    detail = (f"{who}; this rank ({info.rank} of {info.world_size}) saw: {seen}. The last checkpoint is intact: "
              "run again with resume=auto (python -m fluxlora.supervise does it)")
    if verdict == "failed":  # the other rank's own error (bad input, a data stall): its exit status, no restart
        return FluxLoraError(f"stage 'distributed' failed: {detail}")
    timed_out = "timed out" in str(e).lower() or "timeout" in str(e).lower()
    seconds = getattr(strategy, "current_timeout_s", 0.0) if timed_out else 0.0
    return RankFailedError("distributed", seconds, detail, ranks)


def end_process_group() -> None:
    """Destroy the process group (bounded), so that the next job of a sweep can start its own."""
    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return
    t = threading.Thread(target=tdist.destroy_process_group, name="fluxlora-pg-destroy", daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        log.error("the process group could not be destroyed within 30s")


class _RankPrefix(logging.Filter):
    """`[rank R] ` before every log line of a multi-process run (the ranks share one terminal)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def tag_logs(info: RankInfo) -> None:
    """Prefix every log line of this process with its rank."""
    for handler in logging.root.handlers:
        if not any(isinstance(f, _RankPrefix) for f in handler.filters):
            handler.addFilter(_RankPrefix(info.rank))
