"""A run whose settings have passed `fluxlora.run.settings`, as one `Job`, in the order its data flows: load and
cache → build → fit → report. Imported by `fluxlora.run.train.run` only after that check: this is where Lightning,
peft and diffusers load."""

from __future__ import annotations

import gc
import logging
import signal
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from fluxlora.atomic import atomic_write_text
from fluxlora.data import FluxDataModule
from fluxlora.data.cache import CachedTexts
from fluxlora.data.datamodule import cache_batch_size
from fluxlora.distributed.settings import RankInfo
from fluxlora.distributed.strategy import is_collective_failure
from fluxlora.errors import FluxLoraError, RunInterrupted, stage_error
from fluxlora.heartbeat import heartbeat, last_stage
from fluxlora.models import load_components
from fluxlora.models.encode import StagedEncoders
from fluxlora.perf.cuda_setup import memory_limit, memory_use, prepare_cuda
from fluxlora.run.build import (build_callbacks, build_module, checkpoint_layout, connect_callbacks, make_trainer,
                                precision_for, record_run, run_record, start_watchdog, total_optimizer_steps)
from fluxlora.run.ranks import end_process_group, rank_failure, start_ranks
from fluxlora.run.resume import ResumePlan, finished_run, report_complete, resume_plan
from fluxlora.run.settings import RunSettings
from fluxlora.run.stage_clock import StageClock

log = logging.getLogger("fluxlora")


@dataclass
class Job:
    """One attempt at a run, as every stage sees it: passed down explicitly, never read back from globals."""

    cfg: DictConfig
    settings: RunSettings
    name: str
    out: Path
    device: torch.device
    info: RankInfo
    watchdog: Any = None
    """`callbacks.watchdog`, started before loading (None when off)."""
    strategy: Any = None
    """The Trainer's strategy once built: a failed collective is named with its timeout."""

    @property
    def owner(self) -> bool:
        """Rank 0: writes the run's files, samples, moves old checkpoints."""
        return self.info.rank == 0


def run_job(job: Job) -> float | None:
    """Train the job's LoRA; returns the mean loss of the last steps. Nothing is done when its checkpoint shows the
    run complete."""
    _route_lightning_logs()
    cfg, info, settings = job.cfg, job.info, job.settings
    done = finished_run(cfg, settings.lora, *checkpoint_layout(cfg, job.out))
    if done is not None:  # nothing to do: no config, heartbeat or cache file of the finished run is rewritten
        return report_complete(job.name, job.out, done) if info.rank == 0 else None
    heartbeat("setup")  # a sweep's next job starts from its own first stage
    group = None
    failed = True
    try:
        job.out.mkdir(parents=True, exist_ok=True)
        job.watchdog = start_watchdog(cfg, info)  # covers model loading and caching too
        if info.distributed and info.launches:
            group = start_ranks(cfg, info, settings.distributed, job.name, job.watchdog)
        result = _train(job)
        failed = False
        return result
    except BaseException as e:
        err = _failure(job, e)
        if err is e:
            raise
        raise err from e
    finally:
        if group is not None:
            for line in group.finish(failed, settings.distributed.join_timeout_s):
                log.warning("%s", line)
        if info.distributed:
            end_process_group()
        if job.watchdog is not None:
            job.watchdog.stop()


def _failure(job: Job, e: BaseException) -> BaseException:
    """What a failed run raises: one line naming the stage (out of GPU memory, a full or read-only disk) or the rank
    a collective waited for; anything else as it was. The watchdog records it first: the other ranks and the
    supervisor read it to tell who failed first."""
    watchdog = job.watchdog
    named = stage_error(e, watchdog.stage if watchdog is not None else last_stage(), memory=memory_use)
    if watchdog is not None:
        watchdog.stop("exception", error=str(named) if named else f"{type(e).__name__}: {e}")
    if job.info.distributed and is_collective_failure(e):
        err = rank_failure(e, job.cfg, job.info, job.strategy)
        if watchdog is not None:  # the supervisor reads it
            watchdog.stop("exception", error=str(err))
        return err
    return named if named is not None else e


