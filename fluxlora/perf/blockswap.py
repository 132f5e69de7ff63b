"""Block swapping: chosen transformer blocks keep their frozen weights in (pinned) host memory and are streamed to
the device just before they run — in forward, and again in backward (in reverse order).

How backward finds its weights without depending on the block inputs requiring grad (sd-scripts' block swap
relies on full backward hooks on the block, which never fire when its inputs carry no grad, and then fails with
"Expected all tensors to be on the same device"):

- with gradient checkpointing, backward recomputes the block, which calls the block again: the same forward
  pre-hook loads it;
- without it, a `saved_tensors_hooks` pair around the block's forward replaces every saved tensor that *is* one of
  the block's frozen weights (or a view/cast of it that shares its storage) by a small reference; unpacking it in
  backward loads the block. Autograd thus never holds the device copy, which is freed when the block is evicted.

Frozen weights only travel host→device; the device copy is dropped, never copied back. LoRA parameters are not
swapped: they stay on the device like every parameter that requires grad. Every wait for a copy is bounded: a copy
that does not complete within `timeout_s` raises `StageTimeoutError` naming the block.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from fluxlora.perf.checkpointing import block_checkpoint_func, inside_checkpoint, transformer_blocks
from fluxlora.perf.release import release_free_heap
from fluxlora.errors import StageTimeoutError
from fluxlora.perf.swap_schedule import Plan, SwapSchedule
from fluxlora.perf.swap_transfer import HostTransfers, Transfer

log = logging.getLogger(__name__)


@dataclass
class SwapBlock:
    """A swapped block's host-side state."""

    name: str
    """Module name in the transformer (`transformer_blocks.7`)."""
    slots: list[tuple[torch.nn.Module, str, str]]
    """(owning module, parameter name, key) of every frozen parameter that is swapped."""
    host: dict[str, torch.Tensor]
    """Host copies by key (pinned on CUDA); the only full copy of these weights while swapping is on."""
    by_shape: dict[tuple, list[tuple[torch.nn.Module, str, str]]] = field(default_factory=dict)
    """Slots by weight shape, so the pack hook compares storage only with same-shaped parameters."""

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.host.values())


@dataclass(frozen=True)
class WeightRef:
    """What autograd keeps instead of a swapped weight: enough to rebuild the same view in backward."""

    pos: int
    """Block position in forward order."""
    key: str
    """Parameter key within the block."""
    dtype: torch.dtype
    """Dtype of the saved tensor (a view of the weight, so normally the weight's own)."""
    size: tuple
    """Shape of the saved tensor (a transposed weight for Linear)."""
    stride: tuple
    """Its strides."""
    offset: int
    """Its storage offset."""


def in_backward() -> bool:
    """True on the thread that is running an autograd backward pass."""
    return torch._C._current_graph_task_id() != -1


