"""What a dataset is made of: subsets (folders with their own caption rules) from the `data` config or a kohya
`dataset.toml`, as FluxGym writes it.

Example::

    settings = data_settings(cfg.data)          # data.path=~/datasets/mychar or data.path=dataset.toml
    for subset in settings.subsets:
        print(subset.image_dir, subset.num_repeats)
"""

from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from fluxlora.data.buckets import BucketSettings
from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)

# sd-scripts keys that fluxlora does not implement: named in a warning, never silently dropped (any other unknown
# key is a misspelling: an error that suggests the nearest known key, as sd-scripts' own schema refuses it)
_UNSUPPORTED_TOML_KEYS = {
    "flip_aug", "color_aug", "random_crop", "face_crop_aug_range", "is_reg", "caption_tag_dropout_rate",
    "caption_dropout_every_n_epochs", "token_warmup_min", "token_warmup_step", "secondary_separator",
    "enable_wildcard", "alpha_mask", "conditioning_data_dir", "metadata_file", "keep_tokens_separator",
    "cache_info", "network_multiplier", "custom_attributes", "resize_interpolation", "validation_seed",
    "validation_split",
}
CONTROL_RESIZE = ("bucket", "keep")
"""`data.control_resize`: how a control image is sized (see `DataSettings.control_resize`)."""
_SUBSET_TOML_KEYS = {"image_dir", "control_directory", "class_tokens", "num_repeats", "caption_extension",
                     "keep_tokens", "shuffle_caption",
                     "caption_dropout_rate", "caption_prefix", "caption_suffix", "caption_separator", "name"}
_DATASET_TOML_KEYS = {"resolution", "batch_size", "enable_bucket", "min_bucket_reso", "max_bucket_reso",
                      "bucket_reso_steps", "bucket_no_upscale", "subsets"}


@dataclass(frozen=True)
class Subset:
    """One folder of images with same-stem captions, and how its captions and repeats are treated."""

    image_dir: Path
    """Folder holding the images (png/jpg/jpeg/webp) and their caption files."""
    class_token: str = ""
    """Trigger word: the caption of an image that has none (counted in a warning)."""
    prepend_class_token: bool = True
    """Also put the class token in front of captions that lack it (fluxlora's folder mode; kohya's toml: off)."""
    num_repeats: int = 1
    """How many times each image is seen per epoch."""
    caption_extension: str = ".txt"
    """Extension of the caption file beside each image."""
    keep_tokens: int = 0
    """Leading comma-separated tokens that shuffling never moves (the trigger word, usually)."""
    shuffle_caption: bool = False
    """Shuffle the tokens after `keep_tokens`; with cached text encoders one of `caption_variants` is drawn per step."""
    caption_dropout_rate: float = 0.0
    """Probability that a sample trains on the empty caption instead of its own."""
    caption_prefix: str = ""
    """Text put before every caption."""
    caption_suffix: str = ""
    """Text put after every caption."""
    caption_separator: str = ","
    """What separates the tokens of a caption for `keep_tokens` and shuffling."""
    control_dir: Path | None = None
    """FLUX.1 Kontext: the folder of control ("before") images, one per image with the same stem (`data.control_path`,
    or `control_directory` in a dataset.toml, musubi-tuner's name); None = no controls."""

    def __post_init__(self) -> None:
        where = f"subset {self.image_dir}"
        if int(self.num_repeats) < 1:
            raise FluxLoraError(f"{where}: num_repeats={self.num_repeats} must be >= 1")
        if int(self.keep_tokens) < 0:
            raise FluxLoraError(f"{where}: keep_tokens={self.keep_tokens} must be >= 0")
        if not 0.0 <= float(self.caption_dropout_rate) <= 1.0:
            raise FluxLoraError(f"{where}: caption_dropout_rate={self.caption_dropout_rate} is not in [0, 1]")
        if not str(self.caption_extension).startswith("."):
            raise FluxLoraError(f"{where}: caption_extension={self.caption_extension!r} must start with '.'")


