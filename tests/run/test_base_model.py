"""A run name reused for another base model: its checkpoint is neither resumed nor called complete (checked before
loading, one line naming both models); the Kontext and Chroma presets have run names of their own."""

from __future__ import annotations

import pytest
import torch

from fluxlora.errors import FluxLoraError
from fluxlora.run.train import run

FAST = ("trainer.max_steps=2", "~callbacks.sampler", "~callbacks.model_card")


def test_a_finished_run_of_another_base_model_is_not_complete_and_is_refused_before_loading(make_cfg, monkeypatch):
    from fluxlora.run import job as job_mod

    first = make_cfg(*FAST)
    run(first)
    ckpt = torch.load(f"{first.output.dir}/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["fluxlora"]["base_model"] == {"preset": "tiny", "path": None, "transformer": None}

    def load(*args, **kwargs):
        raise AssertionError("the mismatch must be found before the model loads")

    monkeypatch.setattr(job_mod, "load_components", load)
    with pytest.raises(FluxLoraError, match=r"trained on another base model \(model.preset=tiny; this run: "
                                            r"model.preset=flux-dev, model.path=/models/dev\)"):
        run(make_cfg(*FAST, "model=flux-dev", "model.path=/models/dev", "name=flux-lora"))


def test_kontext_and_chroma_presets_name_their_own_runs(make_cfg):
    assert make_cfg("model=tiny-kontext").name == "kontext-lora"
    assert make_cfg("model=tiny-chroma").name == "chroma-lora"
    assert make_cfg().name == "flux-lora"


@pytest.mark.slow
def test_the_cli_names_the_other_base_model_in_one_line_and_exits_2(make_cfg, tmp_path):
    from helpers.faults import fluxlora_cmd, run_cli

    run(make_cfg(*FAST))  # outputs/flux-lora: a finished run on the tiny model
    proc = run_cli(fluxlora_cmd(tmp_path, *FAST, "model=flux-dev", "model.path=/models/dev"), 240, tmp_path)
    errors = [line for line in proc.stdout.splitlines() if line.startswith("fluxlora: error:")]
    assert proc.returncode == 2, proc.stdout[-2000:]
    assert len(errors) == 1 and "trained on another base model (model.preset=tiny;" in errors[0], errors
    assert "Traceback" not in proc.stdout and "loading model" not in proc.stdout
