"""Heartbeats and the monitor thread that ends a stalled process (the core of StepHeartbeatWatchdog).

Pure Python with no torch or Lightning import, so it can watch the earliest setup stages, and a small process
(or a test) can use it on its own. Lightning's hooks are added by :class:`fluxlora.callbacks.StepHeartbeatWatchdog`.
"""

from __future__ import annotations

import faulthandler
import json
import logging
import os
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, Callable, Iterator, Optional

log = logging.getLogger("fluxlora.callbacks.watchdog")

WATCHDOG_EXIT_CODE = 75
"""Exit status of a process the watchdog ended (BSD's EX_TEMPFAIL: a stage stalled; `resume=auto` continues)."""

_ACTIVE: list["HeartbeatMonitor"] = []  # running monitors of this process (a sweep runs jobs one by one)
_exit = os._exit  # module attribute so an in-process test can replace it
_last_stage = "setup"  # of the last heartbeat(), for last_stage() when no watchdog runs


def heartbeat(stage: str, detail: str = "") -> None:
    """Send a heartbeat to every running watchdog of this process.

    Cheap (one tuple store per watchdog) and safe to call from any code on the training thread; code that runs a
    long but live stage (caching, a bounded wait) calls it to show it is still moving.
    """
    global _last_stage
    _last_stage = stage
    for w in _ACTIVE:
        w.beat(stage, detail)


def last_stage() -> str:
    """The stage this process last announced: the running watchdog's (it also hears Lightning's hooks), else the
    last `heartbeat()`. Names the stage of a failure (`fluxlora.errors.stage_error`)."""
    return _ACTIVE[-1].stage if _ACTIVE else _last_stage


@contextmanager
def in_stage(stage: str, detail: str = "") -> Iterator[None]:
    """Heartbeat `stage` for the block, then go back to the stage each watchdog was in; after an exception the
    stage stays, so the failure is named by it (a LoRA write inside `between_steps`, say)."""
    before = [(w, w.stage) for w in _ACTIVE]
    heartbeat(stage, detail)
    yield
    for w, prev in before:
        w.beat(prev)


