"""GPU checks of the memory tools (skipped on the CPU; run with CUDA_VISIBLE_DEVICES=0, conftest hides GPUs
otherwise): block swapping trains the same LoRA as without it within bf16 tolerance, through the real CUDA backend
(pinned host memory, copy stream, events), in a bare step loop and in a whole `fluxlora.run.train.run`.
With fluxlora installed from a wheel rather than editable, run `python -P -m pytest` so the checkout's bare
`fluxlora/` (which lacks the `fluxlora.callbacks` mapping) does not shadow the install. On the H200 (2026-12-01,
seventh session) 7 of these 9 passed, the whole-run block-swap test among them; both CUDA-graph whole runs failed with
`CUDA driver error: invalid argument` from Inductor's static Triton launcher while it captured a backward graph of the
tiny model (the full-size model captures and replays in bench/speed.py, same call). With the static
launcher off (`TORCHINDUCTOR_USE_STATIC_CUDA_LAUNCHER=0`) the gc-off case passed alone; the test now turns it off
itself (the gc-on case was not re-run: no device time left). The 7 older ones passed on the H100 on 2026-11-25."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fluxlora.perf.cuda_setup import prepare_cuda
from fluxlora.errors import StageTimeoutError
from fluxlora.training.flow import FlowConfig
from fluxlora.lora.inject import LoraSettings, lora_parameters
from fluxlora.perf.memory import MemorySettings, apply_memory_settings, enable_block_swap
from fluxlora.models import tiny
from fluxlora.training.module import FluxLoRAModule
from fluxlora.perf.swap_transfer import CudaTransfers
from helpers.memory_helpers import OPTIM, batch

pytestmark = pytest.mark.gpu
# wider than the tiny model so kernels and copies are real work; LoRA inputs stay the tiny caches' widths
CONFIG = dict(tiny.TRANSFORMER, num_layers=4, num_single_layers=8, attention_head_dim=64, num_attention_heads=4,
              axes_dims_rope=(16, 24, 24))
BF16_RTOL = 2e-2  # a few bf16 ulps on the LoRA's change over the run


def _train(memory: MemorySettings, steps: int = 4, backend=None) -> tuple[dict, dict, object]:
    from diffusers import FluxTransformer2DModel

    device = torch.device("cuda", torch.cuda.current_device())
    prepare_cuda(device)
    torch.manual_seed(0)
    model = FluxTransformer2DModel(**CONFIG).to(torch.bfloat16).eval()  # on the host, as a swap run reads it
    apply_memory_settings(model, memory, torch.bfloat16, device)
    torch.manual_seed(1)
    module = FluxLoRAModule(model, LoraSettings(rank=4, alpha=4), FlowConfig(), OPTIM, total_steps=steps,
                            compute_dtype=torch.bfloat16)
    start = {n: p.detach().clone() for n, p in lora_parameters(model).items()}
    swapper = enable_block_swap(model, memory, device)
    if backend is not None and swapper is not None:
        swapper.backend = backend
    module.to(device)
    opt = torch.optim.AdamW(lora_parameters(model).values(), lr=1e-2)
    for step in range(steps):
        torch.manual_seed(100 + step)
        loss = module.flow_loss(batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    assert torch.isfinite(loss)
    return start, {n: p.detach().cpu() for n, p in lora_parameters(model).items()}, swapper


def _delta_error(start: dict, a: dict, b: dict) -> float:
    da = torch.cat([(a[n] - start[n].cpu()).flatten() for n in a])
    db = torch.cat([(b[n] - start[n].cpu()).flatten() for n in a])
    return ((da - db).norm() / db.norm()).item()


@pytest.mark.parametrize("gc_on", [False, True])
def test_block_swap_trains_the_same_lora_on_the_gpu(gc_on):
    plain_mem = MemorySettings(base_storage="fp8", gradient_checkpointing=gc_on)
    swap_mem = MemorySettings(base_storage="fp8", gradient_checkpointing=gc_on, blocks_to_swap=4)
    start, plain, _ = _train(plain_mem)
    _, swapped, swapper = _train(swap_mem)
    assert swapper is not None and swapper.stats["loads"] >= 4 * len(swapper.swapped)
    # off the device after the run, except the next step's first blocks, which load when backward ends
    warm = set(swapper.schedule.swapped[: swapper.schedule.prefetch + 1])
    assert swapper.schedule.resident <= warm
    assert all(m._parameters[p] is None for pos, sb in swapper.swapped.items() if pos not in warm
               for m, p, _ in sb.slots)
    assert _delta_error(start, swapped, plain) < BF16_RTOL


def test_a_stuck_cuda_copy_fails_within_its_timeout():
    class Stuck(CudaTransfers):
        def ready(self, transfer):
            return False

    device = torch.device("cuda", torch.cuda.current_device())
    mem = MemorySettings(base_storage="fp8", blocks_to_swap=2, swap_timeout_s=0.5)
    with pytest.raises(StageTimeoutError, match=r"transformer_blocks\.\d+ .*0\.5s|0\.5s.*transformer_blocks"):
        _train(mem, steps=1, backend=Stuck(device))


def test_nf4_trains_on_the_gpu():
    _, weights, _ = _train(MemorySettings(base_storage="nf4", gradient_checkpointing=True), steps=2)
    assert all(torch.isfinite(w).all() for w in weights.values())


def _run_lora(make_cfg, name: str, *overrides: str) -> dict:
    """A 4-step GPU run of the tiny model with `overrides`; the LoRA file it wrote."""
    from safetensors.torch import load_file

    from fluxlora.run.train import run

    cfg = make_cfg("trainer.accelerator=gpu", "trainer.max_steps=4", "~callbacks.sampler", "memory.base_storage=fp8",
                   *overrides, f"name={name}")
    run(cfg)
    return load_file(str(Path(cfg.output.dir) / f"{name}.safetensors"))


def _assert_same_lora(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for k in want:
        torch.testing.assert_close(got[k].float(), want[k].float(), rtol=BF16_RTOL, atol=1e-3)


def test_a_run_with_block_swap_writes_the_same_lora(make_cfg):
    plain = _run_lora(make_cfg, "swap0", "memory.blocks_to_swap=0", "memory.gradient_checkpointing=true")
    swapped = _run_lora(make_cfg, "swap2", "memory.blocks_to_swap=2", "memory.gradient_checkpointing=true")
    _assert_same_lora(swapped, plain)


@pytest.mark.parametrize("scope", ["blocks", "step"])
@pytest.mark.parametrize("gc_on", [False, True])
def test_a_run_with_cuda_graphs_writes_the_same_lora_as_eager(make_cfg, gc_on, scope, monkeypatch):
    """CUDA graphs of each compiled block, or of the whole step (`speed.graph_scope`; with checkpointing
    recomputed inside the compiled blocks when on), train the LoRA that eager blocks train, through the whole run
    (Lightning's loop, gradient clipping, fused AdamW)."""
    from torch._inductor import config as inductor_config

    from fluxlora.run.build import build_module

    # the static launcher failed to launch a tiny backward kernel under capture on the H200 (module docstring)
    monkeypatch.setattr(inductor_config, "use_static_cuda_launcher", False)
    common = (f"memory.gradient_checkpointing={gc_on}", "speed.cuda_graphs=auto", f"speed.graph_scope={scope}")
    cfg = make_cfg("trainer.accelerator=gpu", *common, "speed.compile_blocks=true")
    module, _ = build_module(cfg, tiny.build()["transformer"], torch.device("cuda"), torch.bfloat16, 4)
    assert (module.perf.cuda_graphs, module.perf.step_graphs is not None) == (scope == "blocks", scope == "step")
    from fluxlora.perf.step_graph import StepGraphs

    captures, capture = [], StepGraphs._capture

    def counted(self, *args):
        entry = capture(self, *args)
        captures.append(entry is not None)
        return entry

    monkeypatch.setattr(StepGraphs, "_capture", counted)
    eager = _run_lora(make_cfg, "eager", *common, "speed.compile_blocks=false")
    graphs = _run_lora(make_cfg, "graphs", *common, "speed.compile_blocks=true")
    _assert_same_lora(graphs, eager)
    assert all(captures) and bool(captures) == (scope == "step")  # each shape captured on its second step


def test_memory_budget_caps_the_allocator_and_is_what_the_run_reads():
    """`memory.budget_gb` caps the allocator at budget - 1 GiB - 64 MiB: an allocation past it fails, and the cap is
    the limit fluxlora reads (mem_get_info does not see it). In a child process: the cap is per process."""
    import subprocess
    import sys

    code = """
import torch
from fluxlora.perf.cuda_setup import CONTEXT_RESERVE, PAGE_SLACK, available_memory, memory_limit, prepare_cuda
d = torch.device("cuda", 0)
prepare_cuda(d, 4.0)
cap = 4 * 2**30 - CONTEXT_RESERVE - PAGE_SLACK
assert memory_limit(d) == cap, memory_limit(d)
assert available_memory(d) <= cap < torch.cuda.mem_get_info(d)[0]
x = torch.empty(cap - (256 << 20), dtype=torch.uint8, device=d)
try:
    torch.empty(512 << 20, dtype=torch.uint8, device=d)
    raise SystemExit("allocated past the cap")
except torch.OutOfMemoryError:
    pass
assert torch.cuda.max_memory_reserved(d) <= cap
print("ok")
"""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stdout + r.stderr


def test_staged_encoders_hold_one_encoder_on_the_device_at_a_time():
    """The staging order on a real device: whenever an encoder runs, it is on the GPU and the other two are on the
    host; when caching is done, none is left on the GPU."""
    from omegaconf import OmegaConf

    from fluxlora.models.encode import StagedEncoders
    from fluxlora.models import load_components

    device = torch.device("cuda", torch.cuda.current_device())
    comps = load_components(OmegaConf.create({"source": "tiny", "t5_max_length": 16}))
    parts = {"vae": comps.vae, "clip": comps.text_encoder, "t5": comps.text_encoder_2}
    seen = []

    def where() -> dict:
        return {k: {p.device.type for p in m.parameters()} for k, m in parts.items()}

    for name, m in (("vae", comps.vae.encoder), ("clip", comps.text_encoder), ("t5", comps.text_encoder_2)):
        m.register_forward_pre_hook(lambda mod, a, name=name: seen.append((name, where())))
    enc = StagedEncoders(comps, device, 16)
    with enc.stage("vae"):
        enc.images([torch.rand(3, 64, 64).numpy()])
    enc.texts(["a red circle", "a blue square"])
    assert [n for n, _ in seen] == ["vae", "clip", "t5"]
    for name, devices in seen:
        assert devices == {k: {"cuda" if k == name else "cpu"} for k in parts}, (name, devices)
    assert where() == {k: {"cpu"} for k in parts}  # every encoder left the device
