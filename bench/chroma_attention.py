"""What Chroma's masked attention costs, and what cutting its padding would save: one attention call, forward and
backward, at Chroma's shapes (24 heads x 128, 512 T5 tokens of which a caption uses a few, image tokens after them).

Why: on the H200 (2026-12-02) Chroma at 20gb and 1024 px ran 0.90 s/step against FLUX.1's 0.63 s at the same tier,
though it has 8.9 B parameters against 12 B. Chroma's attention carries the T5 mask. diffusers' Chroma processor
builds it as the outer product of the token mask, a (B, 1, L, L) boolean, which rules out SDPA's flash kernel. The
keys beyond each caption (plus its first padding token) are masked in every layer, and only image tokens reach the
loss. So the padding can be cut instead of masked: to a length the whole run shares (static shapes, one compile),
with a key mask for the shorter captions, or per caption with no mask at all. This bench times those variants
against today's, each through the SDPA backends that accept it, and checks that every variant gives today's
outputs and gradients on the tokens that count (the caption's and the image's).

    python bench/chroma_attention.py --res 1024 512 --caption-tokens 64 200
    python bench/chroma_attention.py --tiny          # CPU, small shapes, the equivalence check only

Prints one JSON line per (resolution, caption length, variant, backend); exits 1 if a variant's outputs differ.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

HEADS, HEAD_DIM, TEXT = 24, 128, 512
ROUND = 64
"""The run-wide length is the longest caption + 1 rounded up to this: a few shapes at most across runs."""
BACKENDS = {"auto": None, "flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
            "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}


def inputs(image: int, caption: int, device, dtype, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """q, k, v of (1, heads, TEXT + image, dim) and the token mask (1, TEXT + image): the caption's tokens, its
    first padding token and every image token attended (fluxlora.models.chroma.attention_mask)."""
    g = torch.Generator().manual_seed(seed)
    qkv = [torch.randn(1, HEADS, TEXT + image, HEAD_DIM, generator=g).to(device, dtype) for _ in range(3)]
    mask = torch.ones(1, TEXT + image, dtype=torch.bool, device=device)
    mask[:, caption + 1:TEXT] = False
    return (*qkv, mask)


def variants(caption: int) -> dict[str, tuple[int, str]]:
    """name -> (text tokens kept, mask kind): `square` is diffusers' processor today; `flux-unmasked` is Flux's
    cost for scale (every token, no mask: not Chroma's outputs)."""
    run_len = min(TEXT, math.ceil((caption + 1) / ROUND) * ROUND)
    return {"square": (TEXT, "square"), "keys": (TEXT, "keys"), f"cut{run_len}+keys": (run_len, "keys"),
            "cut-exact": (caption + 1, "none"), "flux-unmasked": (TEXT, "none")}


def call(q, k, v, mask, keep: int, kind: str, backend) -> torch.Tensor:
    """Attention over the first `keep` text tokens and every image token, with `kind`'s mask."""
    if keep < TEXT:
        sel = torch.cat([torch.arange(keep), torch.arange(TEXT, q.shape[2])]).to(q.device)
        q, k, v, mask = q[:, :, sel], k[:, :, sel], v[:, :, sel], mask[:, sel]
    attn = {"square": mask[:, None, None, :] & mask[:, None, :, None], "keys": mask[:, None, None, :],
            "none": None}[kind]
    with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn)


def counted(out: torch.Tensor, keep: int, caption: int) -> torch.Tensor:
    """The rows that reach the loss: the caption's tokens and its first padding token, then the image's."""
    return torch.cat([out[:, :, :caption + 1], out[:, :, keep:]], dim=2)


def run(image: int, caption: int, device, dtype, steps: int, backends: list[str], tol: float) -> list[dict]:
    q0, k0, v0, mask = inputs(image, caption, device, dtype)
    w = torch.randn(1, HEADS, caption + 1 + image, HEAD_DIM, generator=torch.Generator().manual_seed(1)).to(device,
                                                                                                           dtype)
    rows, want = [], None
    for name, (keep, kind) in variants(caption).items():
        for bname in backends:
            q, k, v = (t.detach().clone().requires_grad_(True) for t in (q0, k0, v0))

            def step():
                out = call(q, k, v, mask, keep, kind, BACKENDS[bname])
                loss = (counted(out, keep, caption).float() * w.float()).sum()
                q.grad = k.grad = v.grad = None
                loss.backward()
                return out

            row = {"image_tokens": image, "caption_tokens": caption, "variant": name, "text_kept": keep,
                   "mask": kind, "backend": bname}
            try:
                out = step()
            except RuntimeError as e:  # the backend does not take this mask / shape / dtype
                rows.append({**row, "error": str(e).splitlines()[0][:160]})
                continue
            # gradients are of the whole inputs (cut tokens get none)
            got = [counted(out, keep, caption).float(), *(counted(t.grad, TEXT, caption).float() for t in (q, k, v))]
            if name == "square" and want is None:
                want = got
            elif name != "flux-unmasked":
                row["max_rel_diff"] = max(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
                                          for a, b in zip(got, want))
                row["same"] = row["max_rel_diff"] <= tol
            if device.type == "cuda":
                times = []
                for _ in range(steps):
                    torch.cuda.synchronize(device)
                    t0 = time.perf_counter()
                    step()
                    torch.cuda.synchronize(device)
                    times.append(time.perf_counter() - t0)
                row["ms_fwd_bwd"] = round(statistics.median(times) * 1e3, 3)
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--res", type=int, nargs="+", default=[1024, 512], help="square image side (16 px per token)")
    ap.add_argument("--caption-tokens", type=int, nargs="+", default=[64, 200])
    ap.add_argument("--backends", nargs="+", default=["auto", "efficient", "cudnn", "flash"], choices=list(BACKENDS))
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--tiny", action="store_true", help="CPU, 64-token images, float32 through the math kernel")
    args = ap.parse_args()
    if args.tiny:
        device, dtype, images, backends, tol = torch.device("cpu"), torch.float32, [64], ["math"], 1e-5
    else:
        device, dtype, backends, tol = torch.device("cuda"), torch.bfloat16, args.backends, 2e-2
        images = [(r // 16) ** 2 for r in args.res]
        print(json.dumps({"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                          "cudnn": torch.backends.cudnn.version()}), flush=True)
    rows = [r for image in images for c in args.caption_tokens
            for r in run(image, c, device, dtype, args.steps, backends, tol)]
    differ = [r for r in rows if r.get("same") is False]
    for r in differ:
        print(f"differs: {r['variant']} ({r['backend']}) at {r['image_tokens']} image tokens, caption "
              f"{r['caption_tokens']}: {r['max_rel_diff']:.2e}", file=sys.stderr)
    sys.exit(1 if differ else 0)


if __name__ == "__main__":
    main()
