"""Caching stages its encoders: VAE, then CLIP-L, then T5, each on the device only for its own stage, batches sized
to the memory left; text encoders are released before training and the VAE waits on the host for sampling.

The device is the CPU here, so "on the device" is kept by a fake accountant (the placement the run moves encoders
with): it adds an encoder's bytes when it comes and takes them off when it leaves, and forward hooks check that
every encoder runs only while it is placed."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
import torch

import fluxlora.models.encode as encode_mod
import fluxlora.run.job as job_mod
import fluxlora.run.train as train_mod
from helpers.data_fakes import FakeEncoder, make_folder
from fluxlora.data.cache import CacheItem, LatentCache
from fluxlora.data.images import ImageRecord
from fluxlora.training.module import FluxLoRAModule

GiB = 1 << 30


class Accountant(encode_mod.DevicePlacement):
    """Records every placement and what was on the device each time an encoder ran."""

    log: list[tuple[str, str]] = []
    resident: dict[str, int] = {}
    ran: list[tuple[str, tuple[str, ...]]] = []
    hooked: set[int] = set()

    def on(self, stage, module, device):
        assert not self.resident, f"{stage} came while {sorted(self.resident)} was still on the device"
        self.resident[stage] = sum(p.numel() * p.element_size() for p in module.parameters())
        self.log.append(("on", stage))
        if id(module) not in self.hooked:
            self.hooked.add(id(module))
            runs = module.encoder if stage == "vae" else module  # the VAE runs through vae.encode(), not forward
            runs.register_forward_pre_hook(lambda m, a, stage=stage: self.ran.append((stage, tuple(self.resident))))
        super().on(stage, module, device)

    def off(self, stage, module, keep=True):
        self.resident.pop(stage)
        self.log.append(("off", stage))
        super().off(stage, module, keep)


def test_a_run_stages_its_encoders_one_at_a_time(make_cfg, monkeypatch):
    Accountant.log, Accountant.resident, Accountant.ran, Accountant.hooked = [], {}, [], set()
    monkeypatch.setattr(encode_mod, "DevicePlacement", Accountant)
    captured, at_step = {}, []
    load = job_mod.load_components

    def load_and_watch(*a, **kw):
        comps = load(*a, **kw)
        captured.update(comps=comps, clip=weakref.ref(comps.text_encoder), t5=weakref.ref(comps.text_encoder_2))
        return comps

    monkeypatch.setattr(job_mod, "load_components", load_and_watch)
    step = FluxLoRAModule.training_step

    def watched_step(self, batch, batch_idx):
        if not at_step:
            gc.collect()
            c = captured["comps"]
            at_step.append({"encoders_gone": c.text_encoder is None and c.text_encoder_2 is None,
                            "encoders_freed": captured["clip"]() is None and captured["t5"]() is None,
                            "vae_devices": {p.device.type for p in c.vae.parameters()},
                            "resident": dict(Accountant.resident)})
        return step(self, batch, batch_idx)

    monkeypatch.setattr(FluxLoRAModule, "training_step", watched_step)
    train_mod.run(make_cfg("trainer.max_steps=1"))  # the sampler renders once at the end
    assert at_step == [{"encoders_gone": True, "encoders_freed": True, "vae_devices": {"cpu"}, "resident": {}}]
    # the dataset: latents, then CLIP-L, then T5; the sample prompts ride along with the captions (no second trip)
    stages = [s for what, s in Accountant.log if what == "on"]
    assert stages == ["vae", "clip", "t5"], Accountant.log
    assert Accountant.log == [(w, s) for s in stages for w in ("on", "off")]  # each leaves before the next comes
    assert Accountant.ran and all(resident == (stage,) for stage, resident in Accountant.ran), Accountant.ran
    assert {stage for stage, _ in Accountant.ran} == {"vae", "clip", "t5"}


def test_a_resumed_run_brings_no_encoder_to_the_device(make_cfg, monkeypatch, caplog):
    """The images' files and the sample prompts' encodings are in the cache folder: continuing the run reads them
    all, so neither the VAE nor CLIP-L nor T5 comes to the device (T5's trip took 11-15 s on the H200)."""
    Accountant.log, Accountant.resident, Accountant.ran, Accountant.hooked = [], {}, [], set()
    monkeypatch.setattr(encode_mod, "DevicePlacement", Accountant)
    train_mod.run(make_cfg("trainer.max_steps=1"))
    assert [s for w, s in Accountant.log if w == "on"] == ["vae", "clip", "t5"]
    Accountant.log = []
    with caplog.at_level("INFO"):
        train_mod.run(make_cfg("trainer.max_steps=2"))
    assert "resum" in caplog.text.lower() and "samples at step 2" in caplog.text, caplog.text[-2000:]
    assert Accountant.log == []


def test_kept_captions_ride_along_and_need_no_stage_later():
    from fluxlora.models import load_components
    from omegaconf import OmegaConf

    comps = load_components(OmegaConf.create({"source": "tiny", "t5_max_length": 16}))
    Accountant.log, Accountant.resident, Accountant.ran, Accountant.hooked = [], {}, [], set()
    enc = encode_mod.StagedEncoders(comps, torch.device("cpu"), 16, placement=Accountant(), keep=["a red circle"])
    first = enc.texts(["a blue square", "a green dot"])
    assert first["t5"].shape[0] == 2 and [s for w, s in Accountant.log if w == "on"] == ["clip", "t5"]
    kept = enc.texts(["a red circle"])  # encoded with the first call: no encoder comes to the device again
    assert len(Accountant.log) == 4
    alone = encode_mod.encode_prompts(comps, ["a red circle"], torch.device("cpu"), 16)
    torch.testing.assert_close(kept["t5"], alone["t5"])
    torch.testing.assert_close(kept["pooled"], alone["pooled"])


def test_an_encoder_read_from_a_file_is_dropped_after_its_stage_and_read_again_when_needed():
    """Copying a 16-bit T5 back to the host took 6.2 s of its stage on the H200, and nothing ran it again: an encoder
    that has a loader is dropped instead (its device memory freed), and a later stage reads it anew."""
    import copy
    from fluxlora.models import load_components
    from omegaconf import OmegaConf

    comps = load_components(OmegaConf.create({"source": "tiny", "t5_max_length": 16}))
    built, reads = {"text_encoder": comps.text_encoder, "text_encoder_2": comps.text_encoder_2}, []

    def loader(part):
        def read():
            reads.append(part)
            return copy.deepcopy(built[part])
        return read

    comps.text_encoder = comps.text_encoder_2 = None
    comps.encoder_loaders = {part: loader(part) for part in built}
    Accountant.log, Accountant.resident, Accountant.ran, Accountant.hooked = [], {}, [], set()
    kept = []

    class Keeps(Accountant):
        def off(self, stage, module, keep=True):
            kept.append((stage, keep))
            super().off(stage, module, keep)

    enc = encode_mod.StagedEncoders(comps, torch.device("cpu"), 16, placement=Keeps())
    first = enc.texts(["a blue square"])
    assert reads == ["text_encoder", "text_encoder_2"] and kept == [("clip", False), ("t5", False)]
    assert comps.text_encoder is None and comps.text_encoder_2 is None  # dropped: nothing holds them
    second = enc.texts(["a green dot"])  # one more stage: each encoder read again from its "file"
    assert reads == ["text_encoder", "text_encoder_2"] * 2
    for text, got in (("a blue square", first), ("a green dot", second)):
        want = encode_mod.encode_prompts(comps, [text], torch.device("cpu"), 16)
        torch.testing.assert_close(got["t5"], want["t5"])
        torch.testing.assert_close(got["pooled"], want["pooled"])


def test_an_encoder_dropped_off_the_device_has_its_memory_freed_without_a_copy():
    """`keep=False` frees the device tensors in place ("meta" stands in for the GPU: its tensors cannot be copied
    to the host at all, so a copy would raise)."""
    module = torch.nn.Linear(8, 8, device="meta")
    encode_mod.DevicePlacement().off("t5", module, keep=False)
    assert {(p.device.type, p.numel()) for p in module.parameters()} == {("cpu", 0)}
    with pytest.raises(NotImplementedError):
        encode_mod.DevicePlacement().off("vae", torch.nn.Linear(8, 8, device="meta"))  # kept: copied back


def test_a_stage_logs_where_its_time_went(caplog):
    """Each stage's line splits its time: reading the encoder, moving it on, the work, moving it off."""
    import re
    import time
    from fluxlora.models import load_components
    from omegaconf import OmegaConf

    class Slow(encode_mod.DevicePlacement):
        def on(self, stage, module, device):
            time.sleep(0.3)

        def off(self, stage, module, keep=True):
            time.sleep(0.6)

    comps = load_components(OmegaConf.create({"source": "tiny", "t5_max_length": 16}))
    enc = encode_mod.StagedEncoders(comps, torch.device("cpu"), 16, placement=Slow())
    with caplog.at_level("INFO", logger=encode_mod.log.name):
        with enc.stage("t5"):
            time.sleep(0.2)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("caching stage T5")]
    assert len(line) == 1, caplog.text
    m = re.fullmatch(r"caching stage T5: ([\d.]+)s \(read ([\d.]+)s, to the device ([\d.]+)s, work ([\d.]+)s, "
                     r"off it ([\d.]+)s\)", line[0])
    assert m, line[0]
    total, read, on, work, off = map(float, m.groups())
    assert on == pytest.approx(0.3, abs=0.15) and work == pytest.approx(0.2, abs=0.15), line[0]
    assert off == pytest.approx(0.6, abs=0.15), line[0]
    assert total == pytest.approx(read + on + work + off, abs=0.25), line[0]  # the parts add up (each rounded)