@dataclass(frozen=True)
class DataSettings:
    """Everything the data module needs to know about the dataset, with the config and toml merged."""

    subsets: tuple[Subset, ...]
    """The folders to train on, each with its own caption rules."""
    buckets: BucketSettings = field(default_factory=BucketSettings)
    """Aspect-ratio buckets, or a fixed crop when `buckets.enabled` is false."""
    batch_size: int = 1
    """Samples per batch; a batch never mixes buckets."""
    caption_variants: int = 8
    """Shuffled captions encoded per image for subsets with `shuffle_caption` (text outputs are cached)."""
    source: str = ""
    """Where the settings came from (a folder, a dataset.toml) for messages."""
    control_resize: str = "bucket"
    """Control images: `bucket` = resized and cropped to their target's bucket (one token grid for both, what
    FluxKontextPipeline does when it renders at the control's size) | `keep` = bucketed by their own size (a batch
    then holds only items whose control sizes agree too)."""

    @property
    def paired(self) -> bool:
        """Whether the subsets carry control images (FLUX.1 Kontext)."""
        return any(s.control_dir is not None for s in self.subsets)


def _toml_bool(v: Any, key: str, where: Path) -> bool:
    if not isinstance(v, bool):
        raise FluxLoraError(f"dataset.toml {where}: {key} = {v!r} must be true or false")
    return v


def parse_resolution(v: Any, where: str) -> tuple[int, int]:
    """kohya's `resolution`: 512, "512", [768, 512] or "768,512"."""
    raw = v
    if isinstance(v, str):
        v = v.replace("x", ",").split(",") if v.strip() else []
    if isinstance(v, int):
        v = [v]
    try:
        w, h = (int(v[0]), int(v[0])) if len(v) == 1 else (int(v[0]), int(v[1]))
    except (TypeError, ValueError, IndexError):
        raise FluxLoraError(f"{where}: resolution = {raw!r} is not N or [W, H]") from None
    if w < 64 or h < 64:
        raise FluxLoraError(f"{where}: resolution = {raw!r} is below 64 pixels")
    return w, h


def _subset_from_toml(node: dict, inherited: dict, base: Path, toml_path: Path) -> Subset:
    values = {**inherited, **node}
    if "image_dir" not in values:
        raise FluxLoraError(f"dataset.toml {toml_path}: a [[datasets.subsets]] entry has no image_dir")
    image_dir = Path(str(values["image_dir"])).expanduser()
    if not image_dir.is_absolute():
        image_dir = base / image_dir  # sd-scripts resolves against the working folder; the toml's folder is safer
    kw: dict[str, Any] = {"image_dir": image_dir, "prepend_class_token": False}
    if values.get("control_directory"):
        control = Path(str(values["control_directory"])).expanduser()
        kw["control_dir"] = control if control.is_absolute() else base / control
    if "class_tokens" in values:
        kw["class_token"] = str(values["class_tokens"])
    for key in ("num_repeats", "keep_tokens"):
        if key in values:
            kw[key] = int(values[key])
    for key in ("caption_extension", "caption_prefix", "caption_suffix", "caption_separator"):
        if key in values:
            kw[key] = str(values[key])
    if "shuffle_caption" in values:
        kw["shuffle_caption"] = _toml_bool(values["shuffle_caption"], "shuffle_caption", toml_path)
    if "caption_dropout_rate" in values:
        kw["caption_dropout_rate"] = float(values["caption_dropout_rate"])
    return Subset(**kw)


def _one_value(datasets: list[dict], key: str, toml_path: Path) -> Any:
    """A per-[[datasets]] value that fluxlora needs to be the same across them (one batch size, one bucket set)."""
    seen = {repr(d[key]): d[key] for d in datasets if key in d}
    if len(seen) > 1:
        raise FluxLoraError(f"dataset.toml {toml_path}: [[datasets]] disagree on {key} ({', '.join(seen)}); "
                            "fluxlora trains one resolution and batch size per run: merge them into one [[datasets]]")
    return next(iter(seen.values()), None)


