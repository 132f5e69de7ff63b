"""Process-wide CUDA settings a training run needs before it allocates: one place, applied once."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def prepare_cuda(device: torch.device) -> None:
    """On a CUDA device:

    - cuDNN's SDPA kernels are switched off: their backward fails on diffusers' Flux attention with torch 2.11 on
      the H100 (`mha_graph.execute(...).is_good()`, or NaN), and flash / memory-efficient attention serve instead;
    - the caching allocator grows expandable segments unless `PYTORCH_CUDA_ALLOC_CONF` says otherwise: block
      swapping allocates and frees a block's weights every step, which fragments fixed segments by up to 2 GiB
      at 1024 px (measured on the H100) — the difference between fitting a 12 GB card and not.
    """
    if torch.device(device).type != "cuda":
        return
    torch.backends.cuda.enable_cudnn_sdp(False)
    if "PYTORCH_CUDA_ALLOC_CONF" not in os.environ and "PYTORCH_ALLOC_CONF" not in os.environ:
        # torch >= 2.9 names it per accelerator; the CUDA-only spelling still works there but warns
        set_settings = getattr(torch._C, "_accelerator_setAllocatorSettings", None)
        (set_settings or torch.cuda.memory._set_allocator_settings)("expandable_segments:True")
        log.debug("CUDA allocator: expandable segments")
