"""StageClock (fluxlora/run/stage_clock.py): where a run's time went. Steady s/step leaves out steps that met a
new bucket shape (they compile) and steps a sampling round fell into; the first step and each new shape's first
step are logged, so a user sees what compiling cost; `stages.json` holds it all."""

from __future__ import annotations

import json
from types import SimpleNamespace

import torch

from fluxlora.run import stage_clock
from fluxlora.run.stage_clock import StageClock


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _train(sc: StageClock, trainer: SimpleNamespace, clock: _Clock, plan: list) -> None:
    """One optimizer step per (latents, seconds it takes) of `plan`, as Lightning calls the hooks."""
    for i, (latents, took) in enumerate(plan):
        sc.on_train_batch_start(trainer, None, {"latents": latents}, i)
        clock.now += took
        trainer.global_step += 1
        sc.on_train_batch_end(trainer, None, None, {"latents": latents}, i)


def test_steady_speed_leaves_out_new_shapes_and_sampling_rounds(monkeypatch, tmp_path, caplog):
    clock = _Clock()
    monkeypatch.setattr(stage_clock.time, "monotonic", clock)
    sc = StageClock("cpu", tmp_path / "stages.json")
    trainer = SimpleNamespace(global_step=0)
    sc.begin("load")
    clock.now += 2.0
    sc.begin("cache")
    clock.now += 3.0
    sc.on_train_start(trainer, None)
    square, wide = torch.zeros(1, 16, 64, 64), torch.zeros(1, 16, 48, 80)
    # step: (latents, seconds it takes); step 1 compiles, step 3 meets a new shape, step 5 has a sampling round
    plan = [(square, 30.0), (square, 0.5), (wide, 12.0), (square, 0.5), (square, 9.5), (wide, 0.5), (wide, 0.5)]
    with caplog.at_level("INFO", logger="fluxlora.run.stage_clock"):
        _train(sc, trainer, clock, plan)
        sc.on_train_end(trainer, None)
        clock.now += 4.0  # end-of-training callbacks, then Lightning's teardown
        sc.on_fit_end(trainer, None)
        clock.now += 1.0
        result = sc.finish(sampled={4: 9.0})
    assert result["stages"]["load"]["s"] == 2.0 and result["stages"]["cache"]["s"] == 3.0
    assert result["stages"]["after_steps"]["s"] == 4.0 and result["stages"]["after_fit"]["s"] == 1.0
    assert result["stages"]["first_step"]["s"] == 30.0
    assert result["steady_s_per_step"] == 0.5 and result["steady_steps"] == 4  # steps 2, 4, 6, 7
    assert result["new_shape_steps_s"] == {"3": 12.0} and result["shapes"] == 2
    assert result["sampling_rounds_s"] == {"4": 9.0}
    assert "first step: 30.0 s" in caplog.text
    assert "step 3: first batch of shape 1x16x48x80 took 12.0 s" in caplog.text
    assert json.loads((tmp_path / "stages.json").read_text()) == result


def test_with_accumulation_the_first_step_is_the_first_optimizer_step(monkeypatch, caplog):
    clock = _Clock()
    monkeypatch.setattr(stage_clock.time, "monotonic", clock)
    sc = StageClock("cpu")
    trainer = SimpleNamespace(global_step=0)
    sc.on_train_start(trainer, None)
    latents = torch.zeros(1, 16, 64, 64)
    with caplog.at_level("INFO", logger="fluxlora.run.stage_clock"):
        for i, took in enumerate([20.0, 5.0, 0.5, 0.5]):  # two batches per optimizer step
            sc.on_train_batch_start(trainer, None, {"latents": latents}, i)
            clock.now += took
            trainer.global_step += i % 2
            sc.on_train_batch_end(trainer, None, None, {"latents": latents}, i)
    assert "first step: 25.0 s" in caplog.text
    assert sc.steps == [{"step": 2, "s": 1.0, "new_shape": False}]


def test_repeat_shape_steps_far_slower_than_the_fastest_are_listed_and_logged(monkeypatch, caplog):
    """A step of a shape seen before, without a sampling round, that takes many times the fastest (on the H200 a run
    without a tier spent 42 s in two such steps) is named in `slow_steps_s` and in the log; sub-second jitter is not."""
    clock = _Clock()
    monkeypatch.setattr(stage_clock.time, "monotonic", clock)
    sc = StageClock("cpu")
    trainer = SimpleNamespace(global_step=0)
    sc.on_train_start(trainer, None)
    square, wide = torch.zeros(1, 16, 64, 64), torch.zeros(1, 16, 48, 80)
    plan = [(square, 30.0), (wide, 20.0), (square, 21.0), (wide, 19.5), (square, 2.0), (wide, 2.1), (square, 0.3),
            (wide, 0.9)]
    with caplog.at_level("INFO", logger="fluxlora.run.stage_clock"):
        _train(sc, trainer, clock, plan)
        sc.on_train_end(trainer, None)
        result = sc.finish()
    assert result["new_shape_steps_s"] == {"2": 20.0}
    assert result["slow_steps_s"] == {"3": 21.0, "4": 19.5, "5": 2.0, "6": 2.1}  # not step 8: 0.9 s is under 1 s
    assert "step 3 21.0 s, step 4 19.5 s, step 5 2.0 s, step 6 2.1 s" in caplog.text


def test_host_memory_peak_is_recorded_per_stage(monkeypatch, tmp_path, caplog):
    """The process's peak resident set at each stage's end (pinned copies of swapped blocks live there) is in each
    stage, the summary and its log line. getrusage is faked: a real process's peak is inherited across exec and
    includes whatever the test worker held before."""
    import resource

    peaks_kib = iter([1 << 20, 3 << 20, 3 << 20, 5 << 20])  # 1, 3, 3, 5 GiB at successive reads (Linux: KiB)
    monkeypatch.setattr(stage_clock.resource, "getrusage",
                        lambda who: SimpleNamespace(ru_maxrss=next(peaks_kib)))
    sc = StageClock("cpu", tmp_path / "stages.json")
    sc.begin("load")
    sc.begin("cache")
    sc.begin("build")
    with caplog.at_level("INFO", logger="fluxlora.run.stage_clock"):
        result = sc.finish()
    assert {k: v["host_peak_gib"] for k, v in result["stages"].items()} == {"load": 1.0, "cache": 3.0, "build": 3.0}
    assert result["host_peak_gib"] == 5.0 and "host peak 5.00 GiB" in caplog.text
    monkeypatch.undo()
    real = stage_clock.host_peak_gib()
    assert abs(real - resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1 << 20)) < 0.01
