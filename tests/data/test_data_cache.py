"""The latent/text cache: reuse, content keys, corrupt and stale files rebuilt, atomic writes, ranks, crashes."""

import json
import logging
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers.data_fakes import FakeEncoder, assert_cache_intact, flip_member_bytes, make_folder

from fluxlora.data.cache import CacheItem, LatentCache
from fluxlora.data.cache_format import check_file, read_sample
from fluxlora.data.images import scan_folder
from fluxlora.errors import StageTimeoutError


def _items(folder, captions_per_item=1):
    return [CacheItem(r, (64, 64), tuple(f"{r.caption} v{v}" for v in range(captions_per_item)))
            for r in scan_folder(folder)]


def _build(folder, cache_dir, enc=None, check="full", dtype="float32", **kw):
    enc = enc or FakeEncoder()
    cache = LatentCache(cache_dir, "fake-encoder", dtype=dtype, check=check, read_timeout=2)
    entries = cache.build(_items(folder), enc, batch_size=2, **kw)
    return cache, entries, enc


def test_second_build_reuses_every_file_and_writes_a_manifest(tmp_path):
    folder = make_folder(tmp_path / "ds", 5)
    calls = []
    _, entries, enc = _build(folder, tmp_path / "cache", progress=lambda d, t: calls.append((d, t)))
    assert [c[0] for c in enc.image_calls] == [2, 2, 1] and calls[-1] == (5, 5)
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert len(manifest["files"]) == 5 and all(len(f["key"]) == 64 for f in manifest["files"].values())
    _, again, enc2 = _build(folder, tmp_path / "cache")
    assert enc2.image_calls == [] and [e.file for e in again] == [e.file for e in entries]
    assert len(assert_cache_intact(tmp_path / "cache")) == 5


def test_caption_edited_after_caching_rebuilds_only_that_entry(tmp_path, caplog):
    folder = make_folder(tmp_path / "ds", 4)
    _, entries, _ = _build(folder, tmp_path / "cache")
    before = {e.file: e.file.stat().st_mtime_ns for e in entries}
    (folder / "img_002.txt").write_text("a photo, now with a hat", encoding="utf-8")
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        _, entries, enc = _build(folder, tmp_path / "cache")
    assert time.monotonic() - t0 < 5
    assert enc.captions == ["a photo, now with a hat v0"] and len(enc.image_calls) == 1
    assert len(assert_cache_intact(tmp_path / "cache")) == 4
    assert "img_002" in caplog.text and "stale" in caplog.text
    changed = [e.file.name for e in entries if e.file.stat().st_mtime_ns != before[e.file]]
    assert len(changed) == 1 and changed[0].startswith("img_002")
    assert read_sample(entries[2].file)["t5"].shape == (6, 8)


def _flip_bytes(f: Path):
    flip_member_bytes(f, "t5_0.npy")


def _truncate(f: Path):
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])


def _drop_member(f: Path):
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files if k != "t5_0"}
    np.savez(f, **arrays)


def _wrong_shape(f: Path):
    with np.load(f) as z:
        arrays = {k: z[k] for k in z.files}
    arrays["latents"] = arrays["latents"].reshape(-1)
    np.savez(f, **arrays)


def _fifo(f: Path):
    f.unlink()
    os.mkfifo(f)


@pytest.mark.parametrize("damage,reason", [(_flip_bytes, "Bad CRC-32"), (_truncate, "unreadable"),
                                           (_drop_member, "missing arrays ['t5_0']"),
                                           (_wrong_shape, "wrong shapes"), (_fifo, "not a regular file")])
def test_damaged_cache_file_is_detected_reported_and_rebuilt(tmp_path, caplog, damage, reason):
    folder = make_folder(tmp_path / "ds", 3)
    _, entries, _ = _build(folder, tmp_path / "cache")
    victim = entries[1].file
    good = read_sample(victim)
    damage(victim)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING):
        _, entries, enc = _build(folder, tmp_path / "cache")
    assert time.monotonic() - t0 < 2 + 3  # a FIFO must not block the check (read_timeout 2 s + margin)
    assert f"cache file {victim} is" in caplog.text and reason in caplog.text and "rebuilding it" in caplog.text
    assert len(enc.image_calls) == 1  # only the damaged entry
    assert len(assert_cache_intact(tmp_path / "cache")) == 3
    assert torch.equal(read_sample(victim)["latents"], good["latents"])


def test_quick_check_still_catches_truncation_and_staleness(tmp_path):
    folder = make_folder(tmp_path / "ds", 2)
    cache, entries, _ = _build(folder, tmp_path / "cache", check="quick")
    item = _items(folder)[0]
    key = cache.content_key(item)
    assert check_file(entries[0].file, key, 1, (64, 64), full=False) is None
    assert check_file(entries[0].file, "other", 1, (64, 64), full=False).startswith("stale")
    _truncate(entries[0].file)
    assert check_file(entries[0].file, key, 1, (64, 64), full=False).startswith("unreadable")


