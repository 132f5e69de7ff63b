"""Adding peft LoRA layers to diffusers' Flux transformer, as `LoraSettings` (`fluxlora.lora.settings`) choose them.

Only fresh adapters: continuing from a file (`lora.init_from`) reads the file first and is
`fluxlora.lora.init_from.inject_and_load`, so this module needs no file code and file code can build on it.
"""

from __future__ import annotations

import torch

from fluxlora.lora.adapters import ADAPTER, is_adapted, peft_config
from fluxlora.lora.keys import MODULATION, is_embedder, kohya_slot
from fluxlora.lora.dora_base import traceable_dora_bases
from fluxlora.lora.lycoris_layers import use_activation_forward
from fluxlora.lora.settings import LoraSettings  # its home is light (checked before peft loads); re-exported

__all__ = ["ADAPTER", "LoraSettings", "add_adapters", "inject", "lora_layers", "lora_parameters", "target_modules"]


def target_modules(transformer: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the Linears that get an adapter: block Linears by `train_blocks` / `include_modulation`, the
    embedders with `train_embedders`."""
    names = []
    for name, mod in transformer.named_modules():
        if not isinstance(mod, torch.nn.Linear) or kohya_slot(name) is None:
            continue
        if is_embedder(name):
            if settings.train_embedders:
                names.append(name)
            continue
        single = name.startswith("single_transformer_blocks.")
        if (settings.train_blocks == "single" and not single) or (settings.train_blocks == "double" and single):
            continue
        if not settings.include_modulation and name.split(".", 2)[2] in MODULATION:
            continue
        names.append(name)
    return names


def inject(transformer: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """Freeze the base model and add fresh peft LoRA layers; returns the adapted module names."""
    if settings.init_from:
        raise ValueError("lora.init_from is set: fluxlora.lora.init_from.inject_and_load reads the file and injects")
    return add_adapters(transformer, settings, target_modules(transformer, settings),
                        dict(r=settings.rank, lora_alpha=settings.alpha))


def add_adapters(transformer: torch.nn.Module, settings: LoraSettings, targets: list[str], shape: dict,
                 lokr_decompose_both: bool = False) -> list[str]:
    """Freeze the base model and add `settings.type` layers on `targets`; `shape`: LoraConfig's rank/alpha
    arguments (r, lora_alpha, rank_pattern, alpha_pattern), translated for LoKr/LoHa."""
    if not targets:
        raise ValueError(f"no Linear layers match lora.train_blocks={settings.train_blocks}")
    transformer.requires_grad_(False)
    transformer.add_adapter(peft_config(settings.type, targets, shape, settings.dropout, settings.lokr_factor,
                                        lokr_decompose_both))
    # peft gives adapters the base layer's dtype (bf16, even float8): train them in fp32
    for p in lora_parameters(transformer).values():
        p.data = p.data.float()
    # LoKr/LoHa: apply the update to the activations (no full-size ΔW per call, no graph break per layer under
    # torch.compile); same math and tensors as peft's layers (fluxlora.lora.lycoris_layers)
    use_activation_forward(transformer)
    # DoRA over a float base: its weight reaches the norm through a path torch.compile traces (lora.dora_base)
    traceable_dora_bases(transformer)
    return targets


def lora_layers(transformer: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Adapted modules (peft layers of any `lora.type`) by their diffusers name."""
    return {n: m for n, m in transformer.named_modules() if is_adapted(m)}


def lora_parameters(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable adapter parameters by name (what checkpoints hold): every type's tensors, DoRA's magnitude
    included, are the only parameters left trainable after the base model is frozen."""
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}

