"""One CUDA graph per training-step shape: forward, loss and backward replayed as one launch.

Why by hand: at 512 px the H200 step is bound by the host, not the GPU (kernels 0.113 s, host 0.149 s per step,
README "GPU benchmarks on the H200"). Inductor's cudagraph trees replay one graph per compiled block: 114 launches,
57 guard checks and as many AOTAutograd wrapper calls per step, and each new bucket shape records for 5-8 s at
1024 px. Grouping blocks (`speed.blocks_per_graph=4`) took only 7 of those ~46 ms. `torch.cuda.graph` captures the
whole step once per shape instead, after one eager step of that shape has compiled its blocks and warmed every
kernel, so a replay costs the host one launch.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Hashable

import torch

log = logging.getLogger(__name__)

StepFn = Callable[[dict[str, torch.Tensor]], torch.Tensor]
"""A step over device tensors only: no host syncs, no host tensors. It returns a detached tensor (the loss)."""


def signature(inputs: dict[str, torch.Tensor]) -> tuple:
    """What a captured graph is specific to: each input's name, shape, dtype and device."""
    return tuple((k, tuple(t.shape), t.dtype, t.device) for k, t in sorted(inputs.items()))


class StepGraphs:
    """Runs a step function eagerly the first `warmup` times a key is seen, then captures it as a CUDA graph over
    static copies of its inputs and replays that graph for every later call with the key.

    All graphs share one memory pool: they never run at once, and the only tensors that outlive a replay (the
    outputs and what the function writes in place, such as gradients) are allocated outside the graph or stay
    referenced. If a capture fails, the error is logged in one line and every later call runs eagerly: the eager
    step computes the same thing.

    Args:
        warmup: eager calls per key before its capture (compiling, autotuning and lazy library setup must not happen
            inside a capture).
    """

    def __init__(self, warmup: int = 1) -> None:
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup={warmup!r} must be a whole number >= 1")
        self.warmup = warmup
        self.failed: str | None = None  # why capturing stopped, or None
        self._graphs: dict[Hashable, tuple[dict[str, torch.Tensor], torch.cuda.CUDAGraph, torch.Tensor]] = {}
        self._eager_calls: dict[Hashable, int] = {}
        self._pool = None

    @property
    def captured(self) -> int:
        """How many graphs were captured (one per step shape seen more than `warmup` times)."""
        return len(self._graphs)

    def __call__(self, fn: StepFn, inputs: dict[str, torch.Tensor], key: Hashable = ()) -> torch.Tensor:
        """`fn(inputs)`, eagerly or by replay. `key` tells apart step functions that differ for the same inputs."""
        full_key = (signature(inputs), key)
        entry = self._graphs.get(full_key)
        if entry is None:
            calls = self._eager_calls.get(full_key, 0)
            if self.failed is not None or calls < self.warmup:
                self._eager_calls[full_key] = calls + 1
                return fn(inputs)
            entry = self._capture(fn, inputs, full_key)
            if entry is None:
                return fn(inputs)
        static, graph, out = entry
        for name, t in inputs.items():
            static[name].copy_(t, non_blocking=True)
        graph.replay()
        return out.clone()  # the next replay writes over `out`; callers may keep what they get

    def _capture(self, fn: StepFn, inputs: dict[str, torch.Tensor], key: Hashable):
        static = {name: t.clone() for name, t in inputs.items()}  # outside the pool: they outlive every replay
        try:
            graph = torch.cuda.CUDAGraph()
            # thread_local: a sampling thread allocating on its own stream must not break this capture
            with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
                out = fn(static)
        except Exception as e:  # noqa: BLE001 - any capture failure: the eager step still works
            self.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            log.warning("speed.graph_scope=step: capturing the step of shape %s failed (%s); every later step runs "
                        "without a step graph", _shapes(key), self.failed)
            return None
        if self._pool is None:
            self._pool = graph.pool()
        self._graphs[key] = entry = (static, graph, out)
        log.info("captured the training step of shape %s as one CUDA graph (%d in all)", _shapes(key),
                 len(self._graphs))
        return entry


def _shapes(key: Hashable) -> str:
    """The input shapes of a key, for the log."""
    sig = key[0] if isinstance(key, tuple) and key else ()
    return ", ".join(f"{name} {'x'.join(map(str, shape))}" for name, shape, *_ in sig) or "?"
