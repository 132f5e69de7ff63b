"""The validation loss (issue 19): held-out images never trained on, a value that only the LoRA changes, training
that validation leaves exactly as it was, the best LoRA kept across a resume, one-line config errors, val_loss in the
CSV and the loss curve. In-process runs of the tiny default on the CPU."""

from __future__ import annotations

import csv
import json
import logging
from pathlib import Path

import lightning as L
import pytest
import torch
from helpers.data_fakes import make_folder
from helpers.faults import read_batches
from safetensors.torch import load_file

from fluxlora.callbacks import LoRASaver, ValidationLoss
from fluxlora.data.holdout import hold_out
from fluxlora.data.images import ImageRecord
from fluxlora.errors import FluxLoraError
from fluxlora.run import job as job_mod
from fluxlora.run.settings import check_config
from fluxlora.run.train import run

FAST = ("~callbacks.sampler", "output.dtype=fp32")


def _add_callback(monkeypatch, name: str, callback: L.Callback) -> None:
    real = job_mod.build_callbacks
    monkeypatch.setattr(job_mod, "build_callbacks", lambda *a, **k: {**real(*a, **k), name: callback})


def _val_rows(cfg) -> list[tuple[int, float]]:
    with open(Path(cfg.output.dir) / "logs" / "csv" / "metrics.csv") as f:
        return [(int(r["step"]), float(r["val_loss"])) for r in csv.DictReader(f) if r.get("val_loss")]


class _Probe(L.Callback):
    """At `step`: evaluate twice more and record the values, and the RNG, mode and autocast state around them."""

    def __init__(self, step: int) -> None:
        self.step, self.seen = step, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        val = next(c for c in trainer.callbacks if isinstance(c, ValidationLoss))
        rng = torch.get_rng_state()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=False):
            first = val.evaluate(trainer, pl_module)
            autocast_after = torch.is_autocast_enabled("cpu")
        second = val.evaluate(trainer, pl_module)
        self.seen = {"values": (first, second), "logged": val.history[-1], "rng_same": torch.equal(rng, torch.get_rng_state()),
                     "train_mode": all(m.training for m in pl_module.modules()), "autocast": autocast_after}


def test_evaluation_is_deterministic_and_leaves_rng_mode_and_autocast_alone(make_cfg, monkeypatch):
    probe = _Probe(step=2)
    _add_callback(monkeypatch, "probe", probe)
    cfg = make_cfg(*FAST, "trainer.max_steps=3", "validation.split=2", "validation.every_n_steps=2")
    run(cfg)
    seen = probe.seen
    first, second = seen["values"]
    assert first == second == seen["logged"][1] and seen["logged"][0] == 2  # the callback's own pass at step 2 too
    assert seen["rng_same"] and seen["train_mode"] and seen["autocast"] is False


def test_held_out_images_are_cached_logged_and_never_trained_on(make_cfg, tmp_path, caplog, capsys):
    rec = tmp_path / "batches.jsonl"
    cfg = make_cfg(*FAST, "trainer.max_epochs=2", "validation.split=0.25", "validation.every_n_steps=2",
                   "+callbacks.rec._target_=helpers.faults.BatchRecorder", f"+callbacks.rec.path={rec}")
    with caplog.at_level(logging.INFO, logger="fluxlora"):
        run(cfg)
    line = next(r.getMessage() for r in caplog.records if "held out" in r.getMessage())
    assert "validation: 2 of the 8 images held out" in line
    held = {n.strip() for n in line.rsplit(":", 1)[1].split(",")}
    trained = {p for b in read_batches(rec) for p in b["paths"]}
    assert len(held) == 2 and len(trained) == 6 and not held & trained
    manifest = json.loads((Path(cfg.output.dir) / "cache" / "manifest.json").read_text())
    assert len(manifest["files"]) == 8  # the held-out images are cached with the rest
    rows = _val_rows(cfg)
    assert [s for s, _ in rows] == [2, 4, 6]  # 3 steps per epoch (6 images, batch 2): every 2 steps, and the end
    assert (Path(cfg.output.dir) / "loss_curve.png").is_file()
    best_step, best = min(rows, key=lambda r: r[1])
    assert f"validation loss best {best:.4f} at step {best_step}" in capsys.readouterr().out


def test_the_split_depends_on_seed_and_names_only():
    records = [ImageRecord(Path(f"/data/set/img_{i}.png"), "x") for i in range(20)]
    moved = [ImageRecord(Path(f"/elsewhere/set/img_{i}.png"), "x") for i in reversed(range(20))]
    names = lambda recs, idx: {recs[i].path.name for i in idx}  # noqa: E731
    assert names(records, hold_out(records, 0.2, seed=0)) == names(moved, hold_out(moved, 0.2, seed=0))
    assert len(hold_out(records, 0.2, 0)) == 4 and len(hold_out(records, 3, 0)) == 3
    assert hold_out(records, 4, seed=0) != hold_out(records, 4, seed=1)
    with pytest.raises(FluxLoraError, match="holds out 20 of the 20 images"):
        hold_out(records, 20, 0)


