"""Load the Flux transformer from a BFL single file or a diffusers `transformer/` folder, built on the meta device
with each tensor assigned in the dtype it will be kept in (fp8 for the frozen Linears when the tier stores fp8)."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from pathlib import Path

import torch

from fluxlora.errors import FluxLoraError
from fluxlora.perf.fp8 import fp8_stored_parameters
from fluxlora.perf.memory import STORAGE
from fluxlora.models import bfl
from fluxlora.models.files import LoadTimer, assign_state, meta_model, read_header, read_tensors

log = logging.getLogger(__name__)


def _dtype_plan(model: torch.nn.Module, dtype: torch.dtype, storage: str) -> Callable[[str], torch.dtype]:
    """name -> dtype to keep it in: fp8 for the block Linears' weights (`fluxlora.perf.fp8`), `dtype` for the rest
    (biases, norms, embedders), so fp8 files are upcast only where the model computes in full precision.
    `nf4` reads everything in `dtype`: the blocks are quantized afterwards (`fluxlora.perf.nf4`)."""
    if storage not in STORAGE:
        raise ValueError(f"storage={storage!r} is not one of {STORAGE}")
    fp8 = fp8_stored_parameters(model) if storage == "fp8" else set()
    return lambda name: torch.float8_e4m3fn if name in fp8 else dtype


def _own(kept: torch.Tensor, read: torch.Tensor) -> torch.Tensor:
    """`kept` in memory of its own: a tensor kept as read (a bias, a norm) is a view of safetensors' mapping of the
    whole file, and would keep that mapping, with every page read through it, in the process's RSS."""
    same = kept.device.type == "cpu" and kept.untyped_storage().data_ptr() == read.untyped_storage().data_ptr()
    return kept.clone() if same else kept


def inspect_transformer(source: Path) -> dict:
    """The diffusers config of the transformer at `source` (file or folder), from headers only: fast, fails early."""
    source = Path(source)
    if source.is_dir():
        cfg = source / "config.json"
        if not cfg.is_file():
            raise FluxLoraError(f"transformer folder {source} has no config.json")
        return {k: v for k, v in json.loads(cfg.read_text()).items() if not k.startswith("_")}
    return bfl.inspect_bfl(read_header(source)).config


def load_transformer(source: str | Path, dtype: torch.dtype = torch.bfloat16, storage: str = "none",
                     device: str | torch.device = "cpu") -> torch.nn.Module:
    """A diffusers `FluxTransformer2DModel` in eval mode.

    Args:
        source: a BFL single file (`flux1-dev.safetensors`/`.sft`, bf16/fp16/fp8, with or without the
            `model.diffusion_model.` prefix) or a diffusers `transformer/` folder (config.json + safetensors shards).
        dtype: the compute dtype: every tensor that is not fp8-stored ends up in it.
        storage: `fp8` keeps the frozen Linear weights in float8_e4m3fn exactly as `memory.base_storage=fp8` would;
            `nf4` reads them in `dtype` (quantized later by `apply_memory_settings`).
        device: where tensors are read to (`cuda` loads straight onto the GPU).
    """
    from diffusers import FluxTransformer2DModel

    return read_transformer(source, FluxTransformer2DModel, bfl.inspect_bfl, bfl.bfl_to_diffusers_tensor, dtype,
                            storage, device)


def read_transformer(source: str | Path, model_cls: type, inspect_file: Callable, convert: Callable,
                     dtype: torch.dtype, storage: str, device: str | torch.device, label: str = "transformer",
                     what: str = "Flux transformer") -> torch.nn.Module:
    """A BFL-family transformer (FLUX.1, Chroma) of `model_cls`, from a diffusers folder or a BFL single file
    (`inspect_file` reads its layout from the header, `convert` turns one BFL tensor into diffusers' tensors), built
    on the meta device with each tensor read once into the dtype it is kept in; `label`/`what` name it in logs."""
    source = Path(source)
    with LoadTimer(label, source):
        state = {}
        if source.is_dir():
            config = inspect_transformer(source)
            files = sorted(p for p in source.glob("*.safetensors") if not p.name.startswith("."))
            if not files:
                raise FluxLoraError(f"transformer folder {source} holds no .safetensors weights")
            model = meta_model(lambda: model_cls(**config))
            plan = _dtype_plan(model, dtype, storage)
            for f in files:
                state.update((k, _own(t.to(plan(k)), t)) for k, t in read_tensors(f, read_header(f).shapes, device))
        else:
            layout = inspect_file(read_header(source))
            log.info("%s: %s, %d double + %d single blocks, stored as %s", source.name, layout.variant,
                     layout.config["num_layers"], layout.config["num_single_layers"], "/".join(sorted(layout.dtypes)))
            model = meta_model(lambda: model_cls(**layout.config))
            plan = _dtype_plan(model, dtype, storage)
            for key, t in read_tensors(source, layout.keys, device):
                for name, part in convert(key[len(layout.prefix):], t, layout.hidden):
                    state[name] = _own(part.to(plan(name)), t)
                del t
        return assign_state(model, state, source, what, device)
