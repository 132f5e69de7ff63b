"""Gradient checkpointing of every k-th block: the chosen blocks, the same grads as without, and the mark that
tells block swapping a block runs under a checkpoint."""

from __future__ import annotations

import pytest
import torch

from fluxlora.perf.checkpointing import checkpoint_blocks, inside_checkpoint, recompute_kind, run_blocks_plainly
from fluxlora.perf.memory import MemorySettings
from helpers.memory_helpers import assert_same, module_for, small_flux, train_steps


@pytest.mark.parametrize("every,expected", [
    (1, ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.2", "single_transformer_blocks.0",
         "single_transformer_blocks.1", "single_transformer_blocks.2", "single_transformer_blocks.3"]),
    (2, ["transformer_blocks.0", "transformer_blocks.2", "single_transformer_blocks.1", "single_transformer_blocks.3"]),
    (3, ["transformer_blocks.0", "single_transformer_blocks.0", "single_transformer_blocks.3"]),
])
def test_every_kth_block_in_forward_order(every, expected):
    assert checkpoint_blocks(small_flux(), every) == expected


@pytest.mark.parametrize("every", [1, 2, 3])
def test_checkpointing_every_k_gives_the_same_training(every):
    plain = train_steps(module_for(MemorySettings()), steps=1)
    ckpt = train_steps(module_for(MemorySettings(gradient_checkpointing=True, checkpoint_every=every)), steps=1)
    assert_same(plain, ckpt)


def test_checkpointed_blocks_run_marked_in_forward_and_recomputation():
    module = module_for(MemorySettings(gradient_checkpointing=True, checkpoint_every=2))
    seen: dict[str, list[bool]] = {}
    for name, block in module.transformer.named_modules():
        if name.count(".") == 1 and "blocks." in name:
            block.register_forward_pre_hook(lambda m, a, name=name: seen.setdefault(name, []).append(inside_checkpoint()))
    train_steps(module, steps=1)
    assert seen["transformer_blocks.0"] == [True, True]  # forward, then recomputed in backward
    assert seen["transformer_blocks.1"] == [False]  # stored activations: runs once
    assert not inside_checkpoint()


def test_checkpoint_every_must_be_positive():
    with pytest.raises(ValueError, match="checkpoint_every"):
        checkpoint_blocks(torch.nn.Module(), 0)


def test_recompute_kind_reports_how_checkpointed_blocks_recompute():
    assert recompute_kind(module_for(MemorySettings()).transformer) == "none"
    transformer = module_for(MemorySettings(gradient_checkpointing=True)).transformer
    assert recompute_kind(transformer) == "torch"
    run_blocks_plainly(transformer)  # what speed.recompute_in_graph does before compiling
    assert recompute_kind(transformer) == "graph"
