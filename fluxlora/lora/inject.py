"""LoRA on diffusers' Flux transformer through peft, and export to kohya and diffusers files.

Diffusers splits BFL's fused layers (img_attn_qkv, single-block linear1) into separate q/k/v(/mlp) Linears.
Separate LoRAs of rank r on those parts are exactly one LoRA of rank n·r on the fused layer: the downs stack,
the ups go block-diagonal, and alpha scales by n so alpha/rank stays the same.
"""

from __future__ import annotations

import json
import logging
import re
from collections import defaultdict
from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

log = logging.getLogger(__name__)

ADAPTER = "default"
TRAIN_BLOCKS = ("all", "single", "double")

# diffusers sub-module (within a block) -> (kohya layer, index of the part in the fused layer, parts in it)
_DOUBLE = {
    "attn.to_q": ("img_attn_qkv", 0, 3), "attn.to_k": ("img_attn_qkv", 1, 3), "attn.to_v": ("img_attn_qkv", 2, 3),
    "attn.to_out.0": ("img_attn_proj", 0, 1),
    "attn.add_q_proj": ("txt_attn_qkv", 0, 3), "attn.add_k_proj": ("txt_attn_qkv", 1, 3),
    "attn.add_v_proj": ("txt_attn_qkv", 2, 3), "attn.to_add_out": ("txt_attn_proj", 0, 1),
    "ff.net.0.proj": ("img_mlp_0", 0, 1), "ff.net.2": ("img_mlp_2", 0, 1),
    "ff_context.net.0.proj": ("txt_mlp_0", 0, 1), "ff_context.net.2": ("txt_mlp_2", 0, 1),
    "norm1.linear": ("img_mod_lin", 0, 1), "norm1_context.linear": ("txt_mod_lin", 0, 1),
}
_SINGLE = {
    "attn.to_q": ("linear1", 0, 4), "attn.to_k": ("linear1", 1, 4), "attn.to_v": ("linear1", 2, 4),
    "proj_mlp": ("linear1", 3, 4), "proj_out": ("linear2", 0, 1), "norm.linear": ("modulation_lin", 0, 1),
}
_MODULATION = {"norm1.linear", "norm1_context.linear", "norm.linear"}
_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")


@dataclass
class LoraSettings:
    """Which layers get adapters and how big they are."""

    rank: int = 16
    """LoRA rank r (sd-scripts' network_dim)."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / rank)·B·A (sd-scripts' network_alpha)."""
    dropout: float = 0.0
    """Dropout on the LoRA input."""
    train_blocks: str = "all"
    """all | single | double, as sd-scripts' train_blocks network arg."""
    include_modulation: bool = True
    """Also adapt the blocks' modulation Linears (kohya's img_mod_lin / modulation_lin) as sd-scripts does."""
    init_from: str | None = None
    """A LoRA file (kohya or diffusers keys) to continue from; its layers keep their rank and scale
    (see `fluxlora.lora.init_from` for how fused kohya layers map onto q/k/v)."""

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.train_blocks not in TRAIN_BLOCKS:
            raise ValueError(f"lora.train_blocks={self.train_blocks!r} is not one of {TRAIN_BLOCKS}")


def _kohya_slot(module_name: str) -> tuple[str, int, int] | None:
    """Map a diffusers module name to (kohya layer name, part index, number of parts), or None if not a block linear."""
    m = _BLOCK_RE.match(module_name)
    if not m:
        return None
    kind, idx, sub = m.groups()
    table, prefix = (_DOUBLE, "double_blocks") if kind == "transformer_blocks" else (_SINGLE, "single_blocks")
    if sub not in table:
        return None
    layer, part, parts = table[sub]
    return f"lora_unet_{prefix}_{idx}_{layer}", part, parts


def target_modules(transformer: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the Linears that get an adapter."""
    names = []
    for name, mod in transformer.named_modules():
        if not isinstance(mod, torch.nn.Linear) or _kohya_slot(name) is None:
            continue
        single = name.startswith("single_transformer_blocks.")
        if (settings.train_blocks == "single" and not single) or (settings.train_blocks == "double" and single):
            continue
        if not settings.include_modulation and name.split(".", 2)[2] in _MODULATION:
            continue
        names.append(name)
    return names


def inject(transformer: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze the base model and add peft LoRA layers; returns the adapted module names."""
    targets = target_modules(transformer, settings)
    shape: dict = dict(r=settings.rank, lora_alpha=settings.alpha)
    init = None
    if settings.init_from:
        from fluxlora.lora.init_from import lora_config_args, read_lora_file

        init = read_lora_file(settings.init_from, transformer)
        shape = lora_config_args(init, [t for t in targets if t not in init], settings.rank, settings.alpha)
        targets = sorted(set(targets) | set(init))
    if not targets:
        raise ValueError(f"no Linear layers match lora.train_blocks={settings.train_blocks}")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(
        **shape, lora_dropout=settings.dropout, init_lora_weights=True, target_modules=targets,
    ))
    # peft gives adapters the base layer's dtype (bf16, even float8): train them in fp32
    for p in lora_parameters(transformer).values():
        p.data = p.data.float()
    if init is not None:
        from fluxlora.lora.init_from import copy_weights

        copy_weights(lora_layers(transformer), init, ADAPTER)
        log.info("LoRA initialised from %s: %d layers (ranks %s)", settings.init_from, len(init),
                 sorted({w.rank for w in init.values()}))
    return targets


