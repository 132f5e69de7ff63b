"""Flow matching for Flux: σ sampling (sd-scripts' modes plus logit-normal), noising, packing and the loss.

x_t = (1-σ)·x0 + σ·ε and the transformer predicts the velocity ε - x0, as in sd-scripts and diffusers.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

SIGMA_MODES = ("uniform", "sigmoid", "shift", "flux_shift", "sigma", "logit_normal")
LOSSES = ("l2", "l1", "huber")


@dataclass
class FlowConfig:
    """How σ is drawn and how the prediction is scored."""

    timestep_sampling: str = "shift"
    """One of SIGMA_MODES; `shift` with discrete_flow_shift 3.1582 is FluxGym's default."""
    sigmoid_scale: float = 1.0
    """Scale of the normal draw before the sigmoid in `sigmoid`, `shift` and `flux_shift`."""
    discrete_flow_shift: float = 3.1582
    """The shift s of σ' = sσ / (1 + (s-1)σ) in `shift` mode."""
    logit_mean: float = 0.0
    """Mean of the normal draw in `logit_normal` mode."""
    logit_std: float = 1.0
    """Standard deviation of the normal draw in `logit_normal` mode."""
    num_train_timesteps: int = 1000
    """The discrete grid of `sigma` mode (the scheduler's)."""
    guidance_scale: float = 1.0
    """Guidance value fed to guidance-distilled models (Flux-dev) during training."""
    loss: str = "l2"
    """l2, l1 or huber; computed in fp32."""
    huber_c: float = 0.1
    """The δ of the pseudo-Huber loss."""

    def __post_init__(self) -> None:
        if self.timestep_sampling not in SIGMA_MODES:
            raise ValueError(f"flow.timestep_sampling={self.timestep_sampling!r} is not one of {SIGMA_MODES}")
        if self.loss not in LOSSES:
            raise ValueError(f"flow.loss={self.loss!r} is not one of {LOSSES}")
        if self.discrete_flow_shift <= 0:
            raise ValueError(f"flow.discrete_flow_shift must be > 0, got {self.discrete_flow_shift}")


def shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """σ' = sσ / (1 + (s-1)σ): the SD3/Flux resolution shift with a fixed s."""
    return sigma * shift / (1 + (shift - 1) * sigma)


def flux_mu(image_seq_len: int, x1: int = 256, y1: float = 0.5, x2: int = 4096, y2: float = 1.15) -> float:
    """Flux's resolution-dependent μ: linear in the number of packed latent tokens."""
    m = (y2 - y1) / (x2 - x1)
    return m * image_seq_len + (y1 - m * x1)


def flux_time_shift(mu: float, sigma: torch.Tensor) -> torch.Tensor:
    """e^μ / (e^μ + 1/σ - 1): the shift Flux's sampler applies for a given μ."""
    return math.exp(mu) / (math.exp(mu) + (1 / sigma - 1))


def sample_sigmas(cfg: FlowConfig, batch: int, image_seq_len: int, generator: torch.Generator | None = None,
                  device: torch.device | str = "cpu") -> torch.Tensor:
    """Draw one σ in (0, 1) per sample (on the CPU generator, so runs are reproducible), then move it."""
    mode = cfg.timestep_sampling
    if mode == "uniform":
        sigma = torch.rand(batch, generator=generator)
    elif mode == "logit_normal":
        sigma = torch.sigmoid(cfg.logit_mean + cfg.logit_std * torch.randn(batch, generator=generator))
    elif mode == "sigma":
        idx = torch.randint(0, cfg.num_train_timesteps, (batch,), generator=generator)
        sigma = (idx + 1).float() / cfg.num_train_timesteps
    else:
        sigma = torch.sigmoid(cfg.sigmoid_scale * torch.randn(batch, generator=generator))
        if mode == "shift":
            sigma = shift_sigma(sigma, cfg.discrete_flow_shift)
        elif mode == "flux_shift":
            sigma = flux_time_shift(flux_mu(image_seq_len), sigma)
    return sigma.to(device)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) → (B, H/2·W/2, 4C): Flux's 2×2 patch tokens, as diffusers' FluxPipeline packs them."""
    b, c, h, w = latents.shape
    x = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Inverse of pack_latents for latents of (height, width)."""
    b, _, d = tokens.shape
    c = d // 4
    x = tokens.view(b, height // 2, width // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(b, c, height, width)


def image_ids(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Positional ids (0, row, col) for the packed tokens of a (height, width) latent."""
    h, w = height // 2, width // 2
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3).to(device=device, dtype=dtype)


def noise_latents(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """x_t = (1-σ)·x0 + σ·ε with σ broadcast over the sample's dimensions."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def flow_loss(pred: torch.Tensor, target: torch.Tensor, kind: str = "l2", huber_c: float = 0.1) -> torch.Tensor:
    """Mean loss in fp32 whatever the compute dtype."""
    pred, target = pred.float(), target.float()
    if kind == "l2":
        return F.mse_loss(pred, target)
    if kind == "l1":
        return F.l1_loss(pred, target)
    if kind == "huber":
        return (torch.sqrt((pred - target) ** 2 + huber_c**2) - huber_c).mean()
    raise ValueError(f"unknown loss {kind!r}; expected one of {LOSSES}")
