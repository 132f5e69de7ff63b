"""Fault-injection callbacks and helpers for the hang tests (importable as `faults`: tests/ is on sys.path).

Each callback is added to a run through Hydra, e.g. `+callbacks.stuck._target_=helpers.faults.BlockInStep`, so the fault
happens inside a real training run, in the hook where a real hang would happen.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L

ROOT = Path(__file__).resolve().parents[2]
TESTS = Path(__file__).resolve().parents[1]


def _block(how: str, fifo: Optional[str]) -> None:
    """Block the calling thread inside a C call: a long sleep, a sleep that keeps holding the GIL (`gil`: libc's
    sleep through ctypes.PyDLL, which does not release it, as a stuck extension would), or opening a FIFO nobody
    writes to."""
    if how == "gil":
        import ctypes

        ctypes.PyDLL(None).sleep(3600)
    elif how == "fifo":
        with open(fifo, "rb") as f:  # open() of a FIFO waits in the kernel for a writer
            f.read()
    else:
        time.sleep(3600)


class BlockInStep(L.Callback):
    """Inside the training step of `at_step` (after backward, before the optimizer step), block in C. With `mark`,
    write `{"pid", "time"}` there just before (a test times what follows from it)."""

    def __init__(self, at_step: int, how: str = "sleep", fifo: Optional[str] = None,
                 mark: Optional[str] = None) -> None:
        self.at_step, self.how, self.fifo, self.mark = at_step, how, fifo, mark

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_step == self.at_step:
            if self.mark:
                Path(self.mark).write_text(json.dumps({"pid": os.getpid(), "time": time.time()}))
            _block(self.how, self.fifo)


class BlockOnSave(L.Callback):
    """While the checkpoint of `at_step` is being written, block in C (a save to a hung disk)."""

    def __init__(self, at_step: int, fifo: str) -> None:
        self.at_step, self.fifo = at_step, fifo

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        if trainer.global_step == self.at_step:
            _block("fifo", self.fifo)


class SignalAtStep(L.Callback):
    """Send `signum` to this process at the end of step `at_step` (as `kill -TERM` from outside would)."""

    def __init__(self, at_step: int, signum: int = int(signal.SIGINT)) -> None:
        self.at_step, self.signum = at_step, signum

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            os.kill(os.getpid(), self.signum)


class SlowStep(L.Callback):
    """Make every training step take at least `seconds` (so a test can act while a run is in its steps)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        time.sleep(self.seconds)


class SlowStart(L.Callback):
    """Take `seconds` in the trainer's setup (after loading and caching, before the first step): a slow stage outside
    the training steps. Writes `{"pid", "time"}` to `mark` first, so a test can act while it sleeps."""

    def __init__(self, seconds: float, mark: str) -> None:
        self.seconds, self.mark = seconds, mark

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        Path(self.mark).write_text(json.dumps({"pid": os.getpid(), "time": time.time()}))
        time.sleep(self.seconds)


class BatchRecorder(L.Callback):
    """Append `{"step": global_step, "rank": R, "epoch": E, "paths": [...]}` for every training batch to a JSON-lines
    file (one line per write: the ranks of a DDP run append to the same file)."""

    def __init__(self, path: str) -> None:
        self.path = Path(path)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": trainer.global_step, "rank": trainer.global_rank,
                                "epoch": trainer.current_epoch,
                                "paths": [Path(p).name for p in batch["path"]]}) + "\n")


