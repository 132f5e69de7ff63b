"""One training run, from a composed config: model → cache → LoRA module → Lightning fit → LoRA file."""

from __future__ import annotations

import gc
import logging
import math
import os
import re
import signal
import sys
from pathlib import Path
from typing import Any

import lightning as L
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf, open_dict

from fluxlora.atomic import atomic_write_text
from fluxlora.callbacks import StepHeartbeatWatchdog, TimedSampler, heartbeat
from fluxlora.run.settings import check_config, settings
from fluxlora.perf.cuda_setup import memory_limit, prepare_cuda
from fluxlora.data import FluxDataModule
from fluxlora.data.datamodule import cache_batch_size
from fluxlora.distributed.strategy import (DistributedSettings, RankInfo, build_strategy, is_collective_failure,
                                  rank_info, requested_processes)
from fluxlora.models.encode import StagedEncoders
from fluxlora.errors import FluxLoraError, RankFailedError, RunInterrupted, stage_error
from fluxlora.training.flow import FlowConfig
from fluxlora.heartbeat import last_stage
from fluxlora.lora.inject import LoraSettings
from fluxlora.run.loggers import run_loggers
from fluxlora.perf.memory import MemorySettings, apply_memory_settings, enable_block_swap
from fluxlora.models import load_components
from fluxlora.models.components import resolve_dtype
from fluxlora.training.module import FluxLoRAModule
from fluxlora.distributed.health import diagnose, heartbeat_path, peers_summary
from fluxlora.distributed.launch import RankLauncher
from fluxlora.run.resume import finished_run, report_complete, resume_plan
from fluxlora.perf.speed import SpeedSettings, apply_speed_settings
from fluxlora.run.stage_clock import StageClock

log = logging.getLogger("fluxlora")


def job_name(cfg: DictConfig) -> str:
    """The run name; a sweep job gets its job number appended so jobs never share a folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    name = str(cfg.name)
    if not re.fullmatch(r"[\w.\-]+", name):
        raise FluxLoraError(f"name={name!r} may hold only letters, digits, '.', '_' and '-'")
    if HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN:
        name = f"{name}_{HydraConfig.get().job.num}"
    return name


def device_for(cfg: DictConfig) -> torch.device:
    acc = str(cfg.trainer.accelerator)
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if acc in ("gpu", "cuda"):
        raise FluxLoraError(f"trainer.accelerator={acc} but no CUDA device is visible")
    return torch.device("cpu")


def build_callbacks(cfg: DictConfig, metadata: dict, prebuilt: dict | None = None) -> list[L.Callback]:
    callbacks = []
    for key, node in (cfg.get("callbacks") or {}).items():
        if node is None:
            continue
        if prebuilt and prebuilt.get(key) is not None:
            callbacks.append(prebuilt[key])
            continue
        extra = {"metadata": metadata} if key == "lora_saver" else {}
        callbacks.append(_instantiate_callback(key, node, **extra))
    return callbacks


def _instantiate_callback(key: str, node: Any, **extra: Any) -> Any:
    """`callbacks.<key>` built; its constructor's own error (which names the file or flag) as one line."""
    try:
        return instantiate(node, **extra)
    except Exception as e:
        cause = e.__cause__ if isinstance(e, InstantiationException) and e.__cause__ is not None else e
        if isinstance(cause, FluxLoraError):
            raise cause from None
        first = (str(cause).strip().splitlines() or [type(cause).__name__])[0]
        raise FluxLoraError(f"callbacks.{key} could not be built: {first}") from e


