"""The LoRA file's safetensors header: every key sd-scripts writes for a Flux LoRA, as sd-scripts formats it.

Where the keys come from (kohya-ss/sd-scripts):

- `ss_*`: train_network.py's `metadata` dict (the dataset keys of its `--train_data_dir` branch, which has
  `ss_resolution`), flux_train_network.py's `update_metadata` (`ss_model_type` … `ss_discrete_flow_shift`), and
  `save_model` (`ss_training_finished_at`, `ss_steps`, `ss_epoch`). sd-scripts stores every value as `str(value)`
  ("None", "False", "1.0"); a few are JSON (`ss_network_args`, `ss_dataset_dirs`, `ss_tag_frequency`, …).
- `modelspec.*`: library/sai_model_spec.py `build_metadata` (ModelSpec 1.0.1): architecture `flux-1-dev/lora` or
  `flux-1-schnell/lora`, implementation the BFL repo, title, `resolution` "WxH", `date` (ISO 8601, seconds),
  `implementation_version` (sd-scripts writes `sd-scripts/<commit>`; we write `fluxlora/<version>`).
- `sshs_model_hash` / `sshs_legacy_hash`: networks/lora_flux.py `save_weights` calls library/train_util.py
  `precalculate_safetensors_hashes(state_dict, metadata)`: the file serialized with only its `ss_*` keys, then
  `addnet_hash_safetensors` (sha256 of everything after the header: the tensor payload) and `addnet_hash_legacy`
  (first 8 hex of the sha256 of the 64 KiB at offset 1 MiB of that serialization). They are computed by
  `file_metadata` from the very tensors written, just before the file is serialized.

Values fluxlora does not have are written as sd-scripts writes them when the feature is off (its argparse defaults),
never made up; counts sd-scripts derives (batches per epoch, epochs, total batch) are derived the same way from the
run record, and any of them can be given in `info` by name.

`ss_network_dim` / `ss_network_alpha` describe the layers in the file, not `lora.rank`: sd-scripts writes one dim per
network, and loaders (sd-scripts' `create_network_from_weights`, ComfyUI) read each layer's rank from its
`lora_down` and its scale from its `.alpha` tensor, never from the header. A fluxlora file has layers of several ranks
(fused q/k/v(/mlp) layers are rank n·r, block-diagonal, alpha n·α; a continued file keeps its own ranks), so the
header names the most common (rank, alpha) of its layers, as sd-scripts' split_qkv export does (its fused qkv layers
are 3r, its `ss_network_dim` r). Each layer's own rank and alpha are in its tensors, alpha/rank = the scale trained.

`ss_network_args` likewise follows the file (`file_network_args`): `in_dims` when it holds embedder layers,
`train_t5xxl` when it holds T5 (`lora_te3_`) layers, as sd-scripts writes them for a network that has them; the
frozen text-encoder layers of `lora.init_from` count among the layers for `ss_network_dim` / `ss_network_alpha`.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import math
import random
import time
from collections import Counter
from typing import Any, Optional

import torch
from safetensors.torch import save

from fluxlora import __version__
from fluxlora.lora.inject import ADAPTER, LoraSettings, lora_layers
from fluxlora.lora.keys import IN_DIMS, embedder_group

NETWORK_MODULE = "networks.lora_flux"
"""sd-scripts' Flux LoRA network module: what `ss_network_module` names for a plain LoRA."""

SAI_MODEL_SPEC = "1.0.1"
IMPLEMENTATION = "https://github.com/black-forest-labs/flux"  # sai_model_spec.IMPL_FLUX
CHROMA_IMPLEMENTATION = "https://huggingface.co/lodestones/Chroma"  # sai_model_spec.IMPL_CHROMA

_SESSION_ID = random.randint(0, 2**32)  # sd-scripts: one random id per training process
_STARTED_AT = time.time()

