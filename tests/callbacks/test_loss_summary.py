"""LossSummary carries the losses in its checkpoint state: a resumed run summarises and draws the whole run (the
first steps' mean came from the resumed tail before, and the curve started at the resume)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from fluxlora.callbacks import LossSummary


def _feed(cb: LossSummary, trainer, losses: list[float]) -> None:
    for loss in losses:
        trainer.global_step += 1
        cb.on_train_batch_end(trainer, None, {"loss": torch.tensor(loss)}, None, 0)


def test_a_resumed_summary_holds_the_whole_run(tmp_path, capsys):
    trainer = SimpleNamespace(global_step=0, is_global_zero=True)
    first = LossSummary(str(tmp_path), window=2)
    _feed(first, trainer, [2.0, 1.8, 1.6])
    state = first.state_dict()  # what the checkpoint at step 3 holds
    assert state == {"losses": pytest.approx([2.0, 1.8, 1.6]), "steps": [1, 2, 3]}

    resumed = LossSummary(str(tmp_path), window=2)
    resumed.load_state_dict(state)
    _feed(resumed, trainer, [1.2, 1.0, 0.8])
    assert resumed.values() == pytest.approx([2.0, 1.8, 1.6, 1.2, 1.0, 0.8])
    assert resumed.state_dict()["steps"] == [1, 2, 3, 4, 5, 6]
    resumed.on_train_end(trainer, None)
    assert resumed.first_mean == pytest.approx(1.9) and resumed.last_mean == pytest.approx(0.9)
    assert "first 2 steps 1.9000 -> last 2 steps 0.9000 (falling)" in capsys.readouterr().out
    assert (tmp_path / "loss_curve.png").stat().st_size > 0
