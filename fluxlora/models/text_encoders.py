"""Load CLIP-L and T5-XXL from diffusers folders or single files (`clip_l.safetensors`, `t5xxl_fp16.safetensors`,
`t5xxl_fp8_e4m3fn.safetensors`, ComfyUI's `_scaled` fp8), built on the meta device with configs that ship in the
package. Tensors are assigned in the compute dtype (fp8 files upcast, scaled-fp8 weights multiplied by their scale,
as they are read), except T5's block Linears with `storage="fp8"`: they stay float8_e4m3fn (`Fp8StoredLinear`),
so T5-XXL takes 4.8 GB instead of 9.5 and fits an 8 GB card while caching. An fp8 file is then used as it is; a
16-bit file is cast tensor by tensor while it is read, so it never sits in memory at full size."""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from fluxlora.errors import FluxLoraError
from fluxlora.models.bfl import shipped_config
from fluxlora.models.files import (CheckpointHeader, LoadTimer, assign_state, meta_model, read_header,
                                  read_tensors)
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


FP8 = torch.float8_e4m3fn
_T5_FP8 = re.compile(r"^encoder\.block\.\d+\..*\.(q|k|v|o|wi|wi_0|wi_1|wo)\.weight$")
"""T5's block Linears: 4.6 of its 4.8 B parameters; the token embedding and the norms stay in the compute dtype."""


class Fp8StoredLinear(torch.nn.Module):
    """An inference-only Linear whose weight is float8_e4m3fn times a per-tensor scale, upcast for each matmul.

    Not `fluxlora.perf.fp8.Fp8Linear`: transformers' T5 casts the activations to `wo.weight.dtype` before `wo` (for its
    fp32-kept `wo`), which would turn them into fp8; here `weight` is None and the stored tensor is `weight_fp8`.
    """

    weight = None

    def __init__(self, weight_fp8: torch.Tensor, scale: torch.Tensor | None, bias: torch.Tensor | None,
                 compute_dtype: torch.dtype) -> None:
        super().__init__()
        self.out_features, self.in_features = weight_fp8.shape
        self.weight_fp8 = torch.nn.Parameter(weight_fp8, requires_grad=False)
        self.register_buffer("scale", None if scale is None else scale.float().reshape(-1, 1)[:, :1]
                             if scale.numel() > 1 else scale.float().reshape(()))
        self.bias = None if bias is None else torch.nn.Parameter(bias.to(compute_dtype), requires_grad=False)
        self.compute_dtype = compute_dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight_fp8.float() * self.scale if self.scale is not None else self.weight_fp8
        return F.linear(x.to(self.compute_dtype), w.to(self.compute_dtype), self.bias)


