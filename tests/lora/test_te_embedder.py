"""sd-scripts' text-encoder (lora_te1_ CLIP-L, lora_te3_ T5) and embedder (in_dims: img_in, time_in, ...) LoRA layers.

Embedder layers continue exactly and train; text-encoder layers are kept frozen, applied to the encoders while
caching (the cache holds what the encoder with its LoRA gives, and its content key changes with them), and written
back bit for bit; `lora.text_encoder_lora=drop` leaves them out and says so.
"""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from helpers.data_fakes import make_folder
from helpers.model_layouts import tiny_transformer, transformer_out
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import save_file

from fluxlora.data.cache import CacheItem, LatentCache
from fluxlora.data.cache_format import read_sample
from fluxlora.data.images import scan_folder
from fluxlora.errors import FluxLoraError
from fluxlora.lora.export import kohya_state_dict
from fluxlora.lora.header import file_metadata, training_metadata
from fluxlora.lora.init_from import inject_and_load
from fluxlora.lora.inject import ADAPTER, LoraSettings, lora_layers, target_modules
from fluxlora.lora.keys import EMBEDDERS, text_encoder_slot
from fluxlora.lora.text_encoder import read_text_encoder_lora
from fluxlora.models import tiny
from fluxlora.models.components import FluxComponents
from fluxlora.models.encode import StagedEncoders, encode_prompts
from fluxlora.run.settings import check_config, settings
from fluxlora.run.train import run

T5_LEN = 32  # the default config's model.t5_max_length for the tiny model


def _layer(g: torch.Generator, out_f: int, in_f: int, rank: int, alpha: float, dtype=torch.float32) -> dict:
    return {"lora_down.weight": (torch.randn(rank, in_f, generator=g) * 0.3).to(dtype),
            "lora_up.weight": (torch.randn(out_f, rank, generator=g) * 0.3).to(dtype),
            "alpha": torch.tensor(alpha, dtype=dtype)}


def te_layers(seed: int = 7, rank: int = 2, alpha: float = 1.0, dtype=torch.bfloat16) -> dict[str, torch.Tensor]:
    """What sd-scripts writes for CLIP-L (lora_te1_) and, with train_t5xxl, T5 (lora_te3_): every Linear of their
    attention and MLP modules, named by the transformers module with dots as underscores."""
    parts = tiny.build(seed=0, t5_max_length=T5_LEN)
    g = torch.Generator().manual_seed(seed)
    out = {}
    for prefix, part in (("lora_te1", "text_encoder"), ("lora_te3", "text_encoder_2")):
        for name, mod in parts[part].named_modules():
            if part == "text_encoder" and not name.startswith("text_model."):
                name = f"text_model.{name}"  # sd-scripts' CLIPTextModel (transformers 4) has it; transformers 5 not
            stem = f"{prefix}_{name.replace('.', '_')}"
            if isinstance(mod, torch.nn.Linear) and text_encoder_slot(stem) is not None:
                assert text_encoder_slot(stem) == (part, name)  # the vocabulary round-trips
                out |= {f"{stem}.{k}": v for k, v in _layer(g, mod.out_features, mod.in_features, rank, alpha,
                                                             dtype).items()}
    assert any(k.startswith("lora_te1_") for k in out) and any(k.startswith("lora_te3_") for k in out)
    return out


def embedder_layers(seed: int = 9, rank: int = 3, alpha: float = 1.5) -> dict[str, torch.Tensor]:
    """sd-scripts' in_dims layers on every embedder the tiny (dev-like) model has."""
    model = tiny_transformer()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for stem, module in EMBEDDERS.items():
        lin = model.get_submodule(module)
        out |= {f"{stem}.{k}": v for k, v in _layer(g, lin.out_features, lin.in_features, rank, alpha).items()}
    return out


def block_layer(seed: int = 11) -> dict[str, torch.Tensor]:
    lin = tiny_transformer().get_submodule("transformer_blocks.0.attn.to_out.0")
    g = torch.Generator().manual_seed(seed)
    return {f"lora_unet_double_blocks_0_img_attn_proj.{k}": v
            for k, v in _layer(g, lin.out_features, lin.in_features, 4, 4.0).items()}


