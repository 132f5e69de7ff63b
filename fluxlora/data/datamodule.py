"""FluxDataModule: image folders → cache → DataLoader of cached tensors (the training step never sees pixels).

Example::

    dm = FluxDataModule(cfg.data, cache_dir="outputs/mychar/cache", seed=42)
    dm.scan()                                            # folders / dataset.toml → records and buckets
    dm.build_cache(cache_encoder(comps, device, 512), encoder_id, progress=watchdog_heartbeat)
    trainer.fit(module, datamodule=dm)                   # resumes the data order from a checkpoint too
"""

from __future__ import annotations

import hashlib
import itertools
import json
import logging
import warnings
from collections import Counter
from dataclasses import replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import default_collate
from typing_extensions import override

from fluxlora.data.buckets import BucketBatchSampler, SampleKey
from fluxlora.data.cache import CacheEntry, CacheItem, LatentCache
from fluxlora.data.captions import caption_variants
from fluxlora.data.controls import attach_controls
from fluxlora.data.holdout import hold_out
from fluxlora.data.images import ImageRecord, scan_subset
from fluxlora.data.loader import CachedDataset, StageNamedDataLoader, seed_worker
from fluxlora.data.settings import DataSettings, data_settings
from fluxlora.data.synthetic import make_synthetic
from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)


def cache_batch_size(value: Any) -> int | None:
    """`data.cache_batch_size`: a positive int, or `auto` (None: each encoder stage sizes its batches to the memory
    left on the device)."""
    if str(value) == "auto":
        return None
    try:
        size = int(value)
    except (TypeError, ValueError):
        size = 0
    if size < 1 or str(size) != str(value).strip():
        raise FluxLoraError(f"data.cache_batch_size={value!r} must be a positive integer or auto")
    return size


