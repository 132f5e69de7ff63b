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
from fluxlora.models.kontext import is_kontext

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
    encoder_loaders: dict[str, Callable[[], Any]] = field(default_factory=dict)
    """'text_encoder' / 'text_encoder_2' -> loader of a deferred encoder: caching reads each when its stage begins,
    so T5 (9.5 GB in 16 bits) is never in RAM beside the others, and not at all when nothing needs encoding; after
    its stage it is dropped (`drop_encoder`) and read again only if another stage needs it."""
    t5_storage: str = "full"
    """How T5 is (or will be) kept: `fp8` block Linears or `full` (the compute dtype); see `resolve_t5_storage`."""
    arch: str = "flux"
    """`flux` (FLUX.1 dev/schnell) or `chroma` (`fluxlora.models.chroma`: T5 only, no CLIP-L, T5 mask applied)."""
    text_encoder_lora: Any = None
    """`fluxlora.lora.text_encoder.TextEncoderLora` applied to the text encoders (frozen, sd-scripts' lora_te1_/
    lora_te3_ layers of `lora.init_from`), or None; set with `use_text_encoder_lora`."""
    kontext: bool = False
    """FLUX.1 Kontext [dev] (`fluxlora.models.kontext`): trains on paired images and samples with
    FluxKontextPipeline from a control image; its weights are laid out as FLUX.1-dev's."""

    @property
    def has_guidance(self) -> bool:
        """Flux-dev embeds a guidance scale; Flux-schnell does not."""
        if self.transformer is not None:
            return bool(getattr(self.transformer.config, "guidance_embeds", False))
        return bool(self.guidance)

    def load_transformer(self, device: Any = "cpu") -> Any:
        """Read a deferred transformer now (onto `device`: `cuda` skips host RAM); a no-op once loaded."""
        if self.transformer is None and self.transformer_loader is not None:
            self.transformer = self.transformer_loader(device)
            self.transformer_loader = None
        return self.transformer

    def encoder(self, part: str) -> Any:
        """The text encoder `part` ('text_encoder' = CLIP-L, 'text_encoder_2' = T5), read now if it was deferred."""
        module = getattr(self, part)
        if module is None and part in self.encoder_loaders:
            module = self.encoder_loaders[part]()
            setattr(self, part, module)
            self._apply_text_encoder_lora(part)
        return module

    def drop_encoder(self, part: str) -> bool:
        """Forget the text encoder `part` where its file can be read again (`encoder` then reads it anew, its LoRA
        layers included): True. False where it cannot (built in memory) or is not held; the caller keeps it."""
        if part not in self.encoder_loaders or getattr(self, part) is None:
            return False
        setattr(self, part, None)
        return True

    def use_text_encoder_lora(self, lora: Any) -> None:
        """Apply a file's text-encoder LoRA layers (`TextEncoderLora`) to CLIP-L / T5: now to an encoder already
        read, when it is read to a deferred one. Their identity joins `encoder_identity`."""
        if self.text_encoder_lora is not None:
            raise RuntimeError("a text-encoder LoRA is already applied")
        for part in lora.parts():
            if getattr(self, part) is None and part not in self.encoder_loaders:
                what = "CLIP-L" if part == "text_encoder" else "T5"
                raise FluxLoraError(f"{lora.path} holds {what} LoRA layers but this model ({self.arch}) has no {what} "
                                    "text encoder; set lora.text_encoder_lora=drop to leave them out")
        self.text_encoder_lora = lora
        for part in lora.parts():
            if getattr(self, part) is not None:
                self._apply_text_encoder_lora(part)

    def _apply_text_encoder_lora(self, part: str) -> None:
        lora = self.text_encoder_lora
        if lora is not None and part in lora.parts():
            n = lora.apply(part, getattr(self, part))
            log.info("text-encoder LoRA: %d layers of %s applied to %s (frozen)", n, lora.path.name, part)

    def release_encoders(self) -> None:
        """Drop both text encoders for good (after caching: sampling renders from cached prompt encodings)."""
        self.text_encoder = self.text_encoder_2 = None
        self.encoder_loaders.clear()

    def encoder_identity(self, t5_max_length: int) -> str:
        """What the cached latents and text embeddings depend on: the VAE and text encoders, never the transformer
        (switching transformer files must not rebuild the caches)."""
        parts = {k: v for k, v in self.fingerprint.items() if k != "transformer"}
        ident = {"encoders": parts, "t5": int(t5_max_length)}
        if self.t5_storage == "fp8":  # fp8-stored T5 gives other outputs than a 16-bit file run in 16 bits
            ident["t5_storage"] = "fp8"
        if self.arch != "flux":  # Chroma: T5 runs with the attention mask, no CLIP pooled embedding
            ident["arch"] = self.arch
        if self.text_encoder_lora is not None:  # the encoders' outputs are those with its layers applied
            ident["text_encoder_lora"] = self.text_encoder_lora.identity()
        return json.dumps(ident, sort_keys=True)

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


T5_WORKING_BYTES = int(1.5 * (1 << 30))
"""Device memory T5-XXL needs beside its weights while caching (activations of a batch of 512-token captions and the
allocator's slack); `resolve_t5_storage` keeps 16 bits only where weights + this fit."""


def resolve_t5_storage(requested: str, file_dtypes: set[str], parameters: int, limit: int | None) -> str:
    """`memory.t5_storage` decided: `auto` keeps an fp8 file in fp8 (the same numbers as upcasting it, half the
    memory), keeps a 16-bit file in 16 bits where its weights + `T5_WORKING_BYTES` fit `limit` (the device's, None
    on the CPU), and casts it to fp8 where they do not (T5-XXL in 16 bits is 9.5 GB: an 8 GB card)."""
    if requested != "auto":
        return requested
    if "F8_E4M3" in file_dtypes:
        return "fp8"
    if limit is None:
        return "full"
    return "full" if 2 * parameters + T5_WORKING_BYTES <= limit else "fp8"


