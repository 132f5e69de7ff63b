"""Reading cached samples, and a DataLoader whose failures say which stage failed.

PyTorch reports a stalled worker as `RuntimeError: DataLoader timed out after 60 seconds` and an error inside a
worker as a multi-line traceback wrapped in the original type. `StageNamedDataLoader` turns the first into
`StageTimeoutError('data loading', ...)` (after killing the stuck workers, so that shutting them down cannot hang
in its turn) and the second back into the one-line fluxlora error it started as. Three waits that PyTorch leaves
unbounded are bounded here too: a batch whose shared-memory handle must be fetched from a stopped worker
(`_StallWatch`), a worker's death reported by PyTorch's SIGCHLD handler at a random line of the main thread
(re-raised as a `FluxLoraError` naming the stage), and PyTorch's own wait for the lock of its done-event when a
worker died or was stopped holding it (`_free_done_lock_of_dead_worker`).

A SIGTERM/SIGINT is for the main process, which stops at a step boundary and shuts the workers down itself:
`seed_worker` moves each worker out of the process group that `kill -- -PGID`, `timeout` or Ctrl-C signal, and a
worker killed by SIGTERM/SIGINT all the same (systemd or SLURM signal every process of the job) is taken as a
request to stop, not as a data-loading failure.

Example::

    loader = StageNamedDataLoader(CachedDataset(entries, read_timeout=30), batch_sampler=sampler, num_workers=2,
                                  timeout=60, worker_init_fn=seed_worker)
"""

from __future__ import annotations

import logging
import os
import random
import re
import signal
import sys
import threading
import time
import weakref
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fluxlora.data.buckets import SampleKey
from fluxlora.data.cache import CacheEntry
from fluxlora.data.cache_format import read_sample
from fluxlora.errors import FluxLoraError, RunInterrupted, StageTimeoutError
from fluxlora.process_exit import STOP_SIGNALS, request_stop, stop_requested

log = logging.getLogger(__name__)

_STAGE = "data loading"
_PR_SET_PDEATHSIG = 1  # prctl option (linux/prctl.h): the signal a process gets when its parent dies
_TORCH_SIGNALS = "torch.utils.data._utils.signal_handling"
_WATCH_GRACE_S = 1.0  # PyTorch's own timeout, when it applies, fires first and gives the usual message
_WATCH_TICK_S = 0.1
_HELD_TICKS = 3  # a live holder keeps the done-event's lock for microseconds; 3 ticks held means a dead or stopped one
_freeing = threading.Lock()  # the watch thread and the main thread must not both free the same lock
_worker_iterators: "weakref.WeakSet[Any]" = weakref.WeakSet()  # live PyTorch iterators with worker processes
_fetching = 0  # > 0 while the main thread waits in a loader's next() (then a stop must not wait out the timeout)


class CachedDataset(Dataset):
    """Reads one cache file per sample; the image path travels with the batch for error messages.

    Args:
        entries: the cache files, one per image.
        read_timeout: seconds one file read may take (0 = no limit).
        empty_caption_file: text outputs of the empty caption, for samples whose caption is dropped.
    """

    def __init__(self, entries: list[CacheEntry], read_timeout: float = 30.0,
                 empty_caption_file: str | Path | None = None) -> None:
        self.entries = entries
        self.read_timeout = float(read_timeout)
        self.empty_caption_file = Path(empty_caption_file) if empty_caption_file else None
        self._empty_caption: dict[str, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, key: int | SampleKey) -> dict[str, Any]:
        if not isinstance(key, SampleKey):
            key = SampleKey(int(key), 0, False)
        e = self.entries[key.record]
        data = self._read(e.file, e.source, variant=key.variant, text=not key.drop_caption)
        if key.drop_caption:
            data.update(self._empty_text())
        data["path"] = str(e.source)
        data["caption_variant"], data["caption_dropped"] = key.variant, key.drop_caption
        return data

    def _empty_text(self) -> dict[str, torch.Tensor]:
        if self._empty_caption is None:  # read once per process
            if self.empty_caption_file is None:
                raise FluxLoraError("caption dropout needs the empty-caption cache file (build_cache with dropout)")
            self._empty_caption = self._read(self.empty_caption_file, None, latents=False)
        return dict(self._empty_caption)

    def _read(self, file: Path, source: Path | None, variant: int = 0, latents: bool = True,
              text: bool = True) -> dict[str, torch.Tensor]:
        origin = f" (from {source})" if source else ""
        try:
            return read_sample(file, variant, self.read_timeout, latents=latents, text=text)
        except StageTimeoutError:
            raise
        except FileNotFoundError:
            raise FluxLoraError(f"cache file {file}{origin} is missing; rerun to rebuild it") from None
        except Exception as err:
            file.unlink(missing_ok=True)  # never trusted again: the next run's cache check rebuilds it
            raise FluxLoraError(f"cache file {file}{origin} is corrupt ({type(err).__name__}: "
                                f"{' '.join(str(err).split())}); removed it, the next run rebuilds it") from None


