"""The whole-step CUDA graph's plan and its Lightning path, on the CPU (the capture itself: test_step_graph_gpu.py).

`speed.graph_scope` resolves where a step graph can run and refuses it, naming why, where it cannot. The module's
graphed path (backward inside the step, gradients zeroed by the step where Lightning would zero them) trains the
same LoRA as the plain path, with gradient accumulation and clipping, when the step runs eagerly.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch

from fluxlora.lora.inject import lora_parameters
from fluxlora.perf.speed import SpeedSettings, plan
from fluxlora.perf.step_graph import StepGraphs, signature
from helpers.memory_helpers import batch, module_for


def test_graph_scope_resolves_to_the_step_where_it_can_and_to_blocks_elsewhere():
    graphs = SpeedSettings(compile_blocks=True, cuda_graphs="auto")
    step = plan(graphs, "cuda")
    assert step.step_graphs and not step.cuda_graphs  # FLUX.1, one process: the whole step
    chroma = plan(graphs, "cuda", chroma=True)
    assert chroma.cuda_graphs and not chroma.step_graphs  # its step reads caption lengths on the host
    forced = SpeedSettings(compile_blocks=True, cuda_graphs=True)
    ddp = plan(forced, "cuda", processes=2)
    assert ddp.cuda_graphs and not ddp.step_graphs  # the all-reduce is not captured
    trees = plan(SpeedSettings(compile_blocks=True, compile_mode="reduce-overhead"), "cuda")
    assert trees.cuda_graphs and not trees.step_graphs  # that mode records per block itself
    blocks = plan(SpeedSettings(compile_blocks=True, cuda_graphs="auto", graph_scope="blocks"), "cuda")
    assert blocks.cuda_graphs and not blocks.step_graphs
    off = plan(graphs, "cuda", budgeted=True)
    assert not off.cuda_graphs and not off.step_graphs  # no graphs of either scope under a budget


def test_graph_scope_step_is_refused_where_it_cannot_be():
    step = SpeedSettings(compile_blocks=True, cuda_graphs=True, graph_scope="step")
    with pytest.raises(ValueError, match=r"graph_scope=step needs FLUX.1 or Kontext .*use speed.graph_scope=blocks"):
        plan(step, "cuda", chroma=True)
    with pytest.raises(ValueError, match="one process"):
        plan(step, "cuda", processes=2)
    with pytest.raises(ValueError, match="graph_scope='x' is not one of auto, step, blocks"):
        SpeedSettings(graph_scope="x")


def test_step_graphs_run_each_key_eagerly_until_captured():
    """The first `warmup` calls of a key run the function itself; without CUDA the capture fails, is logged once,
    and every later call runs eagerly (the answers are the function's either way)."""
    graphs = StepGraphs(warmup=2)
    calls = []

    def fn(inputs):
        calls.append(inputs["x"].shape)
        return inputs["x"].sum()

    a, b = {"x": torch.ones(2)}, {"x": torch.ones(3)}
    assert signature(a) != signature(b)
    assert [float(graphs(fn, a)), float(graphs(fn, a)), float(graphs(fn, b))] == [2.0, 2.0, 3.0]
    assert graphs.captured == 0 and graphs.failed is None
    if not torch.cuda.is_available():
        assert float(graphs(fn, a)) == 2.0  # the third call of `a` tries to capture
        assert graphs.failed is not None and graphs.captured == 0
        assert float(graphs(fn, b)) == 3.0 and len(calls) == 5
    with pytest.raises(ValueError, match="warmup"):
        StepGraphs(warmup=0)


class _Eager(StepGraphs):
    """Never captures: the graphed path's Lightning plumbing, run on the CPU."""

    def __init__(self) -> None:
        super().__init__(warmup=10**9)


def _train(step_graphs: StepGraphs | None, accumulate: int) -> dict[str, torch.Tensor]:
    module = module_for()
    module.perf.step_graphs = step_graphs
    loader = torch.utils.data.DataLoader([batch(i, n=1) for i in range(8)], batch_size=None)
    torch.manual_seed(5)
    trainer = L.Trainer(accelerator="cpu", max_steps=8 // accumulate, accumulate_grad_batches=accumulate,
                        gradient_clip_val=0.05, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    trainer.fit(module, loader)
    return {n: p.detach().clone() for n, p in lora_parameters(module.transformer).items()}


@pytest.mark.parametrize("accumulate", [1, 2])
def test_the_graphed_path_trains_the_plain_steps_lora(accumulate):
    """Lightning zeroes gradients after `training_step` and calls `backward` after that; in the graphed path both
    happen inside the step. Same seeds, same batches: the same LoRA, with accumulation and clipping on."""
    plain = _train(None, accumulate)
    graphed = _train(_Eager(), accumulate)
    start = {n: p.detach() for n, p in lora_parameters(module_for().transformer).items()}
    assert any(not torch.equal(plain[n], start[n]) for n in plain)  # it trained
    for n in plain:
        torch.testing.assert_close(graphed[n], plain[n], rtol=1e-5, atol=1e-7)
