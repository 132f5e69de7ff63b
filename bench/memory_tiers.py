"""VRAM tiers under a hard memory cap: for each tier and resolution, a Flux.1-dev-shaped random model read from a
BFL single file through the real loader, the tier's settings applied by the functions a run uses
(`fluxlora.run.build.precision_for` / `build_module`), warm-up plus timed steps through FluxLoRAModule and a Lightning
Trainer. Prints one JSON line per cell (peak allocated, peak reserved, s/step, time to first step) and a table.

Each cell runs in its own subprocess (fresh CUDA context, fresh peak counters, an OOM stays in its cell) under the
tier's `memory.budget_gb` (the allocator capped at budget - 1 GiB - 64 MiB, as a run does; until 2026-12-01 this bench
capped it at the whole budget itself); a cell fits when its peak reserved memory over the whole cell (load
included) is at most budget - 1 GiB.

    python bench/memory_tiers.py                                   # every tier, 512 and 1024 px, three LoRA variants
    python bench/memory_tiers.py --tiers 12gb 8gb --res 512 --lora fluxgym     # the sd-scripts comparison cells
    python bench/memory_tiers.py --layers 2 --tiers 12gb --res 512  # quick: 2 double + 4 single Flux-dev-wide blocks
    python bench/memory_tiers.py --device cpu --tiny --res 64 --in-process     # CPU smoke test of this script

On the device (wheels of diffusers, hydra-core, omegaconf, antlr4, bitsandbytes, lightning in .whl/, carried):
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl &&
    PYTHONPATH=/tmp/site:. PYTHONUNBUFFERED=1 python3 bench/memory_tiers.py --tiers 12gb 8gb --lora fluxgym
fluxlora itself runs from the checkout (PYTHONPATH=.): the configs are then read from conf/ directly.

LoRA variants: `tier` (the tier's own LoRA), `r16all` (rank 16 on all blocks), `fluxgym` (rank 4 on single blocks:
FluxGym's 12G flags, compared with sd-scripts' block swap from DESIGN.md).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

TIERS = ("8gb", "12gb", "16gb", "20gb", "24gb")
LORA = {"tier": [], "r16all": ["lora.rank=16", "lora.alpha=16", "lora.train_blocks=all"],
        "fluxgym": ["lora.rank=4", "lora.alpha=4", "lora.train_blocks=single"]}
# sd-scripts' block swap with FluxGym's 12G settings on the H100 (DESIGN.md): s/step and peak reserved GiB
SD_SCRIPTS = {("12gb", 512): (0.779, 7.3), ("12gb", 1024): (1.246, 9.2),
              ("8gb", 512): (0.932, 4.4), ("8gb", 1024): (1.339, 6.3)}


def model_config(layers: int, tiny: bool) -> dict:
    from fluxlora.models.bfl import shipped_config
    from fluxlora.models.tiny import TRANSFORMER

    cfg = dict(TRANSFORMER) if tiny else dict(shipped_config("flux-dev"))
    if layers:
        cfg.update(num_layers=layers, num_single_layers=2 * layers)
    return cfg


def ensure_bfl(args) -> Path:
    """The BFL file cells read: --bfl, or a random fp8 file written once into --bfl-dir."""
    if args.bfl:
        return Path(args.bfl)
    from fluxlora.models.bfl import write_random_bfl

    cfg = model_config(args.layers, args.tiny)
    name = f"flux-{'tiny' if args.tiny else 'dev'}-L{cfg['num_layers']}-fp8.safetensors"
    path = Path(args.bfl_dir) / name
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        t = time.perf_counter()
        write_random_bfl(path, cfg, torch.float8_e4m3fn, device="cuda" if torch.cuda.is_available() else "cpu")
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # the cells run in other processes on the same card
        print(json.dumps({"wrote": str(path), "gib": round(path.stat().st_size / 2**30, 2),
                          "s": round(time.perf_counter() - t, 1)}), flush=True)
    return path


def _config_context():
    """The installed package's configs (`fluxlora.conf`), or this checkout's conf/ when fluxlora runs from the
    source tree (PYTHONPATH=.), where the conf/ → fluxlora.conf mapping of the install does not exist."""
    import importlib.util

    from hydra import initialize_config_dir, initialize_config_module

    try:
        installed = importlib.util.find_spec("fluxlora.conf") is not None
    except ModuleNotFoundError:
        installed = False
    if installed:
        return initialize_config_module(config_module="fluxlora.conf", version_base="1.3")
    return initialize_config_dir(config_dir=str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3")


def compose(tier: str, lora: str, extra: list[str], device: str, bfl: Path):
    from hydra import compose as hydra_compose

    overrides = [f"+vram={tier}", "model=flux-dev", f"model.path={bfl.parent}", f"trainer.accelerator={device}",
                 *LORA[lora], *extra]
    with _config_context():
        return hydra_compose(config_name="config", overrides=overrides)


class Batches(torch.utils.data.Dataset):
    """Random cached tensors shaped like the model's real caches (latents c×h×w, T5 n×d, pooled p)."""

    def __init__(self, config: dict, res: int, t5_len: int, n: int = 64) -> None:
        self.c, self.h = config["in_channels"] // 4, res // 8
        self.t5, self.d, self.p, self.n = t5_len, config["joint_attention_dim"], config["pooled_projection_dim"], n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        g = torch.Generator().manual_seed(i)
        return {"latents": torch.randn(self.c, self.h, self.h, generator=g),
                "t5": torch.randn(self.t5, self.d, generator=g), "pooled": torch.randn(self.p, generator=g)}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def step_timer(device: torch.device, warm: int, t_start: float, profile_at: int = -1):
    """A callback that records time to the end of the first step and the timed window after `warm` steps; from
    step `profile_at` on, a torch.profiler (or, with PYPROFILE=1, cProfile) records until the end."""
    import lightning as L

    python_profile = bool(os.environ.get("PYPROFILE"))

    class Timer(L.Callback):
        first = t0 = t1 = 0.0
        prof = None

        def on_train_batch_start(self, trainer, *a):
            if trainer.global_step == profile_at and self.prof is None:
                if python_profile:
                    import cProfile

                    self.prof = cProfile.Profile()
                    self.prof.enable()
                else:
                    from torch.profiler import ProfilerActivity, profile

                    self.prof = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
                    self.prof.__enter__()
            if trainer.global_step == warm:
                _sync(device)
                self.t0 = time.perf_counter()

        def on_train_batch_end(self, trainer, *a):
            if trainer.global_step == 1 and not self.first:
                _sync(device)
                self.first = time.perf_counter() - t_start

        def on_train_end(self, trainer, *a):
            _sync(device)
            self.t1 = time.perf_counter()
            if self.prof is not None:
                self.prof.disable() if python_profile else self.prof.__exit__(None, None, None)

    return Timer()


