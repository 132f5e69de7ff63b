"""Black Forest Labs' Flux.1 single-file layout (`flux1-dev.safetensors`, FluxGym's `flux1-dev.sft`) and
diffusers' `FluxTransformer2DModel` layout, both ways.

diffusers' own `convert_flux_transformer_checkpoint_to_diffusers` hard-codes Flux-dev's width (3072), so it cannot
convert a model of any other size. Here every width comes from the tensors: the key map is a table, fused layers
(BFL's `qkv` and single-block `linear1`) split by the shapes they hold. The inverse map writes BFL files (tests, the
device check with a Flux-dev-shaped random model).
"""

from __future__ import annotations

import json
import re
import zlib
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from fluxlora.errors import FluxLoraError
from fluxlora.models.files import CheckpointHeader, meta_model, stream_safetensors

PREFIXES = ("model.diffusion_model.", "diffusion_model.")
"""Prefixes BFL-layout keys may carry (ComfyUI / sd-scripts checkpoints); stripped before mapping."""

# BFL module -> diffusers module; a tuple is a layer BFL fuses along dim 0, in this order.
_TOP = {
    "img_in": "x_embedder", "txt_in": "context_embedder",
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear", "txt_mod.lin": "norm1_context.linear",
    "img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn.norm.query_norm": "attn.norm_q", "img_attn.norm.key_norm": "attn.norm_k",
    "txt_attn.norm.query_norm": "attn.norm_added_q", "txt_attn.norm.key_norm": "attn.norm_added_k",
    "img_attn.proj": "attn.to_out.0", "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj", "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj", "txt_mlp.2": "ff_context.net.2",
}
_SINGLE = {
    "modulation.lin": "norm.linear", "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "norm.query_norm": "attn.norm_q", "norm.key_norm": "attn.norm_k", "linear2": "proj_out",
}
_SWAPPED = {"final_layer.adaLN_modulation.1"}  # BFL stores (shift, scale), diffusers (scale, shift)
_BLOCKS = {"double_blocks": ("transformer_blocks", _DOUBLE), "single_blocks": ("single_transformer_blocks", _SINGLE)}
_KEY_RE = re.compile(r"^(?:(double_blocks|single_blocks)\.(\d+)\.)?(.+)\.(weight|bias|scale)$")
REQUIRED = ("img_in.weight", "txt_in.weight", "double_blocks.0.img_attn.qkv.weight", "final_layer.linear.weight")


def shipped_config(name: str) -> dict:
    """A config that ships inside the package (`fluxlora/models/configs/<name>.json`)."""
    text = resources.files("fluxlora.models").joinpath("configs", f"{name}.json").read_text()
    return {k: v for k, v in json.loads(text).items() if not k.startswith("_")}


def _lookup(key: str) -> tuple[str, str, str | tuple[str, ...], str]:
    """(diffusers block prefix, BFL module, diffusers target(s), param) of a prefix-free BFL key; KeyError if none."""
    m = _KEY_RE.match(key)
    if m is None:
        raise KeyError(key)
    kind, idx, module, param = m.groups()
    table, prefix = (_TOP, "") if kind is None else (_BLOCKS[kind][1], f"{_BLOCKS[kind][0]}.{idx}.")
    if module not in table:
        raise KeyError(key)
    return prefix, module, table[module], "weight" if param == "scale" else param


def bfl_to_diffusers_tensor(key: str, tensor: torch.Tensor, hidden: int) -> list[tuple[str, torch.Tensor]]:
    """Map one (prefix-free) BFL tensor to its diffusers name(s); fused layers come back split.

    Args:
        key: e.g. `double_blocks.3.img_attn.qkv.weight`.
        tensor: its value.
        hidden: the model width (rows of `img_in.weight`); splits single-block `linear1` into q, k, v, mlp.
    """
    prefix, module, target, param = _lookup(key)
    if module in _SWAPPED:
        shift, scale = tensor.chunk(2, dim=0)
        return [(f"{target}.{param}", torch.cat([scale, shift], dim=0))]
    if isinstance(target, str):
        return [(f"{prefix}{target}.{param}", tensor)]
    sizes = [hidden] * 3 + ([tensor.shape[0] - 3 * hidden] if len(target) == 4 else [])
    if sum(sizes) != tensor.shape[0]:
        raise ValueError(f"{key}: {tensor.shape[0]} rows do not split into {sizes}")
    return [(f"{prefix}{t}.{param}", part.clone()) for t, part in zip(target, torch.split(tensor, sizes, dim=0))]


