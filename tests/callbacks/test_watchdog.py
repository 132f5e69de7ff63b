"""StepHeartbeatWatchdog: fires on a late heartbeat (stage + stacks to monitor.log, exit code), never on a live one."""

import json
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import fluxlora.heartbeat as wd
from fluxlora.callbacks import WATCHDOG_EXIT_CODE, StepHeartbeatWatchdog
from fluxlora.errors import FluxLoraError
from fluxlora.run.train import run


@pytest.fixture
def exits(monkeypatch):
    """Replace os._exit in the watchdog module: record (time, code) instead of ending pytest."""
    calls: list = []
    done = threading.Event()

    def fake_exit(code):
        calls.append((time.monotonic(), code))
        done.set()

    monkeypatch.setattr(wd, "_exit", fake_exit)
    yield calls, done


def _watchdog(tmp_path, **kw):
    kw = {"setup_timeout_s": 5.0, "step_timeout_s": 0.4, "poll_s": 0.05, "gil_backstop_s": None,
          "monitor_log": str(tmp_path / "monitor.log"), "heartbeat_file": str(tmp_path / "heartbeat.json"), **kw}
    return StepHeartbeatWatchdog(**kw)


@pytest.mark.parametrize("bad", [{"setup_timeout_s": 0}, {"step_timeout_s": -1}, {"step_timeout_s": "5"},
                                 {"gpu_idle_timeout_s": 0}, {"stage_timeouts": {"x": 0}}, {"exit_code": 0}])
def test_constructor_rejects_bad_values(bad):
    with pytest.raises(ValueError):
        StepHeartbeatWatchdog(**bad)


def test_late_heartbeat_dumps_stage_and_stacks_then_exits(tmp_path, exits):
    calls, done = exits
    w = _watchdog(tmp_path, setup_timeout_s=0.4)
    w.start("caching")
    t0 = time.monotonic()
    try:
        assert done.wait(0.4 + 1.0), "watchdog did not fire"
    finally:
        w._killer.cancel()
        w.stop()
    when, code = calls[0]
    assert code == WATCHDOG_EXIT_CODE == 75
    assert 0.4 <= when - t0 <= 0.4 + 0.5  # within the limit plus poll and a small margin
    log = (tmp_path / "monitor.log").read_text()
    assert "no heartbeat for" in log and "stage 'caching'" in log and "phase setup" in log
    assert "most recent call first" in log
    assert "in _check" in log  # the monitor thread's own stack is in the dump, with the others
    assert json.loads((tmp_path / "heartbeat.json").read_text())["state"] == "stopped"


def test_long_but_live_stage_never_fires(tmp_path, exits):
    calls, _ = exits
    w = _watchdog(tmp_path, setup_timeout_s=0.3)
    w.start("load_model")
    try:
        for i in range(30):  # 1.5 s of caching, five times the limit, with progress heartbeats
            w.progress(i, 30)
            time.sleep(0.05)
        beat = json.loads((tmp_path / "heartbeat.json").read_text())
    finally:
        w.stop()
    assert calls == []
    assert beat["stage"] == "caching" and beat["detail"].endswith("/30") and beat["timeout_s"] == 0.3
    assert beat["state"] == "running" and abs(beat["time"] - time.time()) < 1


def test_two_phases_long_limit_then_short(tmp_path, exits):
    calls, done = exits
    w = _watchdog(tmp_path, setup_timeout_s=3.0, step_timeout_s=0.3)
    w.start("setup")
    try:
        time.sleep(0.6)  # twice the short limit: still fine in the setup phase
        assert calls == []
        # in the order the callback does it (a beat, then the phase): the other way round, the monitor could judge
        # the setup phase's last beat, already 0.6 s old, by the short limit before the new beat came
        w.beat("training_step", step=7)
        w.enter_training_phase()
        assert done.wait(1.5)
    finally:
        w._killer.cancel()
        w.stop()
    assert "stage 'training_step' at step 7 (limit 0.3s, phase train)" in (tmp_path / "monitor.log").read_text()


def test_stage_timeout_overrides_the_phase_limit(tmp_path, exits):
    calls, done = exits
    w = _watchdog(tmp_path, step_timeout_s=0.3, stage_timeouts={"checkpoint_save": 2.0})
    w.start()
    w.enter_training_phase()
    try:
        w.beat("checkpoint_save")
        time.sleep(0.8)
        assert calls == []
        w.beat("between_steps")
        assert done.wait(1.5)
    finally:
        w._killer.cancel()
        w.stop()


def test_stop_cancels(tmp_path, exits):
    calls, _ = exits
    w = _watchdog(tmp_path, step_timeout_s=0.2)
    w.start()
    w.stop()
    time.sleep(0.5)
    assert calls == [] and not w.running and w not in wd._ACTIVE
    assert not [t for t in threading.enumerate() if t.name == "fluxlora-watchdog"]


