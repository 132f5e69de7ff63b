"""Disk caches of VAE latents and text-encoder outputs: one `.npz` per image and bucket, keyed by content.

Each file carries its own content key (image bytes, caption variants, encoder identity, bucket, dtype, format), so a
stale, truncated or corrupt file is detected and rebuilt, never trusted. Texts that no image carries (the sample
prompts) get a file each, `text-<hash>.npz`, keyed the same way (`LatentCache.texts`, `CachedTexts`).
`manifest.json` lists every image's file with its key. Files are written to a temp name in the cache folder,
flushed, fsynced and renamed: a crash leaves either the old file or the new one. Every read is time-limited
(`bounded_read`); the file layout is in `cache_format`.

Example::

    cache = LatentCache("outputs/mychar/cache", encoder_id="flux-dev/...", dtype="bfloat16")
    entries = cache.build(items, encoder, batch_size=4, progress=lambda done, total: ...)
"""

from __future__ import annotations

import contextlib
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
from fluxlora.data.cache_format import DTYPES, check_file, from_storage, read_sample, to_storage, write_sample
from fluxlora.data.images import ImageRecord, load_image
from fluxlora.data.rank_agreement import announce_done, announce_progress, wait_for_ranks
from fluxlora.errors import FluxLoraError
from fluxlora.heartbeat import heartbeat

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
EMPTY_CAPTION_FILE = "empty_caption.npz"
_LOG_EVERY_S = 10.0
_TEXT_KEYS = ("t5", "pooled", "t5_mask")
CHUNK_CAPTIONS = 256
"""Captions encoded per chunk: bounds the host memory that text outputs wait in before their files are written."""


@dataclass(frozen=True)
class CacheItem:
    """What one cache file is built from."""

    record: ImageRecord
    """The image and its caption."""
    bucket: tuple[int, int]
    """(width, height) the image is resized and cropped to."""
    captions: tuple[str, ...]
    """The caption variants to encode (the caption itself, then shuffles)."""
    control_bucket: tuple[int, int] | None = None
    """FLUX.1 Kontext: (width, height) the record's control image is encoded at (None: no control)."""


@dataclass(frozen=True)
class CacheEntry:
    """A cached sample on disk and where it came from."""

    file: Path
    source: Path
    bucket: tuple[int, int] = (0, 0)
    variants: int = 1
    control_bucket: tuple[int, int] | None = None


class CacheEncoder(Protocol):
    """What caching needs from the models (`fluxlora.models.encode.StagedEncoders` is the real one; it also has
    `stage(name)`, a context in which one encoder is on the device, and `batch_size(stage, pixels)`)."""

    def images(self, images: list[np.ndarray]) -> Any:
        """VAE latents, (B, C, h, w), for images of one size (inside `stage("vae")` where there is one)."""

    def texts(self, captions: list[str]) -> dict[str, Any]:
        """`t5` (B, L, D), `pooled` (B, P), `t5_mask` (B, L) for all of `captions` (batched inside)."""


def _stage(encoder: Any, name: str) -> Any:
    """`encoder.stage(name)` where the encoder stages its models, else nothing to do."""
    stage = getattr(encoder, "stage", None)
    return stage(name) if stage is not None else contextlib.nullcontext()


