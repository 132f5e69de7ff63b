"""Chroma (lodestones' 8.9 B model derived from FLUX.1-schnell): its single-file layout, loading into diffusers'
`ChromaTransformer2DModel`, the tiny random Chroma, and the transformer call of a training step.

What differs from Flux.1, and what fluxlora does about it:

- **No CLIP-L**: T5 alone conditions it. Caching runs no CLIP stage; the batch's `pooled` is an empty (B, 0) tensor
  (the cache files keep their one layout), which the Chroma step never reads.
- **The T5 attention mask** is used twice, as in diffusers' `ChromaPipeline` and sd-scripts' `--model_type=chroma`
  (which requires `--apply_t5_attn_mask`): T5 itself runs with it while caching, and the transformer attends to the
  caption's tokens plus the first padding token (`chroma_text_mask`); the tokenizer mask is cached beside the T5
  output. A padded sequence gives exactly the output of the unpadded one (a CPU test checks it).
- **No per-block modulation Linears, no guidance embedding**: every block's shift/scale/gate comes from one
  "distilled guidance layer" (an MLP approximator fed the timestep, a fixed guidance of 0 and a per-block index).
  sd-scripts adapts only the Linears inside its Chroma DoubleStreamBlock / SingleStreamBlock classes (q/k/v and
  projections, MLPs, single-block linear1/linear2); the approximator is computed without gradients there and is not
  adapted. fluxlora does the same: the Flux key tables of `fluxlora.lora.keys` already name exactly those Linears,
  and the modulation entries find nothing to adapt in a Chroma block.
- **Single files** have BFL's keys without `time_in`, `vector_in`, `guidance_in`, `*_mod`, `modulation` and
  `final_layer.adaLN_modulation`, plus `distilled_guidance_layer.*`: that prefix tells a Chroma file from Flux.1
  (as diffusers' single-file loader tells them apart). Widths and block counts are read from the shapes (diffusers'
  `convert_chroma_transformer_checkpoint_to_diffusers` hard-codes the 3072 width).
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from fluxlora.errors import FluxLoraError
from fluxlora.models import bfl
from fluxlora.models.files import CheckpointHeader, read_header

log = logging.getLogger(__name__)

ARCH = "chroma"
SIGN = "distilled_guidance_layer.in_proj.weight"
"""A key only Chroma has (with or without the `model.diffusion_model.` prefix)."""
_FLUX_ONLY = re.compile(r"^(time_in|vector_in|guidance_in|final_layer\.adaLN_modulation)\.|"
                        r"^double_blocks\.\d+\.(img|txt)_mod\.|^single_blocks\.\d+\.modulation\.")
_APPROX_RE = re.compile(r"^distilled_guidance_layer\.(?:(in_proj|out_proj)|layers\.(\d+)\.(in_layer|out_layer)|"
                        r"norms\.(\d+))\.(weight|bias|scale)$")
_APPROX_DIFF_RE = re.compile(r"^distilled_guidance_layer\.(?:(in_proj|out_proj)|layers\.(\d+)\.(linear_1|linear_2)|"
                             r"norms\.(\d+))\.(weight|bias)$")
_LAYER = {"in_layer": "linear_1", "out_layer": "linear_2"}
_LAYER_BACK = {v: k for k, v in _LAYER.items()}


def is_chroma_keys(keys: Iterable[str]) -> bool:
    """Whether checkpoint keys are a Chroma transformer's (BFL layout, any prefix)."""
    return any(k.endswith(SIGN) for k in keys)


def detect(source: str | Path) -> str:
    """`chroma` or `flux` for a transformer single file (from its keys) or diffusers folder (its config's class)."""
    source = Path(source)
    if source.is_dir():
        cfg = source / "config.json"
        name = json.loads(cfg.read_text()).get("_class_name", "") if cfg.is_file() else ""
        return ARCH if name == "ChromaTransformer2DModel" else "flux"
    return ARCH if is_chroma_keys(read_header(source).shapes) else "flux"


# ---------------------------------------------------------------------------------------------------- key maps


def to_diffusers_tensor(key: str, tensor: torch.Tensor, hidden: int) -> list[tuple[str, torch.Tensor]]:
    """One prefix-free Chroma BFL tensor in diffusers names (fused q/k/v(/mlp) split, as for Flux)."""
    m = _APPROX_RE.match(key)
    if m is None:
        if _FLUX_ONLY.match(key):
            raise KeyError(key)
        return bfl.bfl_to_diffusers_tensor(key, tensor, hidden)
    proj, idx, layer, norm, param = m.groups()
    if proj:
        return [(f"distilled_guidance_layer.{proj}.{param}", tensor)]
    if layer:
        return [(f"distilled_guidance_layer.layers.{idx}.{_LAYER[layer]}.{param}", tensor)]
    return [(f"distilled_guidance_layer.norms.{norm}.weight", tensor)]


