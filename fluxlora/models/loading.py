"""Which loader a `model` config group goes to: FLUX.1 (`components`) or Chroma (`chroma`), by `model.arch`.

Its own module so that the two loaders stay independent of each other: Chroma's builds on the components, and the
FLUX.1 loader's one Chroma concern (a Chroma folder under a Flux preset, which fails there for want of CLIP-L) is
answered here, only once that load has failed, with a message naming the preset to use.
"""

from __future__ import annotations

from typing import Any

from fluxlora.errors import FluxLoraError
from fluxlora.models import chroma
from fluxlora.models.components import FluxComponents, load_flux_components

ARCHES = ("flux", "chroma")


def load_components(model_cfg: Any, storage: str = "none", defer_transformer: bool = False,
                    t5_storage: str = "full", device_limit: int | None = None,
                    defer_encoders: bool = False) -> FluxComponents:
    """The model `model_cfg` names, from local files only; the arguments are `load_flux_components`'s."""
    arch = model_cfg.get("arch", "flux")
    if arch not in ARCHES:
        raise FluxLoraError(f"model.arch={arch!r} is not one of {', '.join(ARCHES)}")
    args = (model_cfg, storage, defer_transformer, t5_storage, device_limit, defer_encoders)
    if arch == "chroma":
        return chroma.load_components(*args)
    try:
        return load_flux_components(*args)
    except FluxLoraError as e:  # a Chroma model under a Flux preset fails there (no CLIP-L, no modulation keys)
        if model_cfg.source == "tiny" or "model=chroma" in str(e):  # the BFL reader names Chroma itself
            raise
        hint = chroma.chroma_hint(model_cfg)
        if hint is None:
            raise
        raise FluxLoraError(f"{e}; {hint}") from None
