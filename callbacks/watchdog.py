r"""StepHeartbeatWatchdog: a run whose training loop stops making progress is ended, naming the stuck stage."""

from __future__ import annotations

from typing import Any

import lightning as L
from typing_extensions import override

from fluxlora.heartbeat import WATCHDOG_EXIT_CODE, HeartbeatMonitor, heartbeat

__all__ = ["StepHeartbeatWatchdog", "WATCHDOG_EXIT_CODE", "heartbeat"]


class StepHeartbeatWatchdog(HeartbeatMonitor, L.Callback):
    """End the process when the training loop sends no heartbeat for too long, after saying where it was stuck.

    Guarantee: a run that stops making progress — a training step stuck in a C call, a dead DataLoader, a
    checkpoint write to a hung disk, caching that no longer advances — does not hang silently. Heartbeats come
    from the training batch hooks, validation, checkpoint saves, the sampler's hand-offs and caching progress,
    each with a stage name. A monitor thread checks them; when the last one is older than the limit (a long one
    for setup, caching and the first step, a short one after), it writes the stage, the step and every thread's
    Python stack (``faulthandler``) to ``monitor_log`` and the log, then ends the process with
    :data:`WATCHDOG_EXIT_CODE` through ``os._exit``, which works while the main thread is blocked in C (a
    Python-level interrupt would never be delivered there). If a C call holds the GIL so that the monitor thread
    itself cannot run, faulthandler's own C thread dumps the stacks ``gil_backstop_s`` later and exits with status 1;
    the training thread re-arms that backstop itself wherever the limit changes (the switch to the short limit after
    the first step, a stage with its own limit), so a stall right after such a change is caught at the new limit.
    A heartbeat file (step, stage, time of the last heartbeat, current limit) is rewritten atomically for an outside
    supervisor. With ``gpu_idle_timeout_s`` and NVML available, a training step during which the GPU stays at 0 %
    for that long ends the run the same way (off on the CPU). The watchdog is cancelled on a normal end, on an
    exception and in teardown, and a stage that keeps sending heartbeats never trips it.

    Args:
        setup_timeout_s: limit while loading, caching and until the first training step has finished.
        step_timeout_s: limit after the first step (one step, checkpoint save or validation batch).
        monitor_log: file that receives the stage and stack dump (appended), e.g. ``outputs/<name>/monitor.log``.
        heartbeat_file: JSON file rewritten when the heartbeat changes; None = none.
        stage_timeouts: per-stage limits that replace the phase limit, e.g. ``{"checkpoint_save": 900}``.
        gpu_idle_timeout_s: end the run after this long at 0 % GPU utilization inside a training step; None = off.
        gil_backstop_s: extra time after the limit for faulthandler's C-level dump when the GIL is stuck; None = off.
        poll_s: how often the monitor thread looks; None = a tenth of the shortest limit, between 0.05 s and 1 s.
        exit_code: exit status used when the watchdog fires.
        rank: this process's rank in a multi-process (DDP) run, recorded in the heartbeat file. Each rank keeps
            its own files (``fluxlora.distributed.health.heartbeat_path``); when the watchdog fires, the message also
            gives the other ranks' last heartbeats.

    Example::

        watchdog = StepHeartbeatWatchdog(setup_timeout_s=1800, step_timeout_s=300,
                                         monitor_log="outputs/mychar/monitor.log",
                                         heartbeat_file="outputs/mychar/heartbeat.json")
        watchdog.start("caching")          # before trainer.fit, so setup and caching are covered too
        trainer = Trainer(callbacks=[watchdog])
    """

    # ---- Lightning hooks ----

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.start("trainer_setup")

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.beat("fit_start", step=trainer.global_step)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.beat("train_start", step=trainer.global_step)

    @override
    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.beat("epoch_start", step=trainer.global_step)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        self.beat("training_step", step=trainer.global_step)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        # batch-end callbacks, logging and loading the next batch
        self.beat("between_steps", step=trainer.global_step)
        self.enter_training_phase()  # once; re-arms the GIL backstop and rewrites the heartbeat file from this thread

    @override
    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.beat("validation", step=trainer.global_step)

    @override
    def on_validation_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        self.beat("validation", f"batch {batch_idx}", step=trainer.global_step)

    @override
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.beat("between_steps", step=trainer.global_step)

    @override
    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        detail = self._beat[2] if self._beat[1] == "checkpoint_save" else ""  # keep the saver's own detail
        self.beat("checkpoint_save", detail, step=trainer.global_step)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.beat("epoch_end", step=trainer.global_step)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.beat("train_end", step=trainer.global_step)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        # the error goes into the heartbeat file: the other ranks of a DDP run read it to tell who failed first
        self.stop("exception", error=f"{type(exception).__name__}: {exception}")

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self.stop("stopped")
