"""Data: image folders and captions → content-keyed latent/text caches → batches of cached tensors."""

from fluxlora.data.buckets import BucketBatchSampler, BucketSettings, SampleKey
from fluxlora.data.cache import CacheEntry, CacheItem, LatentCache
from fluxlora.data.images import ImageRecord, scan_folder
from fluxlora.data.settings import DataSettings, Subset, data_settings, parse_dataset_toml

__all__ = ["BucketBatchSampler", "BucketSettings", "CacheEntry", "CacheItem", "DataSettings", "FluxDataModule",
           "ImageRecord", "LatentCache", "SampleKey", "Subset", "data_settings", "parse_dataset_toml", "scan_folder"]


def __getattr__(name: str):
    """`FluxDataModule` on first use: it is a LightningDataModule, and the settings check reads `fluxlora.data.settings`
    before Lightning is imported."""
    if name == "FluxDataModule":
        from fluxlora.data.datamodule import FluxDataModule

        return FluxDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