def test_batches_follow_the_memory_left(monkeypatch):
    free = {"bytes": 7 * GiB}
    monkeypatch.setattr(encode_mod, "available_memory", lambda device: free["bytes"])
    enc = encode_mod.StagedEncoders(object(), torch.device("cpu"), 512)
    per_image = encode_mod.VAE_ENCODE_BYTES_PER_PIXEL * 1024 * 1024
    assert enc.batch_size("vae", 1024 * 1024) == (7 * GiB - encode_mod.STAGE_MARGIN) // per_image == 3
    assert enc.batch_size("vae", 512 * 512) == encode_mod.MOST_PER_BATCH["vae"]  # small images: the cap
    free["bytes"] = 1 * GiB  # a tight card: one image at a time, never zero
    assert enc.batch_size("vae", 1024 * 1024) == 1
    assert enc.batch_size("t5") == (GiB - encode_mod.STAGE_MARGIN) // (encode_mod.T5_BYTES_PER_TOKEN * 512) == 2
    free["bytes"] = None  # the CPU: no limit to size from
    assert enc.batch_size("vae", 1024 * 1024) == encode_mod.CPU_BATCH
    assert encode_mod.StagedEncoders(object(), torch.device("cpu"), 512, batch_size=5).batch_size("vae", 99) == 5


