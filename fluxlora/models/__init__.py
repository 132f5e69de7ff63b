"""Model loading: the embedded tiny Flux, or real weights from local paths (never from a hub)."""

from fluxlora.models.components import FluxComponents
from fluxlora.models.loading import load_components

__all__ = ["FluxComponents", "load_components"]
