"""fluxlora.lora.init_from: `lora.init_from` continues from kohya or diffusers LoRA files exactly.

A fused kohya LoRA on BFL's qkv / linear1 maps onto diffusers' split q/k/v(/mlp) layers: block-diagonal files
(fluxlora's and sd-scripts' split_qkv export) split into rank-r parts, any other fused LoRA into rank-R parts that
share the down matrix. Both must reproduce the model the file describes, which is checked against the BFL weights
with the LoRA merged in.
"""

from __future__ import annotations

import re

import pytest
import torch
from safetensors.torch import save_file

from fluxlora.errors import FluxLoraError
from fluxlora.lora.export import diffusers_state_dict, kohya_state_dict
from fluxlora.lora.init_from import inject_and_load as inject
from fluxlora.lora.inject import ADAPTER, LoraSettings, lora_layers
from fluxlora.models import bfl
from helpers.model_layouts import config_of, save_state, sd_scripts_lora, tiny_transformer, transformer_out

RANK, ALPHA = 4, 2.0


def _trained(**settings) -> torch.nn.Module:
    """A tiny transformer whose LoRA has non-zero ups (peft starts them at zero)."""
    model = tiny_transformer()
    inject(model, LoraSettings(rank=RANK, alpha=ALPHA, **settings))
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in lora_layers(model).values():
            layer.lora_B[ADAPTER].weight.copy_(torch.randn(layer.lora_B[ADAPTER].weight.shape, generator=g) * 0.1)
    return model


def _continued(path, **settings) -> torch.nn.Module:
    model = tiny_transformer()
    inject(model, LoraSettings(init_from=str(path), **settings))
    return model


def _delta(sd: dict, stem: str) -> torch.Tensor:
    down, up = sd[f"{stem}.lora_down.weight"].float(), sd[f"{stem}.lora_up.weight"].float()
    return float(sd[f"{stem}.alpha"]) / down.shape[0] * up @ down


def test_kohya_file_of_our_own_continues_exactly(tmp_path):
    src = _trained()
    path = tmp_path / "mine.safetensors"
    save_file(kohya_state_dict(src, torch.float32), str(path))
    model = _continued(path, rank=16, alpha=16)  # the file's rank and scale win on its layers
    torch.testing.assert_close(transformer_out(model), transformer_out(src), rtol=0, atol=1e-6)
    q = lora_layers(model)["transformer_blocks.0.attn.to_q"]
    assert q.lora_A[ADAPTER].weight.shape[0] == RANK and q.scaling[ADAPTER] == pytest.approx(ALPHA / RANK)
    again, first = kohya_state_dict(model, torch.float32), kohya_state_dict(src, torch.float32)
    assert again.keys() == first.keys() and all(torch.equal(again[k], first[k]) for k in first)


def _merged(model: torch.nn.Module, lora: dict) -> torch.nn.Module:
    """The base model with each kohya delta added to its BFL weight, then converted back to diffusers."""
    state = bfl.diffusers_to_bfl(model.state_dict())
    for stem in {k.split(".", 1)[0] for k in lora}:
        kind, idx, layer = re.match(r"lora_unet_(double|single)_blocks_(\d+)_(.+)$", stem).groups()
        layer = {"img_attn_qkv": "img_attn.qkv", "txt_attn_qkv": "txt_attn.qkv", "img_attn_proj": "img_attn.proj",
                 "img_mlp_0": "img_mlp.0", "modulation_lin": "modulation.lin"}.get(layer, layer)
        state[f"{kind}_blocks.{idx}.{layer}.weight"] = state[f"{kind}_blocks.{idx}.{layer}.weight"] + _delta(lora, stem)
    merged = tiny_transformer()
    merged.load_state_dict(bfl.bfl_to_diffusers(state))
    return merged


def test_sd_scripts_fused_lora_maps_exactly_onto_split_layers(tmp_path):
    base = tiny_transformer()
    lora = sd_scripts_lora(base, rank=3, alpha=1.5)
    path = tmp_path / "sdscripts.safetensors"
    save_file(lora, str(path))
    model = _continued(path, rank=8, alpha=8)
    torch.testing.assert_close(transformer_out(model), transformer_out(_merged(base, lora)), rtol=0, atol=2e-5)
    layers = lora_layers(model)
    for name in ("transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.proj_mlp"):
        assert layers[name].lora_A[ADAPTER].weight.shape[0] == 3  # each part keeps the fused rank R
        assert layers[name].scaling[ADAPTER] == pytest.approx(1.5 / 3)
    assert "transformer_blocks.0.ff.net.2" in layers  # settings target it; the file does not: a fresh rank-8 layer
    assert layers["transformer_blocks.0.ff.net.2"].lora_A[ADAPTER].weight.shape[0] == 8
    out = kohya_state_dict(model, torch.float32)  # exported back: rank 3R block-diagonal, the same update
    assert out["lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight"].shape[0] == 9
    for stem in {k.split(".", 1)[0] for k in lora}:
        torch.testing.assert_close(_delta(out, stem), _delta(lora, stem), rtol=0, atol=1e-6)


def test_diffusers_file_continues_exactly_and_keeps_layers_outside_train_blocks(tmp_path):
    src = _trained(train_blocks="single")
    path = tmp_path / "mine.diffusers.safetensors"
    save_file(diffusers_state_dict(src, torch.float32), str(path))
    model = _continued(path, rank=2, alpha=1, train_blocks="double")
    torch.testing.assert_close(transformer_out(model), transformer_out(src), rtol=0, atol=1e-6)
    layers = lora_layers(model)
    assert layers["single_transformer_blocks.0.attn.to_q"].lora_A[ADAPTER].weight.shape[0] == RANK
    assert layers["transformer_blocks.0.attn.to_q"].lora_A[ADAPTER].weight.shape[0] == 2  # fresh, settings' rank
    assert layers["transformer_blocks.0.attn.to_q"].scaling[ADAPTER] == pytest.approx(0.5)
    assert not layers["transformer_blocks.0.attn.to_q"].lora_B[ADAPTER].weight.any()
    kohya_state_dict(model)  # fresh and continued layers both fuse for the kohya export


def test_files_that_cannot_continue(tmp_path):
    model = tiny_transformer()
    not_lora = save_state(tmp_path / "flux1-dev.safetensors", bfl.diffusers_to_bfl(model.state_dict()),
                          config_of(model))
    bigger = tiny_transformer(num_attention_heads=4)
    inject(bigger, LoraSettings(rank=RANK, alpha=ALPHA))
    wrong_size = tmp_path / "other_size.safetensors"
    save_file(kohya_state_dict(bigger, torch.float32), str(wrong_size))
    odd_layer = tmp_path / "final_layer.safetensors"  # sd-scripts adapts blocks and embedders, never this
    save_file({"lora_unet_final_layer_linear.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_final_layer_linear.lora_up.weight": torch.zeros(16, 2)}, str(odd_layer))
    for path, phrase in [(not_lora, "not a LoRA file"), (wrong_size, "output rows"),
                         (odd_layer, "lora_unet_final_layer_linear is not a Flux block or embedder layer"),
                         (tmp_path / "missing.safetensors", "does not exist")]:
        with pytest.raises(FluxLoraError) as e:
            _continued(path)
        assert str(path) in str(e.value) and phrase in str(e.value) and "\n" not in str(e.value)
