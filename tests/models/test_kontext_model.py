"""FLUX.1 Kontext on the model side: the real step's inputs (control tokens after the target's, ids with 1 in the
first channel, the loss on the target only), how a Kontext model is recognised, sampling from a control image with
FluxKontextPipeline, the LoRA file loaded by FluxKontextPipeline, and the `model=tiny-kontext` demo."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import save_file

from fluxlora.errors import FluxLoraError
from fluxlora.lora.export import diffusers_state_dict
from fluxlora.lora.inject import ADAPTER, LoraSettings, inject, lora_layers
from fluxlora.models import tiny
from fluxlora.models.components import FluxComponents
from fluxlora.models.kontext import is_kontext
from fluxlora.models.sampling import SamplePrompt, SampleRenderer
from fluxlora.training import flow as fm
from fluxlora.training.module import FluxLoRAModule
from helpers.memory_helpers import OPTIM


@pytest.fixture(scope="module")
def parts():
    return tiny.build(seed=0, t5_max_length=8)


def _module(transformer) -> FluxLoRAModule:
    optim = OmegaConf.merge(OPTIM, {"lr": 1e-3})
    return FluxLoRAModule(transformer, LoraSettings(rank=2, alpha=2), fm.FlowConfig(guidance_scale=1.0), optim, 10)


class _Recorder(torch.nn.Module):
    """A stand-in transformer: records its inputs, predicts 0 for the target's tokens and 100 for the control's."""

    config = type("C", (), {"guidance_embeds": True})()

    def __init__(self) -> None:
        super().__init__()
        self.seen: dict = {}

    def forward(self, hidden_states, img_ids, **kw):
        self.seen = dict(hidden_states=hidden_states, img_ids=img_ids, **kw)
        pred = torch.zeros_like(hidden_states)
        pred[:, self.target_tokens:] = 100.0
        return (pred,)


def test_the_step_appends_control_tokens_with_their_ids_and_scores_the_target_only(parts):
    module = _module(copy.deepcopy(parts["transformer"]))
    rec = _Recorder()
    module.transformer = rec
    b, latents, control = 2, torch.randn(2, 4, 8, 6), torch.randn(2, 4, 4, 10)  # control kept at its own size
    rec.target_tokens = 4 * 3
    batch = {"latents": latents, "control": control, "t5": torch.randn(b, 8, 32), "pooled": torch.randn(b, 32)}
    noise, sigma = torch.randn(b, 12, 16), torch.tensor([0.25, 0.75])
    loss = module.flow_loss(batch, noise=noise, sigma=sigma)

    x0 = fm.pack_latents(latents)
    xt = (1 - sigma.view(-1, 1, 1)) * x0 + sigma.view(-1, 1, 1) * noise
    h = rec.seen["hidden_states"]
    assert h.shape == (2, 12 + 2 * 5, 16)
    torch.testing.assert_close(h[:, :12], xt)
    torch.testing.assert_close(h[:, 12:], fm.pack_latents(control))  # clean, not noised
    ids = rec.seen["img_ids"]
    want_target = torch.tensor([[0.0, r, c] for r in range(4) for c in range(3)])
    want_control = torch.tensor([[1.0, r, c] for r in range(2) for c in range(5)])
    torch.testing.assert_close(ids, torch.cat([want_target, want_control]))
    torch.testing.assert_close(rec.seen["guidance"], torch.ones(2))
    # the control's predictions (100) never reach the loss: it is the target's alone
    torch.testing.assert_close(loss, ((noise - x0) ** 2).mean())


def test_without_control_the_step_is_plain_flux(parts):
    module = _module(copy.deepcopy(parts["transformer"]))
    rec = _Recorder()
    rec.target_tokens = 16
    module.transformer = rec
    batch = {"latents": torch.randn(1, 4, 8, 8), "t5": torch.randn(1, 8, 32), "pooled": torch.randn(1, 32)}
    module.flow_loss(batch)
    assert rec.seen["hidden_states"].shape[1] == 16 and torch.all(rec.seen["img_ids"][:, 0] == 0)


# ---- recognising Kontext


def _folder(tmp_path: Path, cls: str) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": cls}), encoding="utf-8")
    return tmp_path


def test_kontext_is_named_by_the_preset_or_by_model_index(tmp_path):
    assert is_kontext(OmegaConf.create({"variant": "kontext"}))
    assert not is_kontext(OmegaConf.create({"variant": None}))
    assert is_kontext(OmegaConf.create({"variant": "kontext"}), _folder(tmp_path / "k", "FluxKontextPipeline"))
    with pytest.raises(FluxLoraError, match=r"model_index.json names FluxKontextPipeline.*use model=flux-kontext"):
        is_kontext(OmegaConf.create({"preset": "flux-dev"}), _folder(tmp_path / "k", "FluxKontextPipeline"))
    with pytest.raises(FluxLoraError, match=r"model.variant=kontext but .* names ChromaPipeline"):
        is_kontext(OmegaConf.create({"variant": "kontext"}), _folder(tmp_path / "c", "ChromaPipeline"))
    with pytest.raises(FluxLoraError, match=r"model.variant='edit' is not one of dev, schnell, kontext"):
        is_kontext(OmegaConf.create({"variant": "edit"}))


def test_kontext_single_file_is_preferred_under_the_kontext_preset(tmp_path):
    from fluxlora.models.layout import SEARCH, _find

    for name in ("flux1-dev.safetensors", "flux1-kontext-dev.safetensors"):
        (tmp_path / name).write_bytes(b"")
    assert _find(tmp_path, SEARCH["transformer"], "kontext")[0].name == "flux1-kontext-dev.safetensors"
    assert _find(tmp_path, SEARCH["transformer"], "dev")[0].name == "flux1-dev.safetensors"


# ---- sampling from a control image


def test_sampler_renders_with_a_control_image_on_the_tiny_model(tmp_path, parts):
    from fluxlora.models.encode import encode_prompts

    comps = FluxComponents(**parts, kontext=True)
    red, blue = tmp_path / "red.png", tmp_path / "blue.png"
    Image.new("RGB", (80, 48), (220, 30, 30)).save(red)
    Image.new("RGB", (80, 48), (30, 30, 220)).save(blue)
    prompts = [SamplePrompt("make it green", width=64, height=32, steps=2, control_image=str(red)),
               SamplePrompt("make it green", width=64, height=32, steps=2, control_image=str(blue))]
    renderer = SampleRenderer(comps, prompts, lambda caps: encode_prompts(comps, caps, torch.device("cpu"), 8))
    images = [renderer.render(p, torch.device("cpu"), torch.float32) for p in prompts]
    assert all(im.size == (64, 32) for im in images)  # the sample's size: no snapping to Kontext's 1 MP sizes
    a, b = (torch.tensor(list(im.getdata()), dtype=torch.float32) for im in images)
    assert (a - b).abs().mean() > 0.5  # the control image reaches the transformer


# ---- the LoRA file


def test_diffusers_file_loads_into_flux_kontext_pipeline_and_reproduces_the_module(tmp_path, parts):
    from diffusers import FluxKontextPipeline

    adapted = copy.deepcopy(parts["transformer"])
    inject(adapted, LoraSettings(rank=4, alpha=2))
    with torch.no_grad():
        for layer in lora_layers(adapted).values():
            layer.lora_B[ADAPTER].weight.normal_(0, 0.2)
    path = tmp_path / "kontext-lora.safetensors"
    save_file(diffusers_state_dict(adapted, torch.float32), str(path))
    pipe = FluxKontextPipeline(scheduler=parts["scheduler"], vae=parts["vae"], text_encoder=None, tokenizer=None,
                               text_encoder_2=None, tokenizer_2=None, transformer=copy.deepcopy(parts["transformer"]))
    pipe.load_lora_weights(str(path))

    def out(model):  # a Kontext forward: target tokens, then control tokens with their ids
        from fluxlora.training.kontext import append_control

        g = torch.Generator().manual_seed(0)
        tokens, ids = append_control(torch.randn(1, 16, 16, generator=g), fm.image_ids(8, 8),
                                     torch.randn(1, 4, 8, 8, generator=g))
        return model(hidden_states=tokens, encoder_hidden_states=torch.randn(1, 8, 32, generator=g),
                     pooled_projections=torch.randn(1, 32, generator=g), timestep=torch.tensor([0.5]), img_ids=ids,
                     txt_ids=torch.zeros(8, 3), guidance=torch.tensor([1.0]), return_dict=False)[0]

    want = out(adapted)
    assert (want - out(parts["transformer"])).abs().max() > 1e-3, "the LoRA must change the output"
    torch.testing.assert_close(out(pipe.transformer), want, rtol=0, atol=1e-5)


# ---- the demo


def test_tiny_kontext_demo_trains_samples_and_writes_its_lora(make_cfg):
    from fluxlora.run.train import run

    cfg = make_cfg("model=tiny-kontext", "trainer.max_epochs=4")
    last = run(cfg)
    out = Path(cfg.output.dir)
    assert isinstance(last, float) and (out / f"{cfg.name}.safetensors").is_file()
    assert list((out / "sample").glob("*_grid.png"))
    assert len(list((out / "synthetic" / "kontext" / "control").glob("*.png"))) == 8
    card = (out / "README.md").read_text()
    assert "FLUX.1-Kontext-dev" in card and "FluxKontextPipeline" in card and "load_image" in card
