"""Bounded waits while training reads data: a FIFO or dead mount in place of a cache file, a stopped, stuck or killed
DataLoader worker, a corrupt file. Each ends with a one-line error naming the stage or file, within its limit."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch
from helpers.data_fakes import FakeEncoder, assert_cache_intact, flip_member_bytes, make_folder
from torch.utils.data import Dataset, get_worker_info

from fluxlora.data import FluxDataModule
from fluxlora.data.bounded_read import bounded_read
from fluxlora.data.loader import CachedDataset, StageNamedDataLoader, error_from_worker
from fluxlora.errors import FluxLoraError, StageTimeoutError

MARGIN_S = 3.0  # process start-up and scheduling on a busy 2-core machine


def _ready_dm(tmp_path, make_cfg, *overrides, count=4):
    folder = make_folder(tmp_path / "ds", count)
    cfg = make_cfg("data=folder", f"data.path={folder}", "data.buckets.min_size=64", "data.read_timeout=2",
                   "data.timeout=2", *overrides)
    dm = FluxDataModule(cfg.data, cache_dir=cfg.data.cache_dir, seed=3)
    dm.build_cache(FakeEncoder(), "fake")
    return dm


def _to_fifos(dm):
    for e in dm.entries:
        e.file.unlink()
        os.mkfifo(e.file)


@pytest.mark.parametrize("workers", [0, 1])
def test_fifo_in_place_of_a_cache_file_is_a_guarded_error(tmp_path, make_cfg, workers):
    dm = _ready_dm(tmp_path, make_cfg, f"data.num_workers={workers}", "data.timeout=30")
    _to_fifos(dm)
    loader = dm.train_dataloader()
    t0 = time.monotonic()
    with pytest.raises(StageTimeoutError) as e:
        next(iter(loader))
    took = time.monotonic() - t0
    msg = str(e.value)
    assert msg.startswith("stage 'cache read' made no progress for 2s: reading ") and "blocked for more than 2s" in msg
    assert any(str(x.file) in msg for x in dm.entries) and "\n" not in msg
    assert took < 2 + MARGIN_S, took
    assert not [p for p in dm.cache_dir.glob(".*.tmp")]


def test_stopped_worker_ends_within_the_timeout_naming_the_stage(tmp_path, make_cfg):
    dm = _ready_dm(tmp_path, make_cfg, "data.num_workers=2", "data.num_repeats=20")
    it = iter(dm.train_dataloader())
    next(it)
    workers = it._it._workers
    assert len(workers) == 2
    for w in workers:  # busy or idle: one stopped holding the done-event's lock is the test below, made certain
        os.kill(w.pid, signal.SIGSTOP)
    waited = 0.0
    try:
        with pytest.raises(StageTimeoutError) as e:
            for _ in range(100):  # the batches already prefetched come first, then the wait times out
                t0 = time.monotonic()
                next(it)
        waited = time.monotonic() - t0
    finally:
        for w in workers:
            if w.is_alive():
                os.kill(w.pid, signal.SIGKILL)
    assert str(e.value).startswith("stage 'data loading' made no progress for 2s: no batch from the 2 DataLoader")
    assert 2 <= waited < 2 + MARGIN_S, waited
    assert not any(w.is_alive() for w in workers)  # killed, so shutdown and interpreter exit cannot hang on them
    assert_cache_intact(dm.cache_dir)


_taken_in_this_worker = []


def _take_done_event_lock_then(how, go):
    """A `CachedDataset.__getitem__` whose first call in a worker takes the lock of the DataLoader's done-event (the
    `done_event` that PyTorch's worker loop checks with `is_set()` for every index), then, once the file `go` exists,
    stops or kills the worker (or returns, leaving the worker's own next `is_set()` blocked: its batch still goes
    out)."""
    read = CachedDataset.__getitem__

    def getitem(self, key):
        data = read(self, key)
        if get_worker_info() is None or _taken_in_this_worker:
            return data
        _taken_in_this_worker.append(key)
        frame = sys._getframe()
        while frame.f_code.co_name != "_worker_loop":
            frame = frame.f_back
        frame.f_locals["done_event"]._cond.acquire()
        if how != "returns":
            while not go.exists():
                time.sleep(0.01)
            os.kill(os.getpid(), signal.SIGSTOP if how == "stops" else signal.SIGKILL)
        return data

    return getitem


@pytest.mark.parametrize("case", ["stopped after sending its batch", "stopped before sending", "killed"])
def test_worker_holding_the_done_event_lock_ends_within_the_timeout(tmp_path, make_cfg, monkeypatch, case):
    """A worker stopped or killed while it holds the done-event's lock (a POSIX semaphore: the kill frees nothing)
    used to block the main thread forever in PyTorch's `is_set()`/`set()` of that event, on the way to the error."""
    how = {"stopped after sending its batch": "returns", "stopped before sending": "stops", "killed": "kills"}[case]
    go = tmp_path / "go"
    monkeypatch.setattr(CachedDataset, "__getitem__", _take_done_event_lock_then(how, go))
    dm = _ready_dm(tmp_path, make_cfg, "data.num_workers=1", "data.num_repeats=20")
    it = iter(dm.train_dataloader())
    [worker] = it._it._workers
    try:
        if how == "returns":  # its first batch is in the pipe; fetching its tensors needs the worker to answer
            assert it._it._data_queue._reader.poll(10)
            os.kill(worker.pid, signal.SIGSTOP)
        t0 = time.monotonic()
        with pytest.raises(FluxLoraError) as e:  # PyTorch's SIGCHLD handler may raise at any line: go inside the block
            go.touch()
            next(it)
        waited = time.monotonic() - t0
    finally:
        if worker.is_alive():
            os.kill(worker.pid, signal.SIGKILL)
    msg = str(e.value)
    if how == "kills":
        assert msg.startswith("stage 'data loading' failed: DataLoader worker (pid"), msg
        assert waited < 2, waited  # found when the lock stays taken, not at the timeout
    else:
        assert isinstance(e.value, StageTimeoutError)
        assert msg.startswith("stage 'data loading' made no progress for 2s: no batch from the 1 DataLoader"), msg
        assert 2 <= waited < 2 + MARGIN_S, waited
    assert "\n" not in msg
    assert not worker.is_alive()
    assert_cache_intact(dm.cache_dir)


