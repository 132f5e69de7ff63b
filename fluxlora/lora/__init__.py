"""LoRA layers on the Flux transformer: `keys` (diffusers <-> kohya names), `inject`, `export`, `init_from`, `header`
(the file's safetensors header).

Imports run one way, keys <- inject <- export / init_from / header; no re-exports here, so none can close a circle.
"""
