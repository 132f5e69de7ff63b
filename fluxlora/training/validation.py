"""The validation loss: the training flow-matching loss on images never trained on, at fixed σ values and with fixed
noise per image, so one evaluation compares with the next (sd-scripts fixes its validation timesteps and seed the same
way). It runs in eval mode without gradients, under the trainer's evaluation autocast, with the regionally compiled
blocks run eagerly, and inside a fork of the RNG streams: training after a validation pass draws exactly what it
would have drawn without one.

Example::

    settings = ValidationSettings(split=0.1, every_n_steps=100, keep_best=True)
    with evaluating(module, trainer):
        loss = batch_loss(module, batch, settings.sigmas, settings.seed)    # a 0-d tensor on the module's device
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch

from fluxlora.data.holdout import key_digest, sample_key
from fluxlora.perf.speed import eager_blocks

DEFAULT_SIGMAS = (0.1, 0.3, 0.5, 0.7, 0.9)


@dataclass(frozen=True)
class ValidationSettings:
    """The `validation` group: which images, how often, at which σ, and whether to keep the best LoRA."""

    split: int | float = 0
    """Images held out of the dataset: a count (4) or a fraction below 1 (0.1); 0 = none."""
    path: str | None = None
    """A folder (or dataset.toml) of validation images instead of a split."""
    every_n_steps: int = 100
    """Evaluate every N optimizer steps, and once more at the end of training; 0 = at the end only."""
    sigmas: list = field(default_factory=lambda: list(DEFAULT_SIGMAS))
    """The fixed noise levels, each in (0, 1]; the loss is their mean."""
    seed: int = 0
    """Seeds the split and each image's noise (the same at every evaluation, whatever the run's seed)."""
    batch_size: int | None = None
    """Images per forward pass; None = data.batch_size."""
    keep_best: bool = False
    """Write `<name>-best.safetensors` at every new lowest validation loss."""

    def __post_init__(self) -> None:
        split = self.split
        if isinstance(split, float) and not (0 <= split < 1):
            raise ValueError(f"validation.split={split!r} must be a count of images (a whole number >= 0) or a "
                             "fraction in (0, 1)")
        if isinstance(split, int) and split < 0:
            raise ValueError(f"validation.split={split!r} must be a count of images (a whole number >= 0) or a "
                             "fraction in (0, 1)")
        if split and self.path not in (None, ""):
            raise ValueError(f"validation.split={split!r} and validation.path={self.path!r}: give one of them")
        if self.every_n_steps < 0:
            raise ValueError(f"validation.every_n_steps={self.every_n_steps!r} must be a whole number >= 0")
        if not self.sigmas:
            raise ValueError("validation.sigmas=[] needs at least one σ in (0, 1]")
        for s in self.sigmas:
            if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0 < s <= 1:
                raise ValueError(f"validation.sigmas: {s!r} is not a number in (0, 1]")
        if self.batch_size is not None and self.batch_size < 1:
            raise ValueError(f"validation.batch_size={self.batch_size!r} must be a whole number >= 1 or null")

    @property
    def enabled(self) -> bool:
        """Whether there are validation images (a split or a folder)."""
        return bool(self.split) or self.path not in (None, "")


def fixed_noise(shape: Sequence[int], seed: int, key: str) -> torch.Tensor:
    """The noise of one validation image: float32 on the CPU from a generator seeded by (seed, the image's name),
    so it is the same at every evaluation, on every device and on whichever rank evaluates the image."""
    generator = torch.Generator().manual_seed(int.from_bytes(key_digest(seed, key)[:8], "little") >> 1)
    return torch.randn(tuple(shape), generator=generator)


def batch_loss(module: Any, batch: dict, sigmas: Sequence[float], seed: int) -> torch.Tensor:
    """The mean flow-matching loss of one validation batch (images of one bucket) over the fixed `sigmas`, each image
    with its fixed noise; `module.flow_loss` scores it exactly as a training step does. Call inside `evaluating`."""
    b, c, h, w = batch["latents"].shape
    tokens, width = (h // 2) * (w // 2), c * 4  # the packed latents' shape (fluxlora.training.flow.pack_latents)
    noise = torch.stack([fixed_noise((tokens, width), seed, sample_key(p)) for p in batch["path"]])
    losses = [module.flow_loss(batch, noise=noise, sigma=torch.full((b,), float(s))) for s in sigmas]
    return torch.stack(losses).mean()


@contextlib.contextmanager
def evaluating(module: torch.nn.Module, trainer: Any = None) -> Iterator[None]:
    """Eval mode, no gradients, the trainer's evaluation autocast (the one its precision trains under), compiled
    blocks run eagerly (no new graphs beside the training ones) and forked RNG streams (CPU, and the module's CUDA
    device); each module's train/eval mode, the autocast state and the RNG states are as before afterwards, also
    after an error."""
    modes = [(m, m.training) for m in module.modules()]
    device = getattr(module, "device", None) or next(module.parameters()).device  # swapped blocks may sit on the host
    autocast = trainer.precision_plugin.val_step_context() if trainer is not None else contextlib.nullcontext()
    transformer = getattr(module, "transformer", module)
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []), torch.no_grad(), \
                eager_blocks(transformer), autocast:
            module.eval()
            yield
    finally:
        for m, mode in modes:
            m.training = mode
