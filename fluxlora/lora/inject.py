"""Adding peft LoRA layers to diffusers' Flux transformer, and the settings that choose them.

Only fresh adapters: continuing from a file (`lora.init_from`) reads the file first and is
`fluxlora.lora.init_from.inject_and_load`, so this module needs no file code and file code can build on it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from fluxlora.lora.adapters import ADAPTER, LYCORIS, TYPES, is_adapted, peft_config
from fluxlora.lora.keys import MODULATION, is_embedder, kohya_slot
from fluxlora.lora.dora_base import traceable_dora_bases
from fluxlora.lora.lycoris_layers import use_activation_forward

__all__ = ["ADAPTER", "LoraSettings", "add_adapters", "inject", "lora_layers", "lora_parameters", "target_modules"]
TRAIN_BLOCKS = ("all", "single", "double")
TEXT_ENCODER_LORA = ("keep", "drop")


@dataclass
class LoraSettings:
    """Which layers get adapters, of which type, and how big they are."""

    type: str = "lora"
    """lora | dora | lokr | loha (README "Adapter types"): peft's LoRA, DoRA (LoRA + a per-output magnitude),
    LoKr (Kronecker product) or LoHa (Hadamard product of two low-rank products)."""
    rank: int = 16
    """LoRA rank r (sd-scripts' network_dim); for LoKr/LoHa the rank of their low-rank factors."""
    alpha: float = 16.0
    """Scale numerator: the update is (alpha / rank)·B·A (sd-scripts' network_alpha); LoKr/LoHa scale their
    product by alpha / rank the same way."""
    dropout: float = 0.0
    """Dropout on the LoRA input (lora/dora only: peft's LoKr/LoHa have no input dropout)."""
    lokr_factor: int = -1
    """LoKr only: LyCORIS's `factor`, the size of the Kronecker product's small factor (-1: the most square split
    of each dimension, LyCORIS's default; 8 or 16 give smaller files)."""
    train_blocks: str = "all"
    """all | single | double, as sd-scripts' train_blocks network arg."""
    include_modulation: bool = True
    """Also adapt the blocks' modulation Linears (kohya's img_mod_lin / modulation_lin) as sd-scripts does."""
    train_embedders: bool = False
    """Also adapt the embedders as sd-scripts' `in_dims` does (img_in, time_in, vector_in, guidance_in, txt_in:
    diffusers' x_embedder, time_text_embed.*, context_embedder), with `rank` / `alpha`. Embedder layers of
    `init_from` are continued either way."""
    init_from: str | None = None
    """A LoRA file (kohya or diffusers keys) to continue from; its layers keep their rank and scale
    (see `fluxlora.lora.init_from` for how fused kohya layers map onto q/k/v)."""
    text_encoder_lora: str = "keep"
    """What happens to `init_from`'s text-encoder layers (sd-scripts' lora_te1_* CLIP-L, lora_te3_* T5): keep
    (frozen, applied to the encoder while caching and encoding the sample prompts, written back unchanged) or drop
    (left out of the run and of the files written; the log names them)."""
    train_text_encoder: bool = False
    """Training text-encoder LoRAs is not supported yet (it would turn off caching of that encoder's outputs)."""

    def __post_init__(self) -> None:
        if self.type not in TYPES:
            raise ValueError(f"lora.type={self.type!r} is not one of {TYPES}")
        if self.type in LYCORIS and self.dropout:
            raise ValueError(f"lora.dropout={self.dropout} applies to lora/dora; peft's {self.type} has no input "
                             "dropout: set lora.dropout=0")
        if self.lokr_factor == 0 or self.lokr_factor < -1:
            raise ValueError(f"lora.lokr_factor must be -1 (most square) or >= 1, got {self.lokr_factor}")
        if self.rank < 1:
            raise ValueError(f"lora.rank must be >= 1, got {self.rank}")
        if self.alpha <= 0:
            raise ValueError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")
        if self.train_blocks not in TRAIN_BLOCKS:
            raise ValueError(f"lora.train_blocks={self.train_blocks!r} is not one of {TRAIN_BLOCKS}")
        if self.text_encoder_lora not in TEXT_ENCODER_LORA:
            raise ValueError(f"lora.text_encoder_lora={self.text_encoder_lora!r} is not one of {TEXT_ENCODER_LORA}")
        if self.train_text_encoder:
            raise ValueError("lora.train_text_encoder=true is not supported yet; lora.text_encoder_lora=keep applies "
                             "the text-encoder layers of lora.init_from frozen while caching and writes them back "
                             "unchanged")


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

