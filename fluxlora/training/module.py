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
        latents = batch["latents"].to(self.device, torch.float32)
        b, _, h, w = latents.shape
        x0 = fm.pack_latents(latents)
        noise = torch.randn_like(x0) if noise is None else noise.to(x0)
        if sigma is None:
            sigma = fm.sample_sigmas(self.flow, b, x0.shape[1], device=self.device)
        else:
            sigma = sigma.to(self.device)
        xt = fm.noise_latents(x0, noise, sigma).to(self.compute_dtype)
        t5 = batch["t5"].to(self.device, self.compute_dtype)
        if self.arch == "chroma" and "control" in batch:
            raise FluxLoraError("control images (a Kontext dataset) cannot train Chroma: use model=flux-kontext")
        if self.arch == "chroma":  # T5 mask applied, no pooled CLIP, no guidance (fluxlora.models.chroma)
            from fluxlora.models.chroma import predict

            pred = predict(self.transformer, xt, t5, batch["t5_mask"], sigma, h, w, self.compute_dtype)
            return fm.flow_loss(pred, noise - x0, self.flow.loss, self.flow.huber_c)
        guidance = torch.full((b,), self.flow.guidance_scale, device=self.device) if self.has_guidance else None
        tokens, ids = xt, fm.image_ids(h, w, device=self.device, dtype=self.compute_dtype)
        if "control" in batch:  # FLUX.1 Kontext: the clean control tokens ride after the noisy target's
            tokens, ids = kontext.append_control(tokens, ids, batch["control"].to(self.device))
        pred = self.transformer(
            hidden_states=tokens,
            encoder_hidden_states=t5,
            pooled_projections=batch["pooled"].to(self.device, self.compute_dtype),
            timestep=sigma.to(self.compute_dtype),
            img_ids=ids,
            txt_ids=torch.zeros(t5.shape[1], 3, device=self.device, dtype=self.compute_dtype),
            guidance=guidance,
            return_dict=False,
        )[0]
        pred = kontext.target_part(pred, x0.shape[1])  # the loss scores the target's tokens only
        return fm.flow_loss(pred, noise - x0, self.flow.loss, self.flow.huber_c)

    @override
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
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

    @override
    def optimizer_step(self, epoch: int, batch_idx: int, optimizer, optimizer_closure=None) -> None:
        """Run forward+backward, then step only if every loss since the last step was finite."""
        if optimizer_closure is not None:
            optimizer_closure()
        flag, files = self._nonfinite, self._pending_files
        self._nonfinite, self._pending_files = None, []
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
        if not self.perf.cuda_graphs:
            optimizer.zero_grad(set_to_none=True)
            return
        # with CUDA graphs a gradient must not be a graph's output buffer, which the next replay writes over:
        # gradients get memory of their own before the first backward, and backward accumulates into it
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    p.grad = torch.zeros_like(p)
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
