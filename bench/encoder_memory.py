"""Device memory and speed of the frozen encoders at full size: the numbers behind `fluxlora.models.encode`'s batch sizing
(VAE encode/decode bytes per pixel, T5 bytes per token) and `memory.t5_storage` (T5-XXL in bf16 against fp8).

Random weights with the shipped Flux configs (VAE, CLIP-L, T5-XXL), built straight on the GPU in bf16. Each
measurement is the peak allocated memory above what was allocated before it (`torch.cuda.max_memory_allocated`).
Prints one JSON object; `--out` writes it to a file too.

    python bench/encoder_memory.py --out /tmp/encoders.json
"""

from __future__ import annotations

import argparse
import json
import time

import torch

GiB = 1 << 30


def peak(fn, device, repeat: int = 1) -> tuple[int, float, object]:
    """(peak bytes above the allocation before, seconds per call, result) of `fn()`."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()  # warm-up (cuBLAS handles, kernel selection) counts in the peak: a run pays it once too
    torch.cuda.synchronize(device)
    t0 = time.perf_counter()
    for _ in range(repeat):
        out = fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base, (time.perf_counter() - t0) / repeat, out


def build(cls, config, device, dtype=torch.bfloat16):
    with torch.device(device):
        model = cls(config).to(dtype)
    return model.eval().requires_grad_(False)


@torch.no_grad()
def vae_rows(device) -> list[dict]:
    from diffusers import AutoencoderKL

    from fluxlora.models.bfl import shipped_config

    with torch.device(device):
        vae = AutoencoderKL(**shipped_config("vae")).to(torch.bfloat16).eval().requires_grad_(False)
    rows = []
    for w, h, b in ((512, 512, 1), (512, 512, 4), (1024, 1024, 1), (1024, 1024, 2), (832, 1216, 1)):
        x = torch.randn(b, 3, h, w, device=device, dtype=torch.bfloat16)
        used, s, lat = peak(lambda: vae.encode(x).latent_dist.mean, device)
        rows.append({"what": "vae_encode", "w": w, "h": h, "batch": b, "peak_gib": used / GiB,
                     "bytes_per_pixel": used / (w * h * b), "s": s})
        used, s, _ = peak(lambda: vae.decode(lat).sample, device)
        rows.append({"what": "vae_decode", "w": w, "h": h, "batch": b, "peak_gib": used / GiB,
                     "bytes_per_pixel": used / (w * h * b), "s": s})
        if b == 1 and w * h >= 1024 * 1024:
            vae.enable_tiling()
            vae.tile_sample_min_size, vae.tile_latent_min_size = 512, 64
            used, s, _ = peak(lambda: vae.decode(lat).sample, device)
            rows.append({"what": "vae_decode_tiled512", "w": w, "h": h, "batch": b, "peak_gib": used / GiB,
                         "bytes_per_pixel": used / (w * h * b), "s": s})
            vae.disable_tiling()
    return rows


@torch.no_grad()
def text_rows(device, length: int) -> list[dict]:
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from fluxlora.models.bfl import shipped_config
    from fluxlora.models.text_encoders import fp8_stored_bytes, store_t5_fp8

    rows = []
    clip = build(CLIPTextModel, CLIPTextConfig(**shipped_config("clip-l")), device)
    for b in (1, 16, 64):
        ids = torch.randint(0, 49407, (b, 77), device=device)
        used, s, _ = peak(lambda: clip(ids).pooler_output, device)
        rows.append({"what": "clip", "batch": b, "peak_gib": used / GiB, "bytes_per_caption": used / b, "s": s})
    del clip
    torch.cuda.empty_cache()
    t5 = build(T5EncoderModel, T5Config(**shipped_config("t5-xxl")), device)
    for p in t5.parameters():  # T5's init is fine for its own use; keep the activations in a sane range
        p.normal_(0, 0.02) if p.ndim == 2 else p.fill_(1.0)
    ref = {}
    for storage in ("bf16", "fp8"):
        if storage == "fp8":
            store_t5_fp8(t5, torch.bfloat16)
            torch.cuda.empty_cache()
        rows.append({"what": f"t5_{storage}_weights", "gib": fp8_stored_bytes(t5) / GiB})
        for b in (1, 4, 8, 16):
            ids = torch.randint(0, 32127, (b, length), device=device)
            g = torch.Generator(device).manual_seed(b)
            ids = torch.randint(0, 32127, (b, length), device=device, generator=g)
            used, s, out = peak(lambda: t5(ids)[0], device, repeat=3)
            row = {"what": f"t5_{storage}", "batch": b, "tokens": length, "peak_gib": used / GiB,
                   "bytes_per_token": used / (b * length), "s_per_caption": s / b}
            if storage == "bf16":
                ref[b] = out.float()
            else:
                row["rel_err_vs_bf16"] = float((out.float() - ref[b]).norm() / ref[b].norm())
            rows.append(row)
    return rows


def budget_check(device) -> dict:
    """The budget switch caps the allocator (and mem_get_info does not see it)."""
    from fluxlora.perf.cuda_setup import available_memory, cap_memory, memory_limit

    cap = cap_memory(device, 8.0)
    free_seen = torch.cuda.mem_get_info(device)[0]
    try:
        x = torch.empty(int(7.5 * GiB), dtype=torch.uint8, device=device)
        refused = False
        del x
    except torch.OutOfMemoryError:
        refused = True
    return {"what": "budget_8gb", "cap_gib": cap / GiB, "limit_gib": memory_limit(device) / GiB,
            "available_gib": available_memory(device) / GiB, "mem_get_info_free_gib": free_seen / GiB,
            "7.5_gib_refused": refused}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=512, help="T5 tokens (Flux-dev: 512)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    device = torch.device("cuda", 0)
    rows = [{"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
             "date": time.strftime("%Y-%m-%d")}]
    for part in (vae_rows, lambda d: text_rows(d, args.length), lambda d: [budget_check(d)]):
        try:
            rows += part(device)
        except Exception as e:  # one failed part must not lose the others' numbers
            rows.append({"error": f"{type(e).__name__}: {e}"})
        torch.cuda.empty_cache()
        for row in rows[-3:]:
            print(json.dumps(row), flush=True)
    text = json.dumps(rows, indent=1)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