def test_bfloat16_storage_round_trips_at_half_the_bytes(tmp_path):
    folder = make_folder(tmp_path / "ds", 1)
    _, e32, _ = _build(folder, tmp_path / "c32")
    _, e16, _ = _build(folder, tmp_path / "c16", dtype="bfloat16")
    a, b = read_sample(e32[0].file), read_sample(e16[0].file)
    assert b["t5"].dtype == torch.bfloat16 and b["t5_mask"].dtype == torch.int64
    assert torch.allclose(a["t5"], b["t5"].float(), atol=2e-2)
    with np.load(e32[0].file) as z32, np.load(e16[0].file) as z16:
        assert z16["t5_0"].nbytes * 2 == z32["t5_0"].nbytes and str(z16["dtype"]) == "bfloat16"


def test_caption_variants_are_cached_and_read_one_at_a_time(tmp_path):
    folder = make_folder(tmp_path / "ds", 2)
    cache = LatentCache(tmp_path / "cache", "fake-encoder")
    entries = cache.build(_items(folder, captions_per_item=3), FakeEncoder(), batch_size=2, empty_caption=True)
    assert entries[0].variants == 3
    v0, v2 = read_sample(entries[0].file, 0), read_sample(entries[0].file, 2)
    assert not torch.equal(v0["t5"], v2["t5"]) and torch.equal(v0["latents"], v2["latents"])
    empty = read_sample(cache.empty_caption_file, latents=False)
    assert set(empty) == {"t5", "pooled", "t5_mask"}


def test_temp_files_of_a_killed_run_are_removed(tmp_path):
    folder = make_folder(tmp_path / "ds", 2)
    cache, entries, _ = _build(folder, tmp_path / "cache")
    stale = tmp_path / "cache" / f".{entries[0].file.name}.abc123.tmp"
    stale.write_bytes(b"half a file")
    _build(folder, tmp_path / "cache")
    assert not stale.exists()


def test_two_ranks_split_the_work_and_agree(tmp_path):
    folder = make_folder(tmp_path / "ds", 5)
    encoders = [FakeEncoder(), FakeEncoder()]
    results, errors = {}, []

    def rank(r):
        try:
            cache = LatentCache(tmp_path / "cache", "fake-encoder", read_timeout=2)
            results[r] = cache.build(_items(folder), encoders[r], batch_size=2, rank=r, world_size=2,
                                     wait_timeout=10)
        except Exception as e:  # surfaced below
            errors.append(e)

    t = threading.Thread(target=rank, args=(1,))
    t.start()
    rank(0)
    t.join(timeout=20)
    assert not errors and not t.is_alive()
    assert [sum(c[0] for c in e.image_calls) for e in encoders] == [3, 2]  # items 0,2,4 and 1,3
    assert [e.file for e in results[0]] == [e.file for e in results[1]]
    manifest = json.loads((tmp_path / "cache" / "manifest.json").read_text())
    assert all(f["key"] for f in manifest["files"].values())
    assert len(assert_cache_intact(tmp_path / "cache")) == 5


def test_a_rank_that_makes_no_progress_ends_the_wait_naming_it(tmp_path):
    folder = make_folder(tmp_path / "ds", 2)
    cache = LatentCache(tmp_path / "cache", "fake-encoder")
    t0 = time.monotonic()
    with pytest.raises(StageTimeoutError, match=r"stage 'cache agreement' made no progress for 1s: rank 1 "):
        cache.build(_items(folder), FakeEncoder(), rank=0, world_size=2, wait_timeout=1)
    assert time.monotonic() - t0 < 1 + 3
    assert_cache_intact(tmp_path / "cache")


_CACHING_SCRIPT = textwrap.dedent("""
    import sys, torch
    from helpers.data_fakes import FakeEncoder
    from fluxlora.data.cache import CacheItem, LatentCache
    from fluxlora.data.images import scan_folder

    class BigTextEncoder(FakeEncoder):  # Flux-sized T5 outputs: each write takes long enough to be interrupted
        def texts(self, captions):
            out = super().texts(captions)
            out["t5"] = out["t5"].repeat(1, 64, 256)[:, :384, :2048]
            out["t5_mask"] = torch.ones(len(captions), 384, dtype=torch.int64)
            return out

    folder, cache_dir = sys.argv[1], sys.argv[2]
    items = [CacheItem(r, (64, 64), (r.caption,)) for r in scan_folder(folder)]
    LatentCache(cache_dir, "fake-encoder").build(items, BigTextEncoder(delay=0.05), batch_size=1)
""")


