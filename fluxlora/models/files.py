"""safetensors checkpoints on disk: header reads, one-line errors that name the file, cheap fingerprints,
streamed writes, and building a model on the meta device then assigning its tensors.

Reading goes through `safe_open` one tensor at a time, so a loader holds the converted tensors and nothing else:
peak host RAM stays near the size of the model in its target dtype, never twice that.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fluxlora.errors import FluxLoraError
from fluxlora.perf.release import release_free_heap

log = logging.getLogger(__name__)

SAFETENSORS_SUFFIXES = (".safetensors", ".sft")
FINGERPRINT_BYTES = 1 << 20  # the head of a file (header + first tensors) is hashed, never the whole file
_MAX_HEADER = 100 << 20
REMAP_BYTES = 256 << 20  # bytes read through one mapping of a file (`read_tensors`)
ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "I64": torch.int64, "I32": torch.int32,
    "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool,
}
_ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


@dataclass
class CheckpointHeader:
    """What a safetensors header says, read without touching the tensor data."""

    path: Path
    """The file."""
    shapes: dict[str, tuple[int, ...]]
    """Tensor name -> shape."""
    dtypes: dict[str, str]
    """Tensor name -> safetensors dtype name (`BF16`, `F8_E4M3`, ...)."""
    metadata: dict[str, str] = field(default_factory=dict)
    """The `__metadata__` strings (fluxlora writes its architecture config under `fluxlora.config`)."""

    def config(self) -> dict:
        """The architecture config fluxlora stored in the file, or {} (real checkpoints carry none)."""
        raw = self.metadata.get("fluxlora.config")
        return json.loads(raw) if raw else {}


def read_header(path: Path) -> CheckpointHeader:
    """Parse a safetensors header; a missing, truncated or foreign file is a one-line error naming it."""
    path = Path(path)
    if not path.is_file():
        raise FluxLoraError(f"{path} does not exist" if not path.exists() else f"{path} is not a file")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        if n <= 0 or n > _MAX_HEADER or 8 + n > size:
            raise FluxLoraError(f"{path} is not a safetensors file or is truncated ({size} bytes, header unreadable)")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise FluxLoraError(f"{path} is not a safetensors file (header is not JSON: {e})") from e
    meta = header.pop("__metadata__", None) or {}
    end = max((int(v["data_offsets"][1]) for v in header.values()), default=0)
    if 8 + n + end > size:
        raise FluxLoraError(f"{path} is truncated: its header describes {8 + n + end} bytes, the file holds {size}"
                            " (an interrupted download or copy; fetch it again)")
    return CheckpointHeader(path, {k: tuple(v["shape"]) for k, v in header.items()},
                            {k: v["dtype"] for k, v in header.items()}, meta)


def fingerprint(path: Path) -> dict:
    """Name, size, mtime and a hash of the first MiB: identifies a weights file without reading it all."""
    path = Path(path)
    st = path.stat()
    with open(path, "rb") as f:
        head = hashlib.sha256(f.read(FINGERPRINT_BYTES)).hexdigest()[:16]
    return {"name": path.name, "size": st.st_size, "mtime": int(st.st_mtime), "head_sha256": head}


@contextmanager
def open_tensors(path: Path, device: str | torch.device = "cpu"):
    """`safe_open` with its errors turned into one line naming the file; tensors land on `device`."""
    from safetensors import SafetensorError, safe_open

    try:
        handle = safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError) as e:
        raise FluxLoraError(f"{path} could not be opened as safetensors: {str(e).splitlines()[0]}") from e
    with handle as f:
        yield f


def read_tensors(path: Path, names: Iterable[str],
                 device: str | torch.device = "cpu") -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) one at a time, so a caller can convert each before the next is read.

    The tensors are views of safetensors' mapping of the file, and every page read through a mapping stays in the
    process's RSS until it is unmapped (after the last view is dropped): reading a 23.8 GB FLUX.1-dev file through
    one mapping held ~22 GiB of file pages to the end (CPU, measured with a full-size random file). So the file is
    mapped afresh every `REMAP_BYTES`; a caller that keeps a tensor as read copies it (`transformer._own`)."""
    names, i = list(names), 0
    while i < len(names):
        with open_tensors(path, device) as f:
            read = 0
            while i < len(names) and read < REMAP_BYTES:
                t = f.get_tensor(names[i])
                read += t.numel() * t.element_size()
                yield names[i], t
                i += 1
            del t
        release_free_heap()  # what the caller freed converting this chunk