def to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole Chroma BFL state dict (prefixed or not) in diffusers keys."""
    state = {bfl._strip(k): v for k, v in state.items()}
    hidden = state["img_in.weight"].shape[0]
    out = {}
    for key, tensor in state.items():
        out.update(to_diffusers_tensor(key, tensor, hidden))
    return out


def to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """diffusers `ChromaTransformer2DModel` keys -> Chroma BFL keys (the inverse of `to_diffusers`)."""
    approx, rest = {}, {}
    for name, t in state.items():
        m = _APPROX_DIFF_RE.match(name)
        if m is None:
            rest[name] = t
            continue
        proj, idx, layer, norm, param = m.groups()
        if proj:
            approx[f"distilled_guidance_layer.{proj}.{param}"] = t
        elif layer:
            approx[f"distilled_guidance_layer.layers.{idx}.{_LAYER_BACK[layer]}.{param}"] = t
        else:
            approx[f"distilled_guidance_layer.norms.{norm}.scale"] = t
    out = bfl.diffusers_to_bfl(rest, prefix)
    out.update({prefix + k: v for k, v in approx.items()})
    return out


def save_chroma_bfl(path: str | Path, diffusers_state: dict[str, torch.Tensor], config: dict | None = None,
                    dtype: torch.dtype | None = None, prefix: str = "") -> None:
    """Write a diffusers-keyed Chroma state dict as a BFL single file (tests; the device check)."""
    from fluxlora.models.files import stream_safetensors

    state = to_bfl(diffusers_state, prefix)
    meta = {"format": "pt"} | ({"fluxlora.config": json.dumps(config)} if config else {})
    stream_safetensors(Path(path), {k: tuple(v.shape) for k, v in state.items()},
                       dtype or (lambda n: state[n].dtype), state.__getitem__, meta)


# ---------------------------------------------------------------------------------------------------- the file


class ChromaLayout(bfl.BflLayout):
    """A Chroma single file as its header describes it (`config`: the diffusers `ChromaTransformer2DModel` one)."""

    @property
    def variant(self) -> str:
        return "Chroma"


def inspect_chroma(header: CheckpointHeader) -> ChromaLayout:
    """Check that a file holds a Chroma transformer in BFL layout and derive its config from the shapes."""
    from fluxlora.models.identify import describe_keys

    prefix = next((p for p in bfl.PREFIXES if any(k.startswith(p) for k in header.shapes)), "")
    keys = [k for k in header.shapes if k.startswith(prefix)]
    shapes = {k[len(prefix):]: header.shapes[k] for k in keys}
    if SIGN not in shapes:
        what = describe_keys(header.shapes)
        if "guidance_in.in_layer.weight" in shapes or "vector_in.in_layer.weight" in shapes:
            what = "a FLUX.1 transformer (use model=flux-dev or model=flux-schnell)"
        raise FluxLoraError(f"{header.path} is not a Chroma transformer (no distilled_guidance_layer); it looks like "
                            f"{what}")
    if any(r not in shapes for r in bfl.REQUIRED):
        raise FluxLoraError(f"{header.path}: a Chroma file without {[r for r in bfl.REQUIRED if r not in shapes]}")
    unknown = []
    for k in shapes:
        try:
            to_diffusers_tensor(k, torch.empty(0), 1) if _APPROX_RE.match(k) else bfl._lookup(k)
            if _FLUX_ONLY.match(k):
                unknown.append(k)
        except KeyError:
            unknown.append(k)
    if unknown:
        raise FluxLoraError(f"{header.path} holds tensors a Chroma transformer does not have (e.g. {unknown[:3]})")
    config = bfl.shipped_config("chroma")
    config.update(header.config())
    hidden, in_channels = shapes["img_in.weight"]
    head = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    approx_hidden, approx_in = shapes["distilled_guidance_layer.in_proj.weight"]
    layers = {int(k.split(".")[2]) for k in shapes if k.startswith("distilled_guidance_layer.layers.")}
    config.update(
        in_channels=in_channels, attention_head_dim=head, num_attention_heads=hidden // head,
        joint_attention_dim=shapes["txt_in.weight"][1], approximator_num_channels=approx_in,
        approximator_hidden_dim=approx_hidden, approximator_layers=len(layers),
        num_layers=bfl._block_count(shapes, "double_blocks", header.path),
        num_single_layers=bfl._block_count(shapes, "single_blocks", header.path),
    )
    out_channels = shapes["final_layer.linear.weight"][0]
    if out_channels != in_channels:
        config["out_channels"] = out_channels
    if shapes["distilled_guidance_layer.out_proj.weight"][0] != hidden:
        raise FluxLoraError(f"{header.path}: the approximator's output width differs from the model width {hidden}")
    if sum(config["axes_dims_rope"]) != head:
        raise FluxLoraError(f"{header.path}: attention head size {head} does not match the rope axes "
                            f"{config['axes_dims_rope']} of the shipped Chroma config, and the file names none")
    return ChromaLayout(prefix, keys, config, {header.dtypes[k] for k in keys})


def load_transformer(source: str | Path, dtype: torch.dtype = torch.bfloat16, storage: str = "none",
                     device: str | torch.device = "cpu") -> torch.nn.Module:
    """A diffusers `ChromaTransformer2DModel` in eval mode, from a Chroma BFL single file or a diffusers
    `transformer/` folder; built on the meta device, each tensor read once into the dtype it is kept in (fp8 block
    Linears under `memory.base_storage=fp8`, as for Flux)."""
    from diffusers import ChromaTransformer2DModel

    from fluxlora.models.transformer import read_transformer

    return read_transformer(source, ChromaTransformer2DModel, inspect_chroma, to_diffusers_tensor, dtype, storage,
                            device, label="transformer (Chroma)", what="Chroma transformer")


# ---------------------------------------------------------------------------------------------------- the step


def is_chroma(transformer: Any) -> bool:
    """Whether `transformer` is diffusers' `ChromaTransformer2DModel` (also under peft or a wrapper)."""
    return type(transformer).__name__ == "ChromaTransformer2DModel"


