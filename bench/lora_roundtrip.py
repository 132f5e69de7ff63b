"""Device check for real-size weights: a Flux.1-dev-shaped random BFL single file in, LoRA files out.

    python bench/lora_roundtrip.py write  --dir /tmp/flux     # flux1-dev.safetensors (bf16) + fp8 variant
    python bench/lora_roundtrip.py load   --file F [--storage fp8]   # load time and peak host RAM (run each in a fresh process)
    python bench/lora_roundtrip.py check  --dir /tmp/flux     # train, export kohya + diffusers, reload with diffusers
    python bench/lora_roundtrip.py check  --dir /tmp/flux --pipeline kontext   # the same as FLUX.1 Kontext

`check` loads the bf16 file, trains a few LoRA steps (all block linears, modulation included) through
FluxLoRAModule.flow_loss, exports both files, loads each with `FluxPipeline.load_lora_weights` into a second
Flux-dev-shaped transformer read from the same file, and compares transformer outputs with the trained module's.
With `--pipeline kontext` (Kontext-dev has Flux-dev's layout) the steps train with a control latent (its tokens
after the target's, first id channel 1), the files load through `FluxKontextPipeline.load_lora_weights`, and the
outputs compared are on target + control tokens, as the pipeline feeds them.
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


def cmd_check(d: Path, steps: int, pipeline: str = "flux") -> None:
    from diffusers import FluxKontextPipeline, FluxPipeline
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from fluxlora.training.flow import FlowConfig
    from fluxlora.lora.export import diffusers_state_dict, kohya_state_dict
    from fluxlora.lora.header import training_metadata
    from fluxlora.lora.inject import LoraSettings
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
    losses = []
    for _ in range(steps):
        loss = module.flow_loss(batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
    t.eval()
    want = out_of(t, x)
    meta = training_metadata(settings, {"name": "roundtrip"})
    save_file({k: v.cpu() for k, v in kohya_state_dict(t, torch.bfloat16).items()}, d / "kohya.safetensors", meta)
    save_file({k: v.cpu() for k, v in diffusers_state_dict(t, torch.bfloat16).items()}, d / "diffusers.safetensors", meta)
    del module, opt, params, t
    torch.cuda.empty_cache() if DEV == "cuda" else None
    parts = tiny.build()
    parts["transformer"] = load_transformer(src, torch.bfloat16, device=DEV)
    pipe = (FluxKontextPipeline if pipeline == "kontext" else FluxPipeline)(**parts)
    base = out_of(pipe.transformer, x)
    report = {"pipeline": type(pipe).__name__, "losses": [round(v, 4) for v in losses]}
    names = ["diffusers.safetensors"] if os.environ.get("RT_TINY") else ["kohya.safetensors", "diffusers.safetensors"]
    for name in names:
        pipe.load_lora_weights(str(d), weight_name=name, adapter_name=name.split(".")[0])
        got = out_of(pipe.transformer, x)
        report[name] = compare(name, got, want, base)
        pipe.unload_lora_weights()
    print(json.dumps(report), flush=True)
    if not all(report[n]["ok"] for n in names):
        sys.exit(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("cmd", choices=["write", "load", "check"])
    ap.add_argument("--dir", type=Path, default=Path("/tmp/flux"))
    ap.add_argument("--file", type=Path)
    ap.add_argument("--storage", default="none", choices=["none", "fp8"])
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--pipeline", default="flux", choices=["flux", "kontext"], help="check: the pipeline that reloads")
    a = ap.parse_args()
    torch.backends.cuda.enable_cudnn_sdp(False)
    if a.cmd == "write":
        cmd_write(a.dir)
    elif a.cmd == "load":
        cmd_load(a.file, a.storage)
    else:
        cmd_check(a.dir, a.steps, a.pipeline)


if __name__ == "__main__":
    main()
