"""Errors a user can act on: they end a run with one line that names the file, key or stage."""

from __future__ import annotations

import errno
import re
from typing import Callable, Iterator, Optional

from fluxlora.heartbeat import WATCHDOG_EXIT_CODE


class FluxLoraError(RuntimeError):
    """A problem with the user's input or environment; reported as one line, exit status non-zero."""

    exit_code = 2
    """Exit status of `python -m fluxlora` when this error ends the run."""


class StageTimeoutError(FluxLoraError):
    """A bounded wait ran out; the message names the stage and the limit."""

    def __init__(self, stage: str, seconds: float, detail: str = "") -> None:
        self.stage = stage
        self.seconds = seconds
        msg = f"stage '{stage}' made no progress for {seconds:g}s"
        super().__init__(f"{msg}: {detail}" if detail else msg)


class RunInterrupted(FluxLoraError):
    """SIGTERM or SIGINT stopped the run at a step boundary, after a checkpoint was saved.

    `exit_code` follows the shell's convention for a signal (128 + signal number): 143 for SIGTERM, 130 for SIGINT.
    """

    def __init__(self, message: str, signum: int) -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(message)


class RankFailedError(StageTimeoutError):
    """Another process of a multi-process (DDP) run stalled, died or failed; the message names the rank.

    Exit status :data:`fluxlora.heartbeat.WATCHDOG_EXIT_CODE` (75), like the watchdog's: the group stalled, and
    `resume=auto` (or the supervisor) continues it.
    """

    exit_code = WATCHDOG_EXIT_CODE

    def __init__(self, stage: str, seconds: float, detail: str, ranks: tuple[int, ...] = ()) -> None:
        self.stage, self.seconds, self.ranks = stage, seconds, tuple(ranks)
        head = f"stage '{stage}' made no progress for {seconds:g}s" if seconds > 0 else f"stage '{stage}' failed"
        FluxLoraError.__init__(self, f"{head}: {detail}")


# ---- naming a failure by the stage it happened in ----

WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM})
"""errno values of a write the user can fix: a full disk or quota, a read-only or forbidden destination."""
WRITE_ONLY_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT})
"""The ones only a write raises (EACCES and EPERM come from reads too)."""
_GiB = 1 << 30


class WriteFailed(OSError):
    """A write failed; `filename` is the destination a user looks for, never the temp file beside it."""


class OutOfGpuMemory(FluxLoraError):
    """The GPU ran out of memory in `stage`; the message says how much was in use, of which limit, and what to
    change for that stage."""

    def __init__(self, stage: str, in_use: Optional[int], limit: Optional[int], asked: Optional[str] = None) -> None:
        self.stage, self.in_use, self.limit, self.asked = stage, in_use, limit, asked
        if in_use is None or limit is None:
            usage = "in use and limit unknown: no CUDA device was initialised"
        else:
            usage = f"{in_use / _GiB:.2f} GiB of {limit / _GiB:.2f} GiB"
        # the failed request tells one huge tensor from a slow fill, which the two numbers alone cannot
        tail = f" (the failed allocation asked for {asked})" if asked else ""
        super().__init__(f"stage '{stage}' ran out of GPU memory ({usage}): {oom_hint(stage)}{tail}")


class DiskWriteFailed(FluxLoraError):
    """A file could not be written in `stage` (full disk, read-only folder, no permission); names the file."""

    def __init__(self, stage: str, path: Optional[str], reason: str, err: int) -> None:
        self.stage, self.path, self.errno = stage, path, err
        what = path if path else "a file (the system did not say which)"
        fix = ("free space there (or set output.root elsewhere)" if err in (errno.ENOSPC, errno.EDQUOT)
               else "make it writable (or set output.root elsewhere)")
        again = ("then run again: resume=auto continues from the last checkpoint" if _STAGE_KIND.get(stage) in
                 ("step", "checkpoint", "lora") else "then run again")
        super().__init__(f"stage '{stage}' could not write {what}: {reason}; {fix}, {again}")


