"""fluxlora's attention processor (`speed.attention=cudnn`, fluxlora/perf/attention.py) computes what diffusers'
Flux processor computes, forward and backward, and hands SDPA a contiguous output gradient (CPU; the cuDNN kernel
itself needs a GPU: tests/perf/test_attention_gpu.py)."""

from __future__ import annotations

import pytest
import torch

from fluxlora.perf.attention import FluxSdpaProcessor, _ContiguousGrad, resolve_attention, use_attention
from fluxlora.perf.speed import SpeedSettings
from fluxlora.training import flow as fm
from helpers.model_layouts import tiny_transformer


def _loss_and_grads(model: torch.nn.Module) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    cfg = model.config
    x = torch.randn(2, 16, cfg.in_channels, generator=g)
    t5 = torch.randn(2, 8, cfg.joint_attention_dim, generator=g)
    out = model(hidden_states=x, encoder_hidden_states=t5, pooled_projections=torch.randn(2, cfg.pooled_projection_dim,
                                                                                           generator=g),
                timestep=torch.tensor([0.3, 0.7]), img_ids=fm.image_ids(8, 8), txt_ids=torch.zeros(8, 3),
                guidance=torch.tensor([3.5, 3.5]) if cfg.guidance_embeds else None, return_dict=False)[0]
    loss = (out.float() ** 2).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_the_processor_matches_diffusers_forward_and_backward():
    torch.manual_seed(0)
    plain = tiny_transformer()
    ours = tiny_transformer()
    ours.load_state_dict(plain.state_dict())
    assert use_attention(ours, "cudnn", "cpu") == len(ours.transformer_blocks) + len(ours.single_transformer_blocks)
    assert all(isinstance(m.processor, FluxSdpaProcessor) for m in ours.modules() if hasattr(m, "processor"))
    want_loss, want = _loss_and_grads(plain)
    got_loss, got = _loss_and_grads(ours)
    torch.testing.assert_close(got_loss, want_loss, rtol=1e-5, atol=1e-6)
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("capability, want", [((9, 0), "cudnn"), ((8, 9), "default"), ((8, 6), "default"),
                                              ((10, 0), "default")])
def test_auto_picks_cudnn_for_flux_on_hopper_only(monkeypatch, capability, want):
    """cuDNN was measured (matching flash, faster) on the H200 only: auto takes it on compute capability 9.x."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    model = tiny_transformer()
    assert resolve_attention("auto", model, "cuda") == want
    assert resolve_attention("auto", model, "cpu") == "default"
    assert resolve_attention("default", model, "cuda") == "default"
    assert resolve_attention("cudnn", model, "cpu") == "cudnn"
    # the tiers' checkpointed or swapped blocks were not run with cuDNN: auto leaves them on flash
    assert resolve_attention("auto", model, "cuda", checkpointing=True) == "default"
    assert resolve_attention("auto", model, "cuda", swapping=True) == "default"
    assert resolve_attention("cudnn", model, "cuda", checkpointing=True, swapping=True) == "cudnn"


def test_auto_keeps_diffusers_processor_for_chroma_even_on_hopper(monkeypatch):
    """Chroma passes its T5 mask into every attention: a case cuDNN was not run with."""
    from fluxlora.models.chroma import build_tiny

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert resolve_attention("auto", build_tiny()["transformer"], "cuda") == "default"


def test_default_keeps_diffusers_processor():
    from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

    model = tiny_transformer()
    assert use_attention(model, "default", "cuda") == 0 and use_attention(model, "auto", "cpu") == 0
    assert all(type(m.processor) is FluxAttnProcessor for m in model.modules() if hasattr(m, "processor"))
    with pytest.raises(ValueError, match="speed.attention='flash3' is not one of auto, default, cudnn"):
        SpeedSettings(attention="flash3")


def test_the_output_gradient_reaches_sdpa_contiguous():
    seen = {}
    x = torch.randn(2, 3, 4, 5, requires_grad=True)
    y = _ContiguousGrad.apply(x)
    y.register_hook(lambda g: seen.__setitem__("in", g.is_contiguous()))
    x.register_hook(lambda g: seen.__setitem__("out", g.is_contiguous()))
    (y.transpose(1, 2) * torch.randn(2, 4, 3, 5)).sum().backward()  # a transposed gradient arrives
    assert seen == {"in": False, "out": True}
    assert torch.equal(y, x)
