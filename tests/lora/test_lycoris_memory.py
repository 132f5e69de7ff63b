"""LoKr/LoHa layers (fluxlora.lora.lycoris_layers): peft's math, LoRA-sized memory, no graph breaks.

A full-size FLUX.1-dev LoKr run under the 24gb tier ran out of memory in its first step on the H200: peft's LoKr and
LoHa layers break the compiled block graph at every adapted Linear (a `torch.rand(1) > module_dropout` branch), so
the checkpointing inside the compiled blocks kept every block's activations, and they build the full out × in ΔW in
float32 for every call (226 MB for a Flux modulation Linear, 18432 × 3072). Everything here runs on CPU.
"""

from __future__ import annotations

import copy
import weakref

import pytest
import torch
from peft import get_peft_model, inject_adapter_in_model
from peft.tuners.loha.layer import Linear as PeftLoHaLinear
from peft.tuners.lokr.layer import Linear as PeftLoKrLinear
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from fluxlora.lora.adapters import peft_config
from fluxlora.lora.inject import LoraSettings, inject, lora_layers
from fluxlora.lora.lycoris_layers import LoHaLinear, LoKrLinear, use_activation_forward
from fluxlora.models import tiny

FLUX_WIDTH, FLUX_MOD = 3072, 6 * 3072  # a double block's modulation Linear: Flux's largest (18432 × 3072)


