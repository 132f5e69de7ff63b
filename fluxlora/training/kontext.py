"""FLUX.1 Kontext's training input: the control image's latent tokens ride after the noisy target's.

Kontext is a Flux-dev transformer trained to edit: at every step the clean latents of the control ("before")
image are packed like the target's and appended after its noisy tokens, their position ids carrying 1 in the first
channel (the target's carry 0), and only the target's tokens are predicted and scored. This is what diffusers'
`FluxKontextPipeline` feeds the transformer at sampling time (`image_ids[..., 0] = 1`, `torch.cat([latents,
image_latents], dim=1)`, `noise_pred[:, :latents.size(1)]`), so a LoRA trained on it samples as it trained.
"""

from __future__ import annotations

import torch

from fluxlora.training import flow as fm

CONTROL_INDEX = 1.0
"""The first position-id channel of control tokens (target tokens: 0)."""


def control_ids(height: int, width: int, device=None, dtype=None) -> torch.Tensor:
    """Positional ids (1, row, col) for the packed tokens of a (height, width) control latent."""
    ids = fm.image_ids(height, width, device=device, dtype=dtype)
    ids[:, 0] = CONTROL_INDEX
    return ids


def append_control(tokens: torch.Tensor, ids: torch.Tensor, control: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(noisy target tokens + control tokens, their ids): `control` is the (B, C, h, w) clean control latent, which
    may have another size than the target's (a control kept at its own resolution)."""
    return append_control_tokens(tokens, control), ids_with_control(ids, control)


def append_control_tokens(tokens: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """The noisy target tokens followed by the packed clean control latent: device work only."""
    packed = fm.pack_latents(control.to(tokens.device, torch.float32)).to(tokens.dtype)
    return torch.cat([tokens, packed], dim=1)


def ids_with_control(ids: torch.Tensor, control: torch.Tensor) -> torch.Tensor:
    """The target's position ids followed by those of the control latent's tokens (built on the host, then moved:
    made before a step that a CUDA graph captures)."""
    h, w = control.shape[-2:]
    return torch.cat([ids, control_ids(h, w, ids.device, ids.dtype)], dim=0)


def target_part(pred: torch.Tensor, target_tokens: int) -> torch.Tensor:
    """The prediction for the target's tokens only: the loss never scores the control's."""
    return pred[:, :target_tokens]