class _SizedEncoder(FakeEncoder):
    """A fake that stages, sizes its own batches, and runs out of memory above `fits` images per call."""

    def __init__(self, size: int, fits: int) -> None:
        super().__init__()
        self.size, self.fits, self.stages = size, fits, []

    def batch_size(self, stage, pixels=0):
        return self.size

    def stage(self, name):
        import contextlib

        self.stages.append(name)
        return contextlib.nullcontext()

    def images(self, images):
        if len(images) > self.fits:
            raise torch.OutOfMemoryError("CUDA out of memory (fake)")
        return super().images(images)


def _items(folder, n: int) -> list[CacheItem]:
    make_folder(folder, count=n, size=(64, 64))
    return [CacheItem(ImageRecord(p, p.with_suffix(".txt").read_text(), 64, 64, 0), (64, 64),
                      (p.with_suffix(".txt").read_text(),)) for p in sorted(folder.glob("*.png"))]


def test_cache_takes_the_encoders_batch_size_and_halves_it_when_memory_runs_out(tmp_path):
    items = _items(tmp_path / "img", 7)
    enc = _SizedEncoder(size=3, fits=99)
    LatentCache(tmp_path / "c1", "enc").build(items, enc, batch_size=None)
    assert [c[0] for c in enc.image_calls] == [3, 3, 1] and enc.stages == ["vae"]
    tight = _SizedEncoder(size=8, fits=2)  # 8 asked, only 2 fit: 8 -> 4 -> 2, and every file is written
    entries = LatentCache(tmp_path / "c2", "enc").build(items, tight, batch_size=None)
    assert [c[0] for c in tight.image_calls] == [2, 2, 2, 1]
    assert all(e.file.exists() for e in entries)
    with pytest.raises(torch.OutOfMemoryError):  # one image that does not fit: the error stands (named upstream)
        LatentCache(tmp_path / "c3", "enc").build(items, _SizedEncoder(size=2, fits=0), batch_size=None)


def test_vae_decode_is_tiled_where_a_full_one_does_not_fit(monkeypatch):
    from diffusers import AutoencoderKL

    from fluxlora.models import tiny

    vae = AutoencoderKL(**tiny.VAE)
    free = {"bytes": 64 * GiB}
    monkeypatch.setattr(encode_mod, "available_memory", lambda device: free["bytes"])
    assert encode_mod.fit_vae_decode(vae, 1024, 1024, torch.device("cuda")) is None and not vae.use_tiling
    free["bytes"] = int(1.5 * GiB)  # a 1024 px decode needs 2.4 GiB: tiles of 512 px (0.6 GiB) fit
    assert encode_mod.fit_vae_decode(vae, 1024, 1024, torch.device("cuda")) == 512
    assert vae.use_tiling and vae.tile_sample_min_size == 512 and vae.tile_latent_min_size == 64
    free["bytes"] = None  # the CPU
    assert encode_mod.fit_vae_decode(vae, 1024, 1024, torch.device("cpu")) is None and not vae.use_tiling


