"""A tiny Flux with a few more blocks (so swapped and resident blocks interleave) and a training-step harness
that returns loss, LoRA grads and LoRA weights. Used by tests/test_blockswap.py and tests/test_memory_*."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import FluxTransformer2DModel
from omegaconf import OmegaConf

from fluxlora.training.flow import FlowConfig
from fluxlora.lora.inject import LoraSettings, lora_parameters
from fluxlora.perf.memory import MemorySettings, apply_memory_settings
from fluxlora.models import tiny
from fluxlora.perf.state import PerfState
from fluxlora.training.module import FluxLoRAModule

N_DOUBLE, N_SINGLE = 3, 4  # forward order: doubles at positions 0..2, singles at 3..6
OPTIM = OmegaConf.create({"name": "adamw", "lr": 1e-2, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                          "kwargs": {}, "scheduler": "constant", "warmup_steps": 0})


def small_flux(seed: int = 0, dtype: torch.dtype = torch.float32,
               layers: tuple[int, int] = (N_DOUBLE, N_SINGLE)) -> FluxTransformer2DModel:
    """The tiny Flux with `layers` = (double, single) blocks."""
    torch.manual_seed(seed)
    cfg = dict(tiny.TRANSFORMER, num_layers=layers[0], num_single_layers=layers[1])
    model = FluxTransformer2DModel(**cfg)
    return (model if dtype == torch.float32 else model.to(dtype)).eval()


def batch(seed: int = 0, n: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(n, 4, 8, 8, generator=g), "t5": torch.randn(n, 8, 32, generator=g),
            "pooled": torch.randn(n, 32, generator=g)}


def module_for(memory: MemorySettings | None = None, train_blocks: str = "all", seed: int = 0,
               dtype: torch.dtype = torch.float32, layers: tuple[int, int] = (N_DOUBLE, N_SINGLE)) -> FluxLoRAModule:
    """The real LightningModule on the small Flux (`layers` = (double, single) blocks), memory settings applied as
    train.py applies them."""
    transformer = small_flux(seed, dtype, layers)
    perf = PerfState(checkpoint_every=apply_memory_settings(transformer, memory or MemorySettings(), dtype))
    torch.manual_seed(seed + 1)  # LoRA init draws from the global RNG
    return FluxLoRAModule(transformer, LoraSettings(rank=4, alpha=4, train_blocks=train_blocks), FlowConfig(),
                          OPTIM, total_steps=4, compute_dtype=dtype, perf=perf)


def train_steps(module: FluxLoRAModule, steps: int = 1, after_forward: Callable[[], None] | None = None) -> dict:
    """`steps` optimizer steps of flow_loss on fixed batches; losses, last grads and final LoRA weights."""
    params = lora_parameters(module.transformer)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses, grads = [], {}
    for step in range(steps):
        torch.manual_seed(100 + step)  # σ and noise draws
        loss = module.flow_loss(batch(step))
        if after_forward is not None:
            after_forward()
        loss.backward()
        grads = {n: p.grad.detach().clone() for n, p in params.items()}
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "grads": grads, "weights": {n: p.detach().clone() for n, p in params.items()}}


def assert_same(a: dict, b: dict, exact: bool = True) -> None:
    assert a["losses"] == b["losses"] if exact else torch.allclose(torch.tensor(a["losses"]), torch.tensor(b["losses"]))
    for key in ("grads", "weights"):
        assert a[key].keys() == b[key].keys()
        for n in a[key]:
            if exact:
                assert torch.equal(a[key][n], b[key][n]), f"{key} of {n} differ"
            else:
                torch.testing.assert_close(a[key][n], b[key][n], msg=f"{key} of {n} differ")
