"""fluxlora.lora.header: the LoRA file's header holds every key sd-scripts writes for a Flux LoRA, the sshs_* hashes
sd-scripts computes, and a network dim/alpha true to the file's layers.

The expected keys, their types and the hash algorithm are written here from reading sd-scripts (kohya-ss/sd-scripts),
not from fluxlora.lora.header, so the two are checked against each other.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import re
from collections import Counter
from io import BytesIO
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
import safetensors.torch

from fluxlora.callbacks.lora_saver import LoRASaver
from fluxlora.lora.export import kohya_state_dict
from fluxlora.lora.header import network_dim_alpha, training_metadata
from fluxlora.lora.init_from import inject_and_load
from fluxlora.lora.inject import ADAPTER, LoraSettings, inject, lora_layers
from helpers.model_layouts import sd_scripts_lora, tiny_transformer

RANK, ALPHA = 4, 2.0

# --------------------------------------------------------------------------------- the keys sd-scripts writes


def _int(v):
    return int(v) == float(v)


def _float(v):
    return isinstance(float(v), float)


def _bool(v):
    return v in ("True", "False")


def _str(v):
    return isinstance(v, str) and v != ""


def _json(v):
    json.loads(v)
    return True


def _opt(check):
    """sd-scripts writes str(None) == "None" for an unset option."""
    return lambda v: v == "None" or check(v)


# train_network.py, `metadata = {...}` in NetworkTrainer.train (written as str(value); network dim/alpha/dropout,
# optimizer, learning rate and the like), in its order
SS_TRAIN_NETWORK = {
    "ss_session_id": _int, "ss_training_started_at": _float, "ss_output_name": _str, "ss_learning_rate": _float,
    "ss_text_encoder_lr": _opt(_float), "ss_unet_lr": _opt(_float), "ss_num_train_images": _int,
    "ss_num_validation_images": _int, "ss_num_reg_images": _int, "ss_num_batches_per_epoch": _int,
    "ss_num_epochs": _int, "ss_gradient_checkpointing": _bool, "ss_gradient_accumulation_steps": _int,
    "ss_max_train_steps": _int, "ss_lr_warmup_steps": _int, "ss_lr_scheduler": _str, "ss_network_module": _str,
    "ss_network_dim": _int, "ss_network_alpha": _float, "ss_network_dropout": _opt(_float),
    "ss_mixed_precision": _str, "ss_full_fp16": _bool, "ss_v2": _bool, "ss_base_model_version": _str,
    "ss_clip_skip": _opt(_int), "ss_max_token_length": _opt(_int), "ss_cache_latents": _bool, "ss_seed": _opt(_int),
    "ss_lowram": _bool, "ss_noise_offset": _opt(_float), "ss_multires_noise_iterations": _opt(_int),
    "ss_multires_noise_discount": _float, "ss_adaptive_noise_scale": _opt(_float), "ss_zero_terminal_snr": _bool,
    "ss_training_comment": _str, "ss_sd_scripts_commit_hash": _str, "ss_optimizer": _str,
    "ss_max_grad_norm": _float, "ss_caption_dropout_rate": _float, "ss_caption_dropout_every_n_epochs": _int,
    "ss_caption_tag_dropout_rate": _float, "ss_face_crop_aug_range": _str, "ss_prior_loss_weight": _float,
    "ss_min_snr_gamma": _opt(_float), "ss_scale_weight_norms": _opt(_float), "ss_ip_noise_gamma": _opt(_float),
    "ss_debiased_estimation": _bool, "ss_noise_offset_random_strength": _bool,
    "ss_ip_noise_gamma_random_strength": _bool, "ss_loss_type": _str, "ss_huber_schedule": _str,
    "ss_huber_scale": _float, "ss_huber_c": _float, "ss_fp8_base": _bool, "ss_fp8_base_unet": _bool,
    "ss_validation_seed": _opt(_int), "ss_validation_split": _float, "ss_max_validation_steps": _opt(_int),
    "ss_validate_every_n_epochs": _opt(_int), "ss_validate_every_n_steps": _opt(_int),
    "ss_resize_interpolation": _str,
    # train_network.py, the --train_data_dir (no dataset config) branch: metadata.update({...})
    "ss_batch_size_per_device": _int, "ss_total_batch_size": _int, "ss_resolution": _str, "ss_color_aug": _bool,
    "ss_flip_aug": _bool, "ss_random_crop": _bool, "ss_shuffle_caption": _bool, "ss_enable_bucket": _bool,
    "ss_bucket_no_upscale": _bool, "ss_min_bucket_reso": _int, "ss_max_bucket_reso": _int, "ss_keep_tokens": _int,
    "ss_dataset_dirs": _json, "ss_reg_dataset_dirs": _json, "ss_tag_frequency": _json, "ss_bucket_info": _json,
    # train_network.py: `if args.network_args` (json.dumps), the model name
    "ss_network_args": _json, "ss_sd_model_name": _str,
    # train_network.py save_model: at each save
    "ss_training_finished_at": _float, "ss_steps": _int, "ss_epoch": _int,
}
# flux_train_network.py FluxNetworkTrainer.update_metadata
SS_FLUX = {
    "ss_model_type": _str, "ss_apply_t5_attn_mask": _bool, "ss_weighting_scheme": _str, "ss_logit_mean": _float,
    "ss_logit_std": _float, "ss_mode_scale": _float, "ss_guidance_scale": _float, "ss_timestep_sampling": _str,
    "ss_sigmoid_scale": _float, "ss_model_prediction_type": _str, "ss_discrete_flow_shift": _float,
}
# library/sai_model_spec.py build_metadata for a Flux LoRA (flux="dev"/"schnell"): the MUST keys, date and
# implementation_version (set automatically); no prediction_type for Flux, the others only when given
MODELSPEC = {
    "modelspec.sai_model_spec": lambda v: v == "1.0.1",
    "modelspec.architecture": lambda v: v in ("flux-1-dev/lora", "flux-1-schnell/lora"),
    "modelspec.implementation": lambda v: v == "https://github.com/black-forest-labs/flux",
    "modelspec.title": _str,
    "modelspec.resolution": lambda v: re.fullmatch(r"\d+x\d+", v) is not None,
    "modelspec.date": lambda v: datetime.datetime.fromisoformat(v).microsecond == 0,
    "modelspec.implementation_version": _str,
}
# networks/lora_flux.py save_weights -> library/train_util.py precalculate_safetensors_hashes
SSHS = {"sshs_model_hash": lambda v: re.fullmatch(r"[0-9a-f]{64}", v) is not None,
        "sshs_legacy_hash": lambda v: re.fullmatch(r"[0-9a-f]{8}", v) is not None}

RUN_RECORD = {  # what fluxlora.run.build.run_record hands the saver, plus the model name added once it is loaded
    "rank": RANK, "alpha": ALPHA, "train_blocks": "all", "init_from": None, "optimizer": "adamw",
    "learning_rate": 1e-4, "lr_scheduler": "constant", "resolution": 512, "batch_size": 2,
    "timestep_sampling": "shift", "guidance_scale": 1.0, "base_storage": "bf16", "gradient_checkpointing": True,
    "seed": 42, "max_train_steps": 100, "num_train_images": 10, "output_name": "mychar",
    "sd_model_name": "flux1-dev.safetensors",
}


def _module(transformer, settings):
    return SimpleNamespace(transformer=transformer, has_guidance=True, lora_settings=settings)


def _trained(settings: LoraSettings):
    model = tiny_transformer()
    inject_and_load(model, settings)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            w = layer.lora_B[ADAPTER].weight
            w.copy_(torch.randn(w.shape, generator=g) * 0.1)
    return model


def _meta(path) -> dict[str, str]:
    with safe_open(str(path), framework="pt") as f:
        return f.metadata()


def test_every_sd_scripts_flux_key_is_written_with_its_type(tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA)
    saver = LoRASaver(str(tmp_path), "mychar", format="both", dtype="fp32", metadata=RUN_RECORD)
    trainer = SimpleNamespace(global_step=7, current_epoch=1)
    paths = saver.save(_module(_trained(settings), settings), "mychar", trainer)
    for path in paths:
        meta = _meta(path)
        assert all(isinstance(v, str) for v in meta.values())
        for table in (SS_TRAIN_NETWORK, SS_FLUX, MODELSPEC, SSHS):
            missing = [k for k in table if k not in meta]
            assert not missing, f"{path.name} lacks {missing}"
            bad = {k: meta[k] for k, check in table.items() if not check(meta[k])}
            assert not bad, f"{path.name}: wrong type {bad}"
        assert meta["ss_v2"] == "False" and meta["ss_base_model_version"] == "flux1"
        assert meta["modelspec.resolution"] == "512x512" and meta["modelspec.title"] == "mychar"
        assert meta["ss_steps"] == "7" and meta["ss_epoch"] == "1" and meta["ss_seed"] == "42"
        assert meta["ss_batch_size_per_device"] == "2" and meta["ss_num_batches_per_epoch"] == "5"
        assert meta["ss_num_epochs"] == "20" and meta["ss_gradient_checkpointing"] == "True"
        # off features read as sd-scripts writes them
        assert (meta["ss_clip_skip"], meta["ss_full_fp16"], meta["ss_text_encoder_lr"]) == ("None", "False", "None")


def test_header_takes_the_adapter_types_network_module_and_args():
    settings = LoraSettings(rank=8, alpha=4, train_blocks="double")
    plain = training_metadata(settings, {"name": "x"})
    assert plain["ss_network_module"] == "networks.lora_flux"
    assert json.loads(plain["ss_network_args"]) == {"train_blocks": "double"}
    other = training_metadata(settings, {"name": "x"}, network_module="lycoris.kohya",
                              network_args={"algo": "lokr", "factor": 4})
    assert other["ss_network_module"] == "lycoris.kohya"
    assert json.loads(other["ss_network_args"]) == {"algo": "lokr", "factor": 4}


# --------------------------------------------------------------------------------- sshs hashes


def _sd_scripts_hashes(path) -> tuple[str, str]:
    """sd-scripts' train_util.precalculate_safetensors_hashes over the tensors and `ss_*` metadata of a file, with
    its addnet_hash_safetensors and addnet_hash_legacy, re-implemented from its source."""
    tensors = load_file(str(path))
    metadata = {k: v for k, v in _meta(path).items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, metadata))
    # addnet_hash_safetensors
    model = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        model.update(chunk)
    # addnet_hash_legacy
    legacy = hashlib.sha256()
    b.seek(0x100000)
    legacy.update(b.read(0x10000))
    return model.hexdigest(), legacy.hexdigest()[0:8]


def _payload_sha256(path) -> str:
    """The ModelSpec reference (sai_model_spec.py): sha256 of everything after the file's own header."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        return hashlib.sha256(f.read()).hexdigest()


