"""Errors a user can act on: they end a run with one line that names the file, key or stage."""

from __future__ import annotations


class FluxLoraError(RuntimeError):
    """A problem with the user's input or environment; reported as one line, exit status non-zero."""


class StageTimeoutError(FluxLoraError):
    """A bounded wait ran out; the message names the stage and the limit."""

    def __init__(self, stage: str, seconds: float, detail: str = "") -> None:
        self.stage = stage
        self.seconds = seconds
        msg = f"stage '{stage}' made no progress for {seconds:g}s"
        super().__init__(f"{msg}: {detail}" if detail else msg)
