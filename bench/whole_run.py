"""The whole run a FluxGym user makes, under each tier's budget: full-size random-weight files in FluxGym's layout,
`python -m fluxlora +vram=<tier>` with sampling on, and the peak memory and time of every stage.

Writes once (into --models): `unet/flux1-dev.sft` (bf16, 23.8 GB), `vae/ae.sft`, `clip/clip_l.safetensors`,
`clip/t5xxl_fp16.safetensors` (9.5 GB) and `clip/t5xxl_fp8_e4m3fn.safetensors` (4.9 GB), plus tokenizer folders
(small offline vocabularies: no tokenizer can be downloaded here, and token ids only have to exist). A dataset of
images in three aspect ratios (three buckets: each compiles once more) with captions, and a kohya prompts file with a
1024x1024 and an 832x1216 prompt.

Each cell is one `python -m fluxlora` process: `+vram=<tier>` sets `memory.budget_gb`, the product's own switch, so
the allocator is capped at budget - 1 GiB exactly as on a card of that size. Its Inductor cache starts empty (cold);
`--warm` runs the cell again (same steps, sampling off) with the cache it left, so every bucket shape loads its
graphs. nvidia-smi is sampled every 0.2 s. Per cell: exit status, LoRA file and sample grids present, `stages.json`
(time and peak reserved memory of load, cache, build, first step, steps, after the steps, after fit; steady s/step; each
sampling round; each new bucket shape's first step; repeat-shape steps far slower than the fastest; graphs
compiled), `first_and_new_shape_steps_s` (the first step plus each new shape's first step: what compiling cost
before steady speed) and nvidia-smi's peak.

`--model flux-kontext` trains the Kontext preset on the same files with a "before" image per target (Kontext-dev has
FLUX.1-dev's layout) and renders each sample from a control image (`--ci`); `--model chroma` writes a full-size
random Chroma file (8.9 B) beside them and trains the Chroma preset (T5 alone, negative prompts).

    python bench/whole_run.py --models /tmp/flux --tiers 8gb 12gb --res 512 1024 --out /tmp/out
    python bench/whole_run.py --models /tmp/flux --model flux-kontext --tiers 16gb 24gb --res 512 1024
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor, as_completed
from pathlib import Path

TIERS = ("8gb", "12gb", "16gb", "20gb", "24gb")
NO_TIER = "none"
"""--tiers none: no `+vram`, the whole card (what `speed.*: auto` does without a budget: bf16 base, CUDA graphs,
cuDNN attention on Hopper)."""
PROMPTS = ("a photo of sks on a beach --w 1024 --h 1024 --d 1 --s {steps}",
           "a portrait of sks in a garden --w 832 --h 1216 --d 2 --s {steps}")
IMAGES = ((1024, 1024), (1024, 1024), (1024, 1024), (832, 1216), (832, 1216), (1216, 832), (1216, 832), (1024, 1024))


MODELS = ("flux-dev", "flux-kontext", "chroma")
"""--model: Kontext-dev has FLUX.1-dev's keys and shapes, so its cells read `unet/flux1-dev.sft` under the Kontext
preset with paired images; Chroma's cells read `unet/chroma-random.safetensors` (written only when asked for)."""
CHROMA_FILE = "unet/chroma-random.safetensors"


