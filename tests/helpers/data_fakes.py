"""Helpers for the data tests: image folders written on the fly, an encoder that needs no model, cache checks."""

from __future__ import annotations

import hashlib
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

LATENT_CHANNELS, T5_LEN, T5_DIM, POOLED_DIM = 4, 6, 8, 5


class FakeEncoder:
    """Deterministic stand-in for the VAE and text encoders; records what it was asked to encode.

    Args:
        delay: seconds to sleep per call (to make caching slow enough to interrupt).
    """

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.image_calls: list[tuple[int, ...]] = []
        self.captions: list[str] = []

    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        time.sleep(self.delay)
        x = torch.from_numpy(np.stack(images))
        self.image_calls.append(tuple(x.shape))
        b, _, h, w = x.shape
        pooled = torch.nn.functional.avg_pool2d(x, 8)  # (B, 3, h/8, w/8)
        return torch.cat([pooled, pooled.mean(1, keepdim=True)], 1)[:, :LATENT_CHANNELS]

    def texts(self, captions: list[str]) -> dict:
        self.captions.extend(captions)
        seeds = [int.from_bytes(hashlib.sha256(c.encode()).digest()[:4], "little") for c in captions]
        t5 = torch.stack([torch.randn(T5_LEN, T5_DIM, generator=torch.Generator().manual_seed(s)) for s in seeds])
        pooled = t5.mean(1)[:, :POOLED_DIM]
        mask = torch.ones(len(captions), T5_LEN, dtype=torch.int64)
        return {"t5": t5, "pooled": pooled, "t5_mask": mask}


def write_image(path: Path, size: tuple[int, int] = (64, 64), color: tuple[int, int, int] = (200, 30, 30),
                mode: str = "RGB") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    im.paste((color[2], color[0], color[1]), (0, 0, size[0] // 2, size[1] // 3))
    im = im.convert(mode)
    im.save(path)
    return path


def make_folder(folder: Path, count: int = 4, size: tuple[int, int] = (64, 64), caption: str | None = "a photo",
                ext: str = ".png", start: int = 0) -> Path:
    """`count` images `img_NNN<ext>` with `<caption> N` beside each (no caption file when caption is None)."""
    for i in range(start, start + count):
        write_image(folder / f"img_{i:03d}{ext}", size, (40 + 20 * i % 200, 90, 160))
        if caption is not None:
            (folder / f"img_{i:03d}.txt").write_text(f"{caption} {i}", encoding="utf-8")
    return folder


def assert_cache_intact(folder: Path) -> list[Path]:
    """No temp file left behind and every `.npz` complete (all members read, CRCs checked); returns the files."""
    leftovers = sorted(p.name for p in folder.glob(".*.tmp"))
    assert not leftovers, f"half-written temp files left in {folder}: {leftovers}"
    files = sorted(folder.glob("*.npz"))
    for f in files:
        with np.load(f, allow_pickle=False) as z:
            for name in z.files:
                z[name]
    return files


def flip_member_bytes(file: Path, member: str = "latents.npy", count: int = 8) -> None:
    """Flip `count` bytes at the end of one zip member's data (its array values, not a header): bit rot."""
    import struct
    import zipfile

    with zipfile.ZipFile(file) as zf:
        info = zf.getinfo(member)
    data = bytearray(file.read_bytes())
    name_len, extra_len = struct.unpack("<HH", data[info.header_offset + 26:info.header_offset + 30])
    end = info.header_offset + 30 + name_len + extra_len + info.compress_size
    data[end - count:end] = bytes(b ^ 0xFF for b in data[end - count:end])
    file.write_bytes(bytes(data))


def recording_module():
    """A LightningModule with one weight that records, per batch, (path, caption variant, caption dropped)."""
    import lightning as L

    class _Recorder(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.seen: list[tuple] = []

        def training_step(self, batch, batch_idx):
            self.seen.extend(zip(batch["path"], batch["caption_variant"].tolist(), batch["caption_dropped"].tolist()))
            return (self.w * batch["latents"].float().mean()).sum()

        def configure_optimizers(self):
            return torch.optim.SGD([self.w], lr=0.0)

    return _Recorder()


def interrupt_at(batches: int):
    """A callback that raises just before the `batches`-th batch (counted over the whole run) is trained."""
    import lightning as L

    class _Interrupt(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step >= batches:
                raise RuntimeError(f"interrupted before batch {batches}")

    return _Interrupt()