class HeartbeatMonitor:
    """Records heartbeats (stage, detail, step) and ends the process from a monitor thread when one is late.

    See :class:`fluxlora.callbacks.StepHeartbeatWatchdog` for the guarantees and the arguments.

    Example::

        monitor = HeartbeatMonitor(setup_timeout_s=60, step_timeout_s=10, monitor_log="monitor.log")
        monitor.start("loading")
        for i, item in enumerate(work):
            process(item)
            monitor.progress(i + 1, len(work))
        monitor.stop("finished")
    """

    def __init__(self, setup_timeout_s: float = 1800.0, step_timeout_s: float = 300.0,
                 monitor_log: Optional[str] = None, heartbeat_file: Optional[str] = None,
                 stage_timeouts: Optional[dict] = None, gpu_idle_timeout_s: Optional[float] = None,
                 gil_backstop_s: Optional[float] = 60.0, poll_s: Optional[float] = None,
                 exit_code: int = WATCHDOG_EXIT_CODE, rank: int = 0) -> None:
        for key, v in (("setup_timeout_s", setup_timeout_s), ("step_timeout_s", step_timeout_s)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{key} must be a positive number of seconds, got {v!r}")
        for key, v in (("gpu_idle_timeout_s", gpu_idle_timeout_s), ("gil_backstop_s", gil_backstop_s),
                       ("poll_s", poll_s)):
            if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0):
                raise ValueError(f"{key} must be a positive number of seconds or None, got {v!r}")
        stage_timeouts = dict(stage_timeouts or {})
        bad = {k: v for k, v in stage_timeouts.items() if not isinstance(v, (int, float)) or v <= 0}
        if bad:
            raise ValueError(f"stage_timeouts must map stage names to positive seconds, got {bad}")
        if not isinstance(exit_code, int) or not 1 <= exit_code <= 255:
            raise ValueError(f"exit_code must be an int in 1..255, got {exit_code!r}")
        self._timeouts = {"setup": float(setup_timeout_s), "train": float(step_timeout_s)}
        self._stage_timeouts = {str(k): float(v) for k, v in stage_timeouts.items()}
        self._monitor_path = Path(monitor_log) if monitor_log else None
        self._heartbeat_path = Path(heartbeat_file) if heartbeat_file else None
        self._gpu_idle = float(gpu_idle_timeout_s) if gpu_idle_timeout_s else None
        self._backstop = float(gil_backstop_s) if gil_backstop_s else None
        shortest = min([*self._timeouts.values(), *self._stage_timeouts.values()])
        self._poll = float(poll_s) if poll_s else min(1.0, max(0.05, shortest / 10))
        self._exit_code = exit_code
        self.rank = int(rank)
        self.peer_report: Optional[Callable[[], str]] = None  # other ranks' state, added to the fire message
        self.before_exit: list[Callable[[], None]] = []  # e.g. end the other ranks this process started
        # (monotonic time, stage, detail, step): replaced as one tuple so the monitor thread reads a consistent beat
        self._beat: tuple[float, str, str, int] = (time.monotonic(), "setup", "", 0)
        self._phase = "setup"
        self._written: Optional[tuple] = None
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._monitor_file: Optional[IO] = None
        self._gpu_util: Optional[Callable[[], Optional[float]]] = None
        self._gpu_idle_since: Optional[float] = None
        self._backstop_file: Optional[IO] = None
        self._armed: Optional[float] = None  # the limit the GIL backstop is armed for; None = not armed
        self._killer: Optional[threading.Timer] = None
        self.fired: Optional[str] = None

    # ---- public API: usable before trainer.fit (model loading, caching) ----

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stage(self) -> str:
        return self._beat[1]

    def start(self, stage: str = "setup") -> None:
        """Start the monitor thread in the setup phase (idempotent)."""
        self.beat(stage)
        if self.running:
            return
        self._stop.clear()
        self._phase = "setup"
        if self._monitor_path is not None:
            self._monitor_path.parent.mkdir(parents=True, exist_ok=True)
            self._monitor_file = open(self._monitor_path, "a", buffering=1, encoding="utf-8")
        if self._gpu_idle is not None:
            self._gpu_util = _nvml_utilization()
        self._backstop_file = _fileno_or_none(self._monitor_file) or _fileno_or_none(sys.__stderr__)
        self._thread = threading.Thread(target=self._run, name="fluxlora-watchdog", daemon=True)
        self._thread.start()
        _ACTIVE.append(self)
        if self._backstop is not None and self._backstop_file is not None:
            self._arm_backstop(self.limit())
        log.debug("watchdog started: limits %s, poll %.2fs", self._timeouts, self._poll)

    def beat(self, stage: str, detail: str = "", step: Optional[int] = None) -> None:
        """Record progress in `stage` (cheap: one monotonic read, one tuple store, one dict look-up). A stage whose
        limit differs re-arms the GIL backstop from this thread: the monitor thread may not get the GIL to do it."""
        self._beat = (time.monotonic(), stage, detail, self._beat[3] if step is None else step)
        if self._armed is not None:
            limit = self.limit(stage)
            if limit != self._armed:
                self._arm_backstop(limit)

    def progress(self, done: int, total: int) -> None:
        """A `progress(done, total)` hook for long loops such as caching."""
        self.beat("caching", f"{done}/{total}")

    def enter_training_phase(self) -> None:
        """Switch to the short limit (done by the first finished training batch), from the calling thread: the GIL
        backstop is re-armed and the heartbeat file rewritten now, as a C call holding the GIL right after this
        would keep the monitor thread from doing either (the backstop would stay at the setup limit)."""
        if self._phase == "train":
            return
        self._phase = "train"
        if self._armed is not None:
            self._arm_backstop(self.limit())
        if self.running:
            self._write_heartbeat()

    def stop(self, reason: str = "stopped", error: Optional[str] = None) -> None:
        """Cancel the watchdog: the monitor thread ends and the heartbeat file says `reason` (and `error`, which
        the other ranks of a multi-process run read to tell who failed first)."""
        if self in _ACTIVE:
            _ACTIVE.remove(self)
        self._stop.set()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5 * self._poll + 1)
        if self._backstop is not None:
            self._armed = None
            faulthandler.cancel_dump_traceback_later()
        if thread is not None or error:
            self._write_heartbeat(state=reason, error=error)
        if self._monitor_file is not None:
            self._monitor_file.close()
            self._monitor_file = None

    def limit(self, stage: Optional[str] = None) -> float:
        """Seconds a heartbeat may be late in `stage` (default: the current one) in the current phase."""
        stage = self._beat[1] if stage is None else stage
        return self._stage_timeouts.get(stage, self._timeouts[self._phase])

    # ---- monitor thread ----

    def _run(self) -> None:
        while not self._stop.wait(self._poll):
            try:
                if self._check():
                    return
            except Exception:  # the monitor must outlive its own bugs: log and keep watching
                log.exception("watchdog check failed")

    def _check(self) -> bool:
        """One look at the heartbeat; True when the watchdog fired."""
        beat = self._beat
        mono, stage, detail, step = beat
        limit = self.limit(stage)
        late = time.monotonic() - mono
        if self._heartbeat_path is not None and self._written is not self._beat:
            self._write_heartbeat()
        if late > limit:
            where = f" ({detail})" if detail else ""
            self._fire(f"no heartbeat for {late:.1f}s in stage '{stage}'{where} at step {step} "
                       f"(limit {limit:g}s, phase {self._phase})")
            return True
        if self._armed is not None and self._beat is beat:  # (a newer beat re-armed it itself if its limit differs)
            # re-armed while this thread can run; fires only if a C call holds the GIL past limit + backstop
            self._arm_backstop(limit, late)
        return self._check_gpu(stage, step)

    def _arm_backstop(self, limit: float, late: float = 0.0) -> None:
        """Have faulthandler's C thread dump the stacks and exit 1 at `limit - late + gil_backstop_s` from now."""
        self._armed = limit
        faulthandler.dump_traceback_later(limit - late + self._backstop, exit=True, file=self._backstop_file)

    def _check_gpu(self, stage: str, step: int) -> bool:
        if self._gpu_util is None or self._phase != "train" or stage != "training_step":
            self._gpu_idle_since = None
            return False
        util = self._gpu_util()
        now = time.monotonic()
        if util is None or util > 0:
            self._gpu_idle_since = None
        elif self._gpu_idle_since is None:
            self._gpu_idle_since = now
        elif now - self._gpu_idle_since > self._gpu_idle:
            self._fire(f"GPU at 0% for {now - self._gpu_idle_since:.0f}s in stage '{stage}' at step {step} "
                       f"(limit {self._gpu_idle:g}s)")
            return True
        return False

    def _fire(self, what: str) -> None:
        """Dump stacks and end the process; bounded even if logging itself blocks (e.g. a full stderr pipe)."""
        if self._backstop is not None:
            self._armed = None
            faulthandler.cancel_dump_traceback_later()
        code = self._exit_code
        self.fired = what
        peers = _call_quietly(self.peer_report)
        if peers:
            what = f"{what}; other ranks: {peers}"
        msg = f"watchdog: {what}; every thread's stack follows; exiting with code {code}"
        self._killer = threading.Timer(10.0, _exit, (code,))
        self._killer.daemon = True
        self._killer.start()
        try:
            self._write_heartbeat(state="stalled")
            if self._monitor_file is not None:
                self._monitor_file.write(f"{_now()} pid {os.getpid()} {msg}\n")
                self._monitor_file.flush()
                faulthandler.dump_traceback(file=self._monitor_file, all_threads=True)
                self._monitor_file.write(f"{_now()} pid {os.getpid()} end of stacks\n")
                self._monitor_file.flush()
            log.critical("%s", msg)
            print(f"fluxlora: error: {msg}", file=sys.stderr, flush=True)
            if _fileno_or_none(sys.stderr) is not None:
                faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
        finally:
            for hook in self.before_exit:
                _call_quietly(hook)
            _exit(code)

    def _write_heartbeat(self, state: str = "running", error: Optional[str] = None) -> None:
        if self._heartbeat_path is None:
            return
        beat = self._beat
        mono, stage, detail, step = beat
        now = time.time()
        record = {"pid": os.getpid(), "state": state, "stage": stage, "detail": detail, "step": step,
                  "phase": self._phase, "time": now - (time.monotonic() - mono), "timeout_s": self.limit(stage),
                  "updated": now, "rank": self.rank, "host": socket.gethostname()}
        if error:
            record["error"] = error[:2000]
        # no fsync: this file is for a live reader, not for crash recovery; the rename keeps it whole. One temp
        # name per thread: the training thread writes it too (at the phase switch)
        tmp = self._heartbeat_path.with_name(f".{self._heartbeat_path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        try:
            self._heartbeat_path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(record))
            os.replace(tmp, self._heartbeat_path)
            self._written = beat
        except OSError as e:
            log.warning("heartbeat file %s not written: %s", self._heartbeat_path, e)