class _BlocksForever(Dataset):
    def __len__(self):
        return 8

    def __getitem__(self, i):
        if i >= 2:
            threading.Event().wait()  # a read that never returns
        return torch.zeros(2)


def test_dataset_that_blocks_in_getitem_times_out(tmp_path):
    loader = StageNamedDataLoader(_BlocksForever(), batch_size=1, num_workers=1, timeout=2, prefetch_factor=1)
    it = iter(loader)
    next(it), next(it)
    t0 = time.monotonic()
    with pytest.raises(StageTimeoutError, match="stage 'data loading' made no progress for 2s"):
        next(it)
    assert time.monotonic() - t0 < 2 + MARGIN_S


def test_killed_worker_is_a_one_line_error_naming_the_stage(tmp_path, make_cfg):
    dm = _ready_dm(tmp_path, make_cfg, "data.num_workers=1", "data.timeout=20", "data.num_repeats=20")
    it = iter(dm.train_dataloader())
    next(it)
    [worker] = it._it._workers
    t0 = time.monotonic()
    with pytest.raises(FluxLoraError) as e:  # PyTorch's SIGCHLD handler may raise at any line: kill inside the block
        os.kill(worker.pid, signal.SIGKILL)  # the batches it already delivered come first, then the error
        for _ in range(100):
            next(it)
    msg = str(e.value)
    assert msg.startswith("stage 'data loading' failed: DataLoader worker (pid")
    assert "killed by signal" in msg or "exited unexpectedly" in msg  # SIGCHLD handler or the queue read: either
    assert time.monotonic() - t0 < 20, "found through SIGCHLD, not by waiting out the timeout"


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_file_while_training_is_named_removed_and_rebuilt_next_run(tmp_path, make_cfg, workers):
    dm = _ready_dm(tmp_path, make_cfg, f"data.num_workers={workers}", count=1)
    victim = dm.entries[0].file
    flip_member_bytes(victim)
    with pytest.raises(FluxLoraError) as e:
        next(iter(dm.train_dataloader()))
    msg = str(e.value)
    assert msg.startswith(f"cache file {victim} (from ") and "is corrupt (BadZipFile: Bad CRC-32" in msg
    assert "removed it, the next run rebuilds it" in msg and "\n" not in msg
    assert not victim.exists()
    enc = FakeEncoder()
    dm.build_cache(enc, "fake")
    assert len(enc.image_calls) == 1 and len(assert_cache_intact(dm.cache_dir)) == 1


