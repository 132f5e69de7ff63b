"""Profile the reference step with and without gradient checkpointing: where does the time go?

    python bench/profile_step.py --res 512
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(__file__))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--res", type=int, default=512)
    ap.add_argument("--layers", type=int, default=0)
    ap.add_argument("--rows", type=int, default=18)
    args = ap.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cuda.enable_cudnn_sdp(False)
    import ref_diffusers_step as ref

    if args.layers:
        ref.CFG.update(num_layers=args.layers, num_single_layers=2 * args.layers)
    m = ref.build()
    h = w = args.res // 16
    img_ids, txt_ids = ref.ids(h, w, 512)
    x = torch.randn(1, h * w, 64, device="cuda", dtype=torch.bfloat16)
    enc = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
    pooled = torch.randn(1, 768, device="cuda", dtype=torch.bfloat16)
    opt = torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-4)

    def step():
        sig = torch.rand(1, device="cuda")
        noise = torch.randn_like(x)
        xt = ((1 - sig) * x + sig * noise).to(torch.bfloat16)
        out = m(hidden_states=xt, timestep=sig.to(torch.bfloat16), guidance=torch.full((1,), 1.0, device="cuda"),
                pooled_projections=pooled, encoder_hidden_states=enc, txt_ids=txt_ids, img_ids=img_ids,
                return_dict=False)[0]
        torch.nn.functional.mse_loss(out.float(), (noise - x).float()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    for gc in (False, True):
        m.enable_gradient_checkpointing() if gc else m.disable_gradient_checkpointing()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(3):
            step()
        torch.cuda.synchronize()
        wall = (time.perf_counter() - t) / 3
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(2):
                step()
            torch.cuda.synchronize()
        ka = prof.key_averages()
        gpu = sum(e.self_device_time_total for e in ka) / 2 / 1e6
        n_kernels = sum(e.count for e in ka if e.self_device_time_total > 0) / 2
        print(f"\n=== gc={gc} res={args.res}: wall {wall:.3f} s/step, GPU busy {gpu:.3f} s/step, "
              f"{n_kernels:.0f} device ops/step", flush=True)
        print(ka.table(sort_by="self_device_time_total", row_limit=args.rows, max_name_column_width=60), flush=True)
        print(ka.table(sort_by="self_cpu_time_total", row_limit=12, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
