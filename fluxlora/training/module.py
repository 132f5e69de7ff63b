"""FluxLoRAModule: flow-matching training of peft LoRA adapters on diffusers' FluxTransformer2DModel.

The step sees only cached tensors: VAE latents, T5 sequence, CLIP pooled embedding.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import lightning as L
import torch
from typing_extensions import override

from fluxlora.training import flow as fm
from fluxlora.training import kontext
from fluxlora.distributed.strategy import agree_max
from fluxlora.errors import FluxLoraError
from fluxlora.lora.adapters import NAMES
from fluxlora.lora.init_from import inject_and_load
from fluxlora.lora.inject import LoraSettings, lora_parameters
from fluxlora.training.optim import build_optimizer, build_scheduler
from fluxlora.training.settings import NONFINITE
from fluxlora.perf.state import PerfState
from fluxlora.perf.step_graph import StepGraphs

log = logging.getLogger(__name__)


def _arch_of(transformer: torch.nn.Module) -> str:
    """`chroma` for diffusers' ChromaTransformer2DModel (its mask kept under checkpointing), else `flux`."""
    from fluxlora.models.chroma import is_chroma, keep_mask_under_checkpointing

    if not is_chroma(transformer):
        return "flux"
    keep_mask_under_checkpointing(transformer)
    return "chroma"


