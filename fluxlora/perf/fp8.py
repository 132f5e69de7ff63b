"""fp8 storage of the frozen base: every Linear inside the transformer blocks keeps its weight in float8_e4m3fn and
upcasts it for each matmul.

Why not diffusers' layerwise casting: its hooks skip every module whose name holds "norm", which in Flux includes
the AdaLN modulation Linears (`norm1.linear`, ~3.2 B of the 11.9 B parameters), so ~3 GiB more stays in bf16; its
in-place `module.to()` per call cannot be traced by `torch.compile`; and autograd keeps the upcast bf16 weight of
every layer that backward visits. Here the cast happens inside one autograd function that saves the fp8 weight, so
backward recasts it (1 byte per weight held) and block swapping recognises the saved tensor as the swapped weight.
Biases, norms, embedders and the final projection stay in the compute dtype: they are small.

With `fp8_matmul` the matmuls themselves run in fp8 (`torch._scaled_mm`, the fp8 tensor cores of Ada and Hopper GPUs,
twice the bf16 rate): activations in forward and gradients in backward are scaled per row into float8_e4m3fn, the
weight is used as stored.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from fluxlora.perf.checkpointing import transformer_blocks

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = torch.finfo(FP8).max


def _rows_fp8(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`t` (rows × k) as float8_e4m3fn with one float32 scale per row: t ≈ q * scale."""
    scale = t.abs().amax(dim=1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (t.float() / scale).to(FP8), scale


def _fp8_mm(a: torch.Tensor, b_fp8: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """`a @ b` on the fp8 tensor cores: `a` (… × k, any float dtype) scaled per row, `b_fp8` (k × n, fp8,
    column-major as `_scaled_mm` needs) used as stored."""
    a2 = a.reshape(-1, a.shape[-1])
    q, scale = _rows_fp8(a2)
    ones = torch.ones(1, b_fp8.shape[1], device=a.device, dtype=torch.float32)
    out = torch._scaled_mm(q, b_fp8, scale_a=scale, scale_b=ones, out_dtype=out_dtype)
    return out.reshape(*a.shape[:-1], b_fp8.shape[1])


class _Fp8Matmul(torch.autograd.Function):
    """`x @ weight.T + bias` with `weight` stored in fp8; backward returns the input's gradient only (the base is
    frozen) and recasts the weight instead of keeping the upcast copy."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype,
                fp8_matmul: bool = False):
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.x_dtype, ctx.fp8_matmul = dtype, x.dtype, fp8_matmul
        if not fp8_matmul:
            return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))
        out = _fp8_mm(x, weight.t(), dtype)  # weight (n × k, row-major): its transpose is column-major
        return out if bias is None else out + bias.to(dtype)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        if not ctx.needs_input_grad[0]:
            return None, None, None, None, None
        (weight,) = ctx.saved_tensors
        if ctx.fp8_matmul:  # grad (… × n) @ weight (n × k): weight must be column-major, a transposed copy
            return _fp8_mm(grad, weight.t().contiguous().t(), ctx.dtype).to(ctx.x_dtype), None, None, None, None
        return (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(ctx.x_dtype), None, None, None, None


class Fp8Linear(torch.nn.Linear):
    """A frozen `nn.Linear` whose weight is float8_e4m3fn, computed in `compute_dtype` (peft wraps it like any
    Linear). Made by `store_fp8`, not constructed directly."""

    compute_dtype: torch.dtype = torch.bfloat16
    fp8_matmul: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _Fp8Matmul.apply(x, self.weight, self.bias, self.compute_dtype, self.fp8_matmul)

    # peft reads a quantized base through HQQ's names: with `W_q` present, `peft.utils.integrations.
    # dequantize_module_weight` calls `dequantize()` (DoRA takes the norm of W + ΔW from it, which a float8 weight
    # cannot take part in: torch does not promote float8) and the adapter's device comes from `W_q`.
    @property
    def W_q(self) -> torch.Tensor:  # noqa: N802 (peft's name)
        return self.weight

    def dequantize(self) -> torch.Tensor:
        """The stored weight in the compute dtype (exact: every float8_e4m3fn value is a bf16/fp32 value)."""
        return self.weight.to(self.compute_dtype)

    def _apply(self, fn, recurse: bool = True):
        """Keep the weight in fp8 through `module.to(dtype)`: Lightning's `bf16-true` precision casts the whole
        model (fp8 counts as floating point), which would silently double the base's memory. fp8 -> bf16 -> fp8 is
        exact, and only one layer's weight is upcast at a time. A swapped-out weight (None) is left alone."""
        super()._apply(fn, recurse)
        if self.weight is not None and self.weight.dtype != FP8:
            self.weight.data = self.weight.data.to(FP8)
        return self


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


def store_fp8(transformer: torch.nn.Module, compute_dtype: torch.dtype, fp8_matmul: bool = False) -> int:
    """Convert the blocks' Linears to `Fp8Linear` in place (call before LoRA layers are added); returns how many.
    `fp8_matmul`: multiply in fp8 (`torch._scaled_mm`) instead of upcasting the weight to `compute_dtype`."""
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
        m.fp8_matmul = fp8_matmul
    log.info("base transformer: %d block Linears stored in float8_e4m3fn, multiplied in %s", len(names),
             "float8 (torch._scaled_mm)" if fp8_matmul else compute_dtype)
    return len(names)
