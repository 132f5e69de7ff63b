"""Run the frozen encoders: VAE for image latents, CLIP-L + T5 for captions and prompts. Used by caching and sampling.

Caching runs them in stages (`StagedEncoders`): latents with the VAE alone, then pooled embeddings with CLIP-L alone,
then sequences with T5 alone. Each encoder comes to the device for its own stage and leaves before the next one
comes, so two large encoders never share it (with T5 + CLIP + VAE resident, a 4-image VAE batch at 1024 px did not
fit 11 GiB on the H200), and each batch is sized from the memory the process really has left. A text encoder read
from a file is dropped after its stage rather than copied back, and read again if a later stage needs it.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator, Sequence

import numpy as np
import torch

from fluxlora.perf.cuda_setup import GiB, available_memory
from fluxlora.heartbeat import heartbeat
from fluxlora.models.components import FluxComponents
from fluxlora.perf.release import release_device_tensors

log = logging.getLogger(__name__)

STAGES = ("vae", "clip", "t5")
_PARTS = {"vae": "vae", "clip": "text_encoder", "t5": "text_encoder_2"}
_NAMES = {"vae": "VAE", "clip": "CLIP-L", "t5": "T5"}

# Device memory per item while encoding, beyond the encoder's weights (bf16, Flux's VAE and T5-XXL at full size):
# measured on the H200 with bench/encoder_memory.py (2026-12-01), rounded up. They size the batches of
# `StagedEncoders` and the VAE's decode tiles to the memory left.
VAE_ENCODE_BYTES_PER_PIXEL = 1700
"""Peak of one image through the VAE encoder, per pixel: 1537-1670 measured (1024 x 1024: 1.5 GiB)."""
VAE_DECODE_BYTES_PER_PIXEL = 2560
"""Peak of one latent through the VAE decoder, per output pixel: 2054-2446 measured (1024 x 1024: 2.4 GiB)."""
T5_BYTES_PER_TOKEN = 512 << 10
"""Peak of one caption through T5-XXL, per token: 422-483 KiB measured (512 tokens: 256 MiB)."""
CLIP_BYTES_PER_CAPTION = 4 << 20
"""Peak of one caption through CLIP-L (77 tokens): 1.9 MB measured."""
STAGE_MARGIN = 512 << 20
"""Left free in every stage: the allocator's rounding and fragmentation, and fp8 T5's upcast weight (252 MiB)."""
MOST_PER_BATCH = {"vae": 8, "clip": 64, "t5": 16}
"""Upper bounds on a batch: past them a bigger batch saves nothing measurable."""
CPU_BATCH = 4
"""Batch size where there is no device limit to size from (the CPU)."""


@torch.no_grad()
def clip_pooled(c: FluxComponents, prompts: list[str], device: torch.device) -> torch.Tensor:
    """CLIP-L's pooled embedding of each prompt, as FluxPipeline conditions on it."""
    ids = c.tokenizer(prompts, padding="max_length", max_length=c.tokenizer.model_max_length, truncation=True,
                      return_tensors="pt").input_ids
    return c.encoder("text_encoder")(ids.to(device), output_hidden_states=False).pooler_output


