"""fluxlora.models.bfl and .transformer: BFL single files in, diffusers FluxTransformer2DModel out.

Tiny models are written in each layout users have (plain / `model.diffusion_model.` prefix, fp32 / bf16 / fp8,
`.sft`, dev / schnell) and read back; outputs must equal the source's (after the file's rounding). One check runs
at Flux-dev widths against diffusers' own converter.
"""

from __future__ import annotations

import gc
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fluxlora.errors import FluxLoraError
from fluxlora.perf.memory import MemorySettings, apply_memory_settings
from fluxlora.models import bfl, files
from fluxlora.models.files import fingerprint, read_header
from fluxlora.models.transformer import load_transformer
from helpers.model_layouts import config_of, rounded, save_state, tiny_transformer, transformer_out

os.environ.setdefault("HF_HUB_OFFLINE", "1")
FP8 = torch.float8_e4m3fn


@pytest.fixture(scope="module")
def source():
    return tiny_transformer()


def _write(tmp_path, model, name="flux1-dev.safetensors", dtype=None, prefix=""):
    path = tmp_path / name
    bfl.save_bfl(path, model.state_dict(), config_of(model), dtype, prefix)
    return path


def test_round_trip_diffusers_bfl_diffusers_is_exact(source):
    sd = source.state_dict()
    b = bfl.diffusers_to_bfl(sd)
    assert "double_blocks.0.img_attn.qkv.weight" in b and "single_blocks.1.linear1.weight" in b
    assert "final_layer.adaLN_modulation.1.weight" in b and not any(k.startswith("transformer_blocks") for k in b)
    back = bfl.bfl_to_diffusers(b)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    assert bfl.bfl_shapes(config_of(source)) == {k: tuple(v.shape) for k, v in b.items()}


def test_matches_diffusers_converter_at_flux_dev_widths(tmp_path):
    """diffusers' converter only handles width 3072: compare on a random Flux-dev-width model, 1+1 blocks, bf16."""
    from diffusers.loaders.single_file_utils import convert_flux_transformer_checkpoint_to_diffusers as convert

    cfg = bfl.shipped_config("flux-dev") | {"num_layers": 1, "num_single_layers": 1}
    path = tmp_path / "flux1-dev.safetensors"
    shapes = bfl.write_random_bfl(path, cfg, torch.bfloat16, prefix="model.diffusion_model.")
    ours = load_transformer(path, torch.bfloat16)
    assert {k: config_of(ours)[k] for k in cfg} == cfg  # widths, heads, guidance and block counts from the keys
    with safe_open(str(path), "pt") as f:
        theirs = convert({k: f.get_tensor(k) for k in shapes})
    mine = ours.state_dict()
    assert mine.keys() == theirs.keys()
    assert all(mine[k].dtype == torch.bfloat16 and torch.equal(mine[k], theirs[k]) for k in theirs)


@pytest.mark.parametrize("name,dtype,prefix", [
    ("flux1-dev.safetensors", None, ""),
    ("flux1-dev.sft", torch.bfloat16, "model.diffusion_model."),
    ("flux1-dev-fp8.safetensors", FP8, ""),
    ("flux1-dev-fp8.safetensors", FP8, "model.diffusion_model."),
])
def test_layouts_load_and_match_the_source(tmp_path, source, name, dtype, prefix):
    """fp32 exact; bf16 / fp8 exact against the source rounded through the file's dtype (outputs 1e-6)."""
    path = _write(tmp_path, source, name, dtype, prefix)
    loaded = load_transformer(path, torch.float32)
    want = rounded(source, dtype) if dtype else source
    assert all(torch.equal(a, b) for a, b in zip(loaded.state_dict().values(), want.state_dict().values()))
    torch.testing.assert_close(transformer_out(loaded), transformer_out(want), rtol=0, atol=1e-6)
    if dtype == FP8:  # fp8 costs precision, not sense: within 25% relative of the unrounded model's output
        ref = transformer_out(source)
        assert (transformer_out(loaded) - ref).norm() / ref.norm() < 0.25


@pytest.mark.parametrize("file_dtype", [FP8, torch.bfloat16])
def test_fp8_storage_reads_linears_as_fp8_and_the_rest_in_compute_dtype(tmp_path, source, file_dtype):
    """storage=fp8 gives what memory.base_storage=fp8 gives after a full-precision load, without the detour."""
    path = _write(tmp_path, source, dtype=file_dtype)
    loaded = load_transformer(path, torch.float32, storage="fp8")
    want = rounded(source, file_dtype)
    apply_memory_settings(want, MemorySettings(base_storage="fp8"), torch.float32)
    got_dtypes = {n: p.dtype for n, p in loaded.named_parameters()}
    assert got_dtypes == {n: p.dtype for n, p in want.named_parameters()}
    assert {"transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.proj_mlp.weight"} <= {
        n for n, d in got_dtypes.items() if d == FP8}
    assert got_dtypes["transformer_blocks.0.norm1.linear.weight"] == FP8  # AdaLN modulation: fp8 too
    assert got_dtypes["transformer_blocks.0.attn.to_q.bias"] == torch.float32  # biases stay in compute dtype
    assert got_dtypes["x_embedder.weight"] == torch.float32  # outside the blocks: kept
    assert got_dtypes["transformer_blocks.0.attn.norm_q.weight"] == torch.float32
    apply_memory_settings(loaded, MemorySettings(base_storage="fp8"), torch.float32)  # no cast, swaps the class
    torch.testing.assert_close(transformer_out(loaded), transformer_out(want), rtol=0, atol=1e-6)


