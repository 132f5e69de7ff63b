"""Block swapping: the pure schedule, then the swapper on a small Flux with the host (CPU) transfer backend."""

from __future__ import annotations

import gc
import time
import weakref

import pytest
import torch

from fluxlora.perf.blockswap import BlockSwapper
from fluxlora.errors import StageTimeoutError
from fluxlora.perf.memory import MemorySettings, enable_block_swap, swap_positions
from fluxlora.perf.swap_schedule import SwapSchedule, sd_scripts_split, spread
from fluxlora.perf.swap_transfer import HostTransfers
from helpers.memory_helpers import assert_same, module_for, train_steps

SWAPPED = [0, 2, 3, 5]  # doubles 0 and 2, singles 0 and 2: swapped and resident blocks interleave
NAMES = ["transformer_blocks.0", "transformer_blocks.2", "single_transformer_blocks.0", "single_transformer_blocks.2"]


# ---- the schedule alone -------------------------------------------------------------------------------------------
def _walk(s: SwapSchedule, n: int, grad: set[int], recompute: bool) -> list[tuple[str, int, str]]:
    """One training step as hooks report it: forward over 0..n-1, then backward over the grad blocks in reverse."""
    out = []

    def do(plan, phase):
        out.extend(("evict", p, phase) for p in plan.evict)
        out.extend(("load", p, phase) for p in plan.load)

    for p in range(n):
        do(s.enter(p, False), "f")
        do(s.exit(p, False, p in grad), "f")
    for p in sorted(grad, reverse=True):
        do(s.enter(p, True), "b")
        if recompute:
            do(s.exit(p, True, True), "b")
    do(s.backward_done(), "end")
    return out


def test_spread_and_sd_scripts_units():
    assert sd_scripts_split(18) == (9, 18) and sd_scripts_split(28) == (14, 28) and sd_scripts_split(1) == (0, 2)
    picked = spread(9, 19)
    assert len(picked) == 9 and picked == sorted(set(picked)) and picked[0] > 0 and picked[-1] < 18
    assert spread(0, 5) == [] and spread(5, 5) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError):
        spread(6, 5)


def test_schedule_forward_then_backward_with_recomputation():
    s = SwapSchedule([1, 3, 5], n_blocks=6, prefetch=1)
    events = _walk(s, 6, grad=set(range(6)), recompute=True)
    # forward streams 1, 3, 5 in order, one ahead; 3 and 5 (the last two) stay for backward, which reloads only 1;
    # when backward ends, the next step's first two (prefetch + 1) start loading
    assert events == [("load", 1, "f"), ("load", 3, "f"), ("evict", 1, "f"), ("load", 5, "f"),
                      ("evict", 5, "b"), ("load", 1, "b"), ("evict", 3, "b"), ("evict", 1, "b"),
                      ("load", 1, "end"), ("load", 3, "end")]
    assert s.resident == {1, 3} and s.phase == "idle"
    # the next step finds them there: no load, and they are not evicted as stale
    assert _walk(s, 6, grad=set(range(6)), recompute=True)[:2] == [("evict", 1, "f"), ("load", 5, "f")]


def test_schedule_without_recomputation_evicts_as_backward_moves_on():
    s = SwapSchedule([1, 3, 5], n_blocks=6, prefetch=1)
    events = _walk(s, 6, grad=set(range(6)), recompute=False)
    assert [e for e in events if e[2] == "b"] == [("evict", 5, "b"), ("load", 1, "b"), ("evict", 3, "b"),
                                                  ("evict", 1, "b")]


def test_schedule_backward_skips_blocks_without_grad():
    s = SwapSchedule([0, 1, 3, 5], n_blocks=6, prefetch=1)
    events = _walk(s, 6, grad={3, 4, 5}, recompute=True)  # LoRA on blocks 3.. only: 0 and 1 see no backward
    assert [e for e in events if e[0] == "load" and e[2] == "b"] == []
    assert ("evict", 0, "f") in events and ("evict", 1, "f") in events


