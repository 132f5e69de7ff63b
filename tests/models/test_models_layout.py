"""fluxlora.models.layout and load_components: `model.path` as a FluxGym folder, a flat folder of single files or a
diffusers folder; per-part overrides; one error listing every missing part; a training run from single files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from fluxlora.models.encode import encode_prompts
from fluxlora.errors import FluxLoraError
from fluxlora.models import load_components, tiny
from fluxlora.models.layout import resolve_files
from helpers.model_layouts import (
    PROMPTS, transformer_out, write_clip_file, write_diffusers_folder, write_fluxgym_folder,
)

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def parts():
    return tiny.build(t5_max_length=32)


@pytest.fixture(scope="module")
def fluxgym(tmp_path_factory, parts) -> Path:
    return write_fluxgym_folder(tmp_path_factory.mktemp("fluxgym") / "models", parts)


def _cfg(path, **kw) -> OmegaConf:
    base = dict(preset="flux-dev", source="auto", path=str(path) if path else None, transformer=None, vae=None,
                clip_l=None, t5xxl=None, tokenizer_path=None, tokenizer_2_path=None, hf_cache_dir="/nonexistent-hub",
                allow_download=False, dtype="fp32", t5_max_length=32)
    return OmegaConf.create(base | kw)


def _assert_same_model(comps, parts) -> None:
    """Prompt embeddings and transformer output equal the source's (fp32, 1e-6)."""
    got = encode_prompts(comps, PROMPTS, torch.device("cpu"), 32)
    want = encode_prompts(_Parts(parts), PROMPTS, torch.device("cpu"), 32)
    for key in ("t5", "pooled"):
        torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-6)
    comps.load_transformer()
    torch.testing.assert_close(transformer_out(comps.transformer), transformer_out(parts["transformer"]),
                               rtol=0, atol=1e-6)


class _Parts:
    """The source parts with attribute access, as encode_prompts reads FluxComponents."""

    def __init__(self, parts: dict) -> None:
        self.__dict__.update(parts)

    def encoder(self, part: str):
        return getattr(self, part)


def test_fluxgym_folder(fluxgym, parts):
    files = resolve_files(_cfg(fluxgym))
    assert files.transformer == fluxgym / "unet" / "flux1-dev.sft" and files.vae == fluxgym / "vae" / "ae.sft"
    assert files.clip_l.name == "clip_l.safetensors" and files.t5xxl.name == "t5xxl_fp16.safetensors"
    comps = load_components(_cfg(fluxgym), defer_transformer=True)
    assert comps.transformer is None and comps.has_guidance  # known from the header, weights not read yet
    assert set(comps.fingerprint) == {"transformer", "vae", "clip_l", "t5xxl"}
    assert comps.fingerprint["transformer"]["name"] == "flux1-dev.sft"
    assert comps.scheduler.config.use_dynamic_shifting  # the shipped FLUX.1-dev scheduler
    _assert_same_model(comps, parts)


def test_flat_folder_with_explicit_overrides(tmp_path, fluxgym, parts):
    flat = tmp_path / "flat"
    flat.mkdir()
    for sub, name in [("unet", "flux1-dev.sft"), ("vae", "ae.sft"), ("clip", "t5xxl_fp16.safetensors")]:
        (flat / name).symlink_to(fluxgym / sub / name)
    (tmp_path / "elsewhere").mkdir()
    other = write_clip_file(tmp_path / "elsewhere" / "my_clip.safetensors", parts["text_encoder"])
    cfg = _cfg(flat, clip_l=str(other), tokenizer_path=str(fluxgym / "tokenizer"),
               tokenizer_2_path=str(fluxgym / "tokenizer_2"))
    files = resolve_files(cfg)
    assert files.transformer == flat / "flux1-dev.sft" and files.clip_l == other
    _assert_same_model(load_components(cfg), parts)


def test_diffusers_folder(tmp_path, parts):
    root = write_diffusers_folder(tmp_path / "FLUX.1-dev", parts)
    files = resolve_files(_cfg(root))
    assert files.transformer == root / "transformer" and files.scheduler == root / "scheduler"
    comps = load_components(_cfg(root), storage="fp8")
    assert comps.name == "FLUX.1-dev"
    assert comps.transformer.transformer_blocks[0].attn.to_q.weight.dtype == torch.float8_e4m3fn
    comps = load_components(_cfg(root))
    _assert_same_model(comps, parts)


