"""Free memory without copying it anywhere: a module's device tensors, for modules nobody runs again
(`release_device_tensors`), and the host heap's freed blocks (`release_free_heap`).

Moving a large module to the CPU is not free: on the H200, `.to("cpu")` of a 16-bit T5-XXL took 6.2 s of every
run's caching, and Lightning's teardown copy of a 12 GB fp8 Flux 11-12 s of every run's end. Where the module is
read again from its file if it is needed (`FluxComponents.drop_encoder`) or not needed at all (the end of
training), its device tensors are swapped for empty host tensors instead.

Example::

    released = release_device_tensors(t5, "cuda")   # bytes; t5 cannot run afterwards
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

_PLAIN = (torch.Tensor, torch.nn.Parameter)


def release_device_tensors(module: torch.nn.Module, device_type: str) -> int:
    """Swap every plain tensor of `module` on a `device_type` device (parameters, gradients, buffers) for an empty
    host tensor of its dtype; returns the bytes released. Tensor subclasses (bitsandbytes' NF4 parameters) are left
    as they are. The module cannot run afterwards."""
    released = 0

    def empty(t: torch.Tensor) -> torch.Tensor:
        nonlocal released
        if t.device.type != device_type or type(t) not in _PLAIN:
            return t
        released += t.numel() * t.element_size()
        return torch.empty(0, dtype=t.dtype)

    module._apply(empty)
    return released


def release_free_heap() -> None:
    """Hand the heap's freed blocks back to the OS (glibc's `malloc_trim`; a no-op without glibc). glibc serves
    allocations under its mmap threshold (which grows up to 32 MiB as large blocks are freed) from its heap and keeps
    them once freed: on the CPU, with a full-size random FLUX.1-dev file, ~1.9 GiB after reading it to fp8 and ~2.3 GB
    of the swapped blocks' originals after `BlockSwapper` took their copies."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    """glibc's `malloc_trim`, looked up once: `ctypes.util.find_library` runs `ldconfig` (~2 ms a call here), and a
    model read calls `release_free_heap` every 256 MiB and once per swapped block."""
    import ctypes
    import ctypes.util

    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