def test_schedule_no_grad_forward_keeps_nothing_and_next_step_cleans_up():
    s = SwapSchedule([1, 3], n_blocks=4, prefetch=1)
    for p in range(4):
        s.enter(p, False)
        s.exit(p, False, needs_backward=False)
    assert s.resident == set()
    for p in range(4):  # a step whose backward never comes (an exception): the next forward drops the kept blocks
        s.enter(p, False)
        s.exit(p, False, needs_backward=True)
    assert s.resident == {1, 3}
    plan = s.enter(0, False)
    assert plan.evict == [3] and s.resident == {1}


def test_schedule_prefetch_zero_loads_only_when_needed_and_deeper_prefetch_loads_ahead():
    s = SwapSchedule([1, 2, 3], n_blocks=4, prefetch=0)
    assert s.enter(0, False).load == []
    assert s.enter(1, False).load == [1]
    s2 = SwapSchedule([1, 2, 3], n_blocks=4, prefetch=2)
    assert s2.enter(0, False).load == [1, 2]


def test_schedule_late_backward_visit_reloads_the_block():
    s = SwapSchedule([1, 3], n_blocks=4, prefetch=0)
    _ = [(s.enter(p, False), s.exit(p, False, True)) for p in range(4)]
    s.enter(3, True)
    s.enter(1, True)  # 3 is evicted here ...
    plan = s.enter(3, True)  # ... and a late saved tensor of 3 brings it back, correct if slower
    assert plan.need == 3 and plan.load == [3]


def test_schedule_rejects_bad_positions():
    with pytest.raises(ValueError):
        SwapSchedule([7], n_blocks=4)
    with pytest.raises(ValueError):
        SwapSchedule([1], n_blocks=4, prefetch=-1)


# ---- the swapper on a model ---------------------------------------------------------------------------------------
def _swapped(module, backend=None, **kw) -> BlockSwapper:
    return BlockSwapper(module.transformer, SWAPPED, backend or HostTransfers(), record=True, **kw)


def _loads(swapper: BlockSwapper, phase: str) -> list[str]:
    return [b for a, b, ph in swapper.events if a == "load" and ph == phase]


@pytest.mark.parametrize("storage,gc_on,every,blocks", [
    ("none", False, 1, "all"), ("none", False, 1, "single"), ("none", True, 1, "all"), ("none", True, 2, "all"),
    ("fp8", False, 1, "all"), ("fp8", True, 1, "single"),
])
def test_swapped_training_is_exactly_the_plain_training(storage, gc_on, every, blocks):
    mem = MemorySettings(base_storage=storage, gradient_checkpointing=gc_on, checkpoint_every=every)
    steps = 2 if storage == "none" and not gc_on else 1  # one case crosses a step boundary; Lightning's test too
    plain = train_steps(module_for(mem, blocks), steps=steps)
    module = module_for(mem, blocks)
    first_inputs = []
    block0 = module.transformer.transformer_blocks[0]
    block0.register_forward_pre_hook(lambda m, a: first_inputs.append([t.requires_grad for t in a if
                                                                       isinstance(t, torch.Tensor)]))
    swapper = _swapped(module)
    swapped = train_steps(module, steps=steps)
    assert_same(plain, swapped)
    assert first_inputs and not any(any(r) for r in first_inputs)  # the first swapped block's inputs need no grad
    assert swapper.stats["loads"] >= steps * len(SWAPPED)
    assert all(mod._parameters[p] is None for mod, p, _ in swapper.swapped[5].slots)  # off the "device" again


@pytest.mark.parametrize("gc_on", [False, True])
def test_blocks_stream_in_forward_order_and_back_in_reverse(gc_on):
    module = module_for(MemorySettings(gradient_checkpointing=gc_on))
    swapper = _swapped(module)
    train_steps(module, steps=1)
    assert _loads(swapper, "forward") == NAMES
    # the last two swapped blocks (prefetch 1) stay over the forward→backward turn; the others come back reversed
    assert _loads(swapper, "backward") == ["transformer_blocks.2", "transformer_blocks.0"]
    # only the next step's first two (prefetch + 1) are on the "device": loaded when backward ended
    assert swapper.schedule.resident == {0, 2} and set(swapper._transfers) == {0, 2}


