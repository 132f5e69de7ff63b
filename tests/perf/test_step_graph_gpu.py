"""The whole training step as one CUDA graph (`fluxlora.perf.step_graph`, `speed.graph_scope=step`) on a GPU
(skipped on the CPU; run with CUDA_VISIBLE_DEVICES=0): replays compute what the eager step computes, for several
shapes sharing one memory pool in any order, with gradients accumulated in place and the RNG advancing per replay.
The whole-run check (Lightning, clipping, fused AdamW, a compiled tiny Flux) is in test_memory_gpu.py."""

from __future__ import annotations

import copy

import pytest
import torch

from fluxlora.perf.step_graph import StepGraphs

pytestmark = pytest.mark.gpu


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(64, 256), torch.nn.GELU(), torch.nn.Linear(256, 64)).cuda()


def _step(model: torch.nn.Module, noise: bool = False):
    params = list(model.parameters())

    def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        for p in params:  # what the module does: gradients of their own, zeroed inside the step
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        torch._foreach_zero_([p.grad for p in params])
        x = inputs["x"] + (torch.randn_like(inputs["x"]) if noise else 0)
        loss = (model(x) - inputs["y"]).pow(2).mean()
        loss.backward()
        return loss.detach()

    return step


def test_replays_match_the_eager_step_over_shapes_in_any_order():
    graphed, eager = _model(), None
    eager = copy.deepcopy(graphed)
    graphs = StepGraphs()
    run_graphed, run_eager = _step(graphed), _step(eager)
    g = torch.Generator(device="cuda").manual_seed(3)
    for n in (4, 4, 8, 4, 8, 8, 16, 4, 16, 16):
        inputs = {"x": torch.randn(n, 64, device="cuda", generator=g),
                  "y": torch.randn(n, 64, device="cuda", generator=g)}
        got, want = graphs(run_graphed, inputs), run_eager(inputs)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
        for p, q in zip(graphed.parameters(), eager.parameters()):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-6)
        with torch.no_grad():  # an update between steps, as the optimizer makes: replays read the new weights
            for p, q in zip(graphed.parameters(), eager.parameters()):
                p.sub_(0.01 * p.grad)
                q.sub_(0.01 * q.grad)
    assert graphs.captured == 3 and graphs.failed is None


def test_the_rng_advances_with_each_replay():
    graphs = StepGraphs()
    step = _step(_model(), noise=True)
    inputs = {"x": torch.zeros(4, 64, device="cuda"), "y": torch.zeros(4, 64, device="cuda")}
    losses = [float(graphs(step, inputs)) for _ in range(4)]
    assert graphs.captured == 1
    assert len(set(losses)) == 4, losses  # fresh noise every step, replayed or not
