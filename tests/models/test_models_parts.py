"""fluxlora.models.vae, .text_encoders, .tokenizers: the VAE and text encoders from single files and diffusers
folders, tokenizers from a folder, an explicit path or the Hugging Face cache. Outputs must match the source."""

from __future__ import annotations

import os

import pytest
import torch

from fluxlora.errors import FluxLoraError
from fluxlora.models import tiny
from fluxlora.models.text_encoders import load_clip, load_t5
from fluxlora.models.tokenizers import CLIP, T5, find_tokenizer, load_tokenizers
from fluxlora.models.vae import diffusers_vae_to_ldm, load_vae, save_ldm_vae
from helpers.model_layouts import PROMPTS, config_of, rounded, save_state, save_tokenizers, write_clip_file, write_t5_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def parts():
    return tiny.build(t5_max_length=16)


def _ids(parts, which: str) -> torch.Tensor:
    tok = parts["tokenizer" if which == "clip" else "tokenizer_2"]
    return tok(PROMPTS, padding="max_length", max_length=16, truncation=True, return_tensors="pt").input_ids


@torch.no_grad()
def _clip_out(model, ids):
    out = model(ids)
    return torch.cat([out.last_hidden_state.flatten(1), out.pooler_output], dim=1)


@torch.no_grad()
def _vae_out(vae):
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    lat = vae.encode(x).latent_dist.mean
    return lat, vae.decode(lat).sample


def test_vae_ldm_keys_round_trip_through_diffusers_converter(parts):
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    vae = parts["vae"]
    ldm = diffusers_vae_to_ldm(vae.state_dict(), config_of(vae))
    assert "encoder.down.0.block.0.conv1.weight" in ldm and "decoder.up.0.upsample.conv.weight" not in ldm
    assert ldm["decoder.mid.attn_1.q.weight"].ndim == 4  # 1x1 conv, as in ae.safetensors
    back = convert_ldm_vae_checkpoint(dict(ldm), config_of(vae))
    assert back.keys() == vae.state_dict().keys()
    assert all(torch.equal(back[k], v) for k, v in vae.state_dict().items())


@pytest.mark.parametrize("name,prefix", [("ae.safetensors", ""), ("ae.sft", "vae.")])
def test_vae_from_bfl_single_file(tmp_path, parts, name, prefix):
    path = tmp_path / name
    save_ldm_vae(path, parts["vae"])
    if prefix:  # an all-in-one checkpoint's VAE section
        from safetensors.torch import load_file

        save_state(path, {prefix + k: v for k, v in load_file(str(path)).items()}, config_of(parts["vae"]))
    vae = load_vae(path)
    for got, want in zip(_vae_out(vae), _vae_out(parts["vae"])):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)


def test_vae_from_diffusers_folder(tmp_path, parts):
    parts["vae"].save_pretrained(tmp_path / "vae")
    vae = load_vae(tmp_path / "vae")
    torch.testing.assert_close(_vae_out(vae)[1], _vae_out(parts["vae"])[1], rtol=0, atol=1e-6)


def test_vae_widths_come_from_the_tensors_and_real_names_need_no_metadata(tmp_path, parts):
    from fluxlora.models.files import read_header
    from fluxlora.models.vae import vae_config

    path = tmp_path / "ae.safetensors"
    save_ldm_vae(path, parts["vae"], store_config=False)
    cfg = vae_config(read_header(path).shapes, {}, path)
    for key in ("block_out_channels", "layers_per_block", "latent_channels", "use_quant_conv"):
        assert cfg[key] == config_of(parts["vae"])[key]
    assert cfg["scaling_factor"] == 0.3611 and cfg["shift_factor"] == 0.1159  # Flux's, from the shipped config


@pytest.mark.parametrize("dtype", [None, torch.bfloat16])
def test_clip_from_single_file(tmp_path, parts, dtype):
    path = write_clip_file(tmp_path / "clip_l.safetensors", parts["text_encoder"], dtype)
    clip = load_clip(path)
    want = rounded(parts["text_encoder"], dtype) if dtype else parts["text_encoder"]
    ids = _ids(parts, "clip")
    torch.testing.assert_close(_clip_out(clip, ids), _clip_out(want, ids), rtol=0, atol=1e-6)


@pytest.mark.parametrize("dtype", [None, torch.float16, torch.float8_e4m3fn])
def test_t5_from_single_file(tmp_path, parts, dtype):
    """t5xxl_fp16 / t5xxl_fp8_e4m3fn: exact against the source rounded through the file's dtype."""
    path = write_t5_file(tmp_path / "t5xxl.safetensors", parts["text_encoder_2"], dtype)
    t5 = load_t5(path)
    want = rounded(parts["text_encoder_2"], dtype) if dtype else parts["text_encoder_2"]
    ids = _ids(parts, "t5")
    with torch.no_grad():
        torch.testing.assert_close(t5(ids)[0], want(ids)[0], rtol=0, atol=1e-6)
    assert t5.encoder.embed_tokens.weight.data_ptr() == t5.shared.weight.data_ptr()  # one copy of the embedding


