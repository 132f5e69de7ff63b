"""FluxDataModule: image folder → cache → DataLoader of cached tensors (the training step never sees pixels)."""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from fluxlora.data.cache import CacheEntry, LatentCache, read_entry
from fluxlora.data.images import ImageRecord, scan_folder
from fluxlora.data.synthetic import make_synthetic
from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)


class CachedDataset(Dataset):
    """Reads one cache file per item; the file name travels with the batch for error messages."""

    def __init__(self, entries: list[CacheEntry]) -> None:
        self.entries = entries

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, i: int) -> dict[str, Any]:
        e = self.entries[i]
        try:
            data = read_entry(e.file)
        except Exception as err:
            raise FluxLoraError(f"cache file {e.file} (from {e.source}) could not be read: {err}") from err
        return {
            "latents": torch.from_numpy(data["latents"]),
            "t5": torch.from_numpy(data["t5"]),
            "pooled": torch.from_numpy(data["pooled"]),
            "t5_mask": torch.from_numpy(data["t5_mask"]),
            "path": str(e.source),
        }


def _seed_worker(worker_id: int) -> None:
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


class FluxDataModule(L.LightningDataModule):
    """Batches of cached VAE latents and text embeddings.

    Args:
        cfg: the `data` config node (source, path, resolution, batch_size, num_workers, timeout, ...).
        cache_dir: where the `.npz` caches live.
        synthetic_dir: where the embedded default's images are generated.
        seed: shuffling seed.
    """

    def __init__(self, cfg: Any, cache_dir: str | Path, synthetic_dir: str | Path | None = None, seed: int = 0) -> None:
        super().__init__()
        self.cfg = cfg
        self.cache_dir = Path(cache_dir)
        self.synthetic_dir = Path(synthetic_dir) if synthetic_dir else self.cache_dir.parent / "synthetic"
        self.seed = int(seed)
        self.records: list[ImageRecord] = []
        self.entries: list[CacheEntry] = []

    def scan(self) -> list[ImageRecord]:
        """Find the images and captions (generating the synthetic set for the embedded default)."""
        cfg = self.cfg
        if cfg.source == "synthetic":
            folder = make_synthetic(self.synthetic_dir, count=int(cfg.count), size=int(cfg.resolution),
                                    seed=self.seed, trigger=str(cfg.class_token or "sks"))
        elif cfg.source == "folder":
            if cfg.get("path") in (None, "", "???"):
                raise FluxLoraError("data=folder needs data.path=<folder of images with .txt captions>")
            folder = Path(str(cfg.path)).expanduser()
        else:
            raise FluxLoraError(f"data.source={cfg.source!r} is not one of synthetic, folder")
        self.records = scan_folder(folder, str(cfg.caption_extension), str(cfg.class_token or ""))
        return self.records

    def build_cache(self, encode, encoder_id: str, progress=None) -> list[CacheEntry]:
        """Make sure every image has a valid cache file (reusing what is already there)."""
        if not self.records:
            self.scan()
        cache = LatentCache(self.cache_dir, encoder_id, int(self.cfg.resolution))
        self.entries = cache.build(self.records, encode, batch_size=int(self.cfg.cache_batch_size), progress=progress)
        return self.entries

    def train_dataloader(self) -> DataLoader:
        if not self.entries:
            raise RuntimeError("FluxDataModule.build_cache() must run before training")
        workers = int(self.cfg.num_workers)
        return DataLoader(
            CachedDataset(self.entries),
            batch_size=int(self.cfg.batch_size),
            shuffle=True,
            generator=torch.Generator().manual_seed(self.seed),
            num_workers=workers,
            timeout=float(self.cfg.timeout) if workers > 0 else 0,  # PyTorch rejects a timeout without workers
            pin_memory=torch.cuda.is_available(),
            persistent_workers=workers > 0,
            worker_init_fn=_seed_worker if workers > 0 else None,
            drop_last=False,
        )
