"""The `distributed` settings and where this process stands in the run (`RankInfo`), known before the Trainer
exists. Light: a single process is told, and its settings checked, without importing Lightning (several processes
ask Lightning's cluster environments); `fluxlora.distributed.strategy` builds the DDP strategy from them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fluxlora.errors import FluxLoraError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class DistributedSettings:
    """The `distributed` config node: how long a rank may wait for the others."""

    timeout_s: float = 240.0
    """After the first step: the most a collective (gradient all-reduce, broadcast, checkpoint barrier) waits for the
    other ranks before the run ends naming the missing rank. Keep it below the watchdog's `step_timeout_s`."""
    setup_timeout_s: float = 1800.0
    """Until every rank has finished its first step: rendezvous, DDP's first broadcast, the first step."""
    backend: str = "auto"
    """auto (nccl on CUDA, gloo on the CPU) | nccl | gloo."""
    nccl_blocking_wait: bool = True
    """NCCL: a timed-out collective raises in the training thread (TORCH_NCCL_BLOCKING_WAIT=1), so the message can
    name the missing rank; off, NCCL's own watchdog aborts the process instead."""
    static_graph: bool = False
    """DDP's static_graph (the same LoRA layers are used every step; saves a little per-step bookkeeping)."""
    join_timeout_s: float = 60.0
    """At the end: how long the process that started the other ranks waits for them to exit before ending them."""

    def __post_init__(self) -> None:
        for key in ("timeout_s", "setup_timeout_s", "join_timeout_s"):
            v = getattr(self, key)
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"distributed.{key}={v!r} must be a positive number of seconds")
        if self.backend not in ("auto", "nccl", "gloo"):
            raise ValueError(f"distributed.backend={self.backend!r} is not one of auto, nccl, gloo")


@dataclass(frozen=True)
class RankInfo:
    """Where this process stands in the run, known before the Trainer exists (model loading and caching need it)."""

    rank: int
    """Global rank."""
    local_rank: int
    """Rank on this machine."""
    world_size: int
    """Processes in the whole run."""
    devices: int
    """Processes per machine (`trainer.devices`)."""
    num_nodes: int
    """Machines (`trainer.num_nodes`)."""
    environment: str
    """single | lightning (Lightning's script launcher starts the local ranks) | torchelastic | slurm | lsf | mpi."""
    launches: bool
    """This process starts the other ranks of its machine (rank 0 of `python -m fluxlora trainer.devices=N`)."""

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def count_devices(devices: Any, device: torch.device) -> int:
    """Processes per machine for `trainer.devices` (an int, "auto", -1, a list or "0,1"), as Lightning counts them."""
    if type(devices) is int and devices == 1:
        return 1  # Lightning's count on either device, without importing Lightning (seconds) for a single run
    from lightning.pytorch.accelerators import CPUAccelerator, CUDAAccelerator

    acc = CUDAAccelerator if device.type == "cuda" else CPUAccelerator
    if devices == "auto":
        return acc.auto_device_count()
    try:
        return len(acc.get_parallel_devices(acc.parse_devices(devices)))
    except Exception as e:
        raise FluxLoraError(f"trainer.devices={devices!r}: {e}") from None


def requested_processes(cfg: Any, device: torch.device) -> tuple[int, int]:
    """(processes per machine, machines) that `trainer.devices` and `trainer.num_nodes` ask for."""
    return count_devices(cfg.trainer.get("devices", 1), device), int(cfg.trainer.get("num_nodes") or 1)


def rank_info(cfg: Any, device: torch.device) -> RankInfo:
    """This process's rank, from the same cluster environments (and in the same order) Lightning will use."""
    devices, nodes = requested_processes(cfg, device)
    if devices * nodes == 1:
        return RankInfo(0, 0, 1, 1, 1, "single", False)
    from lightning.fabric.plugins.environments import (LightningEnvironment, LSFEnvironment, MPIEnvironment,
                                                       SLURMEnvironment, TorchElasticEnvironment)

    for name, env_type in (("torchelastic", TorchElasticEnvironment), ("slurm", SLURMEnvironment),
                           ("lsf", LSFEnvironment), ("mpi", MPIEnvironment)):
        if env_type.detect():
            try:
                env = env_type()
            except RuntimeError as e:  # Lightning's own check of the job's settings, e.g. SLURM --ntasks
                raise FluxLoraError(f"{name} environment: {e}") from None
            if env.world_size() != devices * nodes:
                raise FluxLoraError(f"the {name} environment has {env.world_size()} processes, but trainer.devices="
                                    f"{devices} x trainer.num_nodes={nodes} asks for {devices * nodes}")
            return RankInfo(env.global_rank(), env.local_rank(), env.world_size(), devices, nodes, name, False)
    env = LightningEnvironment()
    local, node = env.local_rank(), env.node_rank()
    return RankInfo(node * devices + local, local, devices * nodes, devices, nodes, "lightning",
                    launches=not env.creates_processes_externally)
