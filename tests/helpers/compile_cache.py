"""Runs a compiled step twice with dynamo's in-memory state reset between, so that the second run has only the
on-disk caches: what a warm start of a new process has."""

from __future__ import annotations

from typing import Callable, TypeVar

import torch

T = TypeVar("T")


def cold_then_warm(step: Callable[[], T]) -> tuple[T, T]:
    """`step()` run cold, then again after `torch._dynamo.reset()`; asserts that AOTAutograd saved its one graph the
    first time and loaded it from its cache the second. Returns both results."""
    from torch._dynamo.utils import counters

    results = []
    for want in ("autograd_cache_saved", "autograd_cache_hit"):
        torch._dynamo.reset()
        counters.clear()
        results.append(step())
        assert counters["aot_autograd"][want] == 1, dict(counters["aot_autograd"])
    return results[0], results[1]
