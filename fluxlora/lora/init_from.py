"""Continue training from an existing LoRA file: `lora.init_from=<file>`, kohya or diffusers/peft keys.

kohya files adapt BFL's fused layers (`img_attn_qkv`, single-block `linear1`); diffusers splits those into q, k, v
(and mlp) Linears. A fused LoRA `scale·U·D` (D: R×in, U: out×R) becomes, exactly, one LoRA per part:

- **block-diagonal U** (what fluxlora and sd-scripts' split_qkv write: rank R = n·r, part i uses only columns
  i·r…(i+1)·r): part i gets rank r, down = its rows of D, up = its block of U;
- **anything else** (sd-scripts' default, one rank-R LoRA on the fused Linear): every part gets rank R, down = all
  of D, up = its rows of U. Training then moves each part's down on its own, and the export fuses the parts back
  as one rank-n·R block-diagonal LoRA: still exact, but n times the file's rank on those layers.

Per-layer ranks and alphas reach peft through `rank_pattern` / `alpha_pattern`; alpha is set so alpha/rank equals
the file's scale. Layers the file adapts are always adapted, even outside `lora.train_blocks`; layers the settings
target and the file lacks start fresh with `lora.rank` / `lora.alpha` (zero up, so the model is unchanged).

Embedder layers (sd-scripts' `in_dims`: `lora_unet_img_in`, `lora_unet_time_in_in_layer`, ...) are single Linears
and load as they are (`fluxlora.lora.keys.EMBEDDERS`). Text-encoder layers (`lora_te1_` / `lora_te3_`) are not the
transformer's: `fluxlora.lora.text_encoder` keeps them frozen or drops them (`lora.text_encoder_lora`); a file of
text-encoder layers only gives the transformer fresh layers.

DoRA files carry a magnitude per output row (kohya `dora_scale` (out, 1), peft `lora_magnitude_vector`): rows
split with the parts like lora_up. LoKr/LoHa files are read by `fluxlora.lora.read_lycoris`. The adapter type is
read from the file's keys; a file of another type than `lora.type` is refused in one line.

`inject_and_load` is the training entry point: the file decides the LoRA config, so it is read before injecting,
and this module builds on `inject` instead of `inject` reaching back into file reading.
"""

from __future__ import annotations

import logging
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxlora.errors import FluxLoraError
from fluxlora.lora.adapters import LYCORIS, set_layer_tensors
from fluxlora.lora.inject import ADAPTER, LoraSettings, add_adapters, inject, lora_layers, target_modules
from fluxlora.lora.keys import is_text_encoder_layer, kohya_parts, kohya_slot
from fluxlora.lora.read_lycoris import check_shapes, read_lycoris

log = logging.getLogger(__name__)

_PEFT_PREFIXES = ("base_model.model.", "transformer.", "diffusion_model.")


@dataclass
class AdapterWeights:
    """One diffusers Linear's LoRA as read from a file."""

    down: torch.Tensor
    """lora_A / lora_down: rank × in_features, fp32."""
    up: torch.Tensor
    """lora_B / lora_up: out_features × rank, fp32."""
    scale: float
    """alpha / rank of the file's layer; the update is scale·up·down."""
    magnitude: torch.Tensor | None = None
    """DoRA: peft's magnitude, one norm per output row (out_features,); None for plain LoRA."""

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def _split_fused(path: Path, key: str, down: torch.Tensor, up: torch.Tensor, scale: float,
                 modules: list[str], sizes: list[int], magnitude: torch.Tensor | None) -> dict[str, AdapterWeights]:
    """Exact per-part LoRAs of one fused kohya LoRA (see the module docstring for the two cases)."""
    if up.shape[0] != sum(sizes) or (magnitude is not None and magnitude.numel() != sum(sizes)):
        raise FluxLoraError(f"{path}: {key} has {up.shape[0]} output rows; this model's layer has {sum(sizes)}")
    n, rank = len(modules), down.shape[0]
    rows = torch.split(up, sizes, dim=0)
    mags = torch.split(magnitude.flatten(), sizes) if magnitude is not None else [None] * n
    r = rank // n
    block = n > 1 and rank % n == 0 and all(
        not torch.cat([rows[i][:, :i * r], rows[i][:, (i + 1) * r:]], dim=1).any() for i in range(n))
    if block:
        return {m: AdapterWeights(down[i * r:(i + 1) * r].clone(), rows[i][:, i * r:(i + 1) * r].clone(), scale,
                                  _clone(mags[i])) for i, m in enumerate(modules)}
    return {m: AdapterWeights(down.clone(), rows[i].clone(), scale, _clone(mags[i])) for i, m in enumerate(modules)}


