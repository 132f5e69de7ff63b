"""Device check for real-size weights: a Flux.1-dev-shaped random BFL single file in, LoRA files out.

    python bench/lora_roundtrip.py write  --dir /tmp/flux     # flux1-dev.safetensors (bf16) + fp8 variant
    python bench/lora_roundtrip.py load   --file F [--storage fp8]   # load time and peak host RAM (run each in a fresh process)
    python bench/lora_roundtrip.py check  --dir /tmp/flux     # train, export kohya + diffusers, reload with diffusers
    python bench/lora_roundtrip.py check  --dir /tmp/flux --pipeline kontext   # the same as FLUX.1 Kontext
    python bench/lora_roundtrip.py check  --dir /tmp/chroma --pipeline chroma  # a random 8.9 B Chroma, ChromaPipeline

`check` loads the bf16 file, trains a few LoRA steps (all block linears, modulation included) through
FluxLoRAModule.flow_loss, exports both files, loads each with `FluxPipeline.load_lora_weights` into a second
Flux-dev-shaped transformer read from the same file, and compares transformer outputs with the trained module's.
With `--pipeline kontext` (Kontext-dev has Flux-dev's layout) the steps train with a control latent (its tokens
after the target's, first id channel 1), the files load through `FluxKontextPipeline.load_lora_weights`, and the
outputs compared are on target + control tokens, as the pipeline feeds them. With `--pipeline chroma` the
transformer is a full-size `ChromaTransformer2DModel` built with random weights on the device (the same seed for
the trained and the reloading copy; no file is read: Chroma's loader is tested on the CPU), trained with a padded
T5 mask through the Chroma step, and the files load through `ChromaPipeline.load_lora_weights`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

DEV = os.environ.get("RT_DEVICE", "cuda")  # `cpu` with RT_TINY=1 is a smoke test of this script


def model_config() -> dict:
    from fluxlora.models.bfl import shipped_config
    from fluxlora.models.tiny import TRANSFORMER

    return dict(TRANSFORMER) if os.environ.get("RT_TINY") else shipped_config("flux-dev")


def host_mem() -> dict:
    """Peak and current resident memory from /proc (RssAnon excludes the page cache of mapped files)."""
    vals = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            vals[k] = round(int(v.split()[0]) / 2**20, 2)  # GiB
    return vals


def cmd_write(d: Path) -> None:
    from fluxlora.models.bfl import write_random_bfl

    d.mkdir(parents=True, exist_ok=True)
    cfg = model_config()
    for name, dtype in (("flux1-dev.safetensors", torch.bfloat16), ("flux1-dev-fp8.safetensors", torch.float8_e4m3fn)):
        t = time.perf_counter()
        write_random_bfl(d / name, cfg, dtype, device=DEV)
        size = (d / name).stat().st_size / 2**30
        print(json.dumps({"wrote": name, "gib": round(size, 2), "s": round(time.perf_counter() - t, 1)}), flush=True)


def cmd_load(f: Path, storage: str) -> None:
    from diffusers import FluxTransformer2DModel  # noqa: F401  (import time is not load time)

    from fluxlora.models.transformer import load_transformer

    t = time.perf_counter()
    m = load_transformer(f, torch.bfloat16, storage=storage, device=DEV)
    torch.cuda.synchronize() if DEV == "cuda" else None
    dt = time.perf_counter() - t
    n = sum(p.numel() for p in m.parameters())
    print(json.dumps({"load": f.name, "storage": storage, "s": round(dt, 1), "params_b": round(n / 1e9, 2),
                      "gpu_gib": round(torch.cuda.memory_allocated() / 2**30, 2) if DEV == "cuda" else 0, **{f"host_{k}_gib": v for k, v in host_mem().items()}}),
          flush=True)


def inputs(cfg: dict, res: int = 512, seed: int = 0, control: torch.Tensor | None = None) -> dict:
    """The transformer's inputs at `res`; with `control` (a latent), its tokens and ids appended as Kontext does."""
    from fluxlora.training import flow as fm
    from fluxlora.training import kontext

    g = torch.Generator(DEV).manual_seed(seed)
    h = res // 8
    lat = torch.randn(1, cfg["in_channels"] // 4, h, h, device=DEV, generator=g)
    tokens, ids = fm.pack_latents(lat).bfloat16(), fm.image_ids(h, h, device=DEV, dtype=torch.bfloat16)
    if control is not None:
        tokens, ids = kontext.append_control(tokens, ids, control)
    return dict(hidden_states=tokens,
                encoder_hidden_states=torch.randn(1, 512, cfg["joint_attention_dim"], device=DEV, generator=g).bfloat16(),
                pooled_projections=torch.randn(1, cfg["pooled_projection_dim"], device=DEV, generator=g).bfloat16(),
                timestep=torch.full((1,), 0.6, device=DEV, dtype=torch.bfloat16),
                img_ids=ids,
                txt_ids=torch.zeros(512, 3, device=DEV, dtype=torch.bfloat16),
                guidance=torch.full((1,), 1.0, device=DEV), return_dict=False)


@torch.no_grad()
def out_of(transformer, x: dict) -> torch.Tensor:
    return transformer(**x)[0].float()


def compare(name: str, got: torch.Tensor, want: torch.Tensor, base: torch.Tensor) -> dict:
    err = (got - want).norm() / want.norm()
    effect = (want - base).norm() / want.norm()
    return {"file": name, "rel_err_vs_trained": float(err), "lora_effect_rel": float(effect),
            "max_abs_err": float((got - want).abs().max()), "ok": bool(err < 0.1 * effect and err < 2e-2)}


def train(module, opt: torch.optim.Optimizer, batch: dict, steps: int) -> list[float]:
    """`steps` optimizer steps of the module's own flow-matching loss on `batch`; the losses."""
    losses = []
    for _ in range(steps):
        loss = module.flow_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
    return losses


def chroma_transformer(seed: int = 0) -> torch.nn.Module:
    """A random-weight Chroma transformer (full size, or tiny with RT_TINY), in bf16 on DEV; equal for equal seeds."""
    from diffusers import ChromaTransformer2DModel

    from fluxlora.models import chroma
    from fluxlora.models.bfl import shipped_config

    torch.manual_seed(seed)
    with torch.device(DEV):
        model = ChromaTransformer2DModel(**(dict(chroma.TINY) if os.environ.get("RT_TINY") else shipped_config("chroma")))
    return model.to(torch.bfloat16).eval()


def cmd_check_chroma(d: Path, steps: int) -> None:
    """`check` for Chroma: train, export, reload with ChromaPipeline, compare (see the module docstring)."""
    from diffusers import ChromaPipeline
    from omegaconf import OmegaConf

    from fluxlora.lora.inject import LoraSettings
    from fluxlora.models.chroma import predict
    from fluxlora.training import flow as fm
    from fluxlora.training.flow import FlowConfig
    from fluxlora.training.module import FluxLoRAModule

    d.mkdir(parents=True, exist_ok=True)
    t = chroma_transformer()
    cfg = dict(t.config)
    settings = LoraSettings(rank=16, alpha=8, train_blocks="all", include_modulation=False)  # Chroma has none
    module = FluxLoRAModule(t, settings, FlowConfig(guidance_scale=0.0), OmegaConf.create({"name": "adamw", "lr": 2e-3}),
                            total_steps=steps, compute_dtype=torch.bfloat16).to(DEV)
    opt = torch.optim.AdamW([p for p in t.parameters() if p.requires_grad], lr=2e-3)
    g = torch.Generator(DEV).manual_seed(0)
    text = 512 if not os.environ.get("RT_TINY") else 32
    mask = torch.zeros(1, text, dtype=torch.long, device=DEV)
    mask[:, :77] = 1  # a padded caption: the mask must apply in training and after the reload alike
    latents = torch.randn(1, cfg["in_channels"] // 4, 64, 64, device=DEV, generator=g)
    t5 = torch.randn(1, text, cfg["joint_attention_dim"], device=DEV, generator=g)
    batch = {"latents": latents, "t5": t5, "t5_mask": mask, "pooled": torch.zeros(1, 0, device=DEV)}
    losses = train(module, opt, batch, steps)
    xt = fm.pack_latents(torch.randn(latents.shape, device=DEV, generator=g)).bfloat16()
    sigma = torch.full((1,), 0.6, device=DEV)

    def out(transformer) -> torch.Tensor:
        with torch.no_grad():
            return predict(transformer, xt, t5.bfloat16(), mask, sigma, 64, 64, torch.bfloat16).float()

    t.eval()
    want = out(t)
    save_exports(t, settings, d)
    del module, opt, t
    torch.cuda.empty_cache() if DEV == "cuda" else None
    pipe = ChromaPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, transformer=chroma_transformer())
    report = {"pipeline": type(pipe).__name__, "losses": [round(v, 4) for v in losses]}
    reload_and_compare(pipe, d, out, want, report)


def save_exports(transformer: torch.nn.Module, settings, d: Path) -> None:
    """The trained LoRA as the run writes it: `kohya.safetensors` and `diffusers.safetensors` in `d`, bf16."""
    from safetensors.torch import save_file

    from fluxlora.lora.export import diffusers_state_dict, kohya_state_dict
    from fluxlora.lora.header import training_metadata

    meta = training_metadata(settings, {"name": "roundtrip"})
    save_file({k: v.cpu() for k, v in kohya_state_dict(transformer, torch.bfloat16).items()}, d / "kohya.safetensors",
              meta)
    save_file({k: v.cpu() for k, v in diffusers_state_dict(transformer, torch.bfloat16).items()},
              d / "diffusers.safetensors", meta)


def reload_and_compare(pipe, d: Path, out, want: torch.Tensor, report: dict) -> None:
    """Load each file with `pipe.load_lora_weights`, compare `out(pipe.transformer)` with `want`, print the report;
    exit 1 unless every file reproduces the trained module."""
    base = out(pipe.transformer)
    names = ["diffusers.safetensors"] if os.environ.get("RT_TINY") else ["kohya.safetensors", "diffusers.safetensors"]
    for name in names:
        try:
            pipe.load_lora_weights(str(d), weight_name=name, adapter_name=name.split(".")[0])
        except Exception as e:  # noqa: BLE001 - a file diffusers cannot read is a result to report, not a crash
            report[name] = {"file": name, "ok": False, "error": f"{type(e).__name__}: {e}"[:400]}
            continue
        report[name] = compare(name, out(pipe.transformer), want, base)
        pipe.unload_lora_weights()
    print(json.dumps(report), flush=True)
    if not all(report[n]["ok"] for n in names):
        sys.exit(1)


def cmd_check(d: Path, steps: int, pipeline: str = "flux") -> None:
    from diffusers import FluxKontextPipeline, FluxPipeline
    from omegaconf import OmegaConf

    from fluxlora.lora.inject import LoraSettings
    from fluxlora.training.flow import FlowConfig
    from fluxlora.models import tiny
    from fluxlora.models.transformer import load_transformer
    from fluxlora.training.module import FluxLoRAModule

    src = d / "flux1-dev.safetensors"
    t = load_transformer(src, torch.bfloat16, device=DEV)
    settings = LoraSettings(rank=16, alpha=8, train_blocks="all", include_modulation=True)
    optim = OmegaConf.create({"name": "adamw", "lr": 2e-3})
    module = FluxLoRAModule(t, settings, FlowConfig(), optim, total_steps=steps, compute_dtype=torch.bfloat16).to(DEV)
    params = [p for p in t.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=2e-3)
    cfg = model_config()
    control = torch.randn(1, cfg["in_channels"] // 4, 64, 64, device=DEV) if pipeline == "kontext" else None
    x = inputs(cfg, control=control)
    batch = {"latents": torch.randn(1, cfg["in_channels"] // 4, 64, 64, device=DEV), "t5": x["encoder_hidden_states"].float(),
             "pooled": x["pooled_projections"].float()}
    if control is not None:
        batch["control"] = control
    losses = train(module, opt, batch, steps)
    t.eval()
    want = out_of(t, x)
    save_exports(t, settings, d)
    del module, opt, params, t
    torch.cuda.empty_cache() if DEV == "cuda" else None
    parts = tiny.build()
    parts["transformer"] = load_transformer(src, torch.bfloat16, device=DEV)
    pipe = (FluxKontextPipeline if pipeline == "kontext" else FluxPipeline)(**parts)
    report = {"pipeline": type(pipe).__name__, "losses": [round(v, 4) for v in losses]}
    reload_and_compare(pipe, d, lambda transformer: out_of(transformer, x), want, report)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["write", "load", "check"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/flux"))
    ap.add_argument("--file", type=Path)
    ap.add_argument("--storage", default="none", choices=["none", "fp8"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pipeline", default="flux", choices=["flux", "kontext", "chroma"],
                    help="check: the pipeline that reloads")
    a = ap.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(False)
    if a.cmd == "write":
        cmd_write(a.dir)
    elif a.cmd == "load":
        cmd_load(a.file, a.storage)
    elif a.pipeline == "chroma":
        cmd_check_chroma(a.dir, a.steps)
    else:
        cmd_check(a.dir, a.steps, a.pipeline)


if __name__ == "__main__":
    main()