def start_watchdog(cfg: DictConfig, info: RankInfo | None = None) -> StepHeartbeatWatchdog | None:
    """Build `callbacks.watchdog` and start it now, so model loading and caching are watched too. Each rank of a
    multi-process run keeps its own heartbeat file and monitor log (rank R: `heartbeat.rankR.json`)."""
    node = (cfg.get("callbacks") or {}).get("watchdog")
    if node is None:
        return None
    extra = {}
    if info is not None and info.distributed:
        extra = {"rank": info.rank, **{k: str(heartbeat_path(node[k], info.rank)) for k in ("heartbeat_file",
                                                                                          "monitor_log") if node.get(k)}}
    watchdog = _instantiate_callback("watchdog", node, **extra)
    if isinstance(watchdog, StepHeartbeatWatchdog):
        if info is not None and info.distributed and node.get("heartbeat_file"):
            base = Path(str(node.heartbeat_file))
            watchdog.peer_report = lambda: peers_summary(base, info.rank, info.world_size)
        watchdog.start("setup")
    return watchdog


def total_optimizer_steps(cfg: DictConfig, batches_per_epoch: int) -> int:
    if int(cfg.trainer.max_steps) > 0:
        return int(cfg.trainer.max_steps)
    per_epoch = math.ceil(batches_per_epoch / int(cfg.trainer.accumulate_grad_batches))
    return per_epoch * int(cfg.trainer.max_epochs)


def precision_for(cfg: DictConfig, device: torch.device) -> tuple[str, torch.dtype]:
    """Lightning precision and the transformer's compute dtype: bf16-mixed on CUDA, fp32 on the CPU unless set."""
    precision = cfg.trainer.precision or ("bf16-mixed" if device.type == "cuda" else "32-true")
    compute_dtype = torch.bfloat16 if "bf16" in str(precision) else resolve_dtype(cfg.model.get("dtype"))
    return str(precision), compute_dtype


def build_module(cfg: DictConfig, transformer: torch.nn.Module, device: torch.device, compute_dtype: torch.dtype,
                 steps: int, heartbeat=None):
    """Memory settings, LoRA layers and block swapping on a loaded transformer, in the order a run applies them
    (bench/memory_tiers.py calls this too). Read the transformer to `MemorySettings.load_device(device)` first.

    Returns:
        (FluxLoRAModule, BlockSwapper or None); the module's `perf` holds what each step decided.
    """
    from fluxlora.perf.state import PerfState

    memory = settings(MemorySettings, cfg.memory)
    prepare_cuda(device, memory.budget_gb)
    perf = PerfState(checkpoint_every=apply_memory_settings(transformer, memory, compute_dtype, device))
    module = FluxLoRAModule(transformer, settings(LoraSettings, cfg.lora), settings(FlowConfig, cfg.flow), cfg.optim,
                            total_steps=steps, compute_dtype=compute_dtype, nonfinite=str(cfg.train.nonfinite),
                            max_nonfinite_skips=int(cfg.train.max_nonfinite_skips), perf=perf)
    # installed before Lightning moves the module: the swapped weights stay on the host
    perf.swapper = enable_block_swap(transformer, memory, device, heartbeat=heartbeat)
    speed = settings(SpeedSettings, cfg.speed) if cfg.get("speed") is not None else SpeedSettings()
    try:
        devices, nodes = requested_processes(cfg, device)
        perf.cuda_graphs = apply_speed_settings(
            transformer, speed, perf.checkpoint_every, swapping=perf.swapping, device=device,
            base_storage=memory.base_storage, processes=devices * nodes,
            budgeted=memory.budget_gb is not None).cuda_graphs
    except ValueError as e:
        raise FluxLoraError(str(e)) from e
    return module, perf.swapper


def _route_lightning_logs() -> None:
    """Lightning installs its own console handler; send its records through the root (Hydra's) handlers once."""
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("lightning")]:
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True


class _RankPrefix(logging.Filter):
    """`[rank R] ` before every log line of a multi-process run (the ranks share one terminal)."""

    def __init__(self, rank: int) -> None:
        super().__init__()
        self.prefix = f"[rank {rank}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            record.msg = self.prefix + str(record.msg)
        return True


def _tag_logs(info: RankInfo) -> None:
    for handler in logging.root.handlers:
        if not any(isinstance(f, _RankPrefix) for f in handler.filters):
            handler.addFilter(_RankPrefix(info.rank))


