"""The embedded default's dataset: coloured shapes with captions, generated deterministically.

With `controls` (`model=tiny-kontext`) it is a paired FLUX.1 Kontext dataset: each image also gets a control
("before") image in `control/` with the same stem, the same shape at the same place in another colour, and the
caption is the edit instruction ("sks make the circle red").
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
_SHAPES = ("circle", "square", "triangle")


def _draw(shape: str, size: int, fg: tuple, bg: tuple, cx: int, cy: int, r: int) -> Image.Image:
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "circle":
        d.ellipse(box, fill=fg)
    elif shape == "square":
        d.rectangle(box, fill=fg)
    else:
        d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fg)
    return im


def _save(im: Image.Image, path: Path) -> None:
    # temp name (per process: the ranks of a DDP run write the same files at once) + rename: an interrupted first
    # run never leaves a half-written file behind
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    im.save(tmp, format="PNG")
    os.replace(tmp, path)


def make_synthetic(folder: str | Path, count: int = 8, size: int = 64, seed: int = 0,
                   trigger: str = "sks", controls: bool = False) -> Path:
    """Write `count` PNG + caption pairs into `folder` (skipped when they are already there); `controls`: also a
    control image per pair in `folder/control/`, and edit instructions as captions (FLUX.1 Kontext)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if controls:
        (folder / "control").mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(_COLORS)
    for i in range(count):
        png, txt = folder / f"img_{i:03d}.png", folder / f"img_{i:03d}.txt"
        ctl = folder / "control" / png.name
        if png.exists() and txt.exists() and (ctl.exists() or not controls):
            continue
        fg, bg = rng.choice(len(names), size=2, replace=False)
        shape = _SHAPES[i % len(_SHAPES)]
        r = int(size * rng.uniform(0.25, 0.4))
        cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
        _save(_draw(shape, size, _COLORS[names[fg]], _COLORS[names[bg]], cx, cy, r), png)
        if controls:  # the "before": the same shape in the next colour that is neither fg nor bg
            before = next(n for k in range(1, len(names)) if (n := names[(fg + k) % len(names)]) != names[bg])
            _save(_draw(shape, size, _COLORS[before], _COLORS[names[bg]], cx, cy, r), ctl)
            caption = f"{trigger} make the {shape} {names[fg]}"
        else:
            caption = f"a photo of {trigger} {names[fg]} {shape} on a {names[bg]} background"
        # the caption goes last: the check above needs it
        tmp = txt.with_name(f".{txt.name}.{os.getpid()}.tmp")
        tmp.write_text(caption, encoding="utf-8")
        os.replace(tmp, txt)
    return folder
