"""Host→device copies of one block's frozen weights: a CUDA backend (pinned host memory, a dedicated copy stream,
an event per block) and a host backend with the same interface that the CPU tests drive.

The host copies are packed into shared buffers (`HostArena`): torch's pinned-memory allocator rounds every
allocation up to a power of two, so pinning each weight on its own would hold ~1.4-1.7x the swapped bytes
(FLUX.1's fp8 block Linears: 9.4 MB pinned as 16 MB, 37.7 MB as 64 MB). On the H200 the 8gb tier's 10.71 GB now
pins 11.01 GB in 41 buffers, and the run's peak host memory fell from 45.9 to 40.5 GiB (README "Host memory of
swapped blocks").

A backend never waits: `start` queues a copy and returns at once, `ready` polls. The bounded wait lives in
`fluxlora.perf.blockswap`, so every backend gets the same timeout and error.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
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


ARENA_BYTES = 256 << 20
"""Size of each shared host buffer: a power of two, so the pinned allocator adds nothing to it; FLUX.1's largest
block weight (56.6 MB in fp8, 113 MB in bf16) leaves room for the smaller ones in every buffer's tail."""
ALIGN = 512
"""Byte alignment of each copy inside a buffer (any dtype's view; DMA-friendly)."""


def _host_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8)


def _pinned_buffer(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)


class HostArena:
    """Host copies packed into shared byte buffers of `size` bytes (first fit), each taken from `alloc(nbytes)`; a
    tensor larger than `size` gets a buffer of its own. Each copy is a view that keeps its buffer alive.

    Example::

        arena = HostArena(_pinned_buffer)
        host = arena.copy(weight)            # a pinned view with weight's dtype, shape and values
    """

    def __init__(self, alloc: Callable[[int], torch.Tensor] = _host_buffer, size: int = ARENA_BYTES) -> None:
        if size <= 0 or size % ALIGN:
            raise ValueError(f"arena buffers must be a positive multiple of {ALIGN} bytes, got {size}")
        self.alloc, self.size = alloc, size
        self.buffers: list[torch.Tensor] = []
        self._used: list[int] = []  # bytes taken from the front of each buffer

    @property
    def nbytes(self) -> int:
        """Bytes of all buffers (what the host holds for the copies)."""
        return sum(b.numel() for b in self.buffers)

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        """A copy of the host tensor `t` (made contiguous) inside a buffer."""
        src = t.detach().contiguous()
        n = src.numel() * src.element_size()
        for i, buf in enumerate(self.buffers):
            if self._used[i] + n <= buf.numel():
                break
        else:
            self.buffers.append(self.alloc(max(self.size, -(-n // ALIGN) * ALIGN)))
            self._used.append(0)
            i, buf = len(self.buffers) - 1, self.buffers[-1]
        off = self._used[i]
        self._used[i] = min(buf.numel(), -(-(off + n) // ALIGN) * ALIGN)
        view = buf[off:off + n].view(src.dtype).view(src.shape)
        view.copy_(src)
        return view


class HostTransfers:
    """Copies on the host: the "device" copy is a fresh clone (so dropping it never touches the host copy).

    Stands in for the CUDA backend where no GPU is present; subclass and override `ready` to simulate a stuck copy.
    `alloc` makes the host copies' shared buffers (`HostArena`).
    """

    device = torch.device("cpu")

    def __init__(self, alloc: Callable[[int], torch.Tensor] = _host_buffer) -> None:
        self.arena = HostArena(alloc)

    def host_copy(self, t: torch.Tensor) -> torch.Tensor:
        """The host tensor a block's weight is kept in while swapped out (a view into `arena`)."""
        return self.arena.copy(t.detach().to("cpu"))

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
        super().__init__(_pinned_buffer)
        self.stream = torch.cuda.Stream(self.device)

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
