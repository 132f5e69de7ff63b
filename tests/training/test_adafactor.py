"""BatchedAdafactor takes the same steps as transformers' Adafactor (FluxGym's settings), resumes from its state,
and falls back to transformers' step for settings it does not batch."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers.optimization import Adafactor

from fluxlora.training.adafactor import BatchedAdafactor

FLUXGYM = {"relative_step": False, "scale_parameter": False, "warmup_init": False}
# LoRA-like shapes (several parameters share each), a 1-D one, and a parameter that gets no gradient
SHAPES = [(4, 48), (4, 48), (4, 48), (48, 4), (48, 4), (96, 4), (4, 96), (7,)]


def _params(seed: int = 0) -> list[torch.nn.Parameter]:
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g) * 0.1) for s in SHAPES]


def _run(opt_cls, params, steps: int, start: int = 0, opt=None, **kw):
    opt = opt or opt_cls(params, lr=1e-2, **kw)
    for step in range(start, start + steps):
        g = torch.Generator().manual_seed(100 + step)
        for i, p in enumerate(params):
            p.grad = None if (i == 2 and step % 2) else torch.randn(p.shape, generator=g).to(p.dtype)
        if step == 2:
            for group in opt.param_groups:
                group["lr"] = 5e-3  # a scheduler changing lr between steps
        opt.step()
    return opt


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_same_steps_as_transformers_adafactor(weight_decay):
    ref, got = _params(), _params()
    _run(Adafactor, ref, 5, weight_decay=weight_decay, **FLUXGYM)
    _run(BatchedAdafactor, got, 5, weight_decay=weight_decay)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
    assert any((a - b).abs().max() > 0 for a, b in zip(_params(), got))  # the parameters did move


def test_state_moves_between_the_two_classes_and_resume_continues_exactly():
    ref = _params()
    _run(Adafactor, ref, 5, **FLUXGYM)
    got = _params()
    first = _run(BatchedAdafactor, got, 3)
    saved = copy.deepcopy(first.state_dict())
    resumed = Adafactor(got, lr=1e-2, **FLUXGYM)  # transformers' class reads the batched one's state
    resumed.load_state_dict(saved)
    _run(None, got, 2, start=3, opt=resumed)
    for a, b in zip(ref, got):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)


def test_bf16_parameters_are_updated_through_an_fp32_copy_like_transformers():
    ref = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _params()]
    got = [torch.nn.Parameter(p.detach().to(torch.bfloat16)) for p in _params()]
    _run(Adafactor, ref, 3, **FLUXGYM)
    _run(BatchedAdafactor, got, 3)
    for a, b in zip(ref, got):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b, a, rtol=1e-2, atol=1e-3)


def test_other_settings_use_transformers_step(monkeypatch):
    calls = []
    monkeypatch.setattr(Adafactor, "step", lambda self, closure=None: calls.append(1))
    BatchedAdafactor(_params(), lr=None, relative_step=True, scale_parameter=True).step()
    BatchedAdafactor(_params(), lr=1e-2, beta1=0.9).step()
    assert len(calls) == 2


def test_sparse_gradients_are_refused_like_transformers():
    p = torch.nn.Parameter(torch.zeros(4, 3))
    p.grad = torch.zeros(4, 3).to_sparse()
    with pytest.raises(RuntimeError, match="does not support sparse gradients"):
        BatchedAdafactor([p], lr=1e-2).step()
