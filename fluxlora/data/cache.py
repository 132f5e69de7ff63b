"""Disk caches of VAE latents and text-encoder outputs, one `.npz` per image, keyed by content.

Each file carries its own content key (image bytes, caption, encoder identity, resolution, dtype), so a stale,
truncated or corrupt file is detected on open and rebuilt, never trusted. Files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from fluxlora.atomic import atomic_open, atomic_write_text
from fluxlora.data.images import ImageRecord, load_image

log = logging.getLogger(__name__)

CACHE_KEYS = ("latents", "t5", "pooled", "t5_mask", "key")


@dataclass
class CacheEntry:
    """A cached sample on disk and where it came from."""

    file: Path
    source: Path


def content_key(record: ImageRecord, encoder_id: str, resolution: int, dtype: str) -> str:
    h = hashlib.sha256()
    h.update(record.path.read_bytes())
    for part in (record.caption, encoder_id, str(resolution), dtype):
        h.update(b"\0" + part.encode("utf-8"))
    return h.hexdigest()


def read_entry(file: Path) -> dict[str, np.ndarray]:
    """Load every array of a cache file (zip CRCs are checked as the members are read)."""
    with np.load(file, allow_pickle=False) as z:
        missing = [k for k in CACHE_KEYS if k not in z.files]
        if missing:
            raise ValueError(f"missing {missing}")
        return {k: z[k] for k in CACHE_KEYS}


def _valid(file: Path, key: str) -> str | None:
    """None when the file is complete and current, else why not."""
    if not file.exists():
        return "absent"
    try:
        data = read_entry(file)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as e:
        return f"unreadable ({type(e).__name__}: {e})"
    if str(data["key"]) != key:
        return "stale (image, caption or encoder changed)"
    if data["latents"].ndim != 3 or data["t5"].ndim != 2 or data["pooled"].ndim != 1:
        return "wrong shapes"
    return None


class LatentCache:
    """Builds and validates the cache folder for one dataset, resolution and encoder."""

    def __init__(self, folder: str | Path, encoder_id: str, resolution: int, dtype: str = "float32") -> None:
        self.folder = Path(folder)
        self.encoder_id = encoder_id
        self.resolution = int(resolution)
        self.dtype = dtype

    def file_for(self, record: ImageRecord) -> Path:
        return self.folder / f"{record.path.stem}_{self.resolution}.npz"

    def build(self, records: Sequence[ImageRecord], encode: Callable[[list[np.ndarray], list[str]], list[dict]],
              batch_size: int = 4, progress: Callable[[int, int], None] | None = None) -> list[CacheEntry]:
        """Reuse every valid file, encode the rest in batches; returns one entry per record, in order."""
        self.folder.mkdir(parents=True, exist_ok=True)
        todo, keys, manifest = [], {}, {}
        for rec in records:
            key = content_key(rec, self.encoder_id, self.resolution, self.dtype)
            keys[rec.path] = key
            why = _valid(self.file_for(rec), key)
            if why is not None:
                if why != "absent":
                    log.warning("cache file %s is %s; rebuilding it", self.file_for(rec), why)
                todo.append(rec)
        if todo:
            log.info("caching %d of %d images into %s", len(todo), len(records), self.folder)
        t0 = time.monotonic()
        for start in range(0, len(todo), batch_size):
            chunk = todo[start:start + batch_size]
            images = [load_image(r.path, self.resolution) for r in chunk]
            outs = encode(images, [r.caption for r in chunk])
            for rec, out in zip(chunk, outs):
                self._write(self.file_for(rec), out, keys[rec.path])
            done = start + len(chunk)
            rate = done / max(time.monotonic() - t0, 1e-6)
            log.info("cached %d/%d images (%.1f img/s, ETA %.0fs)", done, len(todo), rate, (len(todo) - done) / rate)
            if progress is not None:
                progress(done, len(todo))
        entries = [CacheEntry(self.file_for(r), r.path) for r in records]
        manifest = {e.file.name: {"source": str(e.source), "key": keys[e.source]} for e in entries}
        atomic_write_text(self.folder / "manifest.json", json.dumps(manifest, indent=1))
        return entries

    def _write(self, file: Path, out: dict, key: str) -> None:
        arrays = {k: np.ascontiguousarray(v.detach().float().cpu().numpy() if torch.is_tensor(v) else v)
                  for k, v in out.items()}
        with atomic_open(file, "wb") as f:
            np.savez(f, key=np.array(key), **arrays)
