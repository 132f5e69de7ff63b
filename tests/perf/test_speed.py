"""Correctness guard for speed knobs: the optimized path's loss curve matches the plain path's."""

import os

import pytest
import torch

from fluxlora.training.flow import FlowConfig
from fluxlora.lora.inject import LoraSettings
from fluxlora.models import tiny
from fluxlora.training.module import FluxLoRAModule
from fluxlora.perf.speed import SpeedSettings, apply_speed_settings
from helpers.memory_helpers import OPTIM, train_steps


def _loss_curve(speed: SpeedSettings, steps: int = 4) -> list[float]:
    transformer = tiny.build()["transformer"]
    module = FluxLoRAModule(transformer, LoraSettings(rank=4, alpha=4), FlowConfig(), OPTIM, total_steps=steps)
    apply_speed_settings(transformer, speed)
    return train_steps(module, steps)["losses"]


BF16_EPS = 2**-8  # the tolerance a bf16 run has anyway


@pytest.mark.slow
def test_compiled_blocks_follow_the_eager_loss_curve():
    torch._dynamo.reset()
    plain = _loss_curve(SpeedSettings())
    compiled = _loss_curve(SpeedSettings(compile_blocks=True, compile_scope="blocks"))
    # fp32 on the CPU; compiled kernels reorder reductions and Adam amplifies that a little each step
    assert compiled == pytest.approx(plain, rel=BF16_EPS)
    assert plain[-1] != plain[0]  # the LoRA trained: the comparison covers updated weights


def test_bad_settings_are_rejected_and_auto_compiles_on_cuda_only():
    with pytest.raises(ValueError, match="compile_scope"):
        SpeedSettings(compile_blocks=True, compile_scope="layers")
    with pytest.raises(ValueError, match="compile_blocks"):
        SpeedSettings(compile_blocks="yes")
    with pytest.raises(ValueError, match="cannot both"):
        SpeedSettings(compile_blocks=True, compile_mode="max-autotune", compile_options={"cpp_wrapper": True})
    auto = SpeedSettings(compile_blocks="auto")
    assert auto.compiles("cuda") and not auto.compiles("cpu") and SpeedSettings(compile_blocks=True).compiles("cpu")
    assert not auto.compiles("cuda", "nf4") and auto.compiles("cuda", "fp8")
    transformer = tiny.build()["transformer"]
    apply_speed_settings(transformer, auto, device="cpu")
    assert not hasattr(transformer.transformer_blocks[0].forward, "_torchdynamo_orig_callable")


@pytest.mark.parametrize("dynamic, shapes, symbolic", [(False, 3, False), (True, 1, True), ("auto", 1, False),
                                                       ("auto", 3, True)])
def test_dynamic_shapes_reaches_torch_compile(monkeypatch, dynamic, shapes, symbolic):
    """speed.dynamic_shapes picks symbolic sizes (dynamic=None, marked by `_sizes_dynamic`) over fixed sizes (False)
    for every block; auto, where the training batches come in more than one shape. The graphs it makes are measured
    in bench (compiling here would cost minutes of CI)."""
    from fluxlora.perf import speed

    seen = []
    monkeypatch.setattr(speed.torch, "compile", lambda fn, **kw: seen.append(kw["dynamic"]) or fn)
    with pytest.raises(ValueError, match="dynamic_shapes"):
        SpeedSettings(dynamic_shapes="yes")
    transformer = tiny.build()["transformer"]
    decided = apply_speed_settings(transformer, SpeedSettings(compile_blocks=True, dynamic_shapes=dynamic),
                                   device="cpu", step_shapes=shapes)
    n = len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)
    assert decided.dynamic_shapes == symbolic and seen == [None if symbolic else False] * n


def test_run_config_applies_compile_blocks(make_cfg):
    from fluxlora.run.build import build_module

    cfg = make_cfg("speed.compile_blocks=true")
    transformer = tiny.build()["transformer"]
    build_module(cfg, transformer, torch.device("cpu"), torch.float32, steps=2)
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    assert all(hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks)  # compiled lazily, at the first step