def _delta(sd: dict, stem: str) -> tuple[torch.Tensor, torch.Tensor, float]:
    down, up = sd[f"{stem}.lora_down.weight"].float(), sd[f"{stem}.lora_up.weight"].float()
    return down, up, float(sd[f"{stem}.alpha"]) / down.shape[0]


def _by_hand(lin: torch.nn.Module, sd: dict, stem: str, x: torch.Tensor) -> torch.Tensor:
    down, up, scale = _delta(sd, stem)
    return F.linear(x, lin.weight, lin.bias) + scale * F.linear(F.linear(x, down), up)


# ------------------------------------------------------------------------------------------------ embedders


def test_embedder_layers_load_exactly_and_export_under_sd_scripts_names(tmp_path):
    sd = embedder_layers() | block_layer()
    path = tmp_path / "embedders.safetensors"
    save_file(sd, str(path))
    base = tiny_transformer()
    model = tiny_transformer()
    inject_and_load(model, LoraSettings(init_from=str(path), rank=8, alpha=8))  # train_embedders off: still loaded
    layers = lora_layers(model)
    g = torch.Generator().manual_seed(0)
    for stem, module in EMBEDDERS.items():
        lin = base.get_submodule(module)
        x = torch.randn(5, lin.in_features, generator=g)
        torch.testing.assert_close(model.get_submodule(module)(x), _by_hand(lin, sd, stem, x), rtol=0, atol=1e-6)
        assert layers[module].lora_A[ADAPTER].weight.shape[0] == 3
    out = kohya_state_dict(model, torch.float32)  # written back with sd-scripts' names, the same update
    for stem in EMBEDDERS:
        for leaf in ("lora_down.weight", "lora_up.weight"):
            assert torch.equal(out[f"{stem}.{leaf}"], sd[f"{stem}.{leaf}"])
        assert float(out[f"{stem}.alpha"]) == pytest.approx(1.5)
    meta = file_metadata(training_metadata(LoraSettings(), {}), out)
    assert json.loads(meta["ss_network_args"])["in_dims"] == "[3,3,3,3,3]"
    assert "train_t5xxl" not in json.loads(meta["ss_network_args"])


def test_train_embedders_adds_fresh_embedder_layers():
    model = tiny_transformer()
    off = target_modules(model, LoraSettings())
    on = target_modules(model, LoraSettings(train_embedders=True))
    assert set(on) - set(off) == set(EMBEDDERS.values())
    inject_and_load(model, LoraSettings(train_embedders=True, rank=2, alpha=1))
    assert "x_embedder" in lora_layers(model) and "context_embedder" in lora_layers(model)
    assert not lora_layers(model)["x_embedder"].lora_B[ADAPTER].weight.any()  # fresh: the model is unchanged
    torch.testing.assert_close(transformer_out(model), transformer_out(tiny_transformer()), rtol=0, atol=0)
    out = kohya_state_dict(model)
    assert "lora_unet_guidance_in_out_layer.lora_down.weight" in out and "lora_unet_txt_in.alpha" in out


# ------------------------------------------------------------------------------------------------ text encoders


def _comps() -> FluxComponents:
    return FluxComponents(**tiny.build(seed=0, t5_max_length=T5_LEN), name="fluxlora-tiny",
                          fingerprint={"tiny_seed": 0})


def _merged_comps(sd: dict) -> FluxComponents:
    """The tiny encoders with each text-encoder LoRA merged into its weight by hand."""
    comps = _comps()
    with torch.no_grad():
        for stem in {k.split(".", 1)[0] for k in sd}:
            part, module = text_encoder_slot(stem)
            down, up, scale = _delta(sd, stem)
            encoder = getattr(comps, part)
            name = module if hasattr(encoder, "text_model") else module.removeprefix("text_model.")
            encoder.get_submodule(name).weight += scale * up @ down
    return comps