def _clone(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.clone()


def _read_kohya(path: Path, sd: dict[str, torch.Tensor], transformer: torch.nn.Module) -> dict[str, AdapterWeights]:
    # text-encoder layers are `fluxlora.lora.text_encoder`'s (lora.text_encoder_lora: keep | drop)
    stems = sorted({k.split(".", 1)[0] for k in sd if not is_text_encoder_layer(k)})
    out = {}
    for stem in stems:
        modules = kohya_parts(stem)
        if modules is None:
            raise FluxLoraError(f"{path}: LoRA layer {stem} is not a Flux block or embedder layer fluxlora can train")
        try:
            down, up = sd[f"{stem}.lora_down.weight"].float(), sd[f"{stem}.lora_up.weight"].float()
        except KeyError as e:
            raise FluxLoraError(f"{path}: {stem} lacks {e.args[0]}") from e
        alpha = float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else float(down.shape[0])
        sizes = [_linear(path, transformer, name).out_features for name in modules]
        mag = sd[f"{stem}.dora_scale"].float() if f"{stem}.dora_scale" in sd else None
        out.update(_split_fused(path, stem, down, up, alpha / down.shape[0], modules, sizes, mag))
    return out


def _read_peft(path: Path, sd: dict[str, torch.Tensor]) -> dict[str, AdapterWeights]:
    out = {}
    for key in sd:
        if ".lora_A." not in key:
            continue
        name = key.split(".lora_A.", 1)[0]
        if is_text_encoder_layer(name):  # `fluxlora.lora.text_encoder` reads (or refuses) these
            continue
        module = next((name[len(p):] for p in _PEFT_PREFIXES if name.startswith(p)), name)
        up_key = key.replace(".lora_A.", ".lora_B.")
        if up_key not in sd:
            raise FluxLoraError(f"{path}: {key} has no matching {up_key}")
        down, up = sd[key].float(), sd[up_key].float()
        alpha = sd.get(f"{name}.alpha")
        mag = sd.get(f"{name}.lora_magnitude_vector")
        out[module] = AdapterWeights(down, up, float(alpha) / down.shape[0] if alpha is not None else 1.0,
                                     mag.float().flatten() if mag is not None else None)
    return out


def _linear(path: Path, transformer: torch.nn.Module, name: str) -> torch.nn.Linear:
    try:
        mod = transformer.get_submodule(name)
    except AttributeError:
        mod = None
    if not isinstance(mod, torch.nn.Linear):
        raise FluxLoraError(f"{path}: adapts {name}, which this Flux transformer has no Linear layer for")
    return mod


def file_kind(keys: list[str]) -> str:
    """lora | dora | lokr | loha, from a file's tensor names (what LyCORIS and ComfyUI go by too)."""
    if any(".lokr_" in k for k in keys):
        return "lokr"
    if any(".hada_" in k for k in keys):
        return "loha"
    if any(k.endswith((".dora_scale", ".lora_magnitude_vector")) for k in keys):
        return "dora"
    return "lora"


def read_lora_file(path: str | Path, transformer: torch.nn.Module, kind: str = "lora",
                   adaptable: list[str] | None = None) -> dict:
    """diffusers module name -> its adapter, from a kohya, LyCORIS or diffusers/peft safetensors file of `kind`
    (LoKr/LoHa: `LycorisWeights` for the modules in `adaptable`; else `AdapterWeights`)."""
    from safetensors.torch import load_file

    from fluxlora.models.files import read_header
    from fluxlora.models.identify import describe_keys

    path = Path(path).expanduser()
    header = read_header(path)  # missing / truncated / not safetensors: one line naming the file
    keys = list(header.shapes)
    sd = load_file(str(path))
    if kind in LYCORIS:
        weights = read_lycoris(path, sd, transformer, kind, adaptable or [])
        if not weights and not any(is_text_encoder_layer(k) for k in keys):
            raise FluxLoraError(f"{path} holds no transformer {kind} layers")
        return weights
    if any(k.startswith(("lora_unet_", "lora_te")) for k in keys):
        weights = _read_kohya(path, sd, transformer)
    elif any(".lora_A." in k for k in keys):
        weights = _read_peft(path, sd)
    else:
        raise FluxLoraError(f"{path} is not a LoRA file; it looks like {describe_keys(keys)}")
    for name, w in weights.items():
        lin = _linear(path, transformer, name)
        if kohya_slot(name) is None:
            raise FluxLoraError(f"{path}: adapts {name}, which has no kohya counterpart (fluxlora trains block "
                                "and embedder layers)")
        if w.down.shape[1] != lin.in_features or w.up.shape != (lin.out_features, w.rank):
            raise FluxLoraError(f"{path}: LoRA for {name} has shapes {tuple(w.down.shape)}/{tuple(w.up.shape)}; "
                                f"the layer is {lin.out_features}×{lin.in_features} (another model size?)")
    if not weights and not any(is_text_encoder_layer(k) for k in keys):  # text-encoder layers only: fresh ones
        raise FluxLoraError(f"{path} holds no transformer LoRA layers")
    return weights


def lora_config_args(weights: dict, fresh: list[str], rank: int, alpha: float) -> dict:
    """`LoraConfig` arguments giving every file layer its own rank and alpha (alpha = scale·rank) and every fresh
    layer `rank` / `alpha`. The most common file (rank, alpha) is the default, so patterns stay short."""
    want = {name: (w.rank, w.scale * w.rank) for name, w in weights.items()} | {n: (rank, float(alpha)) for n in fresh}
    (r0, a0), _ = Counter((w.rank, round(w.scale * w.rank, 9)) for w in weights.values()).most_common(1)[0]
    return dict(
        r=r0, lora_alpha=a0,
        rank_pattern={re.escape(n): r for n, (r, _) in want.items() if r != r0},
        alpha_pattern={re.escape(n): a for n, (_, a) in want.items() if abs(a - a0) > 1e-9 * max(1.0, abs(a0))},
    )


def copy_weights(layers: dict, weights: dict, adapter: str) -> None:
    """Write the file's tensors into the injected peft layers (fp32 parameters)."""
    with torch.no_grad():
        for name, w in weights.items():
            layer = layers[name]
            if not isinstance(w, AdapterWeights):
                set_layer_tensors(layer, w.tensors)
                continue
            layer.lora_A[adapter].weight.copy_(w.down)
            layer.lora_B[adapter].weight.copy_(w.up)
            if w.magnitude is not None:
                layer.lora_magnitude_vector[adapter].weight.copy_(w.magnitude)


def inject_and_load(transformer: torch.nn.Module, settings: LoraSettings) -> list[str]:
    """`inject`, continuing from `settings.init_from` when it names a file: the file's layers with their own ranks
    and weights, plus fresh ones on targeted layers the file lacks. Returns the adapted module names."""
    if not settings.init_from:
        return inject(transformer, settings)
    from fluxlora.models.files import read_header

    path = Path(settings.init_from).expanduser()
    kind = file_kind(list(read_header(path).shapes))
    if kind != settings.type:
        raise FluxLoraError(f"{path} holds {kind} weights but lora.type={settings.type}; set lora.type={kind} to "
                            "continue it")
    targets = target_modules(transformer, settings)
    adaptable = target_modules(transformer, LoraSettings(type=settings.type, train_embedders=True))  # every Linear
    init = read_lora_file(path, transformer, kind, adaptable)
    if not init:  # a file of text-encoder layers only (`fluxlora.lora.text_encoder` applies them)
        log.info("%s holds no transformer layers: the transformer's LoRA starts fresh", path)
        return add_adapters(transformer, settings, targets, dict(r=settings.rank, lora_alpha=settings.alpha))
    shape = lora_config_args(init, [t for t in targets if t not in init], settings.rank, settings.alpha)
    both = any("lokr_w1_a" in getattr(w, "tensors", {}) for w in init.values())
    targets = add_adapters(transformer, settings, sorted(set(targets) | set(init)), shape, lokr_decompose_both=both)
    if kind in LYCORIS:
        check_shapes(path, lora_layers(transformer), init)
    copy_weights(lora_layers(transformer), init, ADAPTER)
    log.info("LoRA initialised from %s: %d layers (ranks %s)", settings.init_from, len(init),
             sorted({w.rank for w in init.values()}))
    return targets