def write_models(root: Path, device: str, tiny: bool = False, chroma: bool = False) -> None:
    """FluxGym's folder of full-size (or, with `tiny`, tiny) random-weight files, with a Chroma file beside them when
    `chroma`; a file already there is kept."""
    import torch

    from fluxlora.models import tiny as tiny_model
    from fluxlora.models.bfl import shipped_config, write_random_bfl

    if tiny:
        parts = tiny_model.build()
        configs = {"flux": dict(tiny_model.TRANSFORMER), "vae": dict(tiny_model.VAE),
                   "clip": parts["text_encoder"].config.to_dict(), "t5": parts["text_encoder_2"].config.to_dict()}
    else:
        configs = {k: shipped_config(n) for k, n in (("flux", "flux-dev"), ("vae", "vae"), ("clip", "clip-l"),
                                                       ("t5", "t5-xxl"))}
    for sub in ("unet", "vae", "clip"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(root / "unet" / "flux1-dev.sft",
             lambda p: write_random_bfl(p, configs["flux"], torch.bfloat16, device=device)),
            (root / "vae" / "ae.sft", lambda p: _write_vae(p, configs["vae"], device, tiny)),
            (root / "clip" / "clip_l.safetensors", lambda p: _write_encoder(p, "clip", configs, torch.float16,
                                                                            device, tiny)),
            (root / "clip" / "t5xxl_fp16.safetensors", lambda p: _write_encoder(p, "t5", configs, torch.float16,
                                                                                device, tiny)),
            (root / "clip" / "t5xxl_fp8_e4m3fn.safetensors",
             lambda p: _write_encoder(p, "t5", configs, torch.float8_e4m3fn, device, tiny))]
    if chroma:
        jobs.append((root / CHROMA_FILE, lambda p: _write_chroma(p, device, tiny)))
    for path, write in jobs:
        if not path.exists():
            t0 = time.monotonic()
            write(path)
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.monotonic() - t0:.0f}s", flush=True)
    if not (root / "tokenizer_2").exists():
        tiny_model.clip_tokenizer().save_pretrained(root / "tokenizer")
        tiny_model.t5_tokenizer(512).save_pretrained(root / "tokenizer_2")


def _write_chroma(path: Path, device: str, tiny: bool) -> None:
    """A random-weight Chroma single file in BFL keys (`distilled_guidance_layer.*`, as lodestones ships it), full
    size (8.9 B, bf16) or tiny, streamed one tensor at a time: the keys come from a meta-built model."""
    import torch
    from diffusers import ChromaTransformer2DModel

    from fluxlora.models import chroma
    from fluxlora.models.bfl import _POOL, _random_tensor, shipped_config
    from fluxlora.models.files import meta_model, stream_safetensors

    config = dict(chroma.TINY) if tiny else shipped_config("chroma")
    model = meta_model(lambda: ChromaTransformer2DModel(**config))
    shapes = {k: tuple(v.shape) for k, v in chroma.to_bfl(dict(model.state_dict())).items()}
    pool = torch.randn(_POOL, generator=torch.Generator(device).manual_seed(3), device=device).bfloat16()
    meta = {"format": "pt"} | ({"fluxlora.config": json.dumps(config)} if tiny else {})
    stream_safetensors(path, shapes, torch.bfloat16, lambda n: _random_tensor(n, shapes[n], pool), meta, fsync=False)


def _write_vae(path: Path, config: dict, device: str, store_config: bool) -> None:
    import torch
    from diffusers import AutoencoderKL

    from fluxlora.models.vae import save_ldm_vae

    with torch.device(device):
        vae = AutoencoderKL(**config)
    save_ldm_vae(path, vae, torch.float32, store_config=store_config)


def _write_encoder(path: Path, kind: str, configs: dict, dtype, device: str, store_config: bool) -> None:
    """CLIP-L or T5-XXL state-dict keys (transformers' names, as FluxGym's files have them), random values:
    matrices ~ N(0, 1/fan_in), norms 1, the rest small, so activations stay finite. FluxGym's files carry no
    config; the tiny ones do (a head count cannot be read from shapes)."""
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxlora.models.bfl import _random_tensor
    from fluxlora.models.files import meta_model, stream_safetensors

    if kind == "clip":
        model = meta_model(lambda: CLIPTextModel(CLIPTextConfig(**configs["clip"])))
    else:
        model = meta_model(lambda: T5EncoderModel(T5Config(**configs["t5"])))
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()
              if k not in ("encoder.embed_tokens.weight", "text_model.embeddings.position_ids")}
    pool = torch.randn(16_777_259, generator=torch.Generator(device).manual_seed(7), device=device).bfloat16()

    def make(name: str):
        if "norm" in name and name.endswith(".weight"):
            return torch.ones(shapes[name], dtype=torch.bfloat16, device=device)
        return _random_tensor(name, shapes[name], pool)

    def stored(name: str):
        fp8 = dtype == torch.float8_e4m3fn and len(shapes[name]) == 2 and ".block." in name
        return dtype if fp8 or dtype != torch.float8_e4m3fn else torch.float16

    meta = {"format": "pt"} | ({"fluxlora.config": json.dumps(configs[kind])} if store_config else {})
    stream_safetensors(path, shapes, stored, make, meta, fsync=False)


