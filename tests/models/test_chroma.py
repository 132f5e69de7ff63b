"""Chroma (issue 18): loading from a BFL single file and a diffusers folder, detection from keys, the T5 mask in T5
and in the transformer, the LoRA files (kohya and diffusers) round-tripping exactly, and `model=tiny-chroma`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from fluxlora.errors import FluxLoraError
from fluxlora.lora.export import diffusers_state_dict, kohya_state_dict
from fluxlora.lora.init_from import inject_and_load
from fluxlora.lora.inject import ADAPTER, LoraSettings, inject, lora_layers
from fluxlora.models import bfl, chroma
from fluxlora.models import load_components
from fluxlora.models.encode import encode_prompts
from fluxlora.models.files import read_header
from fluxlora.models.identify import describe_keys
from fluxlora.models.vae import save_ldm_vae
from fluxlora.training import flow as fm
from tests.helpers.model_layouts import config_of, tiny_transformer, write_t5_file

PROMPTS = ["a photo of sks red circle", "a blue square on a white background"]


@pytest.fixture(scope="module")
def parts():
    return chroma.build_tiny(seed=3, t5_max_length=32)


def _inputs(config: dict, seed: int = 0, text: int = 7) -> dict:
    """One batch as the Chroma step builds it: packed noisy latents, T5 sequence, σ, and a tokenizer mask (sample 0
    has 3 tokens, sample 1 all `text`)."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, config["in_channels"] // 4, 8, 8, generator=g)
    x0 = fm.pack_latents(latents)
    mask = torch.ones(2, text, dtype=torch.long)
    mask[0, 3:] = 0
    return dict(xt=fm.noise_latents(x0, torch.randn(x0.shape, generator=g), torch.tensor([0.3, 0.8])),
                t5=torch.randn(2, text, config["joint_attention_dim"], generator=g), t5_mask=mask,
                sigma=torch.tensor([0.3, 0.8]), height=8, width=8, dtype=torch.float32)


@torch.no_grad()
def _out(model, seed: int = 0) -> torch.Tensor:
    return chroma.predict(model, **_inputs(config_of(model), seed))


def _cfg(path, **kw):
    base = dict(preset="chroma", arch="chroma", source="auto", path=str(path) if path else None, transformer=None,
                vae=None, t5xxl=None, tokenizer_path=None, hf_cache_dir="/nonexistent-hub", allow_download=False,
                dtype="fp32", t5_max_length=32)
    return OmegaConf.create(base | kw)


# ---------------------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_single_file_loads_exactly_and_is_detected(tmp_path, parts, prefix):
    t = parts["transformer"]
    path = tmp_path / "chroma-unlocked-v50.safetensors"
    # the tiny model's rope axes differ from Chroma's (16, 56, 56): its file names them in the header; every width
    # and count is read from the shapes
    chroma.save_chroma_bfl(path, t.state_dict(), {"axes_dims_rope": [4, 6, 6]}, prefix=prefix)
    keys = read_header(path).shapes
    assert f"{prefix}distilled_guidance_layer.layers.1.in_layer.weight" in keys
    assert not any("_mod." in k or "modulation" in k or "guidance_in" in k or "vector_in" in k for k in keys)
    assert chroma.detect(path) == "chroma" and "Chroma" in describe_keys(keys)
    layout = chroma.inspect_chroma(read_header(path))
    assert json.loads(json.dumps({k: layout.config[k] for k in chroma.TINY})) == json.loads(json.dumps(chroma.TINY))
    loaded = chroma.load_transformer(path, torch.float32)
    torch.testing.assert_close(_out(loaded), _out(t), rtol=0, atol=0)


def test_flux_and_chroma_files_are_told_apart(tmp_path, parts):
    flux = tiny_transformer()
    fpath = tmp_path / "flux1-dev.safetensors"
    bfl.save_bfl(fpath, flux.state_dict(), config_of(flux))
    cpath = tmp_path / "chroma.safetensors"
    chroma.save_chroma_bfl(cpath, parts["transformer"].state_dict(), config_of(parts["transformer"]))
    assert chroma.detect(fpath) == "flux" and chroma.detect(cpath) == "chroma"
    with pytest.raises(FluxLoraError, match="model=chroma"):
        bfl.inspect_bfl(read_header(cpath))
    with pytest.raises(FluxLoraError, match="FLUX.1"):
        chroma.inspect_chroma(read_header(fpath))
    folder = tmp_path / "transformer"
    parts["transformer"].save_pretrained(folder)
    assert chroma.detect(folder) == "chroma"


def _single_file_folder(root: Path, parts) -> Path:
    t = parts["transformer"]
    (root / "unet").mkdir(parents=True)
    (root / "clip").mkdir()
    chroma.save_chroma_bfl(root / "unet" / "Chroma1-HD.safetensors", t.state_dict(), config_of(t))
    save_ldm_vae(root / "ae.safetensors", parts["vae"])
    write_t5_file(root / "clip" / "t5xxl_fp16.safetensors", parts["text_encoder_2"])
    parts["tokenizer_2"].save_pretrained(root / "tokenizer")
    return root


