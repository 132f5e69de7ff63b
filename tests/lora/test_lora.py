"""fluxlora.lora.inject and callbacks.lora_saver: kohya/diffusers export of peft LoRAs on the tiny Flux.

Everything runs on CPU in fp32 against `fluxlora.models.tiny`; no weights are downloaded.
"""

from __future__ import annotations

import json
import re

import lightning as L
import pytest
import torch
from omegaconf import OmegaConf
from peft import LoraConfig
from safetensors import safe_open
from safetensors.torch import load_file

from fluxlora.training import flow as fm
from fluxlora.callbacks.lora_saver import LoRASaver
from fluxlora.lora.export import diffusers_state_dict, kohya_state_dict
from fluxlora.lora.header import training_metadata
from fluxlora.lora.inject import ADAPTER, LoraSettings, inject, lora_layers
from fluxlora.models import tiny
from fluxlora.training.module import FluxLoRAModule

RANK, ALPHA = 4, 2  # alpha != rank: a file that drops alpha/rank is off by a factor of 2

# BFL widths of the tiny model, derived from its config rather than read back from the diffusers modules.
HIDDEN = tiny.TRANSFORMER["num_attention_heads"] * tiny.TRANSFORMER["attention_head_dim"]
MLP = 4 * HIDDEN  # Flux's mlp_ratio
N_DOUBLE, N_SINGLE = tiny.TRANSFORMER["num_layers"], tiny.TRANSFORMER["num_single_layers"]
# kohya layer -> (in features, out features of the fused BFL layer, parts fused into it)
DOUBLE_LAYERS = {
    "img_attn_qkv": (HIDDEN, 3 * HIDDEN, 3), "txt_attn_qkv": (HIDDEN, 3 * HIDDEN, 3),
    "img_attn_proj": (HIDDEN, HIDDEN, 1), "txt_attn_proj": (HIDDEN, HIDDEN, 1),
    "img_mlp_0": (HIDDEN, MLP, 1), "txt_mlp_0": (HIDDEN, MLP, 1),
    "img_mlp_2": (MLP, HIDDEN, 1), "txt_mlp_2": (MLP, HIDDEN, 1),
    "img_mod_lin": (HIDDEN, 6 * HIDDEN, 1), "txt_mod_lin": (HIDDEN, 6 * HIDDEN, 1),
}
SINGLE_LAYERS = {
    "linear1": (HIDDEN, 3 * HIDDEN + MLP, 4), "linear2": (HIDDEN + MLP, HIDDEN, 1),
    "modulation_lin": (HIDDEN, 3 * HIDDEN, 1),
}
# kohya layer -> the diffusers parts, in the order BFL concatenates them
DOUBLE_PARTS = {
    "img_attn_qkv": ["attn.to_q", "attn.to_k", "attn.to_v"],
    "txt_attn_qkv": ["attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"],
    "img_attn_proj": ["attn.to_out.0"], "txt_attn_proj": ["attn.to_add_out"],
    "img_mlp_0": ["ff.net.0.proj"], "txt_mlp_0": ["ff_context.net.0.proj"],
    "img_mlp_2": ["ff.net.2"], "txt_mlp_2": ["ff_context.net.2"],
    "img_mod_lin": ["norm1.linear"], "txt_mod_lin": ["norm1_context.linear"],
}
SINGLE_PARTS = {
    "linear1": ["attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"],
    "linear2": ["proj_out"], "modulation_lin": ["norm.linear"],
}
SUFFIXES = (".lora_down.weight", ".lora_up.weight", ".alpha")


def _expected_layers(train_blocks: str, include_modulation: bool = True) -> dict[str, tuple[int, int, int]]:
    """kohya layer name -> (in, out, parts) that sd-scripts' Flux LoRA would have."""
    out = {}
    if train_blocks in ("all", "double"):
        for i in range(N_DOUBLE):
            out.update({f"lora_unet_double_blocks_{i}_{k}": v for k, v in DOUBLE_LAYERS.items()})
    if train_blocks in ("all", "single"):
        for i in range(N_SINGLE):
            out.update({f"lora_unet_single_blocks_{i}_{k}": v for k, v in SINGLE_LAYERS.items()})
    if not include_modulation:
        out = {k: v for k, v in out.items() if not k.endswith(("mod_lin", "modulation_lin"))}
    return out


