"""Two-process DDP runs on the CPU (gloo), as real `python -m fluxlora trainer.devices=2` processes: a normal run, a
rank that stalls inside a step, a rank that is killed and restarted by the supervisor. Each has a hard outer timeout,
so a failing test can never hang CI; the collective timeout is a few seconds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers.faults import fluxlora_cmd, read_batches, run_cli, subprocess_env
from fluxlora.distributed.health import pid_alive
from fluxlora.run.resume import load_checked

TIMEOUT_S = 6  # distributed.timeout_s in these runs
DDP = ("trainer.devices=2", f"distributed.timeout_s={TIMEOUT_S}")


def _out(tmp_path: Path, name: str) -> Path:
    return tmp_path / "outputs" / name


def _fingerprints(folder: Path) -> list[dict]:
    return [json.loads((folder / f"lora.rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
def test_two_ranks_train_in_step_with_one_lora_file_and_sampling_on_rank_zero(tmp_path):
    """Both ranks train the same number of steps on disjoint batches and end with identical LoRA weights (the
    gradients are all-reduced); rank 0 alone writes the LoRA file, samples and checkpoints; a final sampling round
    longer than the collective timeout does not time out the other rank (it waits in a bounded barrier)."""
    marks = tmp_path / "marks"
    marks.mkdir()
    cmd = fluxlora_cmd(tmp_path, "name=ddp", *DDP, "trainer.max_epochs=2", "callbacks.checkpoint.every_n_steps=2",
                       "+callbacks.fp._target_=helpers.faults.LoraFingerprint", f"+callbacks.fp.folder={marks}",
                       "+callbacks.rec._target_=helpers.faults.BatchRecorder", f"+callbacks.rec.path={marks}/batches.jsonl",
                       "+callbacks.slow._target_=helpers.faults.SlowSampling", f"+callbacks.slow.seconds={TIMEOUT_S + 2}")
    t0 = time.monotonic()
    proc = run_cli(cmd, timeout=240, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-5000:]
    out = _out(tmp_path, "ddp")

    fp = _fingerprints(marks)
    assert fp[0]["step"] == fp[1]["step"] == 4  # 8 images, batch 2, 2 ranks: 2 steps per epoch each
    assert fp[0]["digest"] == fp[1]["digest"]  # gradient sync: the same weights on both ranks
    assert fp[0]["pid"] != fp[1]["pid"]
    batches = read_batches(marks / "batches.jsonl")
    for epoch in (0, 1):  # each rank trains its own half of every epoch
        seen = {r: [p for b in batches if b["rank"] == r and b["epoch"] == epoch for p in b["paths"]] for r in (0, 1)}
        assert len(seen[0]) == len(seen[1]) == 4 and not set(seen[0]) & set(seen[1]), seen

    assert sorted(p.name for p in out.glob("*.safetensors")) == ["ddp.safetensors"]
    assert len(list((out / "sample").glob("*_grid.png"))) == 1  # rank 0 sampled once, at the end
    assert "LoRA saved to" in proc.stdout and proc.stdout.count("LoRA saved to") == 1
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["fluxlora_run"]["finished"]
    assert json.loads((out / "heartbeat.rank1.json").read_text())["state"] == "stopped"
    images = [p for p in (out / "cache").glob("*.npz") if not p.name.startswith("text-")]
    assert len(images) == 8  # each rank cached its half
    assert list((out / "cache").glob("text-*.npz"))  # rank 0's sample prompts, for a resume to read
    assert "[rank 1] rank 1: all 2 ranks finished caching" in proc.stdout
    assert "are synchronised; 112 frozen tensors and 0 buffers are not" in proc.stdout  # LoRA-only sync
    assert f"collective timeout now {TIMEOUT_S}s" in proc.stdout
    print(f"normal 2-rank run: {time.monotonic() - t0:.1f}s")


@pytest.mark.slow
def test_a_rank_that_stalls_inside_a_step_ends_the_group_naming_it(tmp_path):
    fault = tmp_path / "fault.json"
    cmd = fluxlora_cmd(tmp_path, "name=stall", *DDP, "trainer.max_epochs=3", "~callbacks.sampler",
                       "callbacks.checkpoint.every_n_steps=1", "+callbacks.fault._target_=helpers.faults.RankFault",
                       "+callbacks.fault.rank=1", "+callbacks.fault.at_step=2", f"+callbacks.fault.once_file={fault}")
    proc = run_cli(cmd, timeout=240, cwd=tmp_path)
    ended = time.time()
    out = _out(tmp_path, "stall")
    assert proc.returncode == 75, proc.stdout[-5000:]
    stalled_at = json.loads(fault.read_text())
    took = ended - stalled_at["time"]
    assert took < TIMEOUT_S + 10, took  # the collective limit, the 2 s diagnosis, exit
    line = next(x for x in proc.stdout.splitlines() if x.startswith("fluxlora: error:"))
    assert f"stage 'distributed' made no progress for {TIMEOUT_S}s: rank 1 did not arrive (pid " \
           f"{stalled_at['pid']}" in line, line
    assert "in stage 'training_step' at step 2" in line and "this rank (0 of 2) saw:" in line
    assert pid_alive(stalled_at["pid"], None) is False  # rank 0 ended the stalled rank with it
    for ckpt in ("step00000001.ckpt", "step00000002.ckpt", "last.ckpt"):
        loaded, why = load_checked(out / "checkpoints" / ckpt)
        assert loaded is not None, why
    assert loaded["global_step"] == 2
    beat = json.loads((out / "heartbeat.json").read_text())
    assert beat["state"] == "exception" and "rank 1 did not arrive" in beat["error"]
    print(f"stall: group ended {took:.1f}s after rank 1 stalled")


@pytest.mark.slow
def test_a_killed_rank_ends_the_group_and_the_supervisor_resumes_it(tmp_path):
    """Rank 1 SIGKILLs itself at step 2: rank 0 names it and exits 75 at once, the supervisor restarts the whole group
    with resume=auto from the step-2 checkpoint, and the run completes with both ranks in step."""
    fault, marks = tmp_path / "fault.json", tmp_path / "marks"
    overrides = fluxlora_cmd(tmp_path, "name=kill", *DDP, "trainer.max_epochs=2", "~callbacks.sampler",
                             "callbacks.checkpoint.every_n_steps=1", "+callbacks.fault._target_=helpers.faults.RankFault",
                             "+callbacks.fault.rank=1", "+callbacks.fault.at_step=2", "+callbacks.fault.how=kill",
                             f"+callbacks.fault.once_file={fault}", "+callbacks.fp._target_=helpers.faults.LoraFingerprint",
                             f"+callbacks.fp.folder={marks}")[3:]
    cmd = [sys.executable, "-m", "fluxlora.supervise", "--grace-s=5", "--poll-s=0.2", *overrides]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=subprocess_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        stdout, _ = proc.communicate(timeout=240)
    finally:
        proc.kill()
    out = _out(tmp_path, "kill")
    assert proc.returncode == 0, stdout[-5000:]
    killed = json.loads(fault.read_text())
    log = (out / "monitor.log").read_text()
    first_exit = next(x for x in log.splitlines() if "exited with status 75" in x)
    took = time.mktime(time.strptime(first_exit[:19], "%Y-%m-%d %H:%M:%S")) - killed["time"]
    assert took < TIMEOUT_S + 3, took  # a dead peer is seen at once, not after the timeout
    cause = log.split("restart 1/3 with resume=auto; cause: ")[1].splitlines()[0]
    assert cause.startswith("the child ended with exit 75: stage 'distributed' failed: rank 1 died (pid "
                            f"{killed['pid']}"), cause
    assert "done: exit status 0" in log
    assert "Restoring states from the checkpoint path at" in stdout and "step00000002.ckpt" in stdout
    fp = _fingerprints(marks)
    assert fp[0]["step"] == fp[1]["step"] == 4 and fp[0]["digest"] == fp[1]["digest"]
    assert fp[1]["pid"] != killed["pid"]
    last = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["global_step"] == 4 and last["fluxlora_run"]["finished"]
    print(f"kill: rank 0 exited {took:.0f}s (1 s clock) after rank 1 was killed")


def _val_losses(out: Path) -> dict[int, float]:
    import csv

    with open(out / "logs" / "csv" / "metrics.csv", newline="") as f:
        return {int(r["step"]): float(r["val_loss"]) for r in csv.DictReader(f) if r.get("val_loss")}


@pytest.mark.slow
def test_two_ranks_score_the_validation_images_as_one_rank_does(tmp_path, make_cfg):
    """Each rank scores its share of the held-out images and one all-reduce adds them up: with the LoRA held at its
    start (lr 0, so both runs evaluate the same weights) two ranks log the validation loss one rank logs, at every
    step; the noise is fixed per image, so how the images are shared out does not change it."""
    common = ("trainer.max_epochs=-1", "trainer.max_steps=2", "validation.split=3", "validation.every_n_steps=1",
              "validation.batch_size=2", "optim.lr=0", "optim.warmup_steps=0", "~callbacks.sampler")
    from fluxlora.run.train import run

    run(make_cfg("name=val1", *common))  # one process, in this one (the same config as the command line's)
    two = run_cli(fluxlora_cmd(tmp_path, "name=val2", *DDP, *common), timeout=180, cwd=tmp_path)
    assert two.returncode == 0, two.stdout[-3000:]
    want, got = _val_losses(_out(tmp_path, "val1")), _val_losses(_out(tmp_path, "val2"))
    assert sorted(want) == sorted(got) == [1, 2]
    assert got == pytest.approx(want, rel=1e-5)
    assert "(3 images" in two.stdout
