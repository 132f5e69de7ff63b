"""Image folders as FluxGym and kohya lay them out: `name.png` beside `name.txt`."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


@dataclass(frozen=True)
class ImageRecord:
    """One training image and its caption."""

    path: Path
    caption: str


def read_caption(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError as e:
        raise FluxLoraError(f"caption file {path} is not valid UTF-8 (byte {e.start})") from e


def scan_folder(folder: str | Path, caption_extension: str = ".txt", class_token: str = "") -> list[ImageRecord]:
    """List the images of a folder with their captions; images without a caption get the class token."""
    folder = Path(folder).expanduser()
    if not folder.is_dir():
        raise FluxLoraError(f"dataset folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise FluxLoraError(f"dataset folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    records, uncaptioned = [], 0
    for img in images:
        cap_file = img.with_suffix(caption_extension)
        caption = read_caption(cap_file) if cap_file.exists() else ""
        if not caption:
            uncaptioned += 1
            caption = class_token
        elif class_token and class_token not in caption:
            caption = f"{class_token}, {caption}"
        records.append(ImageRecord(img, caption))
    if uncaptioned:
        log.warning("%d of %d images in %s have no caption; using the class token %r", uncaptioned, len(images),
                    folder, class_token)
    return records


def load_image(path: Path, resolution: int) -> np.ndarray:
    """Decode, apply EXIF orientation, convert to RGB, resize the short side and centre-crop to a square.

    Returns float32 (3, res, res) in [-1, 1].
    """
    try:
        with Image.open(path) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise FluxLoraError(f"image {path} does not decode: {e}") from e
    w, h = im.size
    scale = resolution / min(w, h)
    im = im.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BICUBIC)
    w, h = im.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    im = im.crop((left, top, left + resolution, top + resolution))
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1).copy()