class RankFault(L.Callback):
    """On rank `rank`, inside the training step of `at_step` (after backward, before the optimizer step): sleep in C
    for an hour (`how=sleep`) or SIGKILL this process (`how=kill`). With `once_file`, only the first run that gets
    there does it (a supervisor's restart then trains through). Writes `{"pid", "time"}` to `once_file` just
    before, so a test can time what follows."""

    def __init__(self, rank: int, at_step: int, how: str = "sleep", once_file: Optional[str] = None) -> None:
        self.rank, self.at_step, self.how = rank, at_step, how
        self.once_file = Path(once_file) if once_file else None

    def on_after_backward(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != self.rank or trainer.global_step != self.at_step:
            return
        if self.once_file is not None:
            if self.once_file.exists():
                return
            self.once_file.write_text(json.dumps({"pid": os.getpid(), "time": time.time(), "how": self.how}))
        if self.how == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        _block("sleep", None)


class LoraFingerprint(L.Callback):
    """At the end of training, write this rank's global step and a digest of its LoRA weights to
    `<folder>/lora.rank<R>.json` (ranks of a DDP run must end with identical weights)."""

    def __init__(self, folder: str) -> None:
        self.folder = Path(folder)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        import hashlib

        h = hashlib.sha256()
        for name, t in sorted(pl_module.state_dict().items()):
            h.update(name.encode())
            h.update(t.detach().float().cpu().numpy().tobytes())
        self.folder.mkdir(parents=True, exist_ok=True)
        (self.folder / f"lora.rank{trainer.global_rank}.json").write_text(json.dumps(
            {"step": trainer.global_step, "digest": h.hexdigest(), "pid": os.getpid()}))


class SlowSampling(L.Callback):
    """Make the run's first sampled image take `seconds` longer (on the rank that samples): a slow sampling round."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        from fluxlora.callbacks import TimedSampler

        for cb in trainer.callbacks:
            renderer = getattr(cb, "_renderer", None) if isinstance(cb, TimedSampler) else None
            if renderer is not None:

                def slow(*args, _renderer=renderer, _render=renderer.render, **kwargs):
                    _renderer.render = _render  # once
                    time.sleep(self.seconds)
                    return _render(*args, **kwargs)

                renderer.render = slow


def read_batches(path: Path) -> list[dict]:
    return [json.loads(x) for x in Path(path).read_text().splitlines() if x.strip()]


def fluxlora_cmd(tmp_path: Path, *overrides: str, module: str = "fluxlora") -> list[str]:
    """A `python -m fluxlora` command line for a fast CPU run under tmp_path (the conftest defaults, as overrides)."""
    return [sys.executable, "-m", module, f"output.root={tmp_path / 'outputs'}", "trainer.accelerator=cpu",
            "trainer.max_epochs=2", "callbacks.progress=null", f"hydra.run.dir={tmp_path / 'hydra'}", *overrides]


def subprocess_env() -> dict:
    # one intra-op thread: on a busy 2-core CI box OpenMP barriers waiting for descheduled threads can stretch a
    # 0.1 s tiny step to seconds, which a test with a 3 s watchdog limit would (rightly) call a stall
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", PYTHONPATH=os.pathsep.join([str(TESTS), os.environ.get(
        "PYTHONPATH", "")]).rstrip(os.pathsep), PYTHONUNBUFFERED="1", HYDRA_FULL_ERROR="1", OMP_NUM_THREADS="1")
    return env


def run_cli(cmd: list[str], timeout: float, cwd: Path) -> subprocess.CompletedProcess:
    """Run a command with a hard timeout (a failing test must never hang CI); stdout+stderr merged."""
    return subprocess.run(cmd, cwd=cwd, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, timeout=timeout)


class StallingCheckpointIO:
    """An AtomicCheckpointIO whose write of `stall_file` stops half-way, blocked on a FIFO (a disk that hangs)."""

    def __new__(cls, stall_file: str, fifo: str, **kwargs: Any):
        from fluxlora.atomic import atomic_open
        from fluxlora.callbacks import AtomicCheckpointIO

        class _Stalling(AtomicCheckpointIO):
            def save_checkpoint(self, checkpoint, path, storage_options=None):
                if Path(path).name != stall_file:
                    return super().save_checkpoint(checkpoint, path, storage_options)
                import io

                import torch

                buf = io.BytesIO()
                torch.save(checkpoint, buf)
                with atomic_open(path, "wb") as f:
                    f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
                    f.flush()
                    _block("fifo", fifo)

        return _Stalling(**kwargs)