def _train(job: Job) -> float | None:
    cfg, info = job.cfg, job.info
    L.seed_everything(int(cfg.seed), workers=True, verbose=False)
    prepare_cuda(job.device, job.settings.memory.budget_gb)  # before the first allocation
    clock = StageClock(job.device, job.out / "stages.json" if job.owner else None)

    # the dataset and the callbacks' files (sample prompts) are checked before any model file is opened
    heartbeat("scan_dataset")
    val = job.settings.validation
    dm = FluxDataModule(cfg.data, cache_dir=str(cfg.data.cache_dir), synthetic_dir=job.out / "synthetic",
                        seed=int(cfg.seed), rank=info.rank, world_size=info.world_size,  # each rank its share
                        val_split=val.split, val_path=val.path, val_seed=val.seed)
    records = dm.scan()
    log.info("dataset: %d images%s", len(records), " with control images (FLUX.1 Kontext)" if dm.paired else "")
    _check_pairing(cfg, dm.paired)
    steps = total_optimizer_steps(cfg, dm.batches_per_epoch())  # buckets and num_repeats decide the epoch length
    callbacks = {"stage_clock": clock, **build_callbacks(cfg, prebuilt={"watchdog": job.watchdog})}  # clock first
    connect_callbacks(callbacks)
    if val.enabled and callbacks.get("validation") is None:
        log.warning("validation.%s is set but callbacks.validation is off: the validation images are held out of "
                    "training and never scored", "split" if val.split else "path")
    precision, compute_dtype = precision_for(cfg, job.device)
    record_run(callbacks, run_record(cfg, job.settings, job.name, dm.resolution, len(records), steps, precision))

    te_lora = _text_encoder_lora(job.settings)
    if te_lora is not None and callbacks.get("lora_saver") is not None:
        callbacks["lora_saver"].keep_layers(te_lora.tensors)  # written back unchanged in every kohya file
    comps = _load_and_cache(job, dm, callbacks.get("sampler") if job.owner else None, clock, te_lora)
    if callbacks.get("lora_saver") is not None:
        callbacks["lora_saver"].add_metadata(sd_model_name=comps.name, **(
            {"model_type": "chroma", "apply_t5_attn_mask": True} if comps.arch == "chroma" else {}))
    built = _build(job, comps, callbacks, steps, precision, compute_dtype, len(dm.step_shapes()))
    if built is None:
        return None
    module, trainer, plan = built
    _fit(job, module, trainer, dm, plan)
    return _report(callbacks, clock)


def _text_encoder_lora(settings: RunSettings):
    """The text-encoder layers of `lora.init_from` to apply while caching (`lora.text_encoder_lora=keep`), or None
    (no file, none in it, or `drop`, which logs them)."""
    from fluxlora.lora.text_encoder import read_text_encoder_lora

    lora = settings.lora
    if not lora.init_from:
        return None
    te = read_text_encoder_lora(lora.init_from, lora.text_encoder_lora)
    if te is not None:
        log.info("lora.init_from %s: text-encoder LoRA layers kept frozen (%s): applied while caching and to the "
                 "sample prompts, written back unchanged", te.path, te.summary())
    return te


def _check_pairing(cfg: DictConfig, paired: bool) -> None:
    """FLUX.1 Kontext trains on paired images and only Kontext does: either mismatch is an error before loading."""
    kontext = cfg.model.get("variant") == "kontext"
    if kontext and not paired:
        raise FluxLoraError(f"model={cfg.model.get('preset')} (FLUX.1 Kontext) trains on paired images: set "
                            "data.control_path=<folder of control images with the same stems> (or control_directory "
                            "in the dataset.toml)")
    if paired and not kontext:
        raise FluxLoraError(f"the dataset has control images (data.control_path / control_directory), which only "
                            f"FLUX.1 Kontext uses; model={cfg.model.get('preset')} would ignore them: use "
                            "model=flux-kontext, or drop the control folder")


def _load_and_cache(job: Job, dm: FluxDataModule, sampler: Any, clock: StageClock, te_lora: Any = None):
    """Load the model, apply `te_lora` (a file's text-encoder LoRA layers, or None) to the text encoders, cache
    latents and text outputs (one encoder on the device at a time), encode the sample prompts (`sampler`: rank 0's,
    or None), free the text encoders, then read the transformer. Returns the components."""
    cfg, memory, device = job.cfg, job.settings.memory, job.device
    log.info("loading model (%s)", cfg.model.source)
    heartbeat("load_model")
    clock.begin("load")
    comps = load_components(cfg.model, storage=memory.base_storage, defer_transformer=True,
                            t5_storage=memory.t5_storage, device_limit=memory_limit(device), defer_encoders=True)
    if te_lora is not None:
        comps.use_text_encoder_lora(te_lora)  # before caching: the cache holds the encoders' outputs with it
    keep = list(sampler.prompt_texts) if sampler is not None else []
    if keep and comps.arch == "chroma":  # Chroma samples with CFG: the negatives ride along with the captions too
        keep += sampler.negative_texts
    encoders = StagedEncoders(comps, device, int(cfg.model.t5_max_length), cache_batch_size(cfg.data.cache_batch_size),
                              keep=keep)
    heartbeat("caching")
    clock.begin("cache")
    identity = comps.encoder_identity(int(cfg.model.t5_max_length))
    dm.build_cache(encoders, identity, progress=job.watchdog.progress if job.watchdog is not None else None)
    clock.begin("build")
    if sampler is not None:
        heartbeat("caching", "sample prompts")
        # read from the cache folder where a run before encoded them, else encoded with the captions above (a stage
        # only where there were none)
        sampler.prepare(comps, CachedTexts(dm.latent_cache(identity), encoders))
    comps.release_encoders()  # the step sees only cached tensors; the VAE waits on the host for sampling
    gc.collect()

    heartbeat("load_model", "transformer")
    # read only now the text encoders are gone: host RAM peaks near the largest file
    comps.load_transformer(memory.load_device(device))
    heartbeat("build")
    return comps


