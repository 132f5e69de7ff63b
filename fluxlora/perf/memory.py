"""Memory knobs for the frozen base model: storage (fp8 or NF4), gradient checkpointing (every k-th block), and
block swapping. Storage and checkpointing are applied before LoRA layers are added; block swapping after."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)

STORAGE = ("none", "fp8", "nf4")
"""How the blocks' frozen weights are held (what the loader and `apply_memory_settings` take)."""
BASE_STORAGE = (*STORAGE, "auto")
"""`memory.base_storage` values; `auto` is made concrete per run by `MemorySettings.resolved`."""
T5_STORAGE = ("auto", "fp8", "full")
AUTO_FP8_CAPABILITY = (9, 0)
"""`auto` picks fp8 storage and matmuls from this compute capability on (Hopper): measured on the H200 only."""
AUTO_FP8_MIN_SIDE = 1024
"""... and from this `data.resolution` on: at 512 px the step is bound by the host and fp8 matmuls did not pay."""


@dataclass
class MemorySettings:
    """How the frozen transformer is kept in memory."""

    base_storage: str = "none"
    """`fp8`: the blocks' frozen Linear weights in float8_e4m3fn, upcast per matmul (`fluxlora.perf.fp8`).
    `nf4`: the blocks' Linears in 4-bit NormalFloat (bitsandbytes `Linear4bit`), dequantized per matmul.
    `auto` (the shipped config's): `fp8` where fp8 matmuls pay (`resolved`), else `none`."""
    fp8_matmul: bool | str = False
    """With `fp8` storage: multiply in fp8 on the GPU's fp8 tensor cores (`torch._scaled_mm`, compute capability 8.9+:
    Ada, Hopper), activations and gradients scaled per row, instead of upcasting each weight to the compute dtype.
    `auto`: where it was measured to pay (`resolved`)."""
    gradient_checkpointing: bool = False
    """Recompute block activations in backward instead of storing them."""
    checkpoint_every: int = 1
    """With checkpointing: checkpoint blocks 0, k, 2k, ... (forward order); 1 = every block, as diffusers does."""
    blocks_to_swap: int = 0
    """Blocks whose frozen weights live in host memory and are streamed in, counted as sd-scripts counts them
    (N//2 double + 2·(N − N//2) single blocks, so N means what FluxGym's `--blocks_to_swap N` means); 0 = off."""
    paired_blocks_to_swap: int | None = None
    """`blocks_to_swap` for a run that trains on control images (FLUX.1 Kontext), whose control tokens double the
    image sequence (~2 GiB more at 1024 px); None = `blocks_to_swap`. Made concrete by `resolved`."""
    loha_blocks_to_swap: int | None = None
    """`blocks_to_swap` for a LoHa run (`lora.type=loha`), whose two pairs of factors train twice LoRA's parameters at
    one rank (~2.3 GiB more at 1024 px); None = `blocks_to_swap`. With `paired_blocks_to_swap` too, the larger
    count. Made concrete by `resolved`."""
    swap_prefetch: int = 1
    """Swapped blocks in flight ahead of the running one (each costs one block of GPU memory)."""
    swap_timeout_s: float = 60.0
    """Longest wait for one block's host→device copy; past it the run fails naming the block."""
    budget_gb: float | None = None
    """Run as on a card of this many GiB: the allocator is capped at budget - 1 GiB (the CUDA context needs the
    rest), and caching batches, T5's storage and the sampling mode are chosen to fit. Every tier sets its size;
    None = the whole card."""
    t5_storage: str = "auto"
    """How T5-XXL is kept while caching: `fp8` (float8_e4m3fn block Linears with a per-tensor scale, upcast per
    matmul: 4.8 GB instead of 9.5), `full` (the compute dtype), `auto` (an fp8 file stays fp8; a 16-bit file stays
    16-bit where it fits the device's limit, else is cast to fp8 while it is read)."""

    def __post_init__(self) -> None:
        if self.base_storage not in BASE_STORAGE:
            raise ValueError(f"memory.base_storage={self.base_storage!r} is not one of {BASE_STORAGE}")
        if self.fp8_matmul not in (True, False, "auto"):
            raise ValueError(f"memory.fp8_matmul={self.fp8_matmul!r} is not one of true, false, auto")
        if self.checkpoint_every < 1:
            raise ValueError(f"memory.checkpoint_every must be >= 1, got {self.checkpoint_every}")
        if self.blocks_to_swap < 0:
            raise ValueError(f"memory.blocks_to_swap must be >= 0, got {self.blocks_to_swap}")
        for key in ("paired_blocks_to_swap", "loha_blocks_to_swap"):
            if getattr(self, key) is not None and getattr(self, key) < 0:
                raise ValueError(f"memory.{key} must be >= 0 or null, got {getattr(self, key)}")
        if self.swap_prefetch < 0:
            raise ValueError(f"memory.swap_prefetch must be >= 0, got {self.swap_prefetch}")
        if self.swap_timeout_s <= 0:
            raise ValueError(f"memory.swap_timeout_s must be > 0, got {self.swap_timeout_s}")
        if self.budget_gb is not None and self.budget_gb <= 1:
            raise ValueError(f"memory.budget_gb must be more than 1 (GiB; 1 is left to the CUDA context), got "
                             f"{self.budget_gb}")
        if self.t5_storage not in T5_STORAGE:
            raise ValueError(f"memory.t5_storage={self.t5_storage!r} is not one of {T5_STORAGE}")
        if self.fp8_matmul is True and self.base_storage not in ("fp8", "auto"):
            raise ValueError("memory.fp8_matmul needs memory.base_storage=fp8 (the weights it multiplies are fp8)")
        if self.blocks_to_swap and self.base_storage == "nf4":
            raise ValueError("memory.blocks_to_swap with memory.base_storage=nf4 is not supported: "
                             "use fp8 storage with block swapping, or nf4 without it")

    def resolved(self, device: torch.device, resolution: int, flux1: bool = True,
                 processes: int = 1, paired: bool = False, adapter: str = "lora") -> "MemorySettings":
        """These settings with `auto` storage and matmuls made concrete for a run on `device` at `data.resolution`,
        and `paired_blocks_to_swap` in `blocks_to_swap`'s place when the run trains on control images (`paired`),
        `loha_blocks_to_swap` when it trains LoHa (`adapter`).

        fp8 storage multiplied on the fp8 tensor cores where that was measured to pay: a Hopper GPU, no memory
        budget (the tiers set their own storage; fp8 matmuls under block swapping were not measured), FLUX.1 (not
        Chroma, not measured) at 1024 px or more, one process (`processes`: ranks of the run; DDP not measured).
        On the H200 (2026-12-02) that step took 0.3235 s against 0.3742 s with the bf16 base and cuDNN attention, a
        whole run finished with 21 GiB less reserved (56.7 against 78.1), and on the CPU the loss moved by at most
        0.04 % (README "GPU benchmarks on the H200")."""
        pays = (device.type == "cuda" and torch.cuda.get_device_capability(device) >= AUTO_FP8_CAPABILITY
                and self.budget_gb is None and flux1 and resolution >= AUTO_FP8_MIN_SIDE and processes == 1)
        # fp8 storage alone (upcast per matmul) ran no faster than the bf16 base (H100, 1024 px: 0.480 against 0.475
        # s/step, README rows C-D): auto picks it only to multiply in fp8
        storage = ("fp8" if pays and self.fp8_matmul is not False else "none") if self.base_storage == "auto" \
            else self.base_storage
        matmul = (pays and storage == "fp8") if self.fp8_matmul == "auto" else self.fp8_matmul
        if matmul and storage != "fp8":
            raise ValueError(f"memory.fp8_matmul=true needs fp8 storage; memory.base_storage=auto chose {storage} "
                             f"here (fp8 only on Hopper GPUs without a memory budget at >= {AUTO_FP8_MIN_SIDE} px): "
                             "set memory.base_storage=fp8")
        if (self.base_storage == "auto" and storage == "fp8") or (self.fp8_matmul == "auto" and matmul):  # pays
            log.info("memory: base weights in fp8%s (auto: %s, no memory budget, data.resolution %d)",
                     ", multiplied in fp8" if matmul else "", torch.cuda.get_device_name(device), resolution)
        # a count for this kind of run replaces blocks_to_swap (it may be smaller: Kontext at 512 px fits 4); when both
        # apply (a LoHa on Kontext, not measured), the larger
        own = [(key, count, reason) for key, count, applies, reason in (
            ("paired_blocks_to_swap", self.paired_blocks_to_swap, paired, "control images double the image sequence"),
            ("loha_blocks_to_swap", self.loha_blocks_to_swap, adapter == "loha",
             "LoHa trains twice LoRA's parameters at one rank")) if applies and count is not None]
        for key, count, _ in own:
            if count and storage == "nf4":  # blocks_to_swap with nf4 is refused in __post_init__
                raise ValueError(f"memory.{key} with memory.base_storage=nf4 is not supported: use fp8 storage with "
                                 "block swapping, or nf4 without it")
        swap = max(count for _, count, _ in own) if own else self.blocks_to_swap
        if swap != self.blocks_to_swap:
            log.info("memory: %d blocks swapped, not %d (%s)", swap, self.blocks_to_swap,
                     "; ".join(f"memory.{key}: {reason}" for key, count, reason in own if count == swap))
        return replace(self, base_storage=storage, fp8_matmul=matmul, blocks_to_swap=swap, paired_blocks_to_swap=None,
                       loha_blocks_to_swap=None)

    def load_device(self, device: torch.device) -> torch.device:
        """Where the transformer is read to: the host when only part of it may go to the GPU (swap) or when it is
        quantized on its way there (nf4: a bf16 model does not fit the cards that need NF4)."""
        if device.type == "cuda" and (self.blocks_to_swap or self.base_storage == "nf4"):
            return torch.device("cpu")
        return device