def test_hashes_of_a_saved_file_are_sd_scripts(tmp_path):
    settings = LoraSettings(rank=RANK, alpha=ALPHA)
    saver = LoRASaver(str(tmp_path), "small", format="both", dtype="bf16", metadata=RUN_RECORD)
    for path in saver.save(_module(_trained(settings), settings), "small", SimpleNamespace(global_step=1,
                                                                                            current_epoch=0)):
        meta = _meta(path)
        assert (meta["sshs_model_hash"], meta["sshs_legacy_hash"]) == _sd_scripts_hashes(path)
        assert meta["sshs_model_hash"] == _payload_sha256(path)


def test_hashes_of_a_file_over_one_mib_are_sd_scripts(tmp_path):
    """Past 1 MiB the legacy hash reads real bytes (under it, sd-scripts hashes nothing: e3b0c442)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i in range(3):
        stem = f"lora_unet_single_blocks_{i}_linear2"
        tensors[f"{stem}.lora_down.weight"] = torch.randn(16, 4096, generator=g)
        tensors[f"{stem}.lora_up.weight"] = torch.randn(3072, 16, generator=g)
        tensors[f"{stem}.alpha"] = torch.tensor(8.0)
    saver = LoRASaver(str(tmp_path), "big", dtype="fp32")
    meta = training_metadata(LoraSettings(rank=16, alpha=8), {"name": "big", **RUN_RECORD})
    path = saver._write(tensors, meta, "big.safetensors")
    assert path.stat().st_size > 0x110000
    got = _meta(path)
    assert (got["sshs_model_hash"], got["sshs_legacy_hash"]) == _sd_scripts_hashes(path)
    assert got["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    assert got["sshs_model_hash"] == _payload_sha256(path)
    # the hashes describe the tensors, not the header's other keys
    other = saver._write(tensors, {**meta, "modelspec.title": "renamed"}, "big2.safetensors")
    assert _meta(other)["sshs_model_hash"] == got["sshs_model_hash"]


# --------------------------------------------------------------------------------- network dim / alpha


def _layers_of(path) -> dict[str, tuple[int, float]]:
    """(rank, alpha) of each layer as sd-scripts' create_network_from_weights / ComfyUI read them."""
    sd = load_file(str(path))
    out = {}
    for key, t in sd.items():
        for suffix in (".lora_down.weight", ".lora_A.weight"):
            if key.endswith(suffix):
                stem = key[:-len(suffix)]
                out[stem] = (t.shape[0], float(sd[f"{stem}.alpha"]) if f"{stem}.alpha" in sd else float(t.shape[0]))
    return out


