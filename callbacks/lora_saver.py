r"""Writes the LoRA file a user loads: every N epochs/steps and at the end, atomically, in kohya or diffusers keys."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning as L
import torch
from safetensors.torch import save
from typing_extensions import override

from fluxlora.atomic import atomic_write_bytes
from fluxlora.heartbeat import in_stage
from fluxlora.lora.export import diffusers_state_dict, kohya_state_dict
from fluxlora.lora.header import file_metadata, trained_scales, training_metadata

log = logging.getLogger(__name__)

FORMATS = ("kohya", "diffusers", "both")
_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class LoRASaver(L.Callback):
    """Save the trained LoRA as safetensors in FluxGym's layout.

    `<name>-000004.safetensors` after every `every_n_epochs` epochs (or `<name>-step00000100` every
    `every_n_steps` steps) and `<name>.safetensors` when training ends. Files are written to a temp name in
    the destination folder and renamed, so a crash never leaves a torn LoRA file. The diffusers variant is
    `<name>.diffusers.safetensors`.

    Args:
        output_dir: the run's stable output folder.
        name: the file stem (the run name).
        format: kohya | diffusers | both.
        every_n_epochs: save after every N epochs; None or 0 = off.
        every_n_steps: save every N optimizer steps; None or 0 = off.
        dtype: bf16 | fp16 | fp32 for the saved tensors.
        metadata: extra `ss_*` values (strings or JSON-able) for the header.

    Example::

        trainer = Trainer(callbacks=[LoRASaver("outputs/mychar", "mychar", every_n_epochs=4)])
    """

    def __init__(self, output_dir: str, name: str, format: str = "kohya", every_n_epochs: Optional[int] = None,
                 every_n_steps: Optional[int] = None, dtype: str = "bf16", metadata: Optional[dict] = None) -> None:
        super().__init__()
        if format not in FORMATS:
            raise ValueError(f"output.format={format!r} is not one of {FORMATS}")
        if dtype not in _DTYPES:
            raise ValueError(f"output.dtype={dtype!r} is not one of {tuple(_DTYPES)}")
        for key, v in (("every_n_epochs", every_n_epochs), ("every_n_steps", every_n_steps)):
            if v is not None and (not isinstance(v, int) or v < 0):
                raise ValueError(f"{key} must be a non-negative int or None, got {v!r}")
        self._dir = Path(output_dir)
        self._name = str(name)
        self._format = format
        self._every_epochs = every_n_epochs or 0
        self._every_steps = every_n_steps or 0
        self._dtype = _DTYPES[dtype]
        self._metadata = dict(metadata or {})
        self._kept: dict[str, torch.Tensor] = {}
        self.saved: list[Path] = []
        self._last_step_saved = -1  # with gradient accumulation several batches end on the same optimizer step

    def add_metadata(self, **values: Any) -> None:
        """Header values known only later (the base model's name, once it is loaded: the callbacks are built first)."""
        self._metadata.update(values)

    def keep_layers(self, tensors: dict[str, torch.Tensor]) -> None:
        """Tensors written unchanged (bit for bit, in their own dtype) into every kohya file: the frozen text-encoder
        layers of `lora.init_from` (`fluxlora.lora.text_encoder`)."""
        self._kept = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}

    def save(self, pl_module: L.LightningModule, stem: str, trainer: L.Trainer) -> list[Path]:
        """Write `<stem>.safetensors` (and/or the diffusers variant); returns the written paths."""
        info = {"name": self._name, "guidance": getattr(pl_module, "has_guidance", True),
                "steps": trainer.global_step, "epoch": trainer.current_epoch, **self._metadata}
        meta = training_metadata(pl_module.lora_settings, info)
        paths = []
        with in_stage("lora_save", stem):  # a failure here (full disk, out of memory) is named by this stage
            if self._format in ("kohya", "both"):
                paths.append(self._write({**kohya_state_dict(pl_module.transformer, self._dtype), **self._kept},
                                         meta, f"{stem}.safetensors"))
            if self._format in ("diffusers", "both"):
                if self._kept:
                    log.warning("the diffusers-keyed LoRA file holds the transformer layers only: the %d frozen "
                                "text-encoder tensors of lora.init_from are written to kohya files (output.format="
                                "kohya or both)", len(self._kept))
                suffix = ".safetensors" if self._format == "diffusers" else ".diffusers.safetensors"
                paths.append(self._write(diffusers_state_dict(pl_module.transformer, self._dtype), meta,
                                         stem + suffix, trained_scales(pl_module.transformer)))
        self.saved.extend(paths)
        return paths

    def _write(self, tensors: dict, meta: dict, filename: str, scales: Optional[dict] = None) -> Path:
        """Write `tensors` with `meta` completed for exactly them (network dim/alpha of their layers, sd-scripts'
        sshs_* hashes); `scales`: each layer's trained alpha/rank where the file has no `.alpha` (diffusers keys)."""
        path = self._dir / filename
        tensors = {k: v.cpu() for k, v in tensors.items()}
        atomic_write_bytes(path, save(tensors, metadata=file_metadata(meta, tensors, scales)))
        log.info("saved LoRA %s (%d tensors)", path, len(tensors))
        return path

    @override
    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        step = trainer.global_step
        if (self._every_steps and step > 0 and step % self._every_steps == 0 and step != self._last_step_saved
                and trainer.is_global_zero):
            self._last_step_saved = step
            self.save(pl_module, f"{self._name}-step{step:08d}", trainer)

    @override
    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        epoch = trainer.current_epoch + 1
        # Lightning sets max_epochs=-1 when training is bounded by max_steps only
        last = trainer.max_epochs is not None and trainer.max_epochs > 0 and epoch >= trainer.max_epochs
        if self._every_epochs and epoch % self._every_epochs == 0 and not last and trainer.is_global_zero:
            self.save(pl_module, f"{self._name}-{epoch:06d}", trainer)

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            self.save(pl_module, self._name, trainer)
