"""Optimizers and learning-rate schedules by name, from the libraries that implement them."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable

import torch

OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")
SCHEDULES = ("constant", "constant_with_warmup", "cosine", "linear")


@dataclass(frozen=True)
class OptimSettings:
    """The `optim` group, checked (`check_optim` builds it): what `build_optimizer` and `build_scheduler` read."""

    name: str = "adamw"
    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    kwargs: dict = field(default_factory=dict)
    scheduler: str = "constant"
    warmup_steps: int = 0


def build_optimizer(params: Iterable[torch.nn.Parameter], cfg: Any) -> torch.optim.Optimizer:
    """An optimizer over the LoRA parameters.

    Args:
        params: trainable parameters.
        cfg: the `optim` node: `name`, `lr`, `weight_decay`, `betas`, `eps`, `kwargs` (passed through).
    """
    params = list(params)
    name = str(cfg.name).lower()
    kwargs = dict(getattr(cfg, "kwargs", None) or {})
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
        from fluxlora.training.adafactor import BatchedAdafactor

        return BatchedAdafactor(params, lr=lr, weight_decay=float(cfg.weight_decay), **kwargs)
    raise ValueError(f"optim.name={cfg.name!r} is not one of {OPTIMIZERS}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Any, total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """diffusers' schedule of the given name, stepped once per optimizer step."""
    from diffusers.optimization import get_scheduler

    name = str(cfg.scheduler)
    if name not in SCHEDULES:
        raise ValueError(f"optim.scheduler={name!r} is not one of {SCHEDULES}")
    return get_scheduler(name, optimizer, num_warmup_steps=int(cfg.warmup_steps), num_training_steps=max(total_steps, 1))


def check_optim(cfg: Any) -> OptimSettings:
    """The `optim` node checked before anything is loaded, as OptimSettings; raises ValueError naming the key.

    Each value is checked by type, then the optimizer and schedule are built over one dummy parameter, so what the
    libraries themselves refuse (an unknown `kwargs` key, a negative lr) is refused now rather than after caching.
    """
    known = set(OptimSettings.__dataclass_fields__)
    unknown = set(cfg) - known
    if unknown:
        raise ValueError(f"unknown key(s) {sorted(unknown)} for optim; known: {sorted(known)}")
    name = str(cfg.get("name")).lower()
    if name not in OPTIMIZERS:
        raise ValueError(f"optim.name={cfg.get('name')!r} is not one of {OPTIMIZERS}")
    lr, eps, weight_decay = (_number(cfg, key) for key in ("lr", "eps", "weight_decay"))
    betas = cfg.get("betas")
    if betas is None or len(betas) != 2:
        raise ValueError(f"optim.betas={betas!r} must be two numbers, e.g. [0.9, 0.999]")
    betas = tuple(_number(cfg.betas, i, f"optim.betas[{i}]") for i in range(2))
    warmup = cfg.get("warmup_steps")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"optim.warmup_steps={warmup!r} must be a whole number >= 0")
    if cfg.get("kwargs") is not None and not hasattr(cfg.kwargs, "items"):
        raise ValueError(f"optim.kwargs={cfg.kwargs!r} must be a mapping of extra optimizer arguments")
    if str(cfg.get("scheduler")) not in SCHEDULES:
        raise ValueError(f"optim.scheduler={cfg.get('scheduler')!r} is not one of {SCHEDULES}")
    checked = OptimSettings(name, lr, weight_decay, betas, eps, dict(cfg.get("kwargs") or {}), str(cfg.scheduler),
                            warmup)
    try:
        build_scheduler(build_optimizer([torch.nn.Parameter(torch.zeros(1))], checked), checked, total_steps=1)
    except (TypeError, ValueError) as e:
        raise ValueError(f"optim (name={name}, kwargs={checked.kwargs}): {e}") from e
    return checked


def _number(node: Any, key: Any, label: str | None = None) -> float:
    value = node[key]
    label = label or f"optim.{key}"
    try:
        if isinstance(value, bool):
            raise TypeError
        return float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{label}={value!r} is not a number") from None
