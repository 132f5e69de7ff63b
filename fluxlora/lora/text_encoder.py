"""Text-encoder LoRA layers of `lora.init_from`: sd-scripts' `lora_te1_*` (CLIP-L) and `lora_te3_*` (T5-XXL).

fluxlora trains the transformer only, on cached text outputs; a file's text-encoder layers are kept frozen
(`lora.text_encoder_lora: keep`, the default) or left out (`drop`, which logs what is dropped):

- **applied**: each layer is a forward hook on its encoder Linear adding `scale·up(down(x))` (sd-scripts' LoRAModule
  forward at multiplier 1), installed when the encoder is read (`FluxComponents.encoder`), so the caption cache and
  the sample prompts hold what the encoder with its LoRA gives. The cache's content key includes a hash of the
  layers (`TextEncoderLora.identity`), so entries cached without them (or with others) are not reused.
- **written back unchanged**: the file's own tensors (lora_down, lora_up, alpha), bit for bit and in their dtype, go
  into every kohya file the run saves (`kept_tensors`); the diffusers-keyed file holds the transformer only.

Only plain LoRA layers in sd-scripts' kohya keys are applied; other text-encoder layers (diffusers/peft keys,
LyCORIS, DoRA) are refused in one line that names `lora.text_encoder_lora=drop`. Training them
(`lora.train_text_encoder`) is not supported yet: it would turn off caching of that encoder's outputs.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from fluxlora.errors import FluxLoraError
from fluxlora.lora.keys import TEXT_ENCODERS, is_text_encoder_layer, text_encoder_slot

log = logging.getLogger(__name__)

_NAMES = {"text_encoder": "CLIP-L", "text_encoder_2": "T5"}
_LORA_LEAVES = ("lora_down.weight", "lora_up.weight", "alpha")


@dataclass
class TextEncoderLayer:
    """One text-encoder LoRA as the file holds it."""

    part: str
    """'text_encoder' (CLIP-L) or 'text_encoder_2' (T5)."""
    module: str
    """The transformers module it adapts (`text_model.encoder.layers.0.self_attn.q_proj`)."""
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    """alpha / rank (alpha = rank where the file has no `.alpha`, as sd-scripts reads it)."""

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """scale·up(down(x)) in x's dtype: what sd-scripts' LoRAModule adds to the Linear's output."""
        down = self.down.to(device=x.device, dtype=x.dtype)
        up = self.up.to(device=x.device, dtype=x.dtype)
        return F.linear(F.linear(x, down), up) * self.scale