def read_beat(path: str | Path) -> dict:
    """The heartbeat file a :class:`HeartbeatMonitor` writes at `path`; {} when it is missing or unreadable.

    Its keys: ``pid``, ``host``, ``rank``; ``state`` (running, stalled, stopped, exception, finished, ...) and, after
    a failure, ``error``; ``stage``, ``detail``, ``step`` and ``phase`` of the last heartbeat; ``time`` (wall clock of
    the last heartbeat), ``timeout_s`` (the limit it is held to) and ``updated`` (when the file was written). The one
    reader: the supervisor (`fluxlora.supervise`) and the other ranks (`fluxlora.distributed`) use it.
    """
    try:
        beat = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return beat if isinstance(beat, dict) else {}


def beat_age(beat: dict, now: Optional[float] = None) -> float:
    """Seconds since the last heartbeat of `beat` (0 when it has no time)."""
    now = time.time() if now is None else now
    return now - float(beat.get("time", now))


def beat_stage(beat: dict) -> str:
    """Where `beat` was: "stage 'S' at step K"."""
    return f"stage '{beat.get('stage')}' at step {beat.get('step')}"


def beat_where(beat: dict, now: Optional[float] = None) -> str:
    """"last heartbeat Ns ago in stage 'S' at step K", for a message about a stale or ended process."""
    return f"last heartbeat {beat_age(beat, now):.1f}s ago in {beat_stage(beat)}"


def _call_quietly(fn: Optional[Callable[[], Any]]) -> Any:
    """Run a hook of the firing path; its failure must not keep the process from ending."""
    if fn is None:
        return None
    try:
        return fn()
    except Exception as e:
        log.warning("watchdog hook %r failed: %s", fn, e)
        return None


def _fileno_or_none(f: Any) -> Optional[Any]:
    """`f` if faulthandler can write to it (it needs a real file descriptor), else None."""
    try:
        f.fileno()
        return f
    except Exception:
        return None


def _now() -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S")


def _nvml_utilization() -> Optional[Callable[[], Optional[float]]]:
    """A callable returning the current CUDA device's utilization in %, or None where NVML is unavailable."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        import pynvml

        pynvml.nvmlInit()
        index = torch.cuda.current_device()
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        if visible:
            index = int(visible.split(",")[index])
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
    except Exception as e:  # no NVML, no GPU, a UUID in CUDA_VISIBLE_DEVICES: the check is optional
        log.info("GPU-utilization check off: %s", e)
        return None

    def util() -> Optional[float]:
        try:
            return float(pynvml.nvmlDeviceGetUtilizationRates(handle).gpu)
        except Exception:
            return None

    return util
