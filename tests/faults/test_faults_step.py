"""Fault injection, for real, in a training subprocess: a step stuck in a C call, a checkpoint write that stalls.

Each asserts: detected within the limit + a small margin, the watchdog's exit status, the stage named in the
output and in monitor.log with every thread's stack, and the last checkpoint loads.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch

from helpers.faults import fluxlora_cmd, run_cli
from fluxlora.run.train import run

LIMIT = 3.0  # seconds; a tiny CPU step takes ~0.1 s, so only a real stall (or a badly overloaded box) trips it
COMMON = ("~callbacks.sampler", "callbacks.checkpoint.every_n_steps=2", f"callbacks.watchdog.step_timeout_s={LIMIT}",
          "callbacks.watchdog.setup_timeout_s=120")


def _started_blocking(monitor: Path, out: str) -> float:
    """When the child's last heartbeat was sent (the stall began right after it)."""
    beat = json.loads((monitor.parent / "heartbeat.json").read_text())
    assert beat["state"] == "stalled", out
    return float(beat["time"])


@pytest.mark.slow
def test_step_stuck_in_c_call_is_killed_by_the_watchdog(tmp_path):
    cmd = fluxlora_cmd(tmp_path, "name=stuck", *COMMON, "+callbacks.stuck._target_=helpers.faults.BlockInStep",
                       "+callbacks.stuck.at_step=5", "+callbacks.stuck.how=sleep")
    r = run_cli(cmd, timeout=180, cwd=tmp_path)
    ended = time.time()
    out_dir = tmp_path / "outputs" / "stuck"
    assert r.returncode == 75, r.stdout[-3000:]
    assert ended - _started_blocking(out_dir / "monitor.log", r.stdout) < LIMIT + 2.0
    assert "fluxlora: error: watchdog: no heartbeat for" in r.stdout and "stage 'training_step'" in r.stdout
    log = (out_dir / "monitor.log").read_text()
    assert "stage 'training_step' at step 5" in log and "phase train" in log
    assert "Current thread" in log and "in _block" in log and "in on_after_backward" in log  # the stuck frames
    assert log.count("Thread 0x") >= 1  # the other threads' stacks (main thread among them)
    ckpt = torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4


@pytest.mark.slow
def test_checkpoint_write_that_stalls_is_killed_then_resumed(tmp_path, make_cfg):
    fifo = tmp_path / "hung-disk"
    os.mkfifo(fifo)
    name = "stall"
    cmd = fluxlora_cmd(tmp_path, f"name={name}", *COMMON, "trainer.max_epochs=2",
                       "checkpoint_io._target_=helpers.faults.StallingCheckpointIO",
                       "+checkpoint_io.stall_file=step00000004.ckpt", f"+checkpoint_io.fifo={fifo}")
    r = run_cli(cmd, timeout=180, cwd=tmp_path)
    ended = time.time()
    out_dir = tmp_path / "outputs" / name
    assert r.returncode == 75, r.stdout[-3000:]
    assert ended - _started_blocking(out_dir / "monitor.log", r.stdout) < LIMIT + 2.0
    log = (out_dir / "monitor.log").read_text()
    assert "stage 'checkpoint_save' (step 4 (periodic)) at step 4" in log and "in save_checkpoint" in log
    folder = out_dir / "checkpoints"
    torn = [p for p in folder.iterdir() if p.name.startswith(".")]
    assert torn and not (folder / "step00000004.ckpt").exists()  # the half-written temp, never a checkpoint name
    assert torch.load(folder / "last.ckpt", weights_only=True)["global_step"] == 2
    # the same run again (resume=auto): the torn temp is removed, it continues from step 2 and completes
    cfg = make_cfg(f"name={name}", "~callbacks.sampler", "callbacks.checkpoint.every_n_steps=2")
    run(cfg)
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and last["fluxlora_run"]["finished"]


BACKSTOP = 2.0  # seconds faulthandler's C thread waits past the limit


@pytest.mark.slow
@pytest.mark.parametrize("at_step", [1, 5])
def test_step_holding_the_gil_is_ended_by_the_backstop_at_the_train_limit(tmp_path, at_step):
    """A C call that keeps the GIL starves the monitor thread; faulthandler's backstop, re-armed by the training
    thread when the phase switched to the short limit, ends the run at that limit (not at the setup limit)."""
    from fluxlora.supervise import Supervisor, Watch

    mark = tmp_path / "stall.json"
    name = f"gil{at_step}"
    cmd = fluxlora_cmd(tmp_path, f"name={name}", *COMMON, f"callbacks.watchdog.gil_backstop_s={BACKSTOP}",
                       "+callbacks.stuck._target_=helpers.faults.BlockInStep", f"+callbacks.stuck.at_step={at_step}",
                       "+callbacks.stuck.how=gil", f"+callbacks.stuck.mark={mark}")
    r = run_cli(cmd, timeout=120, cwd=tmp_path)  # the setup limit (120 s + backstop) would be a test timeout
    ended = time.time()
    out_dir = tmp_path / "outputs" / name
    assert r.returncode == 1, r.stdout[-3000:]  # faulthandler's exit
    assert ended - json.loads(mark.read_text())["time"] < LIMIT + BACKSTOP + 2.5
    log = (out_dir / "monitor.log").read_text()
    assert "Timeout (0:00:0" in log and "in _block" in log and "in on_after_backward" in log  # the stuck frames
    beat = json.loads((out_dir / "heartbeat.json").read_text())
    assert beat["phase"] == "train" and beat["timeout_s"] == LIMIT  # what the supervisor reads, not 120 s
    if at_step == 5:
        assert torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 4
    watch = Watch(out_dir / "heartbeat.json", out_dir / "monitor.log", 120.0, 75)
    cause = Supervisor([], watch)._cause(r.returncode, 0)  # README: "one the GIL backstop ended is restarted"
    assert cause is not None and cause.startswith("faulthandler's GIL backstop ended the child")