def apply_memory_settings(transformer: torch.nn.Module, settings: MemorySettings, compute_dtype: torch.dtype,
                          device: torch.device | str | None = None) -> int:
    """Apply storage and checkpointing to the frozen transformer; call before LoRA layers are added.

    `device`: where NF4 weights are quantized to (default: where the weights are). Returns the checkpointing
    interval applied (0 = off), for `PerfState.checkpoint_every`.
    """
    if "auto" in (settings.base_storage, settings.fp8_matmul):
        raise ValueError("memory settings with `auto` values: make them concrete with MemorySettings.resolved first")
    if settings.base_storage == "fp8":
        from fluxlora.perf.fp8 import store_fp8

        if settings.fp8_matmul and device is not None and torch.device(device).type == "cuda":
            cc = torch.cuda.get_device_capability(device)
            if cc < (8, 9):
                raise FluxLoraError(f"memory.fp8_matmul needs fp8 tensor cores (compute capability 8.9+: Ada, Hopper); "
                                    f"{torch.cuda.get_device_name(device)} has {cc[0]}.{cc[1]}. Set "
                                    f"memory.fp8_matmul=false")
        store_fp8(transformer, compute_dtype, settings.fp8_matmul)  # LoRA layers added later keep their own dtype
    elif settings.base_storage == "nf4":
        from fluxlora.perf.nf4 import quantize_blocks_nf4

        quantize_blocks_nf4(transformer, compute_dtype, device)
    if settings.gradient_checkpointing:
        from fluxlora.perf.checkpointing import checkpoint_blocks

        chosen = checkpoint_blocks(transformer, settings.checkpoint_every)
        log.info("gradient checkpointing on %d blocks (every %d)", len(chosen), settings.checkpoint_every)
        return settings.checkpoint_every
    return 0