def test_sampling_mode_reads_the_process_limit_not_the_cards_free_memory(monkeypatch):
    """20gb/24gb on a large card: the card had 123 GiB free, the budget leaves a few; a copy must not be made."""
    from fluxlora.callbacks import sampler as sampler_mod
    from fluxlora.callbacks.sampler import TimedSampler
    from fluxlora.perf.state import PerfState

    sampler = TimedSampler("out", "x", prompts=["a --w 1024 --h 1024"], mode="auto")

    class _Module:
        perf = PerfState()
        device = torch.device("cuda", 0)
        compute_dtype = torch.bfloat16
        transformer = torch.nn.Linear(1024, 1024)

    class _Renderer:
        c = type("C", (), {"vae": torch.nn.Linear(8, 8)})()

    sampler._renderer = _Renderer()
    need = 1024 * 1024 * 2 + 1024 * 2 + 8 * 8 * 2 + 8 * 2 + 1024 * 1024 * encode_mod.VAE_DECODE_BYTES_PER_PIXEL
    monkeypatch.setattr(sampler_mod, "available_memory", lambda d: need + sampler._margin - 1)
    sampler._resolve_mode(_Module())
    assert sampler.mode == "between_steps"
    sampler.mode = None
    monkeypatch.setattr(sampler_mod, "available_memory", lambda d: need + sampler._margin)
    monkeypatch.setattr(_Renderer.c.vae, "to", lambda *a, **k: None)  # no CUDA here to move it to
    sampler._resolve_mode(_Module())
    assert sampler.mode == "thread"


def test_t5_storage_follows_the_file_and_the_budget():
    from fluxlora.models.components import T5_WORKING_BYTES, resolve_t5_storage

    params = 4_762_310_656  # T5-XXL's encoder
    assert resolve_t5_storage("auto", {"F8_E4M3"}, params, 80 * GiB) == "fp8"  # an fp8 file is used as it is
    assert resolve_t5_storage("auto", {"F16"}, params, None) == "full"  # the CPU
    assert resolve_t5_storage("auto", {"F16"}, params, 11 * GiB) == "full"  # 12gb: 8.9 GiB + working memory fit
    assert resolve_t5_storage("auto", {"F16"}, params, 7 * GiB) == "fp8"  # 8gb: they do not
    assert resolve_t5_storage("auto", {"F16"}, params, 2 * params + T5_WORKING_BYTES) == "full"
    assert resolve_t5_storage("full", {"F8_E4M3"}, params, 7 * GiB) == "full"  # asked for: kept as asked


def test_t5_in_fp8_from_a_16_bit_file_and_from_an_fp8_file(tmp_path):
    from helpers.model_layouts import write_t5_file

    from fluxlora.models import tiny
    from fluxlora.models.text_encoders import Fp8StoredLinear, fp8_stored_bytes, load_t5, t5_file_dtypes

    t5 = tiny.build()["text_encoder_2"]
    ids = torch.randint(3, 60, (2, 12))
    full = write_t5_file(tmp_path / "t5xxl_fp16.safetensors", t5, torch.float16)
    ref = load_t5(full)(ids)[0]
    q = load_t5(full, storage="fp8")
    assert isinstance(q.encoder.block[0].layer[1].DenseReluDense.wo, Fp8StoredLinear)
    assert fp8_stored_bytes(q) < 0.6 * fp8_stored_bytes(load_t5(full))
    assert ((q(ids)[0] - ref).norm() / ref.norm()) < 0.1  # per-tensor scaled fp8
    state = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    fp8_state = {k: v.to(torch.float8_e4m3fn) if ".block." in k and v.ndim == 2 and "relative" not in k else v
                 for k, v in state.items()}
    from helpers.model_layouts import save_state

    f8 = save_state(tmp_path / "t5xxl_fp8_e4m3fn.safetensors", fp8_state, t5.config.to_dict())
    assert t5_file_dtypes(f8) == {"F8_E4M3"} and t5_file_dtypes(full) == {"F16"}
    upcast, kept = load_t5(f8), load_t5(f8, storage="fp8")  # an fp8 file used as it is: the same numbers
    torch.testing.assert_close(kept(ids)[0], upcast(ids)[0], rtol=0, atol=0)


def test_a_run_with_t5_in_fp8_trains(make_cfg):
    result = train_mod.run(make_cfg("trainer.max_steps=4", "memory.t5_storage=fp8", "~callbacks.sampler"))
    assert np.isfinite(result)


def test_every_tier_sets_its_budget(make_cfg):
    for tier in (8, 12, 16, 20, 24):
        assert make_cfg(f"+vram={tier}gb").memory.budget_gb == tier
    assert make_cfg().memory.budget_gb is None