def _check_keys(doc: dict, toml_path: Path) -> None:
    """A misspelt key is an error naming the nearest known one; a known sd-scripts key fluxlora lacks, a warning."""
    tables = [("the top level", set(doc), {"general", "datasets"}), ("[general]", set(doc.get("general", {})), None)]
    for ds in doc.get("datasets", []):
        tables.append(("[[datasets]]", set(ds), None))
        tables += [("[[datasets.subsets]]", set(sub), None) for sub in ds.get("subsets") or []]
    known = _SUBSET_TOML_KEYS | _DATASET_TOML_KEYS | _UNSUPPORTED_TOML_KEYS
    wrong = []
    for where, keys, allowed in tables:
        for key in sorted(keys - (allowed or known)):
            near = difflib.get_close_matches(key, sorted(allowed or known), n=1)
            wrong.append(f"{key!r} in {where}" + (f" (did you mean {near[0]}?)" if near else ""))
    if wrong:
        raise FluxLoraError(f"dataset.toml {toml_path}: unknown key {', '.join(wrong)}")
    ignored = sorted(set().union(*(keys for _, keys, _ in tables)) & _UNSUPPORTED_TOML_KEYS)
    if ignored:
        log.warning("dataset.toml %s: %s not supported by fluxlora and ignored", toml_path, ", ".join(ignored))


