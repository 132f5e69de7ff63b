"""Which swapped blocks to load and which to drop, as forward and backward visit the blocks. Pure bookkeeping:
no tensors, no devices, so every decision is testable on its own.

Blocks are named by their position in forward order (doubles then singles). A swapped block is *resident* from the
moment its transfer is started until it is evicted; evicting only drops our reference to the device copy (autograd
or a checkpoint may still hold it until the backward that needs it has run, and then it is freed).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field


@dataclass
class Plan:
    """What to do at one visit."""

    need: int | None = None
    """The swapped block that must be on the device before the visit's compute runs (None: a resident block)."""
    load: list[int] = field(default_factory=list)
    """Swapped blocks whose transfer starts now, in the order they will be needed."""
    evict: list[int] = field(default_factory=list)
    """Swapped blocks whose device copy is dropped now."""


def spread(count: int, length: int) -> list[int]:
    """`count` indices out of range(length), spread evenly (so each transfer hides behind resident blocks' compute)."""
    if not 0 <= count <= length:
        raise ValueError(f"cannot pick {count} of {length} blocks")
    return sorted({(2 * i + 1) * length // (2 * count) for i in range(count)})


def sd_scripts_split(blocks_to_swap: int) -> tuple[int, int]:
    """(double, single) blocks that sd-scripts' `--blocks_to_swap N` swaps on Flux: N//2 doubles, 2·(N − N//2) singles.

    A single block holds ~0.4 of a double block's weights, so N counts in units of about one double block.
    """
    double = blocks_to_swap // 2
    return double, 2 * (blocks_to_swap - double)


class SwapSchedule:
    """Decides loads and evictions for a fixed set of swapped blocks.

    Args:
        swapped: positions (forward order) of the swapped blocks.
        n_blocks: number of blocks in forward order.
        prefetch: how many swapped blocks ahead of the current one are in flight.
    """

    def __init__(self, swapped: Sequence[int], n_blocks: int, prefetch: int = 1) -> None:
        if prefetch < 0:
            raise ValueError(f"prefetch must be >= 0, got {prefetch}")
        if any(not 0 <= p < n_blocks for p in swapped):
            raise ValueError(f"swapped positions {list(swapped)} outside 0..{n_blocks - 1}")
        self.swapped = sorted(set(swapped))
        self._is_swapped = set(self.swapped)
        self.n_blocks = n_blocks
        self.prefetch = prefetch
        self.resident: set[int] = set()
        self.phase = "idle"  # idle | forward | backward
        self._last_forward = -1
        self._grad_order: list[int] = []  # swapped blocks whose outputs need backward, in forward order
        self._keep: set[int] = set()  # kept across the forward→backward turn

    def _plan(self, need: int | None, window: list[int], passed) -> Plan:
        """Load the window; evict resident blocks outside it that this pass has `passed` (blocks still ahead stay:
        they were kept over the forward→backward turn and are needed soon)."""
        evict = sorted(p for p in self.resident if p not in window and passed(p))
        load = [p for p in window if p not in self.resident]
        self.resident = (self.resident - set(evict)) | set(load)
        return Plan(need=need, load=load, evict=evict)

    def enter(self, pos: int, backward: bool) -> Plan:
        """Block `pos` is about to run (forward, or its recomputation / saved weights in backward)."""
        return self._enter_backward(pos) if backward else self._enter_forward(pos)

    def _enter_forward(self, pos: int) -> Plan:
        fresh = self.phase != "forward" or pos <= self._last_forward  # a new step (or a no-grad forward) begins
        # between steps only what backward_done loaded for this forward is resident: keep it
        warm = set(self.resident) if fresh and self.phase == "idle" else set()
        if fresh:
            self.phase, self._grad_order, self._keep = "forward", [], set()
        self._last_forward = pos
        here = pos in self._is_swapped
        ahead = [p for p in self.swapped if p > pos][: self.prefetch]
        passed = (lambda p: p not in warm) if fresh else (lambda p: p < pos and p not in self._keep)
        return self._plan(pos if here else None, ([pos] if here else []) + ahead, passed)

    def _enter_backward(self, pos: int) -> Plan:
        if self.phase != "backward":
            self.phase, self._keep = "backward", set()
            self._last_forward = -1
        order = self._grad_order[::-1]
        here = pos in self._is_swapped
        ahead = [p for p in order if p < pos][: self.prefetch]
        return self._plan(pos if here else None, ([pos] if here else []) + ahead, lambda p: p > pos)

    def exit(self, pos: int, backward: bool, needs_backward: bool) -> Plan:
        """Block `pos` finished running; `needs_backward`: its outputs carry grad (backward will visit it)."""
        if pos not in self._is_swapped:
            return Plan()
        if backward:  # a recomputation ended: the checkpoint holds what the block's backward needs
            return self._drop(pos)
        if needs_backward:
            self._grad_order.append(pos)
            if len([p for p in self.swapped if p > pos]) < self.prefetch + 1:
                self._keep.add(pos)  # among the last swapped: backward needs it first
                return Plan()
        return self._drop(pos)

    def _drop(self, pos: int) -> Plan:
        if pos not in self.resident:
            return Plan()
        self.resident.discard(pos)
        self._keep.discard(pos)
        return Plan(evict=[pos])

    def backward_done(self) -> Plan:
        """Backward finished: every swapped block leaves the device, and the first `prefetch + 1` swapped blocks
        start loading for the next step (the copy engine is idle until then, and the activations are freed, so the
        next forward's first copies cost no peak memory and no waiting)."""
        self.phase, self._grad_order, self._keep, self._last_forward = "idle", [], set(), -1
        head = self.swapped[: self.prefetch + 1] if self.prefetch else []
        evict = sorted(p for p in self.resident if p not in head)
        load = [p for p in head if p not in self.resident]
        self.resident = set(head)
        return Plan(load=load, evict=evict)
