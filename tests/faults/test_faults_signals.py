"""SIGTERM / SIGINT sent to the whole process group (`timeout`, `kill -- -PGID`, Ctrl-C in a terminal), for real.

The run is a subprocess in its own session with 2 DataLoader workers; the signal goes to its group with os.killpg.
Each asserts: the main process owns the stop (the workers do not die of it), a checkpoint of the step boundary is
saved and loads, exit 143 / 130 with one `fluxlora: error:` line, no worker left behind, and resume=auto completes.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch

from helpers.faults import fluxlora_cmd, subprocess_env
from fluxlora.run.train import run

WORKERS = ("data.num_workers=2",)  # the folder preset's default; the demo's synthetic data reads in-process


def _start(tmp_path: Path, name: str, *overrides: str) -> tuple[subprocess.Popen, Path]:
    log = tmp_path / f"{name}.out"
    cmd = fluxlora_cmd(tmp_path, f"name={name}", "~callbacks.sampler", *WORKERS, *overrides)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own group, as a shell job or a service has
    return proc, log


def _wait_for(predicate, proc: subprocess.Popen, log: Path, what: str, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"the run ended before {what}: {log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout:g}s"
        time.sleep(0.05)


def _signal_group(proc: subprocess.Popen, sig: int) -> tuple[int, float]:
    """Send `sig` to the run's whole process group, as `timeout`/systemd/SLURM do; (its exit status, seconds it took
    to end). A run that does not end within 60 s is killed with SIGKILL, and the test fails on its status."""
    t0 = time.monotonic()
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
    try:
        return proc.wait(timeout=60), time.monotonic() - t0
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        return proc.wait(), time.monotonic() - t0


def _children(pid: int) -> list[int]:
    return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


def _step(heartbeat: Path) -> int:
    try:
        return int(json.loads(heartbeat.read_text())["step"])
    except (OSError, ValueError, KeyError):
        return -1


def _gone(pids: list[int], timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(Path(f"/proc/{p}").exists() and "State:\tZ" not in _status(p) for p in pids):
            return True
        time.sleep(0.05)
    return False


def _status(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return ""


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_to_the_whole_group_saves_the_boundary_step_and_resume_completes(tmp_path, make_cfg, sig):
    name = f"group-{sig.name.lower()}"
    proc, log = _start(tmp_path, name, "callbacks.checkpoint.every_n_steps=100",
                       "+callbacks.slow._target_=helpers.faults.SlowStep", "+callbacks.slow.seconds=0.3")
    out_dir = tmp_path / "outputs" / name
    try:
        _wait_for(lambda: _step(out_dir / "heartbeat.json") >= 2, proc, log, "step 2")
        workers = _children(proc.pid)
        assert len(workers) >= 2, workers  # the DataLoader workers are running: the signal reaches a real group
    finally:
        rc, _ = _signal_group(proc, sig)
    out = log.read_text()
    assert rc == 128 + sig, out[-3000:]
    errors = [x for x in out.splitlines() if x.startswith("fluxlora: error:")]
    assert len(errors) == 1 and errors[0].startswith(f"fluxlora: error: stopped by {sig.name} at step "), errors
    assert "Traceback" not in out and "terminate called" not in out and "killed by signal" not in out
    step = int(errors[0].split(" at step ")[1].split(";")[0])
    ckpt = torch.load(out_dir / "checkpoints" / f"step{step:08d}.ckpt", weights_only=True)
    assert ckpt["global_step"] == step and not ckpt["fluxlora_run"]["finished"]
    assert _gone(workers), "a DataLoader worker outlived the run"
    # resume=auto (the default) continues from the boundary step to the same final step
    run(make_cfg(f"name={name}", "~callbacks.sampler", *WORKERS, "callbacks.checkpoint.every_n_steps=100"))
    last = torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and last["fluxlora_run"]["finished"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_signal_before_training_starts_is_one_line_and_its_status(tmp_path, sig):
    """Loading/caching/building: nothing to save yet; the process ends at once with one line, not a traceback."""
    mark = tmp_path / "building"
    name = f"early-{sig.name.lower()}"
    proc, log = _start(tmp_path, name, "+callbacks.slow._target_=helpers.faults.SlowStart", "+callbacks.slow.seconds=300",
                       f"+callbacks.slow.mark={mark}")
    try:
        _wait_for(mark.exists, proc, log, "the slow build")
    finally:
        rc, took = _signal_group(proc, sig)
    out = log.read_text()
    assert rc == 128 + sig, out[-3000:]
    errors = [x for x in out.splitlines() if x.startswith("fluxlora: error:")]
    assert errors == [f"fluxlora: error: stopped by {sig.name} in stage 'trainer_setup', outside the training steps: nothing "
                      "was saved at this point; earlier checkpoints are intact (run again with resume=auto)"], errors
    assert "Traceback" not in out
    assert took < 15, took
    beat = json.loads((tmp_path / "outputs" / name / "heartbeat.json").read_text())
    assert beat["state"] == "exception" and beat["error"].startswith("StopSignal: stopped by")