def seed_worker(worker_id: int) -> None:
    """Seed numpy and random in each worker from torch's per-worker seed (base seed + worker id); take the worker
    out of the main process's group (`isolate_worker`)."""
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)
    isolate_worker()


def isolate_worker() -> None:
    """In a DataLoader worker: let a SIGTERM/SIGINT sent to the whole process group reach only the main process.

    The worker gets its own process group; it still dies with the main process (Linux: the parent-death signal), so
    a SIGKILL to the old group, which no longer reaches it, leaves no orphan.
    """
    # own group rather than SIG_IGN: PyTorch's w.terminate() at shutdown (a SIGTERM from the parent) must still work
    os.setpgrp()
    signal.signal(signal.SIGINT, signal.default_int_handler)  # not the main process's stop handler, inherited
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


_WORKER_ERROR = re.compile(r"^fluxlora\.errors\.(\w+): (.*)$")
_WORKER_DIED = re.compile(r"DataLoader worker \(pid(?:\(s\))? [\d, ]+\) (exited|is killed)")
_STAGE_TIMEOUT = re.compile(r"^stage '(.+?)' made no progress for ([\d.]+)s(?:: (.*))?$")


def error_from_worker(message: str) -> FluxLoraError | None:
    """The one-line fluxlora error that a worker raised, from PyTorch's re-raised traceback text (else None)."""
    lines = message.rstrip().splitlines()
    m = _WORKER_ERROR.match(lines[-1]) if lines and "DataLoader worker" in lines[0] else None
    if m is None:
        return None
    name, text = m.groups()
    t = _STAGE_TIMEOUT.match(text) if name == "StageTimeoutError" else None
    if t is not None:
        return StageTimeoutError(t.group(1), float(t.group(2)), t.group(3) or "")
    return FluxLoraError(text)


def _stop_signal(dead: list) -> int | None:
    """The stop signal that the dead `dead` workers are part of: a stop already requested, or SIGTERM/SIGINT killed
    one of them (sent to every process of the job), else None."""
    return stop_requested() or next((-w.exitcode for w in dead if w.exitcode is not None and -w.exitcode in
                                      STOP_SIGNALS), None)


def _stopped_while_loading(signum: int) -> RunInterrupted:
    request_stop(signum)
    return RunInterrupted(f"stopped by {signal.Signals(signum).name} while a batch was loading: the DataLoader "
                          "workers ended with the signal, so no checkpoint was saved at this step; earlier "
                          "checkpoints are intact (run again with resume=auto)", signum)


def _unwatch_workers(it: Any) -> None:
    """Take an iterator's workers off PyTorch's SIGCHLD watch list: their death is then not raised (again) as an
    error at a random line of the main thread."""
    if getattr(it, "_worker_pids_set", False):
        torch.utils.data._utils.signal_handling._remove_worker_pids(id(it))
        it._worker_pids_set = False


def _kill_workers(it: Any) -> None:
    """SIGKILL the worker processes of a DataLoader iterator (unwatched first). Stopped or stuck workers would
    otherwise make shutdown, and the interpreter's exit (which joins child processes), wait forever."""
    _unwatch_workers(it)
    for w in getattr(it, "_workers", []):
        if w.is_alive():
            os.kill(w.pid, signal.SIGKILL)


def _done_lock(it: Any) -> Any:
    """The semaphore behind the lock of a PyTorch iterator's `_workers_done_event` (a multiprocessing Event, whose
    Condition holds a plain `Lock`), or None."""
    cond = getattr(getattr(it, "_workers_done_event", None), "_cond", None)
    return getattr(getattr(cond, "_lock", None), "_semlock", None)


def _done_lock_taken_elsewhere(it: Any) -> bool:
    """The done-event's lock is taken, and not by this process (whose own count of it is 0)."""
    sem = _done_lock(it)
    return sem is not None and sem._count() == 0 and sem._get_value() == 0


