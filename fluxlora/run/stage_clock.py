"""StageClock: where a run's time and memory went, stage by stage, so a user (and `bench/whole_run.py`) can
see which stage is slow or tight: load, cache, build, first step (compiles included), the steps after it, and what
happens after the last step (LoRA file, final checkpoint, last samples).

The stages before training are marked by the run (`begin`); the rest by Lightning's hooks: `first_step`, then
`steps` (each training step) and `between_steps` (what runs between two: sampling rounds in between_steps mode,
checkpoint saves, the next batch), summed over the run. At the end one log line sums them up and `stages.json` in
the run folder holds the numbers. Host memory is the process's peak resident set so far at each stage's end: pinned
copies of swapped blocks count there, and a user with 16-32 GB of RAM needs to know it as much as the card's.
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from typing_extensions import override

from fluxlora.atomic import atomic_write_text

log = logging.getLogger(__name__)

_GiB = float(1 << 30)
try:
    import resource
except ImportError:  # Windows: no getrusage; the host column is left out
    resource = None
SLOW_STEP_FACTOR = 3.0  # a repeat-shape step this many times the fastest one is listed as slow in stages.json ...
SLOW_STEP_S = 1.0       # ... when it also took at least this long (sub-second jitter is not worth a line)


class StageClock(L.Callback):
    """Wall time and peak reserved device memory of each stage, and the time of each optimizer step.

    Steady s/step is the median interval between the ends of consecutive optimizer steps whose batch shape had been
    trained before (a new bucket shape compiles again) and that no sampling round fell into.

    Args:
        device: the training device (peak memory is read on CUDA only).
        path: where `stages.json` goes; None = log only.

    Example::

        clock = StageClock(device, "outputs/mychar/stages.json")
        clock.begin("load"); ...; clock.begin("cache"); ...
        trainer = Trainer(callbacks=[clock, ...]); trainer.fit(...)
        clock.finish(sampled={4: 12.0})
    """

    def __init__(self, device: torch.device | str, path: Optional[str | Path] = None) -> None:
        super().__init__()
        self._cuda = torch.device(device).type == "cuda"
        self._device = torch.device(device)
        self._path = Path(path) if path else None
        self.stages: dict[str, dict[str, Any]] = {}
        self._current: Optional[str] = None
        self._t0 = 0.0
        self._shapes: set[Optional[tuple]] = set()
        self._shape: Optional[tuple] = None
        self._last_end: Optional[float] = None
        self._train_t0 = 0.0
        self._last_step = -1
        self.steps: list[dict[str, Any]] = []  # {"step", "s", "new_shape"} per optimizer step after the first

    def begin(self, stage: str) -> None:
        """End the current stage (its time and peak memory are recorded) and start `stage`."""
        now = time.monotonic()
        if self._current is not None:
            entry = self.stages.setdefault(self._current, {"s": 0.0})
            entry["s"] = round(entry["s"] + now - self._t0, 3)
            if self._cuda:
                peak = torch.cuda.max_memory_reserved(self._device) / _GiB
                entry["peak_reserved_gib"] = round(max(peak, entry.get("peak_reserved_gib", 0.0)), 3)
            host = host_peak_gib()
            if host is not None:
                entry["host_peak_gib"] = host
        if self._cuda:
            torch.cuda.reset_peak_memory_stats(self._device)
        self._current, self._t0 = stage, now

    # ---- Lightning hooks ----

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.begin("first_step")
        self._train_t0 = self._t0
        self._last_step = trainer.global_step

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        latents = batch.get("latents") if isinstance(batch, dict) else None
        self._shape = tuple(latents.shape) if isinstance(latents, torch.Tensor) else None
        if self._current == "between_steps":
            self.begin("steps")

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # what follows until the next batch starts (the other callbacks' batch-end work: sampling rounds between
        # steps, checkpoints; loading the next batch) is its own stage, with its own peak memory
        if trainer.global_step != self._last_step:  # an optimizer step finished (not inside an accumulation window)
            self._last_step = trainer.global_step
            now = time.monotonic()
            new_shape = self._shape not in self._shapes
            self._shapes.add(self._shape)
            if self._last_end is None:  # the first optimizer step (after several batches when accumulating)
                log.info("first step: %.1f s (compiling included where blocks are compiled)", now - self._train_t0)
            else:
                took = round(now - self._last_end, 4)
                self.steps.append({"step": trainer.global_step, "s": took, "new_shape": new_shape})
                if new_shape:  # a new bucket shape compiles its graphs once: the user sees where that time went
                    log.info("step %d: first batch of shape %s took %.1f s", trainer.global_step,
                             "x".join(map(str, self._shape or ())), took)
            self._last_end = now
        self.begin("between_steps")

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.begin("after_steps")

    @override
    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Lightning's own teardown runs before this hook: `after_steps` holds the end-of-training callbacks (the last
        # checkpoint, waiting for a sampling round) and that teardown. On the H200 its copy of the module to host
        # memory took 10-12 s (24gb, no tier) until `fluxlora.run.teardown` freed the device tensors instead;
        # this boundary tells the teardown from what follows it
        self.begin("after_fit")

    # ---- the summary ----

    def summary(self, sampled: Optional[dict[int, float]] = None) -> dict[str, Any]:
        """The stages, steady s/step and the sampling rounds (`sampled`: step -> seconds)."""
        sampled = dict(sampled or {})
        repeats = [s for s in self.steps if not s["new_shape"] and s["step"] - 1 not in sampled]
        steady = [s["s"] for s in repeats]
        # a step of a shape seen before, with no sampling round beside it, that still took far longer than the
        # fastest: on the H200 two such steps took 42 s in a run without a tier (CUDA graphs), and nothing said so
        fastest = min(steady) if steady else 0.0
        slow = {str(s["step"]): s["s"] for s in repeats if s["s"] >= max(SLOW_STEP_S, SLOW_STEP_FACTOR * fastest)}
        peaks = [v["peak_reserved_gib"] for v in self.stages.values() if "peak_reserved_gib" in v]
        return {"stages": self.stages, "steady_s_per_step": round(statistics.median(steady), 4) if steady else None,
                "steady_steps": len(steady), "shapes": len(self._shapes),
                "new_shape_steps_s": {str(s["step"]): s["s"] for s in self.steps if s["new_shape"]},
                "slow_steps_s": slow,
                "sampling_rounds_s": {str(k): round(v, 2) for k, v in sorted(sampled.items())},
                "peak_reserved_gib": max(peaks) if peaks else None, "host_peak_gib": host_peak_gib(),
                "compiled_graphs": _compiled_graphs(),
                "device": torch.cuda.get_device_name(self._device) if self._cuda else str(self._device)}

    def finish(self, sampled: Optional[dict[int, float]] = None) -> dict[str, Any]:
        """Close the last stage, log one line and write `stages.json`; returns the summary."""
        self.begin("end")
        self.stages.pop("end", None)
        result = self.summary(sampled)
        parts = [f"{name} {v['s']:.1f}s" + (f" ({v['peak_reserved_gib']:.2f} GiB)" if "peak_reserved_gib" in v else "")
                 for name, v in self.stages.items()]
        steady = result["steady_s_per_step"]
        log.info("stages: %s; steady %s s/step over %d steps%s%s", ", ".join(parts),
                 f"{steady:.3f}" if steady is not None else "n/a", result["steady_steps"],
                 f"; peak reserved {result['peak_reserved_gib']:.2f} GiB" if result["peak_reserved_gib"] else "",
                 f"; host peak {result['host_peak_gib']:.2f} GiB" if result["host_peak_gib"] else "")
        if result["slow_steps_s"]:
            log.info("steps of a shape seen before that took %.0fx the fastest or more (no sampling round beside them): "
                     "%s", SLOW_STEP_FACTOR, ", ".join(f"step {k} {v:.1f} s" for k, v in result["slow_steps_s"].items()))
        if self._path is not None:
            try:
                atomic_write_text(self._path, json.dumps(result, indent=1))
            except OSError as e:  # a report must not fail a finished run
                log.warning("%s not written: %s", self._path, e)
        return result


def host_peak_gib() -> Optional[float]:
    """This process's peak resident set so far (GiB), or None where the OS does not say (Windows). DataLoader workers
    are processes of their own and not in it."""
    if resource is None:
        return None
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return round(rss / (_GiB if sys.platform == "darwin" else _GiB / 1024), 3)


def _compiled_graphs() -> Optional[int]:
    """Graphs torch.compile made in this process (one per block kind and bucket shape), or None if it never ran."""
    try:
        from torch._dynamo.utils import counters
    except ImportError:
        return None
    n = counters["stats"].get("unique_graphs", 0)
    return int(n) if n else None
