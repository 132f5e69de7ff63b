"""Resume equivalence: a run interrupted (SIGINT at a step) and resumed equals an uninterrupted run, its LoRA and
its `metrics.csv` (Lightning's CSV writer used to delete the rows logged before the resume)."""

import csv
from pathlib import Path

import pytest
import torch

from helpers.faults import read_batches
from fluxlora.errors import RunInterrupted
from fluxlora.run.train import run

# 8 images, batch 2: 4 steps per epoch, 12 steps in all; no sampling, fp32 everywhere
BASE = ("trainer.max_epochs=3", "~callbacks.sampler", "callbacks.checkpoint.every_n_steps=2",
        "callbacks.checkpoint.keep_last=2", "output.dtype=fp32")


def _ckpt(cfg) -> dict:
    return torch.load(Path(cfg.output.dir) / "checkpoints" / "last.ckpt", weights_only=True)


def _logged(cfg) -> dict[int, float]:
    """step -> train/loss as `metrics.csv` holds it."""
    with open(Path(cfg.output.dir) / "logs" / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("train/loss")]
    steps = [int(r["step"]) for r in rows]
    assert len(steps) == len(set(steps)), f"a step logged twice: {steps}"
    return {int(r["step"]): float(r["train/loss"]) for r in rows}


def _recorded(make_cfg, tmp_path, name, *extra):
    rec = tmp_path / f"{name}.jsonl"
    return make_cfg(*BASE, f"name={name}", "+callbacks.rec._target_=helpers.faults.BatchRecorder",
                    f"+callbacks.rec.path={rec}", *extra), rec


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run (shared by the tests below): its last checkpoint and its batches."""
    from conftest import compose_cfg

    tmp = tmp_path_factory.mktemp("reference")
    cfg, rec = _recorded(lambda *o: compose_cfg(tmp / "outputs", *o), tmp, "ref")
    run(cfg)
    return _ckpt(cfg), read_batches(rec), _logged(cfg)


def _interrupted_then_resumed(make_cfg, tmp_path, at_step: int):
    cut, rec = _recorded(make_cfg, tmp_path, "cut", "+callbacks.sig._target_=helpers.faults.SignalAtStep",
                         f"+callbacks.sig.at_step={at_step}")
    with pytest.raises(RunInterrupted) as info:
        run(cut)
    assert info.value.exit_code == 130 and f"at step {at_step}" in str(info.value)
    assert _ckpt(cut)["global_step"] == at_step
    resumed, _ = _recorded(make_cfg, tmp_path, "cut")  # same name, resume=auto (the default)
    run(resumed)
    return _ckpt(resumed), read_batches(rec), _logged(resumed)


def _assert_equivalent(make_cfg, tmp_path, reference, at_step: int) -> None:
    ref, ref_batches, ref_logged = reference
    got, batches, logged = _interrupted_then_resumed(make_cfg, tmp_path, at_step)
    # every row but that of the step the signal stopped (Lightning logs a step's row after the callbacks' batch-end
    # hooks, where the stop is raised; the resume does not repeat that step), each once, with the same loss
    want = {s: v for s, v in ref_logged.items() if s != at_step - 1}
    assert logged.keys() == want.keys(), "metrics.csv lost or repeated rows on resume"
    assert logged == pytest.approx(want, rel=1e-5)
    assert got["global_step"] == ref["global_step"] == 12
    assert [b["step"] for b in batches] == list(range(12))  # every step ran exactly once
    assert batches == ref_batches, "data order differs"
    assert got["state_dict"].keys() == ref["state_dict"].keys()
    for k, v in ref["state_dict"].items():
        torch.testing.assert_close(got["state_dict"][k], v, rtol=0, atol=1e-6, msg=k)


def test_resume_at_epoch_boundary_equals_uninterrupted_run(make_cfg, tmp_path, reference):
    _assert_equivalent(make_cfg, tmp_path, reference, at_step=8)  # end of epoch 2 of 3


def test_resume_mid_epoch_equals_uninterrupted_run(make_cfg, tmp_path, reference):
    _assert_equivalent(make_cfg, tmp_path, reference, at_step=6)  # half-way through epoch 2


def test_a_resume_stopped_by_the_epoch_limit_says_so(make_cfg, caplog):
    """More max_steps on a run whose max_epochs is already reached trains nothing: the run says why in one line."""
    run(make_cfg("trainer.max_epochs=1", "trainer.max_steps=-1", "~callbacks.sampler"))
    caplog.set_level("WARNING")
    run(make_cfg("trainer.max_epochs=1", "trainer.max_steps=50", "~callbacks.sampler"))
    assert any("trained no further: trainer.max_epochs=1 is already reached" in r.getMessage() for r in caplog.records)