@dataclass
class TextEncoderLora:
    """The text-encoder layers of one LoRA file."""

    path: Path
    layers: dict[str, TextEncoderLayer]
    """kohya layer name -> layer."""
    tensors: dict[str, torch.Tensor]
    """The file's own tensors of these layers, as stored (written back unchanged)."""
    _hooks: list = field(default_factory=list, repr=False)

    def parts(self) -> list[str]:
        return sorted({layer.part for layer in self.layers.values()})

    def count(self, part: str) -> int:
        return sum(layer.part == part for layer in self.layers.values())

    def identity(self) -> str:
        """sha256 of the layers' names and tensor bytes: the caches' content key changes with it."""
        h = hashlib.sha256()
        for key in sorted(self.tensors):
            t = self.tensors[key].detach().cpu().contiguous().reshape(-1)
            h.update(key.encode())
            h.update(str(t.dtype).encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        return h.hexdigest()

    def summary(self) -> str:
        return ", ".join(f"{_NAMES[p]} {self.count(p)}" for p in self.parts())

    def apply(self, part: str, encoder: torch.nn.Module) -> int:
        """Hook this file's layers of `part` onto `encoder`'s Linears; returns how many. A layer naming a module the
        encoder lacks, or of another shape, is one line naming it."""
        n = 0
        for stem, layer in self.layers.items():
            if layer.part != part:
                continue
            module = _submodule(encoder, layer.module)
            out_f, in_f = getattr(module, "out_features", None), getattr(module, "in_features", None)
            if module is None or out_f is None:
                raise FluxLoraError(f"{self.path}: text-encoder layer {stem} adapts {layer.module}, which this "
                                    f"{_NAMES[part]} has no Linear for; set lora.text_encoder_lora=drop to leave it out")
            if layer.down.shape[1] != in_f or layer.up.shape[0] != out_f:
                raise FluxLoraError(f"{self.path}: text-encoder layer {stem} has shapes {tuple(layer.down.shape)}/"
                                    f"{tuple(layer.up.shape)}; {layer.module} is {out_f}×{in_f} (another encoder?)")
            self._hooks.append(module.register_forward_hook(_hook(layer)))
            n += 1
        return n


def _submodule(encoder: torch.nn.Module, name: str) -> torch.nn.Module | None:
    """`name` in `encoder`; sd-scripts names CLIP-L's modules under `text_model.`, which transformers 5's
    CLIPTextModel no longer has (its layers are `encoder.layers.N`), so that prefix may be absent."""
    for candidate in dict.fromkeys((name, name.removeprefix("text_model."))):
        try:
            return encoder.get_submodule(candidate)
        except AttributeError:
            continue
    return None


def _hook(layer: TextEncoderLayer):
    def add_lora(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + layer.delta(args[0]).to(output.dtype)

    return add_lora


def text_encoder_keys(keys: list[str]) -> list[str]:
    """The keys of a LoRA file that belong to text-encoder layers (any key style)."""
    return [k for k in keys if is_text_encoder_layer(k)]


def read_text_encoder_lora(path: str | Path, mode: str = "keep") -> TextEncoderLora | None:
    """The text-encoder layers of LoRA file `path` for `lora.text_encoder_lora=mode`: None when it has none or
    `mode` is drop (then the log names what is left out); with keep, layers fluxlora cannot apply are one line."""
    from safetensors import safe_open

    from fluxlora.models.files import read_header

    path = Path(path).expanduser()
    keys = text_encoder_keys(list(read_header(path).shapes))
    if not keys:
        return None
    stems = sorted({k.split(".", 1)[0] for k in keys})
    if mode == "drop":
        counts = Counter(_NAMES.get(TEXT_ENCODERS.get(s[:8], ""), "other") for s in stems)
        log.warning("lora.text_encoder_lora=drop: %d text-encoder LoRA layers of %s dropped (%s): %s%s", len(stems),
                    path, ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), ", ".join(stems[:8]),
                    f", ... ({len(stems) - 8} more)" if len(stems) > 8 else "")
        return None
    odd = [k for k in keys if k.split(".", 1)[1] not in _LORA_LEAVES]
    if odd:
        raise FluxLoraError(f"{path}: text-encoder layer {odd[0]} is not a plain sd-scripts LoRA (lora_down/lora_up/"
                            "alpha); fluxlora cannot apply it: set lora.text_encoder_lora=drop to leave the "
                            "text-encoder layers out")
    layers, tensors = {}, {}
    with safe_open(str(path), framework="pt") as f:
        for stem in stems:
            slot = text_encoder_slot(stem)
            if slot is None:
                raise FluxLoraError(f"{path}: text-encoder layer {stem} is not a CLIP-L (lora_te1_) or T5 (lora_te3_) "
                                    "layer sd-scripts writes; set lora.text_encoder_lora=drop to leave it out")
            own = {leaf: f.get_tensor(f"{stem}.{leaf}") for leaf in _LORA_LEAVES if f"{stem}.{leaf}" in keys}
            if "lora_down.weight" not in own or "lora_up.weight" not in own:
                raise FluxLoraError(f"{path}: {stem} lacks {stem}.lora_down.weight or {stem}.lora_up.weight")
            down, up = own["lora_down.weight"].float(), own["lora_up.weight"].float()
            if down.dim() != 2 or up.dim() != 2 or up.shape[1] != down.shape[0]:
                raise FluxLoraError(f"{path}: {stem} has shapes {tuple(down.shape)}/{tuple(up.shape)}, not a Linear "
                                    "LoRA")
            alpha = float(own["alpha"]) if "alpha" in own else float(down.shape[0])
            layers[stem] = TextEncoderLayer(slot[0], slot[1], down, up, alpha / down.shape[0])
            tensors.update({f"{stem}.{leaf}": t for leaf, t in own.items()})
    return TextEncoderLora(path, layers, tensors)
