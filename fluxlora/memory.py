"""Memory knobs for the frozen base model: storage dtype, fp8 weight storage, gradient checkpointing."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

STORAGE = ("none", "fp8")


@dataclass
class MemorySettings:
    """How the frozen transformer is kept in memory."""

    base_storage: str = "none"
    """`fp8`: keep frozen weights in float8_e4m3fn and upcast per layer for compute (diffusers layerwise casting)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward instead of storing them."""
    blocks_to_swap: int = 0
    """Blocks kept in host memory and streamed in; 0 = off (the default in every tier)."""

    def __post_init__(self) -> None:
        if self.base_storage not in STORAGE:
            raise ValueError(f"memory.base_storage={self.base_storage!r} is not one of {STORAGE}")
        if self.blocks_to_swap < 0:
            raise ValueError(f"memory.blocks_to_swap must be >= 0, got {self.blocks_to_swap}")
        if self.blocks_to_swap:
            raise NotImplementedError("memory.blocks_to_swap > 0 is not implemented yet; use gradient checkpointing and fp8")


def apply_memory_settings(transformer: torch.nn.Module, settings: MemorySettings, compute_dtype: torch.dtype) -> None:
    """Apply storage and checkpointing to the frozen transformer; call before LoRA layers are added."""
    if settings.base_storage == "fp8":
        # LoRA layers added later stay in their own dtype: only the frozen Linears/Convs get the casting hooks
        transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
        log.info("base transformer stored in float8_e4m3fn, computed in %s", compute_dtype)
    if settings.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()


def fp8_stored_parameters(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> set[str]:
    """Names of the parameters `apply_memory_settings(base_storage=fp8)` keeps in float8_e4m3fn.

    Asked of diffusers itself, on a copy of a meta-device model (no memory): loaders use it to read those
    tensors straight into fp8, so a bf16 file never sits in RAM at full size and an fp8 file is never upcast.
    """
    import copy

    if any(not p.is_meta for p in transformer.parameters()):
        raise ValueError("fp8_stored_parameters needs a model built on the meta device")
    probe = copy.deepcopy(transformer)
    probe.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=compute_dtype)
    return {n for n, p in probe.named_parameters() if p.dtype == torch.float8_e4m3fn}
