"""cuDNN attention through fluxlora's processor (`speed.attention=cudnn`) trains the LoRA the flash path trains:
over several steps at Flux's head size (128) the losses and LoRA gradients match within bf16 tolerance, eagerly and
with compiled blocks, and the profiler sees cuDNN's SDPA ops run (the backends are set around the transformer's
call, so a compiled block must pick cuDNN when it is traced). Each variant runs in a process of its own: a failed
cuDNN kernel leaves the CUDA context broken for what follows.
Passed on the H200 (2026-12-01, torch 2.11 + cu130, cuDNN 9.19), the measurement behind `speed.attention: auto`
picking cuDNN on Hopper (fluxlora/perf/attention.py); both variants, with the profiler's check, passed there on
2026-12-02."""

from __future__ import annotations

import contextlib
import multiprocessing as mp

import pytest
import torch

pytestmark = pytest.mark.gpu
STEPS = 4


def _train(attention: str, compiled: bool = False) -> dict:
    from diffusers import FluxTransformer2DModel

    from fluxlora.lora.init_from import inject_and_load
    from fluxlora.lora.inject import LoraSettings, lora_parameters
    from fluxlora.perf.attention import use_attention
    from fluxlora.perf.cuda_setup import prepare_cuda

    device = torch.device("cuda", 0)
    prepare_cuda(device)  # switches cuDNN SDPA off globally: only our processor turns it on
    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=2,
                                   attention_head_dim=128, num_attention_heads=2, joint_attention_dim=256,
                                   pooled_projection_dim=64, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
    inject_and_load(model, LoraSettings(rank=8, alpha=8))
    model = model.to(device, torch.bfloat16)
    for p in lora_parameters(model).values():
        p.data = p.data.float()
    use_attention(model, attention, device)
    if compiled:
        for block in [*model.transformer_blocks, *model.single_transformer_blocks]:
            block.compile(dynamic=False)
    params = list(lora_parameters(model).values())
    opt = torch.optim.AdamW(params, lr=1e-3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 32 * 32, 64, generator=g).to(device, torch.bfloat16)  # 1024 image tokens, as 512 px
    t5 = torch.randn(1, 128, 256, generator=g).to(device, torch.bfloat16)
    pooled = torch.randn(1, 64, generator=g).to(device, torch.bfloat16)
    losses, grads, ops = [], {}, set()
    for step in range(STEPS):
        profiler = torch.profiler.profile() if step == STEPS - 1 else contextlib.nullcontext()
        with profiler:
            _step(model, opt, x, t5, pooled, losses, device)
        if step == STEPS - 1:
            ops = {e.name for e in profiler.events() if "scaled_dot_product" in e.name}
        grads = {n: p.grad.float().cpu() for n, p in lora_parameters(model).items()}
        opt.step()
    torch.cuda.synchronize()
    return {"losses": losses, "grads": grads, "ops": ops}


def _step(model, opt, x, t5, pooled, losses: list[float], device) -> None:
    """One forward and backward; its loss is appended to `losses`."""
    from fluxlora.training import flow as fm

    opt.zero_grad()
    with torch.autocast("cuda", torch.bfloat16):
        out = model(hidden_states=x, encoder_hidden_states=t5, pooled_projections=pooled,
                    timestep=torch.tensor([0.5], device=device), img_ids=fm.image_ids(64, 64, device),
                    txt_ids=torch.zeros(128, 3, device=device), guidance=torch.tensor([3.5], device=device),
                    return_dict=False)[0]
    loss = (out.float() ** 2).mean()
    loss.backward()
    losses.append(loss.item())


def _in_own_process(attention: str, compiled: bool = False) -> dict:
    with mp.get_context("spawn").Pool(1) as pool:
        return pool.apply(_train, (attention, compiled))


CUDNN_OPS = {"aten::_scaled_dot_product_cudnn_attention", "aten::_scaled_dot_product_cudnn_attention_backward"}


@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
def test_cudnn_attention_trains_the_lora_flash_trains(compiled):
    flash, cudnn = _in_own_process("default"), _in_own_process("cudnn", compiled)
    assert CUDNN_OPS <= cudnn["ops"], cudnn["ops"]
    assert not CUDNN_OPS & flash["ops"], flash["ops"]
    torch.testing.assert_close(torch.tensor(cudnn["losses"]), torch.tensor(flash["losses"]), rtol=2e-2, atol=1e-4)
    for k, want in flash["grads"].items():
        got = cudnn["grads"][k]
        assert (got - want).norm() <= 3e-2 * want.norm() + 1e-6, k