def lora_layers(transformer: torch.nn.Module) -> dict[str, LoraLayer]:
    """Adapted modules by their diffusers name."""
    return {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_parameters(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters by name (what checkpoints hold)."""
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}


def _down_up(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    down = layer.lora_A[ADAPTER].weight.detach()
    up = layer.lora_B[ADAPTER].weight.detach()
    return down, up, float(layer.scaling[ADAPTER])


def kohya_state_dict(transformer: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """sd-scripts' Flux LoRA keys: fused q/k/v(/mlp) parts become one adapter of rank n·r with alpha n·α."""
    groups: dict[str, dict[int, tuple]] = defaultdict(dict)
    parts_of: dict[str, int] = {}
    for name, layer in lora_layers(transformer).items():
        slot = _kohya_slot(name)
        if slot is None:
            raise ValueError(f"LoRA on {name} has no kohya counterpart")
        key, part, parts = slot
        groups[key][part] = (*_down_up(layer), layer.base_layer.out_features)
        parts_of[key] = parts
    out = {}
    for key, members in groups.items():
        any_down, any_up, scale, _ = next(iter(members.values()))
        rank, in_f = any_down.shape
        n = parts_of[key]
        out_sizes = [members[i][3] if i in members else None for i in range(n)]
        if None in out_sizes:  # a fused layer only partly adapted: the missing parts contribute zero
            out_sizes = _fill_out_sizes(transformer, key, out_sizes)
        down = torch.zeros(n * rank, in_f)
        up = torch.zeros(sum(out_sizes), n * rank)
        row = 0
        for i in range(n):
            if i in members:
                d, u, s, _ = members[i]
                if abs(s - scale) > 1e-9 or d.shape[0] != rank:
                    raise ValueError(f"parts of {key} have different rank or alpha; cannot fuse")
                down[i * rank:(i + 1) * rank] = d.float()
                up[row:row + out_sizes[i], i * rank:(i + 1) * rank] = u.float()
            row += out_sizes[i]
        out[f"{key}.lora_down.weight"] = down.to(dtype).contiguous()
        out[f"{key}.lora_up.weight"] = up.to(dtype).contiguous()
        out[f"{key}.alpha"] = torch.tensor(scale * n * rank, dtype=dtype)
    return out


def _fill_out_sizes(transformer: torch.nn.Module, key: str, sizes: list) -> list[int]:
    """Output widths of a fused layer's parts, read from the base model for parts without LoRA."""
    m = re.match(r"lora_unet_(double|single)_blocks_(\d+)_(.+)$", key)
    kind, idx, layer = m.groups()
    table, prefix = (_DOUBLE, "transformer_blocks") if kind == "double" else (_SINGLE, "single_transformer_blocks")
    for sub, (lname, part, _) in table.items():
        if lname == layer and sizes[part] is None:
            sizes[part] = transformer.get_submodule(f"{prefix}.{idx}.{sub}").out_features
    return sizes


def diffusers_state_dict(transformer: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """diffusers/peft keys (`transformer.<module>.lora_A.weight`) with alpha/rank baked into lora_B.

    Baking the scale makes the file exact for every loader, which otherwise assumes alpha == rank.
    """
    out = {}
    for name, layer in lora_layers(transformer).items():
        down, up, scale = _down_up(layer)
        out[f"transformer.{name}.lora_A.weight"] = down.to(dtype).contiguous()
        out[f"transformer.{name}.lora_B.weight"] = (up.float() * scale).to(dtype).contiguous()
    return out


def training_metadata(settings: LoraSettings, info: dict) -> dict[str, str]:
    """`ss_*` keys as sd-scripts writes them, plus modelspec; every value a string (safetensors header)."""
    arch = "flux-1-dev/lora" if info.get("guidance", True) else "flux-1-schnell/lora"
    meta = {
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(settings.alpha),
        "ss_network_dropout": str(settings.dropout),
        "ss_network_args": json.dumps({"train_blocks": settings.train_blocks}),
        "ss_base_model_version": "flux1",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": arch,
        "modelspec.implementation": "https://github.com/black-forest-labs/flux",
        "modelspec.title": str(info.get("name", "fluxlora")),
    }
    for k, v in info.items():
        if k not in ("name", "guidance"):
            meta[f"ss_{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta
