"""Errors a user can act on: they end a run with one line that names the file, key or stage."""

from __future__ import annotations


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

    Exit status 75, like the watchdog's: the group stalled, and `resume=auto` (or the supervisor) continues it.
    """

    exit_code = 75

    def __init__(self, stage: str, seconds: float, detail: str, ranks: tuple[int, ...] = ()) -> None:
        self.stage, self.seconds, self.ranks = stage, seconds, tuple(ranks)
        head = f"stage '{stage}' made no progress for {seconds:g}s" if seconds > 0 else f"stage '{stage}' failed"
        FluxLoraError.__init__(self, f"{head}: {detail}")