def _adapted_linear(kind: str, d_in: int, d_out: int, rank: int = 16, alpha: float = 16.0, factor: int = -1,
                    both: bool = False, seed: int = 0) -> torch.nn.Module:
    """One Linear with fluxlora's peft config for `kind` (peft's own layer class), adapter moved off its zero init."""
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out))
    model = get_peft_model(model, peft_config(kind, ["0"], dict(r=rank, lora_alpha=alpha), 0.0, factor,
                                              both)).base_model.model
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def _delta_and_grads(model: torch.nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The adapter's contribution to the output, and the adapter parameters' gradients of a fixed loss."""
    layer = model[0]
    out = model(x)
    delta = out - layer.base_layer(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return delta.detach(), grads


@pytest.mark.parametrize("kind,shape,factor,both,rank", [
    ("lokr", (FLUX_WIDTH, FLUX_MOD), -1, False, 16),      # 3072 = 48·64, 18432 = 128·144
    ("lokr", (4 * FLUX_WIDTH, FLUX_WIDTH), -1, False, 16),  # an MLP down-projection
    ("lokr", (96, 40), 8, False, 4),
    ("lokr", (96, 40), -1, True, 2),                       # decompose_both: w1 as w1_a @ w1_b
    ("lokr", (35, 77), -1, False, 64),                     # full w2 (rank above half its sides)
    ("loha", (FLUX_WIDTH, FLUX_MOD), -1, False, 16),      # the rank-256 product
    ("loha", (96, 40), -1, False, 4),                      # small: peft's ΔW path
])
def test_forward_and_gradients_match_peft(kind, shape, factor, both, rank):
    """fluxlora's layer gives peft's output and gradients within 1e-5 in float32 (train mode: no module dropout)."""
    reference = _adapted_linear(kind, *shape, rank=rank, factor=factor, both=both).train()
    ours = copy.deepcopy(reference)
    assert use_activation_forward(ours) == 1
    assert type(ours[0]) is {"lokr": LoKrLinear, "loha": LoHaLinear}[kind]
    assert isinstance(ours[0], {"lokr": PeftLoKrLinear, "loha": PeftLoHaLinear}[kind])
    x = torch.randn(2, 3, shape[0], generator=torch.Generator().manual_seed(7))
    want, want_grads = _delta_and_grads(reference, x)
    got, got_grads = _delta_and_grads(ours, x)
    assert want.abs().max() > 1e-3  # the adapter does contribute
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    assert got_grads.keys() == want_grads.keys()
    for name in want_grads:
        scale = want_grads[name].abs().max().clamp(min=1.0)
        torch.testing.assert_close(got_grads[name] / scale, want_grads[name] / scale, rtol=0, atol=1e-5)
    # the tensors peft merges and files hold are the same
    torch.testing.assert_close(ours[0].get_delta_weight("default"), reference[0].get_delta_weight("default"))


class _Sizes(TorchDispatchMode):
    """The largest tensor an op produces and the peak of produced bytes alive, parameters and inputs left out."""

    def __init__(self, exclude: set[int]):
        super().__init__()
        self.exclude, self.live, self.now, self.peak, self.largest = exclude, {}, 0, 0, 0

    def _free(self, key) -> None:
        self.now -= self.live.pop(key, 0)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            s = t.untyped_storage()
            key = (s.data_ptr(), s.nbytes())
            if s.nbytes() == 0 or key in self.live or s.data_ptr() in self.exclude:
                continue
            self.live[key] = s.nbytes()
            self.now += s.nbytes()
            self.largest = max(self.largest, s.nbytes())
            weakref.finalize(s, self._free, key)
        self.peak = max(self.peak, self.now)
        return out


def _step_sizes(kind: str, d_in: int, d_out: int, tokens: int = 512) -> tuple[int, int]:
    """(largest tensor, peak live bytes) of one training forward + backward of a Linear of full Flux size with a
    fluxlora `kind` adapter (rank 16, fp32 parameters). In float32, not under bf16 autocast as bf16-mixed runs it:
    on a CPU without AVX-512 (the CI machine of 2026-12-02) torch emulates bf16 matmuls, and one 512 x 3072 x 18432
    took 283 s against 0.8 s in float32. Every adapter is measured the same way, and the bounds are ratios."""
    model = torch.nn.Sequential(torch.nn.Linear(d_in, d_out)).requires_grad_(False)
    # as fluxlora.lora.inject.add_adapters does on the transformer (diffusers' add_adapter is this peft call)
    inject_adapter_in_model(peft_config(kind, ["0"], dict(r=16, lora_alpha=16.0), 0.0, -1), model)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.data = torch.randn(p.shape) * 0.01  # fp32, off the zero init
    use_activation_forward(model)
    model.train()
    x = torch.randn(1, tokens, d_in, requires_grad=True)
    keep = {t.untyped_storage().data_ptr() for t in [x, *model.parameters()]}
    sizes = _Sizes(keep)
    with sizes:
        model(x).square().mean().backward()
    return sizes.largest, sizes.peak


@pytest.mark.parametrize("shape", [(FLUX_WIDTH, FLUX_MOD), (5 * FLUX_WIDTH, FLUX_WIDTH)],
                         ids=["modulation_3072x18432", "single_proj_out_15360x3072"])
def test_lycoris_step_of_a_full_width_linear_needs_lora_sized_memory(shape):
    """LoKr and LoHa on Flux's widest Linears stay within twice LoRA's largest tensor and peak: peft's layers made
    the full fp32 ΔW (226 MB for 18432 × 3072, 6× LoRA's largest) in forward and again in backward."""
    lora_largest, lora_peak = _step_sizes("lora", *shape)
    full_delta = shape[0] * shape[1] * 4
    assert 2 * lora_largest < full_delta / 2  # the bound below is well under one ΔW
    for kind in ("lokr", "loha"):
        largest, peak = _step_sizes(kind, *shape)
        assert largest <= 2 * lora_largest, (kind, largest, lora_largest)
        assert peak <= 2 * lora_peak, (kind, peak, lora_peak)


@pytest.mark.parametrize("kind", ["lokr", "loha"])
def test_injected_layers_trace_a_block_without_graph_breaks(kind):
    """torch.compile traces a whole tiny Flux block with LoKr/LoHa layers in train mode as one graph (peft's
    module-dropout branch broke it at every adapted Linear, and the blocks' in-graph recomputation then kept every
    fragment's inputs: all blocks' activations), as it does with LoRA."""
    transformer = tiny.build()["transformer"]
    inject(transformer, LoraSettings(type=kind, rank=4, alpha=2.0))
    transformer.train()
    block = transformer.single_transformer_blocks[0]
    width = tiny.TRANSFORMER["num_attention_heads"] * tiny.TRANSFORMER["attention_head_dim"]
    head = tiny.TRANSFORMER["attention_head_dim"]
    hidden, context, temb = torch.randn(1, 12, width), torch.randn(1, 4, width), torch.randn(1, width)
    rope = (torch.ones(16, head), torch.zeros(16, head))
    torch._dynamo.reset()
    explained = torch._dynamo.explain(block.forward)(hidden, context, temb, rope)
    assert explained.graph_break_count == 0, [r.reason for r in explained.break_reasons]
    assert explained.graph_count == 1
    assert {type(m) for m in lora_layers(transformer).values()} == {LoKrLinear if kind == "lokr" else LoHaLinear}
