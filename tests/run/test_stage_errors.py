"""Failures a user can act on end a run with ONE line naming the stage: the GPU out of memory in each stage, a full or
read-only disk (a real tmpfs, a real read-only bind mount). Each asserts the line, the exit status, no traceback,
and that the earlier checkpoints still load.

The per-stage out-of-memory cases run `python -m fluxlora`'s body in-process (`main(cfg)`: Hydra's decorator passes
a given config straight through) with `torch.OutOfMemoryError` raised from a fake; one case and the disk cases run
the real CLI in a subprocess.
"""

from __future__ import annotations

import errno
import logging
import os
import shlex
import subprocess
from pathlib import Path

import pytest
import torch

from helpers.faults import fluxlora_cmd, run_cli
from fluxlora.errors import (DiskWriteFailed, FluxLoraError, OutOfGpuMemory, WriteFailed, oom_hint, stage_error,
                             write_error)
from fluxlora.run.resume import load_checked
from helpers.stage_faults import OOM_TEXT, oom

GiB = 1 << 30
OOM_LINE = "fluxlora: error: stage '{}' ran out of GPU memory ("
FAST = ("~callbacks.sampler", "trainer.max_steps=4", "callbacks.checkpoint.every_n_steps=1")


def _main(cfg, capsys, monkeypatch) -> tuple[int | None, list[str], str]:
    """Run `python -m fluxlora`'s body on `cfg`: (exit status or None when it returned, error lines, stderr)."""
    from fluxlora.__main__ import main

    monkeypatch.setattr(logging, "raiseExceptions", logging.raiseExceptions)  # main() switches it off
    capsys.readouterr()
    try:
        main(cfg)
        code = None
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err
    return code, [x for x in err.splitlines() if x.startswith("fluxlora: error:")], err


def _checkpoints_load(folder: Path, steps: set[int]) -> None:
    """Every checkpoint file in `folder` loads, and those of `steps` are there; no temp file is left."""
    files = sorted(folder.glob("*.ckpt"))
    assert {int(p.stem[4:]) for p in files if p.stem.startswith("step")} == steps, files
    for p in files:
        ckpt, why = load_checked(p)
        assert ckpt is not None, f"{p}: {why}"
    assert not [p for p in folder.iterdir() if p.name.startswith(".")], list(folder.iterdir())


# ---------------------------------------------------------------------------------------------------- the mapping


def test_out_of_memory_line_names_stage_use_limit_and_what_to_change():
    e = stage_error(torch.OutOfMemoryError(OOM_TEXT), "training_step")
    assert isinstance(e, OutOfGpuMemory) and e.exit_code != 0
    assert str(e).startswith("stage 'training_step' ran out of GPU memory (in use and limit unknown")
    assert "memory.blocks_to_swap" in str(e) and "data.resolution" in str(e)
    assert str(e).endswith("(the failed allocation asked for 2.00 GiB)")  # torch's request, from its message
    measured = OutOfGpuMemory("caching", int(10.74 * GiB), 11 * GiB)
    assert "(10.74 GiB of 11.00 GiB): lower data.cache_batch_size" in str(measured)
    assert "memory.base_storage=fp8" in oom_hint("load_model") and "sample.mode" in oom_hint("sampling")
    assert "\n" not in str(e)


def test_cuda_oom_text_in_a_runtime_error_counts_other_errors_do_not():
    assert isinstance(stage_error(RuntimeError("CUDA error: out of memory"), "build"), OutOfGpuMemory)
    assert stage_error(RuntimeError("mat1 and mat2 shapes cannot be multiplied"), "training_step") is None
    assert stage_error(ValueError("x"), "training_step") is None
    assert stage_error(FluxLoraError("already named"), "training_step") is None


def test_disk_errors_name_the_destination_and_reads_are_not_writes():
    full = OSError(errno.ENOSPC, "No space left on device")
    try:  # torch's writer raises its own error while handling the disk's
        try:
            raise full
        except OSError:
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
    except RuntimeError as chained:
        assert write_error(chained) is full
    e = stage_error(WriteFailed(errno.EROFS, "Read-only file system", "/o/x.ckpt"), "checkpoint_save")
    assert isinstance(e, DiskWriteFailed)
    assert str(e).startswith("stage 'checkpoint_save' could not write /o/x.ckpt: Read-only file system; make it")
    assert stage_error(PermissionError(errno.EACCES, "Permission denied", "/data/a.png"), "caching") is None
    assert isinstance(stage_error(WriteFailed(errno.EACCES, "Permission denied", "/o/a"), "x"), DiskWriteFailed)