def _free_done_lock_of_dead_worker(it: Any) -> bool:
    """Give back the done-event's lock if it is taken outside this process and a worker is dead; True if freed.

    Workers take that lock for every index (`done_event.is_set()`), PyTorch on the way to a worker-died error and in
    `_shutdown_workers`. A POSIX semaphore, it stays taken when its holder dies: the main thread waited in `sem_wait`
    until the watchdog's step limit (measured: each case of test_worker_holding_the_done_event_lock_* hung past 30 s).
    A bare `sem_post`: `Lock.release()` would set this process's count to -1 (`set()` then fails 'lock is not owned'),
    and a `SemLock` rebuilt on the handle closes it when collected (measured: a segfault).
    """
    if os.name != "posix" or not _done_lock_taken_elsewhere(it):
        return False
    if all(w.is_alive() for w in getattr(it, "_workers", [])):
        return False  # a live worker may hold it; only a dead (or killed) holder's lock is given back
    import ctypes

    with _freeing:
        if not _done_lock_taken_elsewhere(it):
            return False
        if ctypes.CDLL(None, use_errno=True).sem_post(ctypes.c_void_p(_done_lock(it).handle)) != 0:
            log.warning("could not free the DataLoader's done-event lock: errno %d", ctypes.get_errno())
            return False
    log.warning("freed the DataLoader's done-event lock, left taken by a worker that died or was stopped holding it")
    return True


class _StallWatch:
    """Kills the workers when one `next()` has waited longer than `deadline_s`.

    PyTorch's `timeout` bounds the wait for a batch to arrive, not the unpickling of one that did: a batch's tensors
    come as shared-memory handles fetched from the worker that made them, and a stopped worker never answers (seen
    here with SIGSTOP). Killing the workers breaks that wait; `__next__` then reports the stall. It also frees the
    done-event lock that a dead worker left taken (`_free_done_lock_of_dead_worker`), which PyTorch waits for.
    """

    def __init__(self, deadline_s: float, owner: Any) -> None:
        self.deadline_s = deadline_s
        self.expired = False
        self._owner = weakref.ref(owner)  # the thread ends with its DataLoader
        self._lock = threading.Lock()
        self._waiting: tuple[float, Any] | None = None
        self._thread = threading.Thread(target=self._run, name="fluxlora-data-stall-watch", daemon=True)
        self._thread.start()

    def begin(self, it: Any) -> None:
        with self._lock:  # a weak reference: this thread must not keep the iterator (and its workers) alive
            self._waiting = (time.monotonic(), weakref.ref(it))

    def end(self) -> None:
        with self._lock:
            self._waiting = None

    def _run(self) -> None:
        held = 0  # consecutive ticks that found the done-event's lock taken outside this process
        while self._owner() is not None:
            time.sleep(_WATCH_TICK_S)
            with self._lock:
                if self._waiting is None:
                    if self.expired:
                        return
                    held = 0
                    continue
                stalled = not self.expired and time.monotonic() - self._waiting[0] > self.deadline_s
                self.expired = self.expired or stalled
                it = self._waiting[1]()
            try:
                if it is None:
                    continue
                if stalled:
                    _kill_workers(it)
                held = held + 1 if _done_lock_taken_elsewhere(it) else 0
                if held >= _HELD_TICKS and _free_done_lock_of_dead_worker(it):
                    held = 0
            except Exception as err:  # best effort; the main thread still reports the stall
                log.warning("could not kill the stalled DataLoader workers or free their lock: %s", err)
            finally:
                del it


