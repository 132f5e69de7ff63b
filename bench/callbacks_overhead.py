"""Per-step overhead of the hang-proofing callbacks: watchdog + idle sampler + checkpoints (AtomicCheckpointIO).

Two measurements on the embedded default (tiny Flux, CPU unless a GPU is visible):

1. A/B: median time per training step with the callbacks vs without them (watchdog, resume state, sampler,
   periodic checkpoints and the atomic CheckpointIO all removed), runs interleaved A B A B.
2. Inside the callbacks: the time spent in their hooks (checkpoint saves included, amortized over all steps), per
   step, as a fraction of the median step. This one is not drowned by run-to-run noise.

    python bench/callbacks_overhead.py [--steps 200] [--repeats 2] [--every 50]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L
from hydra import compose, initialize_config_module
from omegaconf import open_dict

from fluxlora.callbacks import PeriodicCheckpoint, ResumeState, StepHeartbeatWatchdog, TimedSampler
from fluxlora.run.train import run

MEASURED = (StepHeartbeatWatchdog, ResumeState, TimedSampler, PeriodicCheckpoint)
HOOKS = ("on_train_batch_start", "on_train_batch_end", "on_train_epoch_start", "on_train_epoch_end",
         "on_save_checkpoint", "on_before_backward", "on_after_backward", "on_before_optimizer_step")
TIMES: dict[str, list] = {}


class StepTimer(L.Callback):
    """Records the wall time between consecutive batch starts, and wraps the measured callbacks' hooks."""

    def __init__(self, key: str) -> None:
        self.key = key
        self.starts: list[float] = []
        self.hook_s = 0.0
        self.by_callback: dict[str, float] = {}

    def setup(self, trainer, pl_module, stage):
        for cb in trainer.callbacks:
            if isinstance(cb, MEASURED):
                for name in HOOKS:  # only hooks fluxlora implements (Lightning's empty defaults cost nothing)
                    if getattr(type(cb), name).__module__.startswith("fluxlora"):
                        setattr(cb, name, self._timed(getattr(cb, name), type(cb).__name__))

    def _timed(self, fn, owner: str):
        def wrapper(*args, **kwargs):
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                self.hook_s += dt
                self.by_callback[owner] = self.by_callback.get(owner, 0.0) + dt
        return wrapper

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, pl_module):
        TIMES.setdefault(self.key, []).append({"starts": self.starts, "hook_s": self.hook_s,
                                               "steps": trainer.global_step, "by_callback": self.by_callback})


def config(root: Path, key: str, hangproof: bool, steps: int, every: int):
    overrides = [f"output.root={root}", f"name={key}", "trainer.accelerator=auto", f"trainer.max_steps={steps}",
                 "trainer.max_epochs=-1", "callbacks.progress=null", "+trainer.enable_progress_bar=false",
                 "+trainer.enable_model_summary=false", "callbacks.lr_monitor=null",
                 "callbacks.loss_summary=null", "callbacks.lora_saver=null", "resume=null",
                 "+callbacks.step_timer._target_=__main__.StepTimer", f"+callbacks.step_timer.key={key}"]
    if hangproof:  # the sampler is on but idle: prompts encoded, never due
        overrides += ["sample.every_n_steps=1000000", "sample.at_end=false",
                      f"callbacks.checkpoint.every_n_steps={every}", "callbacks.checkpoint.every_n_minutes=null"]
    else:
        overrides += ["~callbacks.watchdog", "~callbacks.resume_state", "~callbacks.sampler", "~callbacks.checkpoint",
                      "checkpoint_io=null", "trainer.enable_checkpointing=false"]
    with initialize_config_module(config_module="fluxlora.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.hydra = None
    return cfg


def summarize(key: str, warmup: int) -> dict:
    step_times, hook_per_step, by_cb = [], [], {}
    for r in TIMES[key]:
        d = [b - a for a, b in zip(r["starts"][warmup:], r["starts"][warmup + 1:])]
        step_times += d
        hook_per_step.append(r["hook_s"] / max(1, r["steps"]))
        for name, t in r["by_callback"].items():
            by_cb.setdefault(name, []).append(1e3 * t / max(1, r["steps"]))
    return {"median_step_ms": 1e3 * statistics.median(step_times), "mean_step_ms": 1e3 * statistics.fmean(step_times),
            "hook_ms_per_step": 1e3 * statistics.fmean(hook_per_step), "steps_timed": len(step_times),
            "hook_ms_per_step_by_callback": {k: statistics.fmean(v) for k, v in by_cb.items()}}


def machine() -> str:
    cpu = platform.processor() or "?"
    try:
        cpu = next(x.split(":", 1)[1].strip() for x in Path("/proc/cpuinfo").read_text().splitlines()
                   if x.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    dev = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU only"
    return f"{cpu}, {os.cpu_count()} cores, {dev}, torch {torch.__version__}, Python {platform.python_version()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--every", type=int, default=50, help="checkpoint every N steps (the default config's value)")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1: a busy small machine otherwise times OpenMP barriers, not steps)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            for key, on in (("without", False), ("with", True)):
                t = time.monotonic()
                run(config(Path(tmp) / f"{key}{i}", key, on, args.steps, args.every))
                print(f"run {i} {key:7s}: {time.monotonic() - t:.1f}s", file=sys.stderr, flush=True)
    a, b = summarize("without", args.warmup), summarize("with", args.warmup)
    result = {"date": time.strftime("%Y-%m-%d"), "machine": machine(), "threads": args.threads, "steps": args.steps,
              "repeats": args.repeats,
              "checkpoint_every": args.every, "without": a, "with": b,
              "ab_overhead_pct": 100 * (b["median_step_ms"] / a["median_step_ms"] - 1),
              "hook_overhead_pct": 100 * b["hook_ms_per_step"] / b["median_step_ms"]}
    print(json.dumps(result, indent=1))
    print(f"\n| run | median step | mean step | time in the callbacks' hooks per step |\n|---|---|---|---|\n"
          f"| without | {a['median_step_ms']:.2f} ms | {a['mean_step_ms']:.2f} ms | - |\n"
          f"| with | {b['median_step_ms']:.2f} ms | {b['mean_step_ms']:.2f} ms | {b['hook_ms_per_step']:.3f} ms "
          f"({result['hook_overhead_pct']:.2f} % of a step) |\n\nA/B difference of medians: "
          f"{result['ab_overhead_pct']:+.2f} %")


if __name__ == "__main__":
    main()
