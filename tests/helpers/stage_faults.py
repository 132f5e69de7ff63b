"""Fault callbacks for the stage-error tests: the GPU runs out of memory, the disk fills up or turns read-only, in
the hook where it would happen in a real run (importable as `stage_faults`: tests/ is on sys.path).

Added to a run through Hydra, e.g. `+callbacks.oom._target_=helpers.stage_faults.OomInStep +callbacks.oom.at_step=3`.
"""

from __future__ import annotations

import errno
import subprocess
from pathlib import Path
from typing import Any

import lightning as L
import torch

OOM_TEXT = "CUDA out of memory. Tried to allocate 2.00 GiB (fake, raised by a test)"


def oom() -> torch.OutOfMemoryError:
    """The exception CUDA's caching allocator raises."""
    return torch.OutOfMemoryError(OOM_TEXT)


class OomInStep(L.Callback):
    """Inside the training step of `at_step` (after backward, before the optimizer step), run out of GPU memory."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.at_step:
            raise oom()


class OomOnSave(L.Callback):
    """While the checkpoint of `at_step` is gathered, run out of GPU memory."""

    def __init__(self, at_step: int) -> None:
        self.at_step = at_step

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.global_step == self.at_step:
            raise oom()


class FillDisk(L.Callback):
    """At the end of step `at_step` (before that step's checkpoint is saved: checkpoint callbacks run last), fill
    the filesystem that holds `path` with a file of zeros until the kernel says ENOSPC."""

    def __init__(self, at_step: int, path: str) -> None:
        self.at_step, self.path = at_step, Path(path)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self.at_step:
            return
        try:
            with open(self.path / ".filler", "wb") as f:
                while True:
                    f.write(b"\0" * (1 << 16))
                    f.flush()
        except OSError as e:
            if e.errno != errno.ENOSPC:
                raise


class ReadOnlyDirs(L.Callback):
    """At the end of step `at_step`, bind-mount each of `dirs` (under `root`) read-only onto itself, as a disk that
    turns read-only under a running job. Needs a mount namespace of its own (`unshare -rm`)."""

    def __init__(self, at_step: int, root: str, dirs: list) -> None:
        self.at_step, self.root, self.dirs = at_step, Path(root), list(dirs)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step != self.at_step:
            return
        for d in self.dirs:
            p = str(self.root / d)
            subprocess.run(["mount", "--bind", p, p], check=True)
            subprocess.run(["mount", "-o", "remount,bind,ro", p], check=True)