class FluxLoRAModule(L.LightningModule):
    """Trains LoRA adapters on a frozen Flux transformer.

    Args:
        transformer: a diffusers `FluxTransformer2DModel` (memory settings already applied).
        lora: which layers get adapters, rank and alpha.
        flow: σ sampling and loss.
        optim: the `optim` config node (name, lr, scheduler, warmup_steps, ...).
        total_steps: optimizer steps of the whole run (for schedules).
        compute_dtype: dtype of the transformer's inputs.
        nonfinite: `stop` ends the run at the first NaN/inf loss; `skip` drops the step and counts.
        max_nonfinite_skips: with `skip`, how many steps may be dropped before the run stops.
        check_finite: test each loss for NaN/inf (one host sync per step); off only for benchmarks.
        perf: what the memory, swap and speed setup decided (`build_module` fills it in); a plain `PerfState`
            (nothing applied) by default.
    """

    def __init__(self, transformer: torch.nn.Module, lora: LoraSettings, flow: fm.FlowConfig, optim: Any,
                 total_steps: int, compute_dtype: torch.dtype = torch.float32, nonfinite: str = "stop",
                 max_nonfinite_skips: int = 10, check_finite: bool = True, perf: PerfState | None = None,
                 base_model: dict | None = None) -> None:
        super().__init__()
        if nonfinite not in NONFINITE:
            raise ValueError(f"train.nonfinite={nonfinite!r} is not one of {NONFINITE}")
        self.transformer = transformer
        self.lora_settings = lora
        self.flow = flow
        self.optim_cfg = optim
        self.total_steps = int(total_steps)
        self.compute_dtype = compute_dtype
        self.nonfinite = nonfinite
        self.max_nonfinite_skips = int(max_nonfinite_skips)
        self.nonfinite_skips = 0
        self.check_finite = bool(check_finite)
        self.perf = perf if perf is not None else PerfState()
        self.base_model = dict(base_model or {})  # recorded in checkpoints: a resume onto another model is refused
        self._nonfinite: torch.Tensor | None = None  # device flag: any non-finite loss since the last step
        self._pending_files: list[str] = []
        self.adapted = inject_and_load(transformer, lora)
        transformer.train()  # Lightning warns about eval-mode modules; Flux has no dropout outside LoRA
        self.has_guidance = bool(getattr(transformer.config, "guidance_embeds", False))
        self.arch = _arch_of(transformer)
        n = sum(p.numel() for p in lora_parameters(transformer).values())
        log.info("%s r=%d alpha=%g on %d layers (%s blocks): %.2fM trainable parameters",
                 NAMES.get(lora.type, lora.type), lora.rank, lora.alpha, len(self.adapted), lora.train_blocks,
                 n / 1e6)

    def flow_loss(self, batch: dict, noise: torch.Tensor | None = None,
                  sigma: torch.Tensor | None = None) -> torch.Tensor:
        """The flow-matching loss of one batch of cached tensors.

        Training draws `noise` (packed, like the latents) and `sigma` (one per sample) from the global RNG; the
        validation loss passes fixed ones (`fluxlora.training.validation`) and draws nothing.
        """
        return self.loss_from(self.step_inputs(batch, sigma), noise)

    def step_inputs(self, batch: dict, sigma: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        """The device tensors a step of `batch` reads. What is drawn or built on the host (σ, from the CPU generator;
        the position ids) is made here, so that `loss_from` only launches device work, which a CUDA graph captures
        (`fluxlora.perf.step_graph`)."""
        if self.arch == "chroma" and "control" in batch:
            raise FluxLoraError("control images (a Kontext dataset) cannot train Chroma: use model=flux-kontext")
        latents = batch["latents"].to(self.device, torch.float32)
        b, _, h, w = latents.shape
        if sigma is None:
            sigma = fm.sample_sigmas(self.flow, b, (h // 2) * (w // 2), device=self.device)
        inputs = {"latents": latents, "sigma": sigma.to(self.device),
                  "t5": batch["t5"].to(self.device, self.compute_dtype)}
        if self.arch == "chroma":  # T5 mask applied, no pooled CLIP, no guidance (fluxlora.models.chroma)
            inputs["t5_mask"] = batch["t5_mask"]
            return inputs
        inputs["pooled"] = batch["pooled"].to(self.device, self.compute_dtype)
        inputs["img_ids"] = fm.image_ids(h, w, device=self.device, dtype=self.compute_dtype)
        if "control" in batch:  # FLUX.1 Kontext: the clean control tokens ride after the noisy target's
            inputs["control"] = batch["control"].to(self.device)
            inputs["img_ids"] = kontext.ids_with_control(inputs["img_ids"], inputs["control"])
        return inputs

    def loss_from(self, inputs: dict[str, torch.Tensor], noise: torch.Tensor | None = None) -> torch.Tensor:
        """The loss of `step_inputs`' tensors; draws the noise on the device unless given."""
        latents, sigma, t5 = inputs["latents"], inputs["sigma"], inputs["t5"]
        b, _, h, w = latents.shape
        x0 = fm.pack_latents(latents)
        noise = torch.randn_like(x0) if noise is None else noise.to(x0)
        xt = fm.noise_latents(x0, noise, sigma).to(self.compute_dtype)
        if self.arch == "chroma":
            from fluxlora.models.chroma import predict

            pred = predict(self.transformer, xt, t5, inputs["t5_mask"], sigma, h, w, self.compute_dtype)
            return fm.flow_loss(pred, noise - x0, self.flow.loss, self.flow.huber_c)
        guidance = torch.full((b,), self.flow.guidance_scale, device=self.device) if self.has_guidance else None
        tokens = xt if "control" not in inputs else kontext.append_control_tokens(xt, inputs["control"])
        pred = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=t5,
            pooled_projections=inputs["pooled"],
            timestep=sigma.to(self.compute_dtype),
            img_ids=inputs["img_ids"],
            txt_ids=torch.zeros(t5.shape[1], 3, device=self.device, dtype=self.compute_dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        pred = kontext.target_part(pred, x0.shape[1])  # the loss scores the target's tokens only
        return fm.flow_loss(pred, noise - x0, self.flow.loss, self.flow.huber_c)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        if self.perf.step_graphs is not None:
            loss = self._graphed_step(self.perf.step_graphs, batch, batch_idx)
        else:
            if self.perf.cuda_graphs:
                torch.compiler.cudagraph_mark_step_begin()  # last step's graph outputs are dead: replay over them
            loss = self.flow_loss(batch)
        if self.check_finite:
            # no host sync here: the flag is read in optimizer_step, once backward is already queued
            bad = ~torch.isfinite(loss.detach())
            self._nonfinite = bad if self._nonfinite is None else self._nonfinite | bad
            self._pending_files.extend(batch.get("path", []))
        self.log("train/loss", loss, prog_bar=True, on_step=True, batch_size=batch["latents"].shape[0])
        return loss

    def _graphed_step(self, graphs: StepGraphs, batch: dict, batch_idx: int) -> torch.Tensor:
        """Forward and backward of `batch` through `graphs` (`speed.graph_scope=step`: one CUDA graph per shape);
        returns the loss, detached. Lightning zeroes gradients after `training_step` and before `backward`, so here,
        where backward ran inside the step, the step zeroes them itself where Lightning would (the first batch of an
        accumulation window) and `optimizer_zero_grad` and `backward` do nothing."""
        accumulate = self.trainer.accumulate_grad_batches
        zero = batch_idx % accumulate == 0

        def step(inputs: dict[str, torch.Tensor]) -> torch.Tensor:  # runs eagerly, or once while captured
            grads = self._own_grads(self.trainer.optimizers[0])
            if zero:
                torch._foreach_zero_(grads)
            loss = self.loss_from(inputs)
            with torch.autocast(self.device.type, enabled=False):
                (loss / accumulate if accumulate > 1 else loss).backward()
            return loss.detach()

        return graphs(step, self.step_inputs(batch), key=(zero, accumulate))

    @staticmethod
    def _own_grads(optimizer) -> list[torch.Tensor]:
        """The gradients of `optimizer`'s parameters, each given memory of its own first: a CUDA graph replays over
        the same buffers, and backward accumulates into them."""
        grads = []
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
                grads.append(p.grad)
        return grads

    @override
    def backward(self, loss: torch.Tensor, *args: Any, **kwargs: Any) -> None:
        if self.perf.step_graphs is not None and not loss.requires_grad:
            return  # the step ran backward itself (_graphed_step)
        super().backward(loss, *args, **kwargs)

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Run forward+backward, then step only if every loss since the last step was finite."""
        if optimizer_closure is not None:
            optimizer_closure()
        flag, files = self._nonfinite, self._pending_files
        self._nonfinite, self._pending_files = None, []
        raw = getattr(optimizer, "optimizer", optimizer)
        if flag is not None and getattr(self._trainer, "world_size", 1) == 1 \
                and getattr(raw, "_step_supports_amp_scaling", False):
            # a fused optimizer skips the update on the device when `found_inf` is set (as under GradScaler): the
            # update is queued before the host reads the flag, so the GPU does not idle between backward and it
            raw.found_inf = flag.float()
            try:
                optimizer.step()
            finally:
                del raw.found_inf
            if bool(flag):
                self._on_nonfinite(files)  # the update was skipped; the LoRA weights stay as they were
            return
        if flag is not None and getattr(self._trainer, "world_size", 1) > 1:
            # the gradients were averaged over the ranks: every rank skips (or stops) together
            local = bool(flag)
            flag = agree_max(self.trainer, [float(local)])[0] > 0
            files = files if local else [f"(on another rank; this rank {self.global_rank} was finite)"]
        if flag is not None and bool(flag):
            self._on_nonfinite(files)
            return  # grads are cleared before the next step; the LoRA weights stay as they were
        optimizer.step()

    @override
    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer) -> None:
        if self.perf.step_graphs is not None:
            return  # the step zeroes its gradients inside its graph (_graphed_step)
        if not self.perf.cuda_graphs:
            optimizer.zero_grad(set_to_none=True)
            return
        # with CUDA graphs a gradient must not be a graph's output buffer, which the next replay writes over:
        # gradients get memory of their own before the first backward, and backward accumulates into it
        self._own_grads(optimizer)
        optimizer.zero_grad(set_to_none=False)

    @override
    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Clip as Lightning does; also for fused optimizers under bf16 (Lightning refuses every fused optimizer
        under mixed precision because one with a GradScaler unscales inside its step; bf16 has no scaler)."""
        precision = self.trainer.precision_plugin
        if (gradient_clip_val and getattr(optimizer, "_step_supports_amp_scaling", False)
                and getattr(precision, "scaler", None) is None):
            L.pytorch.plugins.precision.Precision.clip_gradients(
                precision, optimizer, gradient_clip_val, gradient_clip_algorithm or "norm")
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def _on_nonfinite(self, files: list[str]) -> None:
        where = f"non-finite loss at step {self.global_step} on batch [{', '.join(files) or '?'}]"
        if self.nonfinite == "stop":
            raise FluxLoraError(f"{where}; lower optim.lr or set train.nonfinite=skip")
        self.nonfinite_skips += 1
        log.warning("%s: step skipped (%d/%d)", where, self.nonfinite_skips, self.max_nonfinite_skips)
        if self.nonfinite_skips > self.max_nonfinite_skips:
            raise FluxLoraError(f"{where}; more than {self.max_nonfinite_skips} non-finite steps skipped")

    @override
    def configure_optimizers(self) -> dict:
        opt = build_optimizer(lora_parameters(self.transformer).values(), self.optim_cfg)
        sched = build_scheduler(opt, self.optim_cfg, self.total_steps)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step", "name": "lr"}}

    # Checkpoints hold the LoRA weights only, never the frozen base model.
    @override
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, torch.Tensor]:
        return {f"transformer.{n}": p.detach() for n, p in lora_parameters(self.transformer).items()}

    @override
    def load_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True, assign: bool = False):
        own = self.state_dict()
        unexpected = [k for k in state_dict if k not in own]
        missing = [k for k in own if k not in state_dict]
        if strict and (unexpected or missing):
            raise RuntimeError(f"LoRA state does not match this model: {len(missing)} missing "
                               f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]})")
        with torch.no_grad():
            params = lora_parameters(self.transformer)
            for k, v in state_dict.items():
                name = k.removeprefix("transformer.")
                if name in params:
                    params[name].copy_(v)
        return torch.nn.modules.module._IncompatibleKeys(missing, unexpected)

    @override
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        # the LoRA settings let a re-run tell "already complete" before any model is loaded (fluxlora.run.resume)
        checkpoint["fluxlora"] = {"nonfinite_skips": self.nonfinite_skips, "adapted": self.adapted,
                                  "lora": dataclasses.asdict(self.lora_settings), "base_model": self.base_model}

    @override
    def on_load_checkpoint(self, checkpoint: dict) -> None:
        self.nonfinite_skips = checkpoint.get("fluxlora", {}).get("nonfinite_skips", 0)