class _StageNamedIterator:
    def __init__(self, it: Any, loader: "StageNamedDataLoader") -> None:
        self._it = it
        self._loader = loader

    def __iter__(self) -> "_StageNamedIterator":
        return self

    def __len__(self) -> int:
        return len(self._it)

    def __next__(self) -> Any:
        global _fetching
        watch = self._loader._stall_watch()
        if watch is not None:
            watch.begin(self._it)
        _fetching += 1
        try:
            return next(self._it)
        except (StopIteration, StageTimeoutError, RunInterrupted):
            raise
        except Exception as e:
            raise self._translate(e, watch is not None and watch.expired) from None
        finally:
            _fetching -= 1
            if watch is not None:
                watch.end()

    def _translate(self, e: Exception, stalled: bool) -> Exception:
        msg = str(e)
        n, t = self._loader.num_workers, self._loader.timeout
        if stalled or (isinstance(e, RuntimeError) and msg.startswith("DataLoader timed out after")):
            self._stop_workers()
            return StageTimeoutError(_STAGE, t, f"no batch from the {n} DataLoader worker(s) within {t:g}s: "
                                                "a worker is stuck or stopped (data.timeout sets the limit)")
        if isinstance(e, FluxLoraError) and msg.startswith(f"stage '{_STAGE}' failed: DataLoader worker"):
            self._stop_workers()  # raised by the SIGCHLD handler while this thread waited for a batch
            return e
        dead = self._dead_workers(wait=isinstance(e, (EOFError, OSError)))
        if (isinstance(e, RuntimeError) and _WORKER_DIED.match(msg)) or dead:
            stopped = _stop_signal([w for w in getattr(self._it, "_workers", []) if not w.is_alive()])
            self._stop_workers()  # also unwatches them: no second report from the SIGCHLD handler later
            if stopped:
                return _stopped_while_loading(stopped)
            if isinstance(e, RuntimeError) and _WORKER_DIED.match(msg):
                return FluxLoraError(f"stage '{_STAGE}' failed: {msg.splitlines()[0]}")
            return FluxLoraError(f"stage '{_STAGE}' failed: DataLoader worker (pid(s) {', '.join(dead)}) exited "
                                 f"unexpectedly ({type(e).__name__}: {' '.join(msg.split())})")
        return error_from_worker(msg) or e

    def _dead_workers(self, wait: bool) -> list[str]:
        """Pids of workers that have exited; `wait` gives a just-killed one a moment (its pipe can break first)."""
        workers = list(getattr(self._it, "_workers", []))
        if wait and workers:
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline and all(w.is_alive() for w in workers):
                time.sleep(0.02)
        return [str(w.pid) for w in workers if not w.is_alive()]

    def _stop_workers(self) -> None:
        try:
            _kill_workers(self._it)
            for w in getattr(self._it, "_workers", []):
                w.join(timeout=1.0)
            _free_done_lock_of_dead_worker(self._it)  # else `_shutdown_workers` waits for it forever
            self._it._shutdown_workers()
        except Exception as err:  # best effort: the timeout error is what the user must see
            log.warning("could not stop the DataLoader workers cleanly: %s", err)


def _name_the_stage_in_sigchld_errors() -> None:
    """PyTorch's SIGCHLD handler raises `RuntimeError: DataLoader worker (pid X) is killed by signal` at whatever line
    the main thread happens to run; wrap it (once, main thread only) so that error names the stage wherever it
    surfaces. A death that is part of a stop (see `_stop_signal`) is no error: the run stops at the step boundary,
    or at once if the main thread is waiting for a batch that will not come."""
    if not hasattr(signal, "SIGCHLD") or threading.current_thread() is not threading.main_thread():
        return
    torch_handler = signal.getsignal(signal.SIGCHLD)
    if not callable(torch_handler) or getattr(torch_handler, "__module__", "") != _TORCH_SIGNALS:
        return  # not installed yet, or already wrapped, or someone else's

    def handler(signum: int, frame: Any) -> None:
        try:
            torch_handler(signum, frame)
        except RuntimeError as e:
            stopped = None
            for it in list(_worker_iterators):  # raise once per death, not again at every later SIGCHLD
                dead = [w for w in getattr(it, "_workers", []) if not w.is_alive()]
                if dead:
                    _unwatch_workers(it)
                    stopped = stopped or _stop_signal(dead)
            if stopped:
                request_stop(stopped)  # PeriodicCheckpoint stops at the step boundary
                if _fetching:  # the batch waited for will never come
                    raise _stopped_while_loading(stopped) from None
                log.warning("DataLoader worker(s) ended by %s: stopping at the next step boundary",
                            signal.Signals(stopped).name)  # this step's batch is already here
                return
            raise FluxLoraError(f"stage '{_STAGE}' failed: {' '.join(str(e).split())}") from None

    signal.signal(signal.SIGCHLD, handler)


class StageNamedDataLoader(DataLoader):
    """A `DataLoader` whose stalls and worker errors end the run with a one-line error naming the stage.

    With workers, a batch that has not arrived `timeout` seconds (+1 s grace) after it was asked for ends the wait
    even where PyTorch's own timeout does not apply (see `_StallWatch`).
    """

    _watch: _StallWatch | None = None

    def __iter__(self) -> Iterator[Any]:  # type: ignore[override]
        it = super().__iter__()
        if self.num_workers > 0:
            _worker_iterators.add(it)
            _name_the_stage_in_sigchld_errors()  # PyTorch installs its handler with the first worker iterator
        return _StageNamedIterator(it, self)

    def _stall_watch(self) -> _StallWatch | None:
        if self.num_workers == 0 or not self.timeout:
            return None
        if self._watch is None or self._watch.expired:
            self._watch = _StallWatch(self.timeout + _WATCH_GRACE_S, self)
        return self._watch