class BlockSwapper:
    """Installs block swapping on a diffusers Flux transformer (after LoRA layers were added).

    Args:
        transformer: the transformer; its swapped blocks' frozen parameters move to host memory now.
        positions: which blocks (positions in forward order: doubles, then singles) to swap.
        backend: `CudaTransfers(device)` on a GPU; `HostTransfers()` (or a subclass) for CPU tests.
        prefetch: swapped blocks kept in flight ahead of the running one.
        timeout_s: longest wait for one block's copy before the run fails, naming the block.
        heartbeat: called with a stage name while copies complete (rate-limited to one call per `heartbeat_every_s`).
        record: keep `events`, a list of (action, block name, phase), for tests and debugging.

    Example::

        swapper = BlockSwapper(transformer, [3, 5, 7], CudaTransfers("cuda"), heartbeat=watchdog.beat)
        ...  # train as usual
        swapper.remove()  # weights back into the module (on the host)
    """

    def __init__(self, transformer: torch.nn.Module, positions: list[int], backend: HostTransfers,
                 prefetch: int = 1, timeout_s: float = 60.0, heartbeat: Callable[[str], None] | None = None,
                 heartbeat_every_s: float = 1.0, record: bool = False) -> None:
        if timeout_s <= 0:
            raise ValueError(f"block swap timeout must be > 0 s, got {timeout_s}")
        self.blocks = transformer_blocks(transformer)
        fn = getattr(transformer, "_gradient_checkpointing_func", None)
        if getattr(transformer, "gradient_checkpointing", False) and fn is not block_checkpoint_func:
            raise ValueError("block swapping needs checkpointing enabled through fluxlora.perf.checkpointing."
                             "checkpoint_blocks (memory.gradient_checkpointing), not diffusers' default")
        self.schedule = SwapSchedule(positions, len(self.blocks), prefetch)
        self.backend, self.timeout_s = backend, float(timeout_s)
        self.heartbeat, self.heartbeat_every_s, self._last_beat = heartbeat, heartbeat_every_s, 0.0
        self.events: list[tuple[str, str, str]] | None = [] if record else None
        self.stats = {"loads": 0, "evictions": 0, "wait_s": 0.0, "packed": 0, "bytes": 0}
        self._lock = threading.RLock()
        self._transfers: dict[int, Transfer] = {}
        self._params: dict[int, dict[str, torch.nn.Parameter]] = {}
        self._ctx: list[tuple[int, Any]] = []
        self._end_queued = False
        self.swapped = {}
        for pos in self.schedule.swapped:
            self.swapped[pos] = self._take(pos)
            release_free_heap()  # the originals just freed: glibc keeps those under its mmap threshold in its heap
        self._hooks = []
        for pos, (_, block) in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(partial(self._pre_hook, pos)))
            self._hooks.append(block.register_forward_hook(partial(self._post_hook, pos), always_call=True))
        log.info("block swap: %d of %d blocks (%.2f GB of frozen weights) live in host memory (%d buffers, %.2f GB), "
                 "prefetch %d", len(self.swapped), len(self.blocks), self.host_bytes / 1e9,
                 len(backend.arena.buffers), backend.arena.nbytes / 1e9, prefetch)

    @property
    def host_bytes(self) -> int:
        return sum(b.nbytes for b in self.swapped.values())

    def _take(self, pos: int) -> SwapBlock:
        """Move block `pos`'s frozen parameters to host copies; the module keeps None in their place."""
        name, block = self.blocks[pos]
        slots, host = [], {}
        for mod_name, mod in block.named_modules():
            for pname, p in list(mod._parameters.items()):
                if p is None or p.requires_grad:
                    continue
                if p.is_meta:
                    raise ValueError(f"block swap: {name}.{mod_name}.{pname} is on the meta device")
                key = f"{mod_name}.{pname}" if mod_name else pname
                host[key] = self.backend.host_copy(p)
                slots.append((mod, pname, key))
                mod._parameters[pname] = None
        sb = SwapBlock(name, slots, host)
        for slot in slots:
            sb.by_shape.setdefault(tuple(host[slot[2]].shape), []).append(slot)
        return sb

    # ---- hooks -------------------------------------------------------------------------------------------------
    def _pre_hook(self, pos: int, module: torch.nn.Module, args: Any) -> None:
        backward = in_backward()
        with self._lock:
            if backward:
                self._queue_backward_end()
            self._run(self.schedule.enter(pos, backward), "backward" if backward else "forward")
        if (pos in self.swapped and not backward and torch.is_grad_enabled() and not inside_checkpoint()):
            ctx = torch.autograd.graph.saved_tensors_hooks(partial(self._pack, pos), self._unpack)
            ctx.__enter__()
            self._ctx.append((pos, ctx))

    def _post_hook(self, pos: int, module: torch.nn.Module, args: Any, output: Any) -> None:
        if self._ctx and self._ctx[-1][0] == pos:
            self._ctx.pop()[1].__exit__(None, None, None)
        outs = output if isinstance(output, (tuple, list)) else (output,)
        needs_backward = any(isinstance(o, torch.Tensor) and o.requires_grad for o in outs)
        backward = in_backward()
        with self._lock:
            self._run(self.schedule.exit(pos, backward, needs_backward), "backward" if backward else "forward")

    def _pack(self, pos: int, t: torch.Tensor) -> Any:
        if t.requires_grad or t.grad_fn is not None:
            return t
        base = t._base if t._base is not None else t
        slots = self.swapped[pos].by_shape.get(tuple(base.shape))
        if not slots:
            return t
        ptr = t.untyped_storage().data_ptr()
        for mod, pname, key in slots:
            p = mod._parameters.get(pname)
            if p is not None and p.untyped_storage().data_ptr() == ptr:
                self.stats["packed"] += 1
                return WeightRef(pos, key, t.dtype, tuple(t.shape), tuple(t.stride()), t.storage_offset())
        return t

    def _unpack(self, saved: Any) -> torch.Tensor:
        if not isinstance(saved, WeightRef):
            return saved
        with self._lock:
            self._queue_backward_end()
            self._run(self.schedule.enter(saved.pos, True), "backward")
            src = self._transfers[saved.pos].tensors[saved.key]
        if src.dtype != saved.dtype:
            src = src.to(saved.dtype)
        return src.as_strided(saved.size, saved.stride, saved.offset)

    def _queue_backward_end(self) -> None:
        if not self._end_queued:
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_done)
            self._end_queued = True

    def _backward_done(self) -> None:
        with self._lock:
            self._end_queued = False
            self._run(self.schedule.backward_done(), "end")

    # ---- actions -----------------------------------------------------------------------------------------------
    def _run(self, plan: Plan, phase: str) -> None:
        for pos in plan.evict:
            self._evict(pos, phase)
        for pos in plan.load:
            sb = self.swapped[pos]
            self._transfers[pos] = self.backend.start(sb.name, sb.host)
            self.stats["loads"] += 1
            self.stats["bytes"] += sb.nbytes
            self._record("load", pos, phase)
        if plan.need is not None:
            self._ensure(plan.need, phase)

    def _evict(self, pos: int, phase: str) -> None:
        self._transfers.pop(pos, None)
        self._params.pop(pos, None)
        for mod, pname, _ in self.swapped[pos].slots:
            mod._parameters[pname] = None
        self.stats["evictions"] += 1
        self._record("evict", pos, phase)

    def _ensure(self, pos: int, phase: str) -> None:
        """Wait (bounded) for block `pos`'s copy, then put its device weights into the module."""
        tr = self._transfers[pos]
        if pos not in self._params:
            self._wait(tr, phase)
            self.backend.adopt(tr)
            self._params[pos] = {k: torch.nn.Parameter(t, requires_grad=False) for k, t in tr.tensors.items()}
        params = self._params[pos]
        for mod, pname, key in self.swapped[pos].slots:
            mod._parameters[pname] = params[key]

    def _wait(self, tr: Transfer, phase: str) -> None:
        start = time.monotonic()
        deadline, delay = start + self.timeout_s, 1e-5
        while not self.backend.ready(tr):
            now = time.monotonic()
            if now >= deadline:
                mb = sum(t.numel() * t.element_size() for t in tr.tensors.values()) / 1e6
                raise StageTimeoutError(
                    f"block swap ({phase})", self.timeout_s,
                    f"the copy of {tr.block} ({mb:.0f} MB, host -> {self.backend.device}) did not complete; the "
                    f"copy stream is stuck. Raise memory.swap_timeout_s, or lower memory.blocks_to_swap")
            time.sleep(min(delay, deadline - now))
            delay = min(2 * delay, 1e-3)
        self.stats["wait_s"] += time.monotonic() - start
        self._beat(phase)

    def _beat(self, phase: str) -> None:
        if self.heartbeat is None:
            return
        now = time.monotonic()
        if now - self._last_beat >= self.heartbeat_every_s:
            self._last_beat = now
            self.heartbeat(f"block swap ({phase})")

    def _record(self, action: str, pos: int, phase: str) -> None:
        if self.events is not None:
            self.events.append((action, self.blocks[pos][0], phase))

    def remove(self) -> None:
        """Remove the hooks and put the host copies back into the module (on the host)."""
        for h in self._hooks:
            h.remove()
        self._hooks = []
        with self._lock:
            for pos in list(self._transfers):
                self._evict(pos, "remove")
            for sb in self.swapped.values():
                for mod, pname, key in sb.slots:
                    mod._parameters[pname] = torch.nn.Parameter(sb.host[key], requires_grad=False)
