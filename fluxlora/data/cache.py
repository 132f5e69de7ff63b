"""Disk caches of VAE latents and text-encoder outputs: one `.npz` per image and bucket, keyed by content.

Each file carries its own content key (image bytes, caption variants, encoder identity, bucket, dtype, format), so a
stale, truncated or corrupt file is detected and rebuilt, never trusted; `manifest.json` lists every file with its
key. Files are written to a temp name in the cache folder, flushed, fsynced and renamed: a crash leaves either the
old file or the new one. Every read is time-limited (`bounded_read`); the file layout is in `cache_format`.

Example::

    cache = LatentCache("outputs/mychar/cache", encoder_id="flux-dev/...", dtype="bfloat16")
    entries = cache.build(items, encoder, batch_size=4, progress=lambda done, total: ...)
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch

from fluxlora.atomic import atomic_write_text
from fluxlora.data.cache_format import DTYPES, check_file, to_storage, write_sample
from fluxlora.data.images import ImageRecord, load_image
from fluxlora.data.rank_agreement import announce_done, announce_progress, wait_for_ranks
from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
EMPTY_CAPTION_FILE = "empty_caption.npz"
_LOG_EVERY_S = 10.0


@dataclass(frozen=True)
class CacheItem:
    """What one cache file is built from."""

    record: ImageRecord
    """The image and its caption."""
    bucket: tuple[int, int]
    """(width, height) the image is resized and cropped to."""
    captions: tuple[str, ...]
    """The caption variants to encode (the caption itself, then shuffles)."""


@dataclass(frozen=True)
class CacheEntry:
    """A cached sample on disk and where it came from."""

    file: Path
    source: Path
    bucket: tuple[int, int] = (0, 0)
    variants: int = 1


class CacheEncoder(Protocol):
    """What caching needs from the models (fluxlora.encode.CacheEncoder is the real one)."""

    def images(self, images: list[np.ndarray]) -> Any:
        """VAE latents, (B, C, h, w), for images of one size."""

    def texts(self, captions: list[str]) -> dict[str, Any]:
        """`t5` (B, L, D), `pooled` (B, P), `t5_mask` (B, L) for captions."""


class _CombinedEncoder:
    """Adapts the older `encode(images, captions) -> [{latents, t5, pooled, t5_mask}]` callable."""

    def __init__(self, encode: Callable[[list[np.ndarray], list[str]], list[dict]]) -> None:
        self.encode = encode
        self._blank = np.zeros((3, 64, 64), np.float32)

    def images(self, images: list[np.ndarray]) -> Any:
        return torch.stack([torch.as_tensor(o["latents"]) for o in self.encode(images, [""] * len(images))])

    def texts(self, captions: list[str]) -> dict[str, Any]:
        outs = self.encode([self._blank] * len(captions), captions)
        return {k: torch.stack([torch.as_tensor(o[k]) for o in outs]) for k in ("t5", "pooled", "t5_mask")}


def as_cache_encoder(encode: Any) -> CacheEncoder:
    return encode if hasattr(encode, "images") and hasattr(encode, "texts") else _CombinedEncoder(encode)


class _Reporter:
    """Progress of one rank's share: to the caller's heartbeat every time, to the other ranks at most once a second."""

    def __init__(self, progress: Callable[[int, int], None] | None, total: int,
                 announce: Callable[[int], None]) -> None:
        self.progress, self.total, self.announce = progress, total, announce
        self._last_announce = 0.0

    def __call__(self, done: int, force: bool = False) -> None:
        if self.progress is not None:
            self.progress(done, self.total)
        now = time.monotonic()
        if force or now - self._last_announce >= 1.0:
            self.announce(done)
            self._last_announce = now


def _hash_file(h: Any, path: Path) -> None:
    try:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    except OSError as e:
        raise FluxLoraError(f"image {path} cannot be read: {e.strerror or e}") from None


class LatentCache:
    """Builds and validates the cache folder of one dataset and encoder.

    Args:
        folder: the cache folder.
        encoder_id: identity of the VAE and text encoders (part of every content key).
        resolution: square side for plain `ImageRecord`s given to `build` (older callers); items carry their bucket.
        dtype: float32 | float16 | bfloat16: how tensors are stored.
        check: full (read every byte, CRCs checked) | quick (keys and array headers only) for existing files.
        read_timeout: seconds one file read may take (SIGALRM, main thread only).
    """

    def __init__(self, folder: str | Path, encoder_id: str, resolution: int | None = None, dtype: str = "float32",
                 check: str = "full", read_timeout: float = 30.0) -> None:
        if dtype not in DTYPES:
            raise FluxLoraError(f"data.cache_dtype={dtype!r} is not one of {DTYPES}")
        if check not in ("full", "quick"):
            raise FluxLoraError(f"data.cache_check={check!r} is not one of full, quick")
        self.folder = Path(folder)
        self.encoder_id = encoder_id
        self.resolution = resolution
        self.dtype = dtype
        self.full_check = check == "full"
        self.read_timeout = float(read_timeout)

    def file_for(self, item: CacheItem | ImageRecord) -> Path:
        item = self._item(item)
        tag = hashlib.sha256(str(item.record.path.resolve()).encode()).hexdigest()[:8]
        w, h = item.bucket
        return self.folder / f"{item.record.path.stem}-{tag}_{w}x{h}.npz"

    def content_key(self, item: CacheItem) -> str:
        h = hashlib.sha256()
        _hash_file(h, item.record.path)
        h.update(json.dumps([FORMAT_VERSION, self.encoder_id, list(item.bucket), self.dtype,
                             list(item.captions)]).encode("utf-8"))
        return h.hexdigest()

    def _item(self, item: CacheItem | ImageRecord) -> CacheItem:
        if isinstance(item, CacheItem):
            return item
        if self.resolution is None:
            raise ValueError("LatentCache needs a resolution for plain ImageRecords")
        return CacheItem(item, (self.resolution, self.resolution), (item.caption,))

    def build(self, items: Sequence[CacheItem | ImageRecord], encode: Any, batch_size: int = 4,
              progress: Callable[[int, int], None] | None = None, rank: int = 0, world_size: int = 1,
              empty_caption: bool = False, wait_timeout: float = 600.0) -> list[CacheEntry]:
        """Reuse every valid file, encode the rest in batches; returns one entry per item, in order.

        Args:
            items: what to cache (all ranks pass the same list; each caches every `world_size`-th item).
            encode: a `CacheEncoder`, or the older `encode(images, captions) -> [dict]` callable.
            batch_size: images per encoder call.
            progress: called as `progress(done, total)` after each file checked or written and while waiting for
                other ranks: a heartbeat for a watchdog.
            rank: this process's rank; world_size: how many processes share the work.
            empty_caption: also cache the empty caption's text outputs (caption dropout).
            wait_timeout: seconds another rank may go without progress before this one gives up.
        """
        items = [self._item(i) for i in items]
        self.folder.mkdir(parents=True, exist_ok=True)
        mine = list(range(rank, len(items), world_size))
        names = {self.file_for(items[i]).name for i in mine}
        self._remove_stale_temps(names | ({EMPTY_CAPTION_FILE, MANIFEST} if rank == 0 else set()))
        build_id = self._build_id(items)
        report = _Reporter(progress, len(mine), (lambda done: None) if world_size == 1 else
                           (lambda done: announce_progress(self.folder, rank, build_id, done, len(mine))))
        keys: dict[int, str] = {}
        todo = self._check_existing(items, mine, keys, report)
        self._encode_missing(items, todo, keys, as_cache_encoder(encode), batch_size, report)
        if empty_caption and rank == 0:
            self._ensure_empty_caption(as_cache_encoder(encode))
        entries = [CacheEntry(self.file_for(it), it.record.path, it.bucket, len(it.captions)) for it in items]
        by_name = {entries[i].file.name: keys[i] for i in mine}
        if world_size > 1:
            announce_done(self.folder, rank, build_id, by_name)
            by_name.update(wait_for_ranks(self.folder, rank, world_size, build_id, wait_timeout, progress))
        if rank == 0:
            manifest = {"format": FORMAT_VERSION, "encoder": self.encoder_id, "dtype": self.dtype, "build": build_id,
                        "files": {e.file.name: {"source": str(e.source), "bucket": list(e.bucket),
                                                "variants": e.variants, "key": by_name.get(e.file.name)}
                                  for e in entries}}
            atomic_write_text(self.folder / MANIFEST, json.dumps(manifest, indent=1))
        return entries

    def _build_id(self, items: Sequence[CacheItem]) -> str:
        """A cheap identity of the whole dataset (paths, sizes, mtimes, captions, buckets) for rank agreement."""
        h = hashlib.sha256(json.dumps([FORMAT_VERSION, self.encoder_id, self.dtype]).encode())
        for it in items:
            st = it.record.path.stat()
            h.update(json.dumps([str(it.record.path), st.st_size, st.st_mtime_ns, list(it.bucket),
                                 list(it.captions)]).encode("utf-8"))
        return h.hexdigest()

    def _remove_stale_temps(self, names: set[str]) -> None:
        """Temp files a killed run left behind (atomic_open names them `.<target>.<random>.tmp`)."""
        for tmp in self.folder.glob(".*.tmp"):
            target = tmp.name[1:].rsplit(".", 2)[0]
            if target in names:
                log.info("removing %s, left by an interrupted caching run", tmp)
                tmp.unlink(missing_ok=True)

    def _check_existing(self, items: Sequence[CacheItem], mine: list[int], keys: dict[int, str],
                        report: _Reporter) -> list[int]:
        """Fill `keys` (hashing each image) and return the items whose file must be (re)built."""
        todo, reasons, reused = [], {}, 0
        for i in mine:
            item, file = items[i], self.file_for(items[i])
            keys[i] = self.content_key(item)
            why = check_file(file, keys[i], len(item.captions), item.bucket, self.full_check, self.read_timeout)
            reused += why is None
            report(reused)  # a heartbeat per file, also for the ones to rebuild
            if why is None:
                continue
            if why != "absent":
                log.warning("cache file %s is %s; rebuilding it", file, why)
                reasons[why.split(" ")[0]] = reasons.get(why.split(" ")[0], 0) + 1
            todo.append(i)
        summary = ", ".join(f"{n} {r}" for r, n in sorted(reasons.items()))
        log.info("cache %s: %d of %d files reusable, %d to encode%s", self.folder, reused, len(mine), len(todo),
                 f" ({summary})" if summary else "")
        return todo

    def _encode_missing(self, items: Sequence[CacheItem], todo: list[int], keys: dict[int, str],
                        encoder: CacheEncoder, batch_size: int, report: _Reporter) -> None:
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i in todo:
            by_bucket.setdefault(items[i].bucket, []).append(i)
        batches = [b[s:s + batch_size] for _, b in sorted(by_bucket.items()) for s in range(0, len(b), batch_size)]
        done_before, written, t0, last_log = report.total - len(todo), 0, time.monotonic(), 0.0
        for batch in batches:
            self._encode_batch([items[i] for i in batch], [keys[i] for i in batch], encoder, batch_size)
            written += len(batch)
            report(done_before + written, force=True)
            now = time.monotonic()
            if now - last_log >= _LOG_EVERY_S or written == len(todo) or last_log == 0.0:
                rate = written / max(now - t0, 1e-6)
                log.info("cached %d/%d images (%.1f img/s, ETA %.0fs)", written, len(todo), rate,
                         (len(todo) - written) / rate)
                last_log = now

    def _encode_batch(self, chunk: list[CacheItem], keys: list[str], encoder: CacheEncoder, batch_size: int) -> None:
        latents = encoder.images([load_image(it.record.path, it.bucket) for it in chunk])
        captions = [c for it in chunk for c in it.captions]
        texts: dict[str, list] = {"t5": [], "pooled": [], "t5_mask": []}
        for s in range(0, len(captions), batch_size):
            out = encoder.texts(captions[s:s + batch_size])
            for k in texts:
                texts[k].extend(out[k][j] for j in range(len(out[k])))
        at = 0
        for item, key, lat in zip(chunk, keys, latents):
            arrays = {"latents": to_storage(lat, self.dtype)}
            for v in range(len(item.captions)):
                for k in texts:
                    arrays[f"{k}_{v}"] = to_storage(texts[k][at + v], self.dtype)
            at += len(item.captions)
            self._write(self.file_for(item), arrays, key, len(item.captions))

    def _write(self, file: Path, arrays: dict[str, np.ndarray], key: str, variants: int) -> None:
        write_sample(file, arrays, key, self.dtype, variants)

    @property
    def empty_caption_file(self) -> Path:
        return self.folder / EMPTY_CAPTION_FILE

    def _ensure_empty_caption(self, encoder: CacheEncoder) -> None:
        key = hashlib.sha256(json.dumps([FORMAT_VERSION, self.encoder_id, self.dtype, ""]).encode()).hexdigest()
        why = check_file(self.empty_caption_file, key, 1, None, True, self.read_timeout)
        if why is None:
            return
        if why != "absent":
            log.warning("cache file %s is %s; rebuilding it", self.empty_caption_file, why)
        out = encoder.texts([""])
        arrays = {f"{k}_0": to_storage(out[k][0], self.dtype) for k in ("t5", "pooled", "t5_mask")}
        self._write(self.empty_caption_file, arrays, key, 1)