def test_atomic_open_names_the_destination_not_the_temp_file(tmp_path, monkeypatch):
    from fluxlora import atomic

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(atomic.os, "fsync", full)
    dest = tmp_path / "sub" / "file.bin"
    with pytest.raises(WriteFailed) as e:
        atomic.atomic_write_bytes(dest, b"x" * 10)
    assert e.value.filename == str(dest) and e.value.errno == errno.ENOSPC
    assert list(dest.parent.iterdir()) == []  # the temp file is gone


# ---------------------------------------------------------------------------------------------------- out of memory


def _oom_in_loading(monkeypatch):
    from fluxlora.run import job as job_mod

    def load(*args, **kwargs):
        raise oom()

    monkeypatch.setattr(job_mod, "load_components", load)


def _oom_in_caching(monkeypatch):
    from fluxlora.run import job as job_mod

    class Encoders(job_mod.StagedEncoders):
        def images(self, images):
            raise oom()

    monkeypatch.setattr(job_mod, "StagedEncoders", Encoders)


def _oom_in_lora_save(monkeypatch):
    from fluxlora.callbacks import lora_saver

    def gather(*args, **kwargs):
        raise oom()

    monkeypatch.setattr(lora_saver, "kohya_state_dict", gather)


@pytest.mark.parametrize("stage, fault, overrides, kept", [
    ("load_model", _oom_in_loading, (), set()),
    ("caching", _oom_in_caching, (), set()),
    ("training_step", None, ("+callbacks.oom._target_=helpers.stage_faults.OomInStep", "+callbacks.oom.at_step=2"), {1, 2}),
    ("checkpoint_save", None, ("+callbacks.oom._target_=helpers.stage_faults.OomOnSave", "+callbacks.oom.at_step=3"), {1, 2}),
    ("lora_save", _oom_in_lora_save, (), {2, 3, 4}),  # keep_last=3
])
def test_out_of_memory_in_each_stage_is_one_line_naming_it(make_cfg, capsys, monkeypatch, stage, fault, overrides,
                                                            kept):
    if fault is not None:
        fault(monkeypatch)
    cfg = make_cfg(*FAST, *overrides)
    code, errors, err = _main(cfg, capsys, monkeypatch)
    assert code == 2, err[-2000:]
    assert len(errors) == 1 and errors[0].startswith(OOM_LINE.format(stage)), errors
    assert "Traceback" not in err
    out = Path(cfg.output.dir)
    _checkpoints_load(out / "checkpoints", kept) if kept else None
    assert not (out / "flux-lora.safetensors").exists()


def test_out_of_memory_line_carries_the_measured_use_and_limit(make_cfg, capsys, monkeypatch):
    from fluxlora.run import job as job_mod

    _oom_in_loading(monkeypatch)
    monkeypatch.setattr(job_mod, "memory_use", lambda: (int(6.92 * GiB), 7 * GiB))  # what the run reports
    code, errors_, _ = _main(make_cfg(*FAST), capsys, monkeypatch)
    assert code == 2 and errors_ == [
        "fluxlora: error: stage 'load_model' ran out of GPU memory (6.92 GiB of 7.00 GiB): use a smaller +vram tier, "
        "memory.base_storage=fp8 or more memory.blocks_to_swap (the failed allocation asked for 2.00 GiB)"]


def test_out_of_memory_while_sampling_switches_sampling_off_and_training_goes_on(make_cfg, capsys, monkeypatch,
                                                                                 caplog):
    from fluxlora.callbacks import sampler

    def copy(*args, **kwargs):
        raise oom()

    monkeypatch.setattr(sampler, "sampling_copy", copy)
    cfg = make_cfg("trainer.max_steps=4", "sample.every_n_steps=2", "sample.mode=thread")
    code, errors, err = _main(cfg, capsys, monkeypatch)
    assert code is None and errors == [], err[-2000:]
    assert (Path(cfg.output.dir) / "flux-lora.safetensors").is_file()
    assert "sampling disabled: the round of step 2 could not start: OutOfMemoryError" in caplog.text


def test_out_of_memory_inside_a_sampling_round_is_logged_and_training_goes_on(make_cfg, capsys, monkeypatch,
                                                                              caplog):
    from fluxlora.models.sampling import SampleRenderer

    calls = []

    def render(*args, **kwargs):
        calls.append(1)
        raise oom()

    monkeypatch.setattr(SampleRenderer, "render", render)
    cfg = make_cfg("trainer.max_steps=4", "sample.every_n_steps=1")
    code, errors, err = _main(cfg, capsys, monkeypatch)
    assert code is None and errors == [], err[-2000:]
    assert (Path(cfg.output.dir) / "flux-lora.safetensors").is_file()
    assert "sampling switched off: the round of step 1 ran out of GPU memory" in caplog.text
    assert len(calls) == 1  # every later round would run out the same way: none is started


