"""Load CLIP-L and T5-XXL from diffusers folders or single files (`clip_l.safetensors`, `t5xxl_fp16.safetensors`,
`t5xxl_fp8_e4m3fn.safetensors`, ComfyUI's `_scaled` fp8), built on the meta device with configs that ship in the
package. Every tensor is assigned in the compute dtype: the encoders only run while caching, so fp8 files are
upcast (and scaled-fp8 weights multiplied by their scale) as they are read."""

from __future__ import annotations

import re
from pathlib import Path

import torch

from fluxlora.errors import FluxLoraError
from fluxlora.models.bfl import shipped_config
from fluxlora.models.files import LoadTimer, assign_state, meta_model, read_header, read_tensors
from fluxlora.models.identify import describe_keys

_CLIP_PREFIXES = ("text_encoders.clip_l.transformer.", "cond_stage_model.transformer.", "")
_T5_PREFIXES = ("text_encoders.t5xxl.transformer.", "")
_CLIP_SIGN = "encoder.layers.0.self_attn.q_proj.weight"
_T5_SIGN = "encoder.block.0.layer.0.SelfAttention.q.weight"
_CLIP_DROP = ("text_projection.weight", "logit_scale", "embeddings.position_ids")


def _normalise(keys: list[str], prefixes: tuple[str, ...], inner: str = "") -> dict[str, str]:
    """model key -> file key: the first prefix that any key carries is stripped, then `inner` (e.g. `text_model.`)."""
    prefix = next(p for p in prefixes if any(k.startswith(p) for k in keys))
    out = {}
    for k in keys:
        if k.startswith(prefix):
            name = k[len(prefix):]
            out[name[len(inner):] if inner and name.startswith(inner) else name] = k
    return out


def _count(shapes: dict, pattern: str) -> int:
    return len({m.group(1) for k in shapes if (m := re.match(pattern, k))})


def clip_config(shapes: dict[str, tuple], stored: dict, path: Path) -> dict:
    """CLIP-L's shipped config (its `eos_token_id: 2` selects pooling at the highest token id, as Flux does),
    then the file's stored config, then widths from the tensors; head count cannot be read from shapes."""
    config = shipped_config("clip-l")
    config.update(stored)
    vocab, hidden = shapes["embeddings.token_embedding.weight"]
    config.update(vocab_size=vocab, hidden_size=hidden,
                  max_position_embeddings=shapes["embeddings.position_embedding.weight"][0],
                  intermediate_size=shapes["encoder.layers.0.mlp.fc1.weight"][0],
                  num_hidden_layers=_count(shapes, r"encoder\.layers\.(\d+)\."))
    if hidden % config["num_attention_heads"]:
        raise FluxLoraError(f"{path}: CLIP width {hidden} is not a multiple of {config['num_attention_heads']} heads "
                            "(not CLIP-L, and the file names no config)")
    return config


def t5_config(shapes: dict[str, tuple], stored: dict) -> dict:
    """T5-XXL's shipped config, then the stored one, then everything the tensors tell (all widths and heads)."""
    config = shipped_config("t5-xxl")
    config.update(stored)
    buckets, heads = shapes["encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"]
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in shapes
    wi = "wi_0" if gated else "wi"
    config.update(vocab_size=shapes["shared.weight"][0], d_model=shapes["shared.weight"][1], num_heads=heads,
                  d_kv=shapes["encoder.block.0.layer.0.SelfAttention.q.weight"][0] // heads,
                  d_ff=shapes[f"encoder.block.0.layer.1.DenseReluDense.{wi}.weight"][0],
                  relative_attention_num_buckets=buckets, num_layers=_count(shapes, r"encoder\.block\.(\d+)\."))
    if not gated and config.get("feed_forward_proj", "").startswith("gated"):
        config["feed_forward_proj"] = "relu"
    return config


def _is_scale(key: str) -> bool:
    return key.endswith((".scale_weight", ".scale_input")) or key == "scaled_fp8"


def _read(source: Path, names: dict[str, str], dtype: torch.dtype, device) -> dict[str, torch.Tensor]:
    """Read one tensor at a time, upcast it, and apply ComfyUI scaled-fp8 scales (`<layer>.scale_weight`)."""
    model_key = {v: k for k, v in names.items()}
    scale_files = [f for f, k in model_key.items() if _is_scale(k)]
    scales = {model_key[f]: t.float() for f, t in read_tensors(source, scale_files, device)}
    out = {}
    for f, t in read_tensors(source, [f for f, k in model_key.items() if not _is_scale(k)], device):
        k = model_key[f]
        scale = scales.get(k.removesuffix(".weight") + ".scale_weight") if k.endswith(".weight") else None
        out[k] = (t.float() * scale).to(dtype) if scale is not None else t.to(dtype)
    return out


def _from_folder(cls, source: Path, dtype: torch.dtype, device, what: str):
    try:
        return cls.from_pretrained(source, dtype=dtype, local_files_only=True).to(device).eval()
    except (OSError, ValueError) as e:
        raise FluxLoraError(f"{what} folder {source} could not be loaded: {str(e).splitlines()[0]}") from e


def load_clip(source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """CLIP-L `CLIPTextModel` in eval mode from a folder or a single file (transformers keys, `text_model.`
    prefix optional; a projection head in the file is ignored)."""
    from transformers import CLIPTextConfig, CLIPTextModel

    source = Path(source)
    with LoadTimer("text encoder (CLIP-L)", source):
        if source.is_dir():
            return _from_folder(CLIPTextModel, source, dtype, device, "CLIP text encoder")
        header = read_header(source)
        names = _normalise(list(header.shapes), _CLIP_PREFIXES, "text_model.")
        names = {k: v for k, v in names.items() if k not in _CLIP_DROP}
        if _CLIP_SIGN not in names:
            raise FluxLoraError(f"{source} is not a CLIP text encoder; it looks like {describe_keys(header.shapes)}")
        config = clip_config({k: header.shapes[v] for k, v in names.items()}, header.config(), source)
        model = meta_model(lambda: CLIPTextModel(CLIPTextConfig(**config)))
        return assign_state(model, _read(source, names, dtype, device), source, "CLIP text encoder", device)


def load_t5(source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """T5 `T5EncoderModel` in eval mode from a folder or a single file (fp16/bf16/fp32/fp8, scaled fp8)."""
    from transformers import T5Config, T5EncoderModel

    source = Path(source)
    with LoadTimer("text encoder (T5)", source):
        if source.is_dir():
            return _from_folder(T5EncoderModel, source, dtype, device, "T5 text encoder")
        header = read_header(source)
        names = _normalise(list(header.shapes), _T5_PREFIXES)
        names = {k: v for k, v in names.items() if not k.startswith(("decoder.", "lm_head."))}
        if _T5_SIGN not in names or "shared.weight" not in names:
            raise FluxLoraError(f"{source} is not a T5 text encoder; it looks like {describe_keys(header.shapes)}")
        config = t5_config({k: header.shapes[v] for k, v in names.items()}, header.config())
        model = meta_model(lambda: T5EncoderModel(T5Config(**config)))
        state = _read(source, names, dtype, device)
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in T5EncoderModel; one copy in memory
        return assign_state(model, state, source, "T5 text encoder", device)