@torch.no_grad()
def t5_sequence(c: FluxComponents, prompts: list[str], device: torch.device,
                max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """T5's sequence for each prompt, and its attention mask (1 for tokens, 0 for padding). Chroma runs T5 with the
    mask (as its pipeline and sd-scripts' --apply_t5_attn_mask do); FLUX.1 without it, as it was trained."""
    tok = c.tokenizer_2(prompts, padding="max_length", max_length=max_length, truncation=True, return_tensors="pt")
    masked = getattr(c, "arch", "flux") == "chroma"
    kw = {"attention_mask": tok.attention_mask.to(device)} if masked else {}
    return c.encoder("text_encoder_2")(tok.input_ids.to(device), output_hidden_states=False, **kw)[0], tok.attention_mask


def uses_clip(c: FluxComponents) -> bool:
    """FLUX.1 conditions on CLIP-L's pooled embedding; Chroma has no CLIP (its `pooled` is an empty (B, 0))."""
    return getattr(c, "arch", "flux") != "chroma"


def no_pooled(n: int) -> torch.Tensor:
    """The `pooled` of `n` captions for a model without CLIP: (n, 0), so cache files keep their one layout."""
    return torch.zeros(n, 0)


def encode_prompts(c: FluxComponents, prompts: list[str], device: torch.device, max_length: int) -> dict:
    """CLIP pooled embedding and T5 sequence for each prompt, with both encoders where they already are."""
    t5, mask = t5_sequence(c, prompts, device, max_length)
    pooled = clip_pooled(c, prompts, device) if uses_clip(c) else no_pooled(len(prompts))
    return {"t5": t5, "pooled": pooled, "t5_mask": mask}


@torch.no_grad()
def encode_images(c: FluxComponents, images: list[np.ndarray], device: torch.device) -> torch.Tensor:
    """Normalised VAE latents ((mean - shift) · scale), the space Flux's transformer works in."""
    x = torch.from_numpy(np.stack(images)).to(device=device, dtype=c.vae.dtype)
    mean = c.vae.encode(x).latent_dist.mean
    shift = c.vae.config.shift_factor or 0.0
    return (mean - shift) * c.vae.config.scaling_factor


def batch_for(per_item: int, available: int | None, most: int) -> int:
    """How many items fit `available` bytes (minus `STAGE_MARGIN`) at `per_item` each: at least 1, at most `most`;
    `CPU_BATCH` where there is no limit to size from."""
    if available is None:
        return min(CPU_BATCH, most)
    return max(1, min(most, (available - STAGE_MARGIN) // max(1, per_item)))


class DevicePlacement:
    """Moves an encoder onto the device for its stage and off it after (tests substitute a recorder)."""

    def on(self, stage: str, module: torch.nn.Module, device: torch.device) -> None:
        module.to(device)

    def off(self, stage: str, module: torch.nn.Module, keep: bool = True) -> None:
        """Back to host memory; `keep=False` (an encoder read again from its file if it is needed): its device
        memory freed without the copy back, which took 6.2 s of a 16-bit T5's stage on the H200."""
        if keep:
            module.to("cpu")
            return
        device_type = next((p.device.type for p in module.parameters()), "cpu")
        if device_type != "cpu":
            release_device_tensors(module, device_type)


class StagedEncoders:
    """What `LatentCache` runs, one encoder at a time: `images()` inside `stage("vae")`; `texts()` runs CLIP-L
    over all its captions, then T5 over all of them, each in its own stage.

    Args:
        c: the model parts; deferred text encoders are read when their stage first begins.
        device: where the encoders run.
        max_length: T5's sequence length.
        batch_size: items per encoder call; None sizes each stage's batches from the memory left
            (`data.cache_batch_size: auto`).
        placement: how encoders move on and off the device.
        keep: captions to encode with the first `texts()` call and remember (the sample prompts: T5 then makes one
            trip to the device, not two; 9.5 s for the second trip of a 16-bit T5 on the H200).

    Example::

        enc = StagedEncoders(comps, device, 512)
        with enc.stage("vae"):
            latents = enc.images(images)
        texts = enc.texts(captions)           # CLIP stage, then T5 stage
    """

    def __init__(self, c: FluxComponents, device: torch.device, max_length: int, batch_size: int | None = None,
                 placement: DevicePlacement | None = None, keep: Sequence[str] = ()) -> None:
        self.c, self.device, self.max_length = c, torch.device(device), int(max_length)
        self.fixed_batch = batch_size
        self.placement = placement or DevicePlacement()
        self.current: str | None = None
        self._keep = list(dict.fromkeys(keep))
        self.kept: dict[str, dict[str, torch.Tensor]] = {}

    @contextlib.contextmanager
    def stage(self, stage: str) -> Iterator[torch.nn.Module]:
        """The encoder of `stage` ('vae' | 'clip' | 't5') on the device for the body of the `with`, then off it."""
        if stage not in STAGES:
            raise ValueError(f"stage {stage!r} is not one of {STAGES}")
        if self.current is not None:
            raise RuntimeError(f"stage {stage!r} began inside stage {self.current!r}: one encoder at a time")
        heartbeat("caching", f"{_NAMES[stage]} to the device")
        t0 = time.monotonic()
        module = self.c.vae if stage == "vae" else self.c.encoder(_PARTS[stage])
        t_read = time.monotonic()
        self.placement.on(stage, module, self.device)
        t_on = time.monotonic()
        self.current = stage
        try:
            yield module
        finally:
            self.current = None
            t_work = time.monotonic()
            # a text encoder read from a file is dropped, not copied back: one more stage would read it again
            self.placement.off(stage, module, keep=not self.c.drop_encoder(_PARTS[stage]))
            peak = ""
            if self.device.type == "cuda":
                peak = f", peak {torch.cuda.max_memory_reserved(self.device) / GiB:.2f} GiB reserved"
                torch.cuda.empty_cache()
            end = time.monotonic()
            # the split says which part of a stage to work on (T5's took 11-15 s of every run's start on the H200)
            log.info("caching stage %s: %.1fs (read %.1fs, to the device %.1fs, work %.1fs, off it %.1fs)%s",
                     _NAMES[stage], end - t0, t_read - t0, t_on - t_read, t_work - t_on, end - t_work, peak)

    def batch_size(self, stage: str, pixels: int = 0) -> int:
        """Items per call in `stage` (images of `pixels` pixels for the VAE), from the memory left right now."""
        if self.fixed_batch is not None:
            return self.fixed_batch
        per_item = {"vae": VAE_ENCODE_BYTES_PER_PIXEL * pixels, "clip": CLIP_BYTES_PER_CAPTION,
                    "t5": T5_BYTES_PER_TOKEN * self.max_length}[stage]
        return batch_for(per_item, available_memory(self.device), MOST_PER_BATCH[stage])

    def images(self, images: list[np.ndarray]) -> torch.Tensor:
        """VAE latents of same-size images; call inside `stage("vae")`."""
        if self.current != "vae":
            raise RuntimeError("StagedEncoders.images() runs inside stage('vae')")
        return encode_images(self.c, images, self.device)

    def texts(self, captions: list[str]) -> dict[str, torch.Tensor]:
        """`pooled` (CLIP-L), `t5` and `t5_mask` (T5) of every caption, on the host: CLIP-L's stage over all of them,
        then T5's, each in batches sized to the memory left. The `keep` captions not yet encoded ride along with the
        first call and are remembered, so a later call for them needs no stage at all."""
        todo = [c for c in dict.fromkeys([*captions, *self._keep]) if c not in self.kept]
        rows: dict[str, dict[str, torch.Tensor]] = {}
        if todo:
            out = self._encode(todo)
            for i, c in enumerate(todo):
                rows[c] = {k: v[i] for k, v in out.items()}
                if c in self._keep:
                    self.kept[c] = {k: v[i].clone() for k, v in out.items()}
        rows.update({c: self.kept[c] for c in captions if c not in rows})
        return {k: torch.stack([rows[c][k] for c in captions]) for k in ("pooled", "t5", "t5_mask")}

    def _encode(self, captions: list[str]) -> dict[str, torch.Tensor]:
        if not uses_clip(self.c):  # Chroma: no CLIP stage at all
            pooled = [no_pooled(len(captions))]
        else:
            with self.stage("clip"):
                size = self.batch_size("clip")
                pooled = [clip_pooled(self.c, captions[s:s + size], self.device).cpu()
                          for s in self._beats(range(0, len(captions), size), "CLIP-L", len(captions))]
        with self.stage("t5"):
            size = self.batch_size("t5")
            outs = [self._t5_on_host(captions[s:s + size])
                    for s in self._beats(range(0, len(captions), size), "T5", len(captions))]
        return {"pooled": torch.cat(pooled), "t5": torch.cat([t for t, _ in outs]),
                "t5_mask": torch.cat([m for _, m in outs])}

    def _t5_on_host(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch through T5, its output moved off the device at once (a chunk's 256 sequences are 1 GiB)."""
        t5, mask = t5_sequence(self.c, captions, self.device, self.max_length)
        return t5.cpu(), mask

    @staticmethod
    def _beats(starts: range, what: str, total: int) -> Iterator[int]:
        for s in starts:
            heartbeat("caching", f"{what} {s}/{total} captions")
            yield s


def fit_vae_decode(vae: torch.nn.Module, width: int, height: int, device: torch.device) -> int | None:
    """Decode in tiles where a full-size decode of `width` x `height` would not fit the memory left on `device`:
    returns the tile side in pixels, or None for a full-size decode. diffusers' own tiles are 1024 px for Flux's
    VAE (its `sample_size`), which would not tile a 1024 px sample at all, so the tile is chosen here."""
    free = available_memory(device)
    need = lambda pixels: VAE_DECODE_BYTES_PER_PIXEL * pixels + STAGE_MARGIN  # noqa: E731
    if free is None or need(width * height) <= free:
        vae.disable_tiling()
        return None
    tile = next((t for t in (768, 512, 384) if need(t * t) <= free), 256)
    vae.enable_tiling()
    vae.tile_sample_min_size, vae.tile_latent_min_size = tile, tile // 8
    return tile
