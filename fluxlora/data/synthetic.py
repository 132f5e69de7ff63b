"""The embedded default's dataset: coloured shapes with captions, generated deterministically."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

_COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 70, 220), "yellow": (230, 210, 40),
           "purple": (140, 50, 180), "orange": (240, 140, 30), "white": (245, 245, 245), "black": (15, 15, 15)}
_SHAPES = ("circle", "square", "triangle")


def make_synthetic(folder: str | Path, count: int = 8, size: int = 64, seed: int = 0,
                   trigger: str = "sks") -> Path:
    """Write `count` PNG + caption pairs into `folder` (skipped when they are already there)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = list(_COLORS)
    for i in range(count):
        png, txt = folder / f"img_{i:03d}.png", folder / f"img_{i:03d}.txt"
        if png.exists() and txt.exists():
            continue
        fg, bg = rng.choice(len(names), size=2, replace=False)
        shape = _SHAPES[i % len(_SHAPES)]
        im = Image.new("RGB", (size, size), _COLORS[names[bg]])
        d = ImageDraw.Draw(im)
        r = int(size * rng.uniform(0.25, 0.4))
        cx, cy = (int(v) for v in rng.integers(r, size - r, size=2))
        box = (cx - r, cy - r, cx + r, cy + r)
        if shape == "circle":
            d.ellipse(box, fill=_COLORS[names[fg]])
        elif shape == "square":
            d.rectangle(box, fill=_COLORS[names[fg]])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=_COLORS[names[fg]])
        # temp name (per process: the ranks of a DDP run write the same files at once) + rename: an interrupted
        # first run never leaves a half-written image or caption behind; the caption goes last, the check above
        # needs both
        tmp = png.with_name(f".{png.name}.{os.getpid()}.tmp")
        im.save(tmp, format="PNG")
        os.replace(tmp, png)
        tmp = txt.with_name(f".{txt.name}.{os.getpid()}.tmp")
        tmp.write_text(f"a photo of {trigger} {names[fg]} {shape} on a {names[bg]} background", encoding="utf-8")
        os.replace(tmp, txt)
    return folder
