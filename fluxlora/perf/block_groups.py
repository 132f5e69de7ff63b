"""Consecutive blocks compiled as one region (`speed.blocks_per_graph`): fewer compiled calls per step.

Why by hand: regional compile makes each block a region, and every region costs the host a fixed time per call.
On the H200 at 512 px (`bench/speed.py --profile`, 2026-12-02) a step's kernels took 0.113 s and its host 0.149 s;
~19 ms of that were 114 CUDA-graph launches, ~10 ms dynamo's guard checks (57 calls) and ~17 ms AOTAutograd's
wrappers (114 calls), all per region. The whole model as one graph (`speed.compile_scope=model`) has none of them
but did not finish compiling in 4.5 minutes (H100). k blocks per region divide those costs by k, and the groups of
a kind still share their graphs (every group's forward is the same code), so a kind compiles at most two graphs per
shape: groups are as even as they can be, and their sizes differ by at most one.

The transformer's modules stay as they are (state-dict keys, LoRA names, hooks): the first block of each group runs
the group's blocks through their class `forward` inside one compiled call, and the other blocks of the group hand
their inputs on. `fluxlora.perf.speed.eager_blocks` and `uncompiled` undo both, as they undo per-block compiling.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from fluxlora.perf.checkpointing import BLOCK_KINDS


def group_sizes(n: int, k: int) -> list[int]:
    """Sizes of the groups `n` blocks form at up to `k` per group: as few groups as `k` allows, as even as can be."""
    if n <= 0:
        return []
    groups = -(-n // k)
    base, extra = divmod(n, groups)
    return [base + 1] * extra + [base] * (groups - extra)


class BlockGroup(torch.nn.Module):
    """Runs its blocks in order: one compiled region. It is not a child of the transformer, whose modules, keys and
    hooks stay as they were; only the first block's hooks run around the group (its pre-hooks see the group's
    inputs, which is what `fluxlora.perf.block_inputs` needs of the first block of a kind)."""

    def __init__(self, blocks: list[torch.nn.Module]) -> None:
        super().__init__()
        kinds = {type(b) for b in blocks}
        if len(kinds) != 1:
            raise ValueError(f"a group of blocks is of one kind, not of {sorted(k.__name__ for k in kinds)}")
        self.blocks = torch.nn.ModuleList(blocks)
        # the class's forward, held as a plain function: each block's own attribute may be the group's call, and
        # dynamo cannot trace `type(block).forward` (a graph break, which sent the whole group back to eager)
        self.block_forward = kinds.pop().forward

    def forward(self, hidden_states, encoder_hidden_states, temb, image_rotary_emb, joint_attention_kwargs=None):
        for block in self.blocks:
            encoder_hidden_states, hidden_states = self.block_forward(
                block, hidden_states=hidden_states, encoder_hidden_states=encoder_hidden_states, temb=temb,
                image_rotary_emb=image_rotary_emb, joint_attention_kwargs=joint_attention_kwargs)
        return encoder_hidden_states, hidden_states


class HandedOn:
    """The `forward` of a block that its group's first block has already run: its inputs go on unchanged."""

    def __call__(self, hidden_states, encoder_hidden_states, temb=None, image_rotary_emb=None,
                 joint_attention_kwargs=None):
        return encoder_hidden_states, hidden_states


HANDED_ON = HandedOn()


def group_blocks(transformer: torch.nn.Module, k: int, compile_fn: Callable) -> int:
    """Put each kind's blocks in groups of up to `k` and install `compile_fn(group.forward)` on each group's first
    block; returns how many regions were compiled. A transformer other than FLUX.1's is refused: Chroma's blocks,
    for one, each get their own slice of the modulation."""
    if type(transformer).__name__ not in ("FluxTransformer2DModel",):
        raise ValueError(f"speed.blocks_per_graph={k} groups FLUX.1's blocks only, not {type(transformer).__name__}'s;"
                         " set speed.blocks_per_graph=1")
    regions = 0
    # in FLUX.1 every block of a list takes the same keyword arguments and returns (encoder_hidden_states,
    # hidden_states), which a group passes from block to block
    for kind in BLOCK_KINDS:
        blocks = list(getattr(transformer, kind, []))
        start = 0
        for size in group_sizes(len(blocks), k):
            members = blocks[start:start + size]
            start += size
            members[0].forward = compile_fn(BlockGroup(members).forward)
            for block in members[1:]:
                block.forward = HANDED_ON
            regions += 1
    return regions
