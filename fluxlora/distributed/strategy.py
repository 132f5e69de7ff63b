"""Multi-process (DDP) training: Lightning's DDPStrategy with every wait bounded (which rank this process is, and
the `distributed` settings: `fluxlora.distributed.settings`).

The seed's distributed sync could deadlock: one rank stuck, the others waiting 30 minutes in a collective. Here the
process group's timeout is `distributed.setup_timeout_s` until every rank has finished its first step (start-up:
rendezvous, DDP's first broadcast, a slow first step) and `distributed.timeout_s` after it, so a rank that stalls or
dies makes the others fail within that time; `fluxlora.distributed.health` then names it.

Example::

    info = rank_info(cfg, torch.device("cuda"))      # RankInfo(rank=1, world_size=2, launches=False, ...)
    strategy = BoundedDDPStrategy(timeout_s=240, setup_timeout_s=1800)
    trainer = L.Trainer(devices=2, strategy=strategy, use_distributed_sampler=False)
"""

from __future__ import annotations

import logging
import os
import time
from datetime import timedelta
from typing import Any, Optional

import torch
from lightning.pytorch.strategies import DDPStrategy
from torch.nn.parallel import DistributedDataParallel
from typing_extensions import override

from fluxlora.errors import FluxLoraError, RankFailedError
from fluxlora.heartbeat import heartbeat
from fluxlora.distributed.health import looks_collective
# re-exported: their home is light, so a single process's settings are checked before Lightning is imported
from fluxlora.distributed.settings import DistributedSettings, RankInfo, count_devices, rank_info, requested_processes

log = logging.getLogger(__name__)

STRATEGIES = ("auto", "ddp")
"""`trainer.strategy` values fluxlora runs with several processes (both mean BoundedDDPStrategy)."""


def build_strategy(cfg: Any, info: RankInfo, dist: DistributedSettings, device: torch.device | None = None) -> Any:
    """The `strategy` argument of the Trainer: BoundedDDPStrategy for several processes, else `trainer.strategy`;
    for one process on one GPU (`device`, the run's), Lightning's own with a teardown that frees the module's memory
    instead of copying it to the host (`fluxlora.run.teardown`)."""
    value = cfg.trainer.get("strategy", "auto")
    if not info.distributed:
        value = "auto" if value == "ddp" else value
        if value == "auto" and device is not None and device.type == "cuda" and cfg.trainer.get("devices") in (1, "1"):
            from fluxlora.run.teardown import ReleasingSingleDeviceStrategy

            return ReleasingSingleDeviceStrategy(device)
        return value
    if not isinstance(value, str):  # a `_target_` node: the user's own strategy, and its own bounds
        from hydra.utils import instantiate

        log.warning("trainer.strategy is a custom strategy: its collective timeouts are its own")
        return instantiate(value)
    if value not in STRATEGIES:
        raise FluxLoraError(
            f"trainer.strategy={value} with {info.world_size} processes is not supported: use trainer.strategy=ddp "
            "(the default with trainer.devices > 1): Lightning's script launcher, torchrun or SLURM start the "
            "processes (README 'Multi-GPU'); spawn/fork strategies would have to pickle the model and callbacks")
    return BoundedDDPStrategy(timeout_s=dist.timeout_s, setup_timeout_s=dist.setup_timeout_s,
                              nccl_blocking_wait=dist.nccl_blocking_wait, static_graph=dist.static_graph,
                              process_group_backend=None if dist.backend == "auto" else dist.backend)