def test_te_layers_change_the_cached_text_as_applying_them_by_hand_and_rebuild_the_cache(tmp_path):
    te = te_layers()
    path = tmp_path / "te.safetensors"
    save_file(te | block_layer(), str(path))
    folder = make_folder(tmp_path / "ds", 3)
    items = [CacheItem(r, (64, 64), (r.caption,)) for r in scan_folder(folder)]

    plain = _comps()
    ident_plain = plain.encoder_identity(T5_LEN)
    LatentCache(tmp_path / "cache", ident_plain).build(items, StagedEncoders(plain, torch.device("cpu"), T5_LEN),
                                                        batch_size=2)

    comps = _comps()
    comps.use_text_encoder_lora(read_text_encoder_lora(path))
    assert comps.encoder_identity(T5_LEN) != ident_plain  # the content key changes: no entry is reused
    calls = []
    enc = StagedEncoders(comps, torch.device("cpu"), T5_LEN, keep=["a sample prompt"])
    texts = enc.texts
    enc.texts = lambda captions: calls.append(list(captions)) or texts(captions)
    entries = LatentCache(tmp_path / "cache", comps.encoder_identity(T5_LEN)).build(items, enc, batch_size=2)
    assert sorted(c for batch in calls for c in batch) == sorted(i.captions[0] for i in items)  # all re-encoded

    merged = _merged_comps(te)
    for item, entry in zip(items, entries):
        want = encode_prompts(merged, [item.captions[0]], torch.device("cpu"), T5_LEN)
        got = read_sample(entry.file)
        torch.testing.assert_close(got["t5"], want["t5"][0], rtol=0, atol=1e-5)
        torch.testing.assert_close(got["pooled"], want["pooled"][0], rtol=0, atol=1e-5)
        unchanged = encode_prompts(plain, [item.captions[0]], torch.device("cpu"), T5_LEN)
        assert not torch.allclose(got["t5"], unchanged["t5"][0]) and not torch.allclose(got["pooled"],
                                                                                       unchanged["pooled"][0])
    want = encode_prompts(merged, ["a sample prompt"], torch.device("cpu"), T5_LEN)  # the sample prompts too
    torch.testing.assert_close(enc.kept["a sample prompt"]["t5"], want["t5"][0], rtol=0, atol=1e-5)


def test_te_layers_reach_deferred_encoders_and_refuse_a_model_without_clip(tmp_path):
    te = te_layers()
    path = tmp_path / "te.safetensors"
    save_file(te, str(path))
    built = _comps()
    encoders = {"text_encoder": built.text_encoder, "text_encoder_2": built.text_encoder_2}
    comps = _comps()
    comps.text_encoder = comps.text_encoder_2 = None
    comps.encoder_loaders = {k: (lambda m=m: m) for k, m in encoders.items()}
    comps.use_text_encoder_lora(read_text_encoder_lora(path))
    got = encode_prompts(comps, ["a red circle"], torch.device("cpu"), T5_LEN)  # read now, with the layers
    want = encode_prompts(_merged_comps(te), ["a red circle"], torch.device("cpu"), T5_LEN)
    torch.testing.assert_close(got["t5"], want["t5"], rtol=0, atol=1e-5)
    chroma = _comps()
    chroma.text_encoder, chroma.arch = None, "chroma"
    with pytest.raises(FluxLoraError) as e:
        chroma.use_text_encoder_lora(read_text_encoder_lora(path))
    assert "no CLIP-L" in str(e.value) and "lora.text_encoder_lora=drop" in str(e.value) and "\n" not in str(e.value)


# ------------------------------------------------------------------------------------------------ whole runs


def _sd_scripts_file(tmp_path: Path) -> tuple[Path, dict]:
    sd = te_layers() | embedder_layers() | block_layer()
    path = tmp_path / "sd-scripts.safetensors"
    save_file(sd, str(path))
    return path, sd