# sd-scripts' value when the feature is off (its argparse default, formatted by str()), in train_network.py's order.
# Keys whose value fluxlora has come from `info` (the run record) under the same name.
SS_DEFAULTS: dict[str, Any] = {
    "ss_text_encoder_lr": None, "ss_unet_lr": None,
    "ss_num_validation_images": 0, "ss_num_reg_images": 0,
    "ss_gradient_checkpointing": False, "ss_gradient_accumulation_steps": 1,
    "ss_lr_warmup_steps": 0, "ss_lr_scheduler": "constant",
    "ss_mixed_precision": "no", "ss_full_fp16": False, "ss_v2": False, "ss_base_model_version": "flux1",
    "ss_clip_skip": None, "ss_max_token_length": None, "ss_cache_latents": False, "ss_seed": None,
    "ss_lowram": False, "ss_noise_offset": None, "ss_multires_noise_iterations": None,
    "ss_multires_noise_discount": 0.3, "ss_adaptive_noise_scale": None, "ss_zero_terminal_snr": False,
    "ss_training_comment": None, "ss_sd_scripts_commit_hash": "(unknown)", "ss_max_grad_norm": 1.0,
    "ss_caption_dropout_rate": 0.0, "ss_caption_dropout_every_n_epochs": 0, "ss_caption_tag_dropout_rate": 0.0,
    "ss_face_crop_aug_range": None, "ss_prior_loss_weight": 1.0, "ss_min_snr_gamma": None,
    "ss_scale_weight_norms": None, "ss_ip_noise_gamma": None, "ss_debiased_estimation": False,
    "ss_noise_offset_random_strength": False, "ss_ip_noise_gamma_random_strength": False, "ss_loss_type": "l2",
    "ss_huber_schedule": "snr", "ss_huber_scale": 1.0, "ss_huber_c": 0.1, "ss_fp8_base": False,
    "ss_fp8_base_unet": False, "ss_validation_seed": None, "ss_validation_split": 0.0,
    "ss_max_validation_steps": None, "ss_validate_every_n_epochs": None, "ss_validate_every_n_steps": None,
    "ss_resize_interpolation": None,
    # flux_train_network.py update_metadata
    "ss_model_type": "flux", "ss_apply_t5_attn_mask": False, "ss_weighting_scheme": "uniform",
    "ss_logit_mean": 0.0, "ss_logit_std": 1.0, "ss_mode_scale": 1.29, "ss_guidance_scale": 3.5,
    "ss_timestep_sampling": "sigma", "ss_sigmoid_scale": 1.0, "ss_model_prediction_type": "sigma_scaled",
    "ss_discrete_flow_shift": 3.0,
    # the --train_data_dir branch's dataset keys
    "ss_color_aug": False, "ss_flip_aug": False, "ss_random_crop": False, "ss_shuffle_caption": False,
    "ss_enable_bucket": False, "ss_bucket_no_upscale": False, "ss_min_bucket_reso": 256, "ss_max_bucket_reso": 1024,
    "ss_keep_tokens": 0, "ss_dataset_dirs": {}, "ss_reg_dataset_dirs": {}, "ss_tag_frequency": {},
    "ss_bucket_info": None,
}
_JSON_KEYS = {"ss_network_args", "ss_dataset_dirs", "ss_reg_dataset_dirs", "ss_tag_frequency", "ss_bucket_info"}
"""sd-scripts writes these with json.dumps (so None is "null"), every other value with str()."""

_RENAMED = {"batch_size": "batch_size_per_device"}
"""Run-record names that differ from sd-scripts' key."""
_NOT_SS = ("name", "guidance", "rank", "alpha", "train_blocks")
"""Run-record entries that are not `ss_<name>`: the modelspec title and architecture, the network keys."""


def format_value(value: Any) -> str:
    """A header value as sd-scripts writes it: strings as they are, scalars by str() ("None", "True", "0.05"),
    lists and dicts as JSON (sd-scripts has no such scalar keys; JSON is what a reader can parse back)."""
    if isinstance(value, str):
        return value
    if value is None or isinstance(value, (bool, int, float)):
        return str(value)
    return json.dumps(value)


def modelspec_resolution(resolution: Any) -> str:
    """sai_model_spec.determine_resolution: "W x H" without spaces; int r is r×r, none is Flux's 1024×1024."""
    if resolution is None:
        return "1024x1024"
    if isinstance(resolution, str):
        resolution = [int(r) for r in resolution.replace("x", ",").split(",")]
    if isinstance(resolution, (int, float)):
        resolution = [int(resolution)]
    resolution = list(resolution)
    if len(resolution) == 1:
        resolution = resolution * 2
    return f"{int(resolution[0])}x{int(resolution[1])}"


