"""Gradient checkpointing of every k-th transformer block, through diffusers' own checkpointing switch.

diffusers calls `transformer._gradient_checkpointing_func(block, *args)` for every block when checkpointing is on;
ours checkpoints the chosen blocks (non-reentrant `torch.utils.checkpoint`) and runs the others plainly. While a
checkpointed block runs (in forward and in its recomputation during backward) `inside_checkpoint()` is true, so
block swapping knows that the checkpoint, not autograd, holds what backward needs.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch.utils.checkpoint import checkpoint

_STATE = threading.local()
MARK = "_fluxlora_checkpointed"


def inside_checkpoint() -> bool:
    """True while a block checkpointed by `checkpoint_blocks` runs (its forward or its recomputation)."""
    return getattr(_STATE, "depth", 0) > 0


@contextmanager
def _marked() -> Iterator[None]:
    _STATE.depth = getattr(_STATE, "depth", 0) + 1
    try:
        yield
    finally:
        _STATE.depth -= 1


def _run_marked(block: torch.nn.Module, *args):
    # the mark is set here, not around checkpoint(): the recomputation in backward calls this function again
    with _marked():
        return block(*args)


def block_checkpoint_func(block: torch.nn.Module, *args):
    """diffusers calls this for every block: checkpoint the marked ones, run the others plainly."""
    if getattr(block, MARK, False):
        return checkpoint(_run_marked, block, *args, use_reentrant=False)
    return block(*args)


BLOCK_KINDS = ("transformer_blocks", "single_transformer_blocks")
"""The transformer's block lists (double, then single blocks), in the order forward runs them."""


def transformer_blocks(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """(name, block) of every double then single block, in the order forward runs them."""
    out = []
    for kind in BLOCK_KINDS:
        out += [(f"{kind}.{i}", b) for i, b in enumerate(getattr(transformer, kind, []))]
    return out


def checkpoint_blocks(transformer: torch.nn.Module, every: int = 1) -> list[str]:
    """Checkpoint blocks 0, k, 2k, ... of the forward order (doubles then singles); returns their names.

    `every=1` is diffusers' own behaviour (every block); larger k stores the activations of the other blocks,
    trading memory for less recomputation.
    """
    if every < 1:
        raise ValueError(f"memory.checkpoint_every must be >= 1, got {every}")
    chosen = []
    for pos, (name, block) in enumerate(transformer_blocks(transformer)):
        setattr(block, MARK, pos % every == 0)
        if pos % every == 0:
            chosen.append(name)
    transformer.enable_gradient_checkpointing(block_checkpoint_func)
    return chosen


def run_blocks_plainly(transformer: torch.nn.Module) -> None:
    """Unmark every block: `block_checkpoint_func` then calls them without torch.utils.checkpoint (their compiled
    graphs recompute in backward instead, `fluxlora.perf.speed`). diffusers' checkpointing switch stays on."""
    for _, block in transformer_blocks(transformer):
        setattr(block, MARK, False)
    transformer.enable_gradient_checkpointing(block_checkpoint_func)  # also where diffusers' own func was set


def recompute_kind(transformer: torch.nn.Module) -> str:
    """How checkpointed blocks recompute: `graph` (inside their compiled backward, `run_blocks_plainly`), `torch`
    (torch.utils.checkpoint) or `none` (checkpointing off). Benchmarks report it per run."""
    if not getattr(transformer, "gradient_checkpointing", False):  # diffusers' own switch
        return "none"
    return "torch" if any(getattr(b, MARK, False) for _, b in transformer_blocks(transformer)) else "graph"
