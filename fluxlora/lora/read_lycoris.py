"""Reading LoKr / LoHa layers (LyCORIS keys) from a file, for `lora.init_from`.

Accepted names: `lycoris_<diffusers module>` (what fluxlora's LoKr export and LyCORIS on diffusers' Flux write),
`transformer.<module>` (fluxlora's diffusers LoKr file; alpha baked in) and kohya's `lora_unet_<block>_<slot>`.
A fused kohya slot (qkv, linear1) splits exactly for LoHa, as for LoRA: part i's rows of w1_a / w2_a with the shared
w1_b / w2_b (or, when the file is block-diagonal as fluxlora writes it, only part i's columns and rows). A fused
LoKr does not split into per-part Kronecker products in general, so it is refused.

The scale follows LyCORIS: alpha / dim where dim is the inner size of a factored matrix, 1 when both LoKr factors
are full or the file has no alpha. peft's scale is alpha / r, so each layer's peft alpha is scale·r.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from fluxlora.errors import FluxLoraError
from fluxlora.lora.adapters import TENSORS
from fluxlora.lora.export_lycoris import LYCORIS_PREFIX, lycoris_name
from fluxlora.lora.keys import is_text_encoder_layer, kohya_parts


@dataclass
class LycorisWeights:
    """One diffusers Linear's LoKr or LoHa, as peft will hold it."""

    tensors: dict[str, torch.Tensor]
    """peft/LyCORIS names (`lokr_w1`, `hada_w1_a`, ...) -> fp32 tensors."""
    rank: int
    """peft's r for this layer: the inner size of the factored matrices (for a full LoKr, one that keeps it full)."""
    scale: float
    """The multiplier of the product: peft's alpha / r."""


def _stems(sd: dict[str, torch.Tensor], kind: str) -> dict[str, dict[str, torch.Tensor]]:
    """layer name in the file -> {tensor name: tensor} for this kind's tensors (and alpha)."""
    names = TENSORS[kind] + ("alpha",)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        stem, _, leaf = key.rpartition(".")
        if leaf in names:
            out.setdefault(stem, {})[leaf] = value.float()
    return out


def _lokr(path: Path, stem: str, t: dict[str, torch.Tensor]) -> LycorisWeights:
    alpha = float(t.pop("alpha")) if "alpha" in t else None
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    if ("lokr_w1" not in t and "lokr_w1_a" not in t) or ("lokr_w2" not in t and "lokr_w2_a" not in t):
        raise FluxLoraError(f"{path}: {stem} lacks lokr_w1 or lokr_w2")
    if dim is not None:
        return LycorisWeights(t, dim, alpha / dim if alpha is not None else 1.0)
    # both full: LyCORIS's scale is 1; peft keeps a factor full only when r >= max(w2 dims) / 2
    need = max(t["lokr_w2"].shape)
    rank = int(alpha) if alpha is not None and alpha >= need / 2 and alpha == int(alpha) else need
    return LycorisWeights(t, rank, 1.0)


def _loha(stem: str, t: dict[str, torch.Tensor]) -> LycorisWeights:
    alpha = float(t.pop("alpha")) if "alpha" in t else None
    rank = t["hada_w1_b"].shape[0]
    return LycorisWeights(t, rank, alpha / rank if alpha is not None else 1.0)


def _split_loha(w: LycorisWeights, modules: list[str], sizes: list[int]) -> dict[str, LycorisWeights]:
    """Exact per-part LoHas of one fused LoHa (see the module docstring)."""
    n, rank = len(modules), w.rank
    rows = {j: torch.split(w.tensors[f"hada_w{j}_a"], sizes, dim=0) for j in (1, 2)}
    r = rank // n

    def off_block(a: torch.Tensor, i: int) -> bool:
        return bool(torch.cat([a[:, :i * r], a[:, (i + 1) * r:]], dim=1).any())

    block = n > 1 and rank % n == 0 and not any(off_block(rows[j][i], i) for j in (1, 2) for i in range(n))
    out = {}
    for i, m in enumerate(modules):
        cols = slice(i * r, (i + 1) * r) if block else slice(None)
        t = {}
        for j in (1, 2):
            t[f"hada_w{j}_a"] = rows[j][i][:, cols].clone()
            t[f"hada_w{j}_b"] = w.tensors[f"hada_w{j}_b"][cols].clone()
        out[m] = LycorisWeights(t, r if block else rank, w.scale)
    return out


def read_lycoris(path: Path, sd: dict[str, torch.Tensor], transformer: torch.nn.Module, kind: str,
                 adaptable: list[str]) -> dict[str, LycorisWeights]:
    """diffusers module name -> its LoKr/LoHa; `adaptable`: the module names a file may adapt."""
    by_lycoris = {lycoris_name(n): n for n in adaptable}
    out: dict[str, LycorisWeights] = {}
    for stem, t in _stems(sd, kind).items():
        if is_text_encoder_layer(stem):  # `fluxlora.lora.text_encoder` refuses (or drops) these
            continue
        w = _lokr(path, stem, t) if kind == "lokr" else _loha(stem, t)
        if stem.startswith(LYCORIS_PREFIX) and stem in by_lycoris:
            out[by_lycoris[stem]] = w
        elif stem.startswith("transformer.") and stem[len("transformer."):] in adaptable:
            out[stem[len("transformer."):]] = w
        elif (modules := kohya_parts(stem)) is not None:
            if len(modules) == 1:
                out[modules[0]] = w
            elif kind == "lokr":
                raise FluxLoraError(f"{path}: LoKr on the fused layer {stem} cannot be split into diffusers' "
                                    f"separate q/k/v Linears exactly; fluxlora cannot continue it")
            else:
                sizes = [transformer.get_submodule(m).out_features for m in modules]
                if w.tensors["hada_w1_a"].shape[0] != sum(sizes):
                    raise FluxLoraError(f"{path}: {stem} has {w.tensors['hada_w1_a'].shape[0]} output rows; "
                                        f"this model's layer has {sum(sizes)}")
                out.update(_split_loha(w, modules, sizes))
        else:
            raise FluxLoraError(f"{path}: {kind} layer {stem} is not a Flux block or embedder layer fluxlora can train")
    return out


def check_shapes(path: Path, layers: dict, weights: dict[str, LycorisWeights]) -> None:
    """The injected peft layers hold exactly the file's tensors (LoKr: the same factorization)."""
    from fluxlora.lora.adapters import layer_tensors

    for name, w in weights.items():
        have = {k: tuple(v.shape) for k, v in layer_tensors(layers[name]).items()}
        want = {k: tuple(v.shape) for k, v in w.tensors.items()}
        if have != want:
            raise FluxLoraError(f"{path}: {name} has {want}; with these settings peft builds {have} "
                                f"(another lora.lokr_factor, or another model size?)")
