"""What the memory, swap and speed setup decided for a run, passed explicitly instead of hung on the transformer."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fluxlora.perf.blockswap import BlockSwapper
    from fluxlora.perf.step_graph import StepGraphs


@dataclass
class PerfState:
    """One run's performance state: `build_module` fills it in as each setup step returns (memory settings, block
    swap, speed) and `FluxLoRAModule.perf` holds it for the training step and the callbacks."""

    checkpoint_every: int = 0
    """The gradient checkpointing interval `apply_memory_settings` applied (0 = off). `apply_speed_settings` reads
    it: recomputing inside compiled graphs and CUDA graphs depend on it."""
    swapper: BlockSwapper | None = None
    """The block swapper `enable_block_swap` installed, or None. The run logs its copy statistics."""
    cuda_graphs: bool = False
    """Whether `apply_speed_settings` made the compiled blocks replay CUDA graphs. The module reads it: each step
    then marks its start, and gradients are kept in memory of their own."""
    step_graphs: StepGraphs | None = None
    """The step's CUDA graphs when the whole training step is captured (`speed.graph_scope=step`), else None. The
    module runs each step through it."""

    @property
    def swapping(self) -> bool:
        """Block swapping is on: part of the transformer lives in host memory. The sampler reads it (no full copy
        to sample from), and so does `apply_speed_settings` (swap hooks stay outside compiled code)."""
        return self.swapper is not None
