"""How the `python -m fluxlora` process ends: a requested stop (SIGTERM/SIGINT), and the exit status at the very end.

Two facts have their one owner here:

- A stop request is recorded for the whole process, so that whoever meets it acts on the same request:
  :class:`~fluxlora.callbacks.PeriodicCheckpoint` at the next step boundary (checkpoint, exit 143/130), the DataLoader
  when a worker died of the same signal (a stop, not a data-loading failure). Outside the training steps (loading,
  caching, the end of the run) there is nothing to save: the signal raises :class:`StopSignal` at once, and the
  process ends with one line and 128 + the signal number.
- The process ends through :func:`exit_process`, so a thread left running inside native code never decides its exit
  status. At interpreter shutdown Python ends such a thread with ``pthread_exit`` from inside a C++ call, which
  aborts the process (``terminate called without an active exception``, status 134) after a run that succeeded; a
  non-daemon thread left running would keep it from ending at all. With such a thread alive, the logs and stdio are
  flushed and the process ends with ``os._exit(status)``.

Example::

    if __name__ == "__main__":
        run_main(main)          # main: the Hydra entry point; never returns
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import weakref
from typing import Any, Callable, NoReturn, Optional

log = logging.getLogger("fluxlora")

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)

_stop: Optional[int] = None  # the signal number of a requested stop
_native: "weakref.WeakSet[threading.Thread]" = weakref.WeakSet()


def request_stop(signum: int) -> None:
    """Record that SIGTERM/SIGINT asked this process to stop (the first signal wins)."""
    global _stop
    if _stop is None:
        _stop = int(signum)


def stop_requested() -> Optional[int]:
    """The signal number of a requested stop, or None."""
    return _stop


def clear_stop() -> None:
    """Forget a stop request (a new training run in the same process starts clean)."""
    global _stop
    _stop = None


class StopSignal(BaseException):
    """SIGTERM/SIGINT outside the training steps, where there is no step boundary to stop at.

    A BaseException, as KeyboardInterrupt is, so that no ``except Exception`` on the way (Hydra's job runner among
    them) reports it as a crash; :func:`run_main` turns it into one line and exit status 128 + the signal number.
    """

    def __init__(self, signum: int, message: str = "") -> None:
        self.signum = int(signum)
        self.exit_code = 128 + self.signum
        super().__init__(message or f"stopped by {signal.Signals(signum).name}")


def raise_stop(signum: int, frame: Any) -> None:
    """Signal handler for SIGTERM/SIGINT outside the training steps: raise StopSignal, naming the stage."""
    stage = _current_stage()
    where = f" in stage '{stage}'" if stage else ""
    raise StopSignal(signum, f"stopped by {signal.Signals(signum).name}{where}, outside the training steps: nothing "
                             "was saved at this point; earlier checkpoints are intact (run again with resume=auto)")


def track_native_thread(thread: threading.Thread) -> None:
    """Name `thread` as one that may be inside native (torch) code when the process ends (a sampling round)."""
    _native.add(thread)


def run_main(main: Callable[[], Any]) -> NoReturn:
    """Run the command-line entry `main` with SIGTERM/SIGINT raising :class:`StopSignal` until training installs
    its own handlers, then end the process with the run's exit status through :func:`exit_process`."""
    if threading.current_thread() is threading.main_thread():
        for sig in STOP_SIGNALS:
            signal.signal(sig, raise_stop)
    try:
        main()
        code = 0
    except SystemExit as e:
        code = _status(e.code)
    except StopSignal as e:
        code = _report(str(e), e.exit_code)
    except KeyboardInterrupt:  # from code that put Python's own SIGINT handler back
        code = _report("stopped at once by SIGINT; the last saved checkpoint is intact (run again with resume=auto)",
                       128 + signal.SIGINT)
    exit_process(code)


def exit_process(code: int) -> NoReturn:
    """End the process with `code`; when a thread that could abort or block the interpreter's shutdown is still
    alive (non-daemon, or tracked as running native code), flush logs and stdio and use ``os._exit``."""
    left = [t for t in threading.enumerate()
            if t is not threading.main_thread() and t.is_alive() and (not t.daemon or t in _native)]
    if not left:
        sys.exit(code)
    log.warning("ending the process (status %d) without waiting for thread(s) still running: %s", code,
                ", ".join(t.name for t in left))
    _flush()
    os._exit(code)


def _report(message: str, code: int) -> int:
    log.error("%s", message)
    print(f"fluxlora: error: {message}", file=sys.stderr, flush=True)
    return code


def _status(code: Any) -> int:
    """SystemExit's code as an exit status, as the interpreter would turn it into one."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    print(code, file=sys.stderr, flush=True)
    return 1


def _current_stage() -> str:
    from fluxlora.heartbeat import _ACTIVE

    return _ACTIVE[0].stage if _ACTIVE else ""


def _flush() -> None:
    for handler in [*logging.getLogger().handlers, *log.handlers]:
        try:
            handler.flush()
        except Exception:  # a closed or broken stream: nothing more to save
            pass
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except Exception:
            pass
