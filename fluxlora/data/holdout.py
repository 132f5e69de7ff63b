"""Which images are held out for the validation loss, and the name each validation image is known by.

The split depends only on `validation.seed` and each image's folder and file name (not its full path, so a dataset
that moves keeps its split; not the run's seed, so runs with other seeds are validated on the same images): the
images whose hash of (seed, name) is smallest are held out.

Example::

    held = hold_out(records, split=0.1, seed=0)        # indices into records, never trained on
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Sequence

from fluxlora.data.images import ImageRecord
from fluxlora.errors import FluxLoraError


def sample_key(path: str | Path) -> str:
    """An image's name for the split and for its fixed validation noise: `<folder name>/<file name>`."""
    path = Path(path)
    return f"{path.parent.name}/{path.name}"


def key_digest(seed: int, key: str) -> bytes:
    """sha256 of (seed, key): the split's order and the seed of an image's validation noise."""
    return hashlib.sha256(f"{int(seed)}\0{key}".encode("utf-8")).digest()


def holdout_count(split: int | float, total: int) -> int:
    """How many of `total` images `validation.split` holds out: a count as given, a fraction rounded (at least 1)."""
    if isinstance(split, bool) or split <= 0:
        return 0
    if isinstance(split, int):
        return split
    return max(1, round(float(split) * total))


def hold_out(records: Sequence[ImageRecord], split: int | float, seed: int) -> list[int]:
    """Indices (ascending) of the records held out for validation; at least one record is left to train on."""
    count = holdout_count(split, len(records))
    if count == 0:
        return []
    if count >= len(records):
        raise FluxLoraError(f"validation.split={split!r} holds out {count} of the {len(records)} images: at least one "
                            "must be left to train on")
    order = sorted(range(len(records)), key=lambda i: (key_digest(seed, sample_key(records[i].path)), i))
    return sorted(order[:count])
