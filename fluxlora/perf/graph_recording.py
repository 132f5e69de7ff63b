"""Indexed alias lookups for the recording of Inductor's CUDA graphs (cudagraph trees).

Why by hand: while a step records its graphs, torch compares every input and output of each new graph with every
output recorded before it in the step, one Python call per pair (`CUDAGraphNode._is_cuda_graph_recorded_tensor` and
`._is_alias_of_live_recorded_tensor`). A Flux step is 114 graphs (57 blocks, forward and backward) with ~2,200
recorded outputs, so the work grows with the square of the step. A cProfile of the recording step
(`bench/speed.py --res 1024 --compile 1 --cudagraphs 1 --profile-step 1`, H200, torch 2.11, 2026-12-02) spent 50 of
its 60 s in those two methods: 21 M weak-reference checks. A run records once per bucket shape, so every new shape
waited for it.

The replacements answer the same questions from an index of the path's outputs by storage address, rebuilt when the
path grows; the liveness of each candidate is still asked of torch's own weak reference at the time of the call.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

log = logging.getLogger(__name__)

# node -> (shape of its path when indexed, {storage address: [(depth, output index), ...] in torch's scan order})
_INDEXES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_ORIGINALS: dict[str, Any] = {}


def _path_index(node: Any) -> dict[int, list[tuple[int, int]]]:
    """The node's recorded outputs by storage address. A path only grows (nodes append to their output lists and
    put back a reference to the same storage when they reconstruct one), so its number of levels and outputs says
    whether the index is current."""
    path = node.path_weakrefs
    shape = (len(path), sum(map(len, path)))
    cached = _INDEXES.get(node)
    if cached is not None and cached[0] == shape:
        return cached[1]
    index: dict[int, list[tuple[int, int]]] = {}
    for depth, refs in enumerate(path):
        for i, ref in enumerate(refs):
            if ref is not None:
                index.setdefault(ref.data_ptr(), []).append((depth, i))
    _INDEXES[node] = (shape, index)
    return index


def _is_cuda_graph_recorded_tensor(node: Any, t) -> bool:
    """Is `t`'s storage an output of a graph in this path (live or not: recorded memory is never released)."""
    if not hasattr(node, "path_weakrefs"):  # a torch whose nodes keep their path otherwise: its own scan
        return _ORIGINALS["_is_cuda_graph_recorded_tensor"](node, t)
    return t.untyped_storage().data_ptr() in _path_index(node)


def _is_alias_of_live_recorded_tensor(node: Any, t):
    """(depth, output index) of the first live output in this path that shares `t`'s storage, else None."""
    from torch._inductor.cudagraph_trees import maybe_deref

    if not hasattr(node, "path_weakrefs"):
        return _ORIGINALS["_is_alias_of_live_recorded_tensor"](node, t)
    ptr = t.untyped_storage().data_ptr()
    path = node.path_weakrefs
    for depth, i in _path_index(node).get(ptr, ()):
        ref = path[depth][i]  # read again: a reconstructed output has a new reference (to the same storage)
        if ref is not None and ref.data_ptr() == ptr and maybe_deref(ref) is not None:
            return (depth, i)
    return None


def index_graph_recording() -> bool:
    """Replace the two lookups on `CUDAGraphNode`; False (torch's own left in place, with a note) where this torch
    does not have them as this module knows them."""
    try:
        from torch._inductor.cudagraph_trees import CUDAGraphNode, maybe_deref  # noqa: F401
    except ImportError:
        return False
    names = ("_is_cuda_graph_recorded_tensor", "_is_alias_of_live_recorded_tensor")
    if not all(callable(getattr(CUDAGraphNode, n, None)) for n in names):
        log.info("this torch's CUDA-graph recording differs from the one measured; its own lookups are kept")
        return False
    if not _ORIGINALS:
        _ORIGINALS.update({n: getattr(CUDAGraphNode, n) for n in names})
        CUDAGraphNode._is_cuda_graph_recorded_tensor = _is_cuda_graph_recorded_tensor
        CUDAGraphNode._is_alias_of_live_recorded_tensor = _is_alias_of_live_recorded_tensor
    return True


def restore_graph_recording() -> None:
    """Put torch's own lookups back (benchmarks compare the two)."""
    if not _ORIGINALS:
        return
    from torch._inductor.cudagraph_trees import CUDAGraphNode

    for name, fn in _ORIGINALS.items():
        setattr(CUDAGraphNode, name, fn)
    _ORIGINALS.clear()
    _INDEXES.clear()
