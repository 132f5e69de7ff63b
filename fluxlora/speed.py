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
    if settings.compile_blocks:
        compile_blocks(transformer, settings.compile_mode)
