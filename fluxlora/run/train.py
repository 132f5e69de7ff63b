"""One training run, from a composed config, in the order its data flows: settings (parsed once) → load and cache →
build → fit → report. The settings are checked here, before Lightning, peft or transformers are imported (a mistake
is one line within seconds of start-up); `fluxlora.run.job` does the rest."""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, open_dict

from fluxlora.distributed.settings import rank_info
from fluxlora.run.hydra_job import job_name
from fluxlora.run.settings import check_config, device_for, for_device


def run(cfg: DictConfig) -> float | None:
    """Train one LoRA; returns the mean loss of the last steps (Hydra sweepers can optimise it)."""
    name = job_name(cfg)
    with open_dict(cfg):
        cfg.name = name
    out = Path(str(cfg.output.dir))
    device = device_for(cfg)
    info = rank_info(cfg, device)
    if info.distributed:
        from fluxlora.run.ranks import tag_logs  # rank_info has imported Lightning for several processes already

        tag_logs(info)
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)  # before anything touches the GPU: each rank its own
            device = torch.device("cuda", info.local_rank)
    settings = for_device(check_config(cfg), cfg, device)
    from fluxlora.run.job import Job, run_job  # Lightning, peft, diffusers: only for settings that passed

    return run_job(Job(cfg, settings, name, out, device, info))
