"""Image folders as FluxGym and kohya lay them out: `name.png` beside `name.txt`.

Every problem with a user's file is one line that names the file: a folder that is missing or holds no images, an
image that does not decode, a caption that is not UTF-8.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from fluxlora.data.captions import compose_caption
from fluxlora.data.settings import Subset
from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
_EXIF_ORIENTATION = 0x0112
_DECODE_ERRORS = (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError)


@dataclass(frozen=True)
class ImageRecord:
    """One training image and its caption."""

    path: Path
    """The image file."""
    caption: str
    """Its caption, class token and prefix/suffix applied (before any shuffling)."""
    width: int = 0
    """Width after EXIF orientation (0 = not read)."""
    height: int = 0
    """Height after EXIF orientation (0 = not read)."""
    subset: int = 0
    """Index of the subset (folder) it came from."""
    control: Path | None = None
    """FLUX.1 Kontext: its control ("before") image, same stem in the subset's control folder (None: unpaired)."""
    control_width: int = 0
    """The control's width after EXIF orientation (0 = no control)."""
    control_height: int = 0
    """The control's height after EXIF orientation (0 = no control)."""


def read_caption(path: Path) -> str:
    """A caption file's text (a UTF-8 byte-order mark is allowed; line breaks become spaces)."""
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise FluxLoraError(f"caption file {path} is not valid UTF-8 (byte {e.start})") from None
    except OSError as e:
        raise FluxLoraError(f"caption file {path} cannot be read: {e.strerror or e}") from None
    return " ".join(text.split())


def list_images(folder: str | Path) -> list[Path]:
    """The image files of a folder (not recursive), sorted by name."""
    folder = Path(folder).expanduser()
    if folder.is_file():
        raise FluxLoraError(f"dataset folder {folder} is a file, not a folder: give the folder of images with "
                            "captions, or a dataset.toml")
    if not folder.is_dir():
        raise FluxLoraError(f"dataset folder {folder} does not exist")
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    if not images:
        raise FluxLoraError(f"dataset folder {folder} holds no images ({', '.join(IMAGE_EXTENSIONS)})")
    return images


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) as trained, i.e. after EXIF orientation, read from the header without decoding pixels."""
    try:
        with Image.open(path) as im:
            w, h = im.size
            orientation = im.getexif().get(_EXIF_ORIENTATION, 1)
    except _DECODE_ERRORS as e:
        raise FluxLoraError(f"image {path} does not decode: {_reason(e)}") from None
    return (h, w) if orientation in (5, 6, 7, 8) else (w, h)


def scan_subset(subset: Subset, index: int = 0) -> tuple[list[ImageRecord], int]:
    """The records of one subset folder and how many of its images have no caption."""
    images = list_images(subset.image_dir)
    records, uncaptioned = [], 0
    for img in images:
        cap_file = img.with_suffix(subset.caption_extension)
        text = read_caption(cap_file) if cap_file.is_file() else ""
        uncaptioned += not text
        w, h = image_size(img)
        records.append(ImageRecord(img, compose_caption(text, subset), w, h, index))
    if uncaptioned:
        log.warning("%d of %d images in %s have no caption (%s); they use the class token %r", uncaptioned,
                    len(images), subset.image_dir, subset.caption_extension, subset.class_token)
    return records, uncaptioned


def scan_folder(folder: str | Path, caption_extension: str = ".txt", class_token: str = "") -> list[ImageRecord]:
    """List the images of one folder with their captions; images without a caption get the class token."""
    subset = Subset(Path(folder).expanduser(), class_token=class_token, caption_extension=caption_extension)
    return scan_subset(subset)[0]


def load_image(path: Path, size: int | tuple[int, int]) -> np.ndarray:
    """Decode, apply EXIF orientation, convert to RGB, resize to cover `size` and centre-crop to it.

    Args:
        path: the image file.
        size: a square side, or (width, height).

    Returns:
        float32 (3, height, width) in [-1, 1].
    """
    width, height = (size, size) if isinstance(size, int) else size
    try:
        with Image.open(path) as im:
            im = _to_rgb(ImageOps.exif_transpose(im))
    except _DECODE_ERRORS as e:
        raise FluxLoraError(f"image {path} does not decode: {_reason(e)}") from None
    w, h = im.size
    scale = max(width / w, height / h)
    rw, rh = max(width, round(w * scale)), max(height, round(h * scale))
    if (rw, rh) != (w, h):
        im = im.resize((rw, rh), Image.LANCZOS if scale < 1 else Image.BICUBIC)
    left, top = (rw - width) // 2, (rh - height) // 2
    im = im.crop((left, top, left + width, top + height))
    arr = np.asarray(im, dtype=np.float32) / 127.5 - 1.0
    return arr.transpose(2, 0, 1).copy()


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any mode to 8-bit RGB: palette and alpha modes through RGBA, 16-bit and float greyscale scaled, not clipped."""
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        a = np.asarray(im, dtype=np.float32)
        full = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        im = Image.fromarray(np.clip(a / full * 255.0 + 0.5, 0, 255).astype(np.uint8), "L")
    if im.mode in ("P", "LA", "PA"):
        im = im.convert("RGBA")
    return im.convert("RGB")


def _reason(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
