"""Speed knobs for the training step that leave the numbers unchanged (within bf16 tolerance)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per compiled block kind (several bucket resolutions × input grad signatures)."""


@dataclass
class SpeedSettings:
    """How the transformer is run."""

    compile_blocks: bool | str = False
    """Regional torch.compile: each transformer block is compiled once and reused by all blocks of its kind.
    `auto`: on a CUDA device only (the tiers' choice: on the CPU, compiling costs more than it saves), and not over
    NF4 storage (bitsandbytes' 4-bit layers under torch.compile were not measured here; `true` forces it)."""
    compile_scope: str = "blocks"
    """`blocks`: one compiled region per block (fast to compile); `model`: the whole transformer as one graph
    (slower to compile, far less host overhead per step: each region costs a fixed wrapper time per call)."""
    compile_mode: str | None = None
    """torch.compile mode (None = default; `max-autotune-no-cudagraphs` tunes matmuls longer)."""
    compile_options: dict | None = None
    """Inductor options instead of a mode, e.g. `{cpp_wrapper: true}` (launches kernels from C++: less host time
    per compiled block, longer compile)."""

    def __post_init__(self) -> None:
        if self.compile_blocks not in (True, False, "auto"):
            raise ValueError(f"speed.compile_blocks={self.compile_blocks!r} is not one of true, false, auto")
        if self.compile_scope not in ("blocks", "model"):
            raise ValueError(f"speed.compile_scope={self.compile_scope!r} is not one of blocks, model")
        if self.compile_mode and self.compile_options:
            raise ValueError("speed.compile_mode and speed.compile_options cannot both be set (torch.compile)")

    def compiles(self, device: torch.device | str | None, base_storage: str = "none") -> bool:
        """Whether blocks are compiled on `device` with `memory.base_storage`."""
        if self.compile_blocks == "auto":
            return device is not None and torch.device(device).type == "cuda" and base_storage != "nf4"
        return bool(self.compile_blocks)


def compile_blocks(transformer: torch.nn.Module, mode: str | None = None, options: dict | None = None) -> int:
    """Compile every double and single block's `forward` in place; returns how many were wrapped.

    Only `forward` is compiled, not the module call: the blocks' hooks (block swapping's loads and evictions,
    checkpointing's marks) stay eager Python around the compiled graph. All blocks of a kind share one compiled
    graph (their forward is the same code; parameters are graph inputs), so compile time does not grow with depth.
    """
    # each block kind gets a graph per input shape (bucket resolution) and per grad signature of its inputs (~3):
    # dynamo's default of 8 per code object would send the blocks of a bucketed dataset back to eager
    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if limit is not None and limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT
    n = 0
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(transformer, name, []):
            block.forward = torch.compile(block.forward, mode=mode, options=options, dynamic=False)
            n += 1
    log.info("regional torch.compile on %d blocks (mode=%s); the first steps include compile time", n, mode)
    return n


def uncompiled(module: torch.nn.Module) -> None:
    """Drop compiled calls from `module` and its children (a deep copy would otherwise run the original's)."""
    for m in module.modules():
        if hasattr(m.__dict__.get("forward"), "_torchdynamo_orig_callable"):
            del m.__dict__["forward"]
        m._compiled_call_impl = None


def apply_speed_settings(transformer: torch.nn.Module, settings: SpeedSettings, swapping: bool = False,
                         device: torch.device | str | None = None, base_storage: str = "none") -> None:
    """Apply the settings for a run on `device`; `swapping`: block swapping is installed (its hooks must stay
    outside compiled code); `base_storage`: `memory.base_storage`."""
    if not settings.compiles(device, base_storage):
        return
    options = dict(settings.compile_options) if settings.compile_options else None
    if settings.compile_scope == "model":
        if swapping:
            raise ValueError("speed.compile_scope=model cannot trace block swapping's hooks; use "
                             "compile_scope=blocks with memory.blocks_to_swap")
        transformer.compile(mode=settings.compile_mode, options=options, dynamic=False)
        log.info("torch.compile on the whole transformer (mode=%s)", settings.compile_mode)
    else:
        compile_blocks(transformer, settings.compile_mode, options)