def _common(layers: dict[str, tuple[int, float]]) -> tuple[int, float]:
    ranks = Counter(r for r, _ in layers.values())
    top = max(ranks.values())
    dim = max(r for r, c in ranks.items() if c == top)
    alphas = Counter(a for r, a in layers.values() if r == dim)
    top = max(alphas.values())
    return dim, max(a for a, c in alphas.items() if c == top)


def test_reexported_sd_scripts_lora_header_names_the_files_layers(tmp_path):
    src = tmp_path / "sdscripts.safetensors"
    save_file(sd_scripts_lora(tiny_transformer(), rank=3, alpha=1.5), str(src))
    # lora.rank 8 / alpha 8: the file's layers keep rank 3 (its fused ones become block-diagonal 9 / 12 on export)
    settings = LoraSettings(rank=8, alpha=8, train_blocks="single", init_from=str(src))
    model = _trained(settings)
    saver = LoRASaver(str(tmp_path), "cont", format="both", dtype="fp32", metadata=RUN_RECORD)
    kohya, diffusers = saver.save(_module(model, settings), "cont", SimpleNamespace(global_step=3, current_epoch=0))

    layers = _layers_of(kohya)
    assert {r for r, _ in layers.values()} == {3, 9, 12}  # rank 3 plain, 3R txt/img qkv, 4R linear1
    meta = _meta(kohya)
    assert (int(meta["ss_network_dim"]), float(meta["ss_network_alpha"])) == _common(layers) == (3, 1.5)
    # every layer's alpha/rank is the scale the module trained with
    trained = {round(layer.scaling[ADAPTER], 9) for layer in lora_layers(model).values()}
    assert trained == {0.5} and {round(a / r, 9) for r, a in layers.values()} == trained

    dmeta = _meta(diffusers)  # parts of rank 3 each (they share the file's down); scale 0.5 baked into lora_B
    assert {r for r, _ in _layers_of(diffusers).values()} == {3}
    assert (dmeta["ss_network_dim"], float(dmeta["ss_network_alpha"])) == ("3", 1.5)


