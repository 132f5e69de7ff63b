"""One place that turns the `model` config into the seven parts of a Flux pipeline."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)

_FOLDER_PARTS = ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "scheduler")


@dataclass
class FluxComponents:
    """The parts of a Flux pipeline, plus where they came from."""

    transformer: Any
    """diffusers `FluxTransformer2DModel`; the only part that trains (through LoRA)."""
    vae: Any
    """diffusers `AutoencoderKL`; used for caching latents and decoding samples."""
    text_encoder: Any
    """CLIP-L text model; gives the pooled prompt embedding."""
    tokenizer: Any
    text_encoder_2: Any
    """T5 encoder; gives the prompt sequence."""
    tokenizer_2: Any
    scheduler: Any
    """`FlowMatchEulerDiscreteScheduler` used for sampling."""
    name: str = "tiny"
    """A short identity of the base model (written into LoRA metadata and cache keys)."""
    fingerprint: dict = field(default_factory=dict)
    """Cheap identity of the source files (names, sizes, mtimes): never a hash of the whole model."""

    @property
    def has_guidance(self) -> bool:
        """Flux-dev embeds a guidance scale; Flux-schnell does not."""
        return bool(self.transformer.config.guidance_embeds)

    def pipeline_parts(self) -> dict:
        return dict(
            transformer=self.transformer, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, scheduler=self.scheduler,
        )


def _fingerprint(path: Path) -> dict:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p.relative_to(path) if path.is_dir() else p.name): [p.stat().st_size, int(p.stat().st_mtime)]
            for p in files if p.suffix in {".safetensors", ".sft", ".json", ".bin"}}


def _load_diffusers_folder(path: Path, dtype: torch.dtype, t5_max_length: int) -> dict:
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel
    from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

    missing = [p for p in _FOLDER_PARTS if not (path / p).is_dir()]
    if missing:
        raise FluxLoraError(f"model folder {path} lacks {', '.join(missing)} (looked for sub-folders {_FOLDER_PARTS})")
    kw = dict(local_files_only=True)
    try:
        parts = dict(
            transformer=FluxTransformer2DModel.from_pretrained(path, subfolder="transformer", torch_dtype=dtype, **kw),
            vae=AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype, **kw),
            text_encoder=CLIPTextModel.from_pretrained(path, subfolder="text_encoder", dtype=dtype, **kw),
            tokenizer=CLIPTokenizer.from_pretrained(path, subfolder="tokenizer", **kw),
            text_encoder_2=T5EncoderModel.from_pretrained(path, subfolder="text_encoder_2", dtype=dtype, **kw),
            tokenizer_2=T5TokenizerFast.from_pretrained(path, subfolder="tokenizer_2", model_max_length=t5_max_length, **kw),
            scheduler=FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler", **kw),
        )
    except (OSError, ValueError) as e:
        raise FluxLoraError(f"could not load the diffusers model folder {path}: {str(e).splitlines()[0]}") from e
    for name in ("transformer", "vae", "text_encoder", "text_encoder_2"):
        parts[name].eval()
    return parts


def resolve_dtype(name: str | None) -> torch.dtype:
    """`auto` is bf16 where CUDA runs, fp32 on the CPU (bf16 matmuls are slow there)."""
    if name in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise FluxLoraError(f"model.dtype={name!r} is not one of auto, {', '.join(table)}")
    return table[name]


def load_components(model_cfg: Any) -> FluxComponents:
    """Build or load the model named by the `model` config group.

    Args:
        model_cfg: the `model` node: `source` (tiny | diffusers), `path`, `dtype`, `t5_max_length`.
    """
    source = model_cfg.source
    if source == "tiny":
        from fluxlora.models import tiny

        parts = tiny.build(seed=int(model_cfg.get("seed", 0)), t5_max_length=int(model_cfg.t5_max_length))
        return FluxComponents(**parts, name="fluxlora-tiny", fingerprint={"tiny_seed": int(model_cfg.get("seed", 0))})
    if model_cfg.get("path") in (None, "", "???"):
        raise FluxLoraError(f"model={model_cfg.get('preset', source)} needs model.path=<folder with the Flux weights>")
    path = Path(os.path.expanduser(str(model_cfg.path)))
    if not path.exists():
        raise FluxLoraError(f"model path {path} does not exist")
    dtype = resolve_dtype(model_cfg.get("dtype"))
    if source in ("diffusers", "auto") and path.is_dir() and (path / "model_index.json").exists():
        parts = _load_diffusers_folder(path, dtype, int(model_cfg.t5_max_length))
        return FluxComponents(**parts, name=path.name, fingerprint=_fingerprint(path))
    raise FluxLoraError(
        f"model path {path} is not a diffusers Flux folder (no model_index.json); single-file checkpoints "
        "(flux1-dev.safetensors, ae.safetensors, clip_l.safetensors, t5xxl_fp16.safetensors) are not supported yet"
    )