def _parts(key: str) -> list[str]:
    """Full diffusers module names fused into a kohya layer, in BFL order."""
    kind, idx, layer = re.match(r"lora_unet_(double|single)_blocks_(\d+)_(.+)$", key).groups()
    if kind == "double":
        return [f"transformer_blocks.{idx}.{p}" for p in DOUBLE_PARTS[layer]]
    return [f"single_transformer_blocks.{idx}.{p}" for p in SINGLE_PARTS[layer]]


def _randomize_lora_b(transformer: torch.nn.Module, seed: int = 1, scale: float = 0.1) -> None:
    """peft initialises lora_B to zero; give every adapter a non-trivial delta."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in lora_layers(transformer).values():
            w = layer.lora_B[ADAPTER].weight
            w.copy_(torch.randn(w.shape, generator=g) * scale)


def _peft_delta(layer) -> torch.Tensor:
    """The weight delta peft applies: scaling·B·A."""
    return layer.scaling[ADAPTER] * layer.lora_B[ADAPTER].weight.detach() @ layer.lora_A[ADAPTER].weight.detach()


def _kohya_delta(sd: dict, key: str) -> torch.Tensor:
    down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
    return (sd[f"{key}.alpha"].item() / down.shape[0]) * up @ down


def _lora_transformer(**settings) -> torch.nn.Module:
    transformer = tiny.build()["transformer"]
    inject(transformer, LoraSettings(rank=RANK, alpha=ALPHA, **settings))
    _randomize_lora_b(transformer)
    return transformer


def _transformer_inputs(seed: int = 0) -> dict:
    """One batch of transformer inputs built as FluxLoRAModule.flow_loss builds them."""
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    t5 = torch.randn(2, 7, tiny.TRANSFORMER["joint_attention_dim"], generator=g)
    sigma = torch.tensor([0.3, 0.8])
    xt = fm.noise_latents(fm.pack_latents(latents), torch.randn(2, 16, 16, generator=g), sigma)
    return dict(
        hidden_states=xt, encoder_hidden_states=t5,
        pooled_projections=torch.randn(2, tiny.TRANSFORMER["pooled_projection_dim"], generator=g),
        timestep=sigma, img_ids=fm.image_ids(8, 8), txt_ids=torch.zeros(7, 3),
        guidance=torch.full((2,), 3.5), return_dict=False,
    )


# ---------------------------------------------------------------------------------------------- kohya keys


@pytest.mark.parametrize("train_blocks", ["all", "single", "double"])
def test_kohya_keys_shapes_and_alphas(train_blocks):
    transformer = _lora_transformer(train_blocks=train_blocks)
    sd = kohya_state_dict(transformer, torch.float32)
    expected = _expected_layers(train_blocks)

    assert set(sd) == {k + s for k in expected for s in SUFFIXES}
    for key, (in_f, out_f, parts) in expected.items():
        down, up, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"]
        assert down.shape == (parts * RANK, in_f), key
        assert up.shape == (out_f, parts * RANK), key
        assert alpha.shape == () and alpha.item() == parts * ALPHA, key
        assert down.dtype == up.dtype == alpha.dtype == torch.float32
        assert up.abs().sum() > 0, f"{key}: lora_B was randomised, the exported up must not be zero"


def test_kohya_default_dtype_and_no_modulation():
    transformer = _lora_transformer(include_modulation=False)
    sd = kohya_state_dict(transformer)
    assert {t.dtype for t in sd.values()} == {torch.bfloat16}
    assert set(sd) == {k + s for k in _expected_layers("all", include_modulation=False) for s in SUFFIXES}
    assert not any("mod_lin" in k or "modulation_lin" in k for k in sd)


# ---------------------------------------------------------------------------------------------- fusion


def test_kohya_fusion_is_exact():
    transformer = _lora_transformer(train_blocks="all")
    sd = kohya_state_dict(transformer, torch.float32)
    layers = lora_layers(transformer)
    assert {ADAPTER} == {n for layer in layers.values() for n in layer.lora_A}
    fused = 0
    for key in _expected_layers("all"):
        names = _parts(key)
        want = torch.cat([_peft_delta(layers[n]) for n in names], dim=0)
        torch.testing.assert_close(_kohya_delta(sd, key), want, rtol=1e-5, atol=1e-7, msg=key)
        if len(names) > 1:
            fused += 1
            # the downs stack in part order, each part's up sits in its own rank block
            down = sd[f"{key}.lora_down.weight"]
            for i, n in enumerate(names):
                torch.testing.assert_close(down[i * RANK:(i + 1) * RANK], layers[n].lora_A[ADAPTER].weight)
    assert fused == 2 * N_DOUBLE + N_SINGLE


def test_kohya_fused_layer_reproduces_diffusers_outputs():
    """A BFL-style fused Linear with the kohya LoRA merged gives the concatenated outputs of the peft parts."""
    transformer = _lora_transformer(train_blocks="all")
    sd = kohya_state_dict(transformer, torch.float32)
    x = torch.randn(5, HIDDEN, generator=torch.Generator().manual_seed(3))
    for key in ("lora_unet_double_blocks_1_txt_attn_qkv", "lora_unet_single_blocks_0_linear1"):
        parts = [transformer.get_submodule(n) for n in _parts(key)]
        weight = torch.cat([p.base_layer.weight for p in parts]) + _kohya_delta(sd, key)
        bias = torch.cat([p.base_layer.bias for p in parts])
        with torch.no_grad():
            want = torch.cat([p(x) for p in parts], dim=-1)
            base = torch.nn.functional.linear(x, weight - _kohya_delta(sd, key), bias)
            got = torch.nn.functional.linear(x, weight, bias)
        assert (want - base).abs().max() > 1e-3, "the LoRA must change the layer for this test to mean anything"
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=key)


def test_kohya_partly_adapted_fused_layer_has_zero_blocks():
    transformer = tiny.build()["transformer"]
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=[
        "transformer_blocks.0.attn.to_k", "single_transformer_blocks.1.proj_mlp",
    ]))
    _randomize_lora_b(transformer)
    sd = kohya_state_dict(transformer, torch.float32)

    assert set(sd) == {k + s for k in ("lora_unet_double_blocks_0_img_attn_qkv", "lora_unet_single_blocks_1_linear1")
                       for s in SUFFIXES}
    for key, part, (in_f, out_f, n) in (
        ("lora_unet_double_blocks_0_img_attn_qkv", 1, DOUBLE_LAYERS["img_attn_qkv"]),
        ("lora_unet_single_blocks_1_linear1", 3, SINGLE_LAYERS["linear1"]),
    ):
        down, up = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"]
        assert down.shape == (n * RANK, in_f) and up.shape == (out_f, n * RANK)
        assert sd[f"{key}.alpha"].item() == n * ALPHA
        layer = transformer.get_submodule(_parts(key)[part])
        delta = _kohya_delta(sd, key)
        rows = slice(part * HIDDEN, part * HIDDEN + layer.base_layer.out_features)
        torch.testing.assert_close(delta[rows], _peft_delta(layer))
        outside = torch.ones(out_f, dtype=torch.bool)
        outside[rows] = False
        assert delta[outside].abs().max() == 0, f"{key}: parts without LoRA must contribute exactly zero"
        blocks = torch.ones(n * RANK, dtype=torch.bool)
        blocks[part * RANK:(part + 1) * RANK] = False
        assert down[blocks].abs().max() == 0 and up[:, blocks].abs().max() == 0


def test_kohya_refuses_to_fuse_parts_of_different_rank():
    transformer = tiny.build()["transformer"]
    transformer.requires_grad_(False)
    transformer.add_adapter(LoraConfig(
        r=RANK, lora_alpha=ALPHA, rank_pattern={"transformer_blocks.0.attn.to_k": 2 * RANK},
        target_modules=["transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k"],
    ))
    with pytest.raises(ValueError, match="lora_unet_double_blocks_0_img_attn_qkv"):
        kohya_state_dict(transformer, torch.float32)


# ---------------------------------------------------------------------------------------------- LoRASaver


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A real two-step Lightning fit of FluxLoRAModule on the tiny model, with LoRASaver writing both formats."""
    out = tmp_path_factory.mktemp("lora_out")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    data = [{"latents": torch.randn(4, 8, 8, generator=g), "t5": torch.randn(7, 32, generator=g),
             "pooled": torch.randn(32, generator=g)} for _ in range(2)]
    optim = OmegaConf.create({"name": "adamw", "lr": 5e-2, "weight_decay": 0.0, "betas": [0.9, 0.999],
                              "eps": 1e-8, "kwargs": {}, "scheduler": "constant", "warmup_steps": 0})
    module = FluxLoRAModule(tiny.build()["transformer"], LoraSettings(rank=RANK, alpha=ALPHA), fm.FlowConfig(),
                            optim, total_steps=2)
    saver = LoRASaver(str(out), "mylora", format="both", every_n_steps=1, dtype="fp32",
                      metadata={"learning_rate": 5e-2, "resolution": [16, 16], "tag": "tiny"})
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[saver],
                        default_root_dir=str(out))
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=1))
    module.transformer.eval()
    return module, saver, out


