"""The LoRA files fluxlora writes: kohya (sd-scripts) keys, diffusers/peft keys, and sd-scripts' metadata.

Diffusers splits BFL's fused layers (img_attn_qkv, single-block linear1) into separate q/k/v(/mlp) Linears.
Separate LoRAs of rank r on those parts are exactly one LoRA of rank n·r on the fused layer: the downs stack,
the ups go block-diagonal, and alpha scales by n so alpha/rank stays the same.
"""

from __future__ import annotations

import json
from collections import defaultdict

import torch
from peft.tuners.lora import LoraLayer

from fluxlora.lora.inject import ADAPTER, LoraSettings, lora_layers
from fluxlora.lora.keys import kohya_parts, kohya_slot


def _down_up(layer: LoraLayer) -> tuple[torch.Tensor, torch.Tensor, float]:
    down = layer.lora_A[ADAPTER].weight.detach()
    up = layer.lora_B[ADAPTER].weight.detach()
    return down, up, float(layer.scaling[ADAPTER])


def kohya_state_dict(transformer: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """sd-scripts' Flux LoRA keys: fused q/k/v(/mlp) parts become one adapter of rank n·r with alpha n·α."""
    groups: dict[str, dict[int, tuple]] = defaultdict(dict)
    parts_of: dict[str, int] = {}
    for name, layer in lora_layers(transformer).items():
        slot = kohya_slot(name)
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
    return [transformer.get_submodule(name).out_features if size is None else size
            for name, size in zip(kohya_parts(key), sizes)]


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


_NOT_SS = ("name", "guidance", "rank", "alpha", "train_blocks")  # the modelspec title, or ss_network_* above


def training_metadata(settings: LoraSettings, info: dict) -> dict[str, str]:
    """`ss_*` keys as sd-scripts writes them, plus modelspec; every value a string (safetensors header)."""
    arch = "flux-1-dev/lora" if info.get("guidance", True) else "flux-1-schnell/lora"
    chroma = info.get("model_type") == "chroma"  # sd-scripts' --model_type=chroma header values
    meta = {
        "ss_network_module": "networks.lora_flux",
        "ss_network_dim": str(settings.rank),
        "ss_network_alpha": str(settings.alpha),
        "ss_network_dropout": str(settings.dropout),
        "ss_network_args": json.dumps({"train_blocks": settings.train_blocks}),
        "ss_base_model_version": "chroma" if chroma else "flux1",
        "modelspec.sai_model_spec": "1.0.0",
        "modelspec.architecture": "chroma/lora" if chroma else arch,
        "modelspec.implementation": ("https://huggingface.co/lodestones/Chroma" if chroma
                                     else "https://github.com/black-forest-labs/flux"),
        "modelspec.title": str(info.get("name", "fluxlora")),
    }
    for k, v in info.items():
        if k not in _NOT_SS:
            meta[f"ss_{k}"] = v if isinstance(v, str) else json.dumps(v)
    return meta