class FluxDataModule(L.LightningDataModule):
    """Batches of cached VAE latents and text embeddings, drawn within aspect-ratio buckets.

    The order of batches depends only on (seed, epoch); `state_dict()` records the epoch and how many batches of it
    were trained, so a run resumed from a checkpoint continues with the next batch, repeating and skipping none.

    Args:
        cfg: the `data` config node (source, path, subsets, resolution, buckets, batch_size, num_workers, timeout,
            read_timeout, cache_* ...).
        cache_dir: where the `.npz` caches live.
        synthetic_dir: where the embedded default's images are generated.
        seed: shuffling seed.
        rank: this process's rank (caching work and batches are split by rank).
        world_size: number of processes.
        val_split: images of the dataset held out for the validation loss, never trained on: a count, or a
            fraction of the images (`validation.split`; 0 = none).
        val_path: a folder (or dataset.toml) of validation images instead (`validation.path`), read with the
            `data` keys (captions) and sized with the training buckets.
        val_seed: seeds which images `val_split` holds out (`validation.seed`).
    """

    def __init__(self, cfg: Any, cache_dir: str | Path, synthetic_dir: str | Path | None = None, seed: int = 0,
                 rank: int = 0, world_size: int = 1, val_split: int | float = 0, val_path: str | None = None,
                 val_seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.cache_dir = Path(cache_dir)
        self.synthetic_dir = Path(synthetic_dir) if synthetic_dir else self.cache_dir.parent / "synthetic"
        self.seed = int(seed)
        self.rank, self.world_size = int(rank), int(world_size)
        self.settings: DataSettings | None = None
        self.records: list[ImageRecord] = []
        self.items: list[CacheItem] = []
        self.entries: list[CacheEntry] = []
        self.sampler: BucketBatchSampler | None = None
        self._empty_caption_file: Path | None = None
        self._resume: dict | None = None
        self.val_split, self.val_path, self.val_seed = val_split, val_path, int(val_seed)
        self.val_records: list[ImageRecord] = []
        """Validation images (held out of the dataset, or from `val_path`): cached like the training images."""
        self.val_items: list[CacheItem] = []
        self.val_entries: list[CacheEntry] = []

    @override
    def setup(self, stage: str) -> None:
        """The trainer's rank and world size are the ones the batches are split by; the sampler (made in
        `train_dataloader`) and the epoch length (counted before the trainer existed) must agree with them."""
        trainer = self.trainer
        if trainer is None:
            return
        if (trainer.global_rank, trainer.world_size) != (self.rank, self.world_size):
            if self.sampler is not None or self.entries:
                raise FluxLoraError(
                    f"the data was split for rank {self.rank} of {self.world_size}, but the trainer runs this process "
                    f"as rank {trainer.global_rank} of {trainer.world_size}: check trainer.devices/num_nodes against "
                    "the processes the launcher (torchrun, SLURM) started")
            self.rank, self.world_size = trainer.global_rank, trainer.world_size

    def scan(self) -> list[ImageRecord]:
        """Find the images and captions (generating the synthetic set for the embedded default)."""
        cfg = self.cfg
        if cfg.source == "synthetic":
            controls = bool(cfg.get("controls", False))
            folder = make_synthetic(self.synthetic_dir / "kontext" if controls else self.synthetic_dir,
                                    count=int(cfg.count), size=int(cfg.resolution), seed=self.seed,
                                    trigger=str(cfg.class_token or "sks"), controls=controls)
            node = _Overridden(cfg, control_path=str(folder / "control")) if controls else cfg
            settings = data_settings(node, folder=folder)
        elif cfg.source == "folder":
            settings = data_settings(cfg)
        else:
            raise FluxLoraError(f"data.source={cfg.source!r} is not one of synthetic, folder")
        _check_pairing(settings)
        records, items = [], []
        for index, subset in enumerate(settings.subsets):
            for rec in attach_controls(scan_subset(subset, index)[0], subset):
                records.append(rec)
                items.append(_cache_item(rec, subset, settings))
        cache_batch_size(cfg.get("cache_batch_size", "auto"))  # a bad value fails before any model loads
        self.settings = settings
        self.records, self.items, self.val_records, self.val_items = self._split_validation(records, items)
        self._log_dataset()
        return self.records

    def _split_validation(self, records: list[ImageRecord], items: list[CacheItem]) -> tuple[list, list, list, list]:
        """(training records, items, validation records, items): the held-out ones, or those of `val_path`."""
        total = len(records)
        held = set(hold_out(records, self.val_split, self.val_seed)) if self.val_split else set()
        val_records, val_items = [records[i] for i in sorted(held)], [items[i] for i in sorted(held)]
        records = [r for i, r in enumerate(records) if i not in held]
        items = [it for i, it in enumerate(items) if i not in held]
        if held:
            log.info("validation: %d of the %d images held out (validation.split=%s, seed %d), never trained on: %s",
                     len(held), total, self.val_split, self.val_seed, _names(val_records))
        if self.val_path not in (None, ""):
            val_records, val_items = self._scan_validation_path(records)
            log.info("validation: %d images from %s (validation.path)", len(val_records), self.val_path)
        return records, items, val_records, val_items

    def _scan_validation_path(self, train: list[ImageRecord]) -> tuple[list[ImageRecord], list[CacheItem]]:
        """The images of `val_path`, captioned by the `data` keys and sized by the training buckets."""
        node = _Overridden(self.cfg, path=str(self.val_path), subsets=[])
        try:
            vs = data_settings(node)
        except FluxLoraError as e:
            raise FluxLoraError(f"validation.path: {e}") from None
        buckets, records, items = self.settings.buckets, [], []
        for index, subset in enumerate(vs.subsets):
            try:
                found = scan_subset(subset, index)[0]
            except FluxLoraError as e:
                raise FluxLoraError(f"validation.path: {e}") from None
            try:
                found = attach_controls(found, subset)
            except FluxLoraError as e:
                raise FluxLoraError(f"validation.path: {e}") from None
            if self.settings.paired != (subset.control_dir is not None):
                raise FluxLoraError(f"validation.path={self.val_path}: the training images are "
                                    f"{'' if self.settings.paired else 'not '}paired with control images, so these "
                                    f"must {'' if self.settings.paired else 'not '}be (data.control_path / "
                                    "control_directory)")
            for rec in found:
                records.append(rec)
                items.append(_cache_item(rec, subset, replace(vs, buckets=buckets,
                                                              control_resize=self.settings.control_resize),
                                         "validation image"))
        trained = {r.path.resolve() for r in train}
        both = [r for r in records if r.path.resolve() in trained]
        if both:
            raise FluxLoraError(f"validation.path={self.val_path}: {len(both)} of its images are also training images "
                                f"({_names(both)}); give a folder of its own, or use validation.split")
        return records, items

    def _log_dataset(self) -> None:
        s = self.settings
        sizes = Counter(it.bucket for it in self.items)
        small = sum(n for b, n in sizes.items() if s.buckets.is_small(b))
        log.info("dataset %s: %d images in %d folder(s), %d samples per epoch; %s", s.source, len(self.records),
                 len(s.subsets), self.samples_per_epoch(), s.buckets.describe())
        log.info("buckets: %s", ", ".join(f"{w}x{h}: {n}" for (w, h), n in sorted(sizes.items())))
        if small:
            log.warning("%d images are smaller than data.buckets.min_size=%d and train at their own size (not "
                        "upscaled; set data.buckets.upscale=true to enlarge them)", small, s.buckets.min_size)

    def samples_per_epoch(self) -> int:
        return sum(self.settings.subsets[r.subset].num_repeats for r in self.records)

    @property
    def resolution(self) -> str:
        """The training size in words, for metadata: '512' (square) or '768x512'."""
        w, h = self.settings.buckets.resolution if self.settings else (int(self.cfg.resolution),) * 2
        return str(w) if w == h else f"{w}x{h}"

    def _needs_empty_caption(self) -> bool:
        return any(s.caption_dropout_rate > 0 for s in self.settings.subsets)

    def latent_cache(self, encoder_id: str) -> LatentCache:
        """The cache folder for `encoder_id`'s outputs, with this data config's storage dtype, checks and read limit
        (the images' files, and through `LatentCache.texts` the sample prompts')."""
        return LatentCache(self.cache_dir, encoder_id, dtype=str(self.cfg.get("cache_dtype", "float32")),
                           check=str(self.cfg.get("cache_check", "full")), read_timeout=self.read_timeout)

    def build_cache(self, encode: Any, encoder_id: str, progress=None, rank: int | None = None,
                    world_size: int | None = None) -> list[CacheEntry]:
        """Make sure every image has a valid cache file (reusing what is already there).

        Args:
            encode: a `fluxlora.models.encode.CacheEncoder` (or the older `encode(images, captions)` callable).
            encoder_id: identity of the encoders, part of every content key.
            progress: `progress(done, total)` heartbeat, called for every file checked or written.
            rank, world_size: split the work across processes (default: the module's own).
        """
        if not self.records:
            self.scan()
        cfg = self.cfg
        cache = self.latent_cache(encoder_id)
        # the validation images share the cache (same content keys: one moved between the sets is not re-encoded)
        entries = cache.build(self.items + self.val_items, encode, batch_size=cache_batch_size(cfg.cache_batch_size),
                                   progress=progress,
                                   rank=self.rank if rank is None else rank,
                                   world_size=self.world_size if world_size is None else world_size,
                                   empty_caption=self._needs_empty_caption(),
                                   wait_timeout=float(cfg.get("cache_wait_timeout", 600)))
        self.entries, self.val_entries = entries[:len(self.items)], entries[len(self.items):]
        self._empty_caption_file = cache.empty_caption_file
        return self.entries

    def validation_plan(self, batch_size: int | None = None, rank: int | None = None,
                        world_size: int | None = None) -> list[list[int]]:
        """This rank's validation batches, as indices into `val_entries`: every image once, batches within one
        bucket, in a fixed order; rank R of N takes every N-th batch (`validation_batch` reads one)."""
        size = int(batch_size or self.settings.batch_size)
        rank = self.rank if rank is None else rank
        world_size = self.world_size if world_size is None else world_size
        def sizes(i: int) -> tuple:  # a batch holds one target size, and one control size
            return self.val_entries[i].bucket + (self.val_entries[i].control_bucket or ())

        order = sorted(range(len(self.val_entries)), key=lambda i: (sizes(i), i))
        batches: list[list[int]] = []
        for _, group in itertools.groupby(order, key=sizes):
            group = list(group)
            batches += [group[j:j + size] for j in range(0, len(group), size)]
        return batches[rank::world_size]

    def validation_batch(self, indices: list[int]) -> dict[str, Any]:
        """One validation batch, read from the cache (time-limited like training reads): each image with its own
        caption (variant 0, never dropped)."""
        dataset = CachedDataset(self.val_entries, self.read_timeout, self._empty_caption_file)
        return default_collate([dataset[SampleKey(i, 0, False)] for i in indices])

    @property
    def paired(self) -> bool:
        """Whether every image has a control image (FLUX.1 Kontext): the batches then carry `control` latents."""
        return bool(self.settings and self.settings.paired)

    @property
    def read_timeout(self) -> float:
        return float(self.cfg.get("read_timeout", 30))

    def make_sampler(self) -> BucketBatchSampler:
        subsets = self.settings.subsets
        # with controls kept at their own size the control's bucket is part of the key: a batch stacks both
        return BucketBatchSampler(
            [it.bucket + (it.control_bucket or ()) for it in self.items], batch_size=self.settings.batch_size, seed=self.seed,
            repeats=[subsets[r.subset].num_repeats for r in self.records],
            variants=[len(it.captions) for it in self.items],
            dropout=[subsets[r.subset].caption_dropout_rate for r in self.records],
            rank=self.rank, world_size=self.world_size)

    def _batch_sampler(self) -> BucketBatchSampler:
        """The training sampler, or one made like it before Lightning asks for it (the dataset scanned first)."""
        if not self.items:
            self.scan()
        return self.sampler or self.make_sampler()

    def step_shapes(self) -> set[tuple[int, int]]:
        """(samples, image tokens) of the training batches (`BucketBatchSampler.step_shapes`)."""
        return self._batch_sampler().step_shapes()

    def batches_per_epoch(self) -> int:
        """Batches this rank trains per epoch (all buckets, repeats included)."""
        return len(self._batch_sampler())

    def _order_id(self) -> str:
        """Identity of the sample order: a checkpoint's position only means something for the same order."""
        parts = [[it.record.path.name, it.record.subset, list(it.bucket), len(it.captions)] for it in self.items]
        s = self.sampler
        parts.append([s.batch_size, s.seed, s.repeats, s.dropout, s.world_size])
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()[:16]

    @override
    def train_dataloader(self) -> StageNamedDataLoader:
        if not self.entries:
            raise RuntimeError("FluxDataModule.build_cache() must run before training")
        self.sampler = self.make_sampler()
        if self._resume is not None:
            self._apply_resume(self._resume)
        workers = int(self.cfg.get("num_workers", 2))
        # PyTorch rejects a timeout without workers
        timeout = float(self.cfg.get("timeout", 60)) if workers > 0 else 0.0
        pin = self._uses_cuda()
        log.info("DataLoader: %d worker(s), batch timeout %s, pin_memory %s, cache reads limited to %gs", workers,
                 f"{timeout:g}s" if workers else "n/a (no workers)", pin, self.read_timeout)
        return StageNamedDataLoader(
            CachedDataset(self.entries, self.read_timeout, self._empty_caption_file),
            batch_sampler=self.sampler,
            num_workers=workers,
            timeout=timeout,
            pin_memory=pin,
            persistent_workers=workers > 0,
            worker_init_fn=seed_worker if workers > 0 else None,
            # the loader draws its workers' base seed when an epoch starts: from its own generator, so the global
            # RNG (noise and σ, restored exactly on resume) is not consumed at epoch boundaries
            generator=torch.Generator().manual_seed(self.seed),
        )

    def _uses_cuda(self) -> bool:
        trainer = self.trainer
        if trainer is not None:
            return trainer.strategy.root_device.type == "cuda"
        return torch.cuda.is_available()

    def position(self) -> tuple[int, int]:
        """(epoch, batches of it already trained), as Lightning will resume: from its own loop counters.

        A checkpoint saved in `on_train_batch_end` has `ready` = batches fetched = batches trained (Lightning
        fetches no batch ahead when the loader has a length); one saved at the end of an epoch points to the next.
        """
        epoch = self.sampler.epoch if self.sampler is not None else 0
        trainer = self.trainer
        if trainer is None or self.sampler is None:
            return epoch, 0
        loop = trainer.fit_loop
        ep, bp = loop.epoch_progress.current, loop.epoch_loop.batch_progress.current
        epoch, done = ep.processed, (bp.ready if ep.started > ep.processed else 0)
        if done >= len(self.sampler):
            epoch, done = epoch + 1, 0
        return epoch, done

    @override
    def state_dict(self) -> dict[str, Any]:
        if self.sampler is None:
            return {}
        epoch, done = self.position()
        return {"epoch": epoch, "batches_done": done, "batches_per_epoch": len(self.sampler), "seed": self.seed,
                "order": self._order_id()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if not state_dict:
            return
        self._resume = dict(state_dict)
        # the loader resumes through this state, not through Lightning's stateful-loader protocol
        warnings.filterwarnings("ignore", message="You're resuming from a checkpoint that ended before the epoch ended")
        if self.sampler is not None:
            self._apply_resume(self._resume)

    def _apply_resume(self, state: dict) -> None:
        epoch, done = int(state.get("epoch", 0)), int(state.get("batches_done", 0))
        if state.get("order") != self._order_id():
            log.warning("the dataset, batch size or seed changed since the checkpoint: epoch %d starts from its first "
                        "batch (the sample order differs from the interrupted run)", epoch)
            done = 0
        self.sampler.resume_at(epoch, done)
        self._resume = None
        log.info("data resumes at epoch %d, batch %d of %d", epoch, done, len(self.sampler))


def _check_pairing(settings: DataSettings) -> None:
    """A dataset is paired throughout or not at all: a batch cannot stack items with and without control latents."""
    if settings.paired and any(s.control_dir is None for s in settings.subsets):
        lone = next(s for s in settings.subsets if s.control_dir is None)
        raise FluxLoraError(f"subset {lone.image_dir} has no control folder but others do: every subset of a "
                            "paired (Kontext) dataset needs one (data.control_path, subsets[i].control_path or "
                            "control_directory)")


def _cache_item(rec: ImageRecord, subset: Any, settings: DataSettings, what: str = "image") -> CacheItem:
    """What one record is cached as: its bucket, caption variants and, paired, its control's size (the target's
    bucket, or with `control_resize: keep` the bucket of the control's own size)."""
    try:
        bucket = settings.buckets.bucket_for(rec.width, rec.height)
    except FluxLoraError as e:
        raise FluxLoraError(f"{what} {rec.path}: {e}") from None
    control = None
    if rec.control is not None:
        control = bucket
        if settings.control_resize == "keep":
            try:
                control = keep_size(settings, rec.control_width, rec.control_height)
            except FluxLoraError as e:
                raise FluxLoraError(f"control image {rec.control}: {e}") from None
    return CacheItem(rec, bucket, caption_variants(rec.caption, subset, settings.caption_variants), control)


def keep_size(settings: DataSettings, width: int, height: int) -> tuple[int, int]:
    """`control_resize: keep`: a control image at its own aspect ratio and size, scaled down only to the bucket area
    (a large control cannot multiply the sequence length) and to sides that are multiples of 16 (Flux's packing)."""
    b = settings.buckets
    return replace(b, enabled=True, upscale=False, step=16, min_size=16).bucket_for(width, height)


def _names(records: list[ImageRecord], most: int = 5) -> str:
    names = [r.path.name for r in records[:most]]
    return ", ".join(names) + (f", ... ({len(records) - most} more)" if len(records) > most else "")


class _Overridden:
    """A config node read through `.get` with some keys replaced (the validation folder's `data` node)."""

    def __init__(self, node: Any, **values: Any) -> None:
        self._node, self._values = node, values

    def get(self, key: str, default: Any = None) -> Any:
        return self._values[key] if key in self._values else self._node.get(key, default)
