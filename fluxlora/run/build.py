"""What a run is built from, once its settings are parsed: the device and precision, the callbacks (by their config
names), the run record both the LoRA file and the model card carry, the LoRA module with its memory and speed
setup, and Lightning's Trainer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig, OmegaConf

from fluxlora.distributed.health import heartbeat_path, peers_summary
from fluxlora.distributed.settings import DistributedSettings, RankInfo, requested_processes
from fluxlora.distributed.strategy import build_strategy
from fluxlora.errors import FluxLoraError
from fluxlora.models.components import resolve_dtype
from fluxlora.perf.memory import apply_memory_settings, enable_block_swap
from fluxlora.perf.speed import apply_speed_settings
from fluxlora.perf.state import PerfState
from fluxlora.perf.step_graph import StepGraphs
from fluxlora.run.loggers import run_loggers
from fluxlora.run.resume import CheckpointLayout, base_model
from fluxlora.run.settings import RunSettings, check_config, for_device
from fluxlora.training.module import FluxLoRAModule


def precision_for(cfg: DictConfig, device: torch.device) -> tuple[str, torch.dtype]:
    """Lightning precision and the transformer's compute dtype: bf16-mixed on CUDA, fp32 on the CPU unless set."""
    precision = cfg.trainer.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    compute_dtype = torch.bfloat16 if "bf16" in str(precision) else resolve_dtype(cfg.model.get("dtype"))
    return str(precision), compute_dtype


def total_optimizer_steps(cfg: DictConfig, batches_per_epoch: int) -> int:
    if int(cfg.trainer.max_steps) > 0:
        return int(cfg.trainer.max_steps)
    per_epoch = math.ceil(batches_per_epoch / int(cfg.trainer.accumulate_grad_batches))
    return per_epoch * int(cfg.trainer.max_epochs)


# ---------------------------------------------------------------------------------------------------- callbacks


def build_callbacks(cfg: DictConfig, prebuilt: Optional[dict] = None) -> dict[str, L.Callback]:
    """`cfg.callbacks`, built, by config name in config order (the hook order); `prebuilt` ones are used as given."""
    callbacks = {}
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        built = (prebuilt or {}).get(key)
        callbacks[key] = built if built is not None else instantiate_callback(key, node)
    return callbacks


def instantiate_callback(key: str, node: Any, **extra: Any) -> Any:
    """`callbacks.<key>` built; its constructor's own error (which names the file or flag) as one line."""
    try:
        return instantiate(node, **extra)
    except Exception as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
        if isinstance(cause, FluxLoraError):
            raise cause from None
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise FluxLoraError(f"callbacks.{key} could not be built: {first}") from e


def start_watchdog(cfg: DictConfig, info: RankInfo | None = None) -> Any:
    """Build `callbacks.watchdog` and start it now, so model loading and caching are watched too. Each rank of a
    multi-process run keeps its own heartbeat file and monitor log (rank R: `heartbeat.rankR.json`)."""
    node = (cfg.get("callbacks") or {}).get("watchdog")
    if node is None:
        return None
    extra = {}
    if info is not None and info.distributed:
        extra = {"rank": info.rank, **{k: str(heartbeat_path(node[k], info.rank)) for k in ("heartbeat_file",
                                                                                          "monitor_log") if node.get(k)}}
    watchdog = instantiate_callback("watchdog", node, **extra)
    if info is not None and info.distributed and node.get("heartbeat_file"):
        base = Path(str(node.heartbeat_file))
        watchdog.peer_report = lambda: peers_summary(base, info.rank, info.world_size)
    watchdog.start("setup")
    return watchdog


def checkpoint_layout(cfg: DictConfig, out: Path) -> tuple[Path, Optional[CheckpointLayout]]:
    """The checkpoint folder and the checkpoint callback's class (it owns the folder's file names), from
    `callbacks.checkpoint` alone: the run reads them before any callback is built. (out/checkpoints, None) when
    checkpointing is off."""
    node = (cfg.get("callbacks") or {}).get("checkpoint")
    if node is None:
        return out / "checkpoints", None
    folder = Path(str(node.dirpath)) if node.get("dirpath") else out / "checkpoints"
    return folder, get_class(str(node._target_))


