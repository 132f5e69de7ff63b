"""fp8 and NF4 storage of the frozen base: same loss and predictions as full precision within stated tolerances,
and the settings' validation. NF4 runs on the CPU with bitsandbytes >= 0.48 (checked here with 0.50)."""

from __future__ import annotations

import sys

import pytest
import torch

from fluxlora.training import flow as fm
from fluxlora.errors import FluxLoraError
from fluxlora.perf.memory import MemorySettings, apply_memory_settings
from helpers.memory_helpers import batch, module_for, small_flux

# Measured on the small Flux (fp32 compute on the CPU), relative to fp32 storage: prediction error bf16 0.6 %,
# fp8 0.9 % (every block Linear in fp8, embedders not), NF4 1.7 %; loss error fp8 <= 0.03 %, NF4 <= 0.06 % (the loss
# is dominated by the noise target); LoRA gradient error fp8 4.1 %, NF4 13 % (3 seeds). The tolerances below leave
# at least 2x room over those. fp8 with fp8 matmuls (`fp8mm`, torch._scaled_mm on the CPU): prediction 1.2 %, loss
# <= 0.04 %, LoRA gradients 5.1-5.5 % (3 seeds).
PRED_RTOL = {"bf16": 0.015, "fp8": 0.05, "fp8mm": 0.05, "nf4": 0.05}
LOSS_RTOL = 0.005
GRAD_RTOL = {"fp8": 0.12, "fp8mm": 0.12, "nf4": 0.25}


def _settings(storage: str) -> MemorySettings:
    """`fp8mm`: fp8 storage multiplied in fp8; else memory.base_storage."""
    return MemorySettings(base_storage="fp8", fp8_matmul=True) if storage == "fp8mm" else MemorySettings(storage)


def _prediction(storage: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    model = small_flux(0, dtype)
    apply_memory_settings(model, _settings(storage), dtype)
    g = torch.Generator().manual_seed(0)
    x, t5, pooled = torch.randn(2, 16, 16, generator=g), torch.randn(2, 8, 32, generator=g), torch.randn(2, 32, generator=g)
    with torch.no_grad():
        out = model(hidden_states=x.to(dtype), encoder_hidden_states=t5.to(dtype), pooled_projections=pooled.to(dtype),
                    timestep=torch.full((2,), 0.5, dtype=dtype), img_ids=fm.image_ids(8, 8, device="cpu", dtype=dtype),
                    txt_ids=torch.zeros(8, 3, dtype=dtype), guidance=torch.ones(2), return_dict=False)[0]
    return out.float()


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("storage", ["bf16", "fp8", "fp8mm", "nf4"])
def test_prediction_matches_full_precision(storage):
    ref = _prediction("none")
    got = _prediction("none", torch.bfloat16) if storage == "bf16" else _prediction(storage)
    err = _rel(got, ref)
    assert 0 < err < PRED_RTOL[storage], f"{storage}: relative prediction error {err:.4f}"


@pytest.mark.parametrize("storage", ["fp8", "fp8mm", "nf4"])
def test_loss_and_lora_grads_match_full_precision(storage):
    def step(mem):
        module = module_for(mem)
        torch.manual_seed(7)
        loss = module.flow_loss(batch(0))
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in module.transformer.parameters() if p.requires_grad])
        return loss.item(), grad

    ref_loss, ref_grad = step(MemorySettings())
    loss, grad = step(_settings(storage))
    assert loss == pytest.approx(ref_loss, rel=LOSS_RTOL)
    assert torch.isfinite(grad).all() and _rel(grad, ref_grad) < GRAD_RTOL[storage]


def test_nf4_replaces_block_linears_with_bitsandbytes_and_peft_wraps_them_as_qlora():
    import bitsandbytes as bnb
    from peft.tuners.lora.bnb import Linear4bit as LoraLinear4bit

    from fluxlora.lora.export import kohya_state_dict

    module = module_for(MemorySettings(base_storage="nf4"))
    t = module.transformer
    q = t.transformer_blocks[0].attn.to_q
    assert isinstance(q, LoraLinear4bit) and isinstance(q.base_layer, bnb.nn.Linear4bit)
    assert q.base_layer.weight.quant_type == "nf4" and q.base_layer.weight.dtype == torch.uint8
    assert type(t.x_embedder) is torch.nn.Linear and type(t.proj_out) is torch.nn.Linear  # outside blocks: kept
    plain = module_for(MemorySettings())
    assert kohya_state_dict(t).keys() == kohya_state_dict(plain.transformer).keys()


def test_nf4_without_bitsandbytes_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)
    with pytest.raises(FluxLoraError, match="pip install bitsandbytes"):
        apply_memory_settings(small_flux(), MemorySettings(base_storage="nf4"), torch.float32)


