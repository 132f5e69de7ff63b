"""Process-wide CUDA settings a training run needs before it allocates, and the memory limit it then runs under:
one place, applied once."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)

GiB = 1 << 30
CONTEXT_RESERVE = 1 * GiB
"""What a memory budget leaves outside the allocator: the CUDA context, cuBLAS/cuDNN workspaces and the driver's own
use. On the H200 nvidia-smi read 0.6-0.7 GiB above the allocator's peak reserved memory (11,717 MiB against 10.97
GiB, issue 14's table), and the run's own nvidia-smi entry 0.1-1.0 GB above it in the whole-run bench (README "VRAM
tiers", "What nvidia-smi reads"), so a process capped at budget - 1 GiB fits a card of `budget` GiB."""

PAGE_SLACK = 64 << 20
"""Kept below the cap: with expandable segments the allocator maps whole pages and went 2 MiB past a 7 GiB fraction
(7.002 GiB peak reserved, measured on the H200)."""

_caps: dict[int, int] = {}  # device index -> bytes the allocator was capped at by `cap_memory`


def prepare_cuda(device: torch.device, budget_gb: float | None = None) -> None:
    """On a CUDA device:

    - cuDNN's SDPA kernels are switched off: their backward fails on diffusers' Flux attention with torch 2.11 on
      the H100 (`mha_graph.execute(...).is_good()`, or NaN), and flash / memory-efficient attention serve instead;
    - the caching allocator grows expandable segments unless `PYTORCH_CUDA_ALLOC_CONF` says otherwise: block
      swapping allocates and frees a block's weights every step, which fragments fixed segments by up to 2 GiB
      at 1024 px (measured on the H100) — the difference between fitting a 12 GB card and not;
    - with `budget_gb` (`memory.budget_gb`, set by every tier) the allocator is capped so the process behaves as it
      would on a card of that size (`cap_memory`).
    """
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.enable_cudnn_sdp(False)
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        # torch >= 2.9 names it per accelerator; the CUDA-only spelling still works there but warns
        set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        (set_settings or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
        log.debug("CUDA allocator: expandable segments")
    if budget_gb:
        cap_memory(device, float(budget_gb))


def cap_memory(device: torch.device, budget_gb: float) -> int:
    """Cap this process's allocator at `budget_gb` GiB - `CONTEXT_RESERVE` - `PAGE_SLACK` (never above the card);
    returns the cap.

    `torch.cuda.mem_get_info` does not see the cap (measured on the H200), so the cap is recorded here and
    `memory_limit` is what the rest of fluxlora reads.
    """
    device = torch.device(device)
    index = device.index if device.index is not None else torch.cuda.current_device()
    total = torch.cuda.get_device_properties(index).total_memory
    cap = min(total, int(budget_gb * GiB) - CONTEXT_RESERVE - PAGE_SLACK)
    if cap <= 0:
        raise ValueError(f"memory.budget_gb={budget_gb:g} leaves nothing after the {CONTEXT_RESERVE / GiB:g} GiB the "
                         "CUDA context needs")
    if _caps.get(index) == cap:  # build_module prepares again what the run prepared
        return cap
    torch.cuda.set_per_process_memory_fraction(cap / total, index)
    _caps[index] = cap
    log.info("memory budget %g GiB: the allocator may reserve %.2f GiB of this card's %.1f GiB", budget_gb, cap / GiB,
             total / GiB)
    return cap


def memory_limit(device: torch.device) -> int | None:
    """Bytes this process's allocator may reserve on `device`: its cap (`cap_memory`) or the card's total; None off
    CUDA."""
    device = torch.device(device)
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _caps.get(index, torch.cuda.get_device_properties(index).total_memory)


def available_memory(device: torch.device) -> int | None:
    """Bytes this process can still allocate on `device`: what its limit leaves above what it reserved (never more
    than the card has free, other processes count), plus what its allocator reserved but does not use. None off
    CUDA."""
    limit = memory_limit(device)
    if limit is None:
        return None
    reserved, allocated = torch.cuda.memory_reserved(device), torch.cuda.memory_allocated(device)
    free_on_card = torch.cuda.mem_get_info(device)[0]
    return max(0, min(limit - reserved, free_on_card)) + (reserved - allocated)


def memory_use(device: torch.device | None = None) -> tuple[int, int] | None:
    """(the most bytes this process's allocator held in the current stage, its limit) on `device` (default: the
    current CUDA device), or None where CUDA never started: what an out-of-memory message reports.

    The peak, not the current value: the message is written after Lightning's teardown has moved the model off
    the GPU and emptied the cache (an H200 LoKr run reported 11.73 of 22.94 GiB "in use" that way, measured after
    the fact). StageClock resets the peak when a stage begins, so this is the failing stage's; without it, the
    run's."""
    if device is None:
        if not (torch.cuda.is_available() and torch.cuda.is_initialized()):
            return None
        device = torch.device("cuda", torch.cuda.current_device())
    limit = memory_limit(device)
    return None if limit is None else (torch.cuda.max_memory_reserved(device), limit)  # the peak includes the present