def test_saver_writes_fluxgym_file_names(trained):
    module, saver, out = trained
    names = ["mylora-step00000001", "mylora-step00000002", "mylora"]
    expected = [out / f"{n}{ext}" for n in names for ext in (".safetensors", ".diffusers.safetensors")]
    assert saver.saved == expected
    assert sorted(p.name for p in out.glob("*.safetensors")) == sorted(p.name for p in expected)
    assert not list(out.glob(".*.tmp")), "no temp files may be left behind"
    # the final kohya file holds the final weights
    final = load_file(out / "mylora.safetensors")
    want = kohya_state_dict(module.transformer, torch.float32)
    assert final.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(final[k], want[k], rtol=0, atol=0)


def test_diffusers_file_round_trips_through_load_lora_weights(trained):
    from diffusers import FluxPipeline

    module, _, out = trained
    inputs = _transformer_inputs()
    pipe = FluxPipeline(**tiny.build())
    with torch.no_grad():
        base = pipe.transformer(**inputs)[0]
        pipe.load_lora_weights(str(out / "mylora.diffusers.safetensors"))
        loaded = pipe.transformer(**inputs)[0]
        want = module.transformer(**inputs)[0]
    assert pipe.transformer.peft_config, "load_lora_weights must have added an adapter"
    assert (want - base).abs().max() > 1e-3, "the trained LoRA must change the transformer output"
    torch.testing.assert_close(loaded, want, rtol=0, atol=1e-5)
    # alpha/rank = 0.5 is baked into lora_B: the file's B is half of peft's B
    sd = load_file(out / "mylora.diffusers.safetensors")
    layer = lora_layers(module.transformer)["transformer_blocks.0.attn.to_q"]
    torch.testing.assert_close(sd["transformer.transformer_blocks.0.attn.to_q.lora_B.weight"],
                               layer.lora_B[ADAPTER].weight * (ALPHA / RANK))