def test_t5_scaled_fp8_is_multiplied_by_its_scales(tmp_path, parts):
    """ComfyUI's t5xxl_fp8_e4m3fn_scaled: weight = fp8 · scale_weight."""
    src = parts["text_encoder_2"]
    state, want = {}, rounded(src, torch.float32)
    for k, v in src.state_dict().items():
        if k.endswith(".weight") and v.ndim == 2 and "embed" not in k and "shared" not in k and "relative" not in k:
            scale = v.abs().max() / 448
            state[k] = (v / scale).to(torch.float8_e4m3fn)
            state[k.removesuffix(".weight") + ".scale_weight"] = scale.reshape(1)
            want.get_parameter(k).data = state[k].float() * scale
        elif k != "encoder.embed_tokens.weight":
            state[k] = v
    state["scaled_fp8"] = torch.zeros(2, dtype=torch.float8_e4m3fn)
    t5 = load_t5(save_state(tmp_path / "t5xxl_fp8_e4m3fn_scaled.safetensors", state, src.config.to_dict()))
    ids = _ids(parts, "t5")
    with torch.no_grad():
        torch.testing.assert_close(t5(ids)[0], want(ids)[0], rtol=0, atol=1e-5)


def test_text_encoders_from_diffusers_folders(tmp_path, parts):
    parts["text_encoder"].save_pretrained(tmp_path / "text_encoder")
    parts["text_encoder_2"].save_pretrained(tmp_path / "text_encoder_2")
    ids = _ids(parts, "clip")
    torch.testing.assert_close(_clip_out(load_clip(tmp_path / "text_encoder"), ids),
                               _clip_out(parts["text_encoder"], ids), rtol=0, atol=1e-6)
    ids = _ids(parts, "t5")
    with torch.no_grad():
        torch.testing.assert_close(load_t5(tmp_path / "text_encoder_2")(ids)[0], parts["text_encoder_2"](ids)[0],
                                   rtol=0, atol=1e-6)


def test_wrong_files_for_each_part(tmp_path, parts):
    t5_path = write_t5_file(tmp_path / "clip_l.safetensors", parts["text_encoder_2"])
    for loader, path, phrase in [(load_clip, t5_path, "a T5 text encoder"), (load_vae, t5_path, "a T5 text encoder"),
                                 (load_t5, write_clip_file(tmp_path / "t5.safetensors", parts["text_encoder"]),
                                  "a CLIP text encoder")]:
        with pytest.raises(FluxLoraError) as e:
            loader(path)
        msg = str(e.value)
        assert str(path) in msg and phrase in msg and "\n" not in msg


# --- tokenizers --------------------------------------------------------------------------------------------------

def _fake_hf_cache(cache, repo: str, sub: str, tok) -> None:
    """The hub cache layout huggingface_hub reads: models--org--name/{refs/main, snapshots/<rev>/...}."""
    base = cache / f"models--{repo.replace('/', '--')}"
    (base / "refs").mkdir(parents=True, exist_ok=True)
    (base / "refs" / "main").write_text("0123abc")
    tok.save_pretrained(base / "snapshots" / "0123abc" / sub if sub else base / "snapshots" / "0123abc")


def test_tokenizers_from_model_folder_and_explicit_paths(tmp_path, parts):
    save_tokenizers(tmp_path / "model", parts)
    tok, tok2 = load_tokenizers(None, None, tmp_path / "model", str(tmp_path / "empty-cache"), False, 16)
    assert tok(PROMPTS[0]).input_ids == parts["tokenizer"](PROMPTS[0]).input_ids
    assert tok2(PROMPTS[0]).input_ids == parts["tokenizer_2"](PROMPTS[0]).input_ids and tok2.model_max_length == 16
    tok, _ = load_tokenizers(str(tmp_path / "model" / "tokenizer"), str(tmp_path / "model" / "tokenizer_2"), None,
                             str(tmp_path / "empty-cache"), False, 16)
    assert tok(PROMPTS[1]).input_ids == parts["tokenizer"](PROMPTS[1]).input_ids


def test_tokenizers_from_the_local_hf_cache(tmp_path, parts):
    cache = tmp_path / "hub"
    _fake_hf_cache(cache, "openai/clip-vit-large-patch14", "", parts["tokenizer"])
    _fake_hf_cache(cache, "black-forest-labs/FLUX.1-dev", "tokenizer_2", parts["tokenizer_2"])
    path, _ = find_tokenizer(CLIP, None, tmp_path / "model-without-tokenizers", str(cache))
    assert path is not None and path.name == "0123abc"
    path2, _ = find_tokenizer(T5, None, None, str(cache))
    assert path2 is not None and path2.name == "tokenizer_2"
    tok, tok2 = load_tokenizers(None, None, tmp_path / "model-without-tokenizers", str(cache), False, 16)
    assert tok2(PROMPTS[0]).input_ids == parts["tokenizer_2"](PROMPTS[0]).input_ids


def test_missing_tokenizers_are_one_error_listing_every_place(tmp_path, parts):
    save_tokenizers(tmp_path / "model", parts)
    absent = tmp_path / "nowhere" / "tokenizer"
    with pytest.raises(FluxLoraError) as e:
        load_tokenizers(str(absent), None, tmp_path / "empty-model", str(tmp_path / "hub"), False, 16)
    msg = str(e.value)
    assert "\n" not in msg and f"model.tokenizer_path={absent}, which does not exist" in msg
    assert "T5 tokenizer" in msg and str(tmp_path / "empty-model" / "tokenizer_2") in msg
    assert "google/t5-v1_1-xxl" in msg and str(tmp_path / "hub") in msg and "model.allow_download=true" in msg
