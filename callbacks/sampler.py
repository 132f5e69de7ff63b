r"""TimedSampler: sample images during training on a background thread that can never stall the run."""

from __future__ import annotations

import contextlib
import copy
import logging
import sys
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import lightning as L
import numpy as np
import torch
from typing_extensions import override

from fluxlora.atomic import atomic_open
from fluxlora.perf.cuda_setup import available_memory, memory_use
from fluxlora.distributed.strategy import wait_for_rank_zero
from fluxlora.models.encode import VAE_DECODE_BYTES_PER_PIXEL
from fluxlora.errors import FluxLoraError
from fluxlora.heartbeat import heartbeat
from fluxlora.process_exit import track_native_thread
from fluxlora.models.sampling import SampleRenderer, SamplingCancelled, grid, load_prompts
from fluxlora.perf.speed import eager_blocks

log = logging.getLogger(__name__)

MODES = ("auto", "thread", "between_steps", "off")
_GiB = 1 << 30


@dataclass
class SampleRound:
    """One sampling round: the images of every prompt at one step, rendered on its own thread."""

    step: int
    deadline: float
    thread: Optional[threading.Thread] = None
    cancel: threading.Event = field(default_factory=threading.Event)
    images: list = field(default_factory=list)
    grid_path: Optional[Path] = None
    error: Optional[BaseException] = None
    collected: bool = False
    abandoned: bool = False
    started: float = field(default_factory=time.monotonic)
    finished: Optional[float] = None
    left_running: bool = False  # still running after the end's bounded wait: not waited for again

    @property
    def alive(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def stack(self) -> str:
        frame = sys._current_frames().get(self.thread.ident) if self.thread is not None else None
        return "".join(traceback.format_stack(frame)) if frame is not None else "(thread has ended)\n"


def choose_mode(device: torch.device, model_bytes: int, free_bytes: Optional[int], margin_bytes: int) -> str:
    """`auto` resolved: a separate sampling copy of the transformer where it fits, else sampling between steps."""
    if device.type != "cuda":
        return "thread"
    return "thread" if free_bytes is not None and free_bytes >= model_bytes + margin_bytes else "between_steps"


def sampling_copy(transformer: torch.nn.Module, compute_dtype: torch.dtype, swapping: bool = False) -> torch.nn.Module:
    """An inference copy of the (LoRA-adapted) transformer, in `compute_dtype`; refused when `swapping`
    (`PerfState.swapping`: part of the weights live in host memory).

    A deep copy keeps compiled forwards bound to the *original* blocks, so the copy's are removed (it runs eagerly).
    fp8 weights of `Fp8Linear`s stay fp8 (they upcast per matmul); any other fp8 tensor is upcast.
    """
    from fluxlora.perf.fp8 import Fp8Linear
    from fluxlora.perf.speed import uncompiled

    if swapping:
        raise ValueError("a transformer with block swapping has no full copy of its weights on the device; "
                         "sample in between_steps mode")
    clone = copy.deepcopy(transformer)
    uncompiled(clone)
    with torch.no_grad():
        for module in clone.modules():
            if isinstance(module, Fp8Linear):
                continue
            for p in module.parameters(recurse=False):
                if p.dtype in (torch.float8_e4m3fn, torch.float8_e5m2):
                    p.data = p.data.to(compute_dtype)
    return clone.eval().requires_grad_(False)


class TimedSampler(L.Callback):
    """Render sample prompts every N steps and/or at the start and end of training, without ever stalling it.

    Guarantee: sampling never blocks a training step for longer than ``timeout_s`` and never blocks it at all in
    ``thread`` mode, and a hung sampler never blocks the end of the run beyond ``timeout_s`` + ``cancel_wait_s``.
    Each round renders on its own daemon thread from a *snapshot* of the LoRA weights at the step it was due. A round
    still running when the next one is due makes that one be skipped (logged, never awaited); a round that runs past
    ``timeout_s`` is abandoned, logged with its thread's stack, and asked to stop at its next denoising step. At the
    end of the run (and on an error) a round still running is asked to stop and awaited at most ``cancel_wait_s``:
    a thread left inside a torch call when the interpreter exits aborts the process (status 134), so one that is
    still running after that is left to :mod:`fluxlora.process_exit`, which then ends the process without it and
    with the run's own status. In a DDP run only rank 0 samples; where it may block (the first round's copy,
    ``between_steps``, the end) the other ranks wait for it in one barrier bounded by the round's timeout, sending
    heartbeats, instead of timing out in the next collective.

    Modes (the training transformer changes under a concurrent sampler, so the sampler needs its own weights):

    - ``thread``: a copy of the transformer (base weights + LoRA), made once at the first round; each round copies
      the current LoRA tensors into it and renders while training goes on. Costs one more transformer in memory.
    - ``between_steps``: for a tight GPU tier: the round renders with the training transformer itself while the
      training loop waits at the step boundary, at most ``timeout_s`` (heartbeats keep the watchdog informed);
      the VAE comes to the GPU for the round and leaves after it. An abandoned round keeps its thread (Python cannot
      kill one), so later rounds are skipped until it ends.
    - ``auto``: ``thread`` on the CPU; on a GPU ``thread`` only when the free memory at the first round holds a
      second transformer and VAE plus ``memory_margin_gb``, else ``between_steps`` (logged once).
    - ``off``: never sample.

    Images go to ``sample/<name>_<step>_<idx>.png`` plus ``sample/<name>_<step>_grid.png`` and to TensorBoard.
    Prompt encodings are computed once, in :meth:`prepare`, while the text encoders are loaded.

    Args:
        output_dir: the run folder; images go to its `sample/` folder.
        name: file-name stem.
        prompts: prompt lines in kohya's format (`--w --h --d --s --g --l --n` flags).
        prompts_file: a kohya sample-prompts file, read in addition to `prompts`.
        every_n_steps: sample every N optimizer steps; 0 = off.
        at_start: sample before the first step.
        at_end: sample after the last step.
        timeout_s: the most one round may take.
        defaults: values for flags a prompt line leaves out (width, height, seed, steps, guidance).
        mode: auto | thread | between_steps | off (see above).
        memory_margin_gb: GPU memory `auto` keeps free besides the sampling copy.
        cancel_wait_s: at the end of the run, how long a cancelled round may take to reach its next denoising step.
        model_variant: `model.variant`; `kontext` renders with FluxKontextPipeline, and every prompt must then name
            its control image (`--ci`), checked when the prompts are parsed here, before any model loads.

    Example::

        sampler = TimedSampler("outputs/mychar", "mychar", prompts=["mychar --w 1024 --h 1024"], every_n_steps=250,
                               timeout_s=600, mode="auto")
    """

    def __init__(self, output_dir: str, name: str, prompts: Optional[list] = None, prompts_file: Optional[str] = None,
                 every_n_steps: int = 0, at_start: bool = False, at_end: bool = True, timeout_s: float = 600.0,
                 defaults: Optional[dict] = None, mode: str = "auto", memory_margin_gb: float = 2.0,
                 cancel_wait_s: float = 30.0, model_variant: Optional[str] = None) -> None:
        super().__init__()
        if not isinstance(every_n_steps, int) or every_n_steps < 0:
            raise ValueError(f"every_n_steps must be a non-negative int, got {every_n_steps!r}")
        if not timeout_s or float(timeout_s) <= 0:
            raise ValueError(f"timeout_s must be > 0, got {timeout_s!r}")
        if mode not in MODES:
            raise ValueError(f"sample.mode={mode!r} is not one of {MODES}")
        if not isinstance(memory_margin_gb, (int, float)) or memory_margin_gb < 0:
            raise ValueError(f"memory_margin_gb must be >= 0, got {memory_margin_gb!r}")
        if not isinstance(cancel_wait_s, (int, float)) or isinstance(cancel_wait_s, bool) or cancel_wait_s < 0:
            raise ValueError(f"cancel_wait_s must be a number >= 0, got {cancel_wait_s!r}")
        self._dir = Path(output_dir) / "sample"
        self._name = str(name)
        self._prompts = load_prompts(list(prompts or []), prompts_file, dict(defaults or {}),
                                     kontext=model_variant == "kontext")
        self._every = every_n_steps
        self._at_start = bool(at_start)
        self._at_end = bool(at_end)
        self._timeout = float(timeout_s)
        self._mode = mode
        self._margin = int(float(memory_margin_gb) * _GiB)
        self._cancel_wait = float(cancel_wait_s)
        self._renderer: SampleRenderer | None = None
        self._model: Optional[torch.nn.Module] = None  # the sampling copy (thread mode)
        self._lora_dst: dict[str, torch.nn.Parameter] = {}
        self._job: Optional[SampleRound] = None
        self._due_step = -1
        self.mode: Optional[str] = None  # resolved at the first round
        self.rounds: list[Path] = []
        self.round_seconds: dict[int, float] = {}  # step -> how long its round took, start to last image written
        self.skipped: list[int] = []
        self.abandoned: list[int] = []

    @property
    def enabled(self) -> bool:
        return self._mode != "off" and bool(self._prompts) and (self._every > 0 or self._at_start or self._at_end)

    @property
    def prompt_texts(self) -> list[str]:
        """The prompts this sampler will render ([] when it never samples): caching encodes them with the captions."""
        return [p.prompt for p in self._prompts] if self.enabled else []

    @property
    def negative_texts(self) -> list[str]:
        """Each prompt's negative (`--n`, "" when none; [] when it never samples): Chroma's CFG renders them."""
        return [p.negative for p in self._prompts] if self.enabled else []

    def prepare(self, components: Any, encoders: Any) -> None:
        """Encode the prompts now, before training, with `encoders.texts` (`fluxlora.models.encode.StagedEncoders`: a
        CLIP-L stage then a T5 stage); rounds render from these encodings."""
        if self.enabled:
            self._renderer = SampleRenderer(components, self._prompts, encoders.texts)

    # ---- rounds ----

    def sample(self, trainer: L.Trainer, pl_module: L.LightningModule, step: int,
               wait: bool = False) -> Optional[SampleRound]:
        """Start a round for `step` (skipped while one runs); with `wait`, or in between_steps mode, wait for it
        at most `timeout_s`. Returns the round, or None when none was started."""
        if self._renderer is None:
            return None
        if self._job is not None and self._job.alive:
            self.skipped.append(step)
            log.warning("sampling at step %d skipped: the round from step %d is still running (%s)", step,
                        self._job.step, "abandoned" if self._job.abandoned else
                        f"{self._timeout - (self._job.deadline - time.monotonic()):.0f}s so far")
            return None
        heartbeat("sampling_start", f"step {step}")
        try:
            transformer = self._sampling_transformer(pl_module)
        except Exception as e:  # sampling is a side show: it must not end the run
            log.error("sampling disabled: the round of step %d could not start: %s: %s", step, type(e).__name__, e)
            self._renderer = None
            return None
        job = SampleRound(step=step, deadline=time.monotonic() + self._timeout)
        job.thread = threading.Thread(target=self._render, args=(job, transformer, pl_module),
                                      name=f"fluxlora-sampler-{step}", daemon=True)
        self._job = job
        track_native_thread(job.thread)
        job.thread.start()
        if wait or self.mode == "between_steps":
            self._wait(job, trainer)
            if self.mode == "between_steps":
                pl_module.transformer.train()  # even if the round was abandoned: training goes on
        heartbeat("sampling_end", f"step {step}")
        return job

    def _sampling_transformer(self, pl_module: L.LightningModule) -> torch.nn.Module:
        """The transformer this round renders with: the snapshot copy (thread) or the training one."""
        if self.mode is None:
            self._resolve_mode(pl_module)
        if self.mode == "between_steps":
            return pl_module.transformer
        src = {n: p for n, p in pl_module.transformer.named_parameters() if p.requires_grad}
        if self._model is None:
            heartbeat("sampling_setup", "copying the transformer for the sampling thread")
            self._model = sampling_copy(pl_module.transformer, pl_module.compute_dtype, pl_module.perf.swapping)
            self._lora_dst = {n: p for n, p in self._model.named_parameters() if n in src}
        with torch.no_grad():  # the snapshot: LoRA tensors only, a fast device-local copy
            for n, p in self._lora_dst.items():
                p.copy_(src[n])
        return self._model

    def _resolve_mode(self, pl_module: L.LightningModule) -> None:
        device = pl_module.device
        swapping = pl_module.perf.swapping
        if self._mode == "thread" and swapping:
            raise FluxLoraError("callbacks.sampler.mode=thread needs a full copy of the transformer, which block "
                                "swapping (memory.blocks_to_swap) keeps off the GPU; use mode=auto or between_steps")
        if self._mode != "auto":
            self.mode = self._mode
            return
        if swapping:
            self.mode = "between_steps"
            log.info("sampling mode between_steps: block swapping keeps part of the transformer in host memory")
            return
        vae = self._renderer.c.vae
        size = torch.empty((), dtype=pl_module.compute_dtype).element_size()
        need = sum(t.numel() * size for m in (pl_module.transformer, vae) for t in (*m.parameters(), *m.buffers()))
        # the largest sample's decode too: in thread mode it runs beside a training step
        need += max(p.width * p.height for p in self._prompts) * VAE_DECODE_BYTES_PER_PIXEL
        free = available_memory(device)  # the process's real limit: a memory budget caps it below the card's
        self.mode = choose_mode(device, need, free, self._margin)
        if device.type == "cuda":
            log.info("sampling mode %s: %.1f GiB free under this process's limit, a sampling copy needs %.1f GiB + "
                     "%.1f GiB margin", self.mode, free / _GiB, need / _GiB, self._margin / _GiB)
            if self.mode == "thread":
                vae.to(device)

    def _render(self, job: SampleRound, transformer: torch.nn.Module, pl_module: L.LightningModule) -> None:
        """The round's thread: render every prompt, write the PNGs and the grid."""
        vae = self._renderer.c.vae
        vae_device = next(vae.parameters()).device
        device, dtype = pl_module.device, pl_module.compute_dtype
        between = self.mode == "between_steps"
        try:
            if between:
                transformer.eval()
                vae.to(device)
            with eager_blocks(transformer) if between else contextlib.nullcontext():
                for p in self._prompts:
                    job.images.append(self._renderer.render(p, device, dtype, transformer, job.cancel))
            self._dir.mkdir(parents=True, exist_ok=True)
            for i, im in enumerate(job.images):
                _save_png(im, self._dir / f"{self._name}_{job.step:06d}_{i:02d}.png")
            job.grid_path = self._dir / f"{self._name}_{job.step:06d}_grid.png"
            _save_png(grid(job.images), job.grid_path)
        except SamplingCancelled:
            pass
        except BaseException as e:  # reported by the training thread when it collects the round
            job.error = e
        finally:
            job.finished = time.monotonic()
            if between:
                vae.to(vae_device)
                if not job.abandoned:
                    transformer.train()
                if device.type == "cuda":
                    torch.cuda.empty_cache()

    def _wait(self, job: SampleRound, trainer: L.Trainer) -> None:
        """Wait for `job` until its deadline, sending heartbeats (the wait is bounded, so it is a live stage)."""
        while job.alive and time.monotonic() < job.deadline:
            job.thread.join(min(0.5, max(0.0, job.deadline - time.monotonic())))
            heartbeat("sampling", f"waiting for the round of step {job.step}")
        self.poll(trainer)

    def poll(self, trainer: Optional[L.Trainer] = None) -> None:
        """Collect a finished round (log it) or abandon one that ran past its timeout. Cheap; call at any time."""
        job = self._job
        if job is None or job.collected:
            return
        if job.alive:
            if time.monotonic() > job.deadline and not job.abandoned:
                self._abandon(job)
            return
        job.collected = True
        if job.abandoned:
            log.warning("the abandoned sampling round of step %d ended after all", job.step)
        elif isinstance(job.error, torch.OutOfMemoryError):
            self._renderer = None  # every later round would run out the same way
            log.warning("sampling switched off: the round of step %d ran out of GPU memory%s; training goes on "
                        "(smaller samples, --w/--h in the prompts, or sample.mode=off)", job.step,
                        _memory_in_use(_device_of(trainer)))
        elif job.error is not None:
            log.error("sampling at step %d failed: %s: %s", job.step, type(job.error).__name__, job.error)
        elif job.grid_path is not None:
            self.rounds.append(job.grid_path)
            self.round_seconds[job.step] = (job.finished or time.monotonic()) - job.started
            log.info("samples at step %d: %s (%.1fs, %s mode)", job.step, job.grid_path, self.round_seconds[job.step],
                     self.mode)
            if trainer is not None:
                self._log_images(trainer, job)

    def _abandon(self, job: SampleRound) -> None:
        job.abandoned = True
        job.cancel.set()
        self.abandoned.append(job.step)
        log.error("stage 'sampling': the round of step %d ran past its timeout of %gs and is abandoned; training "
                  "goes on. Its thread's stack:\n%s", job.step, self._timeout, job.stack())

    def _stop_round(self) -> None:
        """Cancel a round still running and wait, bounded by `cancel_wait_s`, for it to reach its next denoising
        step: the process must not end with the thread inside a torch call."""
        job = self._job
        if job is None or not job.alive or job.left_running:
            return
        job.cancel.set()
        deadline = time.monotonic() + self._cancel_wait
        while job.alive and time.monotonic() < deadline:
            job.thread.join(min(0.5, max(0.0, deadline - time.monotonic())))
            heartbeat("sampling", f"stopping the round of step {job.step}")
        if job.alive:
            job.left_running = True
            log.error("stage 'sampling': the round of step %d did not stop within %gs of being cancelled; the run "
                      "ends without it. Its thread's stack:\n%s", job.step, self._cancel_wait, job.stack())

    def _log_images(self, trainer: L.Trainer, job: SampleRound) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, L.pytorch.loggers.TensorBoardLogger):
                for i, im in enumerate(job.images):
                    logger.experiment.add_image(f"samples/{i:02d}", np.asarray(im.convert("RGB")), job.step,
                                                dataformats="HWC")

    # ---- Lightning hooks ----

    # Only rank 0 samples. Where it may block (the first round's copy, between_steps, the end), every rank then
    # meets it in one bounded barrier that sends heartbeats, so no rank sits in another collective meanwhile;
    # the decision to meet depends only on the config and the step, the same on every rank.

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._at_start and self.enabled and trainer.global_step == 0:
            self._due_step = 0
            if trainer.is_global_zero:
                self.sample(trainer, pl_module, 0)
            wait_for_rank_zero(trainer, "sampling", self._timeout)

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._job is not None and not self._job.collected:
            self.poll(trainer)
        step = trainer.global_step
        if self._every and self.enabled and step % self._every == 0 and step > 0 and self._due_step != step:
            self._due_step = step  # once per step, also when gradient accumulation ends several batches there
            if trainer.is_global_zero:
                self.sample(trainer, pl_module, step)
            wait_for_rank_zero(trainer, "sampling", self._timeout)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled:
            return
        if trainer.is_global_zero and self._renderer is not None:
            if self._job is not None and self._job.alive and not self._job.abandoned:
                self._wait(self._job, trainer)  # the running round gets the rest of its time, then the last one
            self.poll(trainer)
            step = trainer.global_step
            if self._at_end and (self._job is None or self._job.step != step):
                self.sample(trainer, pl_module, step, wait=True)
            self._stop_round()  # an abandoned round: cancelled and awaited now, while the run still waits here
        # the running round, then the last one, then stopping one of them
        wait_for_rank_zero(trainer, "sampling", 2 * self._timeout + self._cancel_wait)

    @override
    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._stop_round()

    @override
    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._stop_round()
        self._model = None


def _device_of(trainer: Optional[L.Trainer]) -> Optional[torch.device]:
    return trainer.strategy.root_device if trainer is not None else None


def _memory_in_use(device: Optional[torch.device]) -> str:
    """' (X of Y GiB in use)' on a CUDA device, else ''."""
    use = memory_use(device) if device is not None else None
    return f" ({use[0] / _GiB:.2f} of {use[1] / _GiB:.2f} GiB in use)" if use else ""


def _save_png(image: Any, path: Path) -> None:
    with atomic_open(path, "wb") as f:
        image.save(f, format="PNG")
