"""Kontext's training input against hand-built expectations: control tokens after the target's, position ids with
1 in the first channel, and the loss on the target's tokens only."""

from __future__ import annotations

import torch

from fluxlora.training import flow as fm
from fluxlora.training.kontext import append_control, control_ids, target_part


def test_control_ids_mark_the_first_channel_and_keep_rows_and_columns():
    ids = control_ids(4, 6)
    want = torch.tensor([[1.0, r, c] for r in range(2) for c in range(3)])
    assert torch.equal(ids, want)


def test_control_tokens_follow_the_target_tokens_with_their_own_ids():
    target = torch.randn(2, 16, 4, 4)
    control = torch.randn(2, 16, 2, 6)  # kept at its own size
    tokens, ids = append_control(fm.pack_latents(target), fm.image_ids(4, 4), control)
    assert tokens.shape == (2, 4 + 3, 64)
    assert torch.equal(tokens[:, :4], fm.pack_latents(target))
    assert torch.equal(tokens[:, 4:], fm.pack_latents(control))
    assert torch.equal(ids[:4, 0], torch.zeros(4)) and torch.equal(ids[4:, 0], torch.ones(3))
    assert torch.equal(ids[4:, 1:], torch.tensor([[0.0, 0], [0, 1], [0, 2]]))


def test_the_loss_sees_only_the_target_tokens():
    pred = torch.arange(2 * 7 * 3, dtype=torch.float32).view(2, 7, 3)
    assert torch.equal(target_part(pred, 4), pred[:, :4])
