"""LyCORIS-keyed files for the types beyond plain LoRA: DoRA's `dora_scale`, LoHa (`hada_*`), LoKr (`lokr_*`).

The names and scale rules are LyCORIS's (lycoris/modules/{locon,loha,lokr}.py), which ComfyUI and Forge
(comfy/weight_adapter) and sd-scripts with `--network_module lycoris.kohya` read:

- **DoRA** is a kohya LoRA plus `<layer>.dora_scale` of shape (out, 1): LyCORIS's `wd_on_out` orientation, the one
  peft trains (its `lora_magnitude_vector` is the norm of each *output row* of W + ΔW). A fused q/k/v layer's rows
  are its parts' rows, so the parts' magnitudes concatenate exactly. ComfyUI picks the axis from dora_scale's first
  dimension; a 1-D vector would broadcast wrongly there (ComfyUI issue #12938), hence (out, 1).
- **LoHa** fuses like LoRA: stacking the parts' `w1_a` block-diagonally and their `w1_b` vertically (same for w2)
  gives, row block by row block, each part's (w1_a·w1_b) ⊙ (w2_a·w2_b); alpha scales by the number of parts so
  alpha/rank stays the same. So LoHa keeps sd-scripts' fused `lora_unet_<block>_<slot>` names.
- **LoKr** cannot fuse: rows of kron(w1, w2) stacked from three parts are one Kronecker product only if the parts
  share w2. Every adapted diffusers Linear is written on its own under LyCORIS's name for diffusers' Flux
  (`lycoris_transformer_blocks_0_attn_to_q`, what LyCORIS's wrapper writes and loads on FluxTransformer2DModel,
  as SimpleTuner trains it); ComfyUI and Forge map those names onto the slices of the fused BFL weights. One naming
  for the whole file, so LyCORIS's loader (one prefix per network) reads all of it.

Scale: LyCORIS applies alpha/dim where dim is the inner size of a factored matrix (w2_b / w1_b rows), and 1 when a
LoKr has both factors full; then the trained alpha/rank is baked into w1 and alpha is written equal to the rank.
"""

from __future__ import annotations

import torch

from fluxlora.lora.adapters import layer_kind, layer_tensors

LYCORIS_PREFIX = "lycoris_"


def lycoris_name(module: str) -> str:
    """LyCORIS's layer name for a diffusers module (its wrapper's prefix, dots to underscores)."""
    return LYCORIS_PREFIX + module.replace(".", "_")


def dora_scale(layer: torch.nn.Module) -> torch.Tensor:
    """peft's magnitude (out,) as LyCORIS's output-axis dora_scale (out, 1), fp32."""
    return layer_tensors(layer)["lora_magnitude_vector"].float().reshape(-1, 1)


def lokr_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """One peft LoKr layer as LyCORIS keys (`lokr_w1`, `lokr_w2_a`, ..., `alpha`), exact under LyCORIS's rules."""
    t = {k: v.float() for k, v in layer_tensors(layer).items()}
    scale = float(layer.scaling["default"])
    rank = int(layer.r["default"])
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    if dim is None:  # both full: LyCORIS and ComfyUI apply scale 1, so bake ours into the small factor
        t["lokr_w1"] = t["lokr_w1"] * scale
        t["alpha"] = torch.tensor(float(rank))
    else:
        t["alpha"] = torch.tensor(scale * dim)
    return t


def loha_fused(key: str, members: dict[int, torch.nn.Module], out_sizes: list[int]) -> dict[str, torch.Tensor]:
    """The LoHa of kohya layer `key` from its parts (part index -> peft layer); missing parts contribute zero."""
    n = len(out_sizes)
    first = next(iter(members.values()))
    rank, scale = int(first.r["default"]), float(first.scaling["default"])
    in_f = layer_tensors(first)["hada_w1_b"].shape[1]
    out = {f"hada_w{j}_a": torch.zeros(sum(out_sizes), n * rank) for j in (1, 2)}
    out |= {f"hada_w{j}_b": torch.zeros(n * rank, in_f) for j in (1, 2)}
    row = 0
    for i in range(n):
        if i in members:
            layer = members[i]
            if int(layer.r["default"]) != rank or abs(float(layer.scaling["default"]) - scale) > 1e-9:
                raise ValueError(f"parts of {key} have different rank or alpha; cannot fuse")
            t = layer_tensors(layer)
            cols = slice(i * rank, (i + 1) * rank)
            for j in (1, 2):
                out[f"hada_w{j}_a"][row:row + out_sizes[i], cols] = t[f"hada_w{j}_a"].float()
                out[f"hada_w{j}_b"][cols] = t[f"hada_w{j}_b"].float()
        row += out_sizes[i]
    out["alpha"] = torch.tensor(scale * n * rank)
    return out


def lokr_state_dict(layers: dict[str, torch.nn.Module], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every LoKr layer under its `lycoris_` name (see the module docstring for why not fused)."""
    out = {}
    for name, layer in layers.items():
        if layer_kind(layer) != "lokr":
            raise ValueError(f"{name} is a {layer_kind(layer)} layer in a LoKr export")
        for k, v in lokr_tensors(layer).items():
            out[f"{lycoris_name(name)}.{k}"] = v.to(dtype).contiguous()
    return out
