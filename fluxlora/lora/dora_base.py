"""The float base Linears under DoRA layers, readable by torch.compile.

peft 0.21's DoRA takes the norm of W + ΔW from `peft.utils.integrations.dequantize_module_weight`, whose generic path
reads `type(module.weight).__module__.startswith("torchao.")`: torch.compile cannot trace `str.startswith` there,
so a compiled block breaks its graph at every DoRA layer (16 breaks in the tiny model's single block, measured with
`torch._dynamo.explain`), and each fragment keeps its own inputs, which undoes the checkpointing inside compiled
blocks (the cause of the LoKr run's out-of-memory on the H200; see `fluxlora.lora.lycoris_layers`). The path for a
quantized weight (HQQ's `W_q` and `dequantize()`, checked first) traces; `Fp8Linear` already offers it, and a float
base gets it here, returning its weight unchanged.
"""

from __future__ import annotations

import torch


class DoraBaseLinear(torch.nn.Linear):
    """An `nn.Linear` under a DoRA layer that hands peft its weight as is, through the names peft checks first."""

    @property
    def W_q(self) -> torch.Tensor:  # noqa: N802 (peft's name)
        return self.weight

    def dequantize(self) -> torch.Tensor:
        return self.weight


def traceable_dora_bases(model: torch.nn.Module) -> int:
    """Give the plain `nn.Linear` base of every DoRA layer in `model` the `DoraBaseLinear` class (in place, like
    `fluxlora.perf.fp8.store_fp8`: same parameters and names); returns how many were switched."""
    n = 0
    for module in model.modules():
        dora = getattr(module, "use_dora", None)
        base = getattr(module, "base_layer", None)
        if isinstance(dora, dict) and any(dora.values()) and type(base) is torch.nn.Linear:
            base.__class__ = DoraBaseLinear
            n += 1
    return n