def run(cfg: DictConfig) -> float | None:
    """Train one LoRA; returns the mean loss of the last steps (Hydra sweepers can optimise it)."""
    _route_lightning_logs()
    name = job_name(cfg)
    with open_dict(cfg):
        cfg.name = name
    out = Path(str(cfg.output.dir))
    device = device_for(cfg)
    info = rank_info(cfg, device)
    if info.distributed:
        _tag_logs(info)
        if device.type == "cuda":
            torch.cuda.set_device(info.local_rank)  # before anything touches the GPU: each rank its own
    check_config(cfg)
    done = finished_run(cfg, out)
    if done is not None:  # nothing to do: no config, heartbeat or cache file of the finished run is rewritten
        return report_complete(name, out, done) if info.rank == 0 else None
    dist = settings(DistributedSettings, cfg.distributed) if cfg.get("distributed") is not None \
        else DistributedSettings()
    heartbeat("setup")  # a sweep's next job starts from its own first stage
    watchdog: StepHeartbeatWatchdog | None = None
    group: RankLauncher | None = None
    ctx: dict = {}
    failed = True
    try:
        out.mkdir(parents=True, exist_ok=True)
        watchdog = start_watchdog(cfg, info)  # covers model loading and caching too
        group = _start_ranks(cfg, info, dist, name, watchdog) if info.distributed and info.launches else None
        result = _train(cfg, out, name, watchdog, info, dist, ctx)
        failed = False
        return result
    except BaseException as e:
        named = stage_error(e, watchdog.stage if watchdog is not None else last_stage())
        if watchdog is not None:  # first: the other ranks read it to tell who failed first
            watchdog.stop("exception", error=str(named) if named else f"{type(e).__name__}: {e}")
        if info.distributed and is_collective_failure(e):
            err = _rank_failure(e, cfg, info, ctx.get("strategy"))
            if watchdog is not None:  # the supervisor reads it
                watchdog.stop("exception", error=str(err))
            raise err from e
        if named is not None:  # out of GPU memory, a full or read-only disk: one line naming the stage
            raise named from e
        raise
    finally:
        if group is not None:
            for line in group.finish(failed, dist.join_timeout_s):
                log.warning("%s", line)
        if info.distributed:
            _end_process_group()
        if watchdog is not None:
            watchdog.stop()


def _start_ranks(cfg: DictConfig, info: RankInfo, dist: DistributedSettings, name: str,
                 watchdog: StepHeartbeatWatchdog | None) -> RankLauncher:
    """Rank 0 of `python -m fluxlora trainer.devices=N` starts the other local ranks now, before the model loads."""
    from fluxlora.__main__ import _is_multirun

    node = (cfg.get("callbacks") or {}).get("watchdog")
    group: RankLauncher | None = None

    def end_group(message: str) -> None:  # the observer thread: a rank died and this one did not fail by itself
        text = (f"stage 'distributed' failed: {message}; ending the other ranks. The last checkpoint is intact: run "
                "again with resume=auto (python -m fluxlora.supervise does it)")
        log.error("%s", text)
        print(f"fluxlora: error: {text}", file=sys.stderr, flush=True)
        if watchdog is not None:
            watchdog.stop("failed", error=text)
        group.kill_all()
        os._exit(RankFailedError.exit_code)

    # in a sweep the job must fail as an exception Hydra records: the training thread gets until its own
    # collectives time out; a single run ends at once
    grace = dist.setup_timeout_s + 60 if _is_multirun() else 5.0
    group = RankLauncher(info.devices, info.num_nodes, name, node.get("heartbeat_file") if node else None,
                         end_group, grace_s=grace)
    group.start()
    if watchdog is not None:
        watchdog.before_exit.append(group.kill_all)
    return group


