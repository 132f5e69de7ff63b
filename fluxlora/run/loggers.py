"""The run's TensorBoard and CSV loggers, which a full or read-only disk turns into a warning, not a second error.

Logs are a record, not the product: when `logs/` cannot be written, the run warns once and goes on, and when a run
fails (Lightning then finalizes every logger), the user sees the run's own error rather than a second traceback on
`logs/csv/metrics.csv`. The checkpoint, LoRA and sample writes still fail loudly, naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Callable

from lightning.pytorch.loggers import CSVLogger, Logger, TensorBoardLogger

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


class TolerantCSVLogger(_Tolerant, CSVLogger):
    """Lightning's CSVLogger (`metrics.csv`); a failed write is a warning."""


class TolerantTensorBoardLogger(_Tolerant, TensorBoardLogger):
    """Lightning's TensorBoardLogger (event and hparams files); a failed write is a warning."""


def run_loggers(folder: Path) -> list[Logger]:
    """`<folder>/tensorboard` and `<folder>/csv/metrics.csv`, as the README lists them."""
    return [TolerantTensorBoardLogger(str(folder), name="tensorboard", version=""),
            TolerantCSVLogger(str(folder), name="csv", version="")]
