"""The file format of one cache entry: how tensors are stored, how one sample is read back (time-limited), and how
a file is checked before it is trusted.

Layout of one file: `latents` (C, h, w); with a control image (FLUX.1 Kontext) `control` (C, h', w'); per caption variant v: `t5_v` (L, D), `pooled_v` (P,), `t5_mask_v` (L,);
`key` (the content key), `dtype` (bfloat16 is stored as its uint16 bit pattern: numpy has no bfloat16) and
`variants`. The empty-caption file has the text arrays only. Arrays are stored uncompressed (`np.savez`), so a read
is a plain copy, and each member's CRC is checked when it is read.
"""

from __future__ import annotations

import os
import stat
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxlora.atomic import atomic_open
from fluxlora.data.bounded_read import bounded_read
from fluxlora.errors import StageTimeoutError

DTYPES = ("float32", "float16", "bfloat16")


def to_storage(x: Any, dtype: str) -> np.ndarray:
    """An array as written to disk: floats in `dtype` (bfloat16 as uint16 bits), integers unchanged."""
    t = (x if torch.is_tensor(x) else torch.as_tensor(np.asarray(x))).detach().cpu()
    if not t.is_floating_point():
        return np.ascontiguousarray(t.numpy())
    if dtype == "bfloat16":
        return np.ascontiguousarray(t.to(torch.bfloat16).view(torch.uint16).numpy())
    return np.ascontiguousarray(t.to(getattr(torch, dtype)).numpy())


def from_storage(a: np.ndarray, dtype: str) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(a))
    return t.view(torch.bfloat16) if dtype == "bfloat16" and a.dtype == np.uint16 else t


def sample_arrays(variants: int, latents: bool = True) -> set[str]:
    names = {"key", "dtype", "variants"} | {f"{k}_{v}" for v in range(variants) for k in ("t5", "pooled", "t5_mask")}
    return names | {"latents"} if latents else names


def read_sample(file: Path, variant: int = 0, seconds: float = 0, latents: bool = True,
                text: bool = True) -> dict[str, torch.Tensor]:
    """The tensors of one sample (latents and/or one caption variant), time-limited; zip CRCs are checked as the
    members are read."""
    with bounded_read(file, seconds), np.load(file, allow_pickle=False) as z:
        dtype = str(z["dtype"])
        names = {"latents": "latents"} if latents else {}
        if latents and "control" in z.files:
            names["control"] = "control"
        if text:
            names.update(t5=f"t5_{variant}", pooled=f"pooled_{variant}", t5_mask=f"t5_mask_{variant}")
        return {k: from_storage(z[n], dtype) for k, n in names.items()}


def write_sample(file: Path, arrays: dict[str, np.ndarray], key: str, dtype: str, variants: int) -> None:
    """Write one cache file atomically (temp file in the same folder, flush, fsync, rename, fsync the folder)."""
    with atomic_open(file, "wb") as f:
        np.savez(f, key=np.array(key), dtype=np.array(dtype), variants=np.array(variants), **arrays)


def _header_shape(zf: zipfile.ZipFile, name: str) -> tuple[int, ...]:
    with zf.open(f"{name}.npy") as f:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        return tuple(read(f)[0])


def _inspect(file: Path, full: bool) -> tuple[str, dict[str, tuple[int, ...]]]:
    """The key and array shapes of a file; `full` reads every byte (checking the CRCs), else only headers."""
    with np.load(file, allow_pickle=False) as z:
        key = str(z["key"]) if "key" in z.files else ""
        if full:
            return key, {n: z[n].shape for n in z.files}
        return key, {n: _header_shape(z.zip, n) for n in z.files}


def _shape_problem(shapes: dict[str, tuple[int, ...]], variants: int, bucket: tuple[int, int] | None,
                   control: tuple[int, int] | None = None) -> str | None:
    if control is not None:
        c = shapes["control"]
        if len(c) != 3 or c[1] == 0 or c[2] == 0 or control[0] * c[1] != control[1] * c[2] or control[0] % c[2]:
            return f"control latents {c} do not fit the {control[0]}x{control[1]} control size"
    if bucket is not None:
        lat = shapes["latents"]
        if len(lat) != 3 or lat[1] == 0 or lat[2] == 0 or bucket[0] * lat[1] != bucket[1] * lat[2] \
                or bucket[0] % lat[2]:
            return f"latents {lat} do not fit the {bucket[0]}x{bucket[1]} bucket"
    first = (shapes["t5_0"], shapes["pooled_0"], shapes["t5_mask_0"])
    t5, pooled, mask = first
    if len(t5) != 2 or len(pooled) != 1 or mask != t5[:1]:
        return f"text arrays t5 {t5}, pooled {pooled}, t5_mask {mask} do not fit together"
    for v in range(1, variants):
        if (shapes[f"t5_{v}"], shapes[f"pooled_{v}"], shapes[f"t5_mask_{v}"]) != first:
            return f"caption variant {v} differs in shape from variant 0"
    return None


def check_file(file: Path, key: str, variants: int, bucket: tuple[int, int] | None, full: bool = True,
               seconds: float = 0, control: tuple[int, int] | None = None) -> str | None:
    """None when the file is complete and current, else why not ("absent", "stale ...", "unreadable ...").
    `control`: the size the file's control latents were encoded at (FLUX.1 Kontext), None when it has none.

    A read that blocks raises `StageTimeoutError` (storage that hangs is not fixed by rewriting a file).
    """
    with bounded_read(file, seconds):
        try:
            mode = os.stat(file).st_mode
        except FileNotFoundError:
            return "absent"
        if not stat.S_ISREG(mode):
            return "not a regular file"
        try:
            found, shapes = _inspect(file, full)
        except StageTimeoutError:
            raise
        except Exception as e:  # a torn or corrupt zip fails in many ways (BadZipFile, ValueError, OSError, EOF...)
            return f"unreadable ({type(e).__name__}: {' '.join(str(e).split())})"
    missing = sorted(sample_arrays(variants, bucket is not None) - shapes.keys()) \
        + (["control"] if control is not None and "control" not in shapes else [])
    if missing:
        return f"missing arrays {missing}"
    if found != key:
        return "stale (image, control image, caption, bucket or encoder changed)"
    problem = _shape_problem(shapes, variants, bucket, control)
    return f"wrong shapes: {problem}" if problem else None
