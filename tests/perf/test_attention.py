"""fluxlora's attention processor (`speed.attention=cudnn`, fluxlora/perf/attention.py) computes what diffusers'
Flux processor computes, forward and backward, and hands SDPA a contiguous output gradient (CPU; the cuDNN kernel
itself needs a GPU: tests/perf/test_attention_gpu.py)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch.nn.attention import SDPBackend

from fluxlora.perf.attention import (SDPA_SCOPE, FluxSdpaProcessor, SdpaScope, _ContiguousGrad, resolve_attention,
                                     use_attention)
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


@pytest.fixture
def cudnn_sdp_off():
    """cuDNN's SDPA switched off, as `prepare_cuda` leaves it for a run; the flags are put back afterwards."""
    saved = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(False)
    yield
    torch.backends.cuda.enable_cudnn_sdp(saved)


def test_cudnn_is_enabled_only_while_the_transformer_runs(cudnn_sdp_off):
    """The backends are set around the transformer's call, outside any compiled block; afterwards, and after a
    forward that raised, the flags are what they were."""
    model = tiny_transformer()
    use_attention(model, "cudnn", "cpu")
    seen = []
    model.transformer_blocks[0].register_forward_pre_hook(
        lambda module, args: seen.append(torch.backends.cuda.cudnn_sdp_enabled()))
    _loss_and_grads(model)
    assert seen == [True] and not torch.backends.cuda.cudnn_sdp_enabled() and not SDPA_SCOPE.active
    with pytest.raises(RuntimeError):
        model(hidden_states=torch.randn(1, 4, 3))  # wrong width: raises inside the forward
    assert not torch.backends.cuda.cudnn_sdp_enabled() and not SDPA_SCOPE.active


def test_overlapping_calls_from_two_threads_restore_the_flags_once_both_left(cudnn_sdp_off):
    """A sampling thread may run the transformer while the training step does; whichever leaves last, the flags
    end as they were (nested `sdpa_kernel` contexts left them to the thread that left last)."""
    backends = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION]
    scope = SdpaScope()
    scope.enter(backends)  # training step
    assert torch.backends.cuda.cudnn_sdp_enabled() and not torch.backends.cuda.math_sdp_enabled()
    other = threading.Thread(target=scope.enter, args=(backends,))  # sampling thread enters second...
    other.start()
    other.join()
    scope.leave()  # ...the training step leaves first: the sampler is still inside
    assert torch.backends.cuda.cudnn_sdp_enabled() and scope.active
    other = threading.Thread(target=scope.leave)
    other.start()
    other.join()
    assert not torch.backends.cuda.cudnn_sdp_enabled() and torch.backends.cuda.math_sdp_enabled()
    assert not scope.active
    scope.leave()  # a post hook without its pre hook changes nothing
    assert not torch.backends.cuda.cudnn_sdp_enabled() and not scope.active


def test_a_compiled_block_with_our_processor_is_loaded_from_the_compile_cache(monkeypatch, tmp_path, cudnn_sdp_off):
    """`sdpa_kernel` inside the processor was traced into each block's graph, and AOTAutograd bypassed its cache for
    it ("Unsupported call_function target _backend_from_string"): every warm start partitioned and lowered the
    joint graphs again. With the backends set around the transformer the graph is cached and loaded."""
    from helpers.compile_cache import cold_then_warm

    from fluxlora.perf.speed import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    use_compile_cache(str(tmp_path / "cache"))

    def step() -> dict[str, torch.Tensor]:
        torch.manual_seed(0)
        model = tiny_transformer()
        use_attention(model, "cudnn", "cpu")
        model.single_transformer_blocks[0].compile(fullgraph=True, dynamic=False)
        return _loss_and_grads(model)[1]

    cold, warm = cold_then_warm(step)
    for k in cold:
        torch.testing.assert_close(warm[k], cold[k], rtol=0, atol=0)
