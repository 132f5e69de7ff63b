"""fluxlora: a Flux.1 LoRA trainer that never hangs silently."""

__version__ = "0.1.0"
