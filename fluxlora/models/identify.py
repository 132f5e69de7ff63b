"""Name what a checkpoint holds from its keys, for errors like "X is not a Flux transformer; it looks like an SDXL
checkpoint". Only key names are looked at, never tensor data."""

from __future__ import annotations

from collections.abc import Iterable

# (a key fragment, what a file holding it is); the first match wins, so the more specific come first
_SIGNS = (
    ("lora_unet_", "a LoRA file (kohya keys), not a base model"),
    (".lora_A.", "a LoRA file (diffusers/peft keys), not a base model"),
    ("conditioner.embedders", "a Stable Diffusion XL checkpoint"),
    ("input_blocks.", "a Stable Diffusion (SD1/SD2/SDXL) UNet checkpoint"),
    ("cond_stage_model.", "a Stable Diffusion 1.x/2.x checkpoint"),
    ("double_stream_modulation", "a FLUX.2 transformer (fluxlora trains FLUX.1)"),
    ("distilled_guidance_layer.", "a Chroma transformer (model=chroma)"),
    ("double_blocks.0.img_attn.qkv", "a Flux.1 transformer in BFL layout"),
    ("transformer_blocks.0.attn.to_q", "a transformer in diffusers layout (point at its folder with config.json)"),
    ("encoder.down.0.block.0", "a VAE in BFL/LDM layout (ae.safetensors)"),
    ("encoder.down_blocks.0.resnets.0", "a VAE in diffusers layout"),
    ("encoder.layers.0.self_attn.q_proj", "a CLIP text encoder"),
    ("encoder.block.0.layer.0.SelfAttention", "a T5 text encoder"),
)


def describe_keys(keys: Iterable[str]) -> str:
    """A short phrase naming what a set of checkpoint keys belongs to."""
    keys = list(keys)
    if not keys:
        return "an empty file (no tensors)"
    for sign, what in _SIGNS:
        if any(sign in k for k in keys):
            return what
    return f"an unknown model (first keys: {sorted(keys)[:3]})"