def _rank_failure(e: BaseException, cfg: DictConfig, info: RankInfo, strategy) -> FluxLoraError:
    """A failed collective as a message that names the rank(s) it waited for."""
    node = (cfg.get("callbacks") or {}).get("watchdog")
    seen = (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
    if node is None or not node.get("heartbeat_file"):
        ranks, who, verdict = (), "another rank did not arrive (callbacks.watchdog is off: no heartbeat files to " \
                                    "tell which)", "running"
    else:
        ranks, who, verdict = diagnose(Path(str(node.heartbeat_file)), info.rank, info.world_size)
    detail = (f"{who}; this rank ({info.rank} of {info.world_size}) saw: {seen}. The last checkpoint is intact: "
              "run again with resume=auto (python -m fluxlora.supervise does it)")
    if verdict == "failed":  # the other rank's own error (bad input, a data stall): its exit status, no restart
        return FluxLoraError(f"stage 'distributed' failed: {detail}")
    timed_out = "timed out" in str(e).lower() or "timeout" in str(e).lower()
    seconds = getattr(strategy, "current_timeout_s", 0.0) if timed_out else 0.0
    return RankFailedError("distributed", seconds, detail, ranks)


def _end_process_group() -> None:
    """Destroy the process group (bounded), so that the next job of a sweep can start its own."""
    import threading

    import torch.distributed as tdist

    if not (tdist.is_available() and tdist.is_initialized()):
        return
    t = threading.Thread(target=tdist.destroy_process_group, name="fluxlora-pg-destroy", daemon=True)
    t.start()
    t.join(30)
    if t.is_alive():
        log.error("the process group could not be destroyed within 30s")


def _load_and_cache(cfg: DictConfig, dm: FluxDataModule, callbacks: list, device: torch.device,
                    memory: MemorySettings, info: RankInfo, watchdog: StepHeartbeatWatchdog | None,
                    clock: StageClock):
    """Load the model, cache latents and text outputs (one encoder on the device at a time), encode the sample
    prompts, free the text encoders, then read the transformer. Returns the components."""
    log.info("loading model (%s)", cfg.model.source)
    heartbeat("load_model")
    clock.begin("load")
    comps = load_components(cfg.model, storage=memory.base_storage, defer_transformer=True,
                            t5_storage=memory.t5_storage, device_limit=memory_limit(device), defer_encoders=True)

    sampler = next((cb for cb in callbacks if isinstance(cb, TimedSampler)), None) if info.rank == 0 else None
    encoders = StagedEncoders(comps, device, int(cfg.model.t5_max_length), cache_batch_size(cfg.data.cache_batch_size),
                              keep=sampler.prompt_texts if sampler is not None else ())  # only rank 0 samples
    heartbeat("caching")
    clock.begin("cache")
    dm.build_cache(encoders, comps.encoder_identity(int(cfg.model.t5_max_length)),
                   progress=watchdog.progress if watchdog is not None else None)
    clock.begin("build")
    if sampler is not None:
        heartbeat("caching", "sample prompts")
        sampler.prepare(comps, encoders)  # encoded with the captions above (a stage only where there were none)
    comps.release_encoders()  # the step sees only cached tensors; the VAE waits on the host for sampling
    gc.collect()

    heartbeat("load_model", "transformer")
    # read only now the text encoders are gone: host RAM peaks near the largest file
    comps.load_transformer(memory.load_device(device))
    heartbeat("build")
    return comps


def _make_trainer(cfg: DictConfig, out: Path, callbacks: list, precision: str, info: RankInfo,
                  dist: DistributedSettings) -> L.Trainer:
    """Lightning's Trainer from `cfg.trainer`, with the run's callbacks, loggers, checkpoint IO and strategy."""
    trainer_cfg = OmegaConf.to_container(cfg.trainer, resolve=True)
    trainer_cfg["precision"] = precision
    if not trainer_cfg.get("gradient_clip_val"):
        trainer_cfg["gradient_clip_val"] = None
    trainer_cfg.pop("strategy", None)
    plugins = [instantiate(cfg.checkpoint_io)] if cfg.get("checkpoint_io") else []
    return instantiate(trainer_cfg, callbacks=callbacks, logger=run_loggers(out / "logs"), default_root_dir=str(out),
                       plugins=plugins, strategy=build_strategy(cfg, info, dist))


def _train(cfg: DictConfig, out: Path, name: str, watchdog: StepHeartbeatWatchdog | None,
           info: RankInfo | None = None, dist: DistributedSettings | None = None,
           ctx: dict | None = None) -> float | None:
    info = info or RankInfo(0, 0, 1, 1, 1, "single", False)
    dist = dist or DistributedSettings()
    ctx = {} if ctx is None else ctx
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    flow = settings(FlowConfig, cfg.flow)
    memory = settings(MemorySettings, cfg.memory)
    device = device_for(cfg)
    prepare_cuda(device, memory.budget_gb)  # before the first allocation
    precision, compute_dtype = precision_for(cfg, device)
    clock = StageClock(device, out / "stages.json" if info.rank == 0 else None)

    # the dataset and the callbacks' files (sample prompts) are checked before any model file is opened
    heartbeat("scan_dataset")
    dm = FluxDataModule(cfg.data, cache_dir=str(cfg.data.cache_dir), synthetic_dir=out / "synthetic", seed=int(cfg.seed),
                        rank=info.rank, world_size=info.world_size)  # each rank caches and trains its share
    records = dm.scan()
    log.info("dataset: %d images", len(records))
    steps = total_optimizer_steps(cfg, dm.batches_per_epoch())  # buckets and num_repeats decide the epoch length
    metadata = {"learning_rate": float(cfg.optim.lr), "optimizer": str(cfg.optim.name),
                "lr_scheduler": str(cfg.optim.scheduler), "seed": int(cfg.seed), "max_train_steps": steps,
                "resolution": dm.resolution, "num_train_images": len(records), "output_name": name,
                "timestep_sampling": flow.timestep_sampling, "guidance_scale": flow.guidance_scale}
    callbacks = [clock, *build_callbacks(cfg, metadata, prebuilt={"watchdog": watchdog})]  # the clock's hooks first

    comps = _load_and_cache(cfg, dm, callbacks, device, memory, info, watchdog, clock)
    for cb in callbacks:
        if callable(getattr(cb, "add_metadata", None)):
            cb.add_metadata(sd_model_name=comps.name)
    beat = next((cb.beat for cb in callbacks if callable(getattr(cb, "beat", None))), None)
    module, swapper = build_module(cfg, comps.transformer, device, compute_dtype, steps, heartbeat=beat)
    plan = resume_plan(cfg, out, module, callbacks, owner=info.rank == 0)
    if plan.path is not None and plan.finished(int(cfg.trainer.max_steps), cfg.trainer.get("max_epochs")):
        return report_complete(name, out, plan) if info.rank == 0 else None
    trainer = _make_trainer(cfg, out, callbacks, precision, info, dist)
    ctx["strategy"] = trainer.strategy
    if info.rank == 0:  # the record of the run that trains: a failed check or an attempt with nothing to do keeps it
        atomic_write_text(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(plan.path) if plan.path else None)
    except SIGTERMException as e:  # Lightning's own SIGTERM path (our checkpoint callback was left out)
        raise RunInterrupted("stopped by SIGTERM", signal.SIGTERM) from e
    if swapper is not None:
        log.info("block swap: %d block copies, %.1f GB host->GPU, %.2f s waited on copies", swapper.stats["loads"],
                 swapper.stats["bytes"] / 1e9, swapper.stats["wait_s"])
    if trainer.interrupted:
        raise FluxLoraError("training was interrupted")
    sampler = next((cb for cb in callbacks if isinstance(cb, TimedSampler)), None)
    clock.finish(sampled=sampler.round_seconds if sampler is not None else None)

    summary = next((cb for cb in callbacks if hasattr(cb, "last_mean")), None)
    saver = next((cb for cb in callbacks if hasattr(cb, "saved")), None)
    if saver is not None and saver.saved:
        print(f"LoRA saved to {saver.saved[-1]}", flush=True)
    return summary.last_mean if summary is not None else None
