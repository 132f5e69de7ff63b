"""Flux LoRA key vocabulary: diffusers module names <-> kohya (sd-scripts) layer names.

One owner, so injection, export and reading a file agree on which diffusers Linears make up which fused BFL layer.
Diffusers splits BFL's fused layers (img_attn_qkv, single-block linear1) into separate q/k/v(/mlp) Linears; the
tables give each part's index in its fused layer, which fixes the order of rows in kohya's lora_up.
"""

from __future__ import annotations

import re

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
MODULATION = {"norm1.linear", "norm1_context.linear", "norm.linear"}
"""Sub-modules that are the blocks' modulation Linears (kohya's img_mod_lin / txt_mod_lin / modulation_lin)."""

# kohya kind -> (diffusers block list, table)
_KINDS = {"double": ("transformer_blocks", _DOUBLE), "single": ("single_transformer_blocks", _SINGLE)}
_BLOCK_RE = re.compile(r"^(transformer_blocks|single_transformer_blocks)\.(\d+)\.(.+)$")
_KOHYA_RE = re.compile(r"^lora_unet_(double|single)_blocks_(\d+)_(.+)$")
"""A kohya transformer layer name: groups (double|single, block index, kohya layer)."""


def _reverse() -> dict[tuple[str, str], list[str]]:
    """(double|single, kohya layer) -> diffusers sub-modules in BFL part order: the tables walked backwards."""
    out: dict[tuple[str, str], list[tuple[int, str]]] = {}
    for kind, (_, table) in _KINDS.items():
        for sub, (layer, part, _) in table.items():
            out.setdefault((kind, layer), []).append((part, sub))
    return {k: [s for _, s in sorted(v)] for k, v in out.items()}


_PARTS = _reverse()


def kohya_slot(module_name: str) -> tuple[str, int, int] | None:
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


def kohya_parts(key: str) -> list[str] | None:
    """The diffusers module names fused into kohya layer `key`, in part order; None if `key` is not a Flux block
    layer. The inverse of `kohya_slot`."""
    m = _KOHYA_RE.match(key)
    if m is None or (m[1], m[3]) not in _PARTS:
        return None
    block = _KINDS[m[1]][0]
    return [f"{block}.{m[2]}.{sub}" for sub in _PARTS[(m[1], m[3])]]