@pytest.mark.parametrize("count", [8, 7])
def test_a_run_hands_the_number_of_batch_shapes_it_trains_on_to_the_speed_plan(make_cfg, monkeypatch, count):
    """`speed.dynamic_shapes: auto` decides on how many batch shapes the run's data comes in: 8 synthetic images in
    batches of 2 are one shape; 7 add a last batch of one."""
    from fluxlora.run import build
    from fluxlora.run.train import run

    handed, trained = [], set()
    plan_for = build.apply_speed_settings
    monkeypatch.setattr(build, "apply_speed_settings",
                        lambda *a, **kw: handed.append(kw["step_shapes"]) or plan_for(*a, **kw))
    step = FluxLoRAModule.training_step
    monkeypatch.setattr(FluxLoRAModule, "training_step",
                        lambda self, batch, i: trained.add(tuple(batch["latents"].shape)) or step(self, batch, i))
    cfg = make_cfg(f"data.count={count}", "trainer.max_epochs=1", "~callbacks.sampler")
    assert run(cfg) is not None
    assert handed == [len(trained)] == [count % 2 + 1]


def test_whole_model_compile_with_block_swap_is_refused(make_cfg, monkeypatch):
    from fluxlora.run import build as train_mod
    from fluxlora.errors import FluxLoraError

    monkeypatch.setattr(train_mod, "enable_block_swap", lambda *a, **k: object())  # as on a GPU with swapping on
    cfg = make_cfg("speed.compile_blocks=true", "speed.compile_scope=model")
    with pytest.raises(FluxLoraError, match="compile_scope=model cannot trace block swapping"):
        train_mod.build_module(cfg, tiny.build()["transformer"], torch.device("cpu"), torch.float32, steps=2)


@pytest.mark.slow
@pytest.mark.parametrize("recompute", ["none", "torch", "graph"])
def test_compiled_blocks_with_block_swap_train_as_eager_and_compile_once_per_block_kind(recompute):
    """Swap hooks stay eager around the compiled forwards; swapped-in weights are new tensors every step and must
    not recompile (the CPU stands in for the GPU with the host transfer backend). With checkpointing recomputed in
    the graph, each block is called once per step and its backward still finds its swapped weights."""
    from torch._dynamo.utils import counters

    from fluxlora.perf.blockswap import BlockSwapper
    from fluxlora.perf.memory import MemorySettings
    from fluxlora.perf.swap_transfer import HostTransfers
    from helpers.memory_helpers import module_for

    mem = MemorySettings(base_storage="fp8", gradient_checkpointing=recompute != "none")
    plain = train_steps(module_for(mem, "single"), steps=3)
    torch._dynamo.reset()
    counters.clear()
    module = module_for(mem, "single")
    swapper = BlockSwapper(module.transformer, [0, 2, 3, 5], HostTransfers())
    decided = apply_speed_settings(module.transformer, SpeedSettings(
        compile_blocks=True, recompute_in_graph=recompute == "graph"), module.perf.checkpoint_every, swapping=True)
    assert decided.recompute_in_graph == (recompute == "graph")
    calls = []
    module.transformer.single_transformer_blocks[1].register_forward_pre_hook(lambda *a: calls.append(1))
    compiled = train_steps(module, steps=3)
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=BF16_EPS)
    for n, w in plain["weights"].items():
        torch.testing.assert_close(compiled["weights"][n], w, rtol=BF16_EPS, atol=1e-5)
    assert swapper.stats["loads"] >= 3 * 4
    assert len(calls) == (6 if recompute == "torch" else 3)  # torch.utils.checkpoint calls the block again
    if recompute == "graph":
        assert swapper.stats["packed"] > 0  # the compiled backward saved the swapped weights as references
    # one graph per block kind (the first single block's inputs are made like the others'), not per block or step
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def _two_shape_steps(module, steps: int = 4) -> dict:
    """`train_steps` with latents alternating between two token counts, as a bucketed dataset feeds them."""
    from helpers.memory_helpers import batch, lora_parameters

    params = lora_parameters(module.transformer)
    opt = torch.optim.AdamW(params.values(), lr=1e-2)
    losses = []
    for step in range(steps):
        b = batch(step)
        if step % 2:
            b["latents"] = torch.cat([b["latents"], b["latents"].flip(-1)], dim=-1)  # 8x16 instead of 8x8
        torch.manual_seed(100 + step)
        loss = module.flow_loss(b)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return {"losses": losses, "weights": {n: p.detach().clone() for n, p in params.items()}}