def chroma_text_mask(t5_mask: torch.Tensor) -> torch.Tensor:
    """The tokenizer mask (1 = token) -> what Chroma attends to: the tokens and the first padding token (diffusers'
    ChromaPipeline; sd-scripts' `attn_padding=1`), as bool."""
    lengths = t5_mask.sum(dim=1, keepdim=True)
    return torch.arange(t5_mask.shape[1], device=t5_mask.device)[None, :] <= lengths


def attention_mask(t5_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """The transformer's (B, text + image) bool mask: `chroma_text_mask` then every image token."""
    text = chroma_text_mask(t5_mask)
    return torch.cat([text, torch.ones(text.shape[0], image_tokens, dtype=torch.bool, device=text.device)], dim=1)


TEXT_CUT = 64
"""The training step keeps the T5 tokens up to the batch's longest caption + 1, rounded up to this (few shapes to
compile): the rest are masked in every layer and never reach the loss (`cut_padding`)."""


def cut_padding(t5: torch.Tensor, t5_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """T5 outputs and mask without the padding no token attends to: the same prediction on every image token (text
    position ids are all 0, so no position moves), with fewer tokens in every block. On the H200 Chroma at 20gb ran
    0.90 s/step against FLUX.1's 0.63 with 512 text tokens, most of them padding; with the cut, 0.776 (README
    "Chroma")."""
    need = int(chroma_text_mask(t5_mask).sum(dim=1).max())
    keep = min(t5.shape[1], -(-need // TEXT_CUT) * TEXT_CUT)
    return t5[:, :keep], t5_mask[:, :keep]


def predict(transformer: torch.nn.Module, xt: torch.Tensor, t5: torch.Tensor, t5_mask: torch.Tensor,
            sigma: torch.Tensor, height: int, width: int, dtype: torch.dtype) -> torch.Tensor:
    """The velocity prediction of a training step: no pooled embedding, no guidance (Chroma's embedder fixes it at
    0), the T5 mask applied, the padding past it cut (`cut_padding`)."""
    from fluxlora.training import flow as fm

    device = xt.device
    t5, t5_mask = cut_padding(t5, t5_mask)
    return transformer(
        hidden_states=xt, encoder_hidden_states=t5, timestep=sigma.to(dtype),
        img_ids=fm.image_ids(height, width, device=device, dtype=dtype),
        txt_ids=torch.zeros(t5.shape[1], 3, device=device, dtype=dtype),
        attention_mask=attention_mask(t5_mask.to(device), xt.shape[1]), return_dict=False,
    )[0]


def keep_mask_under_checkpointing(transformer: torch.nn.Module) -> None:
    """diffusers' Chroma forward drops `attention_mask` when it checkpoints a single block (it passes only hidden
    states, temb and rope): the mask would silently stop applying in every tier (all checkpoint). The mask of the
    running forward is kept on the transformer and handed to single blocks that were called without one."""
    if getattr(transformer, "_fluxlora_mask_hooks", False):
        return

    def remember(module, args, kwargs):
        module._fluxlora_mask = kwargs.get("attention_mask")

    def hand_over(block, args, kwargs):
        mask = getattr(transformer, "_fluxlora_mask", None)
        if mask is not None and len(args) < 4 and kwargs.get("attention_mask") is None:
            kwargs["attention_mask"] = mask
        return args, kwargs

    transformer.register_forward_pre_hook(remember, with_kwargs=True)
    for block in transformer.single_transformer_blocks:
        block.register_forward_pre_hook(hand_over, with_kwargs=True)
    transformer._fluxlora_mask_hooks = True


# ---------------------------------------------------------------------------------------------------- loading


TINY = dict(
    patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, axes_dims_rope=(4, 6, 6), approximator_num_channels=16, approximator_hidden_dim=32,
    approximator_layers=2,
)
"""The tiny Chroma: the tiny Flux's widths (its T5 and VAE fit), a 2-layer approximator."""


def build_tiny(seed: int = 0, t5_max_length: int = 32) -> dict:
    """The tiny random Chroma: the tiny Flux's T5, tokenizer, VAE and scheduler, a tiny `ChromaTransformer2DModel`,
    no CLIP."""
    from diffusers import ChromaTransformer2DModel

    from fluxlora.models import tiny

    parts = tiny.build(seed=seed, t5_max_length=t5_max_length)
    with torch.random.fork_rng():
        torch.manual_seed(seed + 1)
        transformer = ChromaTransformer2DModel(**TINY).eval()
    parts.update(transformer=transformer, text_encoder=None, tokenizer=None)
    return parts


def _files(model_cfg: Any, parts: tuple[str, ...] = ("transformer", "vae", "t5xxl")) -> dict[str, Path]:
    """transformer, vae, t5xxl of a Chroma model: per-part paths, else found in `model.path` (a diffusers Chroma
    folder: transformer/ vae/ text_encoder/ (T5) tokenizer/; or single files: chroma*.safetensors in the folder or
    its unet/ diffusion_models/, ae.safetensors, t5xxl_*.safetensors as for Flux)."""
    import os

    from omegaconf import OmegaConf

    from fluxlora.models.layout import SEARCH, PartSearch, _find

    search = {
        "transformer": PartSearch("transformer", (), "[Cc]hroma*", ("", "unet", "diffusion_models")),
        "vae": SEARCH["vae"],
        "t5xxl": PartSearch("text_encoder", SEARCH["t5xxl"].names, "t5xxl*", ("", "clip", "text_encoders")),
    }
    raw = None if OmegaConf.is_config(model_cfg) and OmegaConf.is_missing(model_cfg, "path") else model_cfg.get("path")
    root = Path(os.path.expanduser(str(raw))) if raw not in (None, "") else None
    found, misses = {}, []
    for part, how in search.items():
        if part not in parts:
            continue
        explicit = model_cfg.get(part)
        if explicit:
            path = Path(os.path.expanduser(str(explicit)))
            if not path.exists():
                misses.append(f"model.{part}={path} does not exist")
            found[part] = path
            continue
        if root is None or not root.is_dir():
            misses.append(f"{part}: no model.path folder (or set model.{part})")
            continue
        path, why = _find(root, how, "")
        if path is None:
            misses.append(f"{part}: {why} (or set model.{part})")
        found[part] = path
    if misses:
        raise FluxLoraError("Chroma model files missing" + (f" under {root}" if root else "") + ": " + "; ".join(misses))
    found["root"] = root
    return found


def chroma_hint(model_cfg: Any) -> str | None:
    """"<file> is a Chroma transformer: use model=chroma" where a Flux preset was pointed at a Chroma model (whose
    missing CLIP-L would otherwise be the only complaint); None when no Chroma transformer is found."""
    try:
        path = _files(model_cfg, parts=("transformer",))["transformer"]
        return f"{path} is a Chroma transformer: use model=chroma" if detect(path) == ARCH else None
    except (FluxLoraError, OSError, ValueError):
        return None


def load_components(model_cfg: Any, storage: str = "none", defer_transformer: bool = False,
                    t5_storage: str = "full", device_limit: int | None = None, defer_encoders: bool = False):
    """`fluxlora.models.components.load_flux_components` for `model.arch=chroma`: the same deferral and storage
    options, T5 only (no CLIP-L)."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    from fluxlora.models.components import FluxComponents, _fingerprint, resolve_dtype, resolve_t5_storage

    if model_cfg.source == "tiny":
        from fluxlora.models.text_encoders import store_t5_fp8

        seed = int(model_cfg.get("seed", 0))
        parts = build_tiny(seed=seed, t5_max_length=int(model_cfg.t5_max_length))
        kept = "fp8" if t5_storage == "fp8" else "full"
        if kept == "fp8":
            store_t5_fp8(parts["text_encoder_2"], next(parts["text_encoder_2"].parameters()).dtype)
        return FluxComponents(**parts, name="fluxlora-tiny-chroma", fingerprint={"tiny_chroma_seed": seed},
                              t5_storage=kept, arch=ARCH)
    if model_cfg.source not in ("auto", "diffusers", "single_file"):
        raise FluxLoraError(f"model.source={model_cfg.source!r} is not one of tiny, auto")
    from fluxlora.models.text_encoders import check_text_encoder, load_t5, t5_file_dtypes, t5_parameter_count
    from fluxlora.models.tokenizers import TokenizerSpec, _load, find_tokenizer
    from fluxlora.models.vae import load_vae

    t0 = time.monotonic()
    files = _files(model_cfg)
    if detect(files["transformer"]) != ARCH:
        raise FluxLoraError(f"{files['transformer']} is not a Chroma transformer (no distilled_guidance_layer); it "
                            "looks like FLUX.1: use model=flux-dev or model=flux-schnell")
    if files["transformer"].is_file():
        inspect_chroma(read_header(files["transformer"]))  # a wrong file fails now, before anything is read
    dtype = resolve_dtype(model_cfg.get("dtype"))
    spec = TokenizerSpec("T5 tokenizer", "model.tokenizer_path", "tokenizer", (
        ("lodestones/Chroma1-HD", "tokenizer"), ("black-forest-labs/FLUX.1-dev", "tokenizer_2"),
        ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"), ("google/t5-v1_1-xxl", "")))
    tok_dir, looked = find_tokenizer(spec, model_cfg.get("tokenizer_path"), files["root"], model_cfg.get("hf_cache_dir"))
    if tok_dir is None and not model_cfg.get("allow_download", False):
        raise FluxLoraError(f"tokenizer not found: T5 tokenizer (looked in: {'; '.join(looked)}); set "
                            "model.tokenizer_path to a T5 tokenizer folder, or allow a download with "
                            "model.allow_download=true")
    from transformers import T5TokenizerFast

    source = (str(tok_dir), "") if tok_dir is not None else spec.hub_repos[-1]
    tok = _load(T5TokenizerFast, *source, model_max_length=int(model_cfg.t5_max_length),
                local_files_only=tok_dir is not None or not model_cfg.get("allow_download", False))
    check_text_encoder(files["t5xxl"], "t5")
    t5_kept = resolve_t5_storage(t5_storage, t5_file_dtypes(files["t5xxl"]), t5_parameter_count(files["t5xxl"]),
                                 device_limit)
    root = files["root"]
    sched_dir = root / "scheduler" if root is not None else None
    if sched_dir is not None and sched_dir.is_dir():
        scheduler = FlowMatchEulerDiscreteScheduler.from_pretrained(sched_dir, local_files_only=True)
    else:
        scheduler = FlowMatchEulerDiscreteScheduler.from_config(bfl.shipped_config("scheduler-chroma"))

    def read_transformer(device: Any = "cpu"):
        return load_transformer(files["transformer"], dtype, storage, device)

    comps = FluxComponents(
        transformer=None if defer_transformer else read_transformer(), vae=load_vae(files["vae"], dtype),
        text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=tok, scheduler=scheduler,
        name=root.name if root else files["transformer"].stem,
        fingerprint={p: _fingerprint(files[p]) for p in ("transformer", "vae", "t5xxl")}, guidance=False,
        transformer_loader=read_transformer if defer_transformer else None,
        encoder_loaders={"text_encoder_2": lambda: load_t5(files["t5xxl"], dtype, storage=t5_kept)},
        t5_storage=t5_kept, arch=ARCH,
    )
    if not defer_encoders:
        comps.encoder("text_encoder_2")
    log.info("model %s (Chroma) ready in %.1fs%s", comps.name, time.monotonic() - t0,
             "; transformer deferred" if defer_transformer else "")
    return comps
