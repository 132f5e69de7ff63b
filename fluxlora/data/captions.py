"""Captions as sd-scripts builds them: class token, prefix/suffix, `keep_tokens` and shuffling.

Text-encoder outputs are cached, so shuffling cannot happen per step as in sd-scripts (which refuses
`shuffle_caption` together with `cache_text_encoder_outputs`). Instead each image gets up to `caption_variants`
shuffled captions, all encoded while caching; the sampler draws one per sample. The variants are derived from the
caption text alone, so they (and the cache) stay the same across runs and seeds.
"""

from __future__ import annotations

import hashlib

import numpy as np

from fluxlora.data.settings import Subset


def compose_caption(text: str, subset: Subset) -> str:
    """The caption an image trains with, before shuffling (an empty `text` means the image has none)."""
    caption = text.strip()
    token = subset.class_token.strip()
    if not caption:
        caption = token
    elif token and subset.prepend_class_token and token not in caption:
        caption = f"{token}{subset.caption_separator} {caption}"
    if subset.caption_prefix:
        caption = f"{subset.caption_prefix} {caption}".strip()
    if subset.caption_suffix:
        caption = f"{caption} {subset.caption_suffix}".strip()
    return caption


def split_tokens(caption: str, separator: str = ",") -> list[str]:
    return [t.strip() for t in caption.split(separator) if t.strip()]


def caption_variants(caption: str, subset: Subset, count: int) -> tuple[str, ...]:
    """The distinct captions to encode for one image: the caption itself first, then shuffles of the tokens after
    `keep_tokens` (at most `count` in all; fewer when the tokens allow fewer orders)."""
    if not subset.shuffle_caption or count <= 1:
        return (caption,)
    tokens = split_tokens(caption, subset.caption_separator)
    keep, rest = tokens[:subset.keep_tokens], tokens[subset.keep_tokens:]
    joiner = f"{subset.caption_separator} "
    variants = [joiner.join(keep + rest)]
    if len(rest) < 2:
        return tuple(variants)
    seed = int.from_bytes(hashlib.sha256(caption.encode("utf-8")).digest()[:8], "little")
    rng = np.random.default_rng(seed)
    limit = min(count, _permutations(len(rest)))
    for _ in range(count * 8):
        if len(variants) >= limit:
            break
        shuffled = joiner.join(keep + [rest[i] for i in rng.permutation(len(rest))])
        if shuffled not in variants:
            variants.append(shuffled)
    return tuple(variants)


def _permutations(n: int) -> int:
    out = 1
    for k in range(2, n + 1):
        out *= k
        if out > 1_000_000:
            break
    return out
