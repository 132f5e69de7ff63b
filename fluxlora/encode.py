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


class CacheEncoder:
    """What `LatentCache` runs: VAE latents for a batch of same-size images, CLIP/T5 outputs for a batch of captions.

    Calling it as `encode(images, captions)` gives the older one-dict-per-image form.
    """

    def __init__(self, c: FluxComponents, device: torch.device, max_length: int) -> None:
        self.c, self.device, self.max_length = c, device, max_length

    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        return encode_images(self.c, images, self.device)

    def texts(self, captions: list[str]) -> dict:
        return encode_prompts(self.c, captions, self.device, self.max_length)

    def __call__(self, images: list[np.ndarray], captions: list[str]) -> list[dict]:
        lat, txt = self.images(images), self.texts(captions)
        return [{"latents": lat[i], "t5": txt["t5"][i], "pooled": txt["pooled"][i], "t5_mask": txt["t5_mask"][i]}
                for i in range(len(images))]


def cache_encoder(c: FluxComponents, device: torch.device, max_length: int) -> CacheEncoder:
    """The encoder that LatentCache.build expects."""
    return CacheEncoder(c, device, max_length)


def move_encoders(c: FluxComponents, device: torch.device | str) -> None:
    """Put the VAE and text encoders on a device (they leave the GPU once caching is done)."""
    for m in (c.vae, c.text_encoder, c.text_encoder_2):
        m.to(device)