def test_gpu_idle_inside_a_live_step_fires(tmp_path, exits):
    calls, done = exits
    w = _watchdog(tmp_path, step_timeout_s=5.0, gpu_idle_timeout_s=0.3)
    w.start()
    w._gpu_util = lambda: 0.0  # what NVML reports for a GPU that does nothing
    w.enter_training_phase()
    try:
        for _ in range(40):
            w.beat("training_step", step=3)  # the step keeps beating: only the GPU check can see the hang
            if done.wait(0.05):
                break
    finally:
        w._killer.cancel()
        w.stop()
    assert calls and "GPU at 0% for" in (tmp_path / "monitor.log").read_text()


def test_run_stops_the_watchdog_on_exception(make_cfg):
    cfg = make_cfg("~callbacks.sampler", "trainer.max_steps=3", "optim.lr=1e30", "train.nonfinite=stop")
    with pytest.raises(FluxLoraError, match="non-finite"):
        run(cfg)
    assert wd._ACTIVE == []
    assert not [t for t in threading.enumerate() if t.name == "fluxlora-watchdog"]
    beat = json.loads((Path(cfg.output.dir) / "heartbeat.json").read_text())
    assert beat["state"] == "exception"


_GIL_SCRIPT = textwrap.dedent("""
    import re, sys, time
    from fluxlora.heartbeat import HeartbeatMonitor
    folder = sys.argv[1]
    kw = dict(setup_timeout_s=0.5, step_timeout_s=0.5, poll_s=0.05, gil_backstop_s=0.5,
              monitor_log=folder + "/monitor.log")
    w = HeartbeatMonitor(**kw)
    w.start("first")
    w.stop()
    time.sleep(1.5)  # a cancelled watchdog's backstop must not fire
    print("still alive", flush=True)
    w = HeartbeatMonitor(**kw)
    w.start("regex")
    time.sleep(0.2)
    print("entering", time.time(), flush=True)
    re.match(r"(a+)+$", "a" * 40 + "b")  # catastrophic backtracking: minutes in C, holding the GIL
    print("not reached", flush=True)
""")


@pytest.mark.slow
def test_gil_held_by_a_c_call_is_caught_by_the_faulthandler_backstop(tmp_path):
    r = subprocess.run([sys.executable, "-c", _GIL_SCRIPT, str(tmp_path)], capture_output=True, text=True, timeout=60)
    ended = time.time()
    assert "still alive" in r.stdout and "not reached" not in r.stdout
    assert r.returncode == 1
    entered = float(r.stdout.split("entering")[1].split()[0])
    assert ended - entered < 0.5 + 0.5 + 1.5  # limit + backstop + exit margin
    log = (tmp_path / "monitor.log").read_text()
    assert "Timeout (" in log and "in <module>" in log


def test_phase_switch_rewrites_the_heartbeat_file_from_the_calling_thread(tmp_path, exits):
    w = _watchdog(tmp_path, setup_timeout_s=60.0, step_timeout_s=3.0, poll_s=30.0)  # the monitor: never again
    w.start("setup")
    try:
        time.sleep(0.2)
        w.beat("between_steps", step=1)
        w.enter_training_phase()
        beat = json.loads((tmp_path / "heartbeat.json").read_text())
    finally:
        w.stop()
    assert beat["phase"] == "train" and beat["timeout_s"] == 3.0 and beat["stage"] == "between_steps"


_GIL_AFTER_SWITCH = textwrap.dedent("""
    import re, sys, time
    from fluxlora.heartbeat import HeartbeatMonitor
    w = HeartbeatMonitor(setup_timeout_s=60, step_timeout_s=0.5, poll_s=30, gil_backstop_s=0.5,
                         stage_timeouts={"checkpoint_save": 60}, monitor_log=sys.argv[1] + "/monitor.log")
    w.start("setup")
    time.sleep(0.2)  # the monitor thread is asleep for 30 s: only the training thread can re-arm the backstop
    w.enter_training_phase()
    if sys.argv[2] == "stage":  # a stage with a long limit, then back to the short one
        w.beat("checkpoint_save")
        w.beat("between_steps")
    print("entering", time.time(), flush=True)
    re.match(r"(a+)+$", "a" * 40 + "b")  # minutes in C, holding the GIL
    print("not reached", flush=True)
""")


@pytest.mark.slow
@pytest.mark.parametrize("change", ["phase", "stage"])
def test_backstop_follows_a_limit_change_made_just_before_the_gil_is_held(tmp_path, change):
    r = subprocess.run([sys.executable, "-c", _GIL_AFTER_SWITCH, str(tmp_path), change], capture_output=True,
                       text=True, timeout=60)
    ended = time.time()
    assert r.returncode == 1 and "not reached" not in r.stdout, r.stderr[-2000:]
    entered = float(r.stdout.split("entering")[1].split()[0])
    assert ended - entered < 0.5 + 0.5 + 1.5  # the short limit + backstop + exit margin, not the 60 s ones
    assert "Timeout (" in (tmp_path / "monitor.log").read_text()