def test_diffusers_state_dict_keys_cover_every_adapter():
    transformer = _lora_transformer(train_blocks="single")
    sd = diffusers_state_dict(transformer, torch.float32)
    names = set(lora_layers(transformer))
    assert set(sd) == {f"transformer.{n}.lora_{ab}.weight" for n in names for ab in "AB"}
    assert all(n.startswith("single_transformer_blocks.") for n in names) and len(names) == 6 * N_SINGLE


def test_saver_metadata(trained):
    _, _, out = trained
    for name in ("mylora.safetensors", "mylora.diffusers.safetensors"):
        with safe_open(str(out / name), framework="pt") as f:
            meta = f.metadata()
        assert all(isinstance(v, str) for v in meta.values())
        assert meta["ss_network_dim"] == str(RANK)
        assert float(meta["ss_network_alpha"]) == ALPHA
        assert meta["ss_network_module"] == "networks.lora_flux"
        assert meta["modelspec.architecture"] == "flux-1-dev/lora"  # the tiny model has guidance embeds
        assert meta["modelspec.title"] == "mylora"
        assert json.loads(meta["ss_network_args"]) == {"train_blocks": "all"}
        assert meta["ss_steps"] == "2"
        assert json.loads(meta["ss_resolution"]) == [16, 16] and meta["ss_tag"] == "tiny"
        assert float(meta["ss_learning_rate"]) == 5e-2


