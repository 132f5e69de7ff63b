"""transformers' Adafactor, stepped in batches: one set of kernels per parameter shape instead of per parameter.

Why: transformers' `Adafactor.step` loops over parameters in Python, ~25 kernel launches each. A LoRA on Flux has
hundreds of small parameters, so that loop cost ~0.2 s per step on the H100 (cProfile of the 12gb tier), more than
the LoRA's own compute. LoRA parameters come in a handful of shapes: stacking each shape's gradients and second
moments makes the same arithmetic a few dozen launches. torch's own `torch.optim.Adafactor` is not a substitute:
it scales each step by the parameter's RMS and caps it at 1/sqrt(t) (transformers' `scale_parameter` and
`relative_step`), which FluxGym's settings switch off.
"""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from transformers.optimization import Adafactor


class BatchedAdafactor(Adafactor):
    """`transformers.optimization.Adafactor` with the settings FluxGym trains with (fixed learning rate:
    `relative_step`, `scale_parameter` and `warmup_init` off; no first moment, `beta1=None`), computing the same
    update for all parameters of one shape at once. Other settings fall back to transformers' own step. The state
    keeps transformers' keys, so checkpoints load into either class.
    """

    def __init__(self, params, lr: float, **kwargs) -> None:
        kwargs = {"relative_step": False, "scale_parameter": False, "warmup_init": False, **kwargs}
        super().__init__(params, lr=lr, **kwargs)

    def _batched(self, group: dict) -> bool:
        return not (group["relative_step"] or group["scale_parameter"] or group["warmup_init"]
                    or group["beta1"] is not None)

    @torch.no_grad()
    def step(self, closure=None):
        if not all(self._batched(g) for g in self.param_groups):
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            buckets: dict[tuple, list[torch.Tensor]] = defaultdict(list)
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("Adafactor does not support sparse gradients.")
                state = self.state[p]
                if not state:
                    self._init_state(p, state)
                state["step"] += 1
                buckets[(tuple(p.shape), p.dtype, p.device, state["step"])].append(p)
            for (shape, _, _, step), params in buckets.items():
                self._step_bucket(group, params, len(shape) >= 2, step)
        return loss

    @staticmethod
    def _init_state(p: torch.Tensor, state: dict) -> None:
        shape = p.shape
        state["step"] = 0
        if len(shape) >= 2:
            state["exp_avg_sq_row"] = torch.zeros(shape[:-1], dtype=torch.float32, device=p.device)
            state["exp_avg_sq_col"] = torch.zeros(shape[:-2] + shape[-1:], dtype=torch.float32, device=p.device)
        else:
            state["exp_avg_sq"] = torch.zeros(shape, dtype=torch.float32, device=p.device)
        state["RMS"] = 0

    def _step_bucket(self, group: dict, params: list[torch.Tensor], factored: bool, step: int) -> None:
        """transformers' per-parameter update, with a leading batch dimension over `params` (same shape)."""
        states = [self.state[p] for p in params]
        grads = torch.stack([p.grad for p in params]).float()
        beta2t = 1.0 - math.pow(step, group["decay_rate"])
        update = grads.square().add_(group["eps"][0])
        if factored:
            row = torch.stack([s["exp_avg_sq_row"] for s in states])
            col = torch.stack([s["exp_avg_sq_col"] for s in states])
            row.mul_(beta2t).add_(update.mean(dim=-1), alpha=1.0 - beta2t)
            col.mul_(beta2t).add_(update.mean(dim=-2), alpha=1.0 - beta2t)
            torch._foreach_copy_([s["exp_avg_sq_row"] for s in states], list(row.unbind(0)))
            torch._foreach_copy_([s["exp_avg_sq_col"] for s in states], list(col.unbind(0)))
            update = self._approx_sq_grad(row, col).mul_(grads)
        else:
            sq = torch.stack([s["exp_avg_sq"] for s in states])
            sq.mul_(beta2t).add_(update, alpha=1.0 - beta2t)
            torch._foreach_copy_([s["exp_avg_sq"] for s in states], list(sq.unbind(0)))
            update = sq.rsqrt().mul_(grads)
        dims = tuple(range(1, update.ndim))
        rms = update.square().mean(dim=dims, keepdim=True).sqrt_()
        update.div_((rms / group["clip_threshold"]).clamp_(min=1.0)).mul_(group["lr"])
        master = [p if p.dtype == torch.float32 else p.float() for p in params]
        if group["weight_decay"] != 0:
            torch._foreach_add_(master, master, alpha=-group["weight_decay"] * group["lr"])
        torch._foreach_sub_(master, list(update.unbind(0)))
        for p, m in zip(params, master):
            if m is not p:
                p.copy_(m)