def to_fp8(t: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(fp8 tensor, scale) with `t ≈ fp8 * scale`: an fp8 tensor is kept as it is (with its file's scale, if any);
    any other is scaled per tensor so its largest value lands on fp8's largest (448), never saturating."""
    if t.dtype == FP8:
        return t, scale
    amax = t.abs().amax().float().clamp(min=1e-12)
    s = amax / torch.finfo(FP8).max
    return (t.float() / s).to(FP8), s


def _is_scale(key: str) -> bool:
    return key.endswith((".scale_weight", ".scale_input")) or key == "scaled_fp8"


def _read(source: Path, names: dict[str, str], dtype: torch.dtype, device,
          fp8: re.Pattern | None = None) -> tuple[dict[str, torch.Tensor], dict[str, tuple]]:
    """Read one tensor at a time: upcast it and apply ComfyUI scaled-fp8 scales (`<layer>.scale_weight`), or, for
    the weights `fp8` matches, keep or cast them to fp8. Returns (tensors, {weight name: (fp8, scale)})."""
    model_key = {v: k for k, v in names.items()}
    scale_files = [f for f, k in model_key.items() if _is_scale(k)]
    scales = {model_key[f]: t.float() for f, t in read_tensors(source, scale_files, device)}
    out, kept = {}, {}
    for f, t in read_tensors(source, [f for f, k in model_key.items() if not _is_scale(k)], device):
        k = model_key[f]
        scale = scales.get(k.removesuffix(".weight") + ".scale_weight") if k.endswith(".weight") else None
        if fp8 is not None and fp8.match(k):
            kept[k] = to_fp8(t, scale)
        else:
            out[k] = (t.float() * scale).to(dtype) if scale is not None else t.to(dtype)
        del t
    return out, kept


def _store_fp8(model: torch.nn.Module, kept: dict[str, tuple], dtype: torch.dtype) -> torch.nn.Module:
    """Replace each Linear whose weight is in `kept` by an `Fp8StoredLinear` holding it."""
    for key, (weight, scale) in kept.items():
        name = key.removesuffix(".weight")
        parent, _, child = name.rpartition(".")
        old = model.get_submodule(name)
        bias = None if old.bias is None or old.bias.is_meta else old.bias.data
        setattr(model.get_submodule(parent), child, Fp8StoredLinear(weight, scale, bias, dtype))
    return model


def store_t5_fp8(model: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """A loaded T5 with its block Linears converted to `Fp8StoredLinear` in place (folders and built models; single
    files are cast while they are read instead)."""
    kept = {k: to_fp8(v) for k, v in model.state_dict().items() if _T5_FP8.match(k)}
    return _store_fp8(model, kept, dtype)


def fp8_stored_bytes(model: torch.nn.Module) -> int:
    """Bytes of a model's parameters and buffers as stored (fp8 weights count one byte each)."""
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _checked_names(source: Path, kind: str) -> tuple[CheckpointHeader, dict[str, str]]:
    """A CLIP-L (`kind="clip"`) or T5 (`"t5"`) single file's header and its model key -> file key map; a file of
    another model is one line naming it. Reads the header only."""
    header = read_header(source)
    if kind == "clip":
        names = _normalise(list(header.shapes), _CLIP_PREFIXES, "text_model.")
        names = {k: v for k, v in names.items() if k not in _CLIP_DROP}
        ok = _CLIP_SIGN in names
    else:
        names = _normalise(list(header.shapes), _T5_PREFIXES)
        names = {k: v for k, v in names.items() if not k.startswith(("decoder.", "lm_head."))}
        ok = _T5_SIGN in names and "shared.weight" in names
    if not ok:
        what = "CLIP" if kind == "clip" else "T5"
        raise FluxLoraError(f"{source} is not a {what} text encoder; it looks like {describe_keys(header.shapes)}")
    return header, names


def check_text_encoder(source: str | Path, kind: str) -> None:
    """Fail now, naming the file, if `source` (a single file) is not a CLIP-L / T5 encoder: the encoders are read
    only when caching reaches them, so their headers are checked before anything is loaded."""
    if Path(source).is_file():
        _checked_names(Path(source), kind)


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
        header, names = _checked_names(source, "clip")
        config = clip_config({k: header.shapes[v] for k, v in names.items()}, header.config(), source)
        model = meta_model(lambda: CLIPTextModel(CLIPTextConfig(**config)))
        return assign_state(model, _read(source, names, dtype, device)[0], source, "CLIP text encoder", device)


def load_t5(source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
            storage: str = "full"):
    """T5 `T5EncoderModel` in eval mode from a folder or a single file (fp16/bf16/fp32/fp8, scaled fp8).

    `storage="fp8"` keeps the block Linears in float8_e4m3fn (`Fp8StoredLinear`); `full` upcasts everything to
    `dtype`."""
    from transformers import T5Config, T5EncoderModel

    source = Path(source)
    fp8 = _T5_FP8 if storage == "fp8" else None
    with LoadTimer(f"text encoder (T5{', fp8' if fp8 else ''})", source):
        if source.is_dir():
            model = _from_folder(T5EncoderModel, source, dtype, "cpu", "T5 text encoder")
            return (store_t5_fp8(model, dtype) if fp8 is not None else model).to(device)
        header, names = _checked_names(source, "t5")
        config = t5_config({k: header.shapes[v] for k, v in names.items()}, header.config())
        model = meta_model(lambda: T5EncoderModel(T5Config(**config)))
        state, kept = _read(source, names, dtype, device, fp8)
        state["encoder.embed_tokens.weight"] = state["shared.weight"]  # tied in T5EncoderModel; one copy in memory
        if kept:
            _store_fp8(model, kept, dtype)
            state.update({f"{k.removesuffix('.weight')}.weight_fp8": w for k, (w, _) in kept.items()})
            state.update({f"{k.removesuffix('.weight')}.scale": s for k, (w, s) in kept.items() if s is not None})
        return assign_state(model, state, source, "T5 text encoder", device)


def t5_file_dtypes(source: str | Path) -> set[str]:
    """The safetensors dtypes of a T5 file's (or a diffusers folder's shards') block Linears, e.g. {'F8_E4M3'} or
    {'F16'}. Reads headers only."""
    source = Path(source)
    if source.is_file():
        header, names = _checked_names(source, "t5")
        return {header.dtypes[v] for k, v in names.items() if _T5_FP8.match(k)}
    dtypes: set[str] = set()
    for f in sorted(source.glob("*.safetensors")):  # a folder's shards: any may hold the block Linears
        header = read_header(f)
        dtypes |= {header.dtypes[v] for k, v in _normalise(list(header.shapes), _T5_PREFIXES).items()
                   if _T5_FP8.match(k)}
    return dtypes


def t5_parameter_count(source: str | Path) -> int:
    """Parameters of a T5 file or folder, from headers only (its size in 16 bits is twice this)."""
    source = Path(source)
    files = [source] if source.is_file() else sorted(source.glob("*.safetensors"))
    total = 0
    for f in files:
        for k, shape in read_header(f).shapes.items():
            if not _is_scale(k) and not k.startswith(("decoder.", "lm_head.")):
                n = 1
                for d in shape:
                    n *= int(d)
                total += n
    return total
