"""Adding peft LoRA layers to diffusers' Flux transformer, and the settings that choose them.

Only fresh adapters: continuing from a file (`lora.init_from`) reads the file first and is
`fluxlora.lora.init_from.inject_and_load`, so this module needs no file code and file code can build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from peft import LoraConfig
from peft.tuners.lora import LoraLayer

from fluxlora.lora.keys import MODULATION, kohya_slot

ADAPTER = "default"
TRAIN_BLOCKS = ("all", "single", "double")


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


def target_modules(transformer: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the Linears that get an adapter."""
    names = []
    for name, mod in transformer.named_modules():
        if not isinstance(mod, torch.nn.Linear) or kohya_slot(name) is None:
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


def add_adapters(transformer: torch.nn.Module, settings: LoraSettings, targets: list[str], shape: dict) -> list[str]:
    """Freeze the base model and add LoRA layers on `targets`; `shape`: LoraConfig's rank/alpha arguments."""
    if not targets:
        raise ValueError(f"no Linear layers match lora.train_blocks={settings.train_blocks}")
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(
        **shape, lora_dropout=settings.dropout, init_lora_weights=True, target_modules=targets,
    ))
    # peft gives adapters the base layer's dtype (bf16, even float8): train them in fp32
    for p in lora_parameters(transformer).values():
        p.data = p.data.float()
    return targets


def lora_layers(transformer: torch.nn.Module) -> dict[str, LoraLayer]:
    """Adapted modules by their diffusers name."""
    return {n: m for n, m in transformer.named_modules() if isinstance(m, LoraLayer) and ADAPTER in m.lora_A}


def lora_parameters(transformer: torch.nn.Module) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters by name (what checkpoints hold)."""
    return {n: p for n, p in transformer.named_parameters() if p.requires_grad}

