r"""Keeps the per-step loss, prints whether it fell, and draws the loss curve (with the validation loss) at the end."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable

import lightning as L
import torch
from typing_extensions import override

from fluxlora.atomic import atomic_open
from fluxlora.heartbeat import in_stage

log = logging.getLogger(__name__)


class LossSummary(L.Callback):
    """Record each step's loss and write `loss_curve.png` when training ends.

    Losses are kept as detached tensors and read once at the end, so no step waits on the device (and at each
    checkpoint, whose `state_dict` carries them: a resumed run summarises and draws the whole run, not its tail).
    The summary compares the mean of the first and last `window` steps. Curves added with `add_curve` (the
    validation loss) are drawn beside it, by optimizer step, and their lowest point is named in the summary line.

    Args:
        output_dir: where `loss_curve.png` goes.
        window: steps averaged at each end of the run.

    Example::

        trainer = Trainer(callbacks=[LossSummary("outputs/mychar", window=10)])
    """

    def __init__(self, output_dir: str, window: int = 5) -> None:
        super().__init__()
        if not isinstance(window, int) or window < 1:
            raise ValueError(f"window must be a positive int, got {window!r}")
        self._dir = Path(output_dir)
        self._window = window
        self._read: list[float] = []  # losses already read from the device (and those a resumed checkpoint held)
        self._losses: list[torch.Tensor] = []  # losses since, not read yet
        self._steps: list[int] = []  # the optimizer step each loss led to (x of the curve), earlier ones included
        self._curves: dict[str, Callable[[], list[tuple[int, float]]]] = {}
        self.first_mean: float | None = None
        self.last_mean: float | None = None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())
            self._steps.append(trainer.global_step)

    def add_curve(self, label: str, points: Callable[[], list[tuple[int, float]]]) -> None:
        """Draw `points()` ((step, value) pairs, read when training ends) as `label` beside the training loss."""
        self._curves[label] = points

    def values(self) -> list[float]:
        """Every step's loss, the steps before a resume first. Each loss is read from the device once (the
        checkpoints call this too)."""
        if self._losses:
            self._read += torch.stack(self._losses).float().cpu().tolist()
            self._losses = []
        return list(self._read)

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"losses": self.values(), "steps": list(self._steps)}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._read = [float(v) for v in state_dict.get("losses", [])]
        self._steps = [int(s) for s in state_dict.get("steps", [])][:len(self._read)]
        self._losses = []

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        losses = self.values()
        if not losses or not trainer.is_global_zero:
            return
        n = min(self._window, max(1, len(losses) // 2))
        self.first_mean = sum(losses[:n]) / n
        self.last_mean = sum(losses[-n:]) / n
        msg = (f"loss: mean of first {n} steps {self.first_mean:.4f} -> last {n} steps {self.last_mean:.4f} "
               f"({'falling' if self.last_mean < self.first_mean else 'not falling'})")
        curves = {label: points() for label, points in self._curves.items()}
        for label, points in curves.items():
            finite = [(v, s) for s, v in points if math.isfinite(v)]
            if finite:
                best, step = min(finite)
                msg += f"; {label} loss best {best:.4f} at step {step} (last {points[-1][1]:.4f})"
        log.info(msg)
        print(msg, flush=True)
        self._plot(losses, curves)

    def _plot(self, losses: list[float], curves: dict[str, list[tuple[int, float]]] | None = None) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        steps = self._steps if len(self._steps) == len(losses) else list(range(1, len(losses) + 1))
        ax.plot(steps, losses, lw=0.8, alpha=0.6, label="training loss")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
        for label, points in (curves or {}).items():
            if points:
                ax.plot([s for s, _ in points], [v for _, v in points], "o-", ms=3, lw=1.2, label=f"{label} loss")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        ax.legend()
        fig.tight_layout()
        with in_stage("loss_curve"), atomic_open(self._dir / "loss_curve.png") as f:  # a failed write names the file
            fig.savefig(f, format="png")
        plt.close(fig)
