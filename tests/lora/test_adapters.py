"""lora.type = lora | dora | lokr | loha: training, the LyCORIS-keyed kohya file, the diffusers file, init_from.

The exported kohya/LyCORIS file is checked with a reference loader written here from LyCORIS's math (not peft's):
it patches a fresh tiny model's weights and must give the trained model's output within 1e-5 in float32.
Everything runs on CPU against `fluxlora.models.tiny`.
"""

from __future__ import annotations

import json
from pathlib import Path

import lightning as L
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from fluxlora.errors import FluxLoraError
from fluxlora.lora.adapters import TYPES, layer_tensors
from fluxlora.lora.export import diffusers_state_dict, kohya_state_dict
from fluxlora.lora.header import network_module_args, training_metadata
from fluxlora.lora.export_lycoris import lycoris_name
from fluxlora.lora.init_from import inject_and_load
from fluxlora.lora.inject import LoraSettings, inject, lora_layers, lora_parameters
from fluxlora.lora.keys import kohya_parts
from fluxlora.models import tiny
from fluxlora.training import flow as fm
from fluxlora.training.module import FluxLoRAModule
from test_lora import _transformer_inputs
from helpers.memory_helpers import OPTIM

RANK, ALPHA = 4, 2  # alpha != rank: a loader that drops alpha/rank is off by a factor of 2


def _perturbed(kind: str, seed: int = 1, **settings) -> torch.nn.Module:
    """A tiny transformer with a `kind` adapter whose every tensor is moved off its (zero-delta) init."""
    transformer = tiny.build()["transformer"]
    inject(transformer, LoraSettings(type=kind, rank=RANK, alpha=ALPHA, **settings))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in lora_parameters(transformer).values():
            p.add_(torch.randn(p.shape, generator=g) * 0.1)
    return transformer.eval()


# ------------------------------------------------------------------------------ reference loader (LyCORIS math)