def test_read_guard_is_a_noop_outside_the_main_thread_and_says_so_once(tmp_path, caplog):
    fifo = tmp_path / "f"
    os.mkfifo(fifo)
    results = []

    def read_twice():
        for _ in range(2):
            with bounded_read(fifo, 0.5):
                results.append("read")

    with caplog.at_level(logging.INFO, logger="fluxlora.data.bounded_read"):
        t = threading.Thread(target=read_twice, name="reader")
        t.start()
        t.join(5)
    assert results == ["read", "read"]
    assert caplog.text.count("not time-limited (not the main thread: reader)") == 1


def test_read_guard_gives_back_an_outer_alarm(tmp_path):
    fired = []
    old = signal.signal(signal.SIGALRM, lambda *a: fired.append(time.monotonic()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.6)
        t0 = time.monotonic()
        with bounded_read(tmp_path / "x", 5):
            time.sleep(0.1)
        time.sleep(1.0)
        assert len(fired) == 1 and 0.5 < fired[0] - t0 < 0.9
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_worker_errors_come_back_as_their_one_line_selves():
    wrapped = ("Caught RuntimeError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
               "  File \"x.py\", line 1, in f\nfluxlora.errors.StageTimeoutError: stage 'cache read' made no progress "
               "for 30s: reading /c/a.npz blocked")
    err = error_from_worker(wrapped)
    assert isinstance(err, StageTimeoutError) and err.stage == "cache read" and err.seconds == 30
    assert str(err) == "stage 'cache read' made no progress for 30s: reading /c/a.npz blocked"
    assert error_from_worker("ValueError: unrelated") is None


def test_worker_killed_by_sigterm_is_a_stop_not_a_failure(tmp_path, make_cfg):
    """systemd/SLURM signal every process of the job: a worker's death by SIGTERM is the run's stop (exit 143)."""
    from fluxlora.errors import RunInterrupted
    from fluxlora.process_exit import clear_stop, stop_requested

    dm = _ready_dm(tmp_path, make_cfg, "data.num_workers=1", "data.timeout=20", "data.num_repeats=20")
    it = iter(dm.train_dataloader())
    next(it)
    [worker] = it._it._workers
    assert os.getpgid(worker.pid) == worker.pid != os.getpgid(0)  # out of our group: a group signal misses it
    t0 = time.monotonic()
    try:
        with pytest.raises(RunInterrupted) as e:  # the batches it already delivered come first
            # from another process, as systemd's is: PyTorch's workers take a SIGTERM from their parent for a
            # shutdown and exit 0
            subprocess.run(["kill", "-TERM", str(worker.pid)], check=True, timeout=10)
            for _ in range(100):
                next(it)
        assert stop_requested() == signal.SIGTERM  # what PeriodicCheckpoint reads at the step boundary
    finally:
        clear_stop()
    assert e.value.exit_code == 143 and str(e.value).startswith("stopped by SIGTERM while a batch was loading")
    assert time.monotonic() - t0 < 20, "found through SIGCHLD, not by waiting out the timeout"