def _frozen_bytes(block: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in block.parameters() if not p.requires_grad)


def swap_positions(transformer: torch.nn.Module, blocks_to_swap: int) -> list[int]:
    """Positions (forward order) of the blocks `blocks_to_swap` swaps (call after LoRA layers are added).

    With LoRA on every block: sd-scripts' double/single split, each kind spread evenly over its list so every copy
    hides behind the compute of resident blocks. When some blocks carry no LoRA (`lora.train_blocks=single`),
    backward never visits them, so swapping one costs one copy per step instead of two: as many bytes as
    sd-scripts' split would free are taken from those blocks first (spread evenly), then from the trained ones.
    """
    from fluxlora.perf.checkpointing import transformer_blocks
    from fluxlora.perf.swap_schedule import sd_scripts_split, spread

    n_double = len(getattr(transformer, "transformer_blocks", []))
    n_single = len(getattr(transformer, "single_transformer_blocks", []))
    double, single = sd_scripts_split(blocks_to_swap)
    if double > n_double or single > n_single:
        most = max(n for n in range(2 * (n_double + n_single) + 1)
                   if sd_scripts_split(n)[0] <= n_double and sd_scripts_split(n)[1] <= n_single)
        raise FluxLoraError(f"memory.blocks_to_swap={blocks_to_swap} asks for {double} double and {single} single "
                            f"blocks; this model has {n_double} and {n_single} (at most blocks_to_swap={most})")
    split = spread(double, n_double) + [n_double + i for i in spread(single, n_single)]
    blocks = [b for _, b in transformer_blocks(transformer)]
    untrained = [i for i, b in enumerate(blocks) if not any(p.requires_grad for p in b.parameters())]
    if not untrained:
        return split
    size = [_frozen_bytes(b) for b in blocks]
    target = sum(size[i] for i in split)
    chosen: list[int] = []
    trained = [i for i in range(len(blocks)) if i not in set(untrained)]
    for group in (untrained, trained):
        pick: list[int] = []
        for count in range(1, len(group) + 1):
            pick = [group[i] for i in spread(count, len(group))]
            if sum(size[i] for i in chosen + pick) >= target or count == len(group):
                break
        chosen += pick
        if sum(size[i] for i in chosen) >= target:
            break
    return sorted(chosen)


def enable_block_swap(transformer: torch.nn.Module, settings: MemorySettings, device: torch.device,
                      heartbeat: Callable[[str], None] | None = None):
    """Install block swapping (after LoRA layers were added, before the model moves to the GPU).

    Returns the `BlockSwapper` (for `PerfState.swapper`), or None when swapping is off or the device is not CUDA
    (nothing to swap to).
    """
    if not settings.blocks_to_swap:
        return None
    if torch.device(device).type != "cuda":
        log.info("memory.blocks_to_swap=%d ignored: block swapping moves weights to a GPU, and this run is on %s",
                 settings.blocks_to_swap, device)
        return None
    from fluxlora.perf.blockswap import BlockSwapper
    from fluxlora.perf.swap_transfer import CudaTransfers

    return BlockSwapper(transformer, swap_positions(transformer, settings.blocks_to_swap), CudaTransfers(device),
                        prefetch=settings.swap_prefetch, timeout_s=settings.swap_timeout_s, heartbeat=heartbeat)
