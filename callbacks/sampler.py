r"""Sample images during training, each round bounded by a timeout so a hung sampler cannot stall the run."""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from typing_extensions import override

from fluxlora.errors import StageTimeoutError
from fluxlora.sampling import SampleRenderer, grid, load_prompts

log = logging.getLogger(__name__)


class TimedSampler(L.Callback):
    """Render sample prompts every N steps and/or at the start and end of training.

    A round runs on its own thread and the training loop waits for it at most `timeout_s` seconds; a round
    that runs over ends the run with an error naming the `sampling` stage instead of hanging it.
    Prompt encodings are computed once, in :meth:`prepare`, while the text encoders are loaded.

    Args:
        output_dir: the run folder; images go to `sample/<name>_<step>_<idx>.png` plus a grid per round.
        name: file-name stem.
        prompts: prompt lines in kohya's format (`--w --h --d --s --g --n` flags).
        prompts_file: a kohya sample-prompts file, read in addition to `prompts`.
        every_n_steps: sample every N optimizer steps; 0 = off.
        at_start: sample before the first step.
        at_end: sample after the last step.
        timeout_s: the most one round may take.
        defaults: values for flags a prompt line leaves out (width, height, seed, steps, guidance).

    Example::

        sampler = TimedSampler("outputs/mychar", "mychar", prompts=["sks dog --w 512 --h 512"], every_n_steps=250)
    """

    def __init__(self, output_dir: str, name: str, prompts: Optional[list] = None, prompts_file: Optional[str] = None,
                 every_n_steps: int = 0, at_start: bool = False, at_end: bool = True, timeout_s: float = 600.0,
                 defaults: Optional[dict] = None) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be a non-negative int, got {every_n_steps!r}")
        if not timeout_s or float(timeout_s) <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        self._dir = Path(output_dir) / "sample"
        self._name = str(name)
        self._prompts = load_prompts(list(prompts or []), prompts_file, dict(defaults or {}))
        self._every = every_n_steps
        self._at_start = bool(at_start)
        self._at_end = bool(at_end)
        self._timeout = float(timeout_s)
        self._renderer: SampleRenderer | None = None
        self.rounds: list[Path] = []

    @property
    def enabled(self) -> bool:
        return bool(self._prompts) and (self._every > 0 or self._at_start or self._at_end)

    def prepare(self, components: Any, device: torch.device, max_length: int) -> None:
        """Encode the prompts now, while the text encoders are on `device`."""
        if self.enabled:
            self._renderer = SampleRenderer(components, self._prompts, device, max_length)

    def sample(self, pl_module: L.LightningModule, step: int) -> Path | None:
        """Run one round within the timeout; returns the grid path."""
        if self._renderer is None:
            return None
        result: dict = {}

        def work() -> None:
            try:
                result["path"] = self._round(pl_module, step)
            except BaseException as e:  # reported on the training thread
                result["error"] = e

        t = threading.Thread(target=work, name=f"fluxlora-sampler-{step}", daemon=True)
        t.start()
        t.join(self._timeout)
        if t.is_alive():
            raise StageTimeoutError("sampling", self._timeout, f"sample round at step {step} did not finish")
        if "error" in result:
            raise RuntimeError(f"sampling at step {step} failed: {result['error']}") from result["error"]
        return result["path"]

    def _round(self, pl_module: L.LightningModule, step: int) -> Path:
        c = self._renderer.c
        was_training = pl_module.transformer.training
        vae_device = next(c.vae.parameters()).device
        pl_module.transformer.eval()
        c.vae.to(pl_module.device)
        try:
            images = [self._renderer.render(p, pl_module.device, pl_module.compute_dtype) for p in self._prompts]
        finally:
            c.vae.to(vae_device)
            pl_module.transformer.train(was_training)
        self._dir.mkdir(parents=True, exist_ok=True)
        for i, im in enumerate(images):
            im.save(self._dir / f"{self._name}_{step:06d}_{i:02d}.png")
        path = self._dir / f"{self._name}_{step:06d}_grid.png"
        grid(images).save(path)
        self.rounds.append(path)
        log.info("samples at step %d: %s", step, path)
        return path

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._at_start and trainer.is_global_zero:
            self.sample(pl_module, trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if self._every and step % self._every == 0 and step > 0 and trainer.is_global_zero:
            self.sample(pl_module, step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._at_end and trainer.is_global_zero:
            self.sample(pl_module, trainer.global_step)
