"""Supervisor: a frozen child (SIGSTOP) is detected from its stale heartbeat, killed and resumed; the run completes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.faults import fluxlora_cmd, subprocess_env
from fluxlora.supervise import Supervisor, Watch, main

LIMIT, GRACE = 3.0, 1.0


def _beat(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _state(pid: int) -> str:
    """The process state letter from /proc (R, S, T = stopped, Z = zombie), "" when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


def _kill_if_ours(pid: int, marker: str) -> None:
    """SIGKILL `pid` only if it is still a process of this test (its command line names the test's folder)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            if marker.encode() in f.read():
                os.kill(pid, signal.SIGKILL)
    except OSError:
        pass


def _gone(pid: int) -> bool:
    return _state(pid) in ("", "Z")  # a zombie is dead, only not yet reaped


@pytest.mark.slow
def test_frozen_child_is_killed_and_resumed_to_completion(tmp_path):
    overrides = fluxlora_cmd(tmp_path, "name=sup", "~callbacks.sampler", "trainer.max_epochs=3",
                             "callbacks.checkpoint.every_n_steps=2", f"callbacks.watchdog.step_timeout_s={LIMIT}",
                             "+callbacks.slow._target_=helpers.faults.SlowStep", "+callbacks.slow.seconds=0.25")[3:]
    cmd = [sys.executable, "-m", "fluxlora.supervise", f"--grace-s={GRACE}", "--poll-s=0.2", *overrides]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    out_dir = tmp_path / "outputs" / "sup"
    child = None
    try:
        deadline = time.monotonic() + 120
        while _beat(out_dir / "heartbeat.json").get("step", 0) < 3 and time.monotonic() < deadline:
            time.sleep(0.05)
        child = _beat(out_dir / "heartbeat.json")["pid"]
        os.kill(child, signal.SIGSTOP)  # frozen: its own watchdog thread is frozen too
        frozen = time.monotonic()
        while _state(child) not in ("T", "", "Z") and time.monotonic() - frozen < 2:
            time.sleep(0.01)  # the kernel delivers the stop asynchronously
        assert _state(child) == "T", "the child was not running any more when it was frozen"
        while not _gone(child) and time.monotonic() - frozen < 30:
            time.sleep(0.05)
        killed_after = time.monotonic() - frozen
        out, _ = proc.communicate(timeout=180)
    finally:
        proc.kill()
        for pid in {child, _beat(out_dir / "heartbeat.json").get("pid")} - {None}:
            _kill_if_ours(pid, str(tmp_path))  # a child has its own session: it outlives a killed supervisor
    assert proc.returncode == 0, out[-4000:]
    assert killed_after < LIMIT + GRACE + 1.5, killed_after  # the child's limit + grace + polling margin
    log = (out_dir / "monitor.log").read_text()
    assert f"child pid {child} is stale: last heartbeat" in log and "in stage '" in log
    first = log.split("restart 1/3 with resume=auto; cause: ")[1]
    assert first.startswith("heartbeat stale") and "done: exit status 0" in log
    assert "resume=auto" in first.split("\n")[1]  # the restarted command line
    last = torch.load(out_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12 and last["fluxlora_run"]["finished"]
    assert "Restoring states from the checkpoint" in out


def test_exit_statuses_decide_restarts(tmp_path, monkeypatch):
    """Watchdog exits and deaths by signal are restarted (bounded); config errors and success pass through."""
    statuses = iter([75, -9, 75, 75])
    watch = Watch(tmp_path / "hb.json", tmp_path / "monitor.log", 10.0, 75)
    sup = Supervisor(["name=x"], watch, max_restarts=3, grace_s=0, poll_s=0.01)
    monkeypatch.setattr(sup, "_run_once", lambda: (rc := next(statuses), sup._cause(rc, 0)))
    assert sup.run() == 75 and sup.restarts == 3
    assert "giving up after 3 restart(s)" in watch.monitor_log.read_text()
    for rc, restarts in ((0, 0), (2, 0), (143, 0)):
        sup = Supervisor(["name=x", "resume=null"], watch, max_restarts=3, poll_s=0.01)
        monkeypatch.setattr(sup, "_run_once", lambda rc=rc: (rc, sup._cause(rc, 0)))
        assert sup.run() == rc and sup.restarts == restarts
    sup.restarts = 1
    assert sup.command()[-2:] == ["name=x", "resume=auto"]  # a restart drops the user's resume= for auto


def test_refuses_sweeps():
    with pytest.raises(SystemExit) as e:
        main(["-m", "optim.lr=1e-4,2e-4"])
    assert e.value.code == 2
