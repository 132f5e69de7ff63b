"""Flux LoRA key vocabulary: diffusers module names <-> kohya (sd-scripts) layer names.

One owner, so injection, export and reading a file agree on which diffusers Linears make up which fused BFL layer.
Diffusers splits BFL's fused layers (img_attn_qkv, single-block linear1) into separate q/k/v(/mlp) Linears; the
tables give each part's index in its fused layer, which fixes the order of rows in kohya's lora_up.

Beyond the blocks, sd-scripts' networks/lora_flux.py names two more kinds of layer:

- the **embedders** (its `in_dims` network arg, in the order img, time, vector, guidance, txt): BFL's `img_in`,
  `txt_in` and the MLP embedders' `in_layer`/`out_layer` (`lora_unet_time_in_in_layer`, ...). Each is one diffusers
  Linear (`x_embedder`, `time_text_embed.timestep_embedder.linear_1`, ...), nothing fused.
- the **text encoders**: `lora_te1_<module>` on CLIP-L (`CLIPAttention` / `CLIPMLP` Linears) and `lora_te3_<module>`
  on T5-XXL (`T5Attention` / `T5DenseGatedActDense` Linears, with `train_t5xxl`): the transformers module name with
  dots as underscores (`lora_te1_text_model_encoder_layers_0_self_attn_q_proj`,
  `lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0`).
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
EMBEDDERS = {
    "lora_unet_img_in": "x_embedder",
    "lora_unet_time_in_in_layer": "time_text_embed.timestep_embedder.linear_1",
    "lora_unet_time_in_out_layer": "time_text_embed.timestep_embedder.linear_2",
    "lora_unet_vector_in_in_layer": "time_text_embed.text_embedder.linear_1",
    "lora_unet_vector_in_out_layer": "time_text_embed.text_embedder.linear_2",
    "lora_unet_guidance_in_in_layer": "time_text_embed.guidance_embedder.linear_1",
    "lora_unet_guidance_in_out_layer": "time_text_embed.guidance_embedder.linear_2",
    "lora_unet_txt_in": "context_embedder",
}
"""sd-scripts' embedder layer (BFL module, dots as underscores) -> the diffusers Linear it adapts."""
IN_DIMS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")
"""The embedders in the order of sd-scripts' `in_dims` network arg."""
_EMBEDDER_MODULES = {v: k for k, v in EMBEDDERS.items()}

TEXT_ENCODERS = {"lora_te1": "text_encoder", "lora_te3": "text_encoder_2"}
"""sd-scripts' text-encoder prefix -> the FluxComponents part it adapts (CLIP-L, T5-XXL)."""
TEXT_ENCODER_PREFIXES = ("lora_te", "lycoris_te", "text_encoder", "te_", "te1_", "te2_")
"""Names of text-encoder layers in any LoRA file (kohya, LyCORIS, diffusers/peft keys)."""
_TE_RE = {
    "lora_te1": re.compile(r"^lora_te1_text_model_encoder_layers_(\d+)_(self_attn_(?:q|k|v|out)_proj|mlp_fc[12])$"),
    "lora_te3": re.compile(r"^lora_te3_encoder_block_(\d+)_layer_(\d+)_(SelfAttention_(?:q|k|v|o)|"
                           r"DenseReluDense_(?:wi_0|wi_1|wi|wo))$"),
}
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


def is_embedder(module_name: str) -> bool:
    """A diffusers module that sd-scripts adapts as an embedder (`in_dims`)."""
    return module_name in _EMBEDDER_MODULES


def embedder_group(key: str) -> str | None:
    """The `in_dims` entry (img_in, time_in, ...) of kohya embedder layer `key`; None for any other name."""
    if key not in EMBEDDERS:
        return None
    return next(g for g in IN_DIMS if key.startswith(f"lora_unet_{g}"))


def is_text_encoder_layer(stem: str) -> bool:
    """A layer name (a file key before its first '.') that adapts a text encoder, in any key style."""
    return stem.startswith(TEXT_ENCODER_PREFIXES)


def text_encoder_slot(stem: str) -> tuple[str, str] | None:
    """(FluxComponents part, transformers module name) of sd-scripts text-encoder layer `stem`
    (`lora_te1_text_model_encoder_layers_0_mlp_fc1` -> ('text_encoder', 'text_model.encoder.layers.0.mlp.fc1')),
    or None when `stem` is no CLIP-L / T5 layer sd-scripts writes."""
    for prefix, part in TEXT_ENCODERS.items():
        m = _TE_RE[prefix].match(stem)
        if m is None:
            continue
        if prefix == "lora_te1":
            sub = m[2].replace("self_attn_", "self_attn.").replace("mlp_", "mlp.")
            return part, f"text_model.encoder.layers.{m[1]}.{sub}"
        sub = m[3].replace("SelfAttention_", "SelfAttention.").replace("DenseReluDense_", "DenseReluDense.")
        return part, f"encoder.block.{m[1]}.layer.{m[2]}.{sub}"
    return None


def kohya_slot(module_name: str) -> tuple[str, int, int] | None:
    """Map a diffusers module name to (kohya layer name, part index, number of parts), or None if not a block or
    embedder Linear."""
    if module_name in _EMBEDDER_MODULES:
        return _EMBEDDER_MODULES[module_name], 0, 1
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
    or embedder layer. The inverse of `kohya_slot`."""
    if key in EMBEDDERS:
        return [EMBEDDERS[key]]
    m = _KOHYA_RE.match(key)
    if m is None or (m[1], m[3]) not in _PARTS:
        return None
    block = _KINDS[m[1]][0]
    return [f"{block}.{m[2]}.{sub}" for sub in _PARTS[(m[1], m[3])]]
