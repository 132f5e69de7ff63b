"""Sample prompts in kohya's format and rendering them with diffusers' FluxPipeline.

Prompt encodings are computed once, while the text encoders are loaded, so sampling needs only the
transformer (with its LoRA) and the VAE.
"""

from __future__ import annotations

import copy
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from fluxlora.errors import FluxLoraError

log = logging.getLogger(__name__)

_FLAG = re.compile(r"\s--([a-z]|ci)\s+")


@dataclass
class SamplePrompt:
    """One line of a kohya sample-prompts file: `prompt --w 512 --h 512 --d 42 --s 20 --g 3.5 --n negative`, and
    for FLUX.1 Kontext `--ci before.png` (musubi-tuner's flag: the control image the edit starts from)."""

    prompt: str
    width: int = 512
    height: int = 512
    seed: int = 42
    steps: int = 20
    guidance: float = 3.5
    negative: str = ""
    control_image: str | None = None
    """`--ci`: the control image (FLUX.1 Kontext), resolved to an absolute path by `load_prompts`."""
    embeds: dict = field(default_factory=dict, repr=False)


def parse_prompt_line(line: str, defaults: dict | None = None) -> SamplePrompt:
    """Parse one kohya prompt line; unknown flags are ignored as sd-scripts does (`--l` CFG scale included)."""
    d = dict(defaults or {})
    parts = _FLAG.split(" " + line.strip())
    sp = SamplePrompt(prompt=parts[0].strip(), **d)
    for flag, value in zip(parts[1::2], parts[2::2]):
        value = value.strip()
        try:
            if flag == "w":
                sp.width = int(value)
            elif flag == "h":
                sp.height = int(value)
            elif flag == "d":
                sp.seed = int(value)
            elif flag == "s":
                sp.steps = int(value)
            elif flag == "g":
                sp.guidance = float(value)
            elif flag == "n":
                sp.negative = value
            elif flag == "ci":
                sp.control_image = value
        except ValueError as e:
            raise FluxLoraError(f"sample prompt {line!r}: --{flag} {value!r} is not a number") from e
    return sp