def test_schnell_and_block_counts_come_from_the_keys(tmp_path):
    model = tiny_transformer(guidance_embeds=False, num_layers=3, num_single_layers=1)
    path = _write(tmp_path, model, "flux1-schnell.safetensors")
    layout = bfl.inspect_bfl(read_header(path))
    assert layout.variant == "flux-schnell" and layout.config["num_layers"] == 3
    assert layout.config["num_single_layers"] == 1
    loaded = load_transformer(path, torch.float32)
    assert not loaded.config.guidance_embeds
    torch.testing.assert_close(transformer_out(loaded), transformer_out(model), rtol=0, atol=1e-6)


def _one_line_naming(exc_info, path) -> str:
    msg = str(exc_info.value)
    assert str(path) in msg and "\n" not in msg
    return msg


def test_missing_file(tmp_path):
    path = tmp_path / "flux1-dev.safetensors"
    with pytest.raises(FluxLoraError) as e:
        load_transformer(path)
    assert "does not exist" in _one_line_naming(e, path)


def test_truncated_file(tmp_path, source):
    path = _write(tmp_path, source)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(FluxLoraError) as e:
        load_transformer(path)
    assert "truncated" in _one_line_naming(e, path)
    path.write_bytes(b"PK\x03\x04 a zip, not safetensors" * 4)
    with pytest.raises(FluxLoraError) as e:
        load_transformer(path)
    assert "not a safetensors file" in _one_line_naming(e, path)


@pytest.mark.parametrize("keys,phrase", [
    (["model.diffusion_model.input_blocks.0.0.weight", "conditioner.embedders.0.transformer.x.weight"], "XL"),
    (["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"], "LoRA"),
    (["encoder.down.0.block.0.conv1.weight"], "VAE"),
])
def test_a_file_of_another_architecture(tmp_path, keys, phrase):
    path = save_state(tmp_path / "flux1-dev.safetensors", {k: torch.zeros(2, 2) for k in keys})
    with pytest.raises(FluxLoraError) as e:
        load_transformer(path)
    msg = _one_line_naming(e, path)
    assert "not a Flux.1 transformer" in msg and phrase in msg


def test_a_damaged_file_missing_a_block(tmp_path):
    model = tiny_transformer(num_layers=3)
    state = {k: v for k, v in bfl.diffusers_to_bfl(model.state_dict()).items() if not k.startswith("double_blocks.1.")}
    path = save_state(tmp_path / "flux1-dev.safetensors", state, config_of(model))
    with pytest.raises(FluxLoraError) as e:
        load_transformer(path)
    assert "double_blocks [1] missing" in _one_line_naming(e, path)


def test_rope_axes_unknown_for_a_nonstandard_width_without_metadata(tmp_path, source):
    path = save_state(tmp_path / "flux1-dev.safetensors", bfl.diffusers_to_bfl(source.state_dict()))
    with pytest.raises(FluxLoraError) as e:
        load_transformer(path)
    assert "rope axes" in _one_line_naming(e, path)


def test_fingerprint_reads_only_the_head(tmp_path):
    path = save_state(tmp_path / "big.safetensors", {"w": torch.zeros(1 << 19)})  # 2 MiB
    fp = fingerprint(path)
    assert fp["name"] == path.name and fp["size"] == path.stat().st_size and len(fp["head_sha256"]) == 16
    with open(path, "r+b") as f:  # a change past the first MiB is invisible to the hash, by design
        f.seek(path.stat().st_size - 4)
        f.write(b"\x01\x01\x01\x01")
    os.utime(path, (1, 1))
    assert fingerprint(path)["head_sha256"] == fp["head_sha256"] and fingerprint(path)["mtime"] == 1


def test_write_random_bfl_is_self_describing_and_loads(tmp_path, source):
    """The tiny config (rope axes 4+6+6) travels in the header, so even a non-Flux width loads; fp8 stays fp8."""
    path = tmp_path / "flux1-dev-fp8.safetensors"
    shapes = bfl.write_random_bfl(path, config_of(source), torch.float8_e4m3fn, seed=3)
    header = read_header(path)
    assert header.shapes == shapes and set(header.dtypes.values()) == {"F8_E4M3"}
    loaded = load_transformer(path, torch.float32, storage="fp8")
    assert loaded.transformer_blocks[0].attn.to_q.weight.dtype == FP8
    apply_memory_settings(loaded, MemorySettings(base_storage="fp8"), torch.float32)
    out = transformer_out(loaded)
    assert torch.isfinite(out).all() and 0.05 < out.std() < 20


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="reads Linux's /proc/self/maps")
def test_the_loaded_model_holds_no_view_of_the_file(tmp_path, source, monkeypatch):
    """safetensors' tensors are views of its mapping of the file: a bias kept as read held the whole mapping, with
    every page read through it, in the process's RSS (~22 GiB for FLUX.1-dev on the CPU). After loading no mapping of
    the file is left, and reading one tensor per mapping (`REMAP_BYTES` of 1) gives the same model."""
    path = _write(tmp_path, source, dtype=torch.bfloat16)
    whole = load_transformer(path, torch.bfloat16, storage="fp8")
    gc.collect()
    assert str(path) not in Path("/proc/self/maps").read_text()
    monkeypatch.setattr(files, "REMAP_BYTES", 1)
    chunked = load_transformer(path, torch.bfloat16, storage="fp8")
    gc.collect()
    assert str(path) not in Path("/proc/self/maps").read_text()
    a, b = whole.state_dict(), chunked.state_dict()
    assert a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k].float(), b[k].float()) for k in a)
    assert {a[k].dtype for k in a} == {torch.bfloat16, FP8}
