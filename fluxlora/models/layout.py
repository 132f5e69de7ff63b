"""Which file or folder each part of the base model comes from: a diffusers folder, FluxGym's / ComfyUI's single
files (`flux1-dev.sft`, `ae.safetensors`, `clip_l.safetensors`, `t5xxl_fp16.safetensors`, in the folder itself or
its `unet/ clip/ vae/ text_encoders/ diffusion_models/` sub-folders), or explicit per-part paths that override both.
Nothing is read here beyond directory listings."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fluxlora.errors import FluxLoraError

PARTS = ("transformer", "vae", "clip_l", "t5xxl")
_SUFFIXES = (".safetensors", ".sft")


@dataclass(frozen=True)
class PartSearch:
    """How one part is found in a model folder."""

    folder: str
    """Its diffusers sub-folder (with config.json)."""
    names: tuple[str, ...]
    """Single-file names, most preferred first."""
    pattern: str
    """A glob for other single-file names (`flux1-*`); more than one match is ambiguous."""
    subdirs: tuple[str, ...]
    """Where FluxGym / ComfyUI keep it, relative to the model folder ('' = the folder itself)."""


SEARCH = {
    "transformer": PartSearch("transformer", ("flux1-dev.safetensors", "flux1-dev.sft", "flux1-schnell.safetensors",
                                              "flux1-schnell.sft", "flux1-kontext-dev.safetensors",
                                              "flux1-kontext-dev.sft"), "flux1*", ("", "unet", "diffusion_models")),
    "vae": PartSearch("vae", ("ae.safetensors", "ae.sft"), "ae*", ("", "vae")),
    "clip_l": PartSearch("text_encoder", ("clip_l.safetensors", "clip_l.sft"), "clip_l*",
                         ("", "clip", "text_encoders")),
    "t5xxl": PartSearch("text_encoder_2", ("t5xxl_fp16.safetensors", "t5xxl_fp8_e4m3fn.safetensors",
                                           "t5xxl_fp8_e4m3fn_scaled.safetensors"), "t5xxl*",
                        ("", "clip", "text_encoders")),
}


@dataclass
class ModelFiles:
    """Where each part of the base model is read from."""

    root: Path | None
    """`model.path`, or None when every part is given explicitly."""
    transformer: Path
    """A BFL single file or a diffusers `transformer/` folder."""
    vae: Path
    """`ae.safetensors` or a diffusers `vae/` folder."""
    clip_l: Path
    """`clip_l.safetensors` or a diffusers `text_encoder/` folder."""
    t5xxl: Path
    """`t5xxl_*.safetensors` or a diffusers `text_encoder_2/` folder."""

    @property
    def scheduler(self) -> Path | None:
        """The diffusers `scheduler/` folder when there is one; else the shipped config is used."""
        path = self.root / "scheduler" if self.root else None
        return path if path is not None and path.is_dir() else None


def _find(root: Path, search: PartSearch, variant: str) -> tuple[Path | None, str]:
    """(the part's path or None, a description of where it was looked for)."""
    folder = root / search.folder
    if (folder / "config.json").is_file():
        return folder, ""
    dirs = [root / d if d else root for d in search.subdirs]
    names = sorted(search.names, key=lambda n: variant not in n)  # model=flux-schnell prefers schnell files
    for d in dirs:
        for name in names:
            if (d / name).is_file():
                return d / name, ""
    matches = sorted({p for d in dirs if d.is_dir() for p in d.glob(search.pattern) if p.suffix in _SUFFIXES})
    if len(matches) == 1:
        return matches[0], ""
    where = ", ".join(f"{d.relative_to(root)}/" if d != root else "./" for d in dirs)
    if matches:
        return None, f"several candidates ({', '.join(p.name for p in matches)}): pick one"
    return None, f"no {search.folder}/ folder and none of {', '.join(search.names)} in {where}"


def resolve_files(model_cfg: Any) -> ModelFiles:
    """Resolve every part from `model.path` and the per-part keys; one error lists every part not found."""
    from omegaconf import OmegaConf

    raw = None if OmegaConf.is_config(model_cfg) and OmegaConf.is_missing(model_cfg, "path") else model_cfg.get("path")
    root = Path(os.path.expanduser(str(raw))) if raw not in (None, "") else None
    explicit = {p: model_cfg.get(p) for p in PARTS}
    if root is None and not all(explicit.values()):
        preset = model_cfg.get("preset", "flux-dev")
        raise FluxLoraError(f"model={preset} needs model.path=<folder with the Flux weights> (or all of "
                            f"{', '.join('model.' + p for p in PARTS)})")
    if root is not None and not root.is_dir():
        raise FluxLoraError(f"model path {root} does not exist" if not root.exists()
                            else f"model path {root} is a file; give the folder that holds it, or model.transformer")
    preset = str(model_cfg.get("preset", ""))
    # model=flux-schnell / flux-kontext prefer their own files where a ComfyUI folder holds several
    variant = "schnell" if "schnell" in preset else "kontext" if "kontext" in preset else "dev"
    found, misses = {}, []
    for part in PARTS:
        if explicit[part]:
            path = Path(os.path.expanduser(str(explicit[part])))
            if not path.exists():
                misses.append(f"model.{part}={path} does not exist")
            found[part] = path
            continue
        path, why = _find(root, SEARCH[part], variant)
        if path is None:
            misses.append(f"{part}: {why} (or set model.{part})")
        found[part] = path
    if misses:
        where = f" under {root}" if root else ""
        raise FluxLoraError(f"model files missing{where}: " + "; ".join(misses))
    return ModelFiles(root=root, **found)
