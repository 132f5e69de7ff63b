"""Aspect-ratio buckets and the batch sampler that draws batches within one bucket, in an order that depends only on
(seed, epoch), so a resumed run can skip exactly the batches it already trained on.

Example::

    buckets = BucketSettings(resolution=(1024, 1024), min_size=256, max_size=2048)
    size = buckets.bucket_for(3000, 2000)             # (1216, 768): never upscaled unless upscale=True
    sampler = BucketBatchSampler([size, ...], batch_size=2, seed=42)
    sampler.set_epoch(3)
    first_batch = next(iter(sampler))                  # [SampleKey(record=..., variant=..., drop_caption=...), ...]
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Sequence

import numpy as np
from torch.utils.data import Sampler

from fluxlora.errors import FluxLoraError

# Flux's VAE downsamples by 8 and the transformer packs 2x2 latent patches: every side must be a multiple of 16
_SIDE_MULTIPLE = 16


def tokens_of(bucket: Sequence[int]) -> int:
    """The transformer's image tokens for a (width, height) bucket: one per 16 x 16 pixels."""
    width, height = bucket
    return (width // _SIDE_MULTIPLE) * (height // _SIDE_MULTIPLE)


@dataclass(frozen=True)
class BucketSettings:
    """How images are sized: aspect-ratio buckets of about `resolution` pixels, or one fixed crop."""

    enabled: bool = True
    """Buckets on; off = every image is resized to cover `resolution` and centre-cropped to it (FluxGym)."""
    resolution: tuple[int, int] = (512, 512)
    """Target (width, height): the bucket area, or the fixed crop size when buckets are off."""
    min_size: int = 256
    """Smallest bucket side (only buckets from the predefined set; see `upscale`)."""
    max_size: int = 1024
    """Largest bucket side."""
    step: int = 64
    """Bucket sides are multiples of this."""
    upscale: bool = False
    """Allow small images to be enlarged to a bucket of the full area (sd-scripts' default); off = an image never
    grows: it gets a bucket of its own size rounded down to `step` (sd-scripts' `bucket_no_upscale`)."""

    def __post_init__(self) -> None:
        w, h = self.resolution
        if self.step % _SIDE_MULTIPLE or self.step <= 0:
            raise FluxLoraError(f"data.buckets.step={self.step} must be a positive multiple of {_SIDE_MULTIPLE}")
        if (w % _SIDE_MULTIPLE or h % _SIDE_MULTIPLE) and not self.enabled:
            raise FluxLoraError(f"data.resolution={w}x{h}: both sides must be multiples of {_SIDE_MULTIPLE}")
        if self.enabled and not self.step <= self.min_size <= self.max_size:
            raise FluxLoraError(f"data.buckets: need step <= min_size <= max_size, got {self.step}, "
                                f"{self.min_size}, {self.max_size}")

    def describe(self) -> str:
        w, h = self.resolution
        if not self.enabled:
            return f"fixed {w}x{h} centre crop"
        return (f"buckets of ~{w}x{h} px, sides {self.min_size}..{self.max_size} step {self.step}, "
                f"{'upscaling' if self.upscale else 'never upscaling'}")

    def predefined(self) -> list[tuple[int, int]]:
        """sd-scripts' bucket set: for each width, the tallest height within the area and the side limits."""
        area = self.resolution[0] * self.resolution[1]
        side = int(math.sqrt(area)) // self.step * self.step
        sizes = {(side, side)}
        for width in range(self.min_size, self.max_size + 1, self.step):
            height = min(self.max_size, area // width // self.step * self.step)
            if height >= self.min_size:
                sizes |= {(width, height), (height, width)}
        return sorted(sizes)

    def bucket_for(self, width: int, height: int) -> tuple[int, int]:
        """The (width, height) an image of this size is trained at; raises when it is smaller than one step."""
        if not self.enabled:
            return self.resolution
        if self.upscale:
            aspect = math.log(width / height)
            return min(self.predefined(), key=lambda s: (abs(math.log(s[0] / s[1]) - aspect), -s[0] * s[1]))
        area = self.resolution[0] * self.resolution[1]
        scale = min(1.0, math.sqrt(area / (width * height)), self.max_size / width, self.max_size / height)
        sw, sh, aspect = width * scale + 1e-6, height * scale + 1e-6, width / height

        def down(x: float) -> int:
            return int(x) // self.step * self.step

        # round one side down to the step and derive the other (as sd-scripts does), never above the scaled size
        candidates = [(w, h) for w, h in ((down(sw), down(min(sh, down(sw) / aspect))),
                                          (down(min(sw, down(sh) * aspect)), down(sh))) if w > 0 and h > 0]
        if not candidates:
            raise FluxLoraError(f"{width}x{height} is smaller than one bucket step ({self.step} px)")
        return min(candidates, key=lambda s: (abs(math.log(s[0] / s[1] / aspect)), -s[0] * s[1]))

    def is_small(self, bucket: tuple[int, int]) -> bool:
        """A bucket below `min_size` (an image too small to reach it without upscaling)."""
        return self.enabled and min(bucket) < self.min_size


class SampleKey(NamedTuple):
    """What the sampler hands the dataset for one sample: which image, which caption."""

    record: int
    """Index of the image in the dataset's records."""
    variant: int
    """Which of the image's cached caption variants (shuffles) to use."""
    drop_caption: bool
    """Train on the empty caption instead (caption dropout)."""


class _EpochForwarder(Sampler[int]):
    """`batch_sampler.sampler`, where Lightning 2.6 looks for `set_epoch` (it calls it on `loader.sampler` and
    `loader.batch_sampler.sampler`, never on the batch sampler itself). Iterating it gives the epoch's record order."""

    def __init__(self, owner: "BucketBatchSampler") -> None:
        self._owner = owner

    def set_epoch(self, epoch: int) -> None:
        self._owner.set_epoch(epoch)

    def __iter__(self) -> Iterator[int]:
        return (k.record for batch in self._owner.epoch_batches(self._owner.epoch) for k in batch)

    def __len__(self) -> int:
        return sum(len(b) for b in self._owner.epoch_batches(self._owner.epoch))


class BucketBatchSampler(Sampler[list[SampleKey]]):
    """Batches of samples that share a bucket, in an order that depends only on (seed, epoch).

    Every record is seen `repeats[i]` times per epoch. Batches are formed within each bucket, then all batches are
    shuffled; the last batch of a bucket may be smaller. With several ranks each takes every `world_size`-th batch
    (the list is padded by wrapping around so all ranks get the same count and no collective waits forever).

    Args:
        buckets: the bucket of each record.
        batch_size: samples per batch.
        seed: the run's seed.
        repeats: per record, times seen per epoch (default 1).
        variants: per record, how many caption variants its cache file holds (default 1).
        dropout: per record, probability of training on the empty caption (default 0).
        shuffle: off = records in order (for tests and inspection).
        rank: this process's rank.
        world_size: number of ranks.
    """

    def __init__(self, buckets: Sequence[tuple[int, int]], batch_size: int, seed: int,
                 repeats: Sequence[int] | None = None, variants: Sequence[int] | None = None,
                 dropout: Sequence[float] | None = None, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1) -> None:
        n = len(buckets)
        if n == 0:
            raise FluxLoraError("the dataset has no samples to draw batches from")
        if batch_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"batch_size={batch_size}, rank={rank}, world_size={world_size}")
        self.buckets = [tuple(b) for b in buckets]
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.repeats = list(repeats) if repeats is not None else [1] * n
        self.variants = list(variants) if variants is not None else [1] * n
        self.dropout = list(dropout) if dropout is not None else [0.0] * n
        self.shuffle = shuffle
        self.rank = rank
        self.world_size = world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None
        self.sampler = _EpochForwarder(self)
        total = sum(math.ceil(c / self.batch_size) for c in self._bucket_samples().values())
        self._len = math.ceil(total / world_size)

    def set_epoch(self, epoch: int) -> None:
        """Lightning calls this before each epoch (with the epoch it is about to run)."""
        self.epoch = int(epoch)

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Start at `epoch`, skipping the `batches_done` batches this rank already trained on in it."""
        self.epoch = int(epoch)
        self._resume = (int(epoch), int(batches_done)) if batches_done > 0 else None

    def __len__(self) -> int:
        return self._len  # the full epoch, also when resuming: Lightning counts the skipped batches as done

    def step_shapes(self) -> set[tuple[int, int]]:
        """(samples, image tokens) of the batches any rank draws, every epoch alike: each compiled graph of fixed
        sizes serves one of them (`speed.dynamic_shapes: auto` reads how many there are). A bucket's last batch
        may be smaller; a bucket key with a control bucket (FLUX.1 Kontext) counts both images' tokens."""
        shapes = set()
        for b, count in self._bucket_samples().items():
            tokens = sum(tokens_of(b[i:i + 2]) for i in range(0, len(b), 2))
            shapes.add((min(count, self.batch_size), tokens))
            if count > self.batch_size and count % self.batch_size:
                shapes.add((count % self.batch_size, tokens))
        return shapes

    def _bucket_samples(self) -> dict[tuple[int, ...], int]:
        """Samples per bucket key in one epoch (repeats counted)."""
        counts: dict[tuple[int, ...], int] = {}
        for b, r in zip(self.buckets, self.repeats):
            counts[b] = counts.get(b, 0) + r
        return counts

    def epoch_batches(self, epoch: int) -> list[list[SampleKey]]:
        """All batches of this rank for an epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        groups: dict[tuple[int, int], list[int]] = {}
        for i, (b, r) in enumerate(zip(self.buckets, self.repeats)):
            groups.setdefault(b, []).extend([i] * r)
        batches: list[list[int]] = []
        for b in sorted(groups):
            items = np.asarray(groups[b])
            if self.shuffle:
                items = rng.permutation(items)
            batches += [items[i:i + self.batch_size].tolist() for i in range(0, len(items), self.batch_size)]
        if self.shuffle:
            batches = [batches[i] for i in rng.permutation(len(batches))]
        keyed = [[self._key(i, rng) for i in batch] for batch in batches]
        padded = keyed + keyed[:self._len * self.world_size - len(keyed)]
        return padded[self.rank::self.world_size]

    def _key(self, i: int, rng: np.random.Generator) -> SampleKey:
        variant = int(rng.integers(self.variants[i])) if self.variants[i] > 1 else 0
        drop = bool(rng.random() < self.dropout[i]) if self.dropout[i] > 0 else False
        return SampleKey(i, variant, drop)

    def __iter__(self) -> Iterator[list[SampleKey]]:
        # a generator: the epoch and skip are read at the first batch, after Lightning's set_epoch/resume
        epoch = self.epoch
        skip = 0
        if self._resume is not None and self._resume[0] == epoch:
            skip = self._resume[1]
        self._resume = None
        yield from self.epoch_batches(epoch)[skip:]
