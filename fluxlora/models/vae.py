"""Load Flux's VAE from a diffusers `vae/` folder or BFL's `ae.safetensors` (LDM key layout), offline.

The LDM -> diffusers key map is diffusers' own `convert_ldm_vae_checkpoint`, given a config that ships in the
package with widths read from the tensors; the inverse (for writing test files) is here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from fluxlora.errors import FluxLoraError
from fluxlora.models.bfl import shipped_config
from fluxlora.models.files import LoadTimer, assign_state, meta_model, read_header, read_tensors, stream_safetensors
from fluxlora.models.identify import describe_keys

_LDM_PREFIXES = ("first_stage_model.", "vae.")
_LDM_SIGN = "encoder.down.0.block.0.conv1.weight"
_DIFFUSERS_SIGN = "encoder.down_blocks.0.resnets.0.conv1.weight"


def _strip(keys: list[str]) -> tuple[str, dict[str, str]]:
    prefix = next((p for p in _LDM_PREFIXES if any(k.startswith(p) for k in keys)), "")
    return prefix, {k[len(prefix):]: k for k in keys if k.startswith(prefix)}


def vae_config(shapes: dict[str, tuple], stored: dict, path: Path) -> dict:
    """The AutoencoderKL config: Flux's shipped one, then what the file stores, then widths from the LDM tensors."""
    config = shipped_config("vae")
    config.update(stored)
    levels = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    if not levels or levels != list(range(len(levels))):
        raise FluxLoraError(f"{path}: VAE encoder levels {levels} are incomplete")
    layers = len({k.split(".")[4] for k in shapes if k.startswith("encoder.down.0.block.")})
    config.update(
        in_channels=shapes["encoder.conv_in.weight"][1], out_channels=shapes["decoder.conv_out.weight"][0],
        latent_channels=shapes["decoder.conv_in.weight"][1], layers_per_block=layers,
        block_out_channels=[shapes[f"encoder.down.{i}.block.{layers - 1}.conv2.weight"][0] for i in levels],
        down_block_types=["DownEncoderBlock2D"] * len(levels), up_block_types=["UpDecoderBlock2D"] * len(levels),
        use_quant_conv="quant_conv.weight" in shapes, use_post_quant_conv="post_quant_conv.weight" in shapes,
    )
    return config


def load_vae(source: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
    """A diffusers `AutoencoderKL` in eval mode, from a folder (`from_pretrained`, local files only) or a single
    file in LDM layout (`ae.safetensors`/`ae.sft`) or diffusers layout (with `fluxlora.config` in its header)."""
    from diffusers import AutoencoderKL

    source = Path(source)
    with LoadTimer("vae", source):
        if source.is_dir():
            try:
                return AutoencoderKL.from_pretrained(source, torch_dtype=dtype, local_files_only=True).to(device).eval()
            except (OSError, ValueError) as e:
                raise FluxLoraError(f"VAE folder {source} could not be loaded: {str(e).splitlines()[0]}") from e
        header = read_header(source)
        prefix, names = _strip(list(header.shapes))
        shapes = {k: header.shapes[v] for k, v in names.items()}
        if _DIFFUSERS_SIGN in shapes and header.config():
            config, convert = header.config(), None
        elif _LDM_SIGN in shapes:
            config = vae_config(shapes, header.config(), source)
            from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint as convert
        else:
            raise FluxLoraError(f"{source} is not a Flux VAE (no {_LDM_SIGN}); it looks like "
                                f"{describe_keys(header.shapes)}")
        state = {k[len(prefix):]: t.to(dtype) for k, t in read_tensors(source, names.values(), device)}
        if convert is not None:
            state = convert(state, config)
        model = meta_model(lambda: AutoencoderKL(**config))
        return assign_state(model, state, source, "VAE", device)


def diffusers_vae_to_ldm(state: dict[str, torch.Tensor], config: dict) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL keys -> BFL/LDM keys (as in `ae.safetensors`); attention weights become 1x1 convs."""
    n = len(config["block_out_channels"])
    rules = [
        (r"^(encoder|decoder)\.conv_norm_out\.", r"\1.norm_out."),
        (r"^encoder\.down_blocks\.(\d+)\.resnets\.(\d+)\.", r"encoder.down.\1.block.\2."),
        (r"^encoder\.down_blocks\.(\d+)\.downsamplers\.0\.", r"encoder.down.\1.downsample."),
        (r"^decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.block.{m[2]}."),
        (r"^decoder\.up_blocks\.(\d+)\.upsamplers\.0\.", lambda m: f"decoder.up.{n - 1 - int(m[1])}.upsample."),
        (r"^(encoder|decoder)\.mid_block\.resnets\.(\d+)\.", lambda m: f"{m[1]}.mid.block_{int(m[2]) + 1}."),
        (r"^(encoder|decoder)\.mid_block\.attentions\.0\.", r"\1.mid.attn_1."),
        (r"\.conv_shortcut\.", ".nin_shortcut."),
        (r"attn_1\.group_norm\.", "attn_1.norm."), (r"attn_1\.to_([qkv])\.", r"attn_1.\1."),
        (r"attn_1\.to_out\.0\.", "attn_1.proj_out."),
    ]
    out = {}
    for key, t in state.items():
        for pattern, repl in rules:
            key = re.sub(pattern, repl, key)
        if ".mid.attn_1." in key and key.endswith(".weight") and t.ndim == 2:
            t = t[:, :, None, None]
        out[key] = t
    return out


def save_ldm_vae(path: str | Path, vae, dtype: torch.dtype | None = None, store_config: bool = True) -> None:
    """Write a diffusers AutoencoderKL as a BFL/LDM-layout single file (`ae.safetensors`)."""
    config = {k: v for k, v in dict(vae.config).items() if not k.startswith("_")}
    state = diffusers_vae_to_ldm(vae.state_dict(), config)
    meta = {"format": "pt"} | ({"fluxlora.config": json.dumps(config)} if store_config else {})
    stream_safetensors(Path(path), {k: tuple(v.shape) for k, v in state.items()},
                       dtype or (lambda k: state[k].dtype), state.__getitem__, meta)
