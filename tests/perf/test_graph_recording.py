"""The indexed alias lookups answer exactly as torch's own scans do, on a path that grows and whose outputs die."""

import random

import pytest

pytest.importorskip("torch._inductor.cudagraph_trees")
from torch._inductor.cudagraph_trees import CUDAGraphNode  # noqa: E402

from fluxlora.perf import graph_recording as gr  # noqa: E402


class _Ref:
    """A recorded output's weak reference as torch's StorageWeakRefWrapper answers: a fixed address, and the
    storage while it lives."""

    def __init__(self, ptr: int):
        self.ptr, self.alive = ptr, True

    def data_ptr(self) -> int:
        return self.ptr

    def __call__(self):
        return object() if self.alive else None


class _Storage:
    def __init__(self, ptr: int):
        self.ptr = ptr

    def data_ptr(self) -> int:
        return self.ptr


class _Tensor:
    def __init__(self, ptr: int):
        self.storage = _Storage(ptr)

    def untyped_storage(self):
        return self.storage


class _Node:
    """What the lookups read of a CUDAGraphNode: its path's output lists, root first (the last is its own)."""

    def __init__(self, path):
        self.path_weakrefs = path


@pytest.fixture
def originals():
    names = ("_is_cuda_graph_recorded_tensor", "_is_alias_of_live_recorded_tensor")
    torch_own = {n: getattr(CUDAGraphNode, n) for n in names}
    assert gr.index_graph_recording()
    assert CUDAGraphNode._is_alias_of_live_recorded_tensor is gr._is_alias_of_live_recorded_tensor
    yield torch_own
    gr.restore_graph_recording()
    assert all(getattr(CUDAGraphNode, n) is fn for n, fn in torch_own.items())


def test_the_lookups_match_torch_while_the_path_grows_and_outputs_die(originals):
    rng = random.Random(0)
    path = [[], [], []]
    node = _Node(path)
    for _ in range(400):
        level = rng.randrange(len(path))
        # shared addresses (views, reused blocks) and None entries, as recorded paths have
        path[level].append(None if rng.random() < 0.1 else _Ref(rng.randrange(40)))
        for refs in path:
            for ref in refs:
                if ref is not None and rng.random() < 0.05:
                    ref.alive = not ref.alive
        for ptr in range(45):
            t = _Tensor(ptr)
            assert gr._is_cuda_graph_recorded_tensor(node, t) == originals["_is_cuda_graph_recorded_tensor"](node, t)
            assert (gr._is_alias_of_live_recorded_tensor(node, t)
                    == originals["_is_alias_of_live_recorded_tensor"](node, t))
    assert any(gr._is_alias_of_live_recorded_tensor(node, _Tensor(p)) is not None for p in range(40))


def test_a_reconstructed_output_is_found_through_its_new_reference(originals):
    old = _Ref(7)
    path = [[old]]
    node = _Node(path)
    assert gr._is_alias_of_live_recorded_tensor(node, _Tensor(7)) == (0, 0)
    old.alive = False
    assert gr._is_alias_of_live_recorded_tensor(node, _Tensor(7)) is None
    path[0][0] = _Ref(7)  # torch puts back a reference to the same storage when it reconstructs an output
    assert gr._is_alias_of_live_recorded_tensor(node, _Tensor(7)) == (0, 0)


def test_a_node_without_the_path_it_knows_is_asked_of_torch(originals, monkeypatch):
    calls = []
    monkeypatch.setitem(gr._ORIGINALS, "_is_alias_of_live_recorded_tensor", lambda node, t: calls.append(t) or None)
    assert gr._is_alias_of_live_recorded_tensor(object(), _Tensor(3)) is None and len(calls) == 1
