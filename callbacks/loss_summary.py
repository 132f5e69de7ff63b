r"""Keeps the per-step loss, prints whether it fell, and draws the loss curve at the end."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from fluxlora.atomic import atomic_open
from fluxlora.heartbeat import in_stage

log = logging.getLogger(__name__)


class LossSummary(L.Callback):
    """Record each step's loss and write `loss_curve.png` when training ends.

    Losses are kept as detached tensors and read once at the end, so no step waits on the device.
    The summary compares the mean of the first and last `window` steps.

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
        self._losses: list[torch.Tensor] = []
        self.first_mean: float | None = None
        self.last_mean: float | None = None

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if isinstance(loss, torch.Tensor):
            self._losses.append(loss.detach())

    def values(self) -> list[float]:
        return torch.stack(self._losses).float().cpu().tolist() if self._losses else []

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
        log.info(msg)
        print(msg, flush=True)
        self._plot(losses)

    def _plot(self, losses: list[float]) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(range(1, len(losses) + 1), losses, lw=0.8, alpha=0.6, label="loss")
        k = max(1, len(losses) // 20)
        if k > 1:
            smooth = [sum(losses[max(0, i - k + 1):i + 1]) / len(losses[max(0, i - k + 1):i + 1]) for i in range(len(losses))]
            ax.plot(range(1, len(losses) + 1), smooth, lw=1.5, label=f"mean of {k}")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching loss")
        ax.legend()
        fig.tight_layout()
        with in_stage("loss_curve"), atomic_open(self._dir / "loss_curve.png") as f:  # a failed write names the file
            fig.savefig(f, format="png")
        plt.close(fig)
