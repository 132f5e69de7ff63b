"""The run's loggers (fluxlora/run/loggers.py): a resumed run continues `metrics.csv` (Lightning's writer deleted
it), keeping the rows of the steps before the checkpoint and dropping the later ones the resume logs again; a fresh
run starts a fresh file; a disk that refuses the log is a warning."""

from __future__ import annotations

import csv
import os

import pytest

from fluxlora.run.loggers import TolerantCSVLogger, run_loggers


def _rows(path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _earlier_run(folder, steps: int = 8) -> str:
    logger = TolerantCSVLogger(str(folder), name="csv", version="")
    for step in range(steps):
        logger.log_metrics({"train/loss": 1.0 / (step + 1), "lr": 1e-4}, step=step)
    logger.save()
    path = os.path.join(logger.log_dir, "metrics.csv")
    with open(path, "a") as f:
        f.write("0.0001,")  # torn: the process died mid-line (columns lr, step, train/loss)
    return path


def test_a_resumed_run_continues_the_csv(tmp_path):
    path = _earlier_run(tmp_path)
    csv_logger = run_loggers(tmp_path, resume_step=5)[1]
    csv_logger.log_metrics({"train/loss": 0.5, "lr": 1e-4}, step=5)
    csv_logger.log_metrics({"train/loss": 0.4, "lr": 1e-4, "val_loss": 0.7}, step=6)  # a key the file lacks
    csv_logger.save()
    rows = _rows(path)
    assert [int(r["step"]) for r in rows] == [0, 1, 2, 3, 4, 5, 6]
    assert float(rows[4]["train/loss"]) == pytest.approx(0.2) and float(rows[5]["train/loss"]) == 0.5
    assert rows[6]["val_loss"] == "0.7" and rows[0]["val_loss"] == ""


def test_a_fresh_run_starts_a_fresh_csv(tmp_path):
    path = _earlier_run(tmp_path)
    with pytest.warns(UserWarning, match="will be deleted"):
        csv_logger = run_loggers(tmp_path)[1]
        csv_logger.log_metrics({"train/loss": 0.9}, step=0)
    csv_logger.save()
    assert [r["step"] for r in _rows(path)] == ["0"]


def test_a_log_folder_that_cannot_be_written_is_a_warning(tmp_path, caplog):
    (tmp_path / "csv").write_text("a file where the folder should be")
    csv_logger = run_loggers(tmp_path, resume_step=3)[1]
    with caplog.at_level("WARNING", logger="fluxlora.run.loggers"):
        csv_logger.log_metrics({"train/loss": 0.9}, step=3)
        csv_logger.save()
    assert "TolerantCSVLogger: logs under" in caplog.text


def _scalars(folder) -> dict[int, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder / "tensorboard"))  # TensorBoard's own reader, purging as it does
    events.Reload()
    return {e.step: e.value for e in events.Scalars("train/loss")}


def test_a_resumed_run_has_one_tensorboard_point_per_step(tmp_path):
    first = run_loggers(tmp_path)[0]
    for step in range(8):  # the interrupted run logged up to step 7; its checkpoint is at step 5
        first.log_metrics({"train/loss": 1.0}, step=step)
    first.finalize("failed")
    resumed = run_loggers(tmp_path, resume_step=5)[0]
    for step in (5, 6):
        resumed.log_metrics({"train/loss": 0.5}, step=step)
    resumed.finalize("success")
    assert _scalars(tmp_path) == {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0, 4: 1.0, 5: 0.5, 6: 0.5}