def _lycoris_delta(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """ΔW of one LyCORIS layer as lycoris/modules/{locon,loha,lokr}.py compute it (alpha/dim; LoKr both full: 1)."""
    alpha = t.get("alpha")
    if "lora_down.weight" in t:
        down, up = t["lora_down.weight"], t["lora_up.weight"]
        return (alpha / down.shape[0]) * up @ down
    if "hada_w1_a" in t:
        return (alpha / t["hada_w1_b"].shape[0]) * (t["hada_w1_a"] @ t["hada_w1_b"]) * (t["hada_w2_a"] @ t["hada_w2_b"])
    w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
    w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
    dim = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
    return torch.kron(w1, w2) * (alpha / dim if dim is not None else 1.0)


def _apply_file(transformer: torch.nn.Module, sd: dict[str, torch.Tensor]) -> None:
    """Patch the base weights from a kohya/LyCORIS file: fused layers by BFL row order, DoRA per output row."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in sd.items():
        stem, leaf = (key.split(".", 1) if ".lora_" in key else key.rsplit(".", 1))
        layers.setdefault(stem, {})[leaf] = value.float()
    by_lycoris = {lycoris_name(n): n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    with torch.no_grad():
        for stem, t in layers.items():
            modules = [by_lycoris[stem]] if stem in by_lycoris else kohya_parts(stem)
            assert modules, f"the reference loader cannot place {stem}"
            lins = [transformer.get_submodule(m) for m in modules]
            w = torch.cat([lin.weight for lin in lins]).float()
            new = w + _lycoris_delta(t)
            if "dora_scale" in t:  # LyCORIS wd_on_out: magnitude over the norm of each row of the merged weight
                assert t["dora_scale"].shape == (w.shape[0], 1)
                new = new * (t["dora_scale"] / (new.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps))
            for lin, rows in zip(lins, torch.split(new, [lin.out_features for lin in lins])):
                lin.weight.copy_(rows)


@pytest.mark.parametrize("kind", TYPES)
def test_kohya_file_reproduces_the_trained_output_under_lycoris_math(kind):
    trained = _perturbed(kind)
    sd = kohya_state_dict(trained, torch.float32)
    fresh = tiny.build()["transformer"].eval()
    x = _transformer_inputs()
    with torch.no_grad():
        base = fresh(**x)[0]
        want = trained(**x)[0]
        _apply_file(fresh, sd)
        got = fresh(**x)[0]
    assert (want - base).abs().max() > 1e-3, "the adapter must change the output"
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


def test_key_formats_per_type():
    names = {kind: set(kohya_state_dict(_perturbed(kind), torch.float32)) for kind in TYPES}
    fused = "lora_unet_double_blocks_0_img_attn_qkv"
    assert {f"{fused}.lora_down.weight", f"{fused}.lora_up.weight", f"{fused}.alpha"} <= names["lora"]
    assert f"{fused}.dora_scale" in names["dora"] and names["dora"] - names["lora"] == {
        k.rsplit(".", 2)[0] + ".dora_scale" for k in names["lora"] if k.endswith(".alpha")}
    assert {f"{fused}.hada_w{j}_{ab}" for j in (1, 2) for ab in "ab"} | {f"{fused}.alpha"} <= names["loha"]
    assert all(k.startswith("lycoris_") for k in names["lokr"])
    assert "lycoris_transformer_blocks_0_attn_to_q.lokr_w1" in names["lokr"]
    assert "lycoris_single_transformer_blocks_0_proj_mlp.lokr_w2_a" in names["lokr"]  # factored where r is small


def test_dora_scale_is_peft_magnitude_on_the_output_axis():
    trained = _perturbed("dora", train_blocks="double")
    sd = kohya_state_dict(trained, torch.float32)
    layers = lora_layers(trained)
    parts = kohya_parts("lora_unet_double_blocks_0_img_attn_qkv")
    scale = sd["lora_unet_double_blocks_0_img_attn_qkv.dora_scale"]
    mags = [layer_tensors(layers[p])["lora_magnitude_vector"] for p in parts]
    assert scale.shape == (sum(m.numel() for m in mags), 1)  # (out, 1): ComfyUI's and LyCORIS's output axis
    torch.testing.assert_close(scale.flatten(), torch.cat(mags))
    # peft's magnitude is the norm of each output row of W + ΔW at init: a fresh DoRA file scales nothing
    fresh = tiny.build()["transformer"]
    inject(fresh, LoraSettings(type="dora", rank=RANK, alpha=ALPHA, train_blocks="double"))
    w = fresh.get_submodule("transformer_blocks.0.attn.to_q").base_layer.weight
    torch.testing.assert_close(kohya_state_dict(fresh, torch.float32)[
        "lora_unet_double_blocks_0_img_attn_qkv.dora_scale"][:w.shape[0], 0], w.norm(dim=1))


# -------------------------------------------------------------------------------------------- init_from

@pytest.mark.parametrize("kind", TYPES)
@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_init_from_continues_each_type_exactly(tmp_path, kind, fmt):
    if fmt == "diffusers" and kind == "loha":
        with pytest.raises(ValueError, match="lora.type=loha"):
            diffusers_state_dict(_perturbed(kind), torch.float32)
        return
    trained = _perturbed(kind)
    sd = (kohya_state_dict if fmt == "kohya" else diffusers_state_dict)(trained, torch.float32)
    path = tmp_path / "a.safetensors"
    save_file(sd, str(path))
    again = tiny.build()["transformer"]
    inject_and_load(again, LoraSettings(type=kind, rank=8, alpha=8, init_from=str(path)))
    x = _transformer_inputs()
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(**x)[0], trained(**x)[0], rtol=0, atol=1e-5)
    assert all(p.dtype == torch.float32 for p in lora_parameters(again).values())
    # and it trains on: a gradient reaches every adapter tensor
    again.train()(**x)[0].pow(2).mean().backward()
    assert all(p.grad is not None for p in lora_parameters(again).values())


def test_init_from_refuses_another_type(tmp_path):
    path = tmp_path / "k.safetensors"
    save_file(kohya_state_dict(_perturbed("lokr"), torch.float32), str(path))
    with pytest.raises(FluxLoraError, match=r"holds lokr weights but lora.type=loha; set lora.type=lokr"):
        inject_and_load(tiny.build()["transformer"], LoraSettings(type="loha", init_from=str(path)))


def test_diffusers_file_loads_in_diffusers(tmp_path):
    """DoRA through FluxPipeline.load_lora_weights; LoKr through transformer.load_lora_adapter (diffusers 0.42)."""
    from diffusers import FluxPipeline

    x = _transformer_inputs()
    for kind in ("dora", "lokr"):
        trained = _perturbed(kind)
        path = tmp_path / f"{kind}.safetensors"
        save_file(diffusers_state_dict(trained, torch.float32), str(path))
        pipe = FluxPipeline(**tiny.build())
        with torch.no_grad():
            if kind == "dora":
                pipe.load_lora_weights(str(path))
            else:
                pipe.transformer.load_lora_adapter(str(path), prefix="transformer")
            torch.testing.assert_close(pipe.transformer(**x)[0], trained(**x)[0], rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------- settings and header

def test_settings_validate_type_and_knobs():
    with pytest.raises(ValueError, match="lora.type='lycoris' is not one of"):
        LoraSettings(type="lycoris")
    with pytest.raises(ValueError, match="lora.dropout"):
        LoraSettings(type="lokr", dropout=0.1)
    with pytest.raises(ValueError, match="lora.lokr_factor"):
        LoraSettings(type="lokr", lokr_factor=0)


def test_lokr_factor_reaches_peft():
    transformer = tiny.build()["transformer"]
    inject(transformer, LoraSettings(type="lokr", rank=RANK, alpha=ALPHA, lokr_factor=2))
    t = layer_tensors(lora_layers(transformer)["transformer_blocks.0.attn.to_q"])
    assert t["lokr_w1"].shape == (2, 2)  # 32 = 2 x 16 on both sides


def test_header_names_the_network_module_per_type():
    assert network_module_args(LoraSettings()) == ("networks.lora_flux", {"train_blocks": "all"})
    assert network_module_args(LoraSettings(type="dora")) == (
        "lycoris.kohya", {"algo": "lora", "dora_wd": "True", "wd_on_output": "True"})
    assert network_module_args(LoraSettings(type="lokr", lokr_factor=8)) == (
        "lycoris.kohya", {"algo": "lokr", "factor": "8"})
    meta = training_metadata(LoraSettings(type="loha"), {"name": "x"})
    assert meta["ss_network_module"] == "lycoris.kohya" and json.loads(meta["ss_network_args"]) == {"algo": "loha"}


def test_config_refuses_diffusers_format_for_loha_before_loading(make_cfg):
    from fluxlora.run.settings import check_config

    with pytest.raises(FluxLoraError, match="output.format=both cannot hold lora.type=loha"):
        check_config(make_cfg("lora.type=loha", "output.format=both"))
    check_config(make_cfg("lora.type=lokr", "output.format=both"))


# ------------------------------------------------------------------------------------------------ training

def _eval_loss(module: FluxLoRAModule, batch: dict) -> float:
    """The flow loss on one batch averaged over fixed noise/σ draws, so two evaluations compare like with like."""
    losses = []
    with torch.no_grad():
        for seed in range(8):
            torch.manual_seed(seed)
            losses.append(float(module.flow_loss(batch)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("kind", TYPES)
def test_each_type_trains_and_the_loss_falls(tmp_path, kind):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [{"latents": torch.randn(4, 8, 8, generator=g), "t5": torch.randn(7, 32, generator=g),
             "pooled": torch.randn(32, generator=g)} for _ in range(2)]
    module = FluxLoRAModule(tiny.build()["transformer"], LoraSettings(type=kind, rank=RANK, alpha=ALPHA),
                            fm.FlowConfig(), OPTIM, total_steps=40)
    batch = {k: torch.stack([d[k] for d in data]) for k in data[0]}
    before = _eval_loss(module, batch)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=40, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=2))
    after = _eval_loss(module, batch)
    assert after < 0.9 * before, f"{kind}: loss {before:.4f} -> {after:.4f}"


@pytest.mark.parametrize("kind", ["dora", "lokr"])
def test_demo_run_writes_the_type(make_cfg, kind):
    from fluxlora.run.train import run

    # the 12gb tier stores the base in fp8: DoRA takes its norm from the upcast weight (Fp8Linear.dequantize)
    cfg = make_cfg("+vram=12gb", f"lora.type={kind}", "trainer.max_steps=3", "~callbacks.sampler")
    assert cfg.memory.base_storage == "fp8"
    assert run(cfg) is not None
    with safe_open(str(Path(cfg.output.dir) / "flux-lora.safetensors"), "pt") as f:
        keys, meta = list(f.keys()), f.metadata()
    assert meta["ss_network_module"] == "lycoris.kohya"
    assert any(k.endswith(".dora_scale" if kind == "dora" else ".lokr_w1") for k in keys)
    assert load_file(str(Path(cfg.output.dir) / "flux-lora.safetensors"))