def write_profile(prof, steps: int, path: Path) -> dict:
    """The profile's tables into `path`; returns device seconds per step (torch.profiler only)."""
    import cProfile

    if isinstance(prof, cProfile.Profile):
        import io
        import pstats

        buf = io.StringIO()
        pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(40)
        path.write_text(buf.getvalue())
        return {}
    ka = prof.key_averages()
    gpu = [e for e in ka if e.device_type.name == "CUDA"]
    kernels = sum(e.self_device_time_total for e in gpu if "Memcpy" not in e.key) / steps / 1e6
    copies = sum(e.self_device_time_total for e in gpu if "Memcpy" in e.key) / steps / 1e6
    path.write_text(ka.table(sort_by="self_device_time_total", row_limit=30, max_name_column_width=80) + "\n" +
                    ka.table(sort_by="self_cpu_time_total", row_limit=40, max_name_column_width=80))
    return {"prof_kernel_s_per_step": round(kernels, 4), "prof_copy_s_per_step": round(copies, 4)}


def _memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {}
    return {"peak_alloc_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2),
            "peak_reserved_gib": round(torch.cuda.max_memory_reserved(device) / 2**30, 2)}


def _swap_override(cfg, model: torch.nn.Module) -> list[str]:
    """A small --layers model cannot swap a Flux-dev count: clamp to what it holds (noted in the result)."""
    from fluxlora.perf.swap_schedule import sd_scripts_split

    n_d, n_s = len(model.transformer_blocks), len(model.single_transformer_blocks)
    n = int(cfg.memory.blocks_to_swap)
    while n and (sd_scripts_split(n)[0] > n_d or sd_scripts_split(n)[1] > n_s):
        n -= 1
    return [] if n == int(cfg.memory.blocks_to_swap) else [f"memory.blocks_to_swap={n}"]


