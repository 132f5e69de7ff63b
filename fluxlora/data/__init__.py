"""Data: image folders and captions → content-keyed latent/text caches → batches of cached tensors."""

from fluxlora.data.datamodule import FluxDataModule
from fluxlora.data.images import ImageRecord, scan_folder

__all__ = ["FluxDataModule", "ImageRecord", "scan_folder"]