def write_dataset(root: Path, scale: int = 1, control: Path | None = None) -> None:
    """The images and captions; with `control`, a "before" image of the same stem and size for each (Kontext)."""
    import numpy as np
    from PIL import Image

    root.mkdir(parents=True, exist_ok=True)
    if control is not None:
        control.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i, (w, h) in enumerate((w // scale, h // scale) for w, h in IMAGES):
        for folder in (root, control):
            if folder is not None and not (folder / f"img{i}.png").exists():
                base = rng.integers(0, 255, (h // 16, w // 16, 3), dtype=np.uint8)
                Image.fromarray(base).resize((w, h), Image.BILINEAR).save(folder / f"img{i}.png")
        (root / f"img{i}.txt").write_text(f"a photo of sks, picture {i}")


def model_overrides(model: str, models: Path, work: Path) -> list[str]:
    """The cell's `model=` and what that preset needs beyond FluxGym's folder."""
    if model == "flux-kontext":  # Kontext-dev's layout is FLUX.1-dev's: the dev file stands in for it
        return ["model=flux-kontext", f"model.transformer={models / 'unet' / 'flux1-dev.sft'}",
                f"data.control_path={work / 'control'}"]
    if model == "chroma":  # T5 alone: its tokenizer is FluxGym's tokenizer_2
        return ["model=chroma", f"model.transformer={models / CHROMA_FILE}", f"model.vae={models / 'vae' / 'ae.sft'}",
                f"model.tokenizer_path={models / 'tokenizer_2'}"]
    return ["model=flux-dev"]


def prompt_lines(model: str, steps: int, work: Path) -> list[str]:
    """The kohya prompts: Kontext renders each from a control image (`--ci`), Chroma with a negative (`--n`)."""
    lines = [p.format(steps=steps) for p in PROMPTS]
    if model == "flux-kontext":
        lines = [f"{p} --ci {work / 'control' / f'img{i * 3}.png'}" for i, p in enumerate(lines)]
    elif model == "chroma":
        lines = [f"{p} --n blurry, low quality" for p in lines]
    return lines


class SmiPeak:
    """nvidia-smi's memory.used of GPU 0 every 0.2 s (`peak`, MiB), each entry's largest use (`apps`: pid and name ->
    MiB, so memory outside the run's allocator is seen and named), and each process's largest use at one moment
    (`per_pid`: pid -> MiB).

    `per_pid` sums a pid's entries within one sample: nvidia-smi can list a process twice (a second entry named
    `[No data]`), and the two are not always held at once. In cells alone on the H200 the GPU's total peak was the
    named entry's peak plus at most 9 MiB while the `[No data]` entry peaked at 0.8 GB (tiers) to 43 GB (no tier),
    so summing each entry's own peak, as this bench did before, counted memory twice."""

    def __init__(self) -> None:
        self.peak, self.apps, self.per_pid, self._procs = 0, {}, {}, []
        self._stop = threading.Event()
        try:
            proc = subprocess.Popen(["nvidia-smi", "--query-gpu=memory.used", "-lms", "200", "--format=csv,noheader,"
                                     "nounits", "-i", "0"], stdout=subprocess.PIPE, text=True)
        except FileNotFoundError:  # no GPU here (the CPU smoke test)
            return
        self._procs.append(proc)
        threading.Thread(target=self._read_total, args=(proc,), daemon=True).start()
        threading.Thread(target=self._sample_apps, daemon=True).start()

    def _read_total(self, proc) -> None:
        for line in proc.stdout:
            try:
                self.peak = max(self.peak, int(line.strip()))
            except ValueError:
                pass

    def _sample_apps(self) -> None:
        """One nvidia-smi query every 0.5 s, so each answer is one moment (`-lms` output cannot be split into them)."""
        cmd = ["nvidia-smi", "--query-compute-apps=pid,process_name,used_memory", "--format=csv,noheader,nounits",
               "-i", "0"]
        while not self._stop.wait(0.5):
            try:
                out = subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout
            except (OSError, subprocess.TimeoutExpired):
                continue
            self.add_sample(out.splitlines())

    def add_sample(self, lines: list[str]) -> None:
        """Fold one query's `pid, name, MiB` lines into `apps` and `per_pid`."""
        moment: dict[str, int] = {}
        for line in lines:
            parts = [p.strip() for p in line.split(",")]
            if len(parts) == 3 and parts[2].isdigit():
                key, mib = f"{parts[0]} {parts[1].rsplit('/', 1)[-1]}", int(parts[2])
                self.apps[key] = max(self.apps.get(key, 0), mib)
                moment[parts[0]] = moment.get(parts[0], 0) + mib
        for pid, mib in moment.items():
            self.per_pid[pid] = max(self.per_pid.get(pid, 0), mib)

    def stop(self) -> int:
        self._stop.set()
        for proc in self._procs:
            proc.terminate()
            proc.wait(5)
        return self.peak


_CELLS: set = set()  # running cells: killed when this script is (a device call's time limit), never left behind
_STOPPING = threading.Event()  # set by SIGTERM: no cell starts after it


def _kill_cells(*_: object) -> None:
    """`timeout`'s SIGTERM: kill the running cells (their rows, with log tails, are still printed) and start none."""
    _STOPPING.set()
    for proc in list(_CELLS):
        proc.kill()


def run_cell(args, tier: str, res: int, extra: list[str], tag: str, inductor: Path, steps: int) -> dict:
    name = f"{tier}-{res}{tag}"
    cmd = [sys.executable, "-m", "fluxlora", *model_overrides(args.model, args.models, args.work),
           f"model.path={args.models}", "data=folder",
           f"data.path={args.data}", f"data.resolution={res}", *([] if tier == NO_TIER else [f"+vram={tier}"]),
           f"trainer.max_steps={steps}",
           f"sample.every_n_steps={args.sample_every}", f"sample.prompts_file={args.prompts}", f"name={name}",
           f"output.root={args.work}", "callbacks.progress=null", *args.overrides, *extra]
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(inductor), PYTHONUNBUFFERED="1")
    if _STOPPING.is_set():
        return {"cell": name, "rc": "not started (stopping)"}
    smi = SmiPeak()
    t0 = time.monotonic()
    # the cell's output goes to a file as it comes: a cell that is killed (its timeout, the call's) still has its log
    log_path = Path(args.work) / f"{name}.log"
    print(f"cell {name}: started, log {log_path}", flush=True)
    with open(log_path, "w") as log_file:
        # not from the checkout: `-m` would import its fluxlora/ instead of the installed package
        proc = subprocess.Popen(cmd, env=env, stdout=log_file, stderr=subprocess.STDOUT, cwd=args.work)
        _CELLS.add(proc)
        try:
            rc = proc.wait(timeout=args.cell_timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            rc = "timeout"
        _CELLS.discard(proc)
    if _STOPPING.is_set() and rc != 0:
        rc = "killed (stopping)"
    out = log_path.read_text(errors="replace")
    wall = time.monotonic() - t0
    folder = Path(args.work) / name
    stages = folder / "stages.json"
    row = {"cell": name, "tier": tier, "res": res, "rc": rc, "wall_s": round(wall, 1), "smi_peak_mib": smi.stop(),
           "smi_apps_mib": smi.apps, "smi_run_mib": smi.per_pid.get(str(proc.pid)),
           "parallel": args.parallel,
           "lora": (folder / f"{name}.safetensors").exists(),
           "grids": len(list((folder / "sample").glob("*_grid.png"))) if (folder / "sample").exists() else 0,
           "errors": [ln for ln in out.splitlines() if "fluxlora: error" in ln or "Error" in ln][-3:],
           "log": [ln[-220:] for ln in out.splitlines() if any(k in ln for k in (
               "memory budget", "caching:", "caching stage", "sampling mode", "T5", "stages:", "loaded ", "samples at",
               "switched off", "attention:", "CUDA graphs", "first step", "first batch of shape", "ran out"))]}
    if stages.exists():
        row.update(json.loads(stages.read_text()))
        # time spent before steady speed on compiling: the first step and the first step of each new bucket shape
        row["first_and_new_shape_steps_s"] = round(row["stages"].get("first_step", {}).get("s", 0.0)
                                                   + sum(row.get("new_shape_steps_s", {}).values()), 1)
    if rc != 0:
        row["tail"] = out.splitlines()[-25:]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="/tmp/flux-models")
    parser.add_argument("--work", default="/tmp/whole-run")
    parser.add_argument("--tiers", nargs="+", default=list(TIERS), choices=[*TIERS, NO_TIER])
    parser.add_argument("--res", nargs="+", type=int, default=[512, 1024])
    parser.add_argument("--steps", type=int, default=8, help="trainer.max_steps of each cell")
    parser.add_argument("--sample-every", type=int, default=4)
    parser.add_argument("--sample-steps", type=int, default=12, help="denoising steps of each sample prompt")
    parser.add_argument("--model", choices=MODELS, default="flux-dev", help="the preset every cell trains")
    parser.add_argument("--t5", choices=("fp16", "fp8"), default="fp16", help="which T5 file the cells read")
    parser.add_argument("--warm", action="store_true", help="run each cell's first step again, warm Inductor cache")
    parser.add_argument("--cell-timeout", type=float, default=420)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="tiny files (a CPU smoke test of this script)")
    parser.add_argument("--parallel", type=int, default=1, help="cells run at once (timings then share the GPU)")
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help="append each cell's JSON line to this file")
    parser.add_argument("overrides", nargs="*", help="more overrides for every cell, e.g. trainer.accelerator=cpu")
    args = parser.parse_args()
    args.models, args.work = Path(args.models), Path(args.work)
    args.data, args.prompts = args.work / "dataset", args.work / "prompts.txt"
    if args.write_only:
        write_models(args.models, args.device, args.tiny, chroma=args.model == "chroma")
        return
    # in a child: CUDA initialised here would hold its context and cache on the GPU the cells are measured on
    subprocess.run([sys.executable, __file__, "--write-only", "--models", str(args.models), "--work", str(args.work),
                    "--device", args.device, "--model", args.model, *(["--tiny"] if args.tiny else [])], check=True)
    write_dataset(args.data, 8 if args.tiny else 1, args.work / "control" if args.model == "flux-kontext" else None)
    args.prompts.write_text("\n".join(prompt_lines(args.model, args.sample_steps, args.work)) + "\n")
    t5 = args.models / "clip" / ("t5xxl_fp8_e4m3fn.safetensors" if args.t5 == "fp8" else "t5xxl_fp16.safetensors")
    extra = [f"model.t5xxl={t5}"] if args.t5 == "fp8" or args.model == "chroma" else []
    tag = ("" if args.model == "flux-dev" else f"-{args.model}") + ("-t5fp8" if args.t5 == "fp8" else "")
    cells = [(tier, res) for res in args.res for tier in args.tiers]

    def cell(tier_res) -> list[dict]:
        tier, res = tier_res
        inductor = args.work / f"inductor-{tier}-{res}{tag}"
        rows = [run_cell(args, tier, res, extra, tag, inductor, args.steps)]
        if args.warm:
            # every bucket shape again (same steps, no sampling), each loading its graphs from the cache just left
            rows.append(run_cell(args, tier, res, [*extra, "resume=null", "sample.every_n_steps=0",
                                                   "sample.at_end=false"], f"{tag}-warm", inductor, args.steps))
        return rows

    signal.signal(signal.SIGTERM, _kill_cells)  # `timeout` sends SIGTERM: end the cells too, print what finished
    with ThreadPoolExecutor(args.parallel) as pool:  # >1: memory peaks hold, timings share the GPU
        for done in as_completed([pool.submit(cell, c) for c in cells]):  # each row as soon as its cell ends
            for row in done.result():
                print(json.dumps(row), flush=True)
                if args.out:
                    with open(args.out, "a") as f:
                        f.write(json.dumps(row) + "\n")
    if _STOPPING.is_set():
        sys.exit(124)

if __name__ == "__main__":
    main()