def is_collective_failure(exc: BaseException) -> bool:
    """True for an error raised by a collective or the store (a peer that timed out, died or closed its socket)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, FluxLoraError):
            return False
        dist_error = getattr(torch.distributed, "DistError", None)
        if (dist_error is not None and isinstance(exc, dist_error)) or (
                isinstance(exc, RuntimeError) and looks_collective(str(exc))):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


class BoundedDDPStrategy(DDPStrategy):
    """Lightning's DDP where no collective waits forever and only the LoRA weights are synchronised.

    Guarantee: a collective waits at most ``setup_timeout_s`` until this rank has finished its first training step,
    and at most ``timeout_s`` after it (the process group's timeout, switched after the first step); then it raises,
    and fluxlora ends the run naming the rank that did not arrive. On NCCL the environment is set before the process
    group exists so that a timeout raises instead of hanging (``TORCH_NCCL_ASYNC_ERROR_HANDLING=1``,
    ``TORCH_NCCL_BLOCKING_WAIT=1``). The frozen base model is excluded from DDP (no start-up broadcast of billions
    of frozen weights, no per-step buffer broadcast): gradients of the LoRA parameters alone are all-reduced, with
    ``find_unused_parameters=False`` because every LoRA layer is used in every step. At train start the ranks check
    that they resumed from the same step.

    Args:
        timeout_s: collective limit after the first step.
        setup_timeout_s: collective limit until then.
        nccl_blocking_wait: on NCCL, make a timed-out collective raise in the calling thread.
        **kwargs: passed to :class:`~lightning.pytorch.strategies.DDPStrategy` (and from there to DDP).

    Example::

        trainer = Trainer(devices=2, strategy=BoundedDDPStrategy(timeout_s=240), use_distributed_sampler=False)
    """

    def __init__(self, timeout_s: float = 240.0, setup_timeout_s: float = 1800.0, nccl_blocking_wait: bool = True,
                 **kwargs: Any) -> None:
        for key, v in (("timeout_s", timeout_s), ("setup_timeout_s", setup_timeout_s)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{key} must be a positive number of seconds, got {v!r}")
        kwargs.setdefault("find_unused_parameters", False)
        super().__init__(timeout=timedelta(seconds=float(setup_timeout_s)), **kwargs)
        self.timeout_s = float(timeout_s)
        self.setup_timeout_s = float(setup_timeout_s)
        self._blocking_wait = bool(nccl_blocking_wait)
        self.current_timeout_s = float(setup_timeout_s)
        self._batches_started = 0

    @override
    def setup_environment(self) -> None:
        if self._get_process_group_backend() == "nccl":  # read by torch when the process group is created
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
            if self._blocking_wait:
                os.environ.setdefault("TORCH_NCCL_BLOCKING_WAIT", "1")
        super().setup_environment()

    @override
    def _setup_model(self, model: torch.nn.Module) -> DistributedDataParallel:
        frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
        buffers = [n for n, _ in model.named_buffers()]
        DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, frozen + buffers)
        trained = [p for p in model.parameters() if p.requires_grad]
        log.info("DDP: %d LoRA tensors (%.2fM parameters) are synchronised; %d frozen tensors and %d buffers are "
                 "not", len(trained), sum(p.numel() for p in trained) / 1e6, len(frozen), len(buffers))
        return super()._setup_model(model)

    def set_timeout(self, seconds: float) -> None:
        """Change the limit of every later collective of the default process group."""
        from torch.distributed.distributed_c10d import _set_pg_timeout

        _set_pg_timeout(timedelta(seconds=float(seconds)))
        self.current_timeout_s = float(seconds)

    @override
    def on_train_start(self) -> None:
        super().on_train_start()
        steps = self.all_gather(torch.tensor(self.lightning_module.trainer.global_step, device=self.root_device))
        steps = [int(s) for s in steps.reshape(-1).tolist()]
        if len(set(steps)) > 1:
            raise FluxLoraError("the ranks start from different steps (" + ", ".join(
                f"rank {r}: step {s}" for r, s in enumerate(steps)) + "): they found different checkpoints; "
                "check that every rank sees the same checkpoint folder")

    @override
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._batches_started += 1
        if self._batches_started == 2 and self.current_timeout_s != self.timeout_s:
            # this rank's first step (and its all-reduce with every other rank) is done: start-up is over
            self.set_timeout(self.timeout_s)
            log.info("collective timeout now %gs (was %gs for start-up)", self.timeout_s, self.setup_timeout_s)

    def wait_for_rank_zero(self, stage: str, limit_s: float) -> None:
        """Every rank meets here after rank 0 did something alone that may take up to `limit_s` (a sampling round);
        the wait sends heartbeats and is bounded by `limit_s` plus the collective timeout."""
        import torch.distributed as dist

        if not (dist.is_available() and dist.is_initialized()) or self.world_size <= 1:
            return
        limit = float(limit_s) + self.current_timeout_s
        normal = self.current_timeout_s
        self.set_timeout(limit)  # read when the barrier is queued; later collectives get the normal limit again
        try:
            work = dist.barrier(async_op=True)
        finally:
            self.set_timeout(normal)
        deadline = time.monotonic() + limit + 5.0
        while not work.is_completed():
            heartbeat(stage, "waiting for rank 0")
            if time.monotonic() > deadline:
                raise RankFailedError(stage, limit, "rank 0 did not arrive", (0,))
            time.sleep(0.05)
        work.wait()  # raises what the barrier failed with


def wait_for_rank_zero(trainer: Any, stage: str, limit_s: float) -> None:
    """`BoundedDDPStrategy.wait_for_rank_zero` for any trainer: a bounded barrier with another strategy, nothing
    with one process."""
    if trainer.world_size <= 1:
        return
    strategy = trainer.strategy
    if isinstance(strategy, BoundedDDPStrategy):
        strategy.wait_for_rank_zero(stage, limit_s)
    else:
        strategy.barrier(stage)


def agree_max(trainer: Any, values: list[float]) -> list[float]:
    """The element-wise maximum of `values` over all ranks (one all-reduce; `values` itself with one process).

    How ranks agree on a decision one of them may have made alone: a signal received, a non-finite loss.
    """
    return _all_reduce(trainer, values, "MAX")


def agree_sum(trainer: Any, values: list[float]) -> list[float]:
    """The element-wise sum of `values` over all ranks (one all-reduce; `values` itself with one process).

    How ranks add up the parts of one result each computed for its own share (the validation loss).
    """
    return _all_reduce(trainer, values, "SUM")


def _all_reduce(trainer: Any, values: list[float], op: str) -> list[float]:
    import torch.distributed as dist

    if trainer is None or trainer.world_size <= 1 or not (dist.is_available() and dist.is_initialized()):
        return list(values)
    t = torch.tensor(values, dtype=torch.float64 if trainer.strategy.root_device.type == "cpu" else torch.float32,
                     device=trainer.strategy.root_device)
    dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
    return t.tolist()