@pytest.mark.slow
@pytest.mark.parametrize("train_blocks", ["all", "single"])
def test_each_block_kind_compiles_one_graph_per_token_count(train_blocks):
    """The first trainable block and the first single block get inputs shaped like the rest of their kind
    (fluxlora/perf/block_inputs.py): two token counts make two graphs per block kind, where they made four, and
    training matches eager (the extra input gradient is dropped, the joined copy is the same values)."""
    from torch._dynamo.utils import counters

    from helpers.memory_helpers import module_for

    plain = _two_shape_steps(module_for(train_blocks=train_blocks))
    torch._dynamo.reset()
    counters.clear()
    module = module_for(train_blocks=train_blocks)
    apply_speed_settings(module.transformer, SpeedSettings(compile_blocks=True))
    compiled = _two_shape_steps(module)
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=BF16_EPS)
    for n, w in plain["weights"].items():
        torch.testing.assert_close(compiled["weights"][n], w, rtol=BF16_EPS, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 4, dict(counters["stats"])  # 2 kinds x 2 token counts


@pytest.mark.slow
def test_dynamic_shapes_compile_one_graph_per_block_kind_for_every_token_count():
    """`speed.dynamic_shapes=true` marks the blocks' batch and token dimensions dynamic from the first call: two
    token counts make one graph per block kind (two in all; fixed sizes make four, above), training as eager."""
    from torch._dynamo.utils import counters

    from helpers.memory_helpers import module_for

    plain = _two_shape_steps(module_for())
    torch._dynamo.reset()
    counters.clear()
    module = module_for()
    apply_speed_settings(module.transformer, SpeedSettings(compile_blocks=True, dynamic_shapes=True))
    compiled = _two_shape_steps(module)
    assert compiled["losses"] == pytest.approx(plain["losses"], rel=BF16_EPS)
    for n, w in plain["weights"].items():
        torch.testing.assert_close(compiled["weights"][n], w, rtol=BF16_EPS, atol=1e-5)
    assert counters["stats"]["unique_graphs"] == 2, dict(counters["stats"])


def test_block_input_hooks_act_in_training_only():
    """With grad on, the first single block (the first trainable one here) gets its states as views of one tensor
    that require grad, as every later single block does; under no_grad (sampling, validation) they pass as they come."""
    from fluxlora.perf.block_inputs import match_block_inputs
    from helpers.memory_helpers import batch, module_for

    module = module_for(train_blocks="single")
    first, second = module.transformer.single_transformer_blocks[:2]
    match_block_inputs(module.transformer)
    seen = {}
    for name, b in (("first", first), ("second", second)):  # after the product's hooks: what the block receives
        b.register_forward_pre_hook(lambda m, a, k, name=name: seen.__setitem__(name, (
            k["hidden_states"], k["encoder_hidden_states"])), with_kwargs=True)

    def form(x):
        return x.requires_grad, x._base is not None, x.stride()

    with torch.no_grad():
        module.flow_loss(batch(0))
    assert not any(x.requires_grad or x._base is not None for x in seen["first"])
    module.flow_loss(batch(0))
    assert [form(x) for x in seen["first"]] == [form(x) for x in seen["second"]]
    assert all(x.requires_grad and x._base is not None for x in seen["first"])


def _saved_activation_bytes(module) -> int:
    """Bytes autograd saves in one forward, parameters (which exist anyway) not counted."""
    from helpers.memory_helpers import batch

    total = 0

    def pack(t):
        nonlocal total
        if not isinstance(t, torch.nn.Parameter):
            total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        torch.manual_seed(0)
        loss = module.flow_loss(batch(0))
    loss.backward()
    return total


@pytest.mark.slow
def test_recompute_in_graph_keeps_about_what_torch_checkpointing_keeps():
    from fluxlora.perf.memory import MemorySettings
    from helpers.memory_helpers import module_for

    plain = _saved_activation_bytes(module_for(MemorySettings(base_storage="fp8")))
    ckpt = _saved_activation_bytes(module_for(MemorySettings(base_storage="fp8", gradient_checkpointing=True)))
    torch._dynamo.reset()
    module = module_for(MemorySettings(base_storage="fp8", gradient_checkpointing=True))
    apply_speed_settings(module.transformer, SpeedSettings(compile_blocks=True),  # recompute_in_graph: auto
                         module.perf.checkpoint_every)
    train_steps(module, steps=1)  # compiles
    in_graph = _saved_activation_bytes(module)
    assert ckpt < plain / 10
    assert in_graph < 2 * ckpt, (plain, ckpt, in_graph)  # block inputs only, as the checkpoint keeps


def test_speed_plan_resolves_auto_and_refuses_what_cannot_work():
    from fluxlora.perf.speed import plan

    s = SpeedSettings(compile_blocks=True)
    assert plan(s, "cpu", checkpoint_every=1).recompute_in_graph
    assert not plan(s, "cpu", checkpoint_every=2).recompute_in_graph  # one graph per kind: all blocks or none
    assert not plan(SpeedSettings(), "cpu", checkpoint_every=1).recompute_in_graph  # nothing compiled
    with pytest.raises(ValueError, match="checkpoint_every=1"):
        plan(SpeedSettings(compile_blocks=True, recompute_in_graph=True), "cpu", checkpoint_every=2)
    graphs = SpeedSettings(compile_blocks=True, cuda_graphs="auto", graph_scope="blocks")  # step: test_step_graph
    assert plan(graphs, "cuda").cuda_graphs and plan(graphs, "cuda", checkpoint_every=1).cuda_graphs
    assert not plan(graphs, "cpu").cuda_graphs
    assert not plan(graphs, "cuda", swapping=True).cuda_graphs
    assert not plan(graphs, "cuda", checkpoint_every=2).cuda_graphs  # torch.utils.checkpoint calls blocks twice
    assert not plan(graphs, "cuda", processes=2).cuda_graphs  # not measured under DDP: only when asked for
    assert not plan(graphs, "cuda", budgeted=True).cuda_graphs  # their memory lies outside a budget's cap
    assert plan(SpeedSettings(compile_blocks=True, cuda_graphs=True), "cuda", processes=2).cuda_graphs
    with pytest.raises(ValueError, match="a CUDA device"):
        plan(SpeedSettings(compile_blocks=True, cuda_graphs=True), "cpu")
    with pytest.raises(ValueError, match=r"no block swapping \(memory.blocks_to_swap=0\)"):
        plan(SpeedSettings(compile_blocks=True, cuda_graphs=True), "cuda", swapping=True)
    with pytest.raises(ValueError, match="checkpointing inside the compiled graph"):
        plan(SpeedSettings(compile_blocks=True, cuda_graphs=True, recompute_in_graph=False), "cuda",
             checkpoint_every=1)
    with pytest.raises(ValueError, match="compiled blocks"):
        plan(SpeedSettings(compile_mode="reduce-overhead"), "cuda")  # that mode is CUDA graphs too
    with pytest.raises(ValueError, match="does not replay CUDA graphs"):
        SpeedSettings(cuda_graphs=True, compile_mode="max-autotune-no-cudagraphs")
    with pytest.raises(ValueError, match="cuda_graphs"):
        SpeedSettings(cuda_graphs="always")
    # symbolic sizes: auto where the batches come in several shapes, on FLUX.1 / Kontext, and only when compiling
    assert plan(s, "cpu", step_shapes=2).dynamic_shapes and not plan(s, "cpu", step_shapes=1).dynamic_shapes
    assert not plan(s, "cpu", step_shapes=2, chroma=True).dynamic_shapes  # caption lengths vary too: not measured
    assert plan(SpeedSettings(compile_blocks=True, dynamic_shapes=True), "cpu", chroma=True).dynamic_shapes
    assert not plan(SpeedSettings(compile_blocks=False), "cpu", step_shapes=3).dynamic_shapes
    assert not plan(SpeedSettings(compile_blocks=True, dynamic_shapes=False), "cpu", step_shapes=3).dynamic_shapes


def test_cuda_graph_runs_keep_gradients_in_their_own_memory():
    """Under CUDA graphs a gradient stolen from a graph's output would be overwritten by the next replay: the
    module gives gradients their own memory before the first backward and zeroes them in place (the CPU runs the
    same Lightning path; only the replay itself needs a GPU)."""
    import lightning as L

    from fluxlora.lora.inject import lora_parameters
    from helpers.memory_helpers import batch, module_for

    module = module_for()
    module.perf.cuda_graphs = True
    params = list(lora_parameters(module.transformer).values())
    seen = []

    class Record(L.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            seen.append([(p.grad.data_ptr(), p.grad.abs().sum().item()) for p in params])

    data = [batch(i, n=1) for i in range(3)]
    loader = torch.utils.data.DataLoader(data, batch_size=None)
    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=[Record()])
    trainer.fit(module, loader)
    assert len(seen) == 3
    assert [ptr for ptr, _ in seen[0]] == [ptr for ptr, _ in seen[2]]  # the same buffers every step
    assert all(sum(norm for _, norm in step) > 0 for step in seen)


def test_fused_adamw_is_clipped_under_bf16_where_lightning_refuses_it():
    """Lightning refuses clipping for every fused optimizer under mixed precision (it may hold a GradScaler);
    bf16 has none, so the module clips itself, and the clipped norm is what the optimizer sees."""
    import lightning as L
    from omegaconf import OmegaConf

    from fluxlora.lora.inject import lora_parameters
    from helpers.memory_helpers import OPTIM, batch, module_for

    module = module_for()
    module.optim_cfg = OmegaConf.merge(OPTIM, {"kwargs": {"fused": True}})
    norms = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            norms.append(pl_module.last_norm)

    real_step = torch.optim.AdamW.step

    def step(opt, closure=None):
        if closure is not None:
            closure()  # Lightning clips inside the closure it hands the optimizer
        grads = [p.grad for p in lora_parameters(module.transformer).values()]
        module.last_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        return real_step(opt)

    data = [batch(i, n=1) for i in range(2)]
    trainer = L.Trainer(accelerator="cpu", max_steps=2, logger=False, enable_checkpointing=False,
                        precision="bf16-mixed", gradient_clip_val=1e-3, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[Record()])
    import unittest.mock

    with unittest.mock.patch.object(torch.optim.AdamW, "step", step):
        trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=None))
    assert trainer.optimizers[0].defaults["fused"]
    assert len(norms) == 2 and all(n == pytest.approx(1e-3, rel=1e-2) for n in norms), norms