def parse_dataset_toml(path: str | Path, defaults: DataSettings) -> DataSettings:
    """Read a kohya/FluxGym `dataset.toml` (`[general]`, `[[datasets]]`, `[[datasets.subsets]]`).

    Values in the toml win over `defaults` (the `data` config); relative `image_dir`s are resolved against the
    toml's folder. sd-scripts' inheritance applies: subset ← dataset ← general.
    """
    toml_path = Path(path).expanduser()
    try:
        doc = tomllib.loads(toml_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FluxLoraError(f"dataset.toml {toml_path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise FluxLoraError(f"dataset.toml {toml_path} does not parse: {e}") from None
    datasets = doc.get("datasets") or []
    if not isinstance(datasets, list) or not datasets:
        raise FluxLoraError(f"dataset.toml {toml_path} has no [[datasets]] table")
    _check_keys(doc, toml_path)
    general = {k: v for k, v in doc.get("general", {}).items() if k in _SUBSET_TOML_KEYS | _DATASET_TOML_KEYS}
    subsets = []
    for ds in datasets:
        inherited = {**general, **{k: v for k, v in ds.items() if k != "subsets"}}
        for node in ds.get("subsets") or []:
            subsets.append(_subset_from_toml(node, inherited, toml_path.parent, toml_path))
    if not subsets:
        raise FluxLoraError(f"dataset.toml {toml_path} has no [[datasets.subsets]] with an image_dir")
    merged = [{**general, **ds} for ds in datasets]
    return replace(defaults, subsets=tuple(subsets), source=str(toml_path),
                   batch_size=int(_one_value(merged, "batch_size", toml_path) or defaults.batch_size),
                   buckets=_buckets_from_toml(merged, defaults.buckets, toml_path))


def _buckets_from_toml(merged: list[dict], defaults: BucketSettings, toml_path: Path) -> BucketSettings:
    reso = _one_value(merged, "resolution", toml_path)
    kw: dict[str, Any] = {"resolution": parse_resolution(reso, f"dataset.toml {toml_path}") if reso
                          else defaults.resolution,
                          "enabled": False}  # sd-scripts: no buckets unless enable_bucket (FluxGym never sets it)
    enable = _one_value(merged, "enable_bucket", toml_path)
    if enable is not None:
        kw["enabled"] = _toml_bool(enable, "enable_bucket", toml_path)
    no_upscale = _one_value(merged, "bucket_no_upscale", toml_path)
    if no_upscale is not None:
        kw["upscale"] = not _toml_bool(no_upscale, "bucket_no_upscale", toml_path)
    for toml_key, name in (("min_bucket_reso", "min_size"), ("max_bucket_reso", "max_size"),
                           ("bucket_reso_steps", "step")):
        v = _one_value(merged, toml_key, toml_path)
        if v is not None:
            kw[name] = int(v)
    if "upscale" not in kw and kw["enabled"]:
        kw["upscale"] = True  # sd-scripts' buckets upscale unless bucket_no_upscale
    return replace(defaults, **kw)


def _subset_from_config(node: Any, top: Any, where: str, path: Any = None) -> Subset:
    """A subset from a config node (None: the top-level one, at `path`); keys it lacks come from the `data` node."""
    def get(key: str, default: Any) -> Any:
        if node is not None and node.get(key) is not None:
            return node.get(key)
        return top.get(key, default)

    if node is not None:
        path = node.get("path")
    if path in (None, "", "???"):
        raise FluxLoraError(f"{where} needs a path (a folder of images with captions, or a dataset.toml)")
    known = {f.name for f in fields(Subset)} | {"path", "control_path"}
    unknown = sorted(set(node or {}) - known)
    if unknown:
        raise FluxLoraError(f"{where}: unknown key(s) {unknown}; "
                            f"known: {sorted(known - {'image_dir', 'control_dir'})}")
    control = node.get("control_path") if node is not None else top.get("control_path")
    return Subset(
        control_dir=Path(str(control)).expanduser() if control not in (None, "") else None,
        image_dir=Path(str(path)).expanduser(), class_token=str(get("class_token", "") or ""),
        prepend_class_token=bool(get("prepend_class_token", True)), num_repeats=int(get("num_repeats", 1)),
        caption_extension=str(get("caption_extension", ".txt")), keep_tokens=int(get("keep_tokens", 0)),
        shuffle_caption=bool(get("shuffle_caption", False)),
        caption_dropout_rate=float(get("caption_dropout_rate", 0.0)),
        caption_prefix=str(get("caption_prefix", "") or ""), caption_suffix=str(get("caption_suffix", "") or ""),
        caption_separator=str(get("caption_separator", ",")))


def data_settings(cfg: Any, folder: str | Path | None = None) -> DataSettings:
    """The dataset described by the `data` config node.

    Args:
        cfg: the `data` node: `path` (a folder or a dataset.toml), optional `subsets` (more folders, each with its
            own keys), caption keys, `resolution`, `batch_size`, `buckets`, `caption_variants`.
        folder: use this folder as `data.path` (the embedded default's generated images).
    """
    b = cfg.get("buckets") or {}
    res = parse_resolution(cfg.get("resolution", 512), "data.resolution")
    buckets = BucketSettings(enabled=bool(b.get("enabled", False)), resolution=res,
                             min_size=int(b.get("min_size", 256)), max_size=int(b.get("max_size", 1024)),
                             step=int(b.get("step", 64)), upscale=bool(b.get("upscale", False)))
    base = DataSettings(subsets=(), buckets=buckets, batch_size=int(cfg.get("batch_size", 1)),
                        caption_variants=int(cfg.get("caption_variants", 8)),
                        control_resize=str(cfg.get("control_resize", "bucket")))
    if base.batch_size < 1 or base.caption_variants < 1:
        raise FluxLoraError("data.batch_size and data.caption_variants must be >= 1")
    if base.control_resize not in CONTROL_RESIZE:
        raise FluxLoraError(f"data.control_resize={base.control_resize!r} is not one of {', '.join(CONTROL_RESIZE)}")
    path = str(folder) if folder is not None else cfg.get("path")
    if path not in (None, "", "???") and str(path).lower().endswith(".toml"):
        settings = parse_dataset_toml(path, base)
        _log_overrides(settings, base)
        extra = ()
    else:
        first = _subset_from_config(None, cfg, "data", path) if path not in (None, "", "???") else None
        settings = replace(base, subsets=(first,) if first else (), source=str(path))
        extra = tuple(_subset_from_config(n, cfg, f"data.subsets[{i}]") for i, n in enumerate(cfg.get("subsets") or []))
    settings = replace(settings, subsets=settings.subsets + extra)
    if not settings.subsets:
        raise FluxLoraError("data.path is not set: give a folder of images with .txt captions or a dataset.toml "
                            "(data.path=~/datasets/mychar), or data.subsets=[{path: ...}, ...]")
    return settings


def _log_overrides(settings: DataSettings, base: DataSettings) -> None:
    if settings.batch_size != base.batch_size:
        log.info("%s sets batch_size=%d (data.batch_size=%d is not used)", settings.source, settings.batch_size,
                 base.batch_size)
    if settings.buckets != base.buckets:
        log.info("%s sets the image size: %s", settings.source, settings.buckets.describe())
