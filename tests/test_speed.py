"""Correctness guard for speed knobs: the optimized path's loss curve matches the plain path's."""

import pytest
import torch

from fluxlora.flow import FlowConfig
from fluxlora.lora import LoraSettings
from fluxlora.models import tiny
from fluxlora.module import FluxLoRAModule
from fluxlora.speed import SpeedSettings, apply_speed_settings
from memory_helpers import OPTIM, train_steps


def _loss_curve(speed: SpeedSettings, steps: int = 4) -> list[float]:
    transformer = tiny.build()["transformer"]
    module = FluxLoRAModule(transformer, LoraSettings(rank=4, alpha=4), FlowConfig(), OPTIM, total_steps=steps)
    apply_speed_settings(transformer, speed)
    return train_steps(module, steps)["losses"]


BF16_EPS = 2**-8  # the tolerance a bf16 run has anyway


@pytest.mark.slow
def test_compiled_blocks_follow_the_eager_loss_curve():
    torch._dynamo.reset()
    plain = _loss_curve(SpeedSettings())
    compiled = _loss_curve(SpeedSettings(compile_blocks=True, compile_scope="blocks"))
    # fp32 on the CPU; compiled kernels reorder reductions and Adam amplifies that a little each step
    assert compiled == pytest.approx(plain, rel=BF16_EPS)
    assert plain[-1] != plain[0]  # the LoRA trained: the comparison covers updated weights


def test_bad_settings_are_rejected_and_auto_compiles_on_cuda_only():
    with pytest.raises(ValueError, match="compile_scope"):
        SpeedSettings(compile_blocks=True, compile_scope="layers")
    with pytest.raises(ValueError, match="compile_blocks"):
        SpeedSettings(compile_blocks="yes")
    with pytest.raises(ValueError, match="cannot both"):
        SpeedSettings(compile_blocks=True, compile_mode="max-autotune", compile_options={"cpp_wrapper": True})
    auto = SpeedSettings(compile_blocks="auto")
    assert auto.compiles("cuda") and not auto.compiles("cpu") and SpeedSettings(compile_blocks=True).compiles("cpu")
    assert not auto.compiles("cuda", "nf4") and auto.compiles("cuda", "fp8")
    transformer = tiny.build()["transformer"]
    apply_speed_settings(transformer, auto, device="cpu")
    assert not hasattr(transformer.transformer_blocks[0].forward, "_torchdynamo_orig_callable")


def test_run_config_applies_compile_blocks(make_cfg):
    from fluxlora.train import build_module

    cfg = make_cfg("speed.compile_blocks=true")
    transformer = tiny.build()["transformer"]
    build_module(cfg, transformer, torch.device("cpu"), torch.float32, steps=2)
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks)  # compiled lazily, at the first step


def test_whole_model_compile_with_block_swap_is_refused(make_cfg, monkeypatch):
    from fluxlora import train as train_mod
    from fluxlora.errors import FluxLoraError

    monkeypatch.setattr(train_mod, "enable_block_swap", lambda *a, **k: object())  # as on a GPU with swapping on
    cfg = make_cfg("speed.compile_blocks=true", "speed.compile_scope=model")
    with pytest.raises(FluxLoraError, match="compile_scope=model cannot trace block swapping"):
        train_mod.build_module(cfg, tiny.build()["transformer"], torch.device("cpu"), torch.float32, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("gc_on", [True, False])
def test_compiled_blocks_with_block_swap_train_as_eager_and_compile_once_per_block_kind(gc_on):
    """Swap hooks stay eager around the compiled forwards; swapped-in weights are new tensors every step and must
    not recompile (the CPU stands in for the GPU with the host transfer backend)."""
    from torch._dynamo.utils import counters

    from fluxlora.blockswap import BlockSwapper
    from fluxlora.memory import MemorySettings
    from fluxlora.swap_transfer import HostTransfers
    from memory_helpers import module_for

    mem = MemorySettings(base_storage="fp8", gradient_checkpointing=gc_on)
    plain = train_steps(module_for(mem, "single"), steps=3)
    torch._dynamo.reset()
    counters.clear()
    module = module_for(mem, "single")
    swapper = BlockSwapper(module.transformer, [0, 2, 3, 5], HostTransfers())
    apply_speed_settings(module.transformer, SpeedSettings(compile_blocks=True), swapping=True)
    compiled = train_steps(module, steps=3)
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=BF16_EPS)
    for n, w in plain["weights"].items():
        torch.testing.assert_close(compiled["weights"][n], w, rtol=BF16_EPS, atol=1e-5)
    assert swapper.stats["loads"] >= 3 * 4
    # one graph per block kind and per input signature (inputs with / without grad), not one per block or step
    assert counters["stats"]["unique_graphs"] <= 6, dict(counters["stats"])
