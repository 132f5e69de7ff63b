"""One place that turns the `model` config into the seven parts of a Flux pipeline."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)


@dataclass
class FluxComponents:
    """The parts of a Flux pipeline, plus where they came from."""

    transformer: Any
    """diffusers `FluxTransformer2DModel`; the only part that trains (through LoRA). None until
    `load_transformer()` when loading was deferred."""
    vae: Any
    """diffusers `AutoencoderKL`; used for caching latents and decoding samples."""
    text_encoder: Any
    """CLIP-L text model; gives the pooled prompt embedding."""
    tokenizer: Any
    """CLIP tokenizer."""
    text_encoder_2: Any
    """T5 encoder; gives the prompt sequence."""
    tokenizer_2: Any
    """T5 tokenizer."""
    scheduler: Any
    """`FlowMatchEulerDiscreteScheduler` used for sampling."""
    name: str = "tiny"
    """A short identity of the base model (written into LoRA metadata and cache keys)."""
    fingerprint: dict = field(default_factory=dict)
    """Cheap identity of the source files (names, sizes, mtimes, hash of the first MiB), never a hash of whole files."""
    guidance: bool | None = None
    """Whether the transformer embeds guidance (FLUX.1-dev), known from the file header before its weights are read."""
    transformer_loader: Callable[[Any], Any] | None = None
    """device -> transformer; set while the transformer is deferred (read after the text encoders left RAM)."""

    @property
    def has_guidance(self) -> bool:
        """Flux-dev embeds a guidance scale; Flux-schnell does not."""
        if self.transformer is not None:
            return bool(self.transformer.config.guidance_embeds)
        return bool(self.guidance)

    def load_transformer(self, device: Any = "cpu") -> Any:
        """Read a deferred transformer now (onto `device`: `cuda` skips host RAM); a no-op once loaded."""
        if self.transformer is None and self.transformer_loader is not None:
            self.transformer = self.transformer_loader(device)
            self.transformer_loader = None
        return self.transformer

    def encoder_identity(self, t5_max_length: int) -> str:
        """What the cached latents and text embeddings depend on: the VAE and text encoders, never the transformer
        (switching transformer files must not rebuild the caches)."""
        parts = {k: v for k, v in self.fingerprint.items() if k != "transformer"}
        return json.dumps({"encoders": parts, "t5": int(t5_max_length)}, sort_keys=True)

    def pipeline_parts(self) -> dict:
        return dict(
            transformer=self.transformer, vae=self.vae, text_encoder=self.text_encoder, tokenizer=self.tokenizer,
            text_encoder_2=self.text_encoder_2, tokenizer_2=self.tokenizer_2, scheduler=self.scheduler,
        )


def _fingerprint(path: Path) -> dict:
    """A file's fingerprint, or for a diffusers folder the names, sizes and mtimes of its weight/config files."""
    from fluxlora.models.files import fingerprint

    if path.is_file():
        return fingerprint(path)
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in {".safetensors", ".json", ".bin"})
    return {str(p.relative_to(path)): [p.stat().st_size, int(p.stat().st_mtime)] for p in files}


def resolve_dtype(name: str | None) -> torch.dtype:
    """`auto` is bf16 where CUDA runs, fp32 on the CPU (bf16 matmuls are slow there)."""
    if name in (None, "auto"):
        return torch.bfloat16 if torch.cuda.is_available() else torch.float32
    table = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
             "fp32": torch.float32, "float32": torch.float32}
    if name not in table:
        raise FluxLoraError(f"model.dtype={name!r} is not one of auto, {', '.join(table)}")
    return table[name]


def _scheduler(files, variant: str):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fluxlora.models.bfl import shipped_config

    if files.scheduler is not None:
        return FlowMatchEulerDiscreteScheduler.from_pretrained(files.scheduler, local_files_only=True)
    return FlowMatchEulerDiscreteScheduler.from_config(shipped_config(f"scheduler-{variant}"))


def load_components(model_cfg: Any, storage: str = "none", defer_transformer: bool = False) -> FluxComponents:
    """Build or load the model named by the `model` config group, from local files only.

    Headers are checked and tokenizers found before any large file is read, so a wrong path fails in
    seconds. Each part logs its load time.

    Args:
        model_cfg: the `model` node: `source` (tiny | auto), `path`, per-part paths, tokenizer options, `dtype`,
            `t5_max_length`.
        storage: `fp8` reads the transformer's frozen Linear weights as float8_e4m3fn (`memory.base_storage`).
        defer_transformer: leave the transformer to `FluxComponents.load_transformer(device)`, so it is read
            after caching, once the text encoders are gone.
    """
    source = model_cfg.source
    if source == "tiny":
        from fluxlora.models import tiny

        parts = tiny.build(seed=int(model_cfg.get("seed", 0)), t5_max_length=int(model_cfg.t5_max_length))
        return FluxComponents(**parts, name="fluxlora-tiny", fingerprint={"tiny_seed": int(model_cfg.get("seed", 0))})
    if source not in ("auto", "diffusers", "single_file"):
        raise FluxLoraError(f"model.source={source!r} is not one of tiny, auto")
    from fluxlora.models.layout import resolve_files
    from fluxlora.models.text_encoders import load_clip, load_t5
    from fluxlora.models.tokenizers import load_tokenizers
    from fluxlora.models.transformer import inspect_transformer, load_transformer
    from fluxlora.models.vae import load_vae

    t0 = time.monotonic()
    files = resolve_files(model_cfg)
    dtype = resolve_dtype(model_cfg.get("dtype"))
    guidance = bool(inspect_transformer(files.transformer).get("guidance_embeds"))
    variant = "dev" if guidance else "schnell"
    preset = str(model_cfg.get("preset", ""))
    if preset.startswith("flux-") and preset != f"flux-{variant}":
        log.warning("model=%s but %s is FLUX.1-%s (guidance embedding %s)", preset, files.transformer, variant,
                    "present" if guidance else "absent")
    tok, tok2 = load_tokenizers(model_cfg.get("tokenizer_path"), model_cfg.get("tokenizer_2_path"), files.root,
                                model_cfg.get("hf_cache_dir"), bool(model_cfg.get("allow_download", False)),
                                int(model_cfg.t5_max_length))

    def read_transformer(device: Any = "cpu"):
        return load_transformer(files.transformer, dtype, storage, device)

    comps = FluxComponents(
        transformer=None if defer_transformer else read_transformer(), vae=load_vae(files.vae, dtype),
        text_encoder=load_clip(files.clip_l, dtype), tokenizer=tok, text_encoder_2=load_t5(files.t5xxl, dtype),
        tokenizer_2=tok2, scheduler=_scheduler(files, variant),
        name=files.root.name if files.root else files.transformer.stem,
        fingerprint={p: _fingerprint(getattr(files, p)) for p in ("transformer", "vae", "clip_l", "t5xxl")},
        guidance=guidance, transformer_loader=read_transformer if defer_transformer else None,
    )
    log.info("model %s (FLUX.1-%s) ready in %.1fs%s", comps.name, variant, time.monotonic() - t0,
             "; transformer deferred" if defer_transformer else "")
    return comps