def test_training_is_unchanged_by_validation(make_cfg, tmp_path):
    """Same LoRA after 4 steps with validation at every step as without (a separate folder: same training data)."""
    folder = make_folder(tmp_path / "val", 2, (64, 64))
    plain = make_cfg(*FAST, "trainer.max_steps=4", "name=plain")
    validated = make_cfg(*FAST, "trainer.max_steps=4", "name=validated", f"validation.path={folder}",
                         "validation.every_n_steps=1")
    run(plain)
    run(validated)
    a = load_file(str(Path(plain.output.dir) / "plain.safetensors"))
    b = load_file(str(Path(validated.output.dir) / "validated.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = _val_rows(validated)
    assert [s for s, _ in rows] == [1, 2, 3, 4] and len({v for _, v in rows}) == 4  # it moves with the LoRA
    assert _val_rows(plain) == []


def test_keep_best_writes_the_lowest_and_a_resume_keeps_it(make_cfg, monkeypatch):
    losses = {2: 3.0, 4: 1.0, 6: 2.0, 8: 1.5}  # faked: the best is step 4, and the resumed steps never beat it
    monkeypatch.setattr(ValidationLoss, "evaluate", lambda self, trainer, pl_module: losses[trainer.global_step])
    writes = []
    real_save = LoRASaver.save

    def save(self, pl_module, stem, trainer):
        writes.append((stem, trainer.global_step))
        return real_save(self, pl_module, stem, trainer)

    monkeypatch.setattr(LoRASaver, "save", save)
    common = (*FAST, "trainer.max_epochs=10", "validation.split=2", "validation.every_n_steps=2",
              "validation.keep_best=true")
    run(make_cfg(*common, "trainer.max_steps=4"))
    cfg = make_cfg(*common, "trainer.max_steps=8")  # the same name: resume=auto continues from step 4
    run(cfg)
    assert [w for w in writes if w[0].endswith("-best")] == [("flux-lora-best", 2), ("flux-lora-best", 4)]
    assert (Path(cfg.output.dir) / "flux-lora-best.safetensors").is_file()
    state = next(v for k, v in torch.load(Path(cfg.output.dir) / "checkpoints" / "last.ckpt",
                                          weights_only=True)["callbacks"].items() if "ValidationLoss" in k)
    assert (state["best"], state["best_step"]) == (1.0, 4)
    assert state["history"] == [[2, 3.0], [4, 1.0], [6, 2.0], [8, 1.5]]
    assert _val_rows(cfg)[-2:] == [(6, 2.0), (8, 1.5)]


@pytest.mark.parametrize(("overrides", "expect"), [
    (["validation.split=-1"], "validation.split=-1 must be a count of images"),
    (["validation.split=1.5"], "validation.split=1.5 must be a count of images"),
    (["validation.split=2", "validation.path=/x"], "validation.split=2 and validation.path='/x': give one of them"),
    (["validation.every_n_steps=-3"], "validation.every_n_steps=-3 must be a whole number >= 0"),
    (["validation.every_n_steps=often"], "validation.every_n_steps='often' must be a whole number"),
    (["validation.sigmas=[0.5,1.5]"], "validation.sigmas: 1.5 is not a number in (0, 1]"),
    (["validation.sigmas=[]"], "validation.sigmas=[] needs at least one σ"),
    (["validation.seed=abc"], "validation.seed='abc' must be a whole number"),
    (["validation.batch_size=0"], "validation.batch_size=0 must be a whole number >= 1"),
    (["validation.keep_best=yes"], "validation.keep_best='yes' must be true or false"),
    (["validation.keep_best=true", "~callbacks.lora_saver"], "validation.keep_best=true needs callbacks.lora_saver"),
    (["+validation.every=3"], "unknown key(s) ['every'] for validation"),
])
def test_config_mistakes_are_one_line_naming_the_key(make_cfg, overrides, expect):
    with pytest.raises(FluxLoraError) as e:
        check_config(make_cfg(*overrides))
    assert expect in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(("override", "expect"), [
    ("validation.split=8", "validation.split=8 holds out 8 of the 8 images"),
    ("validation.path={missing}", "validation.path: dataset folder {missing} does not exist"),
])
def test_validation_data_mistakes_end_before_the_model_loads(make_cfg, monkeypatch, tmp_path, override, expect):
    def no_loading(*args, **kwargs):
        raise AssertionError("the model loader was called before the validation data was checked")

    monkeypatch.setattr(job_mod, "load_components", no_loading)
    missing = tmp_path / "no_such_folder"
    with pytest.raises(FluxLoraError) as e:
        run(make_cfg(override.format(missing=missing)))
    assert expect.format(missing=missing) in str(e.value) and "\n" not in str(e.value)


def test_ranks_share_the_validation_batches_each_image_once(tmp_path):
    from fluxlora.data import FluxDataModule
    from fluxlora.data.cache import CacheEntry
    from fluxlora.data.settings import DataSettings

    dm = FluxDataModule({}, cache_dir=tmp_path)
    dm.settings = DataSettings(subsets=(), batch_size=2)
    buckets = [(64, 64), (64, 128), (64, 64), (64, 64), (64, 128)]
    dm.val_entries = [CacheEntry(tmp_path / f"{i}.npz", tmp_path / f"{i}.png", b) for i, b in enumerate(buckets)]
    alone = dm.validation_plan(rank=0, world_size=1)
    assert alone == [[0, 2], [3], [1, 4]]  # one bucket per batch, in a fixed order
    shares = [dm.validation_plan(rank=r, world_size=2) for r in range(2)]
    assert sorted(i for share in shares for batch in share for i in batch) == list(range(5))
    assert dm.validation_plan(batch_size=5, rank=0, world_size=1) == [[0, 2, 3], [1, 4]]
