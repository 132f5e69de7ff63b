r"""Computes the validation loss every N steps and at the end, logs it, and keeps the LoRA with the lowest one."""

from __future__ import annotations

import logging
import math
from typing import Any, Optional, Sequence

import lightning as L
import torch
from typing_extensions import override

from fluxlora.distributed.strategy import agree_sum
from fluxlora.errors import FluxLoraError
from fluxlora.heartbeat import heartbeat, in_stage
from fluxlora.training.validation import DEFAULT_SIGMAS, batch_loss, evaluating

log = logging.getLogger(__name__)

METRIC = "val_loss"
"""The name the loss is logged under (TensorBoard, `metrics.csv`), at the optimizer step it was measured after."""


class ValidationLoss(L.Callback):
    """The flow-matching loss on the DataModule's validation images (`validation.split` or `validation.path`).

    Every `every_n_steps` optimizer steps and once at the end of training, each image is scored at every σ of
    `sigmas` with its own fixed noise (`fluxlora.training.validation`): the value changes only when the LoRA does, and
    training after it draws the same noise and σ as without it. Each rank scores its share of the batches and one
    all-reduce adds them up. The loss goes to the loggers as `val_loss` (TensorBoard, CSV) and to the loss curve; with
    `keep_best`, rank 0 writes `<name>-best.safetensors` through the LoRA saver at each new low. The best value and
    the curve are in `state_dict`, so a resumed run does not overwrite a better file with a worse one. A heartbeat per
    batch (stage `validation`) lets the watchdog name a stall here.

    Args:
        name: the LoRA file stem: `<name>-best.safetensors`.
        every_n_steps: evaluate every N optimizer steps; 0 = at the end of training only.
        sigmas: the fixed noise levels, each in (0, 1].
        seed: seeds each image's noise.
        batch_size: images per forward pass; None = the DataModule's batch size.
        keep_best: write the LoRA at each new lowest validation loss (needs a `LoRASaver`: `use_saver`, or the
            first one among the trainer's callbacks).

    Example::

        trainer = Trainer(callbacks=[ValidationLoss("mychar", every_n_steps=100, keep_best=True), saver])
        trainer.fit(module, datamodule=FluxDataModule(cfg.data, cache_dir, val_split=0.1))
    """

    def __init__(self, name: str, every_n_steps: int = 100, sigmas: Sequence[float] = DEFAULT_SIGMAS, seed: int = 0,
                 batch_size: Optional[int] = None, keep_best: bool = False) -> None:
        super().__init__()
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be a non-negative int, got {every_n_steps!r}")
        sigmas = [float(s) for s in sigmas]
        if not sigmas or not all(0 < s <= 1 for s in sigmas):
            raise ValueError(f"sigmas must be numbers in (0, 1], got {sigmas!r}")
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive int or None, got {batch_size!r}")
        self._name = str(name)
        self._every = every_n_steps
        self._sigmas = sigmas
        self._seed = int(seed)
        self._batch_size = batch_size
        self._keep_best = bool(keep_best)
        self._saver: Any = None
        self._data: Any = None
        self.best: Optional[float] = None
        self.best_step: Optional[int] = None
        self.history: list[tuple[int, float]] = []
        """(optimizer step, validation loss) of every evaluation, resumed runs included."""
        self._last_step = -1

    def use_saver(self, saver: Any) -> None:
        """The `LoRASaver` whose public `save` writes the best LoRA (`fluxlora.run.build.connect_callbacks`)."""
        self._saver = saver

    def points(self) -> list[tuple[int, float]]:
        """The validation curve, (step, loss) (`LossSummary.add_curve` draws it beside the training loss)."""
        return list(self.history)

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        dm = getattr(trainer, "datamodule", None)
        self._data = dm if dm is not None and getattr(dm, "val_entries", None) else None
        if self._data is None or not self._keep_best or self._saver is not None:
            return
        from fluxlora.callbacks.lora_saver import LoRASaver

        self._saver = next((c for c in trainer.callbacks if isinstance(c, LoRASaver)), None)
        if self._saver is None:
            raise FluxLoraError("validation.keep_best=true needs callbacks.lora_saver, which writes the LoRA file")

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._every and step > 0 and step % self._every == 0 and step != self._last_step:
            self.validate(trainer, pl_module)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step > 0 and trainer.global_step != self._last_step:
            self.validate(trainer, pl_module)

    def evaluate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[float]:
        """The validation loss of the LoRA as it is now (the mean over images and σ, all ranks together); None
        without validation images. Leaves the RNG streams, train mode and autocast state as they were."""
        if self._data is None:
            return None
        step = trainer.global_step
        plan = self._data.validation_plan(self._batch_size, trainer.global_rank, trainer.world_size)
        total = torch.zeros((), dtype=torch.float64, device=pl_module.device)
        count = 0
        with in_stage("validation", f"step {step}"), evaluating(pl_module, trainer):
            for i, indices in enumerate(plan):
                heartbeat("validation", f"batch {i + 1}/{len(plan)} at step {step}")
                batch = self._data.validation_batch(indices)
                total += batch_loss(pl_module, batch, self._sigmas, self._seed).double() * len(indices)
                count += len(indices)
        total_all, count_all = agree_sum(trainer, [float(total), float(count)])  # one sync per evaluation
        return total_all / count_all if count_all else None

    def validate(self, trainer: L.Trainer, pl_module: L.LightningModule) -> Optional[float]:
        """Evaluate, log `val_loss` at this step, and keep the LoRA on a new low (`keep_best`)."""
        step = trainer.global_step
        self._last_step = step
        value = self.evaluate(trainer, pl_module)
        if value is None:
            return None
        if not math.isfinite(value):
            log.warning("validation loss at step %d is %s", step, value)
        self.history.append((step, value))
        better = math.isfinite(value) and (self.best is None or value < self.best)
        log.info("validation loss %.5f at step %d (%d images, σ %s)%s", value, step, len(self._data.val_entries),
                 ", ".join(f"{s:g}" for s in self._sigmas),
                 " - new best" if better and self.best is not None else "")
        if trainer.is_global_zero:
            for logger in trainer.loggers:  # at this step: pl_module.log would file it under the step before, and
                logger.log_metrics({METRIC: value}, step=step)  # drop it between log_every_n_steps
                logger.save()
        if better:
            self.best, self.best_step = value, step
            if self._keep_best and trainer.is_global_zero:
                self._saver.save(pl_module, f"{self._name}-best", trainer)
        return value

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "last_step": self._last_step,
                "history": [[s, v] for s, v in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.best = state_dict.get("best")
        self.best_step = state_dict.get("best_step")
        self._last_step = int(state_dict.get("last_step", -1))
        self.history = [(int(s), float(v)) for s, v in state_dict.get("history", [])]