def test_run_keeps_te_layers_and_trains_embedders(make_cfg, tmp_path, caplog):
    path, sd = _sd_scripts_file(tmp_path)
    cfg = make_cfg(f"lora.init_from={path}", "trainer.max_steps=2", "~callbacks.sampler", "output.dtype=fp32")
    with caplog.at_level(logging.INFO):
        run(cfg)
    assert "text-encoder LoRA layers kept frozen" in caplog.text and "applied to text_encoder_2" in caplog.text
    with safe_open(str(Path(cfg.output.dir) / "flux-lora.safetensors"), "pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
        meta = f.metadata()
    te = {k: v for k, v in sd.items() if k.startswith("lora_te")}
    for k, v in te.items():  # unchanged: bit for bit, in the file's own dtype (bf16), alphas included
        assert out[k].dtype == v.dtype and torch.equal(out[k], v), k
    trained = [s for s in EMBEDDERS if not torch.equal(out[f"{s}.lora_up.weight"], sd[f"{s}.lora_up.weight"])]
    assert trained  # the embedders trained, and went back under sd-scripts' names with their rank and alpha
    for s in EMBEDDERS:
        assert out[f"{s}.lora_down.weight"].shape == sd[f"{s}.lora_down.weight"].shape
        assert float(out[f"{s}.alpha"]) == pytest.approx(1.5)
    args = json.loads(meta["ss_network_args"])
    assert args["in_dims"] == "[3,3,3,3,3]" and args["train_t5xxl"] == "True"
    dims = {int(v.shape[0]) for k, v in out.items() if k.endswith("lora_down.weight")}
    assert int(meta["ss_network_dim"]) in dims  # the most common rank of the layers the file holds


def test_drop_leaves_te_layers_out_and_says_so(make_cfg, tmp_path, caplog):
    path, _ = _sd_scripts_file(tmp_path)
    cfg = make_cfg(f"lora.init_from={path}", "lora.text_encoder_lora=drop", "trainer.max_steps=1",
                   "~callbacks.sampler")
    with caplog.at_level(logging.WARNING):
        run(cfg)
    assert re.search(r"lora\.text_encoder_lora=drop: \d+ text-encoder LoRA layers of .* dropped \(CLIP-L \d+, T5 \d+\)",
                     caplog.text)
    with safe_open(str(Path(cfg.output.dir) / "flux-lora.safetensors"), "pt") as f:
        keys = list(f.keys())
        args = json.loads(f.metadata()["ss_network_args"])
    assert keys and not any(k.startswith("lora_te") for k in keys) and "train_t5xxl" not in args
    assert "lora_unet_img_in.lora_down.weight" in keys


def test_config_errors_are_one_line(make_cfg, tmp_path):
    path, _ = _sd_scripts_file(tmp_path)
    cases = [
        (("lora.train_text_encoder=true",), "lora.train_text_encoder=true is not supported yet"),
        (("lora.text_encoder_lora=merge",), "lora.text_encoder_lora='merge' is not one of"),
        ((f"lora.init_from={path}", "output.format=diffusers"), "output.format=diffusers cannot carry"),
    ]
    for overrides, phrase in cases:
        with pytest.raises(FluxLoraError) as e:
            check_config(make_cfg(*overrides))
        assert phrase in str(e.value) and "\n" not in str(e.value)
    check_config(make_cfg(f"lora.init_from={path}", "output.format=both"))  # kohya beside: fine
    with pytest.raises(FluxLoraError) as e:
        settings(LoraSettings, OmegaConf.create({"train_embedders": "yes"}), "lora")
    assert "lora.train_embedders='yes' must be true or false" in str(e.value)
    odd = tmp_path / "odd_te.safetensors"
    save_file({"lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
               "lora_te2_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2)}, str(odd))
    with pytest.raises(FluxLoraError) as e:
        read_text_encoder_lora(odd)
    assert "lora_te2_text_model_encoder_layers_0_mlp_fc1 is not a CLIP-L" in str(e.value) and "\n" not in str(e.value)
    assert read_text_encoder_lora(odd, "drop") is None
