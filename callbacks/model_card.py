r"""Writes `README.md` into the output folder when training ends: base model, trigger word, settings, the last
sample grid and how to load the LoRA."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import lightning as L
from typing_extensions import override

from fluxlora.atomic import atomic_write_text
from fluxlora.heartbeat import in_stage

log = logging.getLogger(__name__)

_HUB_IDS = {"dev": "black-forest-labs/FLUX.1-dev", "schnell": "black-forest-labs/FLUX.1-schnell",
            "chroma": "lodestones/Chroma1-HD", "kontext": "black-forest-labs/FLUX.1-Kontext-dev"}


class ModelCard(L.Callback):
    """Write a model card (`<output_dir>/README.md`, Hugging Face front matter) after the last LoRA file.

    Register it after the LoRA saver and the sampler so their end-of-training files exist when it runs; the
    grid linked is the newest `sample/*_grid.png`.

    Args:
        output_dir: the run's output folder.
        name: the run name (LoRA file stem).
        base_model: where the base model came from (`model.path`), or None for the embedded tiny model.
        trigger_word: the caption token the LoRA was trained on ('' if none).
        settings: the training settings to list (rank, alpha, optimizer, lr, ...); values are shown as given.
        lora_format: kohya | diffusers | both (`output.format`), to name the file(s) to load.

    Example::

        card = ModelCard("outputs/mychar", "mychar", "/models/FLUX.1-dev", "mychar", {"rank": 16, "lr": 4e-4})
    """

    def __init__(self, output_dir: str, name: str, base_model: Optional[str] = None, trigger_word: str = "",
                 settings: Optional[dict] = None, lora_format: str = "kohya",
                 model_variant: Optional[str] = None) -> None:
        super().__init__()
        if not name:
            raise ValueError("name must be a non-empty string")
        if settings is not None and not isinstance(settings, dict) and not hasattr(settings, "items"):
            raise ValueError(f"settings must be a mapping, got {type(settings).__name__}")
        self._dir = Path(output_dir)
        self._name = str(name)
        self._base = str(base_model) if base_model else None
        self._trigger = str(trigger_word or "")
        self._settings = dict(settings or {})
        self._format = lora_format
        self._kontext = model_variant == "kontext"  # Kontext's keys are dev's: only the config tells it
        self.written: Path | None = None

    def add_settings(self, **values: Any) -> None:
        """Settings known only when the run is built (the run record: resolution, steps, images, ...)."""
        self._settings.update(values)

    def render(self, variant: str, steps: int, epochs: int) -> str:
        """The card's Markdown for a FLUX.1-`variant` base model after `steps` optimizer steps."""
        base_id = _HUB_IDS.get(variant, _HUB_IDS["dev"])
        where = f" (`{self._base}`)" if self._base else " (the embedded tiny random-weight model)"
        family = {"chroma": "Chroma", "kontext": "FLUX.1-Kontext-dev"}.get(variant, f"FLUX.1-{variant}")
        base = f"{family}{where}"
        lora = f"{self._name}.safetensors"
        lines = ["---"] + ([f"base_model: {base_id}"] if self._base else []) + [
            "library_name: diffusers", "tags: [flux, lora, fluxlora, text-to-image]"]
        lines += [f"instance_prompt: {self._trigger}"] if self._trigger else []
        lines += ["---", "", f"# {self._name}", "", f"A LoRA for {family}, trained with fluxlora.", "",
                  f"- **Base model**: {base}",
                  f"- **Trigger word**: `{self._trigger}`" if self._trigger else "- **Trigger word**: none",
                  f"- **File**: [`{lora}`]({lora}) ({self._describe_format()})",
                  f"- **Trained**: {steps} steps, {epochs} epochs", ""]
        grid = self._last_grid()
        if grid is not None:
            lines += ["## Samples", "", f"![samples at the end of training]({grid.as_posix()})", ""]
        lines += ["## Settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in self._settings.items()]
        pipeline = {"chroma": "ChromaPipeline", "kontext": "FluxKontextPipeline"}.get(variant, "FluxPipeline")
        steps_g = {"dev": (28, 3.5), "chroma": (35, 5.0), "kontext": (28, 2.5)}.get(variant, (4, 0.0))
        image = 'image=load_image("before.png"), ' if variant == "kontext" else ""
        lines += ["", "## How to load", "", "diffusers:", "", "```python", "import torch",
                  f"from diffusers import {pipeline}", "",
                  f'pipe = {pipeline}.from_pretrained("{base_id}", torch_dtype=torch.bfloat16).to("cuda")',
                  '# (or from_pretrained("<your local diffusers folder>", ...))',
                  f'pipe.load_lora_weights(".", weight_name="{lora}")',
                  *(["from diffusers.utils import load_image"] if image else []),
                  f'image = pipe({image}prompt="{self._trigger or "a photo"}", num_inference_steps='
                  f'{steps_g[0]}, guidance_scale={steps_g[1]}).images[0]',
                  "```", "", f"ComfyUI / Forge: copy `{lora}` into `models/loras/` and load it with a LoRA loader "
                  "(model only).", ""]
        return "\n".join(lines)

    def _describe_format(self) -> str:
        if self._format == "diffusers":
            return "diffusers/peft keys"
        extra = f"; diffusers keys in `{self._name}.diffusers.safetensors`" if self._format == "both" else ""
        return "kohya keys: ComfyUI, Forge, sd-scripts and diffusers load it" + extra

    def _last_grid(self) -> Path | None:
        grids = sorted((self._dir / "sample").glob("*_grid.png"), key=lambda p: (p.stat().st_mtime, p.name))
        return grids[-1].relative_to(self._dir) if grids else None

    @override
    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.is_global_zero:
            return
        variant = "dev" if getattr(pl_module, "has_guidance", True) else "schnell"
        if getattr(pl_module, "arch", "flux") == "chroma":
            variant = "chroma"
        elif self._kontext:
            variant = "kontext"
        self._dir.mkdir(parents=True, exist_ok=True)
        path = self._dir / "README.md"
        with in_stage("model_card"):
            atomic_write_text(path, self.render(variant, trainer.global_step, trainer.current_epoch))
        self.written = path
        log.info("model card written to %s", path)
