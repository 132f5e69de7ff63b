"""The LoRA files fluxlora writes: kohya (sd-scripts) keys and diffusers/peft keys (the header: `header`).

DoRA, LoKr and LoHa (`lora.type`) get LyCORIS's key names in the kohya file (`fluxlora.lora.export_lycoris`).

Diffusers splits BFL's fused layers (img_attn_qkv, single-block linear1) into separate q/k/v(/mlp) Linears.
Separate LoRAs of rank r on those parts are exactly one LoRA of rank n·r on the fused layer: the downs stack,
the ups go block-diagonal, and alpha scales by n so alpha/rank stays the same.
"""

from __future__ import annotations

from collections import defaultdict

import torch

from fluxlora.lora.adapters import layer_kind, layer_tensors
from fluxlora.lora.export_lycoris import dora_scale, loha_fused, lokr_state_dict
from fluxlora.lora.inject import ADAPTER, lora_layers
from fluxlora.lora.keys import kohya_parts, kohya_slot
from fluxlora.lora.settings import DIFFUSERS_TYPES, check_export_format  # checked with the settings; re-exported


def _down_up(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, float]:
    down = layer.lora_A[ADAPTER].weight.detach()
    up = layer.lora_B[ADAPTER].weight.detach()
    return down, up, float(layer.scaling[ADAPTER])


def adapter_kind(layers: dict[str, torch.nn.Module]) -> str:
    """The one `lora.type` of a model's adapters (fluxlora never mixes types in one model)."""
    kinds = {layer_kind(m) for m in layers.values()}
    if len(kinds) != 1:
        raise ValueError(f"the model holds {sorted(kinds) or 'no'} adapters; export needs exactly one type")
    return kinds.pop()


def kohya_state_dict(transformer: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """sd-scripts' Flux LoRA keys: fused q/k/v(/mlp) parts become one adapter of rank n·r with alpha n·α.

    DoRA adds `.dora_scale`, LoHa fuses the same way under `hada_*` keys, LoKr is written per diffusers layer under
    LyCORIS names (a Kronecker product does not fuse; `fluxlora.lora.export_lycoris` says why)."""
    layers = lora_layers(transformer)
    kind = adapter_kind(layers)
    if kind == "lokr":
        return lokr_state_dict(layers, dtype)
    groups: dict[str, dict[int, torch.nn.Module]] = defaultdict(dict)
    parts_of: dict[str, int] = {}
    for name, layer in layers.items():
        slot = kohya_slot(name)
        if slot is None:
            raise ValueError(f"LoRA on {name} has no kohya counterpart")
        key, part, parts = slot
        groups[key][part] = layer
        parts_of[key] = parts
    out = {}
    for key, members in groups.items():
        sizes = [members[i].base_layer.out_features if i in members else None for i in range(parts_of[key])]
        if None in sizes:  # a fused layer only partly adapted: the missing parts contribute zero
            sizes = _fill_out_sizes(transformer, key, sizes)
        tensors = loha_fused(key, members, sizes) if kind == "loha" else _lora_fused(key, members, sizes)
        if kind == "dora":
            tensors["dora_scale"] = _dora_fused(transformer, key, members)
        out.update({f"{key}.{k}": v.to(dtype).contiguous() for k, v in tensors.items()})
    return out


def _lora_fused(key: str, members: dict[int, torch.nn.Module], out_sizes: list[int]) -> dict[str, torch.Tensor]:
    """One LoRA of rank n·r on kohya layer `key`: downs stacked, ups block-diagonal."""
    any_down, _, scale = _down_up(next(iter(members.values())))
    rank, in_f = any_down.shape
    n = len(out_sizes)
    down = torch.zeros(n * rank, in_f)
    up = torch.zeros(sum(out_sizes), n * rank)
    row = 0
    for i in range(n):
        if i in members:
            d, u, s = _down_up(members[i])
            if abs(s - scale) > 1e-9 or d.shape[0] != rank:
                raise ValueError(f"parts of {key} have different rank or alpha; cannot fuse")
            down[i * rank:(i + 1) * rank] = d.float()
            up[row:row + out_sizes[i], i * rank:(i + 1) * rank] = u.float()
        row += out_sizes[i]
    return {"lora_down.weight": down, "lora_up.weight": up, "alpha": torch.tensor(scale * n * rank)}


def _dora_fused(transformer: torch.nn.Module, key: str, members: dict[int, torch.nn.Module]) -> torch.Tensor:
    """The parts' magnitudes stacked as the fused layer's (out, 1) dora_scale; a part without an adapter gets its
    base rows' norms, which leave it unchanged."""
    names = kohya_parts(key)
    rows = [dora_scale(members[i]) if i in members else
            transformer.get_submodule(names[i]).weight.detach().float().norm(dim=1, keepdim=True)
            for i in range(len(names))]
    return torch.cat(rows)


def _fill_out_sizes(transformer: torch.nn.Module, key: str, sizes: list) -> list[int]:
    """Output widths of a fused layer's parts, read from the base model for parts without LoRA."""
    return [transformer.get_submodule(name).out_features if size is None else size
            for name, size in zip(kohya_parts(key), sizes)]


def diffusers_state_dict(transformer: torch.nn.Module, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """diffusers/peft keys (`transformer.<module>.lora_A.weight`) with alpha/rank baked into lora_B.

    Baking the scale makes the file exact for every loader, which otherwise assumes alpha == rank. DoRA adds
    `lora_magnitude_vector` (peft's own key, which `load_lora_weights` turns into a DoRA config); LoKr writes
    `lokr_*` with the scale baked into its small factor (diffusers sets alpha = rank for LoKr files).
    """
    layers = lora_layers(transformer)
    kind = adapter_kind(layers)
    check_export_format("diffusers", kind)
    out = {}
    for name, layer in layers.items():
        if kind == "lokr":
            scale = float(layer.scaling[ADAPTER])
            for k, v in layer_tensors(layer).items():
                baked = k in ("lokr_w1", "lokr_w1_a")  # w1 = w1_a @ w1_b: scaling one of them scales w1
                out[f"transformer.{name}.{k}"] = (v.float() * (scale if baked else 1.0)).to(dtype).contiguous()
            continue
        down, up, scale = _down_up(layer)
        out[f"transformer.{name}.lora_A.weight"] = down.to(dtype).contiguous()
        out[f"transformer.{name}.lora_B.weight"] = (up.float() * scale).to(dtype).contiguous()
        if kind == "dora":
            out[f"transformer.{name}.lora_magnitude_vector"] = dora_scale(layer).flatten().to(dtype).contiguous()
    return out