@pytest.mark.slow
def test_out_of_memory_in_a_step_of_the_real_cli_is_one_line_and_exit_2(tmp_path):
    cmd = fluxlora_cmd(tmp_path, *FAST, "+callbacks.oom._target_=helpers.stage_faults.OomInStep", "+callbacks.oom.at_step=3")
    r = run_cli(cmd, timeout=180, cwd=tmp_path)
    errors = [x for x in r.stdout.splitlines() if x.startswith("fluxlora: error:")]
    assert r.returncode == 2, r.stdout[-3000:]
    assert len(errors) == 1 and errors[0].startswith(OOM_LINE.format("training_step")), r.stdout[-3000:]
    assert "Traceback" not in r.stdout
    _checkpoints_load(tmp_path / "outputs" / "flux-lora" / "checkpoints", {1, 2, 3})


# ---------------------------------------------------------------------------------------------------- disks


def _namespaces() -> str:
    """'' where this machine lets a test mount a tmpfs in its own user+mount namespace, else why not."""
    try:
        r = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"unshare -rm is not available: {e}"
    return "" if r.returncode == 0 else f"no user+mount namespace with tmpfs here: {r.stderr.strip()}"


@pytest.fixture(scope="module")
def namespaces():
    why = _namespaces()
    if why:
        pytest.skip(why)


def _in_namespace(tmp_path: Path, setup: str, cmd: list[str], after: str) -> subprocess.CompletedProcess:
    script = f"{setup} && {shlex.join(cmd)}; rc=$?; {after}; exit $rc"
    return run_cli(["unshare", "-rm", "sh", "-c", script], timeout=180, cwd=tmp_path)


@pytest.mark.slow
def test_full_disk_at_a_checkpoint_is_one_line_naming_the_file(tmp_path, namespaces):
    out, kept = tmp_path / "outputs", tmp_path / "kept"
    out.mkdir()
    cmd = fluxlora_cmd(tmp_path, *FAST, "+callbacks.fill._target_=helpers.stage_faults.FillDisk",
                       "+callbacks.fill.at_step=2", f"+callbacks.fill.path={out}")
    r = _in_namespace(tmp_path, f"mount -t tmpfs -o size=32m tmpfs {out}", cmd,
                      f"cp -a {out / 'flux-lora' / 'checkpoints'} {kept}")  # the tmpfs goes with the namespace
    errors = [x for x in r.stdout.splitlines() if x.startswith("fluxlora: error:")]
    assert r.returncode == 2, r.stdout[-3000:]
    step2 = out / "flux-lora" / "checkpoints" / "step00000002.ckpt"
    assert errors == [f"fluxlora: error: stage 'checkpoint_save' could not write {step2}: No space left on device; "
                      "free space there (or set output.root elsewhere), then run again: resume=auto continues from "
                      "the last checkpoint"], r.stdout[-3000:]
    assert "Traceback" not in r.stdout and "Logging error" not in r.stdout
    _checkpoints_load(kept, {1})


@pytest.mark.slow
def test_read_only_output_is_one_line_and_no_second_error_from_the_logs(tmp_path, namespaces):
    run_dir = tmp_path / "outputs" / "flux-lora"
    cmd = fluxlora_cmd(tmp_path, *FAST, "+callbacks.ro._target_=helpers.stage_faults.ReadOnlyDirs",
                       "+callbacks.ro.at_step=2", f"+callbacks.ro.root={run_dir}",
                       "+callbacks.ro.dirs=[checkpoints,logs/csv]")
    r = _in_namespace(tmp_path, "true", cmd, "true")
    errors = [x for x in r.stdout.splitlines() if x.startswith("fluxlora: error:")]
    assert r.returncode == 2, r.stdout[-3000:]
    assert len(errors) == 1 and errors[0].startswith(
        f"fluxlora: error: stage 'checkpoint_save' could not write {run_dir / 'checkpoints' / 'step00000002.ckpt'}: "
        "Read-only file system"), r.stdout[-3000:]
    assert "Traceback" not in r.stdout
    assert "logs under" in r.stdout and "metrics.csv" in r.stdout  # the logger's one warning
    _checkpoints_load(run_dir / "checkpoints", {1})
    assert os.access(run_dir / "checkpoints", os.W_OK)  # the bind mount went with the namespace
