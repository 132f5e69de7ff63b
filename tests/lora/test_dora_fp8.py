"""DoRA over fp8 storage (every tier stores the base in fp8): peft takes the norm of W + ΔW from `Fp8Linear.
dequantize()`, so DoRA trains exactly as over a float base holding the same (fp8-rounded) weights."""

from __future__ import annotations

import torch

from fluxlora.lora.inject import LoraSettings
from fluxlora.perf.fp8 import FP8, Fp8Linear, fp8_linear_names
from fluxlora.perf.memory import MemorySettings, apply_memory_settings
from fluxlora.perf.state import PerfState
from fluxlora.training.flow import FlowConfig
from fluxlora.training.module import FluxLoRAModule
from helpers.memory_helpers import OPTIM, small_flux, train_steps


def _dora_module(fp8: bool) -> FluxLoRAModule:
    transformer = small_flux(0)
    if fp8:
        perf = PerfState(checkpoint_every=apply_memory_settings(transformer, MemorySettings("fp8"), torch.float32))
        assert all(isinstance(transformer.get_submodule(n), Fp8Linear) for n in fp8_linear_names(transformer))
    else:  # the same values fp8 storage holds, in float32 Linears
        perf = PerfState()
        with torch.no_grad():
            for name in fp8_linear_names(transformer):
                w = transformer.get_submodule(name).weight
                w.copy_(w.to(FP8).float())
    torch.manual_seed(1)  # LoRA init draws from the global RNG
    return FluxLoRAModule(transformer, LoraSettings(type="dora", rank=4, alpha=4), FlowConfig(), OPTIM,
                          total_steps=4, compute_dtype=torch.float32, perf=perf)


def test_dora_over_fp8_storage_trains_as_over_the_same_weights_in_float():
    fp8, ref = _dora_module(True), _dora_module(False)
    magnitudes = {n: p for n, p in fp8.transformer.named_parameters() if "lora_magnitude_vector" in n}
    ref_magnitudes = dict(ref.transformer.named_parameters())
    assert magnitudes  # DoRA's magnitude, initialised from the norm of the fp8 weight
    for n, p in magnitudes.items():
        torch.testing.assert_close(p, ref_magnitudes[n], rtol=1e-6, atol=1e-7)
    a, b = train_steps(fp8, steps=2), train_steps(ref, steps=2)
    torch.testing.assert_close(torch.tensor(a["losses"]), torch.tensor(b["losses"]), rtol=1e-5, atol=1e-7)
    assert a["grads"].keys() == b["grads"].keys() and any("magnitude" in n for n in a["grads"])
    for n in a["grads"]:
        torch.testing.assert_close(a["grads"][n], b["grads"][n], rtol=1e-4, atol=1e-6)
    # the base stayed fp8: no float copy of a weight was kept
    bases = [m for m in fp8.transformer.modules() if isinstance(m, Fp8Linear)]
    assert len(bases) == len(fp8_linear_names(small_flux(0))) and all(m.weight.dtype == FP8 for m in bases)


def _single_block_graphs(storage: str, kind: str) -> tuple[int, int]:
    """(graphs, graph breaks) torch.compile makes of a tiny single block in training with `kind` adapters."""
    import torch._dynamo

    from fluxlora.lora.inject import inject
    from fluxlora.models import tiny

    t = tiny.build()["transformer"]
    apply_memory_settings(t, MemorySettings(storage), torch.float32)
    inject(t, LoraSettings(type=kind, rank=4, alpha=4))
    t.train()
    width = t.config.num_attention_heads * t.config.attention_head_dim
    rot = (torch.randn(32, t.config.attention_head_dim), torch.randn(32, t.config.attention_head_dim))
    torch._dynamo.reset()
    e = torch._dynamo.explain(t.single_transformer_blocks[0].forward)(
        torch.randn(1, 24, width), torch.randn(1, 8, width), torch.randn(1, width), image_rotary_emb=rot)
    torch._dynamo.reset()
    return e.graph_count, e.graph_break_count


def test_dora_blocks_compile_as_one_graph_over_float_and_fp8_bases():
    """peft's generic weight read (`str.startswith` on the weight's module) breaks the graph at every DoRA layer;
    each fragment would keep its inputs and undo the checkpointing inside compiled blocks."""
    assert _single_block_graphs("none", "lora") == (1, 0)
    assert _single_block_graphs("none", "dora") == (1, 0)
    assert _single_block_graphs("fp8", "dora") == (1, 0)


def test_the_float_base_under_dora_hands_peft_its_weight_unchanged():
    from peft.utils.integrations import dequantize_module_weight

    from fluxlora.lora.dora_base import DoraBaseLinear
    from fluxlora.lora.inject import inject

    t = small_flux(0)
    before = {n: p.detach().clone() for n, p in t.named_parameters()}
    inject(t, LoraSettings(type="dora", rank=4, alpha=4))
    bases = [m.base_layer for m in t.modules() if isinstance(getattr(m, "base_layer", None), DoraBaseLinear)]
    assert len(bases) == len(fp8_linear_names(small_flux(0)))
    assert all(dequantize_module_weight(b) is b.weight for b in bases)
    after = {n.replace(".base_layer", ""): p for n, p in t.named_parameters() if "lora_" not in n}
    assert after.keys() == before.keys() and all(torch.equal(after[n], before[n]) for n in before)
