r"""AtomicCheckpointIO: checkpoints that are whole or absent, with an optional background mirror to slow storage."""

from __future__ import annotations

import logging
import os
import shutil
import threading
import time
from collections import OrderedDict
from contextlib import suppress
from pathlib import Path
from typing import Any, Optional

import torch
from lightning.pytorch.plugins.io import TorchCheckpointIO
from typing_extensions import override

from fluxlora.atomic import atomic_open, fsync_dir
from fluxlora.errors import WRITE_ONLY_ERRNOS, WriteFailed

log = logging.getLogger(__name__)

MIRROR_STAGE = "checkpoint_mirror"


def _is_url(path: Any) -> bool:
    return "://" in str(path)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write each checkpoint to a temp file in its destination folder, fsync it, rename it, fsync the folder.

    Guarantee: a crash, a SIGKILL or a full disk at any moment leaves every checkpoint file either complete (old or
    new) or absent, never torn, so a resumed run always finds something that loads. Lightning's own save builds the
    whole file in memory, writes it without fsync and, for `last`, may leave a window with no file at all.
    :meth:`link` publishes `last.ckpt` as a hard link to a finished checkpoint (no second write).

    With ``mirror`` set (a local folder, e.g. a network mount, or an fsspec URL such as ``s3://bucket/run``), every
    file is copied there *after* the local rename, by a background thread: a step never waits for it. Each copy is
    bounded by ``mirror_timeout_s``; one that fails is logged and retried ``mirror_retries`` times; one that stalls
    is abandoned and logged (stage ``checkpoint_mirror``) and later copies are coalesced (only the newest version of
    each file waits) until it returns. The mirror only ever reads the local files, so it cannot corrupt them.

    Args:
        mirror: second location for every checkpoint; None = no mirror.
        mirror_timeout_s: the most one copy may take before it is abandoned.
        mirror_retries: extra attempts after a copy fails with an error.
        mirror_retry_wait_s: pause between attempts.
        flush_timeout_s: at teardown, how long to wait for queued copies (not at all while a copy is stalled).

    Example::

        trainer = Trainer(plugins=[AtomicCheckpointIO(mirror="/mnt/nas/mychar-ckpts")])
    """

    def __init__(self, mirror: Optional[str] = None, mirror_timeout_s: float = 600.0, mirror_retries: int = 3,
                 mirror_retry_wait_s: float = 5.0, flush_timeout_s: float = 120.0) -> None:
        super().__init__()
        for key, v in (("mirror_timeout_s", mirror_timeout_s), ("flush_timeout_s", flush_timeout_s)):
            if not isinstance(v, (int, float)) or isinstance(v, bool) or v <= 0:
                raise ValueError(f"{key} must be a positive number of seconds, got {v!r}")
        if not isinstance(mirror_retries, int) or mirror_retries < 0:
            raise ValueError(f"mirror_retries must be a non-negative int, got {mirror_retries!r}")
        if not isinstance(mirror_retry_wait_s, (int, float)) or mirror_retry_wait_s < 0:
            raise ValueError(f"mirror_retry_wait_s must be >= 0, got {mirror_retry_wait_s!r}")
        self._flush_timeout = float(flush_timeout_s)
        self.mirror: Optional[CheckpointMirror] = None
        if mirror:
            self.mirror = CheckpointMirror(str(mirror), float(mirror_timeout_s), mirror_retries,
                                           float(mirror_retry_wait_s))

    @override
    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        """Stream the checkpoint into a temp file beside `path`, fsync, rename, fsync the folder; then mirror it."""
        if storage_options is not None:
            raise TypeError(f"{type(self).__name__} does not take storage_options")
        if _is_url(path):  # remote destination: fsspec, as Lightning does
            super().save_checkpoint(checkpoint, path)
            return
        path = Path(path)
        with atomic_open(path, "wb") as f:
            torch.save(checkpoint, f)
        self._mirror("copy", path)

    def link(self, src: Any, dst: Any) -> None:
        """Make `dst` (e.g. `last.ckpt`) an atomic hard link to the finished checkpoint `src`; copy if links fail."""
        src, dst = Path(src), Path(dst)
        tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
        try:
            tmp.unlink(missing_ok=True)
            os.link(src, tmp)
            os.replace(tmp, dst)
            fsync_dir(dst.parent)
        except OSError as e:
            with suppress(OSError):
                tmp.unlink(missing_ok=True)
            if e.errno in WRITE_ONLY_ERRNOS:  # a copy cannot succeed either: name the file the user looks for
                raise WriteFailed(e.errno, e.strerror, str(dst)) from e
            # no hard links here (some network or FAT filesystems): a full atomic copy
            with open(src, "rb") as r, atomic_open(dst, "wb") as w:
                shutil.copyfileobj(r, w, 1 << 20)
        self._mirror("copy", dst)

    @override
    def remove_checkpoint(self, path: Any) -> None:
        super().remove_checkpoint(path)
        if not _is_url(path):
            self._mirror("remove", Path(path))

    def _mirror(self, kind: str, path: Path) -> None:
        if self.mirror is not None:
            self.mirror.submit(kind, path)

    @override
    def teardown(self) -> None:
        """Give queued mirror copies a bounded time to finish (none if a copy is stalled)."""
        if self.mirror is not None:
            self.mirror.flush(self._flush_timeout)

    @staticmethod
    def clean_stale_temps(folder: Any) -> list[Path]:
        """Remove temp files a killed save left in `folder` (names start with '.' and end in .tmp/.link)."""
        removed = []
        for p in Path(folder).glob(".*"):
            if p.is_file() and (p.name.endswith(".tmp") or p.name.endswith(".link")):
                p.unlink(missing_ok=True)
                removed.append(p)
        return removed


class CheckpointMirror:
    """Copies finished local checkpoint files to a second location on a background thread, never blocking a caller.

    Args:
        target: a local folder or an fsspec URL.
        timeout_s: the most one copy may take before it is abandoned.
        retries: extra attempts after a copy raises.
        retry_wait_s: pause between attempts.
    """

    def __init__(self, target: str, timeout_s: float = 600.0, retries: int = 3, retry_wait_s: float = 5.0) -> None:
        self.target = target
        self._timeout = timeout_s
        self._retries = retries
        self._retry_wait = retry_wait_s
        self._pending: OrderedDict[str, tuple[str, Path]] = OrderedDict()  # file name -> newest job for it
        self._cond = threading.Condition()
        self._busy = False
        self._stalled: Optional[threading.Thread] = None
        self._closed = False
        self.done: list[str] = []
        self.failed: list[str] = []
        self.stalls: list[str] = []
        self._worker = threading.Thread(target=self._run, name="fluxlora-ckpt-mirror", daemon=True)
        self._worker.start()

    @property
    def stalled(self) -> bool:
        return self._stalled is not None and self._stalled.is_alive()

    def submit(self, kind: str, path: Path) -> None:
        """Queue a copy or removal of `path` (a newer job for the same file name replaces a queued one)."""
        with self._cond:
            self._pending.pop(path.name, None)
            self._pending[path.name] = (kind, path)
            self._cond.notify()

    def flush(self, timeout_s: float) -> bool:
        """Wait up to `timeout_s` for the queue to drain; True when it did. Returns at once while a copy is stalled."""
        deadline = time.monotonic() + timeout_s
        with self._cond:
            while self._pending or self._busy:
                left = deadline - time.monotonic()
                if self.stalled or left <= 0:
                    if self._pending or self._busy:
                        log.warning("checkpoint mirror to %s: %d file(s) not copied (%s)", self.target,
                                    len(self._pending) + self._busy, "a copy is stalled" if self.stalled else "timeout")
                    return False
                self._cond.wait(min(left, 0.1))
        return True

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending:
                    self._cond.wait()
                _, (kind, path) = self._pending.popitem(last=False)
                self._busy = True
            try:
                self._do(kind, path)
            except Exception:  # the worker must outlive its own bugs
                log.exception("checkpoint mirror worker error")
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _do(self, kind: str, path: Path) -> None:
        if self.stalled:  # a stalled copy still holds the target: wait for it, bounded per look
            log.warning("checkpoint mirror to %s still stalled; %s of %s waits", self.target, kind, path.name)
            while self.stalled:
                self._stalled.join(self._timeout)
        for attempt in range(self._retries + 1):
            result: dict = {}
            t = threading.Thread(target=_attempt, args=(result, kind, path, self.target),
                                 name=f"fluxlora-mirror-{path.name}", daemon=True)
            t0 = time.monotonic()
            t.start()
            t.join(self._timeout)
            if t.is_alive():
                self._stalled = t
                msg = (f"stage '{MIRROR_STAGE}': {kind} of {path.name} to {self.target} made no progress for "
                       f"{self._timeout:g}s; abandoned (the local checkpoint is intact)")
                self.stalls.append(msg)
                log.error("%s", msg)
                return
            err = result.get("error")
            if err is None:
                self.done.append(f"{kind} {path.name}")
                log.debug("mirrored (%s) %s to %s in %.2fs", kind, path.name, self.target, time.monotonic() - t0)
                return
            if isinstance(err, FileNotFoundError) and kind == "copy" and not path.exists():
                log.debug("mirror: %s is gone before it was copied (pruned)", path)
                return
            log.warning("checkpoint mirror: %s of %s to %s failed (attempt %d/%d): %s", kind, path.name,
                        self.target, attempt + 1, self._retries + 1, err)
            if attempt < self._retries:
                time.sleep(self._retry_wait)
        self.failed.append(f"{kind} {path.name}")
        log.error("checkpoint mirror: gave up on %s of %s to %s", kind, path.name, self.target)


def _attempt(result: dict, kind: str, path: Path, target: str) -> None:
    try:
        (_copy if kind == "copy" else _remove)(path, target)
    except BaseException as e:
        result["error"] = e


def _copy(src: Path, target: str) -> None:
    if _is_url(target):
        import fsspec

        fs, root = fsspec.core.url_to_fs(target)
        fs.makedirs(root, exist_ok=True)
        fs.put_file(str(src), f"{root.rstrip('/')}/{src.name}")  # object stores publish whole objects
        return
    folder = Path(target)
    folder.mkdir(parents=True, exist_ok=True)
    dst = folder / src.name
    # a fixed temp name per process: one writer at a time, and a stale one is simply overwritten
    tmp = folder / f".{src.name}.{os.getpid()}.partial"
    with open(src, "rb") as r, open(tmp, "wb") as w:
        shutil.copyfileobj(r, w, 1 << 20)
        w.flush()
        os.fsync(w.fileno())
    os.replace(tmp, dst)
    fsync_dir(folder)


def _remove(src: Path, target: str) -> None:
    if _is_url(target):
        import fsspec

        fs, root = fsspec.core.url_to_fs(target)
        path = f"{root.rstrip('/')}/{src.name}"
        if fs.exists(path):
            fs.rm(path)
        return
    (Path(target) / src.name).unlink(missing_ok=True)

