"""Optimizers and learning-rate schedules by name, from the libraries that implement them."""

from __future__ import annotations

from typing import Any, Iterable

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """An optimizer over the LoRA parameters.

    Args:
        params: trainable parameters.
        cfg: the `optim` node: `name`, `lr`, `weight_decay`, `betas`, `eps`, `kwargs` (passed through).
    """
    params = list(params)
    name = str(cfg.name).lower()
    kwargs = dict(cfg.get("kwargs") or {})
    lr = float(cfg.lr)
    if name == "adamw":
        if "fused" not in kwargs and "foreach" not in kwargs and params and all(p.is_cuda for p in params):
            kwargs["fused"] = True  # one kernel for all LoRA tensors; foreach launches dozens per step
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), eps=float(cfg.eps),
                                 weight_decay=float(cfg.weight_decay), **kwargs)
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=lr, betas=tuple(cfg.betas), eps=float(cfg.eps),
                                   weight_decay=float(cfg.weight_decay), **kwargs)
    if name == "adafactor":  # transformers' Adafactor with FluxGym's fixed-lr settings, stepped per shape
        from fluxlora.adafactor import BatchedAdafactor

        return BatchedAdafactor(params, lr=lr, weight_decay=float(cfg.weight_decay), **kwargs)
    raise ValueError(f"optim.name={cfg.name!r} is not one of {OPTIMIZERS}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedule of the given name, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    name = str(cfg.scheduler)
    if name not in SCHEDULES:
        raise ValueError(f"optim.scheduler={name!r} is not one of {SCHEDULES}")
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_steps), num_training_steps=max(total_steps, 1))