def test_eager_blocks_runs_compiled_blocks_uncompiled_and_puts_them_back():
    """Sampling between steps renders through the training transformer: its blocks run eagerly there (inference
    shapes would otherwise compile, and record CUDA graphs, beside the training ones)."""
    from fluxlora.perf.speed import eager_blocks

    transformer = tiny.build()["transformer"]
    apply_speed_settings(transformer, SpeedSettings(compile_blocks=True))
    blocks = list(transformer.transformer_blocks) + list(transformer.single_transformer_blocks)
    compiled = [b.forward for b in blocks]
    with eager_blocks(transformer):
        assert not any(hasattr(b.forward, "_torchdynamo_orig_callable") for b in blocks)
    assert [b.forward for b in blocks] == compiled
    with pytest.raises(RuntimeError), eager_blocks(transformer):
        raise RuntimeError("a failed render")
    assert [b.forward for b in blocks] == compiled  # restored on the error path too


def test_the_compile_cache_goes_where_speed_compile_cache_says(monkeypatch, tmp_path):
    """A stable Inductor cache lets a resumed or repeated run load its graphs instead of compiling them."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from fluxlora.perf.speed import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    assert use_compile_cache(str(tmp_path / "c")) == str(tmp_path / "c")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "c") and (tmp_path / "c").is_dir()
    # Inductor writes its own default into the environment when it first compiles: that is replaced
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", default_cache_dir())
    assert use_compile_cache(str(tmp_path / "d")) == str(tmp_path / "d")
    # a folder the user named in the environment wins
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "mine"))
    assert use_compile_cache(str(tmp_path / "e")) == str(tmp_path / "mine")
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "mine")
    # null keeps torch's default
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR")
    assert use_compile_cache(None) == default_cache_dir() and "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_graphs_with_fp8_weights_are_loaded_from_the_compile_cache(monkeypatch, tmp_path):
    """An fp8-stored Linear runs through a custom autograd.Function, which AOTAutograd's cache skips by default:
    a warm run then traced every block's joint graph again (fluxlora.perf.speed._cache_custom_autograd_functions)."""
    from helpers.compile_cache import cold_then_warm

    from fluxlora.perf.fp8 import store_fp8
    from fluxlora.perf.speed import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    use_compile_cache(str(tmp_path / "cache"))

    def step() -> torch.Tensor:
        torch.manual_seed(0)
        block = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 16))
        holder = torch.nn.Module()
        holder.single_transformer_blocks = torch.nn.ModuleList([block])  # where store_fp8 looks for Linears
        assert store_fp8(holder, torch.bfloat16) == 2
        x = torch.randn(4, 16, dtype=torch.bfloat16, requires_grad=True)
        torch.compile(block, fullgraph=True)(x).float().square().sum().backward()
        return x.grad

    cold, warm = cold_then_warm(step)
    torch.testing.assert_close(warm, cold, rtol=0, atol=0)


def test_a_compile_cache_that_cannot_be_created_warns_and_keeps_the_default(monkeypatch, tmp_path, caplog):
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    from fluxlora.perf.speed import use_compile_cache

    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    (tmp_path / "file").write_text("in the way")
    with caplog.at_level("WARNING", logger="fluxlora.perf.speed"):
        assert use_compile_cache(str(tmp_path / "file" / "cache")) == default_cache_dir()
    assert "speed.compile_cache" in caplog.text and "cannot be created" in caplog.text
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ


def test_the_shipped_config_keeps_the_compile_cache_in_the_users_cache_folder(make_cfg):
    from fluxlora.run.settings import check_config

    assert check_config(make_cfg()).speed.compile_cache == "~/.cache/fluxlora/compile"
    assert check_config(make_cfg("speed.compile_cache=null")).speed.compile_cache is None