@pytest.mark.slow
def test_sigkill_during_caching_leaves_no_corrupt_file_and_a_rerun_completes(tmp_path):
    folder = make_folder(tmp_path / "ds", 40)
    cache_dir = tmp_path / "cache"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", _CACHING_SCRIPT, str(folder), str(cache_dir)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline, caught_mid_write = time.monotonic() + 60, False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            written = len(list(cache_dir.glob("*.npz"))) if cache_dir.exists() else 0
            if written >= 3 and list(cache_dir.glob(".*.tmp")):
                caught_mid_write = True
                break
            if written >= 20:
                break
            time.sleep(0.001)
        assert proc.poll() is None, f"caching ended before it could be killed: {proc.stderr.read().decode()[-500:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=10)
    survivors = sorted(cache_dir.glob("*.npz"))
    assert 0 < len(survivors) < 40
    for f in survivors:  # every file a killed run left is complete (atomic rename), even mid-write
        with np.load(f) as z:
            for name in z.files:
                z[name]
    cache = LatentCache(cache_dir, "fake-encoder")
    entries = cache.build([CacheItem(r, (64, 64), (r.caption,)) for r in scan_folder(folder)], FakeEncoder(),
                          batch_size=8)
    assert len(entries) == 40 and len(assert_cache_intact(cache_dir)) == 40
    print(f"killed mid-write: {caught_mid_write}, files before the rerun: {len(survivors)}")


def test_prompt_encodings_are_kept_and_read_back_by_the_next_run(tmp_path, caplog):
    """`LatentCache.texts`: what a run encoded for its sample prompts, the next run (a resume) reads instead of
    bringing the text encoders back; only texts new to the folder are encoded; a new encoder or a damaged file
    re-encodes; values are the stored ones either way, so a run and its resume render alike."""
    prompts = ["a red fox --w 512", "a blue jay", "a red fox --w 512"]  # a duplicate is encoded once
    first_enc = FakeEncoder()
    cache = LatentCache(tmp_path / "cache", "enc-a", dtype="bfloat16")
    (tmp_path / "cache").mkdir()
    first = cache.texts(prompts, first_enc.texts)
    assert first_enc.captions == ["a red fox --w 512", "a blue jay"]
    assert first["t5"].shape == (3, 6, 8) and first["t5"].dtype == torch.bfloat16
    assert torch.equal(first["t5"][0], first["t5"][2])
    assert sorted(p.name.startswith("text-") for p in (tmp_path / "cache").iterdir()) == [True, True]

    again = FakeEncoder()  # a new process: a fresh LatentCache, the same folder and encoder
    second = LatentCache(tmp_path / "cache", "enc-a", dtype="bfloat16").texts(prompts, again.texts)
    assert again.captions == []
    for k in ("t5", "pooled", "t5_mask"):
        assert torch.equal(second[k], first[k]), k

    more = FakeEncoder()  # one new prompt: only it is encoded
    LatentCache(tmp_path / "cache", "enc-a", dtype="bfloat16").texts(["a blue jay", "a green frog"], more.texts)
    assert more.captions == ["a green frog"]

    victim = cache.text_file("a red fox --w 512")
    flip_member_bytes(victim, "t5_0.npy")
    fixed = FakeEncoder()
    with caplog.at_level(logging.WARNING):
        third = LatentCache(tmp_path / "cache", "enc-a", dtype="bfloat16").texts(prompts, fixed.texts)
    assert fixed.captions == ["a red fox --w 512"] and f"cache file {victim} is unreadable" in caplog.text
    assert torch.equal(third["t5"], first["t5"])

    # another encoder (a T5 file or a text-encoder LoRA changed) rewrites the file, as it does an image's
    caplog.clear()
    other = FakeEncoder()
    with caplog.at_level(logging.WARNING):
        LatentCache(tmp_path / "cache", "enc-b", dtype="bfloat16").texts(["a blue jay"], other.texts)
    assert other.captions == ["a blue jay"] and "stale" in caplog.text


def test_a_prompt_file_that_cannot_be_written_is_a_warning(tmp_path, caplog, monkeypatch):
    """The encodings are in hand: a full or read-only cache folder costs the next run's shortcut, not this run."""
    import fluxlora.data.cache as cache_mod

    def full_disk(*a, **kw):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cache_mod, "write_sample", full_disk)
    enc = FakeEncoder()
    cache = LatentCache(tmp_path / "cache", "enc-a")
    (tmp_path / "cache").mkdir()
    with caplog.at_level(logging.WARNING):
        out = cache.texts(["a red fox"], enc.texts)
    assert out["t5"].shape == (1, 6, 8) and enc.captions == ["a red fox"]
    assert "could not keep a prompt's encodings" in caplog.text and "No space left on device" in caplog.text
    assert not any((tmp_path / "cache").iterdir())