def run_record(cfg: DictConfig, run: RunSettings, name: str, resolution: Any, images: int, steps: int,
               precision: str) -> dict:
    """What this run was, built once: the LoRA file's `ss_*` header and the model card's settings table both show
    it. Names are sd-scripts' where it has the setting (`fluxlora.lora.header` maps the rest), so the header never
    carries sd-scripts' default for something fluxlora did differently."""
    flow, memory, optim = run.flow, run.memory, run.optim
    clip = cfg.trainer.get("gradient_clip_val")
    return {"rank": run.lora.rank, "alpha": run.lora.alpha, "train_blocks": run.lora.train_blocks,
            "init_from": run.lora.init_from, "optimizer": optim.name, "learning_rate": optim.lr,
            "lr_scheduler": optim.scheduler, "lr_warmup_steps": optim.warmup_steps, "resolution": resolution,
            "batch_size": int(cfg.data.batch_size),
            "gradient_accumulation_steps": int(cfg.trainer.accumulate_grad_batches),
            "max_grad_norm": float(clip) if clip else 0.0, "mixed_precision": _SS_PRECISION.get(precision, "no"),
            "timestep_sampling": flow.timestep_sampling, "discrete_flow_shift": flow.discrete_flow_shift,
            "sigmoid_scale": flow.sigmoid_scale, "logit_mean": flow.logit_mean, "logit_std": flow.logit_std,
            "guidance_scale": flow.guidance_scale, "loss_type": flow.loss, "huber_c": flow.huber_c,
            "model_prediction_type": "raw",  # the transformer's output is the velocity as is (flow.py)
            "cache_latents": True, "base_storage": memory.base_storage, "fp8_base": memory.base_storage == "fp8",
            "gradient_checkpointing": memory.gradient_checkpointing, "seed": int(cfg.seed),
            "max_train_steps": steps, "num_train_images": images, "output_name": name}


_SS_PRECISION = {"bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16", "16-mixed": "fp16", "16-true": "fp16",
                 "16": "fp16"}
"""Lightning precision -> sd-scripts' --mixed_precision value ("no" for fp32)."""


def connect_callbacks(callbacks: dict) -> None:
    """Hand callbacks what they use of each other (by config name): the validation curve to the loss summary, which
    draws it beside the training loss, and the LoRA saver to the validation, which writes the best LoRA with it."""
    validation = callbacks.get("validation")
    if validation is None:
        return
    if callbacks.get("loss_summary") is not None:
        callbacks["loss_summary"].add_curve("validation", validation.points)
    if callbacks.get("lora_saver") is not None:
        validation.use_saver(callbacks["lora_saver"])


def record_run(callbacks: dict, record: dict) -> None:
    """Hand the run record to the callbacks that write it (by config name): the LoRA saver's header, the card."""
    if callbacks.get("lora_saver") is not None:
        callbacks["lora_saver"].add_metadata(**record)
    if callbacks.get("model_card") is not None:
        callbacks["model_card"].add_settings(**record)


# ---------------------------------------------------------------------------------------------------- module, trainer


def build_module(cfg: DictConfig, transformer: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype,
                 steps: int, heartbeat=None, run: RunSettings | None = None, step_shapes: int = 1):
    """Memory settings, LoRA layers, block swapping and speed settings on a loaded transformer, in the order a run
    applies them (bench/memory_tiers.py calls this too). Read the transformer to `MemorySettings.load_device(device)`
    first; `run` is the run's parsed settings (parsed from `cfg` when not given); `step_shapes`: how many batch
    shapes the training data comes in (`FluxDataModule.step_shapes`; `speed.dynamic_shapes: auto` reads it).

    Returns:
        (FluxLoRAModule, BlockSwapper or None); the module's `perf` holds what each step decided.
    """
    run = run if run is not None else for_device(check_config(cfg), cfg, device)
    memory = run.memory
    perf = PerfState(checkpoint_every=apply_memory_settings(transformer, memory, compute_dtype, device))
    module = FluxLoRAModule(transformer, run.lora, run.flow, run.optim, total_steps=steps, compute_dtype=compute_dtype,
                            nonfinite=run.train.nonfinite, max_nonfinite_skips=run.train.max_nonfinite_skips,
                            perf=perf, base_model=base_model(cfg))
    # installed before Lightning moves the module: the swapped weights stay on the host
    perf.swapper = enable_block_swap(transformer, memory, device, heartbeat=heartbeat)
    try:
        devices, nodes = requested_processes(cfg, device)
        decided = apply_speed_settings(
            transformer, run.speed, perf.checkpoint_every, swapping=perf.swapping, device=device,
            base_storage=memory.base_storage, processes=devices * nodes, budgeted=memory.budget_gb is not None,
            step_shapes=step_shapes)
    except ValueError as e:
        raise FluxLoraError(str(e)) from e
    perf.cuda_graphs = decided.cuda_graphs
    perf.step_graphs = StepGraphs() if decided.step_graphs else None
    return module, perf.swapper


def make_trainer(cfg: DictConfig, out: Path, callbacks: list, precision: str, info: RankInfo,
                 dist: DistributedSettings, resume_step: int | None = None,
                 device: torch.device | None = None) -> L.Trainer:
    """Lightning's Trainer from `cfg.trainer`, with the run's callbacks, loggers, checkpoint IO and strategy;
    `resume_step`: the global step of the checkpoint the run continues from (the CSV log continues too); `device`:
    the run's (`build_strategy`)."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = precision
    if not trainer_cfg.get("gradient_clip_val"):
        trainer_cfg["gradient_clip_val"] = None
    trainer_cfg.pop("strategy", None)
    plugins = [instantiate(cfg.checkpoint_io)] if cfg.get("checkpoint_io") else []
    return instantiate(trainer_cfg, callbacks=callbacks, logger=run_loggers(out / "logs", resume_step),
                       default_root_dir=str(out),
                       plugins=plugins, strategy=build_strategy(cfg, info, dist, device))
