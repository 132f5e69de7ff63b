"""Find the CLIP and T5 tokenizers on this machine: an explicit folder, the model folder, or the local Hugging Face
cache (looked up offline). Only `model.allow_download=true` lets them be fetched; a miss is one error that lists
every place looked."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)

_MARKERS = ("tokenizer_config.json", "tokenizer.json", "vocab.json", "spiece.model")


@dataclass(frozen=True)
class TokenizerSpec:
    """Where one tokenizer may live."""

    label: str
    """Human name used in messages (`CLIP tokenizer`)."""
    option: str
    """The config key that names an explicit folder (`model.tokenizer_path`)."""
    subfolder: str
    """Its sub-folder in a diffusers model folder (`tokenizer`)."""
    hub_repos: tuple[tuple[str, str], ...]
    """(repo id, sub-folder) looked up in the local Hugging Face cache, in order; the last one is downloaded
    when downloads are allowed (it is not gated)."""


CLIP = TokenizerSpec("CLIP tokenizer", "model.tokenizer_path", "tokenizer", (
    ("black-forest-labs/FLUX.1-dev", "tokenizer"), ("black-forest-labs/FLUX.1-schnell", "tokenizer"),
    ("openai/clip-vit-large-patch14", "")))
T5 = TokenizerSpec("T5 tokenizer", "model.tokenizer_2_path", "tokenizer_2", (
    ("black-forest-labs/FLUX.1-dev", "tokenizer_2"), ("black-forest-labs/FLUX.1-schnell", "tokenizer_2"),
    ("google/t5-v1_1-xxl", "")))


def _is_tokenizer_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _MARKERS)


def _from_hf_cache(repo: str, subfolder: str, cache_dir: str | None) -> Path | None:
    """The cached snapshot folder of `repo/subfolder`, found without any network access."""
    from huggingface_hub import try_to_load_from_cache

    for marker in _MARKERS:
        hit = try_to_load_from_cache(repo, f"{subfolder}/{marker}" if subfolder else marker, cache_dir=cache_dir)
        if isinstance(hit, str):
            return Path(hit).parent
    return None


def find_tokenizer(spec: TokenizerSpec, explicit: str | None, model_dir: Path | None,
                   cache_dir: str | None) -> tuple[Path | None, list[str]]:
    """(the folder found or None, what was looked at) in the order: explicit, model folder, HF cache.
    An explicit folder is the only place looked when given: a typo there must not silently pick another."""
    looked = []
    if explicit:
        path = Path(explicit).expanduser()
        if _is_tokenizer_dir(path):
            return path, looked
        why = "does not exist" if not path.exists() else f"holds none of {', '.join(_MARKERS)}"
        return None, [f"{spec.option}={path}, which {why}"]
    if model_dir is not None:
        path = model_dir / spec.subfolder
        if _is_tokenizer_dir(path):
            return path, looked
        looked.append(f"{path} (absent)")
    from huggingface_hub import constants

    cache = cache_dir or constants.HF_HUB_CACHE
    for repo, sub in spec.hub_repos:
        hit = _from_hf_cache(repo, sub, cache_dir)
        if hit is not None:
            return hit, looked
    looked.append(f"Hugging Face cache {cache}: {', '.join(r + ('/' + s if s else '') for r, s in spec.hub_repos)}"
                  " (not cached)")
    return None, looked


def load_tokenizers(explicit: str | None, explicit_2: str | None, model_dir: Path | None, cache_dir: str | None,
                    allow_download: bool, t5_max_length: int):
    """(CLIP tokenizer, T5 tokenizer) from local files; one FluxLoraError lists every miss.

    Args:
        explicit: `model.tokenizer_path`, a CLIP tokenizer folder, or None.
        explicit_2: `model.tokenizer_2_path`, a T5 tokenizer folder, or None.
        model_dir: the model folder whose `tokenizer/` and `tokenizer_2/` are tried next, or None.
        cache_dir: the Hugging Face hub cache to search (None = HF_HUB_CACHE).
        allow_download: fetch a missing tokenizer from the Hub (never the default; tests never do).
        t5_max_length: T5 tokens per prompt.
    """
    from transformers import CLIPTokenizer, T5TokenizerFast

    found = {}
    misses = []
    for spec, exp in ((CLIP, explicit), (T5, explicit_2)):
        path, looked = find_tokenizer(spec, exp, model_dir, cache_dir)
        if path is None and allow_download:
            repo, sub = spec.hub_repos[-1]
            log.warning("%s not found locally; downloading it from %s (model.allow_download=true)", spec.label, repo)
            found[spec.label] = (repo, sub)
        elif path is None:
            misses.append(f"{spec.label} (looked in: {'; '.join(looked)})")
        else:
            found[spec.label] = (str(path), "")
    if misses:
        raise FluxLoraError(f"tokenizer not found: {' and '.join(misses)}; set {CLIP.option} / {T5.option} to a "
                            "tokenizer folder, or allow a download with model.allow_download=true")
    kw = dict(local_files_only=not allow_download)
    tok = _load(CLIPTokenizer, *found[CLIP.label], **kw)
    tok2 = _load(T5TokenizerFast, *found[T5.label], model_max_length=t5_max_length, **kw)
    log.info("tokenizers: CLIP from %s, T5 from %s", found[CLIP.label][0], found[T5.label][0])
    return tok, tok2


def _load(cls, source: str, subfolder: str, **kw):
    try:
        return cls.from_pretrained(source, subfolder=subfolder, **kw)
    except (OSError, ValueError, TypeError) as e:
        where = f"{source}/{subfolder}" if subfolder else source
        raise FluxLoraError(f"tokenizer {where} could not be loaded: {str(e).splitlines()[0]}") from e