def test_blocks_without_lora_are_not_reloaded_for_backward():
    module = module_for(MemorySettings(), train_blocks="single")
    swapper = _swapped(module)
    train_steps(module, steps=1)
    assert _loads(swapper, "forward") == NAMES and _loads(swapper, "backward") == []


class TrackingTransfers(HostTransfers):
    """Host backend that remembers every device copy weakly, to see which ones autograd still holds."""

    def __init__(self) -> None:
        super().__init__()
        self.copies: dict[str, list[weakref.ref]] = {}

    def start(self, block, host):
        tr = super().start(block, host)
        self.copies.setdefault(block, []).extend(weakref.ref(t) for t in tr.tensors.values())
        return tr

    def alive(self) -> set[str]:
        gc.collect()
        return {b for b, refs in self.copies.items() if any(r() is not None for r in refs)}


@pytest.mark.parametrize("storage,gc_on", [("none", False), ("fp8", False), ("none", True)])
def test_autograd_does_not_hold_evicted_weights(storage, gc_on):
    module = module_for(MemorySettings(base_storage=storage, gradient_checkpointing=gc_on))
    backend = TrackingTransfers()
    swapper = _swapped(module, backend)
    seen = {}
    train_steps(module, steps=1, after_forward=lambda: seen.setdefault("alive", backend.alive()))
    # after forward only the two blocks kept for backward have a device copy: the graph holds none of the others
    assert seen["alive"] == {"single_transformer_blocks.0", "single_transformer_blocks.2"}
    assert backend.alive() == {"transformer_blocks.0", "transformer_blocks.2"}  # the next step's, not autograd's
    if not gc_on:
        assert swapper.stats["packed"] > 0  # saved weights went through the pack hook as references


class StalledTransfers(HostTransfers):
    """The `nth` copy of `block` never completes."""

    def __init__(self, block: str, nth: int = 1) -> None:
        super().__init__()
        self.block, self.nth, self.started, self.first_poll = block, nth, {}, None

    def start(self, block, host):
        self.started[block] = self.started.get(block, 0) + 1
        tr = super().start(block, host)
        tr.event = "stuck" if block == self.block and self.started[block] == self.nth else None
        return tr

    def ready(self, tr):
        if tr.event == "stuck" and self.first_poll is None:
            self.first_poll = time.monotonic()  # the bounded wait starts here
        return tr.event != "stuck"


@pytest.mark.parametrize("nth,where", [(1, "forward"), (2, "backward")])
def test_a_copy_that_never_completes_fails_within_its_timeout_naming_the_block(nth, where):
    module = module_for(MemorySettings())
    backend = StalledTransfers("transformer_blocks.2", nth)
    _swapped(module, backend, timeout_s=0.3)
    with pytest.raises(StageTimeoutError) as err:
        train_steps(module, steps=1)
    waited = time.monotonic() - backend.first_poll
    assert 0.3 <= waited < 0.3 + 0.5  # the deadline, plus one poll interval and the unwinding of the step
    msg = str(err.value)
    assert "transformer_blocks.2" in msg and "0.3s" in msg and f"block swap ({where})" in msg


def test_heartbeat_flows_while_copies_complete():
    module = module_for(MemorySettings(gradient_checkpointing=True))
    beats = []
    _swapped(module, heartbeat=beats.append, heartbeat_every_s=0.0)
    train_steps(module, steps=1)
    assert beats.count("block swap (forward)") == 4 and beats.count("block swap (backward)") == 2


def test_remove_puts_the_weights_back():
    plain = module_for(MemorySettings())
    module = module_for(MemorySettings())
    empty = lambda: {(n, k) for n, m in module.transformer.named_modules() for k, p in m._parameters.items() if p is None}
    before = empty()
    swapper = _swapped(module)
    assert empty() > before
    train_steps(module, steps=1)
    swapper.remove()
    assert empty() == before
    restored = train_steps(module, steps=1)
    train_steps(plain, steps=1)  # the same first step as the swapped module took
    reference = train_steps(plain, steps=1)
    assert_same(reference, restored)


