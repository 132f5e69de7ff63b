"""The `train` settings group: what a non-finite loss does. Light (no torch, no Lightning), so the run's
configuration is checked before `fluxlora.training.module` and Lightning are imported."""

from __future__ import annotations

from dataclasses import dataclass

NONFINITE = ("stop", "skip")
"""`train.nonfinite`: what a NaN/inf loss does (skip drops the step; the run stops after
`train.max_nonfinite_skips` dropped steps)."""


@dataclass(frozen=True)
class TrainSettings:
    """The `train` group: what a non-finite loss does."""

    nonfinite: str = "stop"
    max_nonfinite_skips: int = 10
