"""The adapter types (`lora.type`): which peft config builds each, and how to read an injected layer's tensors.

One owner of the per-type differences (the type names are `fluxlora.lora.settings`'), so injection, export and
reading a file agree on them. peft names the tensors as LyCORIS does (`lokr_w1`, `hada_w1_a`, ...), so a layer's
tensors are returned under those names and the file code only adds a prefix. DoRA is a LoRA with a magnitude
vector (peft `LoraConfig(use_dora=True)`).
"""

from __future__ import annotations

import torch
from peft import LoHaConfig, LoKrConfig, LoraConfig
from peft.tuners.tuners_utils import BaseTunerLayer

from fluxlora.lora.settings import LYCORIS, NAMES, TYPES  # the names are the settings'; re-exported

ADAPTER = "default"
TENSORS = {
    "lora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
}
"""peft's (= LyCORIS's) tensor names per type; a LoKr layer holds either the full or the factored form of each."""


def peft_config(kind: str, targets: list[str], shape: dict, dropout: float, lokr_factor: int,
                lokr_decompose_both: bool = False):
    """The peft config for `kind`; `shape`: LoraConfig-style r / lora_alpha / rank_pattern / alpha_pattern.

    The LyCORIS configs start with a zero delta like LoRA (peft's default init), so a fresh adapter leaves the
    model unchanged; LoKr's factor is LyCORIS's (-1: the most square split of each dimension)."""
    if kind in ("lora", "dora"):
        return LoraConfig(**shape, lora_dropout=dropout, init_lora_weights=True, target_modules=targets,
                          use_dora=kind == "dora")
    lyco = dict(r=shape["r"], alpha=shape["lora_alpha"], rank_pattern=shape.get("rank_pattern", {}),
                alpha_pattern=shape.get("alpha_pattern", {}), target_modules=targets, init_weights=True)
    if kind == "lokr":
        return LoKrConfig(**lyco, decompose_factor=lokr_factor, decompose_both=lokr_decompose_both)
    return LoHaConfig(**lyco)


def is_adapted(module: torch.nn.Module) -> bool:
    """A peft layer (any type) holding fluxlora's adapter."""
    return isinstance(module, BaseTunerLayer) and ADAPTER in getattr(module, "scaling", {})


def layer_kind(layer: torch.nn.Module) -> str:
    """lora | dora | lokr | loha of an adapted layer."""
    names = set(layer.adapter_layer_names)
    if "lokr_w1" in names:
        return "lokr"
    if "hada_w1_a" in names:
        return "loha"
    dora = getattr(layer, "use_dora", {}).get(ADAPTER, False)
    return "dora" if dora else "lora"


def layer_tensors(layer: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The adapter's tensors under peft/LyCORIS names, detached (the magnitude as peft's (out,) vector)."""
    out = {}
    for name in TENSORS[layer_kind(layer)]:
        holder = getattr(layer, name)
        if ADAPTER not in holder:
            continue
        value = holder[ADAPTER]
        out[name] = (value.weight if isinstance(value, torch.nn.Module) else value).detach()
    return out


def set_layer_tensors(layer: torch.nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy `tensors` (as `layer_tensors` names them) into the layer's fp32 parameters."""
    current = {}
    for name in tensors:
        value = getattr(layer, name)[ADAPTER]
        current[name] = value.weight if isinstance(value, torch.nn.Module) else value
    with torch.no_grad():
        for name, t in tensors.items():
            current[name].copy_(t)
