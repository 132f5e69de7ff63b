"""Run the frozen encoders: VAE for image latents, CLIP-L + T5 for prompts. Used by caching and sampling."""

from __future__ import annotations

import numpy as np
import torch

from fluxlora.models.components import FluxComponents


@torch.no_grad()
def encode_prompts(c: FluxComponents, prompts: list[str], device: torch.device, max_length: int) -> dict:
    """CLIP pooled embedding and T5 sequence for each prompt, as FluxPipeline conditions on them."""
    clip_ids = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length,
                           truncation=True, return_tensors="pt").input_ids
    pooled = c.text_encoder(clip_ids.to(device), output_hidden_states=False).pooler_output
    t5_tok = c.tokenizer_2(prompts, padding="max_length", max_length=max_length, truncation=True,
                           return_tensors="pt")
    t5 = c.text_encoder_2(t5_tok.input_ids.to(device), output_hidden_states=False)[0]
    return {"t5": t5, "pooled": pooled, "t5_mask": t5_tok.attention_mask}


@torch.no_grad()
def encode_images(c: FluxComponents, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Normalised VAE latents ((mean - shift) · scale), the space Flux's transformer works in."""
    x = torch.from_numpy(np.stack(images)).to(device=device, dtype=c.vae.dtype)
    mean = c.vae.encode(x).latent_dist.mean
    shift = c.vae.config.shift_factor or 0.0
    return (mean - shift) * c.vae.config.scaling_factor


def cache_encoder(c: FluxComponents, device: torch.device, max_length: int):
    """The `encode(images, captions)` callable that LatentCache.build expects."""

    def encode(images: list[np.ndarray], captions: list[str]) -> list[dict]:
        lat = encode_images(c, images, device)
        txt = encode_prompts(c, captions, device, max_length)
        return [{"latents": lat[i], "t5": txt["t5"][i], "pooled": txt["pooled"][i], "t5_mask": txt["t5_mask"][i]}
                for i in range(len(images))]

    return encode


def move_encoders(c: FluxComponents, device: torch.device | str) -> None:
    """Put the VAE and text encoders on a device (they leave the GPU once caching is done)."""
    for m in (c.vae, c.text_encoder, c.text_encoder_2):
        m.to(device)
