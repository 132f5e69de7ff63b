"""A time limit on reading one file: SIGALRM turns a read that blocks (a dead network mount, a FIFO with no writer)
into an error that names the file, instead of a run that sits at 0 % forever.

Signals are delivered to a process's main thread only, and `signal.signal` raises anywhere else, so the limit arms
in the main thread of any process (the trainer, or a DataLoader worker) and is a no-op in other threads and on
platforms without SIGALRM; that is logged once per process. A read stuck in uninterruptible kernel sleep (an NFS
hard mount) is not interrupted by any signal: the DataLoader timeout and the heartbeat watchdog cover that case.

Example::

    with bounded_read(path, seconds=30):
        data = np.load(path)
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from fluxlora.errors import StageTimeoutError

log = logging.getLogger(__name__)

_STAGE = "cache read"
_said_unarmed: set[tuple[int, str]] = set()


def can_arm() -> bool:
    """Whether a SIGALRM limit can be set here (main thread of a platform that has SIGALRM)."""
    return hasattr(signal, "SIGALRM") and threading.current_thread() is threading.main_thread()


def _say_once(reason: str) -> None:
    key = (os.getpid(), reason)
    if key not in _said_unarmed:
        _said_unarmed.add(key)
        log.info("cache reads in this %s are not time-limited (%s)", "process" if reason == "no SIGALRM" else "thread",
                 reason)


@contextmanager
def bounded_read(path: str | Path, seconds: float) -> Iterator[None]:
    """Raise `StageTimeoutError('cache read', ...)` naming `path` if the body runs longer than `seconds`.

    Args:
        path: the file being read (for the message).
        seconds: the limit; 0 or less = no limit.
    """
    if seconds <= 0:
        yield
        return
    if not hasattr(signal, "SIGALRM"):
        _say_once("no SIGALRM")
        yield
        return
    if threading.current_thread() is not threading.main_thread():
        _say_once(f"not the main thread: {threading.current_thread().name}")
        yield
        return

    def on_alarm(signum, frame):  # noqa: ARG001 - signal handler signature
        raise StageTimeoutError(_STAGE, seconds, f"reading {path} blocked for more than {seconds:g}s "
                                                 "(a dead network mount or a FIFO?); data.read_timeout sets the limit")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    outer_left, _ = signal.setitimer(signal.ITIMER_REAL, seconds)
    start = time.monotonic()
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left > 0:  # someone else's alarm was pending: give it back what is left of it
            signal.setitimer(signal.ITIMER_REAL, max(outer_left - (time.monotonic() - start), 1e-3))