def test_components_from_single_files_and_diffusers_folder(tmp_path, parts):
    from diffusers import ChromaPipeline

    single = _single_file_folder(tmp_path / "single", parts)
    folder = tmp_path / "diffusers"
    ChromaPipeline(scheduler=parts["scheduler"], vae=parts["vae"], text_encoder=parts["text_encoder_2"],
                   tokenizer=parts["tokenizer_2"], transformer=parts["transformer"]).save_pretrained(folder)
    want = _out(parts["transformer"])
    for root in (single, folder):
        comps = load_components(_cfg(root))
        assert comps.arch == "chroma" and comps.text_encoder is None and comps.tokenizer is None
        assert "clip_l" not in comps.fingerprint and not comps.has_guidance
        assert '"arch": "chroma"' in comps.encoder_identity(32)
        torch.testing.assert_close(_out(comps.transformer), want, rtol=0, atol=0)
        enc = encode_prompts(comps, PROMPTS, torch.device("cpu"), 32)
        assert enc["pooled"].shape == (2, 0)  # no CLIP: an empty pooled embedding the Chroma step never reads
    # a Chroma folder under a Flux preset, and a Flux file under model=chroma, are refused by name
    with pytest.raises(FluxLoraError, match="model=chroma"):
        load_components(_cfg(single, preset="flux-dev", arch="flux"))
    flux = tiny_transformer()
    bfl.save_bfl(tmp_path / "flux1-dev.safetensors", flux.state_dict(), config_of(flux))
    with pytest.raises(FluxLoraError, match="model=flux-dev"):
        load_components(_cfg(single, transformer=str(tmp_path / "flux1-dev.safetensors")))


# ---------------------------------------------------------------------------------------------------- the T5 mask


def test_t5_mask_in_t5_and_in_the_transformer(parts):
    comps = chroma.load_components(_cfg(None, source="tiny", seed=3))
    enc = encode_prompts(comps, PROMPTS, torch.device("cpu"), 32)
    tok = comps.tokenizer_2(PROMPTS, padding="max_length", max_length=32, truncation=True, return_tensors="pt")
    with torch.no_grad():
        masked = comps.text_encoder_2(tok.input_ids, attention_mask=tok.attention_mask)[0]
    torch.testing.assert_close(enc["t5"], masked)  # T5 ran with the mask (Chroma's pipeline does)
    assert torch.equal(enc["t5_mask"], tok.attention_mask)

    model = parts["transformer"]
    x = _inputs(config_of(model))
    with torch.no_grad():
        padded = chroma.predict(model, **x)
        # sample 0 has 3 tokens: Chroma attends to them and the first padding token, so only 4 positions matter
        short = chroma.predict(model, **(x | dict(t5=x["t5"][:1, :4], t5_mask=x["t5_mask"][:1, :4], xt=x["xt"][:1],
                                                  sigma=x["sigma"][:1])))
        noisy = x["t5"].clone()
        noisy[0, 4:] = 100.0
        changed = chroma.predict(model, **(x | dict(t5=noisy)))
        unmasked = model(hidden_states=x["xt"], encoder_hidden_states=x["t5"], timestep=x["sigma"],
                         img_ids=fm.image_ids(8, 8), txt_ids=torch.zeros(7, 3), return_dict=False)[0]
    torch.testing.assert_close(padded[:1], short, rtol=0, atol=1e-5)
    torch.testing.assert_close(changed, padded, rtol=0, atol=1e-5)
    assert (unmasked[0] - padded[0]).abs().max() > 1e-3, "the mask must change what sample 0 sees"


