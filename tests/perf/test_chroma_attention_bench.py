"""bench/chroma_attention.py on the CPU (small shapes, float32, the math kernel): cutting Chroma's masked padding
gives the attention's outputs and gradients on the tokens that reach the loss unchanged, and its check catches a
cut that drops a caption token."""

from __future__ import annotations

import torch

from helpers.bench import load_bench


def _bench():
    return load_bench("chroma_attention")


def test_cutting_the_padding_keeps_what_reaches_the_loss(monkeypatch):
    bench = _bench()
    rows = bench.run(16, 20, torch.device("cpu"), torch.float32, 1, ["math"], 1e-5)
    checked = {r["variant"]: r["same"] for r in rows if "same" in r}
    assert checked == {"keys": True, "cut64+keys": True, "cut-exact": True}, rows
    assert [r["text_kept"] for r in rows if r["variant"] == "cut-exact"] == [21]  # the caption + its first pad

    monkeypatch.setattr(bench, "variants", lambda caption: {"square": (bench.TEXT, "square"),
                                                           "too-short": (caption, "none")})
    rows = bench.run(16, 20, torch.device("cpu"), torch.float32, 1, ["math"], 1e-5)
    assert [r["same"] for r in rows if r["variant"] == "too-short"] == [False]  # the first pad token counts too