def _auto_batch(encoder: Any, stage: str, pixels: int) -> int:
    """The encoder's own batch size for `stage` (`data.cache_batch_size: auto`), or 4 for one that has none."""
    size = getattr(encoder, "batch_size", None)
    return size(stage, pixels) if size is not None else 4


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
        if item.control_bucket is not None:  # an edited control image (or its size) rebuilds the entry
            _hash_file(h, item.record.control)
            h.update(json.dumps(["control", list(item.control_bucket)]).encode("utf-8"))
        return h.hexdigest()

    def _item(self, item: CacheItem | ImageRecord) -> CacheItem:
        if isinstance(item, CacheItem):
            return item
        if self.resolution is None:
            raise ValueError("LatentCache needs a resolution for plain ImageRecords")
        return CacheItem(item, (self.resolution, self.resolution), (item.caption,))

    def build(self, items: Sequence[CacheItem | ImageRecord], encode: Any, batch_size: int | None = 4,
              progress: Callable[[int, int], None] | None = None, rank: int = 0, world_size: int = 1,
              empty_caption: bool = False, wait_timeout: float = 600.0) -> list[CacheEntry]:
        """Reuse every valid file, encode the rest in batches; returns one entry per item, in order.

        Args:
            items: what to cache (all ranks pass the same list; each caches every `world_size`-th item).
            encode: a `CacheEncoder`, or the older `encode(images, captions) -> [dict]` callable.
            batch_size: images per encoder call; None = the encoder's own choice per stage (sized to the memory
                left on the device: `data.cache_batch_size: auto`).
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
        extra = [""] if empty_caption and rank == 0 and self._empty_caption_stale() else []
        self._encode_missing(items, todo, keys, as_cache_encoder(encode), batch_size, report, extra)
        entries = [CacheEntry(self.file_for(it), it.record.path, it.bucket, len(it.captions), it.control_bucket)
                   for it in items]
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
            if it.control_bucket is not None:
                cs = it.record.control.stat()
                h.update(json.dumps([str(it.record.control), cs.st_size, cs.st_mtime_ns,
                                     list(it.control_bucket)]).encode("utf-8"))
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
            why = check_file(file, keys[i], len(item.captions), item.bucket, self.full_check, self.read_timeout,
                             control=item.control_bucket)
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
                        encoder: CacheEncoder, batch_size: int | None, report: _Reporter,
                        extra: list[str]) -> None:
        """Encode `todo` chunk by chunk, each chunk stage by stage (`fluxlora.models.encode.StagedEncoders`): the latents
        of a chunk wait in host memory while CLIP-L and then T5 encode its captions, then its files are written.
        `extra` captions (the empty one) are encoded with the first chunk and written to their own file."""
        done_before, written, t0, last_log = report.total - len(todo), 0, time.monotonic(), 0.0
        chunks = self._chunks(items, todo) or ([[]] if extra else [])
        for n, chunk in enumerate(chunks):
            latents = self._latents([items[i] for i in chunk], encoder, batch_size)
            controls = self._latents([items[i] for i in chunk], encoder, batch_size, control=True)
            wanted = [c for i in chunk for c in items[i].captions] + (extra if n == 0 else [])
            captions = list(dict.fromkeys(wanted))
            texts = encoder.texts(captions)
            row = {c: j for j, c in enumerate(captions)}
            for i, lat, ctl in zip(chunk, latents, controls):
                arrays = {"latents": lat} if ctl is None else {"latents": lat, "control": ctl}
                for v, caption in enumerate(items[i].captions):
                    for k in _TEXT_KEYS:
                        arrays[f"{k}_{v}"] = to_storage(texts[k][row[caption]], self.dtype)
                self._write(self.file_for(items[i]), arrays, keys[i], len(items[i].captions))
                written += 1
                report(done_before + written, force=True)
                now = time.monotonic()
                if now - last_log >= _LOG_EVERY_S or written == len(todo) or last_log == 0.0:
                    rate = written / max(now - t0, 1e-6)
                    log.info("cached %d/%d images (%.1f img/s, ETA %.0fs)", written, len(todo), rate,
                             (len(todo) - written) / rate)
                    last_log = now
            if n == 0 and extra:
                self._write(self.empty_caption_file, {f"{k}_0": to_storage(texts[k][row[""]], self.dtype)
                                                      for k in _TEXT_KEYS}, self._empty_caption_key(), 1)

    @staticmethod
    def _chunks(items: Sequence[CacheItem], todo: list[int]) -> list[list[int]]:
        """`todo` in bucket order, cut so a chunk holds at most `CHUNK_CAPTIONS` captions (its text outputs wait in
        host memory: 256 T5 sequences of 512 x 4096 in bf16 are 1 GiB)."""
        chunks: list[list[int]] = []
        count = CHUNK_CAPTIONS
        for i in sorted(todo, key=lambda i: items[i].bucket):
            if count + len(items[i].captions) > CHUNK_CAPTIONS:
                chunks.append([])
                count = 0
            chunks[-1].append(i)
            count += len(items[i].captions)
        return chunks

    def _latents(self, chunk: list[CacheItem], encoder: CacheEncoder, batch_size: int | None,
                 control: bool = False) -> list[np.ndarray | None]:
        """Latents of `chunk` in the VAE's stage, as stored arrays in `chunk`'s order (it is bucket-sorted, so each
        bucket's batches run in turn). A batch that runs out of device memory is halved and tried again (down to one
        image: then the error stands). `control`: the latents of the items' control images instead (FLUX.1
        Kontext), at their `control_bucket`; None for an item without one."""
        out: dict[int, np.ndarray] = {}
        size_of = (lambda it: it.control_bucket) if control else (lambda it: it.bucket)
        todo = [(n, it) for n, it in enumerate(chunk) if size_of(it) is not None]
        if not todo:
            return [None] * len(chunk)
        what = "control latents" if control else "latents"
        with _stage(encoder, "vae"):
            for bucket in dict.fromkeys(size_of(it) for _, it in todo):
                group = [(n, it) for n, it in todo if size_of(it) == bucket]
                size = batch_size or _auto_batch(encoder, "vae", bucket[0] * bucket[1])
                log.info("caching: %d %s at %dx%d with the VAE, %d per batch", len(group), what, *bucket, size)
                start = 0
                while start < len(group):
                    try:
                        lat = encoder.images([load_image(it.record.control if control else it.record.path, bucket)
                                              for _, it in group[start:start + size]])
                    except torch.OutOfMemoryError:
                        if size == 1:
                            raise
                        size //= 2
                        log.warning("caching: the VAE ran out of device memory; %d images per batch from now on",
                                    size)
                        torch.cuda.empty_cache()
                        continue
                    for (n, _), x in zip(group[start:start + len(lat)], lat):
                        out[n] = to_storage(x, self.dtype)
                    start += len(lat)
                    heartbeat("caching", f"VAE {what} {start}/{len(group)} at {bucket[0]}x{bucket[1]}")
        return [out.get(n) for n in range(len(chunk))]

    def _write(self, file: Path, arrays: dict[str, np.ndarray], key: str, variants: int) -> None:
        write_sample(file, arrays, key, self.dtype, variants)

    def text_file(self, text: str) -> Path:
        """The file of one text's encodings that no image carries (a sample prompt, a negative prompt)."""
        return self.folder / f"text-{hashlib.sha256(text.encode('utf-8')).hexdigest()[:16]}.npz"

    def _text_key(self, text: str) -> str:
        return hashlib.sha256(json.dumps([FORMAT_VERSION, self.encoder_id, self.dtype, "text", text])
                              .encode("utf-8")).hexdigest()

    def texts(self, texts: Sequence[str], encode: Callable[[list[str]], dict]) -> dict[str, torch.Tensor]:
        """`pooled`, `t5` and `t5_mask` of `texts`, stacked in their order, as `encode` (`StagedEncoders.texts`)
        gives them: read from this folder where a current file holds them, the rest encoded in one call and written,
        one file per text. A resumed or repeated run then renders its samples without bringing CLIP-L and T5 to the
        device again (on the H200 that trip took 11-15 s of each run's start, for two prompts). The values are the
        stored ones (in the cache dtype) either way, so a run and its resume render alike. A file that cannot be
        written is a warning, not an error: the encodings are in hand, only the next run's shortcut is lost."""
        rows: dict[str, dict[str, torch.Tensor]] = {}
        missing = []
        self._remove_stale_temps({self.text_file(t).name for t in texts})
        for text in dict.fromkeys(texts):
            file, key = self.text_file(text), self._text_key(text)
            why = check_file(file, key, 1, None, self.full_check, self.read_timeout)
            if why is None:
                rows[text] = read_sample(file, 0, self.read_timeout, latents=False)
                continue
            if why != "absent":
                log.warning("cache file %s is %s; rebuilding it", file, why)
            missing.append((text, file, key))
        if missing:
            out = encode([text for text, _, _ in missing])
            for i, (text, file, key) in enumerate(missing):
                arrays = {f"{k}_0": to_storage(out[k][i], self.dtype) for k in _TEXT_KEYS}
                rows[text] = {k: from_storage(arrays[f"{k}_0"], self.dtype) for k in _TEXT_KEYS}
                try:
                    self._write(file, arrays, key, 1)
                except OSError as e:
                    log.warning("could not keep a prompt's encodings in %s (%s: %s); the next run encodes it again",
                                file, type(e).__name__, e)
        return {k: torch.stack([rows[t][k] for t in texts]) for k in _TEXT_KEYS}

    @property
    def empty_caption_file(self) -> Path:
        return self.folder / EMPTY_CAPTION_FILE

    def _empty_caption_key(self) -> str:
        return hashlib.sha256(json.dumps([FORMAT_VERSION, self.encoder_id, self.dtype, ""]).encode()).hexdigest()

    def _empty_caption_stale(self) -> bool:
        """Whether the empty caption's file must be (re)built."""
        why = check_file(self.empty_caption_file, self._empty_caption_key(), 1, None, True, self.read_timeout)
        if why not in (None, "absent"):
            log.warning("cache file %s is %s; rebuilding it", self.empty_caption_file, why)
        return why is not None


class CachedTexts:
    """An encoder's `texts(captions)` answered from a `LatentCache` where it can (`LatentCache.texts`): what the
    sampler encodes its prompts with, so only prompts new to the cache folder bring the text encoders back.

    Args:
        cache: the data cache (its folder, encoder identity, dtype and checks).
        encoder: anything with `texts(captions) -> {pooled, t5, t5_mask}` (`StagedEncoders`).
    """

    def __init__(self, cache: LatentCache, encoder: Any) -> None:
        self.cache, self.encoder = cache, encoder

    def texts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        return self.cache.texts(captions, self.encoder.texts)
