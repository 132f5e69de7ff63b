"""Crash-safe file writes: temp file in the destination folder, flush, fsync, rename, fsync the folder.

A reader (or a resumed run) sees either the old file or the complete new one, never a torn one.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Iterator

from fluxlora.errors import WriteFailed, write_error


def fsync_dir(folder: str | Path) -> None:
    """Persist a rename: the folder entry itself must reach the disk."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return  # not supported on this platform / filesystem
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_open(path: str | Path, mode: str = "wb") -> Iterator[IO]:
    """Open a temp file beside `path`; on success it replaces `path`, on error it is removed.

    A write that fails for a reason the user can fix (a full disk, a read-only or forbidden folder) raises
    :class:`~fluxlora.errors.WriteFailed` naming `path`, the file the user looks for, never the temp file.
    """
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        if tmp is not None:
            with suppress(OSError):  # already gone, or the folder turned read-only
                os.unlink(tmp)
        err = write_error(e)
        if err is not None and not (isinstance(err, WriteFailed) and err.filename == str(path)):
            raise WriteFailed(err.errno, err.strerror, str(path)) from e
        raise
    fsync_dir(path.parent)


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    with atomic_open(path, "wb") as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))