def test_missing_parts_are_one_error(tmp_path, fluxgym):
    root = tmp_path / "partial"
    (root / "unet").mkdir(parents=True)
    (root / "unet" / "flux1-dev.sft").symlink_to(fluxgym / "unet" / "flux1-dev.sft")
    with pytest.raises(FluxLoraError) as e:
        resolve_files(_cfg(root, t5xxl=str(tmp_path / "t5xxl_fp16.safetensors")))
    msg = str(e.value)
    assert "\n" not in msg and str(root) in msg
    assert "vae: no vae/ folder and none of ae.safetensors, ae.sft in ./, vae/" in msg
    assert "clip_l:" in msg and f"model.t5xxl={tmp_path / 't5xxl_fp16.safetensors'} does not exist" in msg


def test_ambiguous_and_absent_paths(tmp_path, fluxgym):
    root = tmp_path / "two"
    root.mkdir()
    for name in ("flux1-dev-fp8.safetensors", "flux1-krea.safetensors"):
        (root / name).symlink_to(fluxgym / "unet" / "flux1-dev.sft")
    with pytest.raises(FluxLoraError, match="several candidates"):
        resolve_files(_cfg(root))
    with pytest.raises(FluxLoraError, match=f"model path {tmp_path / 'nope'} does not exist"):
        resolve_files(_cfg(tmp_path / "nope"))
    with pytest.raises(FluxLoraError, match="needs model.path"):
        resolve_files(_cfg(None))


def test_schnell_preset_prefers_schnell_files(tmp_path, fluxgym):
    root = tmp_path / "both"
    (root / "unet").mkdir(parents=True)
    for name in ("flux1-dev.sft", "flux1-schnell.sft"):
        (root / "unet" / name).symlink_to(fluxgym / "unet" / "flux1-dev.sft")
    others = {p: str(fluxgym / "clip" / "clip_l.safetensors") for p in ("vae", "clip_l", "t5xxl")}
    assert resolve_files(_cfg(root, preset="flux-schnell", **others)).transformer.name == "flux1-schnell.sft"
    assert resolve_files(_cfg(root, preset="flux-dev", **others)).transformer.name == "flux1-dev.sft"


def test_training_run_from_single_files_with_init_from_and_model_card(make_cfg, fluxgym, tmp_path):
    """model=flux-dev on a FluxGym folder of tiny single files: trains, continues from a LoRA, writes the card."""
    from fluxlora.run.train import run

    common = ["model=flux-dev", f"model.path={fluxgym}", "model.dtype=fp32", "model.t5_max_length=32",
              "model.hf_cache_dir=/nonexistent-hub", "data=synthetic", "trainer.max_steps=2", "+vram=16gb",
              "sample.defaults.width=64", "sample.defaults.height=64", "sample.defaults.steps=2",
              "sample.prompts=[a photo of sks red circle]"]
    first = make_cfg(*common, "name=first")
    run(first)
    lora = Path(first.output.dir) / "first.safetensors"
    assert lora.is_file()
    second = make_cfg(*common, "name=second", f"lora.init_from={lora}", "optim.lr=0")
    run(second)
    out = Path(second.output.dir)
    from safetensors.torch import load_file

    a, b = load_file(str(lora)), load_file(str(out / "second.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # lr 0: continued exactly, unchanged
    card = (out / "README.md").read_text()
    assert "base_model: black-forest-labs/FLUX.1-dev" in card and f"`{fluxgym}`" in card
    assert "**Trigger word**: `sks`" in card and "[`second.safetensors`](second.safetensors)" in card
    grid = next(line for line in card.splitlines() if line.startswith("![")).split("(")[1].rstrip(")")
    assert (out / grid).is_file() and grid.startswith("sample/")
    assert f"| init_from | {lora} |" in card and "load_lora_weights" in card


def test_cache_identity_ignores_the_transformer_file():
    from fluxlora.models.components import FluxComponents

    def comps(transformer_fp):
        return FluxComponents(None, None, None, None, None, None, None, name="x",
                              fingerprint={"transformer": transformer_fp, "vae": {"size": 1}, "clip_l": {"size": 2},
                                           "t5xxl": {"size": 3}})

    assert comps({"size": 10}).encoder_identity(512) == comps({"size": 11}).encoder_identity(512)
    assert comps({"size": 10}).encoder_identity(512) != comps({"size": 10}).encoder_identity(256)
    other_vae = comps({"size": 10})
    other_vae.fingerprint["vae"] = {"size": 9}
    assert other_vae.encoder_identity(512) != comps({"size": 10}).encoder_identity(512)
