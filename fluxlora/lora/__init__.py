"""LoRA layers on the Flux transformer: `keys` (diffusers <-> kohya names), `inject`, `export`, `init_from`.

Imports run one way, keys <- inject <- export / init_from; no re-exports here, so none can close a circle.
"""
