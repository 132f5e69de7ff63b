"""Which FLUX.1 transformer is FLUX.1 Kontext [dev].

Kontext-dev has exactly the keys and shapes of FLUX.1-dev (it differs in what it was trained on, not in its layout),
so its weights cannot say what they are. The preset says it (`model.variant: kontext`, set by `model=flux-kontext`
and `model=tiny-kontext`); a diffusers folder says it too: its `model_index.json` names `FluxKontextPipeline`.
A Kontext folder under another preset is refused with the preset to use, as a Chroma file is.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fluxlora.errors import FluxLoraError

VARIANTS = ("dev", "schnell", "kontext")
"""`model.variant`: null = told from the weights (dev or schnell by the guidance embedding); `kontext` must be said."""
PIPELINE = "FluxKontextPipeline"
"""The `_class_name` a diffusers Kontext folder's model_index.json carries."""


def pipeline_class(root: Path | None) -> str | None:
    """The `_class_name` of `root/model_index.json` (None without one, or when it does not parse)."""
    index = root / "model_index.json" if root is not None else None
    if index is None or not index.is_file():
        return None
    try:
        return str(json.loads(index.read_text(encoding="utf-8")).get("_class_name") or "") or None
    except (OSError, ValueError, AttributeError):
        return None


def is_kontext(model_cfg: Any, root: Path | None = None) -> bool:
    """Whether the run trains FLUX.1 Kontext: the preset names it, or a diffusers folder's model_index.json does.

    Raises when a Kontext folder is loaded under a non-Kontext preset (training it text-to-image would silently
    teach an editing model without its control image), or `model.variant` is not known.
    """
    variant = model_cfg.get("variant")
    if variant not in (None, "", *VARIANTS):
        raise FluxLoraError(f"model.variant={variant!r} is not one of {', '.join(VARIANTS)} (or null)")
    named = variant == "kontext"
    cls = pipeline_class(root)
    if cls == PIPELINE and not named:
        raise FluxLoraError(f"{root}/model_index.json names {PIPELINE}: a FLUX.1 Kontext model; use "
                            "model=flux-kontext (with paired images: data.control_path)")
    if named and cls not in (None, PIPELINE, "FluxPipeline"):
        raise FluxLoraError(f"model.variant=kontext but {root}/model_index.json names {cls}, not {PIPELINE}")
    return named