_STAGE_KIND = {  # heartbeat stage -> which advice fits it
    "load_model": "load", "build": "load", "trainer_setup": "load", "fit_start": "load", "train_start": "load",
    "caching": "cache",
    "training_step": "step", "between_steps": "step", "epoch_start": "step", "epoch_end": "step",
    "validation": "step",
    "checkpoint_save": "checkpoint", "lora_save": "lora",
}
_HINTS = {
    "load": "use a smaller +vram tier, memory.base_storage=fp8 or more memory.blocks_to_swap",
    "cache": "lower data.cache_batch_size (images per encoder call), down to 1",
    "step": "use a smaller +vram tier, more memory.blocks_to_swap, memory.gradient_checkpointing=true, or a lower "
            "data.resolution or data.batch_size; resume=auto continues from the last checkpoint",
    "checkpoint": "more memory.blocks_to_swap or a smaller +vram tier leaves room to gather the checkpoint; the "
                  "earlier checkpoints are intact and resume=auto continues from the last one",
    "lora": "output.dtype=bf16 and more memory.blocks_to_swap leave room to gather the LoRA; resume=auto continues "
            "from the last checkpoint and writes it",
    "sampling": "sample.mode=between_steps or smaller sample sizes (--w/--h), or sample.mode=off",
}


def oom_hint(stage: str) -> str:
    """What to change when `stage` ran out of GPU memory."""
    kind = "sampling" if stage.startswith("sampling") else _STAGE_KIND.get(stage)
    return _HINTS.get(kind, "use a smaller +vram tier or more memory.blocks_to_swap")


def write_error(exc: BaseException) -> Optional[OSError]:
    """The OSError behind a failed write in `exc` or its causes, if it is one a user can fix (WRITE_ERRNOS)."""
    for e in _chain(exc):
        if isinstance(e, OSError) and e.errno in WRITE_ERRNOS and (
                isinstance(e, WriteFailed) or e.errno in WRITE_ONLY_ERRNOS):
            return e
    return None


def stage_error(exc: BaseException, stage: str,
                memory: Optional[Callable[[], Optional[tuple[int, int]]]] = None) -> Optional[FluxLoraError]:
    """`exc` as the one-line error that names `stage`, for failures a user can act on: the GPU ran out of memory, or
    a file could not be written. None for anything else (a FluxLoraError already names what it is about).
    `memory`: (bytes in use, the process's limit) for the out-of-memory line (`fluxlora.perf.cuda_setup.memory_use`,
    passed by the run: errors sit below perf and import nothing from it)."""
    if isinstance(exc, FluxLoraError):
        return None
    for e in _chain(exc):
        if _is_out_of_memory(e):
            asked = _ASKED.search(str(e))
            return OutOfGpuMemory(stage, *((memory() if memory is not None else None) or (None, None)),
                                  asked=asked.group(1) if asked else None)
    err = write_error(exc)
    if err is not None:
        return DiskWriteFailed(stage, err.filename, err.strerror or str(err), err.errno)
    return None


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """`exc`, then what it was raised from or while handling, oldest last (bounded: chains can loop)."""
    seen: set[int] = set()
    e: Optional[BaseException] = exc
    while e is not None and id(e) not in seen and len(seen) < 16:
        seen.add(id(e))
        yield e
        e = e.__cause__ or e.__context__


_CUDA_OOM = re.compile(r"CUDA (error: )?out of memory", re.IGNORECASE)
_ASKED = re.compile(r"Tried to allocate ([\d.]+ [KMGT]?i?B)")  # torch's allocator message names the request


def _is_out_of_memory(e: BaseException) -> bool:
    import torch

    if isinstance(e, torch.OutOfMemoryError):
        return True
    return isinstance(e, RuntimeError) and _CUDA_OOM.search(str(e)) is not None