def test_the_step_passes_the_mask_also_under_checkpointing(parts):
    import copy

    from fluxlora.perf.checkpointing import checkpoint_blocks
    from fluxlora.training.module import FluxLoRAModule

    model = copy.deepcopy(parts["transformer"])
    module = FluxLoRAModule(model, LoraSettings(rank=4, alpha=4), fm.FlowConfig(), OmegaConf.create({}),
                            total_steps=1)
    assert module.arch == "chroma" and not module.has_guidance
    seen = []
    model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw.get("attention_mask")), with_kwargs=True)
    x = _inputs(config_of(model))
    batch = {"latents": fm.unpack_latents(x["xt"], 8, 8), "t5": x["t5"], "t5_mask": x["t5_mask"],
             "pooled": torch.zeros(2, 0)}
    torch.manual_seed(0)
    plain = module.flow_loss(batch)
    assert seen[-1] is not None and seen[-1].dtype == torch.bool
    assert seen[-1][0].tolist() == [True] * 4 + [False] * 3 + [True] * 16
    # diffusers' Chroma forward drops the mask for checkpointed single blocks; fluxlora hands it back
    checkpoint_blocks(model)
    torch.manual_seed(0)
    torch.testing.assert_close(module.flow_loss(batch), plain, rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------- LoRA files


@pytest.fixture(scope="module")
def adapted(parts):
    import copy

    model = copy.deepcopy(parts["transformer"])
    inject(model, LoraSettings(rank=4, alpha=2))
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[ADAPTER].weight.normal_(0, 0.2)
    return model


def test_lora_targets_the_block_linears_not_the_approximator(adapted):
    names = set(lora_layers(adapted))
    assert names and not any("distilled_guidance_layer" in n or "embedder" in n or n == "proj_out" for n in names)
    kohya = {k.rsplit(".", 2)[0] for k in kohya_state_dict(adapted)}
    layers = {k.split("_", 5)[-1] for k in kohya}
    assert layers == {"img_attn_qkv", "img_attn_proj", "img_mlp_0", "img_mlp_2", "txt_attn_qkv", "txt_attn_proj",
                      "txt_mlp_0", "txt_mlp_2", "linear1", "linear2"}  # sd-scripts' Chroma LoRA: no *_mod_lin


def test_kohya_file_reloads_exactly_via_init_from(tmp_path, parts, adapted):
    import copy

    path = tmp_path / "chroma-lora.safetensors"
    save_file(kohya_state_dict(adapted, torch.float32), str(path))
    fresh = copy.deepcopy(parts["transformer"])
    inject_and_load(fresh, LoraSettings(rank=4, alpha=2, init_from=str(path)))
    want = _out(adapted)
    assert (want - _out(parts["transformer"])).abs().max() > 1e-3, "the LoRA must change the output"
    torch.testing.assert_close(_out(fresh), want, rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ["diffusers"])  # diffusers' kohya converter hard-codes Flux's 3072/12288 widths
def test_files_load_with_chroma_pipeline_load_lora_weights(tmp_path, parts, adapted, kind):
    import copy

    from diffusers import ChromaPipeline

    path = tmp_path / f"{kind}.safetensors"
    sd = diffusers_state_dict(adapted, torch.float32) if kind == "diffusers" else kohya_state_dict(adapted, torch.float32)
    save_file(sd, str(path))
    pipe = ChromaPipeline(scheduler=parts["scheduler"], vae=parts["vae"], text_encoder=None, tokenizer=None,
                          transformer=copy.deepcopy(parts["transformer"]))
    pipe.load_lora_weights(str(path))
    assert pipe.transformer.peft_config
    torch.testing.assert_close(_out(pipe.transformer), _out(adapted), rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------------- the demo


def test_tiny_chroma_demo_trains_samples_and_writes_its_lora(make_cfg):
    from fluxlora.run.train import run

    cfg = make_cfg("model=tiny-chroma", "trainer.max_epochs=4")
    last = run(cfg)
    out = Path(cfg.output.dir)
    lora = out / f"{cfg.name}.safetensors"
    assert isinstance(last, float) and lora.is_file() and list((out / "sample").glob("*_grid.png"))
    with safe_open(str(lora), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert keys and not any("mod_lin" in k or "modulation" in k for k in keys)
    assert meta["ss_model_type"] == "chroma" and meta["modelspec.architecture"] == "chroma/lora"
    card = (out / "README.md").read_text()
    assert "A LoRA for Chroma" in card and "ChromaPipeline" in card


def test_the_step_cuts_the_padding_nobody_attends_to_and_predicts_the_same(parts, monkeypatch):
    """T5's 512 tokens are mostly padding that Chroma masks in every layer: the step keeps the longest caption + 1,
    rounded up to TEXT_CUT, and every image token's prediction stays what the full masked sequence gives."""
    model = parts["transformer"]
    x = _inputs(config_of(model), text=20)  # sample 0: 3 tokens, sample 1: all 20
    seen = []
    hook = model.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["encoder_hidden_states"].shape[1]),
                                           with_kwargs=True)
    monkeypatch.setattr(chroma, "TEXT_CUT", 4)
    with torch.no_grad():
        both = chroma.predict(model, **x)                              # sample 1 needs all 20: nothing cut
        one = {k: (v[:1] if torch.is_tensor(v) and v.dim() else v) for k, v in x.items()}
        short = chroma.predict(model, **one)                            # 3 tokens + 1 pad: 4 kept
        monkeypatch.setattr(chroma, "TEXT_CUT", 1 << 20)                 # nothing cut: the reference
        full = chroma.predict(model, **one)
    hook.remove()
    assert seen == [20, 4, 20]
    torch.testing.assert_close(short, full, rtol=0, atol=1e-5)
    assert both.shape == x["xt"].shape
    monkeypatch.undo()
    t5, mask = chroma.cut_padding(torch.zeros(1, 512, 8), torch.cat([torch.ones(1, 70), torch.zeros(1, 442)], 1))
    assert t5.shape[1] == mask.shape[1] == 128  # 70 tokens + 1 pad, rounded up to 64
