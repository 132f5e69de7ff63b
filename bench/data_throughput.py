"""Cached-batch throughput: how many batches per second FluxDataModule's loader reads from disk.

Writes `--images` cache files in fluxlora's format (random tensors of Flux shapes: latents of a 1024 px image are
16x128x128, T5 512x4096, CLIP pooled 768), then times the real read path — CachedDataset (SIGALRM-bounded reads,
CRC-checked) → BucketBatchSampler → StageNamedDataLoader — with 0, 2 and 4 workers. The files are freshly written,
so they are read from the page cache: this measures the loader, not the disk.

    python bench/data_throughput.py                           # 1024 px, bf16, batch 1
    python bench/data_throughput.py --dtype float32 --latent 16x64x64 --batch-size 4
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from fluxlora.data.buckets import BucketBatchSampler
from fluxlora.data.cache import CacheEntry
from fluxlora.data.cache_format import to_storage, write_sample
from fluxlora.data.loader import CachedDataset, StageNamedDataLoader, seed_worker


def _shape(text: str) -> tuple[int, ...]:
    return tuple(int(p) for p in text.lower().split("x"))


def write_cache(folder: Path, images: int, latent: tuple, t5: tuple, pooled: int, dtype: str) -> list[CacheEntry]:
    g = torch.Generator().manual_seed(0)
    entries = []
    for i in range(images):
        arrays = {"latents": to_storage(torch.randn(latent, generator=g), dtype),
                  "t5_0": to_storage(torch.randn(t5, generator=g), dtype),
                  "pooled_0": to_storage(torch.randn(pooled, generator=g), dtype),
                  "t5_mask_0": np.ones(t5[0], dtype=np.int64)}
        file = folder / f"img_{i:04d}_bench.npz"
        write_sample(file, arrays, key=f"bench-{i}", dtype=dtype, variants=1)
        entries.append(CacheEntry(file, folder / f"img_{i:04d}.png", (latent[2] * 8, latent[1] * 8), 1))
    return entries


def batches_per_second(entries: list[CacheEntry], workers: int, batch_size: int, seconds: float) -> tuple[float, int]:
    sampler = BucketBatchSampler([e.bucket for e in entries], batch_size=batch_size, seed=0)
    loader = StageNamedDataLoader(CachedDataset(entries, read_timeout=30), batch_sampler=sampler, num_workers=workers,
                                  timeout=60 if workers else 0, persistent_workers=workers > 0,
                                  worker_init_fn=seed_worker if workers else None)
    it, epoch = iter(loader), 0
    next(it)  # worker start-up is not throughput
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        try:
            next(it)
            count += 1
        except StopIteration:
            epoch += 1
            sampler.set_epoch(epoch)
            it = iter(loader)
    elapsed = time.perf_counter() - start
    del it, loader
    return count / elapsed, count


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=48, help="cache files to write")
    ap.add_argument("--latent", default="16x128x128", help="latent C x H x W (1024 px image: 16x128x128)")
    ap.add_argument("--t5", default="512x4096", help="T5 sequence length x width")
    ap.add_argument("--pooled", type=int, default=768, help="CLIP pooled width")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--batch-size", type=int, default=1)
    ap.add_argument("--workers", default="0,2,4", help="comma-separated worker counts")
    ap.add_argument("--seconds", type=float, default=8.0, help="timing window per worker count")
    ap.add_argument("--dir", default=None, help="where to write the cache (default: a temp folder)")
    args = ap.parse_args()

    latent, t5 = _shape(args.latent), _shape(args.t5)
    warnings.filterwarnings("ignore", message="This DataLoader will create")  # 4 workers on a 2-CPU machine: on purpose
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        entries = write_cache(Path(tmp), args.images, latent, t5, args.pooled, args.dtype)
        mb = sum(e.file.stat().st_size for e in entries) / len(entries) / 2**20
        print(f"{datetime.date.today()} · {platform.processor() or platform.machine()}, {torch.get_num_threads()} "
              f"torch threads, {len(os.sched_getaffinity(0))} CPUs · torch {torch.__version__} · "
              f"load average {os.getloadavg()[0]:.1f}")
        print(f"{args.images} files of {mb:.2f} MiB (latents {args.latent}, T5 {args.t5}, {args.dtype}), "
              f"batch {args.batch_size}, page cache warm\n")
        print("| workers | batches/s | samples/s | MiB/s |")
        print("|---|---|---|---|")
        for workers in (int(w) for w in args.workers.split(",")):
            rate, _ = batches_per_second(entries, workers, args.batch_size, args.seconds)
            print(f"| {workers} | {rate:.1f} | {rate * args.batch_size:.1f} | {rate * args.batch_size * mb:.0f} |",
                  flush=True)


if __name__ == "__main__":
    main()
