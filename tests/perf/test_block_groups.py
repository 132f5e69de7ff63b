"""speed.blocks_per_graph: consecutive blocks as one compiled region train as the per-block regions do, share their
graphs between groups of a size, leave the module tree as it was, and come apart for sampling."""

import pytest
import torch

from fluxlora.errors import FluxLoraError
from fluxlora.perf.block_groups import HandedOn, group_sizes
from fluxlora.perf.speed import SpeedSettings, apply_speed_settings, eager_blocks, plan
from helpers.memory_helpers import batch, module_for, train_steps

BF16 = 2**-8  # the tolerance a bf16 run has anyway (compiled kernels reorder fp32 reductions on the CPU)


def test_groups_are_as_few_and_as_even_as_the_size_allows():
    assert group_sizes(19, 4) == [4, 4, 4, 4, 3]  # FLUX.1's double blocks: two graph sizes, not five
    assert group_sizes(38, 4) == [4] * 8 + [3] * 2
    assert group_sizes(19, 1) == [1] * 19 and group_sizes(5, 8) == [5] and group_sizes(0, 3) == []
    assert all(sum(group_sizes(n, k)) == n for n in range(1, 40) for k in range(1, 9))


def test_bad_values_and_combinations_are_refused_in_one_line():
    for bad in (0, True, "2", 1.5):
        with pytest.raises(ValueError, match="blocks_per_graph"):
            SpeedSettings(blocks_per_graph=bad)
    with pytest.raises(ValueError, match="compile_scope=model"):
        SpeedSettings(blocks_per_graph=2, compile_scope="model")
    grouped = SpeedSettings(compile_blocks=True, blocks_per_graph=2)
    for kwargs in ({"swapping": True}, {"checkpoint_every": 1}):
        with pytest.raises(ValueError, match="blocks_to_swap=0 and memory.gradient_checkpointing=false"):
            plan(grouped, "cpu", **kwargs)
    assert plan(grouped, "cpu").compile


def test_chroma_and_tier_runs_are_refused_before_loading(make_cfg):
    from fluxlora.run.settings import check_config

    with pytest.raises(FluxLoraError, match="blocks_per_graph=3 groups FLUX.1's blocks only"):
        check_config(make_cfg("model=tiny-chroma", "speed.blocks_per_graph=3"))
    check_config(make_cfg("speed.blocks_per_graph=3"))
    # a tier checkpoints every block (and swaps on a GPU): refused before loading on any device
    with pytest.raises(FluxLoraError, match="blocks_to_swap=0 and memory.gradient_checkpointing=false"):
        check_config(make_cfg("+vram=16gb", "speed.blocks_per_graph=3"))


def _keys(module) -> list[str]:
    return list(module.state_dict())


@pytest.mark.slow
def test_grouped_regions_train_as_plain_blocks_and_share_their_graphs():
    from torch._dynamo.utils import counters

    layers = (4, 3)  # doubles in groups of 2 + 2, singles 2 + 1
    plain = train_steps(module_for(layers=layers), steps=2)
    per_block = module_for(layers=layers)
    apply_speed_settings(per_block.transformer, SpeedSettings(compile_blocks=True))
    per_block = train_steps(per_block, steps=2)
    torch._dynamo.reset()
    counters.clear()
    module = module_for(layers=layers)
    keys = _keys(module)
    apply_speed_settings(module.transformer, SpeedSettings(compile_blocks=True, blocks_per_graph=2))
    t = module.transformer
    handed_on = [b for b in [*t.transformer_blocks, *t.single_transformer_blocks]
                 if isinstance(b.__dict__.get("forward"), HandedOn)]
    assert len(handed_on) == 2 + 1  # the second of each pair
    assert _keys(module) == keys  # the groups are not children: state dict, LoRA names and checkpoints unchanged
    grouped = train_steps(module, steps=2)
    assert grouped["losses"] == pytest.approx(plain["losses"], rel=BF16)
    assert plain["losses"][-1] != plain["losses"][0]  # the LoRA trained: the comparison covers updated weights
    # the same kernels as one region per block: the same numbers, bit for bit (against eager, Adam's first steps
    # turn the compiled kernels' reordered sums into ~1e-4 on a weight near zero, per block or grouped alike)
    assert grouped["losses"] == per_block["losses"]
    for n, w in per_block["weights"].items():
        torch.testing.assert_close(grouped["weights"][n], w, rtol=0, atol=0)
    # one graph for the double pairs, one each for the single pair and the single left over: groups of a size share
    assert counters["stats"]["unique_graphs"] == 3, dict(counters["stats"])

    # sampling between steps runs every block uncompiled, then the groups come back
    x = batch(7, n=1)
    with torch.no_grad(), eager_blocks(t):
        assert not any("forward" in b.__dict__ for b in [*t.transformer_blocks, *t.single_transformer_blocks])
        torch.manual_seed(3)
        eager = module.flow_loss(x)
    torch.manual_seed(3)
    with torch.no_grad():
        again = module.flow_loss(x)
    assert again.item() == pytest.approx(eager.item(), rel=BF16)
    assert sum(isinstance(b.__dict__.get("forward"), HandedOn) for b in t.single_transformer_blocks) == 1
