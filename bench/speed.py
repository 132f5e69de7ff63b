"""Speed of fluxlora's training step on a Flux.1-dev-shaped model (random weights), through the real path:
FluxLoRAModule driven by a Lightning Trainer, fed cached-tensor batches from a DataLoader.

Prints one JSON line per setting: s/step, images/s, peak memory, MFU (2 × forward FLOPs: the frozen base needs
input gradients only) and, with --ref, the ratio to bench/ref_diffusers_step.py run in the same process.

    python bench/speed.py --res 512 1024 --batch 1 --gc off on --compile 0 1 --ref
    python bench/speed.py --res 512 1024 --batch 1 2 4 --compile 1 --cudagraphs 0 1 --ref
    python bench/speed.py --res 512 1024 --compile 1 --cudagraphs 1 --storage fp8 --fp8-matmul 0 1 --ref
    python bench/speed.py --res 512 1024 --compile 1 --cudagraphs 1 --attention default cudnn --ref
    python bench/speed.py --res 512 --compile 1 --cudagraphs 1 --attention cudnn --graph-scope blocks step --ref

Our step uses the run's own settings: `memory.gradient_checkpointing` (`--gc on`; recomputed inside the compiled
blocks unless `--recompute torch`), `speed.cuda_graphs` (`--cudagraphs 1`), and the optimizer from
`fluxlora.training.optim.build_optimizer` (fused AdamW on CUDA; `--foreach` for torch's multi-tensor AdamW).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import torch

sys.path.insert(0, os.path.dirname(__file__))

DEV_CFG = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
               axes_dims_rope=(16, 56, 56))


def build_transformer(layers: int):
    from diffusers import FluxTransformer2DModel

    cfg = dict(DEV_CFG)
    if layers:
        cfg.update(num_layers=layers, num_single_layers=2 * layers)
    with torch.device("cuda"):
        torch.set_default_dtype(torch.bfloat16)
        m = FluxTransformer2DModel(**cfg)
        torch.set_default_dtype(torch.float32)
    return m.eval()


class Batches(torch.utils.data.Dataset):
    """Random cached tensors shaped like real Flux-dev caches (latents 16×h×w, T5 512×4096, pooled 768)."""

    def __init__(self, res: int, n: int = 64) -> None:
        self.res, self.n = res, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        h = self.res // 8
        return {"latents": torch.randn(16, h, h, generator=g), "t5": torch.randn(512, 4096, generator=g),
                "pooled": torch.randn(768, generator=g), "t5_mask": torch.ones(512, dtype=torch.long),
                "path": f"random_{i}"}


class StepTimer:
    """Times optimizer steps after a warm-up, synchronising only at the window's ends; each warm-up step is timed on
    its own (synchronised), so that a CUDA-graph recording step shows beside the compiling one."""

    def __init__(self, warm: int, profile_from: int = -1) -> None:
        import lightning as L

        self.prof = self.pyprof = None
        self.warm_steps: list[float] = []

        class _CB(L.Callback):
            def on_train_batch_start(cb, trainer, *a):
                if trainer.global_step == profile_from and os.environ.get("PYPROFILE"):
                    import cProfile

                    self.pyprof = cProfile.Profile()
                    self.pyprof.enable()
                elif trainer.global_step == profile_from:
                    from torch.profiler import ProfilerActivity, profile

                    self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    self.prof.__enter__()
                if trainer.global_step == warm:
                    torch.cuda.synchronize()
                    self.t0 = time.perf_counter()
                    torch.cuda.reset_peak_memory_stats()
                if trainer.global_step == 0:
                    self.first = time.perf_counter()
                if trainer.global_step < warm:
                    torch.cuda.synchronize()
                    self.t_step = time.perf_counter()

            def on_train_batch_end(cb, trainer, *a):
                if trainer.global_step == 1:
                    torch.cuda.synchronize()
                    self.first = time.perf_counter() - self.first
                if trainer.global_step <= warm:
                    torch.cuda.synchronize()
                    self.warm_steps.append(round(time.perf_counter() - self.t_step, 3))
                if self.pyprof is not None and trainer.global_step == profile_from + 1:
                    self._print_pyprofile(profile_from)

            def on_train_end(cb, trainer, *a):
                torch.cuda.synchronize()
                self.t1 = time.perf_counter()
                if self.prof is not None:
                    self.prof.__exit__(None, None, None)
                if self.pyprof is not None:  # profiled the last step
                    self._print_pyprofile(profile_from)

        self.callback = _CB()
        self.t0 = self.t1 = self.first = 0.0

    def _print_pyprofile(self, step: int) -> None:
        """Stop the cProfile of `step` and print its top functions by own and by cumulative time."""
        import pstats

        self.pyprof.disable()
        print(f"cProfile of step {step}:", flush=True)
        for key in ("tottime", "cumulative"):
            pstats.Stats(self.pyprof).sort_stats(key).print_stats(40)
        self.pyprof = None


def fwd_flops(transformer, res: int, batch: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    from fluxlora.training import flow as fm

    h = res // 8
    x = torch.randn(batch, (h // 2) ** 2, 64, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        transformer(hidden_states=x, encoder_hidden_states=torch.randn(batch, 512, 4096, device="cuda", dtype=torch.bfloat16),
                    pooled_projections=torch.randn(batch, 768, device="cuda", dtype=torch.bfloat16),
                    timestep=torch.full((batch,), 0.5, device="cuda", dtype=torch.bfloat16),
                    img_ids=fm.image_ids(h, h, device="cuda", dtype=torch.bfloat16),
                    txt_ids=torch.zeros(512, 3, device="cuda", dtype=torch.bfloat16),
                    guidance=torch.ones(batch, device="cuda"), return_dict=False)
    return fc.get_total_flops()


KERNEL_KINDS = (("attention", ("flash", "fmha", "attention")), ("fused (triton)", ("triton_",)),
                ("gemm", ("nvjet", "gemm", "cutlass", "xmma", "scaled_mm", "cublas")),
                ("optimizer", ("multi_tensor", "adam")))
"""Kernel kinds by name, first match wins (flash kernels' template names mention cutlass)."""


def kernel_split(key_averages) -> dict:
    """Device time per step (of the two profiled steps) by kernel kind, and the GPU time inside compiled graphs
    (Inductor's `## Call CompiledFxGraph` ranges, which overlap the kernels: not added to them)."""
    split: dict[str, float] = {}
    for e in key_averages:
        if e.device_type.name != "CUDA" or not e.self_device_time_total:
            continue
        name = e.key.lower()
        if name.startswith("## "):
            kind = "in compiled graphs (overlaps)"
        else:
            kind = next((k for k, words in KERNEL_KINDS if any(w in name for w in words)), "other")
        split[kind] = split.get(kind, 0.0) + e.self_device_time_total / 2 / 1e6
    return {k: round(v, 4) for k, v in sorted(split.items(), key=lambda kv: -kv[1])}


def run_ours(transformer, res: int, batch: int, gc: bool, compile_blocks: int, precision: str, steps: int,
             warm: int, peak: float, workers: int, check_finite: bool = True, profile: bool = False,
             cuda_graphs: bool = False, recompute: str = "auto", foreach: bool = False, storage: str = "none",
             fp8_matmul: bool = False, skip_module_guards: bool = False, attention: str = "default",
             profile_step: int = -1, keep_cache_in_capture: bool = False, indexed_recording: bool = True,
             blocks_per_graph: int = 1, graph_scope: str = "auto", dynamic: bool = False) -> dict:
    import lightning as L
    from omegaconf import OmegaConf
    from torch._dynamo.utils import counters

    from fluxlora.perf.checkpointing import recompute_kind
    from fluxlora.training.flow import FlowConfig
    from fluxlora.lora.inject import LoraSettings
    from fluxlora.perf.memory import MemorySettings, apply_memory_settings
    from fluxlora.training.module import FluxLoRAModule
    from fluxlora.perf.speed import SpeedSettings, apply_speed_settings
    from fluxlora.perf.state import PerfState
    from fluxlora.perf.step_graph import StepGraphs

    flops = fwd_flops(transformer, res, batch)  # before fit: Lightning moves the module to the CPU at teardown
    torch._dynamo.reset()
    counters.clear()
    perf = PerfState(checkpoint_every=apply_memory_settings(
        transformer, MemorySettings(base_storage=storage, fp8_matmul=fp8_matmul, gradient_checkpointing=gc),
        torch.bfloat16, "cuda"))
    optim = OmegaConf.create({"name": "adamw", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                              "kwargs": {"foreach": True} if foreach else {}, "scheduler": "constant",
                              "warmup_steps": 0})
    module = FluxLoRAModule(transformer, LoraSettings(rank=16, alpha=16, include_modulation=False),
                            FlowConfig(timestep_sampling="sigmoid"), optim, total_steps=steps + warm,
                            compute_dtype=torch.bfloat16, check_finite=check_finite, perf=perf)
    decided = apply_speed_settings(
        transformer, SpeedSettings(compile_blocks=bool(compile_blocks), cuda_graphs=cuda_graphs,
                                   compile_scope="model" if compile_blocks == 2 else "blocks",
                                   recompute_in_graph=recompute == "auto", attention=attention,
                                   blocks_per_graph=blocks_per_graph, graph_scope=graph_scope,
                                   dynamic_shapes=dynamic,
                                   compile_options={"guard_filter_fn": torch.compiler.skip_guard_on_all_nn_modules_unsafe}
                                   if skip_module_guards else None), perf.checkpoint_every, device="cuda")
    perf.cuda_graphs = decided.cuda_graphs
    perf.step_graphs = StepGraphs() if decided.step_graphs else None
    if not indexed_recording:  # torch's own alias lookups while graphs record (fluxlora.perf.graph_recording)
        from fluxlora.perf.graph_recording import restore_graph_recording

        restore_graph_recording()
    dl = torch.utils.data.DataLoader(Batches(res), batch_size=batch, num_workers=workers, pin_memory=True,
                                     persistent_workers=workers > 0, shuffle=True)
    timer = StepTimer(warm, profile_step if profile_step >= 0 else warm + steps - 2 if profile else -1)
    trainer = L.Trainer(accelerator="cuda", devices=1, precision=precision, max_steps=warm + steps, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[timer.callback], num_sanity_val_steps=0)
    # an experiment: torch.cuda.graph empties the allocator's cache (and the pinned host cache) before each capture;
    # with CUDA-graph trees that is once per block call (57 forward + 57 backward) in the step that records a shape
    empty, host = torch.cuda.empty_cache, getattr(torch._C, "_host_emptyCache", None)  # the latter: newer torch
    if keep_cache_in_capture:
        torch.cuda.empty_cache = lambda: None
        if host is not None:
            torch._C._host_emptyCache = lambda: None
    try:
        trainer.fit(module, dl)
    finally:
        torch.cuda.empty_cache = empty
        if host is not None:
            torch._C._host_emptyCache = host
    dt = (timer.t1 - timer.t0) / steps
    out = dict(who="fluxlora", res=res, batch=batch, gc=gc, compile=compile_blocks, precision=precision,
               check_finite=check_finite, cuda_graphs=decided.cuda_graphs, graph_scope=graph_scope, dynamic_shapes=dynamic,
               step_graphs=decided.step_graphs,
               step_graphs_captured=perf.step_graphs.captured if perf.step_graphs else 0,
               recompute=recompute_kind(transformer),
               optimizer="foreach" if foreach else "fused", storage=storage, fp8_matmul=fp8_matmul, attention=attention,
               skip_module_guards=skip_module_guards,
               cudagraph_skips=int(counters["inductor"]["cudagraph_skips"]),
               s_per_step=round(dt, 4), images_per_s=round(batch / dt, 2), first_step_s=round(timer.first, 2),
               warm_steps_s=timer.warm_steps, keep_cache_in_capture=keep_cache_in_capture,
               indexed_recording=indexed_recording, blocks_per_graph=blocks_per_graph,
               peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
               peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
               fwd_tflop=round(flops / 1e12, 2), mfu_2fwd=round(2 * flops / 1e12 / peak / dt, 3))
    if timer.prof is not None:
        ka = timer.prof.key_averages()
        cpu = sum(e.self_cpu_time_total for e in ka) / 2 / 1e6
        gpu = sum(e.self_device_time_total for e in ka if e.device_type.name == "CUDA") / 2 / 1e6
        print(f"profile (last 2 steps): host {cpu:.3f} s/step, device kernels {gpu:.3f} s/step", flush=True)
        print(json.dumps({"kernel_split_s_per_step": kernel_split(ka)}), flush=True)
        print(ka.table(sort_by="self_device_time_total", row_limit=20, max_name_column_width=70), flush=True)
        print(ka.table(sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=70), flush=True)
    del trainer, module
    torch.cuda.empty_cache()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--res", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--batch", type=int, nargs="+", default=[1])
    ap.add_argument("--pairs", nargs="+", default=None, metavar="RESxBATCH",
                    help="only these resolution x batch cells of ours, e.g. 512x4 1024x2 (the reference runs --res)")
    ap.add_argument("--gc", nargs="+", default=["off"], choices=["off", "on"])
    ap.add_argument("--compile", type=int, nargs="+", default=[0], help="0 eager, 1 per-block regions, 2 whole model")
    ap.add_argument("--cudagraphs", type=int, nargs="+", default=[0], help="speed.cuda_graphs (needs --compile 1)")
    ap.add_argument("--recompute", default="auto", choices=["auto", "torch"],
                    help="with --gc on: inside the compiled blocks (auto) or through torch.utils.checkpoint")
    ap.add_argument("--foreach", action="store_true", help="torch's foreach AdamW instead of the fused one")
    ap.add_argument("--storage", default="none", choices=["none", "fp8"], help="memory.base_storage of our step")
    ap.add_argument("--fp8-matmul", type=int, nargs="+", default=[0], help="memory.fp8_matmul (with --storage fp8)")
    ap.add_argument("--skip-module-guards", action="store_true",
                    help="compile with torch.compiler.skip_guard_on_all_nn_modules_unsafe (less guard time per call)")
    ap.add_argument("--attention", nargs="+", default=["default"], choices=["default", "cudnn"],
                    help="speed.attention of our step (cudnn: fluxlora's processor with cuDNN's SDPA)")
    ap.add_argument("--precision", default="bf16-true", choices=["bf16-true", "bf16-mixed"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--warm", type=int, default=3)
    ap.add_argument("--layers", type=int, default=0, help="double blocks (singles = 2×); 0 = Flux-dev's 19/38")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--no-finite-check", action="store_true", help="skip the per-step NaN check (a host sync)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of the last two steps")
    ap.add_argument("--profile-step", type=int, default=-1,
                    help="profile this step instead (with PYPROFILE=1: cProfile, e.g. 1, where CUDA graphs record)")
    ap.add_argument("--keep-cache-in-capture", type=int, nargs="+", default=[0],
                    help="1: no allocator/pinned cache emptying before each CUDA-graph capture (an experiment)")
    ap.add_argument("--indexed-recording", type=int, nargs="+", default=[1],
                    help="0: torch's own alias lookups while CUDA graphs record (fluxlora.perf.graph_recording)")
    ap.add_argument("--blocks-per-graph", type=int, nargs="+", default=[1],
                    help="speed.blocks_per_graph: consecutive blocks per compiled region (fluxlora.perf.block_groups)")
    ap.add_argument("--graph-scope", nargs="+", default=["auto"], choices=["auto", "step", "blocks"],
                    help="speed.graph_scope with --cudagraphs 1: the whole step as one CUDA graph, or one per block")
    ap.add_argument("--dynamic", type=int, nargs="+", default=[0], help="speed.dynamic_shapes (symbolic sizes)")
    ap.add_argument("--ref", action="store_true", help="also run bench/ref_diffusers_step.py's step in this process")
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN SDPA backward fails on Flux attention here (DESIGN.md)
    import ref_diffusers_step as ref

    print(torch.__version__, torch.cuda.get_device_name(), flush=True)
    peak = ref.peak_tflops()
    print(json.dumps({"bf16_matmul_peak_tflops": round(peak)}), flush=True)
    results = []
    if args.ref:
        if args.layers:
            ref.CFG.update(num_layers=args.layers, num_single_layers=2 * args.layers)
        m = ref.build()
        for res in args.res:
            for gc in args.gc:
                try:
                    d = dict(who="diffusers-ref", **ref.run(m, res, gc == "on"))
                except torch.OutOfMemoryError:
                    d = dict(who="diffusers-ref", res=res, gc=gc == "on", error="OOM")
                print(json.dumps(d), flush=True)
                results.append(d)
        del m
        torch.cuda.empty_cache()
    cells = [(r, b) for r in args.res for b in args.batch]
    if args.pairs:
        cells = [tuple(int(v) for v in p.split("x")) for p in args.pairs]
    for res, batch in cells:
        for gc in args.gc:
            for comp, graphs, mm, att, keep, idx, bpg, scope, dyn in [
                    (c, g, m, a, k, i, n, sc, dy) for c in args.compile for g in args.cudagraphs
                    for m in args.fp8_matmul for a in args.attention for k in args.keep_cache_in_capture
                    for i in args.indexed_recording for n in args.blocks_per_graph for sc in args.graph_scope
                    for dy in args.dynamic
                    if (c or not g) and (args.storage == "fp8" or not m)]:
                transformer = build_transformer(args.layers)
                try:
                    d = run_ours(transformer, res, batch, gc == "on", comp, args.precision, args.steps,
                                 args.warm, peak, args.workers, not args.no_finite_check, args.profile,
                                 bool(graphs), args.recompute, args.foreach, args.storage, bool(mm),
                                 args.skip_module_guards, att, args.profile_step, bool(keep), bool(idx), bpg, scope,
                                 bool(dyn))
                except Exception as e:  # an OOM or a failed setting ends its row, not the table
                    traceback.print_exc()
                    d = dict(who="fluxlora", res=res, batch=batch, gc=gc == "on", compile=comp,
                             cuda_graphs=bool(graphs), graph_scope=scope, storage=args.storage,
                             fp8_matmul=bool(mm), attention=att, dynamic_shapes=bool(dyn),
                             error=f"{type(e).__name__}: {str(e)[:300]}")
                for r in results:
                    same = r["who"] == "diffusers-ref" and r["res"] == res and r["gc"] == (gc == "on")
                    if same and "s_per_step" in r and "s_per_step" in d:
                        d["ref_s_per_step"] = r["s_per_step"]
                        d["speedup_vs_ref"] = round(r["s_per_step"] * batch / d["s_per_step"], 2)
                print(json.dumps(d), flush=True)
                results.append(d)
                del transformer
                torch.cuda.empty_cache()
    out = os.environ.get("OUT")
    if out:
        with open(os.path.join(out, "speed.json"), "w") as f:
            json.dump(dict(device=torch.cuda.get_device_name(), peak_tflops=peak, runs=results), f, indent=1)


if __name__ == "__main__":
    main()