def load_flux_components(model_cfg: Any, storage: str = "none", defer_transformer: bool = False,
                         t5_storage: str = "full", device_limit: int | None = None,
                         defer_encoders: bool = False) -> FluxComponents:
    """Build or load the FLUX.1 model (dev or schnell) the `model` config group names, from local files only
    (`fluxlora.models.loading.load_components` picks this or Chroma's loader by `model.arch`).

    Headers are checked and tokenizers found before any large file is read, so a wrong path fails in
    seconds. Each part logs its load time.

    Args:
        model_cfg: the `model` node: `source` (tiny | auto), `path`, per-part paths, tokenizer options, `dtype`,
            `t5_max_length`.
        storage: `fp8` reads the transformer's frozen Linear weights as float8_e4m3fn (`memory.base_storage`).
        defer_transformer: leave the transformer to `FluxComponents.load_transformer(device)`, so it is read
            after caching, once the text encoders are gone.
        t5_storage: `memory.t5_storage` (auto | fp8 | full), decided by `resolve_t5_storage` against `device_limit`.
        device_limit: bytes the training device's allocator may hold (`fluxlora.perf.cuda_setup.memory_limit`).
        defer_encoders: leave CLIP-L and T5 to `FluxComponents.encoder(part)` (caching reads each in its stage).
    """
    source = model_cfg.source
    if source == "tiny":
        from fluxlora.models import tiny
        from fluxlora.models.text_encoders import store_t5_fp8

        kontext = is_kontext(model_cfg)
        parts = tiny.build(seed=int(model_cfg.get("seed", 0)), t5_max_length=int(model_cfg.t5_max_length))
        kept = "fp8" if t5_storage == "fp8" else "full"
        if kept == "fp8":
            store_t5_fp8(parts["text_encoder_2"], next(parts["text_encoder_2"].parameters()).dtype)
        return FluxComponents(**parts, name="fluxlora-tiny-kontext" if kontext else "fluxlora-tiny",
                              fingerprint={"tiny_seed": int(model_cfg.get("seed", 0))}, t5_storage=kept,
                              kontext=kontext)
    if source not in ("auto", "diffusers", "single_file"):
        raise FluxLoraError(f"model.source={source!r} is not one of tiny, auto")
    from fluxlora.models.layout import resolve_files
    from fluxlora.models.text_encoders import (check_text_encoder, load_clip, load_t5, t5_file_dtypes,
                                               t5_parameter_count)
    from fluxlora.models.tokenizers import load_tokenizers
    from fluxlora.models.transformer import inspect_transformer, load_transformer
    from fluxlora.models.vae import load_vae

    t0 = time.monotonic()
    files = resolve_files(model_cfg)

    kontext = is_kontext(model_cfg, files.root)  # the preset or model_index.json: the keys are dev's
    dtype = resolve_dtype(model_cfg.get("dtype"))
    guidance = bool(inspect_transformer(files.transformer).get("guidance_embeds"))
    variant = "dev" if guidance else "schnell"
    if kontext and not guidance:
        raise FluxLoraError(f"model.variant=kontext but {files.transformer} has no guidance embedding (FLUX.1-schnell "
                            "layout); FLUX.1 Kontext [dev] has dev's")
    preset = str(model_cfg.get("preset", ""))
    if preset.startswith("flux-") and preset != f"flux-{variant}" and not kontext:
        log.warning("model=%s but %s is FLUX.1-%s (guidance embedding %s)", preset, files.transformer, variant,
                    "present" if guidance else "absent")
    tok, tok2 = load_tokenizers(model_cfg.get("tokenizer_path"), model_cfg.get("tokenizer_2_path"), files.root,
                                model_cfg.get("hf_cache_dir"), bool(model_cfg.get("allow_download", False)),
                                int(model_cfg.t5_max_length))

    check_text_encoder(files.clip_l, "clip")
    t5_kept = resolve_t5_storage(t5_storage, t5_file_dtypes(files.t5xxl), t5_parameter_count(files.t5xxl),
                                 device_limit)

    def read_transformer(device: Any = "cpu"):
        return load_transformer(files.transformer, dtype, storage, device)

    loaders = {"text_encoder": lambda: load_clip(files.clip_l, dtype),
               "text_encoder_2": lambda: load_t5(files.t5xxl, dtype, storage=t5_kept)}
    comps = FluxComponents(
        transformer=None if defer_transformer else read_transformer(), vae=load_vae(files.vae, dtype),
        text_encoder=None, tokenizer=tok, text_encoder_2=None, tokenizer_2=tok2, scheduler=_scheduler(files, variant),
        name=files.root.name if files.root else files.transformer.stem,
        fingerprint={p: _fingerprint(getattr(files, p)) for p in ("transformer", "vae", "clip_l", "t5xxl")},
        guidance=guidance, transformer_loader=read_transformer if defer_transformer else None,
        encoder_loaders=loaders, t5_storage=t5_kept, kontext=kontext,
    )
    if not defer_encoders:
        comps.encoder("text_encoder")
        comps.encoder("text_encoder_2")
    log.info("model %s (FLUX.1-%s) ready in %.1fs%s", comps.name, "Kontext-dev" if kontext else variant,
             time.monotonic() - t0,
             "; transformer deferred" if defer_transformer else "")
    return comps