def test_training_metadata_is_all_strings_and_names_schnell():
    meta = training_metadata(LoraSettings(rank=8, alpha=4.5, train_blocks="single"),
                             {"name": "x", "guidance": False, "steps": 7, "buckets": {"512": 3}, "note": "hi"})
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items())
    assert meta["modelspec.architecture"] == "flux-1-schnell/lora"
    assert (meta["ss_network_dim"], meta["ss_network_alpha"]) == ("8", "4.5")
    assert meta["ss_steps"] == "7" and json.loads(meta["ss_buckets"]) == {"512": 3} and meta["ss_note"] == "hi"


def test_saver_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="format"):
        LoRASaver(str(tmp_path), "x", format="ckpt")
    with pytest.raises(ValueError, match="dtype"):
        LoRASaver(str(tmp_path), "x", dtype="fp8")
    with pytest.raises(ValueError, match="every_n_steps"):
        LoRASaver(str(tmp_path), "x", every_n_steps=-1)


def _replay(saver: LoRASaver, max_epochs: int, epochs: list[list[int]]) -> list[str]:
    """Call the saver's hooks in Lightning's order; `epochs` holds global_step after each batch (as Lightning
    reports it with gradient accumulation 2 and max_steps=3: [[0, 1, 1, 2], [2, 3]])."""
    from types import SimpleNamespace

    module = SimpleNamespace(transformer=_lora_transformer(train_blocks="single"), has_guidance=True,
                             lora_settings=LoraSettings(rank=RANK, alpha=ALPHA, train_blocks="single"))
    trainer = SimpleNamespace(global_step=0, current_epoch=0, max_epochs=max_epochs, is_global_zero=True)
    for epoch, steps in enumerate(epochs):
        trainer.current_epoch = epoch
        for i, step in enumerate(steps):
            trainer.global_step = step
            saver.on_train_batch_end(trainer, module, None, None, i)
        saver.on_train_epoch_end(trainer, module)
    saver.on_train_end(trainer, module)
    return [p.name for p in saver.saved]


def test_saver_saves_each_step_once_under_gradient_accumulation(tmp_path):
    saver = LoRASaver(str(tmp_path), "acc", every_n_steps=1, dtype="fp32")
    assert _replay(saver, -1, [[0, 1, 1, 2], [2, 3]]) == [
        "acc-step00000001.safetensors", "acc-step00000002.safetensors", "acc-step00000003.safetensors",
        "acc.safetensors",
    ]


@pytest.mark.parametrize("max_epochs, want", [
    (-1, ["e-000001", "e-000002", "e"]),  # trained by max_steps: Lightning reports max_epochs=-1
    (2, ["e-000001", "e"]),  # the last epoch's file is the final <name>.safetensors
])
def test_saver_epoch_files(tmp_path, max_epochs, want):
    saver = LoRASaver(str(tmp_path), "e", every_n_epochs=1, dtype="fp32")
    assert _replay(saver, max_epochs, [[1, 2], [3, 4]]) == [w + ".safetensors" for w in want]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(w + ".safetensors" for w in want)