def bfl_to_diffusers(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A whole BFL state dict (prefixed or not) in diffusers keys."""
    state = {_strip(k): v for k, v in state.items()}
    hidden = state["img_in.weight"].shape[0]
    out = {}
    for key, tensor in state.items():
        out.update(bfl_to_diffusers_tensor(key, tensor, hidden))
    return out


def _reverse_table() -> dict[str, tuple[str, int, int]]:
    """diffusers module (block index as `{i}`) -> (BFL module, part index, parts)."""
    rev = {}
    for kind, (dkind, table) in [(None, ("", _TOP)), *_BLOCKS.items()]:
        for bfl, target in table.items():
            parts = (target,) if isinstance(target, str) else target
            for i, t in enumerate(parts):
                d = t if kind is None else f"{dkind}.{{i}}.{t}"
                b = bfl if kind is None else f"{kind}.{{i}}.{bfl}"
                rev[d] = (b, i, len(parts))
    return rev


_REVERSE = _reverse_table()
_DIFF_RE = re.compile(r"^((?:single_)?transformer_blocks)\.(\d+)\.(.+)\.(weight|bias)$")


def _bfl_name(name: str) -> tuple[str, int, int]:
    m = _DIFF_RE.match(name)
    if m:
        kind, idx, module, param = m.groups()
        bfl, part, parts = _REVERSE[f"{kind}.{{i}}.{module}"]
        bfl = bfl.replace("{i}", idx)
    else:
        module, param = name.rsplit(".", 1)
        bfl, part, parts = _REVERSE[module]
    if param == "weight" and bfl.endswith("_norm"):
        param = "scale"
    return f"{bfl}.{param}", part, parts


def diffusers_to_bfl(state: dict[str, torch.Tensor], prefix: str = "") -> dict[str, torch.Tensor]:
    """The inverse of `bfl_to_diffusers`: fuse q/k/v(/mlp) back and swap the final modulation halves.
    Works on meta tensors too (that is how `bfl_shapes` gets a layout without memory)."""
    fused: dict[str, dict[int, torch.Tensor]] = {}
    counts: dict[str, int] = {}
    for name, tensor in state.items():
        key, part, parts = _bfl_name(name)
        fused.setdefault(key, {})[part] = tensor
        counts[key] = parts
    out = {}
    for key, members in fused.items():
        if len(members) != counts[key]:
            raise ValueError(f"{key}: only parts {sorted(members)} of {counts[key]} present")
        t = torch.cat([members[i] for i in range(counts[key])], dim=0)
        if key.rsplit(".", 1)[0] in _SWAPPED:
            scale, shift = t.chunk(2, dim=0)
            t = torch.cat([shift, scale], dim=0)
        out[prefix + key] = t
    return out


def _strip(key: str) -> str:
    for p in PREFIXES:
        if key.startswith(p):
            return key[len(p):]
    return key


def bfl_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """BFL tensor names and shapes of a Flux transformer with this diffusers config (built on meta, no memory)."""
    from diffusers import FluxTransformer2DModel

    model = meta_model(lambda: FluxTransformer2DModel(**config))
    return {k: tuple(v.shape) for k, v in diffusers_to_bfl(model.state_dict()).items()}


@dataclass
class BflLayout:
    """A BFL transformer file as its header describes it."""

    prefix: str
    """The key prefix in the file (`model.diffusion_model.` or empty); other keys (VAE, encoders) are ignored."""
    keys: list[str]
    """The transformer's keys as stored in the file (with the prefix)."""
    config: dict
    """The diffusers `FluxTransformer2DModel` config: widths and block counts from the tensors."""
    dtypes: set[str]
    """safetensors dtypes of the transformer tensors (`BF16`, `F8_E4M3`, ...)."""

    @property
    def hidden(self) -> int:
        return self.config["num_attention_heads"] * self.config["attention_head_dim"]

    @property
    def variant(self) -> str:
        """`flux-dev` when the guidance embedder is present, else `flux-schnell`."""
        return "flux-dev" if self.config["guidance_embeds"] else "flux-schnell"


def inspect_bfl(header: CheckpointHeader) -> BflLayout:
    """Check that a file holds a BFL-layout Flux.1 transformer and derive its config from the shapes."""
    from fluxlora.models.identify import describe_keys

    prefix = next((p for p in PREFIXES if any(k.startswith(p) for k in header.shapes)), "")
    keys = [k for k in header.shapes if k.startswith(prefix)]
    shapes = {k[len(prefix):]: header.shapes[k] for k in keys}
    if any(r not in shapes for r in REQUIRED):
        raise FluxLoraError(f"{header.path} is not a Flux.1 transformer in BFL layout (no {REQUIRED[2]}); "
                            f"it looks like {describe_keys(header.shapes)}")
    if "distilled_guidance_layer.in_proj.weight" in shapes:
        raise FluxLoraError(f"{header.path} is a Chroma transformer, not FLUX.1: use model=chroma")
    unknown = [k for k in shapes if not _known(k)]
    if unknown:
        raise FluxLoraError(f"{header.path} holds tensors a Flux.1 transformer does not have (e.g. {unknown[:3]}); "
                            "Flux Fill/Depth/Redux variants are not supported")
    config = _config_from_shapes(shapes, header)
    return BflLayout(prefix, keys, config, {header.dtypes[k] for k in keys})


def _known(key: str) -> bool:
    try:
        _lookup(key)
    except KeyError:
        return False
    return True


def _block_count(shapes: dict, kind: str, path: Path) -> int:
    ids = {int(k.split(".")[1]) for k in shapes if k.startswith(kind + ".")}
    n = max(ids) + 1 if ids else 0
    if ids != set(range(n)):
        raise FluxLoraError(f"{path}: {kind} {sorted(set(range(n)) - ids)} missing (a damaged or partial file)")
    return n


def _config_from_shapes(shapes: dict, header: CheckpointHeader) -> dict:
    path = header.path
    guidance = "guidance_in.in_layer.weight" in shapes
    config = shipped_config("flux-dev" if guidance else "flux-schnell")
    config.update(header.config())
    hidden, in_channels = shapes["img_in.weight"]
    head = shapes["double_blocks.0.img_attn.norm.query_norm.scale"][0]
    config.update(
        in_channels=in_channels, attention_head_dim=head, num_attention_heads=hidden // head,
        joint_attention_dim=shapes["txt_in.weight"][1], pooled_projection_dim=shapes["vector_in.in_layer.weight"][1],
        num_layers=_block_count(shapes, "double_blocks", path), guidance_embeds=guidance,
        num_single_layers=_block_count(shapes, "single_blocks", path),
    )
    out_channels = shapes["final_layer.linear.weight"][0]
    if out_channels != in_channels:
        config["out_channels"] = out_channels
    if shapes["double_blocks.0.img_mlp.0.weight"][0] != 4 * hidden or shapes["time_in.in_layer.weight"][1] != 256:
        raise FluxLoraError(f"{path}: MLP width or timestep embedding differ from Flux.1 (mlp_ratio 4, 256)")
    if sum(config["axes_dims_rope"]) != head:
        raise FluxLoraError(f"{path}: attention head size {head} does not match the rope axes "
                            f"{config['axes_dims_rope']} of the shipped Flux config, and the file names none")
    return config


_POOL = 16_777_259  # random values reused across tensors; not a multiple of any Flux width, so rows never repeat


def _random_tensor(name: str, shape: tuple[int, ...], pool: torch.Tensor) -> torch.Tensor:
    """A Flux-like random tensor: matrices ~ N(0, 1/fan_in), norm scales 1, biases ~ N(0, 0.02²).

    Values are cut from a shared N(0, 1) pool at an offset given by the name (drawing every element would take
    minutes on a CPU for a 12B model); tensors and rows all differ, which is all a check needs."""
    if name.endswith(".scale"):
        return torch.ones(shape, dtype=pool.dtype, device=pool.device)
    out = torch.empty(shape, dtype=pool.dtype, device=pool.device).view(-1)
    scale = shape[1] ** -0.5 if len(shape) == 2 else 0.02
    at, src = 0, zlib.crc32(name.encode()) % pool.numel()
    while at < out.numel():
        step = min(out.numel() - at, pool.numel() - src)
        torch.mul(pool[src:src + step], scale, out=out[at:at + step])
        at, src = at + step, 0
    return out.view(shape)


def write_random_bfl(path: str | Path, config: dict, dtype: torch.dtype = torch.bfloat16, seed: int = 0,
                     device: str | torch.device = "cpu", prefix: str = "") -> dict[str, tuple[int, ...]]:
    """Stream a random-weight Flux transformer in BFL layout into one safetensors file.

    One tensor exists at a time (generated on `device`, written, dropped), so a Flux-dev-shaped 24 GB file
    needs about 0.5 GB of RAM. The diffusers config goes into the header (`fluxlora.config`).

    Args:
        path: the file to write (e.g. `flux1-dev.safetensors`).
        config: a diffusers `FluxTransformer2DModel` config, e.g. `shipped_config("flux-dev")`.
        dtype: stored dtype: bf16, fp16, fp32 or torch.float8_e4m3fn.
        seed: seeds the pool of random values tensors are cut from; the same seed writes the same file.
        device: where tensors are generated (`cuda` is much faster for full-size models).
        prefix: `model.diffusion_model.` to write a ComfyUI-style prefixed file.

    Returns:
        The written names and shapes.

    Example::

        write_random_bfl("/tmp/flux1-dev.safetensors", shipped_config("flux-dev"), torch.bfloat16, device="cuda")
    """
    shapes = {prefix + k: v for k, v in bfl_shapes(config).items()}
    meta = {"format": "pt", "fluxlora.config": json.dumps(config)}
    gen = torch.Generator(device).manual_seed(seed)
    pool_dtype = torch.bfloat16 if dtype == torch.float8_e4m3fn else dtype  # fp8 has no mul kernels on CPU
    pool = torch.randn(_POOL, generator=gen, device=device).to(pool_dtype)
    stream_safetensors(Path(path), shapes, dtype, lambda n: _random_tensor(n[len(prefix):], shapes[n], pool), meta,
                       fsync=False)
    return shapes


def save_bfl(path: str | Path, diffusers_state: dict[str, torch.Tensor], config: dict,
             dtype: torch.dtype | None = None, prefix: str = "") -> None:
    """Write a diffusers-keyed transformer state dict as a BFL file (the inverse of loading one)."""
    state = diffusers_to_bfl(diffusers_state, prefix)
    pick = dtype or (lambda n: state[n].dtype)
    stream_safetensors(Path(path), {k: tuple(v.shape) for k, v in state.items()}, pick, state.__getitem__,
                       {"format": "pt", "fluxlora.config": json.dumps(config)})