def run_cell(spec: dict) -> dict:
    """One tier × resolution × LoRA variant, exactly as a run applies the tier; returns the measurements."""
    import lightning as L
    from omegaconf import open_dict

    from fluxlora.perf.checkpointing import recompute_kind
    from fluxlora.perf.cuda_setup import prepare_cuda
    from fluxlora.perf.memory import MemorySettings
    from fluxlora.models.transformer import load_transformer
    from fluxlora.run.build import build_module, precision_for
    from fluxlora.run.settings import settings

    t_start = time.perf_counter()
    device = torch.device(spec["device"])
    out = {k: spec[k] for k in ("tier", "res", "lora")} | {"budget_gib": spec["budget_gib"]}
    bfl = Path(spec["bfl"])
    cfg = compose(spec["tier"], spec["lora"], spec["set"], "gpu" if device.type == "cuda" else "cpu", bfl)
    if device.type == "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
        # as a run does before loading: cuDNN SDPA off, expandable segments, and the tier's memory.budget_gb caps
        # the allocator (the product's own switch)
        prepare_cuda(device, cfg.memory.budget_gb)
        torch.cuda.reset_peak_memory_stats(device)
        out["card_gib"] = round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1)
    precision, compute_dtype = precision_for(cfg, device)
    memory = settings(MemorySettings, cfg.memory).resolved(device, int(cfg.data.resolution))  # tiers: concrete already
    stage = "load"
    try:
        transformer = load_transformer(bfl, compute_dtype, memory.base_storage, memory.load_device(device))
        out["load_s"] = round(time.perf_counter() - t_start, 2)
        clamp = _swap_override(cfg, transformer)
        if clamp:
            with open_dict(cfg):
                cfg.memory.blocks_to_swap = int(clamp[0].split("=")[1])
        out.update(precision=precision, storage=memory.base_storage, blocks_to_swap=int(cfg.memory.blocks_to_swap),
                   checkpointing=bool(cfg.memory.gradient_checkpointing), optim=str(cfg.optim.name),
                   lora_rank=int(cfg.lora.rank), lora_blocks=str(cfg.lora.train_blocks))
        stage = "setup"
        steps = spec["warm"] + spec["steps"]
        module, swapper = build_module(cfg, transformer, device, compute_dtype, steps)
        out.update(cuda_graphs=module.perf.cuda_graphs, recompute=recompute_kind(transformer))
        dl = torch.utils.data.DataLoader(Batches(dict(transformer.config), spec["res"], int(cfg.model.t5_max_length)),
                                         batch_size=1, shuffle=True, num_workers=0, pin_memory=device.type == "cuda")
        profile_at = steps - 2 if spec.get("profile") else -1
        timer = step_timer(device, spec["warm"], t_start, profile_at)
        trainer = L.Trainer(accelerator="gpu" if device.type == "cuda" else "cpu", devices=1, precision=precision,
                            max_steps=steps, gradient_clip_val=cfg.trainer.gradient_clip_val or None, logger=False,
                            enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                            num_sanity_val_steps=0, callbacks=[timer])
        stage = "train"
        trainer.fit(module, dl)
    except torch.OutOfMemoryError:
        return out | _memory(device) | {"error": f"OOM during {stage}"}
    out.update(s_per_step=round((timer.t1 - timer.t0) / spec["steps"], 4), first_step_s=round(timer.first, 2))
    if timer.prof is not None:
        where = Path(os.environ.get("OUT") or tempfile.gettempdir(), f"profile_{spec['tier']}_{spec['res']}.txt")
        out.update(write_profile(timer.prof, 2, where), profile=str(where))
    out["swap_active"] = swapper is not None  # block swapping runs on CUDA only
    if swapper is not None:
        out.update(swap_gb_per_step=round(swapper.stats["bytes"] / steps / 1e9, 2),
                   swap_wait_s_per_step=round(swapper.stats["wait_s"] / steps, 4))
    return out | _memory(device)


def verdict(r: dict) -> dict:
    """Adds `fits` (peak reserved <= budget - 1 GiB) and, where DESIGN.md has sd-scripts' number, the speed ratio."""
    if "peak_reserved_gib" in r:
        r["fits"] = r["peak_reserved_gib"] <= r["budget_gib"] - 1
    ref = SD_SCRIPTS.get((r["tier"], r["res"]))
    fluxgym = r.get("lora_rank") == 4 and r.get("lora_blocks") == "single"  # FluxGym's 12G LoRA settings
    if ref and fluxgym and "s_per_step" in r:
        r["sd_scripts_s_per_step"] = ref[0]
        r["speedup_vs_sd_scripts"] = round(ref[0] / r["s_per_step"], 2)
    return r


