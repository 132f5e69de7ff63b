"""Speed knobs for the training step that leave the numbers unchanged (within bf16 tolerance)."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from fluxlora.perf.block_groups import HandedOn, group_blocks
from fluxlora.perf.block_inputs import match_block_inputs
from fluxlora.perf.checkpointing import transformer_blocks

log = logging.getLogger(__name__)

RECOMPILE_LIMIT = 64
"""Graphs dynamo may keep per compiled block kind (several bucket resolutions × input grad signatures)."""

CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
"""torch.compile modes that replay CUDA graphs (Inductor's cudagraph trees)."""

GRAPH_SCOPES = ("auto", "step", "blocks")
"""`speed.graph_scope` values."""


@dataclass
class SpeedSettings:
    """How the transformer is run."""

    compile_blocks: bool | str = False
    """Regional torch.compile: each transformer block is compiled once and reused by all blocks of its kind.
    `auto`: on a CUDA device only (the tiers' choice: on the CPU, compiling costs more than it saves), and not over
    NF4 storage (bitsandbytes' 4-bit layers under torch.compile were not measured here; `true` forces it)."""
    compile_scope: str = "blocks"
    """`blocks`: one compiled region per block (fast to compile); `model`: the whole transformer as one graph
    (slower to compile, far less host overhead per step: each region costs a fixed wrapper time per call)."""
    compile_mode: str | None = None
    """torch.compile mode (None = default; `max-autotune-no-cudagraphs` tunes matmuls longer)."""
    compile_options: dict | None = None
    """Inductor options instead of a mode, e.g. `{cpp_wrapper: true}` (launches kernels from C++: less host time
    per compiled block, longer compile)."""
    recompute_in_graph: bool | str = "auto"
    """With gradient checkpointing on every block and compiled blocks: each block's compiled backward recomputes
    the block's forward itself (AOTAutograd keeps only the block's inputs, `activation_memory_budget=0`), instead
    of torch.utils.checkpoint calling the block a second time in backward. Same activation memory; one compiled call
    per block fewer in backward and none of checkpoint's per-tensor hooks. `auto`: wherever it applies."""
    cuda_graphs: bool | str = False
    """Replay the compiled blocks as CUDA graphs (Inductor's cudagraph trees, what torch.compile's
    `reduce-overhead` mode does): removes the host's per-kernel launch time, which bounds a Flux step at 512 px.
    Needs compiled blocks on CUDA, no block swapping (swapped weights get new addresses every step) and no
    torch.utils.checkpoint (checkpointing recomputes in the graph instead). `auto`: wherever it applies."""
    graph_scope: str = "auto"
    """What one CUDA graph spans when `cuda_graphs` is on. `step`: the whole training step (forward, loss and
    backward) as one graph per step shape, captured on that shape's second step (`fluxlora.perf.step_graph`): one
    launch per step instead of one per block, and a capture in about a step's time instead of Inductor's per-block
    recording. `blocks`: each compiled block's forward and backward (Inductor's cudagraph trees). `auto`: step for
    FLUX.1 and Kontext in one process; blocks for Chroma (its step reads the captions' length back to the host,
    `chroma.cut_padding`), under DDP, and with a `compile_mode` that records graphs itself."""
    compile_cache: str | None = "~/.cache/fluxlora/compile"
    """Inductor's cache folder (`TORCHINDUCTOR_CACHE_DIR`: compiled graphs and Triton kernels), so that a resumed run,
    or a second run with the same bucket shapes, loads its graphs instead of compiling them: on the H200 the first
    step of a 12gb run at 1024 px took 9.1 s from a warm cache against 33.5 s cold (bench/whole_run.py --warm).
    Torch's own default is under /tmp, which rented machines clear on restart. A `TORCHINDUCTOR_CACHE_DIR` the user
    set wins; None = torch's default."""
    dynamic_shapes: bool | str = "auto"
    """`false`: each batch shape (bucket size) compiles graphs of its own, with the sizes fixed in its kernels.
    `true`: the blocks' inputs have symbolic batch and token counts from the first call, so one compiled graph per
    block kind serves every bucket size (`_sizes_dynamic`). `auto`: true when the training batches come in more than
    one shape (`BucketBatchSampler.step_shapes`) on FLUX.1 or Kontext, false otherwise. On the H200 at 1024 px (no
    tier, three buckets, 2026-12-02) a cold run reached its third shape 42.1 s after its first step began with
    symbolic sizes against 64.7 s with fixed ones (11.0 against 11.4 s warm), for steps 1.1 % longer (0.3198
    against 0.3164 s): a second shape's compile (~25 s) is worth ~7,000 such steps. One shape compiles once either
    way, so it keeps the fixed sizes' kernels. Chroma (its caption lengths vary too) keeps fixed sizes under `auto`;
    Kontext (the FLUX.1 transformer with the control's tokens appended) was not run with symbolic sizes on a GPU."""
    blocks_per_graph: int = 1
    """With `compile_scope=blocks`: up to this many consecutive blocks of a kind form one compiled region
    (`fluxlora.perf.block_groups`), dividing the per-region host time (graph launches, guards, wrappers: ~46 ms of a
    0.149 s step at 512 px on the H200) by about as much, for a longer compile of each region. FLUX.1 only, without
    block swapping or gradient checkpointing. Not yet measured on a GPU, so 1 (one block per region) by default."""
    attention: str = "auto"
    """`cudnn`: attention through fluxlora's processor with cuDNN's SDPA, flash as the fallback
    (`fluxlora.perf.attention`); `default`: diffusers' processor; `auto`: cudnn for FLUX.1 on Hopper GPUs without
    gradient checkpointing or block swapping, where it was measured to match flash and save 16 % of a step at
    1024 px; default elsewhere."""

    def __post_init__(self) -> None:
        for name in ("compile_blocks", "recompute_in_graph", "cuda_graphs", "dynamic_shapes"):
            if getattr(self, name) not in (True, False, "auto"):
                raise ValueError(f"speed.{name}={getattr(self, name)!r} is not one of true, false, auto")
        from fluxlora.perf.attention import ATTENTION

        if self.attention not in ATTENTION:
            raise ValueError(f"speed.attention={self.attention!r} is not one of {', '.join(ATTENTION)}")
        if self.graph_scope not in GRAPH_SCOPES:
            raise ValueError(f"speed.graph_scope={self.graph_scope!r} is not one of {', '.join(GRAPH_SCOPES)}")
        if self.compile_scope not in ("blocks", "model"):
            raise ValueError(f"speed.compile_scope={self.compile_scope!r} is not one of blocks, model")
        if isinstance(self.blocks_per_graph, bool) or not isinstance(self.blocks_per_graph, int) \
                or self.blocks_per_graph < 1:
            raise ValueError(f"speed.blocks_per_graph={self.blocks_per_graph!r} must be a whole number >= 1")
        if self.blocks_per_graph > 1 and self.compile_scope != "blocks":
            raise ValueError(f"speed.blocks_per_graph={self.blocks_per_graph} groups regions of "
                             "speed.compile_scope=blocks, not of compile_scope=model")
        if self.compile_mode and self.compile_options:
            raise ValueError("speed.compile_mode and speed.compile_options cannot both be set (torch.compile)")
        if self.cuda_graphs is True and self.compile_mode and self.compile_mode not in CUDA_GRAPH_MODES:
            raise ValueError(f"speed.cuda_graphs=true with speed.compile_mode={self.compile_mode}: that mode does "
                             f"not replay CUDA graphs; use one of {CUDA_GRAPH_MODES} or leave compile_mode unset")

    def compiles(self, device: torch.device | str | None, base_storage: str = "none") -> bool:
        """Whether blocks are compiled on `device` with `memory.base_storage`."""
        if self.compile_blocks == "auto":
            return device is not None and torch.device(device).type == "cuda" and base_storage != "nf4"
        return bool(self.compile_blocks)


@dataclass(frozen=True)
class SpeedPlan:
    """What `plan` decided for one run."""

    compile: bool
    recompute_in_graph: bool
    cuda_graphs: bool
    """The compiled blocks replay CUDA graphs of their own (Inductor's cudagraph trees)."""
    step_graphs: bool = False
    """The training step is captured as one CUDA graph per shape (`speed.graph_scope=step`)."""
    dynamic_shapes: bool = False
    """The compiled blocks take symbolic batch and token counts (`speed.dynamic_shapes`)."""


def plan(settings: SpeedSettings, device: torch.device | str | None = None, base_storage: str = "none",
         swapping: bool = False, checkpoint_every: int = 0, processes: int = 1, budgeted: bool = False,
         chroma: bool = False, step_shapes: int = 1) -> SpeedPlan:
    """Resolve `auto` and refuse combinations that cannot work, with the setting to change in the message.

    `checkpoint_every`: `memory.checkpoint_every` when gradient checkpointing is on, else 0. `processes`: ranks of
    the run (`auto` leaves CUDA graphs off under DDP, where they were not measured; `true` still turns them on).
    `budgeted`: a memory budget caps the run (`memory.budget_gb`); `auto` then leaves CUDA graphs off. `chroma`: the
    transformer is Chroma's (no step graph: its step reads back to the host). `step_shapes`: how many batch shapes
    the training data comes in (`auto` compiles symbolic sizes for more than one).
    """
    compile_ = settings.compiles(device, base_storage)
    if swapping and compile_ and settings.compile_scope == "model":
        raise ValueError("speed.compile_scope=model cannot trace block swapping's hooks; use compile_scope=blocks "
                         "with memory.blocks_to_swap")
    in_graph = bool(settings.recompute_in_graph) and compile_ and checkpoint_every == 1 \
        and settings.compile_scope == "blocks"
    if settings.recompute_in_graph is True and checkpoint_every and not in_graph:
        raise ValueError("speed.recompute_in_graph=true needs compiled blocks (speed.compile_blocks, "
                         "compile_scope=blocks) and memory.checkpoint_every=1")
    graphs_asked = settings.cuda_graphs is True or settings.compile_mode in CUDA_GRAPH_MODES
    cuda = device is not None and torch.device(device).type == "cuda"
    blockers = [why for bad, why in (
        (not compile_, "compiled blocks (speed.compile_blocks)"),
        (not cuda, "a CUDA device"),
        (swapping, "no block swapping (memory.blocks_to_swap=0)"),
        (bool(checkpoint_every) and not in_graph, "checkpointing inside the compiled graph "
                                                  "(speed.recompute_in_graph, memory.checkpoint_every=1)"))
        if bad]
    if graphs_asked and blockers:
        raise ValueError(f"speed.cuda_graphs needs {', '.join(blockers)}")
    if compile_:
        check_block_groups(settings, swapping, bool(checkpoint_every))
    # auto stays off under a memory budget: the graphs' pools hold each shape's activations for good (the 20gb
    # tier at 1024 px with three bucket shapes peaked at 18.50 of its 18.94 GiB cap with them, 2.8 GiB above
    # the run without them, bench/whole_run.py on the H200), and whether they pay under a tier is not measured.
    # (A "3.3 GiB outside the allocator" read at the time was nvidia-smi's second entry, which is not held beside
    # the first: README "VRAM tiers".)
    graphs = graphs_asked or (settings.cuda_graphs == "auto" and not blockers and processes == 1 and not budgeted)
    step = graphs and step_scope(settings, processes, chroma)
    dynamic = compile_ and (settings.dynamic_shapes is True
                            or (settings.dynamic_shapes == "auto" and step_shapes > 1 and not chroma))
    return SpeedPlan(compile_, in_graph, graphs and not step, step, dynamic)


def step_scope(settings: SpeedSettings, processes: int, chroma: bool) -> bool:
    """Whether CUDA graphs span the whole step (`speed.graph_scope`); `step` where it cannot is refused, naming why."""
    blockers = [why for bad, why in (
        (chroma, "FLUX.1 or Kontext (Chroma's step reads its captions' length back to the host)"),
        (processes > 1, "one process (DDP's gradient all-reduce is not captured)"),
        (settings.compile_mode in CUDA_GRAPH_MODES, f"no speed.compile_mode={settings.compile_mode} (it records "
                                                    "graphs of its own per block)"))
        if bad]
    if settings.graph_scope == "step" and blockers:
        raise ValueError(f"speed.graph_scope=step needs {', '.join(blockers)}; use speed.graph_scope=blocks")
    return settings.graph_scope == "step" or (settings.graph_scope == "auto" and not blockers)


def use_compile_cache(folder: str | None) -> str:
    """Point Inductor's cache at `folder` (`speed.compile_cache`) unless the environment names another one than
    torch's default; returns the folder compiled graphs are read from and written to. A folder that cannot be
    created leaves torch's default in place, with a warning: a cache must not stop a run."""
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    # Inductor writes its default into the environment the first time it compiles: that is not the user's choice
    chosen_by_user = current is not None and os.path.abspath(current) != os.path.abspath(default_cache_dir())
    if chosen_by_user or folder is None:
        where = current or default_cache_dir()
    else:
        path = Path(folder).expanduser()
        try:
            path.mkdir(parents=True, exist_ok=True)
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = where = str(path.resolve())
        except OSError as e:
            where = current or default_cache_dir()
            log.warning("speed.compile_cache %s cannot be created (%s); compiling into torch's default %s",
                        path, e.strerror or e, where)
    log.info("compile cache: %s (graphs compiled for these shapes before are loaded, not compiled)", where)
    _cache_custom_autograd_functions()
    return where


def _cache_custom_autograd_functions() -> None:
    """Let AOTAutograd's cache keep graphs that hold a custom `autograd.Function`, as every compiled block does
    under fp8 storage (`fluxlora.perf.fp8`: every tier, and the fp8 default without one) or cuDNN attention
    (`fluxlora.perf.attention`). torch bypasses that cache for them by default, so a warm run traced and partitioned
    each block's joint graph again: on the CPU (tiny Flux, fp8 base, checkpointing in the graph, two token counts,
    warm Inductor cache) 4 of 4 graphs bypassed it and the two steps took 12.4 s; allowed, 4 of 4 hit and they took
    7.2 s, with the same losses. The key hashes the Function's traced forward and backward: a changed backward
    missed the cache and compiled anew (checked the same way)."""
    from torch._functorch import config as functorch_config

    if hasattr(functorch_config, "autograd_cache_allow_custom_autograd_functions"):  # torch >= 2.7
        functorch_config.autograd_cache_allow_custom_autograd_functions = True


def check_block_groups(settings: SpeedSettings, swapping: bool, checkpointing: bool) -> None:
    """`speed.blocks_per_graph` > 1 runs a group of blocks in one call, so no block of it can be swapped in, or
    checkpointed, on its own: refused, naming the settings to change."""
    if settings.blocks_per_graph > 1 and (swapping or checkpointing):
        raise ValueError(f"speed.blocks_per_graph={settings.blocks_per_graph} runs whole groups of blocks in one call: "
                         "it cannot swap blocks or checkpoint them one by one; set memory.blocks_to_swap=0 and "
                         "memory.gradient_checkpointing=false, or speed.blocks_per_graph=1")


def _with_activation_budget(fn, budget: float):
    """`fn` (a torch.compile'd callable) compiled with AOTAutograd's `activation_memory_budget` set to `budget`;
    the partitioner reads it when the graph is first compiled, so it is set around each call, not globally."""
    from torch._functorch import config as functorch_config

    @functools.wraps(fn)
    def call(*args, **kwargs):
        with functorch_config.patch(activation_memory_budget=budget):
            return fn(*args, **kwargs)

    return call


def _sizes_dynamic(fn):
    """`fn` with every dimension of its tensor inputs but the last (batch and token counts; the last is a feature
    width) marked dynamic before each call, so that its first compile already serves every bucket size. Left to
    torch's automatic dynamic shapes, the first size compiles a graph of fixed sizes and the second compiles again
    with symbolic ones, in every run: two compiles per block kind, cold or warm, instead of one."""

    def mark(value) -> None:
        if isinstance(value, torch.Tensor):
            for dim in range(value.dim() - 1):
                torch._dynamo.maybe_mark_dynamic(value, dim)
        elif isinstance(value, (tuple, list)):
            for v in value:
                mark(v)

    @functools.wraps(fn)
    def call(*args, **kwargs):
        mark(args)
        mark(tuple(kwargs.values()))
        return fn(*args, **kwargs)

    return call


def compile_blocks(transformer: torch.nn.Module, mode: str | None = None, options: dict | None = None,
                   activation_budget: float | None = None, dynamic: bool = False, blocks_per_graph: int = 1) -> int:
    """Compile every double and single block's `forward` in place; returns how many regions were compiled.

    Only `forward` is compiled, not the module call: the blocks' hooks (block swapping's loads and evictions,
    checkpointing's marks) stay eager Python around the compiled graph. All blocks of a kind share one compiled
    graph (their forward is the same code; parameters are graph inputs), so compile time does not grow with depth.
    `activation_budget`: AOTAutograd's activation memory budget for the blocks (0 = keep only their inputs).
    `dynamic`: `SpeedSettings.dynamic_shapes`. `blocks_per_graph` > 1: consecutive blocks of a kind form one
    region (`fluxlora.perf.block_groups`).
    """
    # each block kind gets a graph per input shape (bucket resolution), and per grad signature of its inputs where a
    # frozen block runs before the first trainable one of its kind: dynamo's default of 8 per code object would
    # send the blocks of a bucketed dataset back to eager
    limit = getattr(torch._dynamo.config, "recompile_limit", None)
    if limit is not None and limit < RECOMPILE_LIMIT:
        torch._dynamo.config.recompile_limit = RECOMPILE_LIMIT

    def compiled(forward):
        # a copy each: torch.compile pops keys (guard_filter_fn) from the dict it is given
        fn = torch.compile(forward, mode=mode, options=None if options is None else dict(options),
                           dynamic=None if dynamic else False)
        fn = fn if activation_budget is None else _with_activation_budget(fn, activation_budget)
        return _sizes_dynamic(fn) if dynamic else fn

    if blocks_per_graph > 1:
        n = group_blocks(transformer, blocks_per_graph, compiled)
    else:
        n = 0
        for _, block in transformer_blocks(transformer):
            block.forward = compiled(block.forward)
            n += 1
    match_block_inputs(transformer)  # else the first trainable and the first single block compile graphs of their own
    log.info("regional torch.compile: %d regions of up to %d blocks (mode=%s, options=%s)", n, blocks_per_graph,
             mode, options)
    return n


def _compiled_forwards(module: torch.nn.Module) -> list[tuple[torch.nn.Module, object]]:
    """(submodule, its `forward`) for every submodule whose forward `compile_blocks` replaced: a compiled one, or
    that of a block whose group's first block runs it (`block_groups.HandedOn`)."""
    return [(m, fn) for m in module.modules()
            if hasattr(fn := m.__dict__.get("forward"), "_torchdynamo_orig_callable") or isinstance(fn, HandedOn)]


def uncompiled(module: torch.nn.Module) -> None:
    """Drop compiled calls from `module` and its children (a deep copy would otherwise run the original's)."""
    for m, _ in _compiled_forwards(module):
        del m.__dict__["forward"]
    for m in module.modules():
        m._compiled_call_impl = None


@contextmanager
def eager_blocks(module: torch.nn.Module) -> Iterator[None]:
    """Run `module`'s regionally compiled blocks uncompiled inside the `with` (sampling between steps: inference
    shapes would otherwise compile, and record CUDA graphs, next to the training ones); they are put back after."""
    saved = _compiled_forwards(module)
    for m, _ in saved:
        del m.__dict__["forward"]
    try:
        yield
    finally:
        for m, fn in saved:
            m.forward = fn


def apply_speed_settings(transformer: torch.nn.Module, settings: SpeedSettings, checkpoint_every: int = 0,
                         swapping: bool = False, device: torch.device | str | None = None, base_storage: str = "none",
                         processes: int = 1, budgeted: bool = False, step_shapes: int = 1) -> SpeedPlan:
    """Apply the settings for a run on `device`; returns what was decided (`cuda_graphs`, `step_graphs`: the caller
    records them in `PerfState`, which the training step reads).

    `checkpoint_every`: the interval `apply_memory_settings` applied (0 = no checkpointing); checkpointing must
    already be applied: with `recompute_in_graph` its blocks then run plainly and recompute inside their compiled
    graph. `swapping`: block swapping is installed (its hooks must stay outside compiled code); `base_storage`:
    `memory.base_storage`; `processes`: ranks of the run; `budgeted`: `memory.budget_gb` is set; `step_shapes`: how
    many batch shapes the training data comes in (`speed.dynamic_shapes: auto`).
    """
    from fluxlora.perf.attention import use_attention
    from fluxlora.perf.checkpointing import run_blocks_plainly

    # before compiling: the processor is traced into the blocks
    use_attention(transformer, settings.attention, device, checkpointing=bool(checkpoint_every), swapping=swapping)
    from fluxlora.models.chroma import is_chroma

    decided = plan(settings, device, base_storage, swapping, checkpoint_every, processes, budgeted,
                   is_chroma(transformer), step_shapes)
    if not decided.compile:
        return decided
    use_compile_cache(settings.compile_cache)
    options = dict(settings.compile_options) if settings.compile_options else None
    mode = settings.compile_mode
    if decided.cuda_graphs and mode not in CUDA_GRAPH_MODES:
        options = {**(options or {}), "triton.cudagraphs": True}
    if settings.compile_scope == "model":
        transformer.compile(mode=mode, options=options, dynamic=None if decided.dynamic_shapes else False)
        log.info("torch.compile on the whole transformer (mode=%s, options=%s)", mode, options)
    else:
        budget = None
        if decided.recompute_in_graph:
            run_blocks_plainly(transformer)
            budget = 0.0
            log.info("gradient checkpointing inside the compiled blocks: their backward recomputes the forward")
        compile_blocks(transformer, mode, options, budget, decided.dynamic_shapes, settings.blocks_per_graph)
        if decided.dynamic_shapes:
            log.info("compiled blocks take symbolic batch and token counts: one graph per block kind serves %s",
                     f"all {step_shapes} batch shapes" if step_shapes > 1 else "every batch shape")
    if decided.cuda_graphs:
        from fluxlora.perf.graph_recording import index_graph_recording

        indexed = index_graph_recording()
        log.info("compiled blocks replay CUDA graphs (recorded once per shape%s)",
                 ", with indexed alias lookups" if indexed else "")
    if decided.step_graphs:
        log.info("each training step replays one CUDA graph (captured on the second step of each shape)")
    return decided