def stream_safetensors(path: Path, shapes: dict[str, tuple[int, ...]],
                       dtype: torch.dtype | Callable[[str], torch.dtype], make: Callable[[str], torch.Tensor],
                       metadata: dict[str, str] | None = None, fsync: bool = True) -> None:
    """Write a safetensors file tensor by tensor: `make(name)` is called once per name and its result dropped
    after writing, so only one tensor is ever in memory. Written to a temp name beside `path`, then renamed.

    Args:
        path: the file to write.
        shapes: tensor name -> shape, known before any tensor is made (the header comes first).
        dtype: the stored dtype, or a function name -> dtype (e.g. fp8 matrices, bf16 vectors).
        make: name -> tensor of that shape (any dtype; converted on write).
        metadata: `__metadata__` strings.
        fsync: flush to disk before the rename (off for generated test files, where it only costs time).
    """
    names = sorted(shapes)
    dtype_of = dtype if callable(dtype) and not isinstance(dtype, torch.dtype) else (lambda _n: dtype)
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name in names:
        dt = dtype_of(name)
        nbytes = torch.empty((), dtype=dt).element_size() * _numel(shapes[name])
        header[name] = {"dtype": _ST_NAMES[dt], "shape": list(shapes[name]), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = Path(path).with_name(f".{Path(path).name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name in names:
            t = make(name).to(dtype_of(name)).contiguous().cpu()
            if tuple(t.shape) != tuple(shapes[name]):
                raise ValueError(f"{name}: made shape {tuple(t.shape)}, expected {shapes[name]}")
            if t.numel():
                f.write(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
        f.flush()
        if fsync:
            os.fsync(f.fileno())
    os.replace(tmp, path)


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def meta_model(build: Callable[[], torch.nn.Module]) -> torch.nn.Module:
    """Build a model with its parameters on the meta device (no memory); buffers stay real and small."""
    from accelerate import init_empty_weights

    with init_empty_weights(include_buffers=False):
        return build()


def assign_state(model: torch.nn.Module, state: dict[str, torch.Tensor], source: Path, what: str,
                 device: str | torch.device = "cpu") -> torch.nn.Module:
    """Put `state` into a meta-built `model` without copies (`assign=True`); key or shape mismatches are one
    line naming `source`. Buffers (built on the CPU) follow the tensors to `device`; the model comes back in eval
    mode (models built from a config start in train mode)."""
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    if missing or unexpected:
        raise FluxLoraError(f"{source} does not hold a {what} of the expected layout: {len(missing)} tensors missing "
                            f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})")
    bad = [(k, tuple(v.shape), tuple(own[k].shape)) for k, v in state.items() if tuple(v.shape) != tuple(own[k].shape)]
    if bad:
        k, got, want = bad[0]
        raise FluxLoraError(f"{source}: {what} tensor {k} has shape {got}, expected {want} ({len(bad)} mismatches)")
    model.load_state_dict(state, strict=True, assign=True)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    if left:
        raise FluxLoraError(f"{source}: {what} parameters left unset: {left[:3]}")
    return model.to(device).eval()


class LoadTimer:
    """Logs how long loading one part took, and from which file, at INFO."""

    def __init__(self, part: str, source: Path) -> None:
        self.part, self.source = part, source

    def __enter__(self) -> "LoadTimer":
        self.t0 = time.monotonic()
        return self

    def __exit__(self, *exc) -> None:
        if exc[0] is None:
            log.info("loaded %s from %s in %.1fs", self.part, self.source, time.monotonic() - self.t0)
