"""Speed knobs for the training step that leave the numbers unchanged (within bf16 tolerance)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass
class SpeedSettings:
    """How the transformer is run."""

    compile_blocks: bool = False
    """Regional torch.compile: each transformer block is compiled once and reused by all blocks of its kind."""
    compile_scope: str = "blocks"
    """`blocks`: one compiled region per block (fast to compile); `model`: the whole transformer as one graph
    (slower to compile, far less host overhead per step: each region costs a fixed wrapper time per call)."""
    compile_mode: str | None = None
    """torch.compile mode (None = default; `max-autotune-no-cudagraphs` tunes matmuls longer)."""


def compile_blocks(transformer: torch.nn.Module, mode: str | None = None) -> int:
    """Compile every double and single block in place; returns how many were wrapped."""
    n = 0
    for name in ("transformer_blocks", "single_transformer_blocks"):
        for block in getattr(transformer, name, []):
            block.compile(mode=mode, dynamic=False)
            n += 1
    log.info("regional torch.compile on %d blocks (mode=%s); the first steps include compile time", n, mode)
    return n


def apply_speed_settings(transformer: torch.nn.Module, settings: SpeedSettings) -> None:
    if not settings.compile_blocks:
        return
    if settings.compile_scope == "model":
        transformer.compile(mode=settings.compile_mode, dynamic=False)
        log.info("torch.compile on the whole transformer (mode=%s)", settings.compile_mode)
    elif settings.compile_scope == "blocks":
        compile_blocks(transformer, settings.compile_mode)
    else:
        raise ValueError(f"compile_scope={settings.compile_scope!r} is not one of blocks, model")
