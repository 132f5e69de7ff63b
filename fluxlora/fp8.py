"""fp8 storage of the frozen base: every Linear inside the transformer blocks keeps its weight in float8_e4m3fn and
upcasts it for each matmul.

Why not diffusers' layerwise casting: its hooks skip every module whose name holds "norm", which in Flux includes
the AdaLN modulation Linears (`norm1.linear`, ~3.2 B of the 11.9 B parameters), so ~3 GiB more stays in bf16; its
in-place `module.to()` per call cannot be traced by `torch.compile`; and autograd keeps the upcast bf16 weight of
every layer that backward visits. Here the cast happens inside one autograd function that saves the fp8 weight, so
backward recasts it (1 byte per weight held) and block swapping recognises the saved tensor as the swapped weight.
Biases, norms, embedders and the final projection stay in the compute dtype: they are small.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fluxlora.checkpointing import transformer_blocks

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn


class _Fp8Matmul(torch.autograd.Function):
    """`x @ weight.T + bias` with `weight` stored in fp8; backward returns the input's gradient only (the base is
    frozen) and recasts the weight instead of keeping the upcast copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None
        (weight,) = ctx.saved_tensors
        return (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(ctx.x_dtype), None, None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen `nn.Linear` whose weight is float8_e4m3fn, computed in `compute_dtype` (peft wraps it like any
    Linear). Made by `store_fp8`, not constructed directly."""

    compute_dtype: torch.dtype = torch.bfloat16

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Matmul.apply(x, self.weight, self.bias, self.compute_dtype)


def fp8_linear_names(transformer: torch.nn.Module) -> list[str]:
    """Names of the Linears `store_fp8` converts: every plain Linear inside a double or single block."""
    names = []
    for block_name, block in transformer_blocks(transformer):
        names += [f"{block_name}.{n}" for n, m in block.named_modules() if type(m) in (torch.nn.Linear, Fp8Linear)]
    return names


def fp8_stored_parameters(transformer: torch.nn.Module) -> set[str]:
    """Names of the parameters `store_fp8` keeps in float8_e4m3fn (loaders read these straight into fp8, so an fp8
    file is never upcast and a bf16 file never sits in memory at full size)."""
    return {f"{n}.weight" for n in fp8_linear_names(transformer)}


def store_fp8(transformer: torch.nn.Module, compute_dtype: torch.dtype) -> int:
    """Convert the blocks' Linears to `Fp8Linear` in place (call before LoRA layers are added); returns how many."""
    names = fp8_linear_names(transformer)
    for name in names:
        m = transformer.get_submodule(name)
        with torch.no_grad():
            if m.weight.dtype != FP8:
                m.weight.data = m.weight.data.to(FP8)
            if m.bias is not None:
                m.bias.data = m.bias.data.to(compute_dtype)
        m.__class__ = Fp8Linear
        m.compute_dtype = compute_dtype
    log.info("base transformer: %d block Linears stored in float8_e4m3fn, computed in %s", len(names), compute_dtype)
    return len(names)
