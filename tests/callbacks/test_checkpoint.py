"""AtomicCheckpointIO, its mirror, PeriodicCheckpoint and resume: whole files, bounded mirror, fallbacks, signals."""

import json
import logging
import os
import signal
import threading
import time
from pathlib import Path

import pytest
import torch

from fluxlora.callbacks import AtomicCheckpointIO, PeriodicCheckpoint
from fluxlora.callbacks.checkpoint_io import CheckpointMirror
from fluxlora.errors import FluxLoraError, RunInterrupted
from fluxlora.run.resume import plan_resume
from fluxlora.run.train import run

FAST = ("~callbacks.sampler", "callbacks.checkpoint.every_n_steps=2")


def _state(n: int) -> dict:
    return {"state_dict": {"w": torch.full((64,), float(n))}, "global_step": n, "loops": {}, "optimizer_states": []}


# ---- AtomicCheckpointIO ----

def test_failed_write_leaves_the_old_file_and_no_temp(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    path = tmp_path / "step00000001.ckpt"
    io.save_checkpoint(_state(1), path)

    def half_then_crash(obj, f, *a, **k):
        f.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", half_then_crash)
    with pytest.raises(OSError):
        io.save_checkpoint(_state(2), path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True)["global_step"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [path.name]


def test_last_is_a_hard_link_that_later_saves_never_touch(tmp_path):
    io = AtomicCheckpointIO()
    a, last = tmp_path / "step00000002.ckpt", tmp_path / "last.ckpt"
    io.save_checkpoint(_state(2), a)
    io.link(a, last)
    assert last.samefile(a)
    io.save_checkpoint(_state(3), a)  # a new inode replaces the name; last keeps the old, whole file
    assert torch.load(last, weights_only=True)["global_step"] == 2
    io.remove_checkpoint(a)
    assert torch.load(last, weights_only=True)["global_step"] == 2
    (tmp_path / ".step00000009.ckpt.abc.tmp").write_bytes(b"torn")
    assert [p.name for p in AtomicCheckpointIO.clean_stale_temps(tmp_path)] == [".step00000009.ckpt.abc.tmp"]


def test_mirror_copies_and_removes_in_the_background(tmp_path):
    io = AtomicCheckpointIO(mirror=str(tmp_path / "nas"), mirror_timeout_s=5)
    local = tmp_path / "ckpt"
    for n in (1, 2):
        io.save_checkpoint(_state(n), local / f"step{n:08d}.ckpt")
    io.link(local / "step00000002.ckpt", local / "last.ckpt")
    io.remove_checkpoint(local / "step00000001.ckpt")
    assert io.mirror.flush(10)
    assert sorted(p.name for p in (tmp_path / "nas").iterdir()) == ["last.ckpt", "step00000002.ckpt"]
    assert torch.load(tmp_path / "nas" / "last.ckpt", weights_only=True)["global_step"] == 2


def test_failing_mirror_is_retried_logged_and_never_touches_the_local_copy(tmp_path, caplog):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the mirror folder should be")
    io = AtomicCheckpointIO(mirror=str(blocker / "sub"), mirror_retries=2, mirror_retry_wait_s=0.01)
    path = tmp_path / "ckpt" / "step00000001.ckpt"
    t0 = time.monotonic()
    io.save_checkpoint(_state(1), path)
    assert time.monotonic() - t0 < 1.0  # the caller never waits for the mirror
    assert io.mirror.flush(10)
    assert io.mirror.failed == ["copy step00000001.ckpt"]
    assert len([r for r in caplog.records if "failed (attempt" in r.getMessage()]) == 3
    assert torch.load(path, weights_only=True)["global_step"] == 1


def test_stalled_mirror_never_blocks_training_and_catches_up_when_released(make_cfg, tmp_path, monkeypatch,
                                                                            caplog):
    caplog.set_level(logging.INFO)
    mirrors = []
    real_init = CheckpointMirror.__init__

    def recording_init(self, *a, **k):
        real_init(self, *a, **k)
        mirrors.append(self)

    monkeypatch.setattr(CheckpointMirror, "__init__", recording_init)
    nas = tmp_path / "nas"
    nas.mkdir()
    fifo = nas / f".step00000002.ckpt.{os.getpid()}.partial"
    os.mkfifo(fifo)  # the mirror's first write opens this and hangs, like a dead network mount
    cfg = make_cfg(*FAST, "name=mirrored", f"checkpoint_io.mirror={nas}", "checkpoint_io.mirror_timeout_s=1")
    t0 = time.monotonic()
    run(cfg)
    took = time.monotonic() - t0
    stall = [r for r in caplog.records if "stage 'checkpoint_mirror'" in r.getMessage()]
    assert len(stall) == 1 and "step00000002.ckpt" in stall[0].getMessage() and "abandoned" in stall[0].getMessage()
    saved2 = next(r for r in caplog.records if "step00000002.ckpt saved" in r.getMessage())
    assert stall[0].created - saved2.created < 1.0 + 1.0  # named within the mirror timeout + margin
    folder = Path(cfg.output.dir) / "checkpoints"
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and last["fluxlora_run"]["finished"]  # training completed meanwhile
    assert took < 60
    # release the hung "mount": the stuck copy errors out, the queued (coalesced) copies go through
    fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    os.close(fd)
    deadline = time.monotonic() + 10
    while mirrors[0].stalled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert mirrors[0].flush(30)
    fifo.unlink(missing_ok=True)
    assert torch.load(nas / "last.ckpt", weights_only=True)["global_step"] == 8


# ---- PeriodicCheckpoint + resume ----

def test_keep_last_k_plus_last_and_finished_marker(make_cfg):
    cfg = make_cfg(*FAST, "callbacks.checkpoint.keep_last=2")
    run(cfg)
    folder = Path(cfg.output.dir) / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["last.ckpt", "step00000006.ckpt", "step00000008.ckpt"]
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["fluxlora_run"]["finished"] and last["global_step"] == 8
    cbs = last["callbacks"]
    assert any("ResumeState" in k for k in cbs) and any("PeriodicCheckpoint" in k for k in cbs)
    rng = next(v for k, v in cbs.items() if "ResumeState" in k)["rng"]
    assert {"torch", "numpy", "python"} <= set(rng)
    assert last["optimizer_states"] and last["lr_schedulers"] and "loops" in last
    # a normal end cancels the watchdog: no monitor thread left, the heartbeat file says so
    assert json.loads((Path(cfg.output.dir) / "heartbeat.json").read_text())["state"] == "stopped"
    assert not [t for t in threading.enumerate() if t.name == "fluxlora-watchdog"]


def test_finished_run_rerun_with_resume_auto_does_nothing(make_cfg, capsys):
    cfg = make_cfg(*FAST)
    run(cfg)
    lora = Path(cfg.output.dir) / "flux-lora.safetensors"
    before = lora.stat().st_mtime_ns
    assert run(make_cfg(*FAST)) is None
    assert "is already complete at step 8" in capsys.readouterr().out
    assert lora.stat().st_mtime_ns == before
    run(make_cfg(*FAST, "trainer.max_epochs=3"))  # raising the limit trains further from the finished state
    last = torch.load(Path(cfg.output.dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 12


def test_broken_newest_checkpoint_is_reported_and_the_previous_one_used(make_cfg, caplog):
    cfg = make_cfg(*FAST, "+callbacks.sig._target_=helpers.faults.SignalAtStep", "+callbacks.sig.at_step=6")
    with pytest.raises(RunInterrupted):
        run(cfg)
    folder = Path(cfg.output.dir) / "checkpoints"
    newest = folder / "step00000006.ckpt"
    newest.write_bytes(newest.read_bytes()[:1000])  # torn by a disk that lied about fsync (last is the same inode)
    caplog.set_level(logging.INFO)
    plan = plan_resume(str(newest), folder, layout=PeriodicCheckpoint)
    assert plan.path == folder / "step00000004.ckpt" and "does not load" in plan.rejected[0]
    run(make_cfg(*FAST))
    assert any("step00000006.ckpt does not load" in r.getMessage() for r in caplog.records)
    last = torch.load(folder / "last.ckpt", weights_only=True)
    assert last["global_step"] == 8 and last["fluxlora_run"]["finished"]


def test_resume_errors_and_fresh_start(make_cfg, tmp_path):
    with pytest.raises(FluxLoraError, match="no such checkpoint"):
        run(make_cfg(*FAST, f"resume={tmp_path / 'nope.ckpt'}"))
    cfg = make_cfg(*FAST, "trainer.max_steps=2")
    run(cfg)
    with pytest.raises(FluxLoraError, match="other LoRA layers"):
        run(make_cfg(*FAST, "lora.rank=4"))
    run(make_cfg(*FAST, "trainer.max_steps=2", "resume=null", "lora.rank=4"))
    old = list(Path(cfg.output.dir).glob("checkpoints.old-*"))
    assert len(old) == 1 and (old[0] / "last.ckpt").is_file()


def test_sigterm_saves_at_the_step_boundary_and_the_cli_exits_143(make_cfg, capsys):
    from fluxlora.__main__ import main

    cfg = make_cfg(*FAST, "name=term", "+callbacks.sig._target_=helpers.faults.SignalAtStep", "+callbacks.sig.at_step=3",
                   f"+callbacks.sig.signum={int(signal.SIGTERM)}")
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(SystemExit) as e:
        main.__wrapped__(cfg)  # the Hydra entry point's body, as `python -m fluxlora` runs it
    assert e.value.code == 143
    err = capsys.readouterr().err
    assert "fluxlora: error: stopped by SIGTERM at step 3;" in err and "resume=auto" in err
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers  # restored
    last = torch.load(Path(cfg.output.dir) / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 3 and not last["fluxlora_run"]["finished"]  # 3 is not a periodic step
