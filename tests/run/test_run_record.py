"""A failed or empty attempt never destroys the record of a good run: `config.yaml` is written when training starts,
a finished run re-run says "already complete" before loading anything and rewrites none of its files, and every
attempt keeps its own config in Hydra's `runs/<time>/.hydra/`.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from helpers.faults import fluxlora_cmd, run_cli
from fluxlora.errors import FluxLoraError
from fluxlora.run.train import run

FAST = ("~callbacks.sampler", "trainer.max_steps=2")
RECORD = ("config.yaml", "heartbeat.json", "cache/manifest.json")


def _stamp(out: Path) -> dict[str, tuple[bytes, int]]:
    """Bytes and mtime of the files a finished run's re-run must leave alone (its LoRA too)."""
    return {name: ((out / name).read_bytes(), (out / name).stat().st_mtime_ns)
            for name in (*RECORD, f"{out.name}.safetensors")}


@pytest.fixture
def finished(make_cfg) -> Path:
    """A finished run's output folder."""
    cfg = make_cfg(*FAST)
    run(cfg)
    return Path(cfg.output.dir)


def test_rerun_of_a_finished_run_is_complete_before_loading_and_rewrites_nothing(finished, make_cfg, monkeypatch,
                                                                              capsys):
    from fluxlora.run import job as job_mod

    before = _stamp(finished)
    capsys.readouterr()

    def load(*args, **kwargs):
        raise AssertionError("a finished run must not load the model")

    monkeypatch.setattr(job_mod, "load_components", load)
    t0 = time.monotonic()
    assert run(make_cfg(*FAST)) is None
    assert time.monotonic() - t0 < 5.0
    assert "run 'flux-lora' is already complete at step 2" in capsys.readouterr().out
    assert _stamp(finished) == before


def test_bad_attempts_under_a_finished_name_keep_its_config(finished, make_cfg, tmp_path):
    before = _stamp(finished)
    for overrides in (["optim.lr=abc"], ["resume=null", "data=folder", f"data.path={tmp_path / 'nope'}"]):
        with pytest.raises(FluxLoraError):
            run(make_cfg(*FAST, *overrides))
    assert (finished / "config.yaml").read_bytes() == before["config.yaml"][0]
    assert (finished / "config.yaml").stat().st_mtime_ns == before["config.yaml"][1]


def test_config_yaml_is_the_config_of_the_run_that_trained(make_cfg):
    cfg = make_cfg(*FAST, "lora.rank=4")
    run(cfg)
    written = OmegaConf.load(Path(cfg.output.dir) / "config.yaml")
    assert written.lora.rank == 4 and written.output.dir == cfg.output.dir  # resolved


@pytest.mark.slow
def test_every_attempt_keeps_its_config_in_its_runs_folder(tmp_path):
    out = tmp_path / "outputs" / "rec"

    def attempt(*overrides: str):
        cmd = [c for c in fluxlora_cmd(tmp_path, "name=rec", *FAST, *overrides) if not c.startswith("hydra.run.dir=")]
        t0 = time.monotonic()
        r = run_cli(cmd, timeout=180, cwd=tmp_path)
        return r, time.monotonic() - t0

    r, _ = attempt()
    assert r.returncode == 0, r.stdout[-3000:]
    before = _stamp(out)
    r, seconds = attempt()
    assert r.returncode == 0 and "is already complete at step 2" in r.stdout, r.stdout[-3000:]
    assert "loading model" not in r.stdout and seconds < 60  # start-up (imports) only
    r, _ = attempt("optim.lr=abc")
    assert r.returncode == 2 and "fluxlora: error: optim.lr='abc' is not a number" in r.stdout, r.stdout[-3000:]
    assert _stamp(out) == before
    runs = sorted((out / "runs").iterdir())
    assert len(runs) == 3 and all((d / ".hydra" / "config.yaml").is_file() for d in runs), runs
    assert "optim.lr=abc" in (runs[-1] / ".hydra" / "overrides.yaml").read_text()