def test_fresh_lora_header_keeps_lora_rank_and_alpha(tmp_path):
    """Fused q/k/v(/mlp) layers are rank 3r/4r with alpha 3α/4α; the network's dim is still r, as sd-scripts writes
    for its split_qkv export (its fused qkv layers are 3r, its ss_network_dim r)."""
    settings = LoraSettings(rank=RANK, alpha=ALPHA)
    model = tiny_transformer()
    inject(model, settings)
    layers = {k[:-len(".lora_down.weight")]: (v.shape[0], 0.0) for k, v in kohya_state_dict(model).items()
              if k.endswith(".lora_down.weight")}
    assert {r for r, _ in layers.values()} == {RANK, 3 * RANK, 4 * RANK}
    path = LoRASaver(str(tmp_path), "fresh", dtype="fp32")._write(
        kohya_state_dict(model, torch.float32), training_metadata(settings, {"name": "fresh"}), "fresh.safetensors")
    meta = _meta(path)
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == (str(RANK), str(ALPHA))


def test_network_dim_alpha_ties_and_empty():
    assert network_dim_alpha({}) is None
    assert network_dim_alpha({"a": (4, 2.0), "b": (8, 8.0)}) == (8, 8.0)  # a tie: the larger
    assert network_dim_alpha({"a": (4, 2.0), "b": (4, 4.0), "c": (4, 4.0), "d": (16, 1.0)}) == (4, 4.0)
