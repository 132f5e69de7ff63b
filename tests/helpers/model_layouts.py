"""Write the tiny Flux in every layout users arrive with (BFL single files, FluxGym folders, diffusers folders,
single-file text encoders), and inputs to compare a loaded model against its source. Used by tests/test_models_*."""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fluxlora.training import flow as fm
from fluxlora.models import bfl, tiny
from fluxlora.models.files import stream_safetensors
from fluxlora.models.vae import save_ldm_vae

PROMPTS = ["a photo of sks red circle", "a blue square on a white background"]


def config_of(model) -> dict:
    return {k: v for k, v in dict(model.config).items() if not k.startswith("_")}


def save_state(path: Path, state: dict[str, torch.Tensor], config: dict | None = None,
               dtype: torch.dtype | None = None) -> Path:
    """A safetensors file of `state` (optionally cast), with the architecture config in its header."""
    meta = {"format": "pt"} | ({"fluxlora.config": json.dumps(config)} if config else {})
    stream_safetensors(path, {k: tuple(v.shape) for k, v in state.items()},
                       dtype or (lambda k: state[k].dtype), state.__getitem__, meta)
    return path


def write_clip_file(path: Path, clip, dtype: torch.dtype | None = None) -> Path:
    """CLIP-L as ComfyUI/FluxGym ship it: `text_model.` keys plus a projection head the loader must ignore."""
    state = {f"text_model.{k}": v for k, v in clip.state_dict().items()}
    state["text_projection.weight"] = torch.eye(clip.config.hidden_size)
    return save_state(path, state, clip.config.to_dict(), dtype)


def write_t5_file(path: Path, t5, dtype: torch.dtype | None = None) -> Path:
    """T5 encoder with one copy of the shared embedding (the tied `encoder.embed_tokens` left out)."""
    state = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    return save_state(path, state, t5.config.to_dict(), dtype)


def save_tokenizers(root: Path, parts: dict) -> None:
    parts["tokenizer"].save_pretrained(root / "tokenizer")
    parts["tokenizer_2"].save_pretrained(root / "tokenizer_2")


def write_fluxgym_folder(root: Path, parts: dict, transformer_dtype: torch.dtype | None = None,
                         name: str = "flux1-dev.sft") -> Path:
    """FluxGym's layout: unet/flux1-dev.sft, vae/ae.sft, clip/clip_l.safetensors, clip/t5xxl_fp16.safetensors,
    plus tokenizer folders (FluxGym users have them in the HF cache; here they sit in the model folder)."""
    for sub in ("unet", "vae", "clip"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    t = parts["transformer"]
    bfl.save_bfl(root / "unet" / name, t.state_dict(), config_of(t), transformer_dtype)
    save_ldm_vae(root / "vae" / "ae.sft", parts["vae"])
    write_clip_file(root / "clip" / "clip_l.safetensors", parts["text_encoder"])
    write_t5_file(root / "clip" / "t5xxl_fp16.safetensors", parts["text_encoder_2"])
    save_tokenizers(root, parts)
    return root


def write_diffusers_folder(root: Path, parts: dict) -> Path:
    from diffusers import FluxPipeline

    FluxPipeline(**parts).save_pretrained(root, safe_serialization=True)
    return root


def transformer_inputs(config: dict, seed: int = 0, guidance: bool = True) -> dict:
    """One batch of transformer inputs, built as FluxLoRAModule.flow_loss builds them."""
    g = torch.Generator().manual_seed(seed)
    c = config["in_channels"] // 4
    latents = torch.randn(2, c, 8, 8, generator=g)
    t5 = torch.randn(2, 7, config["joint_attention_dim"], generator=g)
    sigma = torch.tensor([0.3, 0.8])
    x0 = fm.pack_latents(latents)
    return dict(hidden_states=fm.noise_latents(x0, torch.randn(x0.shape, generator=g), sigma),
                encoder_hidden_states=t5, timestep=sigma, img_ids=fm.image_ids(8, 8), txt_ids=torch.zeros(7, 3),
                pooled_projections=torch.randn(2, config["pooled_projection_dim"], generator=g),
                guidance=torch.full((2,), 3.5) if guidance else None, return_dict=False)


@torch.no_grad()
def transformer_out(model, seed: int = 0) -> torch.Tensor:
    cfg = config_of(model)
    return model(**transformer_inputs(cfg, seed, bool(cfg["guidance_embeds"])))[0]


def rounded(model, dtype: torch.dtype):
    """A copy of `model` whose floating parameters went through `dtype` and back (what a file of `dtype` holds)."""
    import copy

    out = copy.deepcopy(model)
    with torch.no_grad():
        for p in out.parameters():
            p.copy_(p.to(dtype).to(p.dtype))
    return out


def tiny_transformer(**overrides):
    """The tiny transformer with config overrides (e.g. guidance_embeds=False for a schnell-like model)."""
    from diffusers import FluxTransformer2DModel

    with torch.random.fork_rng():
        torch.manual_seed(1)
        return FluxTransformer2DModel(**(tiny.TRANSFORMER | overrides)).eval()


def sd_scripts_lora(model: torch.nn.Module, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """What sd-scripts' default Flux LoRA writes: one rank-R LoRA per BFL layer, fused ones included (full up)."""
    g = torch.Generator().manual_seed(5)
    out = {}
    for key, w in bfl.diffusers_to_bfl(model.state_dict()).items():
        m = re.match(r"(double|single)_blocks\.(\d+)\.(img_attn\.qkv|txt_attn\.qkv|img_attn\.proj|img_mlp\.0|"
                     r"linear1|linear2|modulation\.lin)\.weight$", key)
        if m:
            stem = f"lora_unet_{m[1]}_blocks_{m[2]}_{m[3].replace('.', '_')}"
            out[f"{stem}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.2
            out[f"{stem}.lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.2
            out[f"{stem}.alpha"] = torch.tensor(alpha)
    return out