def _build(job: Job, comps: Any, callbacks: dict, steps: int, precision: str, compute_dtype: torch.dtype,
           step_shapes: int = 1) -> Optional[tuple[Any, L.Trainer, ResumePlan]]:
    """The LoRA module on the loaded transformer, the checkpoint to continue from, and the Trainer; None when that
    checkpoint shows the run complete. `precision`, `compute_dtype`: `precision_for`'s; `step_shapes`: how many
    batch shapes the training data comes in."""
    cfg = job.cfg
    beat = job.watchdog.beat if job.watchdog is not None else None
    module, _ = build_module(cfg, comps.transformer, job.device, compute_dtype, steps, heartbeat=beat, run=job.settings,
                             step_shapes=step_shapes)
    folder, layout = checkpoint_layout(cfg, job.out)
    plan = resume_plan(cfg, module, folder, layout, owner=job.owner)
    if plan.path is not None and plan.finished(int(cfg.trainer.max_steps), cfg.trainer.get("max_epochs")):
        return report_complete(job.name, job.out, plan) if job.owner else None
    trainer = make_trainer(cfg, job.out, list(callbacks.values()), precision, job.info, job.settings.distributed,
                           plan.global_step if plan.path is not None else None, job.device)
    job.strategy = trainer.strategy
    return module, trainer, plan


def _fit(job: Job, module: Any, trainer: L.Trainer, dm: FluxDataModule, plan: ResumePlan) -> None:
    """Lightning's fit, after the run's record is written (a failed check or an attempt with nothing to do keeps
    the earlier one)."""
    if job.owner:
        atomic_write_text(job.out / "config.yaml", OmegaConf.to_yaml(job.cfg, resolve=True))
    try:
        trainer.fit(module, datamodule=dm, ckpt_path=str(plan.path) if plan.path else None)
    except SIGTERMException as e:  # Lightning's own SIGTERM path (our checkpoint callback was left out)
        raise RunInterrupted("stopped by SIGTERM", signal.SIGTERM) from e
    if plan.path is not None and trainer.global_step == plan.global_step:  # resumed, and not one step more
        log.warning("resumed at step %d and trained no further: trainer.max_epochs=%s is already reached; raise "
                    "trainer.max_epochs to train on", plan.global_step, job.cfg.trainer.get("max_epochs"))
    swapper = module.perf.swapper
    if swapper is not None:
        log.info("block swap: %d block copies, %.1f GB host->GPU, %.2f s waited on copies", swapper.stats["loads"],
                 swapper.stats["bytes"] / 1e9, swapper.stats["wait_s"])
    if trainer.interrupted:
        raise FluxLoraError("training was interrupted")


def _report(callbacks: dict, clock: StageClock) -> float | None:
    """`stages.json`, where the LoRA went, and the mean loss of the last steps (by the callbacks' config names)."""
    sampler, saver, summary = (callbacks.get(k) for k in ("sampler", "lora_saver", "loss_summary"))
    clock.finish(sampled=sampler.round_seconds if sampler is not None else None)
    if saver is not None and saver.saved:
        print(f"LoRA saved to {saver.saved[-1]}", flush=True)
    return summary.last_mean if summary is not None else None


def _route_lightning_logs() -> None:
    """Lightning installs its own console handler; send its records through the root (Hydra's) handlers once."""
    for name in [n for n in logging.root.manager.loggerDict if n.startswith("lightning")]:
        lg = logging.getLogger(name)
        lg.handlers.clear()
        lg.propagate = True