@pytest.mark.parametrize("kwargs,match", [
    ({"base_storage": "int8"}, "base_storage"), ({"checkpoint_every": 0}, "checkpoint_every"),
    ({"blocks_to_swap": -1}, "blocks_to_swap"), ({"swap_prefetch": -1}, "swap_prefetch"),
    ({"swap_timeout_s": 0}, "swap_timeout_s"), ({"blocks_to_swap": 4, "base_storage": "nf4"}, "nf4"),
    ({"fp8_matmul": True}, "fp8_matmul needs memory.base_storage=fp8"),
])
def test_settings_are_validated(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MemorySettings(**kwargs)


def test_transformer_is_read_to_the_host_when_it_must_not_land_whole_on_the_gpu():
    cuda, cpu = torch.device("cuda", 0), torch.device("cpu")
    assert MemorySettings(base_storage="fp8").load_device(cuda) == cuda
    assert MemorySettings(base_storage="fp8", blocks_to_swap=4).load_device(cuda) == cpu
    assert MemorySettings(base_storage="nf4").load_device(cuda) == cpu
    assert MemorySettings(blocks_to_swap=4).load_device(cpu) == cpu


def test_a_run_with_nf4_and_every_other_block_checkpointed_trains(make_cfg):
    from fluxlora.run.train import run

    cfg = make_cfg("trainer.max_steps=2", "~callbacks.sampler", "memory.base_storage=nf4",
                   "memory.gradient_checkpointing=true", "memory.checkpoint_every=2", "memory.blocks_to_swap=0")
    assert run(cfg) is not None


def test_fp8_covers_every_block_linear_and_autograd_keeps_only_the_fp8_weight():
    """All block Linears (the AdaLN modulation ones too) hold fp8 weights; backward recasts from them, so no bf16
    copy of a weight is saved for backward, and the input gradient matches an explicit upcast's."""
    from fluxlora.perf.fp8 import FP8, Fp8Linear

    model = small_flux(0, torch.bfloat16)
    apply_memory_settings(model, MemorySettings(base_storage="fp8"), torch.bfloat16)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    in_blocks = {n for n in linears if n.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    assert {n for n, m in linears.items() if isinstance(m, Fp8Linear)} == in_blocks
    assert "transformer_blocks.0.norm1.linear" in in_blocks and linears["x_embedder"].weight.dtype == torch.bfloat16
    layer = linears["single_transformer_blocks.0.proj_mlp"]
    assert layer.weight.dtype == FP8 and layer.bias.dtype == torch.bfloat16

    saved = []
    x = torch.randn(3, layer.in_features, dtype=torch.bfloat16, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        y = layer(x)
    assert [t.dtype for t in saved] == [FP8] and saved[0] is layer.weight
    y.sum().backward()
    x2 = x.detach().clone().requires_grad_(True)
    torch.nn.functional.linear(x2, layer.weight.to(torch.bfloat16), layer.bias).sum().backward()
    torch.testing.assert_close(y, torch.nn.functional.linear(x2, layer.weight.to(torch.bfloat16), layer.bias))
    torch.testing.assert_close(x.grad, x2.grad)


def test_fp8_matmul_multiplies_in_fp8_and_is_refused_without_fp8_tensor_cores(monkeypatch):
    from fluxlora.perf.fp8 import Fp8Linear

    calls = []
    real = torch._scaled_mm
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: calls.append(a[0].dtype) or real(*a, **k))
    module = module_for(MemorySettings(base_storage="fp8", fp8_matmul=True))
    assert all(m.fp8_matmul for m in module.transformer.modules() if isinstance(m, Fp8Linear))
    loss = module.flow_loss(batch(0))
    n = sum(isinstance(m, Fp8Linear) for m in module.transformer.modules())
    assert len(calls) == n  # every block Linear in forward
    loss.backward()
    assert len(calls) > 1.5 * n  # and in backward, wherever its input needs a gradient
    assert set(calls) == {torch.float8_e4m3fn}

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 6))  # an RTX 3090
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA GeForce RTX 3090")
    with pytest.raises(FluxLoraError, match="fp8_matmul needs fp8 tensor cores.*RTX 3090 has 8.6"):
        apply_memory_settings(small_flux(), MemorySettings(base_storage="fp8", fp8_matmul=True), torch.bfloat16,
                              torch.device("cuda", 0))


@pytest.mark.slow
def test_fp8_matmul_compiles_with_recompute_in_graph_and_trains_as_eager():
    from fluxlora.perf.speed import SpeedSettings, apply_speed_settings
    from helpers.memory_helpers import train_steps

    # one block of each kind (half the compile time on the CPU): both kinds compile fp8 matmuls forward and backward,
    # and the single block's inputs carry gradients from the double block's LoRA, so a backward into a block's inputs
    # is compiled too. More blocks only add graph variants (a double block whose inputs need gradients, a single block
    # fed another stride) that test_speed's compiled-blocks loss-curve test covers on a 2+2-block model.
    mem, layers = MemorySettings(base_storage="fp8", fp8_matmul=True, gradient_checkpointing=True), (1, 1)
    plain = train_steps(module_for(mem, layers=layers), steps=2)
    torch._dynamo.reset()
    module = module_for(mem, layers=layers)
    assert apply_speed_settings(module.transformer, SpeedSettings(compile_blocks=True),
                                module.perf.checkpoint_every).recompute_in_graph
    compiled = train_steps(module, steps=2)
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=2**-8)
    assert plain["losses"][1] != plain["losses"][0]


def test_fp8_weights_stay_fp8_when_lightning_casts_the_model_for_bf16_true():
    """Lightning's `bf16-true` calls `module.to(torch.bfloat16)`; fp8 counts as floating point, so without a guard the
    base would silently be upcast to bf16 (twice the memory, and fp8 matmuls fed a bf16 weight)."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    from fluxlora.perf.fp8 import FP8, Fp8Linear

    module = module_for(MemorySettings(base_storage="fp8"))
    layers = [m for m in module.transformer.modules() if isinstance(m, Fp8Linear)]
    before = layers[0].weight.detach().clone()
    HalfPrecision("bf16-true").convert_module(module)
    assert layers and all(m.weight.dtype == FP8 for m in layers)
    assert torch.equal(layers[0].weight.view(torch.uint8), before.view(torch.uint8))  # the round trip is exact
    lora = [p for p in module.transformer.parameters() if p.requires_grad]
    assert lora and all(p.dtype == torch.bfloat16 for p in lora)  # the rest is cast as Lightning means it to be
