"""The run's TensorBoard and CSV loggers, which a full or read-only disk turns into a warning, not a second error.

Logs are a record, not the product: when `logs/` cannot be written, the run warns once and goes on, and when a run
fails (Lightning then finalizes every logger), the user sees the run's own error rather than a second traceback on
`logs/csv/metrics.csv`. The checkpoint, LoRA and sample writes still fail loudly, naming the file.

A resumed run continues `metrics.csv`: Lightning's CSV writer deletes the file it finds, so a resume lost every row
logged before the checkpoint (seen in the sixth session). The rows of steps before the checkpoint stay; later rows,
which the resumed run logs again, go. TensorBoard is told the same step (`purge_step`): its reader drops the earlier
run's events from that step on, where the curves had two points per step after a resume.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any, Callable, Optional

from lightning.fabric.loggers.logger import rank_zero_experiment
from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger
from lightning.pytorch.loggers.csv_logs import ExperimentWriter

from fluxlora.atomic import atomic_write_text

log = logging.getLogger(__name__)


class _Tolerant:
    """Every method that writes to the disk: an OSError is a warning, the first time, and the write is dropped."""

    _warned = False

    def log_metrics(self, metrics: dict, step: int | None = None) -> None:
        self._quietly(super().log_metrics, metrics, step)

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        self._quietly(super().log_hyperparams, params, *args, **kwargs)

    def save(self) -> None:
        self._quietly(super().save)

    def finalize(self, status: str) -> None:
        self._quietly(super().finalize, status)

    def _quietly(self, write: Callable[..., Any], *args: Any, **kwargs: Any) -> None:
        try:
            write(*args, **kwargs)
        except Exception as e:
            err = e if isinstance(e, OSError) else e.__cause__  # TensorBoard wraps it in a ValueError
            if not isinstance(err, OSError):
                raise
            if not self._warned:
                self._warned = True
                log.warning("%s: logs under %s are not written from here on: %s", type(self).__name__,
                            self.log_dir, err)


class ResumingWriter(ExperimentWriter):
    """Lightning's CSV writer that, given the step a run resumes at, keeps the rows of `metrics.csv` logged before
    it instead of deleting the file (None: Lightning's behaviour, a fresh file)."""

    def __init__(self, log_dir: str, resume_step: Optional[int]) -> None:
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        path = Path(self.metrics_file_path)
        if self.resume_step is None or not path.is_file():
            super()._check_log_dir_exists()
            return
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for r in reader if _step(r) < self.resume_step]
            header = list(reader.fieldnames or [])
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=header, restval="", extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_text(path, text.getvalue())
        self.metrics_keys = header  # the rows this run logs line up under the same header (new keys rewrite it)


def _step(row: dict) -> float:
    try:
        return float(row.get("step") or "")
    except ValueError:
        return float("inf")  # a torn last line (no step) is dropped with the rows after the checkpoint


class TolerantCSVLogger(_Tolerant, CSVLogger):
    """Lightning's CSVLogger (`metrics.csv`); a failed write is a warning, and a resumed run (`resume_step`, the
    checkpoint's global step) continues the file."""

    def __init__(self, *args: Any, resume_step: Optional[int] = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._resume_step = resume_step

    @property
    @rank_zero_experiment  # as Lightning's: the other ranks get a no-op writer and never touch the file
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            self._fs.makedirs(self.root_dir, exist_ok=True)
            self._experiment = ResumingWriter(self.log_dir, self._resume_step)
        return self._experiment


class TolerantTensorBoardLogger(_Tolerant, TensorBoardLogger):
    """Lightning's TensorBoardLogger (event and hparams files); a failed write is a warning, and a resumed run
    (`resume_step`) has TensorBoard drop the events the interrupted run logged from that step on."""

    def __init__(self, *args: Any, resume_step: Optional[int] = None, **kwargs: Any) -> None:
        if resume_step is not None:
            kwargs["purge_step"] = resume_step  # SummaryWriter's: events of this folder at or after it are dropped
        super().__init__(*args, **kwargs)


def run_loggers(folder: Path, resume_step: Optional[int] = None) -> list[Logger]:
    """`<folder>/tensorboard` and `<folder>/csv/metrics.csv`, as the README lists them; `resume_step`: the global step
    of the checkpoint the run continues from (its CSV rows and TensorBoard events before that step are kept)."""
    return [TolerantTensorBoardLogger(str(folder), name="tensorboard", version="", resume_step=resume_step),
            TolerantCSVLogger(str(folder), name="csv", version="", resume_step=resume_step)]
