r"""PeriodicCheckpoint: checkpoints every N steps and/or minutes, the last K kept plus `last`, and on SIGTERM/SIGINT."""

from __future__ import annotations

import logging
import re
import signal
import threading
import time
from pathlib import Path
from typing import Any, Optional

import lightning as L
from lightning.pytorch.callbacks import Checkpoint
from typing_extensions import override

from fluxlora.callbacks.checkpoint_io import AtomicCheckpointIO
from fluxlora.distributed.strategy import agree_max
from fluxlora.errors import RunInterrupted
from fluxlora.heartbeat import heartbeat
from fluxlora.process_exit import StopSignal, clear_stop, request_stop, stop_requested

log = logging.getLogger(__name__)

LAST = "last.ckpt"
STEP_FILE = re.compile(r"^step(\d{8,})\.ckpt$")
RUN_KEY = "fluxlora_run"
"""Top-level checkpoint key: {"finished": bool, "max_steps": int, "max_epochs": int|None, "global_step": int}."""


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def step_file(step: int) -> str:
    return f"step{step:08d}.ckpt"


class PeriodicCheckpoint(Checkpoint):
    """Save a resumable checkpoint every N optimizer steps and/or every M minutes, keep the last K, plus `last`.

    Guarantee: a run always leaves a checkpoint that loads (with :class:`~fluxlora.callbacks.AtomicCheckpointIO` as
    the trainer's CheckpointIO every file is whole or absent), and a SIGTERM or SIGINT ends the run only after a
    checkpoint of the step that was running has been saved: the signal is noted, the step finishes, the checkpoint
    is written at that step boundary and :class:`~fluxlora.errors.RunInterrupted` ends the run (exit status 143 for
    SIGTERM, 130 for SIGINT); a second SIGINT stops at once. Saves happen only where an optimizer step has just
    finished, never inside a gradient-accumulation window; the ranks of a DDP run agree in one all-reduce per step (a
    signal on any rank stops them all, rank 0's clock decides a time-based save) and save the same step. The last
    save of a completed run is marked finished, which is how ``resume=auto`` knows there is nothing left to do.
    Checkpoints hold what the LightningModule's ``state_dict`` returns (in fluxlora: the LoRA weights only),
    optimizer, schedulers, loop position, DataModule and callback states.

    Args:
        dirpath: the run's checkpoint folder (``outputs/<name>/checkpoints``).
        every_n_steps: save every N optimizer steps; None or 0 = off.
        every_n_minutes: save when this many minutes passed since the last save; None or 0 = off.
        keep_last: how many ``stepNNNNNNNN.ckpt`` files to keep (older ones are removed); -1 = all.
        save_last: keep ``last.ckpt`` pointing at the newest checkpoint.
        save_on_signal: on SIGTERM/SIGINT, save at the next step boundary and stop.
        save_on_train_end: save the final state, marked finished.

    Example::

        trainer = Trainer(callbacks=[PeriodicCheckpoint("outputs/mychar/checkpoints", every_n_steps=100,
                                                        every_n_minutes=30, keep_last=3)],
                          plugins=[AtomicCheckpointIO()])
    """

    def __init__(self, dirpath: str, every_n_steps: Optional[int] = 50, every_n_minutes: Optional[float] = None,
                 keep_last: int = 3, save_last: bool = True, save_on_signal: bool = True,
                 save_on_train_end: bool = True) -> None:
        super().__init__()
        if every_n_steps is not None and (not isinstance(every_n_steps, int) or every_n_steps < 0):
            raise ValueError(f"every_n_steps must be a non-negative int or None, got {every_n_steps!r}")
        if every_n_minutes is not None and (not isinstance(every_n_minutes, (int, float)) or every_n_minutes < 0):
            raise ValueError(f"every_n_minutes must be a non-negative number or None, got {every_n_minutes!r}")
        if not isinstance(keep_last, int) or keep_last < -1:
            raise ValueError(f"keep_last must be an int >= -1, got {keep_last!r}")
        self._dir = Path(dirpath)
        self._every_steps = every_n_steps or 0
        self._every_s = float(every_n_minutes or 0) * 60.0
        self._keep = keep_last
        self._save_last = bool(save_last)
        self._on_signal = bool(save_on_signal)
        self._on_end = bool(save_on_train_end)
        self._last_save_t = time.monotonic()
        self._boundary_step = -1  # global_step seen at the previous batch end
        self._saved_step = -1
        self._finished = False
        self._signal: Optional[int] = None
        self._handlers: dict[int, Any] = {}
        self.checkpoints: list[Path] = []

    LAST = LAST
    RUN_KEY = RUN_KEY

    @property
    def dirpath(self) -> Path:
        return self._dir

    # ---- the folder's layout: how a run finds what this callback wrote (resume=auto) ----

    @staticmethod
    def step_of(path: Path) -> Optional[int]:
        """The step of a ``stepNNNNNNNN.ckpt`` file; None for any other name (``last.ckpt``)."""
        m = STEP_FILE.match(Path(path).name)
        return int(m.group(1)) if m else None

    @classmethod
    def checkpoints_in(cls, folder: Path) -> list[Path]:
        """The checkpoints in `folder`, newest first: ``stepNNNNNNNN.ckpt`` by step, then ``last.ckpt`` unless it is
        a link to one of them."""
        folder = Path(folder)
        if not folder.is_dir():
            return []
        steps = ((cls.step_of(p), p) for p in folder.glob("step*.ckpt"))
        found = [p for _, p in sorted(((s, p) for s, p in steps if s is not None), reverse=True)]
        last = folder / LAST
        if last.is_file() and not any(_same_file(last, p) for p in found):
            found.append(last)
        return found

    @staticmethod
    def clean_folder(folder: Path) -> list[Path]:
        """Remove what a killed save left in `folder` (the atomic IO's temp files); the files removed."""
        return AtomicCheckpointIO.clean_stale_temps(folder) if Path(folder).is_dir() else []

    # ---- saving ----

    def save(self, trainer: L.Trainer, reason: str = "periodic", then: str = "between_steps") -> Path:
        """Write ``stepNNNNNNNN.ckpt`` for the current step, repoint ``last.ckpt``, prune old files; then heartbeat
        stage `then`."""
        step = trainer.global_step
        heartbeat("checkpoint_save", f"step {step} ({reason})")
        path = self._dir / step_file(step)
        t0 = time.monotonic()
        trainer.save_checkpoint(path)
        if trainer.is_global_zero:
            if self._save_last:
                io = trainer.strategy.checkpoint_io
                if hasattr(io, "link"):
                    io.link(path, self._dir / LAST)
                else:
                    trainer.save_checkpoint(self._dir / LAST)
            self._prune(trainer)
        self._saved_step = step
        self._last_save_t = time.monotonic()
        self.checkpoints.append(path)
        log.info("checkpoint %s saved in %.2fs (%s)", path, self._last_save_t - t0, reason)
        self._flush_logs(trainer)
        heartbeat(then)
        return path

    @staticmethod
    def _flush_logs(trainer: L.Trainer) -> None:
        """Write the loggers' pending rows with the checkpoint (Lightning's CSV logger holds up to 100 steps in
        memory), so a run killed later still has on disk the metrics of the steps its resume will not repeat."""
        for logger in trainer.loggers:
            try:
                logger.save()
            except Exception as e:  # a log is a record: it never fails a saved checkpoint
                log.warning("%s not flushed with the checkpoint: %s", type(logger).__name__, e)

    def _prune(self, trainer: L.Trainer) -> None:
        if self._keep < 0:
            return
        files = [p for p in self.checkpoints_in(self._dir) if self.step_of(p) is not None][::-1]  # oldest first
        for p in files[:max(0, len(files) - self._keep)]:
            trainer.strategy.remove_checkpoint(p)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        checkpoint[RUN_KEY] = {"finished": self._finished, "global_step": trainer.global_step,
                               "max_steps": trainer.max_steps, "max_epochs": trainer.max_epochs}

    @override
    def state_dict(self) -> dict[str, Any]:
        return {"saved_step": self._saved_step}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._saved_step = int(state_dict.get("saved_step", -1))

    # ---- when ----

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._last_save_t = time.monotonic()
        self._boundary_step = trainer.global_step
        self._install_handlers()

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if step == self._boundary_step:  # no optimizer step finished (accumulation, skipped step)
            return
        self._boundary_step = step
        # our handler's signal, or one that killed the DataLoader workers (fluxlora.process_exit records both)
        signum = self._signal or stop_requested() or (signal.SIGTERM if trainer.received_sigterm else 0)
        due = bool(self._every_steps and step % self._every_steps == 0) or bool(
            self._every_s and time.monotonic() - self._last_save_t >= self._every_s)
        # one all-reduce: a signal on any rank stops every rank; rank 0's clock decides a time-based save
        agreed = agree_max(trainer, [float(signum), float(due and trainer.is_global_zero)])
        signum = int(agreed[0]) or None
        due = bool(signum) or bool(agreed[1])
        if due and (signum or step != self._saved_step):
            self.save(trainer, f"signal {signal.Signals(signum).name}" if signum else "periodic")
        if signum:
            name = signal.Signals(signum).name
            raise RunInterrupted(f"stopped by {name} at step {step}; checkpoint {self._dir / step_file(step)} "
                                 "saved; run again with resume=auto to continue", signum)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore_handlers()
        if self._on_end:
            self._finished = True
            self.save(trainer, "end of training", then="train_end")

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore_handlers()

    # ---- signals ----

    def _install_handlers(self) -> None:
        # Installed at train start, after Lightning's own SIGTERM handler (which would raise at a batch end and
        # exit 0), so the signal is ours; restored before Lightning restores its pre-fit handlers.
        clear_stop()
        if not self._on_signal or threading.current_thread() is not threading.main_thread():
            return
        self._signal = None
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._handlers[sig] = signal.signal(sig, self._on_signal_received)

    def _restore_handlers(self) -> None:
        clear_stop()  # the request lives while training does: RunInterrupted carries it on from here
        while self._handlers:
            sig, old = self._handlers.popitem()
            signal.signal(sig, old)

    def _on_signal_received(self, signum: int, frame: Any) -> None:
        if self._signal is not None and signum == signal.SIGINT:  # a second Ctrl-C: stop now
            # not KeyboardInterrupt, which Lightning turns into exit status 1
            raise StopSignal(signum, f"stopped at once by a second SIGINT after step {self._boundary_step}; the last "
                                     "saved checkpoint is intact (run again with resume=auto)")
        self._signal = signum
        request_stop(signum)
        log.warning("received %s: saving a checkpoint at the next step boundary, then stopping "
                    "(press Ctrl-C again to stop at once)", signal.Signals(signum).name)
