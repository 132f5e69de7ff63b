r"""ResumeState: what Lightning leaves out of a checkpoint — RNG streams and the shuffling position."""

from __future__ import annotations

import logging
import random
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

log = logging.getLogger(__name__)


def capture_rng() -> dict[str, Any]:
    """Torch (CPU and every CUDA device), NumPy and Python RNG states, as tensors and plain values.

    Everything is a tensor, int, float, str or tuple so the checkpoint loads with ``weights_only=True``.
    """
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    py_version, py_state, py_gauss = random.getstate()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": py_version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss": py_gauss},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng`."""
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = state["python"]
    random.setstate((p["version"], tuple(int(x) for x in p["state"].tolist()), p["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _shuffle_generator(trainer: L.Trainer) -> Optional[torch.Generator]:
    """The torch.Generator that shuffles the training DataLoader (sampler's or loader's), if there is one."""
    loader = trainer.train_dataloader
    if isinstance(loader, (list, tuple)) and len(loader) == 1:
        loader = loader[0]
    for holder in (getattr(loader, "sampler", None), getattr(getattr(loader, "batch_sampler", None), "sampler", None),
                   loader):
        gen = getattr(holder, "generator", None)
        if isinstance(gen, torch.Generator):
            return gen
    return None


class ResumeState(L.Callback):
    """Save and restore the random streams, so a resumed run draws the same noise, σ and data order.

    Guarantee: a run resumed from a checkpoint continues the torch (CPU and CUDA), NumPy and Python random streams
    exactly where the saved run left them: they are captured when the checkpoint is written and put back right
    before the first training step after the resume (after everything that may consume randomness while setting up).
    Lightning does not save RNG states by default. For a DataModule without its own ``state_dict``, a checkpoint
    taken at the end of an epoch also holds the state of the generator that shuffles the training DataLoader, and the
    resumed run re-draws its first epoch from it, so a run resumed at an epoch boundary sees the same data order. A
    DataModule with a ``state_dict`` (one that records its sampler position) is left to restore itself, mid-epoch
    included; mid-epoch resumes of a plain shuffled DataLoader do not get the saved order back.

    Example::

        trainer = Trainer(callbacks=[ResumeState(), PeriodicCheckpoint("outputs/mychar/checkpoints")])
    """

    def __init__(self) -> None:
        super().__init__()
        self._trainer: Optional[L.Trainer] = None
        self._pending_rng: Optional[dict] = None
        self._pending_data: Optional[torch.Tensor] = None

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    @override
    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"rng": capture_rng()}
        trainer = self._trainer
        dm = getattr(trainer, "datamodule", None) if trainer is not None else None
        if dm is not None and not is_overridden("state_dict", dm, L.LightningDataModule):
            gen = _shuffle_generator(trainer)
            if gen is not None and trainer.fit_loop.epoch_loop.batch_progress.is_last_batch:
                state["shuffle_generator"] = gen.get_state()  # at an epoch's end: the next epoch's order
        return state

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._pending_rng = state_dict.get("rng")
        self._pending_data = state_dict.get("shuffle_generator")

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning made the epoch's iterator (and drew its order) before this hook: restore the generator and
        # make the iterator again, so the first epoch after the resume draws the order the saved run would have.
        if self._pending_data is None:
            return
        gen = _shuffle_generator(trainer)
        fetcher = getattr(trainer.fit_loop, "_data_fetcher", None)
        if gen is not None and fetcher is not None:
            gen.set_state(self._pending_data)
            iter(fetcher)
            log.info("data order restored from the checkpoint (shuffling generator)")
        else:
            log.warning("data order could not be restored: no shuffling generator or data fetcher found")
        self._pending_data = None

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        if self._pending_rng is not None:
            restore_rng(self._pending_rng)
            self._pending_rng = None
