"""Host→device copies of one block's frozen weights: a CUDA backend (pinned host memory, a dedicated copy stream,
an event per block) and a host backend with the same interface that the CPU tests drive.

A backend never waits: `start` queues a copy and returns at once, `ready` polls. The bounded wait lives in
`fluxlora.perf.blockswap`, so every backend gets the same timeout and error.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass
class Transfer:
    """One block's weights on their way to the device."""

    block: str
    """The block's name (`single_transformer_blocks.12`), for messages."""
    tensors: dict[str, torch.Tensor]
    """Device copies by parameter key; usable once `ready` and `adopt` have run."""
    event: Any = None
    """The backend's completion marker (a `torch.cuda.Event` on CUDA)."""


class HostTransfers:
    """Copies on the host: the "device" copy is a fresh clone (so dropping it never touches the host copy).

    Stands in for the CUDA backend where no GPU is present; subclass and override `ready` to simulate a stuck copy.
    """

    device = torch.device("cpu")

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """The host tensor a block's weight is kept in while swapped out."""
        return t.detach().to("cpu").contiguous().clone()

    def start(self, block: str, host: dict[str, torch.Tensor]) -> Transfer:
        return Transfer(block, {k: v.clone() for k, v in host.items()})

    def ready(self, transfer: Transfer) -> bool:
        return True

    def adopt(self, transfer: Transfer) -> None:
        """Make the copies safe to use from the current stream (nothing to do on the host)."""


class CudaTransfers(HostTransfers):
    """Pinned host memory → `device` on a dedicated stream; one event per block marks completion.

    Device copies are allocated on the copy stream and, once adopted, recorded on the consuming stream, so the
    caching allocator never hands their memory to the next copy while compute still reads it.
    """

    def __init__(self, device: torch.device | str) -> None:
        self.device = torch.device(device)
        if self.device.type != "cuda":
            raise ValueError(f"CudaTransfers needs a cuda device, got {self.device}")
        self.stream = torch.cuda.Stream(self.device)

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        return t.detach().to("cpu").contiguous().pin_memory()

    def start(self, block: str, host: dict[str, torch.Tensor]) -> Transfer:
        with torch.cuda.stream(self.stream):
            dev = {k: torch.empty_like(v, device=self.device) for k, v in host.items()}
            for k, v in host.items():
                dev[k].copy_(v, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.stream)
        return Transfer(block, dev, event)

    def ready(self, transfer: Transfer) -> bool:
        return transfer.event.query()

    def adopt(self, transfer: Transfer) -> None:
        stream = torch.cuda.current_stream(self.device)
        stream.wait_event(transfer.event)
        for t in transfer.tensors.values():
            t.record_stream(stream)
