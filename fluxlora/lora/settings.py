"""The `lora` settings group and the adapter type names it chooses from: light (no torch, no peft), so the run's
configuration is checked before `fluxlora.lora.inject` and peft are imported.
"""

from __future__ import annotations

from dataclasses import dataclass

TYPES = ("lora", "dora", "lokr", "loha")
NAMES = {"lora": "LoRA", "dora": "DoRA", "lokr": "LoKr", "loha": "LoHa"}
"""How logs and messages spell each type."""
LYCORIS = ("lokr", "loha")
"""Types whose peft layers are LyCORIS layers (no lora_A/lora_B; no input dropout)."""
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


DIFFUSERS_TYPES = ("lora", "dora", "lokr")
"""Types diffusers 0.42 loads from peft keys: LoRA and DoRA through `load_lora_weights`, LoKr only through
`transformer.load_lora_adapter` (FluxPipeline's loader wants 'lora' in every key); LoHa not at all."""


def check_export_format(fmt: str, kind: str) -> None:
    """A diffusers-keyed file only for types diffusers can load: never an unloadable file."""
    if fmt in ("diffusers", "both") and kind not in DIFFUSERS_TYPES:
        raise ValueError(f"output.format={fmt} cannot hold lora.type={kind}: diffusers 0.42 cannot load "
                         f"{kind} weights; use output.format=kohya (LyCORIS keys, read by ComfyUI/Forge)")