def network_module_args(settings: LoraSettings) -> tuple[str, dict[str, str]]:
    """(ss_network_module, ss_network_args) as sd-scripts writes them for this type: its own Flux LoRA module for
    plain LoRA; LyCORIS's kohya module for the rest (sd-scripts' lora_flux has no DoRA), with LyCORIS's argument
    names and sd-scripts' string values."""
    if settings.type == "lora":
        return NETWORK_MODULE, {"train_blocks": settings.train_blocks}
    if settings.type == "dora":
        return "lycoris.kohya", {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"}
    if settings.type == "lokr":
        return "lycoris.kohya", {"algo": "lokr", "factor": str(settings.lokr_factor)}
    return "lycoris.kohya", {"algo": "loha"}


def training_metadata(settings: LoraSettings, info: dict, network_module: Optional[str] = None,
                      network_args: Optional[dict] = None, now: Optional[float] = None) -> dict[str, str]:
    """The header of one save, every value a string. `info`: the run record (`run.build.run_record`) plus the
    saver's name/guidance/steps/epoch; entries matching an sd-scripts key override its off value, others are written
    as `ss_<name>`. `network_module` / `network_args`: override the adapter type's sd-scripts names
    (`network_module_args`). `ss_network_dim`/`alpha` here are the settings'; `file_metadata` replaces them with the file's."""
    now = time.time() if now is None else now
    own_module, own_args = network_module_args(settings)
    network_module = network_module if network_module is not None else own_module
    network_args = network_args if network_args is not None else own_args
    record = {_RENAMED.get(k, k): v for k, v in info.items() if k not in _NOT_SS}
    name = str(info.get("name", "fluxlora"))
    batch = int(record.get("batch_size_per_device", 1))
    images = record.get("num_train_images")
    steps = record.get("max_train_steps")
    accumulation = int(record.get("gradient_accumulation_steps", SS_DEFAULTS["ss_gradient_accumulation_steps"]))
    derived: dict[str, Any] = {"batch_size_per_device": batch, "total_batch_size": batch * accumulation}
    if images is not None:  # what sd-scripts' dataloader has without buckets, and its epoch count from max steps
        derived["num_batches_per_epoch"] = math.ceil(int(images) / batch)
        if steps is not None:
            derived["num_epochs"] = math.ceil(int(steps) / math.ceil(derived["num_batches_per_epoch"] / accumulation))
    values: dict[str, Any] = {
        "ss_session_id": _SESSION_ID, "ss_training_started_at": _STARTED_AT, "ss_output_name": name,
        "ss_learning_rate": None, "ss_num_train_images": None, "ss_num_batches_per_epoch": None,
        "ss_num_epochs": None, "ss_max_train_steps": None,
        "ss_network_module": network_module, "ss_network_dim": settings.rank, "ss_network_alpha": float(settings.alpha),
        "ss_network_dropout": settings.dropout, "ss_optimizer": None,
        **SS_DEFAULTS,
        "ss_batch_size_per_device": None, "ss_total_batch_size": None, "ss_resolution": None,
        "ss_network_args": network_args,
        "ss_training_finished_at": now, "ss_steps": None, "ss_epoch": None,
    }
    values.update({f"ss_{k}": v for k, v in derived.items()})
    values.update({f"ss_{k}": v for k, v in record.items()})
    chroma = record.get("model_type") == "chroma"  # sd-scripts' --model_type=chroma header values
    if chroma:
        values["ss_base_model_version"] = "chroma"
    meta = {k: (json.dumps(v) if k in _JSON_KEYS else format_value(v)) for k, v in values.items()}
    arch = "chroma" if chroma else "flux-1-dev" if info.get("guidance", True) else "flux-1-schnell"
    meta.update({
        "modelspec.sai_model_spec": SAI_MODEL_SPEC,
        "modelspec.architecture": f"{arch}/lora",
        "modelspec.implementation": CHROMA_IMPLEMENTATION if chroma else IMPLEMENTATION,
        "modelspec.title": name,
        "modelspec.resolution": modelspec_resolution(info.get("resolution")),
        "modelspec.date": datetime.datetime.fromtimestamp(int(now)).isoformat(),
        "modelspec.implementation_version": f"fluxlora/{__version__}",
    })
    return meta


# ---------------------------------------------------------------------------------------------- the file's layers


def trained_scales(transformer: torch.nn.Module, prefix: str = "transformer.") -> dict[str, float]:
    """alpha/rank each adapted module trained with, keyed as the diffusers file names it (`transformer.<module>`):
    that file bakes the scale into lora_B and has no `.alpha`, so its header's alpha comes from here."""
    return {f"{prefix}{name}": float(layer.scaling[ADAPTER]) for name, layer in lora_layers(transformer).items()}


def layer_shapes(tensors: dict[str, torch.Tensor], scales: Optional[dict[str, float]] = None
                 ) -> dict[str, tuple[int, float]]:
    """Each LoRA layer of a state dict -> (rank, alpha), read as loaders read them: the rank is `lora_down`'s
    (`lora_A`'s) rows, alpha the layer's `.alpha` tensor; without one, rank·scales[layer] (a diffusers file of
    ours, scale baked into lora_B), else alpha = rank (what sd-scripts and ComfyUI assume)."""
    out = {}
    for key, t in tensors.items():
        for suffix in (".lora_down.weight", ".lora_A.weight"):
            if key.endswith(suffix):
                stem = key[:-len(suffix)]
                rank = int(t.shape[0])
                if f"{stem}.alpha" in tensors:
                    alpha = float(tensors[f"{stem}.alpha"])
                elif scales is not None and stem in scales:
                    alpha = rank * scales[stem]
                else:
                    alpha = float(rank)
                out[stem] = (rank, alpha)
    return out


def network_dim_alpha(layers: dict[str, tuple[int, float]]) -> Optional[tuple[int, float]]:
    """The network's (dim, alpha) for the header: the most common rank among the layers (ties: the larger), and the
    most common alpha among the layers of that rank (ties: the larger). None when there are no LoRA layers."""
    if not layers:
        return None
    ranks = Counter(r for r, _ in layers.values())
    dim = max(ranks, key=lambda r: (ranks[r], r))
    alphas = Counter(a for r, a in layers.values() if r == dim)
    return dim, max(alphas, key=lambda a: (alphas[a], a))


def file_network_args(args: dict, tensors: dict[str, torch.Tensor],
                      layers: Optional[dict[str, tuple[int, float]]] = None) -> dict:
    """sd-scripts' network args completed for the layers a file holds (its lora_flux reads them back so): `in_dims`
    "[img, time, vector, guidance, txt]" (each embedder's rank, 0 where the file has none) when it has embedder
    layers, and `train_t5xxl` "True" when it has T5 (`lora_te3_`) layers; absent otherwise."""
    layers = layer_shapes(tensors) if layers is None else layers
    out = {k: v for k, v in args.items() if k not in ("in_dims", "train_t5xxl")}
    dims = dict.fromkeys(IN_DIMS, 0)
    stems = {k.split(".", 1)[0] for k in tensors}
    for stem in stems:
        group = embedder_group(stem)
        if group is not None:
            dims[group] = max(dims[group], layers.get(stem, (0, 0.0))[0])
    if any(dims.values()):
        out["in_dims"] = "[" + ",".join(str(dims[g]) for g in IN_DIMS) + "]"
    if any(s.startswith("lora_te3_") for s in stems):
        out["train_t5xxl"] = "True"
    return out


# ---------------------------------------------------------------------------------------------- hashes


def safetensors_hashes(tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) as sd-scripts' train_util.precalculate_safetensors_hashes computes them:
    the tensors serialized with only the `ss_*` metadata; sha256 of what follows the header, and the first 8 hex
    digits of the sha256 of bytes [1 MiB, 1 MiB + 64 KiB) of that serialization (empty for a file under 1 MiB)."""
    data = save(tensors, metadata={k: v for k, v in meta.items() if k.startswith("ss_")})
    header = int.from_bytes(data[:8], "little")
    model = hashlib.sha256(memoryview(data)[8 + header:]).hexdigest()
    legacy = hashlib.sha256(memoryview(data)[0x100000:0x110000]).hexdigest()[:8]
    return model, legacy


def file_metadata(meta: dict[str, str], tensors: dict[str, torch.Tensor],
                  scales: Optional[dict[str, float]] = None) -> dict[str, str]:
    """`meta` completed for the file holding exactly `tensors`: `ss_network_dim`/`alpha` from its layers (kept
    when it has no lora_down/lora_A layers, e.g. another adapter type), then the `sshs_*` hashes of those tensors."""
    out = {k: v for k, v in meta.items() if not k.startswith("sshs_")}
    layers = layer_shapes(tensors, scales)
    shape = network_dim_alpha(layers)
    if shape is not None:
        out["ss_network_dim"], out["ss_network_alpha"] = str(shape[0]), str(float(shape[1]))
    if out.get("ss_network_module") == NETWORK_MODULE and "ss_network_args" in out:
        args = json.loads(out["ss_network_args"]) or {}
        out["ss_network_args"] = json.dumps(file_network_args(args, tensors, layers))
    out["sshs_model_hash"], out["sshs_legacy_hash"] = safetensors_hashes(tensors, out)
    return out