def load_prompts(lines: list[str] | None, file: str | None, defaults: dict,
                 kontext: bool = False) -> list[SamplePrompt]:
    """Prompts from a kohya prompts file and/or a list; blank lines and `#` comments are skipped.

    `kontext`: every prompt must name its control image with `--ci` (a relative path is read against the prompts
    file's folder, or the working folder for `sample.prompts`); a missing flag or file is a one-line error now,
    before any model loads. Without `kontext` a `--ci` is an error too (FluxPipeline has no control image)."""
    labelled = [(f"sample.prompts[{i}]", x, Path.cwd()) for i, x in enumerate(lines or [])]
    if file:
        path = Path(file).expanduser()
        if not path.is_file():
            raise FluxLoraError(f"sample.prompts_file {path} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise FluxLoraError(f"sample.prompts_file {path} cannot be read: {e}") from None
        labelled += [(f"sample.prompts_file {path} line {i + 1}", x, path.parent)
                     for i, x in enumerate(text.splitlines())]
    prompts = []
    for where, line, base in labelled:
        if line.strip() and not line.lstrip().startswith("#"):
            try:
                prompts.append(_control_checked(parse_prompt_line(line, defaults), base, kontext))
            except FluxLoraError as e:
                raise FluxLoraError(f"{where}: {e}") from None
    return prompts


def _control_checked(sp: SamplePrompt, base: Path, kontext: bool) -> SamplePrompt:
    """`sp` with its `--ci` resolved and checked against the model: Kontext needs one, other models take none."""
    if not kontext:
        if sp.control_image is not None:
            raise FluxLoraError(f"--ci {sp.control_image}: a control image is for FLUX.1 Kontext "
                                "(model=flux-kontext); this model samples from text alone")
        return sp
    if sp.control_image is None:
        raise FluxLoraError("a FLUX.1 Kontext prompt needs its control image: add --ci <image>")
    path = Path(sp.control_image).expanduser()
    path = path if path.is_absolute() else base / path
    if not path.is_file():
        raise FluxLoraError(f"--ci {path} does not exist")
    sp.control_image = str(path)
    return sp


class SampleRenderer:
    """Renders prompts with FluxPipeline from embeddings computed once, before training (the text encoders are gone
    by then).

    Args:
        components: the model parts (VAE, tokenizers, scheduler; the transformer is passed to `render`).
        prompts: what to render.
        encode: captions -> `pooled`, `t5` (and `t5_mask`), e.g. `fluxlora.models.encode.StagedEncoders.texts`.
    """

    def __init__(self, components, prompts: list[SamplePrompt], encode: Callable[[list[str]], dict]) -> None:
        self.c = components
        self.prompts = prompts
        self.chroma = getattr(components, "arch", "flux") == "chroma"
        if prompts:
            enc = encode([p.prompt for p in prompts])
            for i, p in enumerate(prompts):
                p.embeds = {"t5": enc["t5"][i:i + 1].cpu(), "pooled": enc["pooled"][i:i + 1].cpu(),
                            "t5_mask": enc["t5_mask"][i:i + 1].cpu()}
            if self.chroma:  # ChromaPipeline runs classifier-free guidance: each prompt's negative ("" by default)
                neg = encode([p.negative for p in prompts])
                for i, p in enumerate(prompts):
                    p.embeds.update(neg_t5=neg["t5"][i:i + 1].cpu(), neg_t5_mask=neg["t5_mask"][i:i + 1].cpu())

    @torch.no_grad()
    def render(self, prompt: SamplePrompt, device: torch.device, dtype: torch.dtype,
               transformer: torch.nn.Module | None = None, cancel: threading.Event | None = None) -> Image.Image:
        """Render one prompt with `transformer` (default: the components' own); `cancel` stops between steps."""
        from diffusers import FluxPipeline

        from fluxlora.models.encode import fit_vae_decode

        c = self.c
        tile = fit_vae_decode(c.vae, prompt.width, prompt.height, torch.device(device))
        if tile is not None:
            log.info("sampling: the %dx%d sample is decoded in %d px tiles (a full decode would not fit the memory "
                     "left)", prompt.width, prompt.height, tile)
        if self.chroma:
            return self._render_chroma(prompt, device, dtype, transformer, cancel)
        if getattr(c, "kontext", False):
            return self._render_kontext(prompt, device, dtype, transformer, cancel)
        pipe = FluxPipeline(scheduler=copy.deepcopy(c.scheduler), vae=c.vae, text_encoder=None,
                            tokenizer=c.tokenizer, text_encoder_2=None, tokenizer_2=c.tokenizer_2,
                            transformer=transformer if transformer is not None else c.transformer)
        pipe.set_progress_bar_config(disable=True)
        gen = torch.Generator("cpu").manual_seed(prompt.seed)
        align = pipe.vae_scale_factor * 2

        def check_cancel(_pipe, _step, _t, kwargs):
            if cancel is not None and cancel.is_set():
                raise SamplingCancelled("sampling cancelled")
            return kwargs

        out = pipe(
            prompt_embeds=prompt.embeds["t5"].to(device, dtype),
            pooled_prompt_embeds=prompt.embeds["pooled"].to(device, dtype),
            height=max(align, prompt.height // align * align), width=max(align, prompt.width // align * align),
            num_inference_steps=prompt.steps, guidance_scale=prompt.guidance, generator=gen, output_type="pil",
            callback_on_step_end=check_cancel,
        )
        return out.images[0]


    def _render_chroma(self, prompt: SamplePrompt, device: torch.device, dtype: torch.dtype,
                       transformer: torch.nn.Module | None, cancel: threading.Event | None) -> Image.Image:
        """ChromaPipeline from the cached T5 outputs and masks (tokens + the first padding token attended, as the
        pipeline's own encoding gives); `--g` is its CFG scale: above 1 the negative prompt runs beside each step."""
        from diffusers import ChromaPipeline

        from fluxlora.models.chroma import chroma_text_mask

        c = self.c
        pipe = ChromaPipeline(scheduler=copy.deepcopy(c.scheduler), vae=c.vae, text_encoder=None,
                              tokenizer=c.tokenizer_2, transformer=transformer if transformer is not None else c.transformer)
        pipe.set_progress_bar_config(disable=True)
        align = pipe.vae_scale_factor * 2
        e = prompt.embeds

        def check_cancel(_pipe, _step, _t, kwargs):
            if cancel is not None and cancel.is_set():
                raise SamplingCancelled("sampling cancelled")
            return kwargs

        cfg = prompt.guidance > 1
        out = pipe(
            prompt_embeds=e["t5"].to(device, dtype), prompt_attention_mask=chroma_text_mask(e["t5_mask"]).to(device),
            negative_prompt_embeds=e["neg_t5"].to(device, dtype) if cfg else None,
            negative_prompt_attention_mask=chroma_text_mask(e["neg_t5_mask"]).to(device) if cfg else None,
            height=max(align, prompt.height // align * align), width=max(align, prompt.width // align * align),
            num_inference_steps=prompt.steps, guidance_scale=prompt.guidance,
            generator=torch.Generator("cpu").manual_seed(prompt.seed), output_type="pil",
            callback_on_step_end=check_cancel,
        )
        return out.images[0]


    def _render_kontext(self, prompt: SamplePrompt, device: torch.device, dtype: torch.dtype,
                        transformer: torch.nn.Module | None, cancel: threading.Event | None) -> Image.Image:
        """FluxKontextPipeline from the cached prompt encodings and the `--ci` control image, which the VAE encodes
        here (the VAE is on the sampling device for the round). The control is resized and centre-cropped to the
        sample's size, as `data.control_resize: bucket` trains, and the pipeline's own resizing is turned off: it
        would snap to Kontext's ~1 MP resolutions (`_auto_resize`) and rescale the output to `max_area`."""
        from diffusers import FluxKontextPipeline

        from fluxlora.data.images import load_image

        c = self.c
        pipe = FluxKontextPipeline(scheduler=copy.deepcopy(c.scheduler), vae=c.vae, text_encoder=None,
                                   tokenizer=c.tokenizer, text_encoder_2=None, tokenizer_2=c.tokenizer_2,
                                   transformer=transformer if transformer is not None else c.transformer)
        pipe.set_progress_bar_config(disable=True)
        align = pipe.vae_scale_factor * 2
        height, width = max(align, prompt.height // align * align), max(align, prompt.width // align * align)
        pixels = torch.from_numpy(load_image(Path(prompt.control_image), (width, height)))  # [-1, 1]
        control = (pixels[None] + 1) / 2  # the pipeline's image processor takes [0, 1]

        def check_cancel(_pipe, _step, _t, kwargs):
            if cancel is not None and cancel.is_set():
                raise SamplingCancelled("sampling cancelled")
            return kwargs

        out = pipe(
            image=control, prompt_embeds=prompt.embeds["t5"].to(device, dtype),
            pooled_prompt_embeds=prompt.embeds["pooled"].to(device, dtype), height=height, width=width,
            max_area=height * width, _auto_resize=False, num_inference_steps=prompt.steps,
            guidance_scale=prompt.guidance, generator=torch.Generator("cpu").manual_seed(prompt.seed),
            output_type="pil", callback_on_step_end=check_cancel,
        )
        return out.images[0]


class SamplingCancelled(Exception):
    """Raised inside a render when its round was abandoned; ends the sampling thread at the next denoising step."""


def grid(images: list[Image.Image], cols: int | None = None) -> Image.Image:
    """Tile images (of possibly different sizes) left to right, top to bottom."""
    cols = cols or min(4, len(images))
    rows = (len(images) + cols - 1) // cols
    w = max(im.width for im in images)
    h = max(im.height for im in images)
    sheet = Image.new("RGB", (cols * w, rows * h), (0, 0, 0))
    for i, im in enumerate(images):
        sheet.paste(im, ((i % cols) * w, (i // cols) * h))
    return sheet