def run_isolated(spec: dict, timeout_s: float) -> dict:
    """Run one cell in a fresh process, bounded by `timeout_s`."""
    cmd = [sys.executable, __file__, "--cell", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {k: spec[k] for k in ("tier", "res", "lora", "budget_gib")} | {"error": f"cell timed out ({timeout_s}s)"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return json.loads(line)
    tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
    return {k: spec[k] for k in ("tier", "res", "lora", "budget_gib")} | {"error": f"exit {proc.returncode}: {tail}"}


def table(results: list[dict]) -> str:
    head = ("| tier | px | LoRA | storage / swap / ckpt | peak alloc | peak reserved | limit | fits | s/step "
            "| first step | load | vs sd-scripts |\n|---|---|---|---|---|---|---|---|---|---|---|---|")
    rows = []
    for r in results:
        cfg = f"{r.get('storage', '?')} / {r.get('blocks_to_swap', '?')} / {'on' if r.get('checkpointing') else 'off'}"
        speed = r.get("error") or f"{r.get('s_per_step')}"
        vs = f"{r['speedup_vs_sd_scripts']}× ({r['sd_scripts_s_per_step']})" if "speedup_vs_sd_scripts" in r else ""
        rows.append(f"| {r['tier']} | {r['res']} | {r['lora']} | {cfg} | {r.get('peak_alloc_gib', '')} | "
                    f"{r.get('peak_reserved_gib', '')} | {r['budget_gib'] - 1} | {r.get('fits', '')} | {speed} | "
                    f"{r.get('first_step_s', '')} | {r.get('load_s', '')} | {vs} |")
    return "\n".join([head, *rows])


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiers", nargs="+", default=list(TIERS), choices=TIERS)
    ap.add_argument("--res", type=int, nargs="+", default=[512, 1024])
    ap.add_argument("--lora", nargs="+", default=list(LORA), choices=list(LORA))
    ap.add_argument("--steps", type=int, default=4, help="timed steps")
    ap.add_argument("--warm", type=int, default=2, help="warm-up steps (the first one gives time to first step)")
    ap.add_argument("--layers", type=int, default=0, help="double blocks (singles = 2x); 0 = Flux-dev's 19/38")
    ap.add_argument("--tiny", action="store_true", help="tiny widths instead of Flux-dev's (CPU smoke test)")
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"], help="cpu: no memory cap, no swap")
    ap.add_argument("--bfl", help="a BFL single file to read (default: write a random fp8 one into --bfl-dir)")
    ap.add_argument("--bfl-dir", default=os.path.join(tempfile.gettempdir(), "fluxlora-bench"))
    ap.add_argument("--set", nargs="*", default=[], help="extra Hydra overrides for every cell, e.g. "
                                                         "memory.swap_prefetch=2")
    ap.add_argument("--profile", action="store_true", help="profile the last two steps of each cell into "
                    "$OUT/profile_<tier>_<res>.txt (PYPROFILE=1: cProfile instead of torch.profiler)")
    ap.add_argument("--in-process", action="store_true", help="run cells in this process (no isolation)")
    ap.add_argument("--cell-timeout", type=float, default=480.0, help="seconds one isolated cell may take")
    ap.add_argument("--cell", help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.cell:
        print(json.dumps(run_cell(json.loads(args.cell))), flush=True)
        return []
    if args.device == "cuda":
        print(torch.__version__, torch.cuda.get_device_name(), time.strftime("%Y-%m-%d"), flush=True)
    bfl = ensure_bfl(args)
    results = []
    for tier in args.tiers:
        for res in args.res:
            for lora in args.lora:
                spec = dict(tier=tier, res=res, lora=lora, budget_gib=int(tier[:-2]), device=args.device,
                            bfl=str(bfl), steps=args.steps, warm=args.warm, set=list(args.set), profile=args.profile)
                r = verdict(run_cell(spec) if args.in_process else run_isolated(spec, args.cell_timeout))
                print(json.dumps(r), flush=True)
                results.append(r)
    print(table(results), flush=True)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "memory_tiers.json").write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