def test_checkpointing_must_come_from_fluxlora():
    module = module_for(MemorySettings())
    module.transformer.enable_gradient_checkpointing()  # diffusers' default function: swap cannot see recomputation
    with pytest.raises(ValueError, match="checkpoint_blocks"):
        _swapped(module)


def test_positions_on_a_flux_dev_shaped_model_follow_sd_scripts_counts():
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        dev = FluxTransformer2DModel(guidance_embeds=True)
    pos = swap_positions(dev, 18)
    doubles, singles = [p for p in pos if p < 19], [p - 19 for p in pos if p >= 19]
    assert len(doubles) == 9 and len(singles) == 18
    assert max(b - a for a, b in zip(doubles, doubles[1:])) <= 3  # spread, not bunched at the end
    assert len(swap_positions(dev, 38)) == 57
    from fluxlora.errors import FluxLoraError

    with pytest.raises(FluxLoraError, match="at most blocks_to_swap=38"):
        swap_positions(dev, 39)


def test_positions_take_blocks_backward_never_visits_first():
    """LoRA on single blocks only: the doubles need no backward, so swapping one costs one copy per step, not two.
    As many bytes as sd-scripts' split frees come from them first, spread evenly; then from the trained singles."""
    from diffusers import FluxTransformer2DModel

    from fluxlora.perf.checkpointing import transformer_blocks

    with torch.device("meta"):
        dev = FluxTransformer2DModel(guidance_embeds=True)
    blocks = [b for _, b in transformer_blocks(dev)]
    dev.requires_grad_(False)
    for b in dev.single_transformer_blocks:
        b.proj_out.bias.requires_grad_(True)  # stands in for a LoRA layer

    def nbytes(positions):
        return sum(p.numel() * p.element_size() for i in positions for p in blocks[i].parameters()
                   if not p.requires_grad)

    for n in (8, 18, 20, 34):
        pos = swap_positions(dev, n)
        d, s = sd_scripts_split(n)
        assert nbytes(pos) >= nbytes(spread(d, 19) + [19 + i for i in spread(s, 38)])
        doubles = [p for p in pos if p < 19]
        assert len(doubles) == min(19, len(pos))  # doubles first
        if len(doubles) < 19:
            assert max(b - a for a, b in zip(doubles, doubles[1:])) <= 3  # spread
            assert nbytes(doubles[:-1]) < nbytes(spread(d, 19) + [19 + i for i in spread(s, 38)])  # no more than needed
    assert len(swap_positions(dev, 34)) > 19  # past the doubles: trained singles too


def test_block_swap_is_off_on_the_cpu():
    module = module_for(MemorySettings())
    assert enable_block_swap(module.transformer, MemorySettings(blocks_to_swap=2), torch.device("cpu")) is None
    assert all(p is not None for p in module.transformer.parameters())


def test_lightning_fit_with_swapping_ends_with_the_same_lora():
    import lightning as L

    from fluxlora.lora.inject import lora_parameters
    from helpers.memory_helpers import batch

    class Cached(torch.utils.data.Dataset):
        def __len__(self):
            return 3

        def __getitem__(self, i):
            return {k: v[0] for k, v in batch(i, n=1).items()}

    def fit(swap: bool) -> dict:
        module = module_for(MemorySettings(gradient_checkpointing=True, checkpoint_every=2))
        swapper = _swapped(module) if swap else None
        L.seed_everything(0, verbose=False)
        trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0)
        trainer.fit(module, torch.utils.data.DataLoader(Cached(), batch_size=1))
        if swapper is not None:  # Lightning moved the module around; swapped weights stayed with the swapper
            assert swapper.stats["loads"] > 0 and set(swapper._transfers) <= {0, 2}  # the next step's first two
        return {n: p.detach().clone() for n, p in lora_parameters(module.transformer).items()}

    plain, swapped = fit(False), fit(True)
    assert plain.keys() == swapped.keys() and all(torch.equal(plain[n], swapped[n]) for n in plain)


