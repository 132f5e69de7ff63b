"""FLUX.1 Kontext's paired datasets: each target image has a control ("before") image with the same stem in the
subset's control folder (`data.control_path`, or musubi-tuner's `control_directory` in a dataset.toml).

Pairing runs during the dataset scan, before any model loads, so a missing or orphaned control costs seconds, not a
model load: a target without a control and a control without a target are each a one-line error naming the file.

Example::

    records = attach_controls(scan_subset(subset)[0], subset)   # each record gets .control and its size
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from fluxlora.data.images import ImageRecord, image_size, list_images
from fluxlora.data.settings import Subset
from fluxlora.errors import FluxLoraError


def control_files(folder: Path) -> dict[str, Path]:
    """The control images of `folder` by stem; two with one stem (a.png, a.jpg) are ambiguous: an error."""
    try:
        images = list_images(folder)
    except FluxLoraError as e:
        raise FluxLoraError(f"control images: {e}") from None
    by_stem: dict[str, Path] = {}
    for p in images:
        if p.stem in by_stem:
            raise FluxLoraError(f"control image {p}: {by_stem[p.stem].name} has the same stem; keep one")
        by_stem[p.stem] = p
    return by_stem


def attach_controls(records: list[ImageRecord], subset: Subset) -> list[ImageRecord]:
    """`records` with their control images (unchanged when the subset has no control folder).

    Raises a one-line `FluxLoraError` naming the file for a target without a control, or a control without a target.
    """
    if subset.control_dir is None:
        return records
    controls = control_files(subset.control_dir)
    targets = {r.path.stem for r in records}
    for r in records:
        if r.path.stem not in controls:
            raise FluxLoraError(f"image {r.path} has no control image {r.path.stem}.* in {subset.control_dir}")
    for stem, p in sorted(controls.items()):
        if stem not in targets:
            raise FluxLoraError(f"control image {p} has no target image {stem}.* in {subset.image_dir}")
    out = []
    for r in records:
        c = controls[r.path.stem]
        w, h = image_size(c)
        out.append(replace(r, control=c, control_width=w, control_height=h))
    return out