def test_a_swapped_fp8_model_survives_moves_and_lightnings_bf16_true_cast():
    """Lightning moves the model to its device and, under `bf16-true`, casts it; swapped-out fp8 weights are None in
    their modules then, and stay so (their host copies keep fp8)."""
    from lightning.pytorch.plugins.precision import HalfPrecision

    from fluxlora.perf.fp8 import FP8

    module = module_for(MemorySettings(base_storage="fp8"))
    swapper = _swapped(module)
    module.to("cpu")
    HalfPrecision("bf16-true").convert_module(module)
    slots = [(mod, p) for sb in swapper.swapped.values() for mod, p, _ in sb.slots]
    assert slots and all(mod._parameters[p] is None for mod, p in slots)
    assert all(t.dtype == FP8 for sb in swapper.swapped.values() for k, t in sb.host.items() if k.endswith("weight")
               and t.dim() == 2)


def test_host_copies_are_packed_into_shared_buffers_the_pinned_allocator_need_not_round():
    """torch's pinned allocator rounds each allocation up to a power of two (FLUX.1's 9.4 MB fp8 weights would pin
    16 MB each): the copies are views into buffers of one power-of-two size, packed first fit; each keeps its
    values, dtype and shape, none overlaps another, and a tensor larger than a buffer gets one of its own."""
    from fluxlora.perf.swap_transfer import ALIGN, HostArena

    asked = []

    def alloc(n):
        asked.append(n)
        return torch.full((n,), 0xAB, dtype=torch.uint8)  # garbage, as fresh host memory may hold

    arena = HostArena(alloc, size=4096)
    g = torch.Generator().manual_seed(0)
    originals = [torch.randn(750, generator=g),                              # 3000 B: first buffer
                 torch.randn(10, 20, generator=g).to(torch.bfloat16),         # 400 B: its tail
                 torch.randn(64, 8, generator=g).to(torch.float8_e4m3fn),     # 512 B: its tail
                 torch.randn(300, generator=g),                               # 1200 B: a second buffer
                 torch.randn(3000, generator=g),                              # 12000 B: a buffer of its own
                 torch.tensor(3.5), torch.zeros(0, 5), torch.rand(7, 9, generator=g) > 0.5,
                 torch.randn(16, 12, generator=g).t()]                        # not contiguous: copied contiguous
    copies = [arena.copy(t) for t in originals]
    for t, c in zip(originals, copies):
        assert (c.dtype, c.shape) == (t.dtype, t.shape) and c.is_contiguous()
        assert torch.equal(c.view(torch.uint8) if c.dtype == torch.float8_e4m3fn else c,
                           t.view(torch.uint8) if t.dtype == torch.float8_e4m3fn else t)
        assert c.storage_offset() * c.element_size() % ALIGN == 0
    assert asked == [4096, 4096, -(-12000 // ALIGN) * ALIGN] and arena.nbytes == sum(asked)
    owners = [next(i for i, b in enumerate(arena.buffers) if c.untyped_storage().data_ptr() == b.data_ptr())
              for c in copies]
    assert owners[:5] == [0, 0, 0, 1, 2]
    spans = sorted((c.untyped_storage().data_ptr() + c.storage_offset() * c.element_size(),
                    c.numel() * c.element_size()) for c in copies if c.numel())
    assert all(a + n <= b for (a, n), (b, _) in zip(spans, spans[1:]))  # no two copies share a byte


def test_swapped_weights_live_in_the_backends_buffers():
    module = module_for(MemorySettings())
    backend = HostTransfers()
    swapper = _swapped(module, backend)
    buffers = {b.data_ptr() for b in backend.arena.buffers}
    hosts = [t for sb in swapper.swapped.values() for t in sb.host.values()]
    assert hosts and {t.untyped_storage().data_ptr() for t in hosts} <= buffers
    assert len(backend.arena.buffers) == 1 and swapper.host_bytes <= backend.arena.nbytes  # tiny: one buffer holds all
