"""Datasets users already have: image folders, captions, class tokens, repeats, subsets, kohya/FluxGym dataset.toml,
and the one-line errors for broken input."""

import logging
import time

import numpy as np
import pytest
from helpers.data_fakes import FakeEncoder, assert_cache_intact, make_folder, write_image
from omegaconf import OmegaConf
from PIL import Image

from fluxlora.data import FluxDataModule
from fluxlora.data.captions import caption_variants, compose_caption
from fluxlora.data.images import image_size, load_image, scan_folder
from fluxlora.data.settings import DataSettings, Subset, data_settings, parse_dataset_toml
from fluxlora.errors import FluxLoraError


def _dm(make_cfg, *overrides):
    cfg = make_cfg("data=folder", *overrides)
    return FluxDataModule(cfg.data, cache_dir=cfg.data.cache_dir, seed=1)


def test_captions_class_token_and_uncaptioned_count(tmp_path, caplog):
    folder = make_folder(tmp_path / "ds", 3)
    make_folder(folder, 2, caption=None, start=3)
    (folder / "img_001.txt").write_text("mychar smiling", encoding="utf-8")
    with caplog.at_level(logging.WARNING):
        records = scan_folder(folder, class_token="mychar")
    assert [r.caption for r in records] == ["mychar, a photo 0", "mychar smiling", "mychar, a photo 2", "mychar",
                                            "mychar"]
    assert "2 of 5 images" in caplog.text and "no caption" in caplog.text and "'mychar'" in caplog.text


def test_every_image_mode_and_format_becomes_rgb(tmp_path):
    for mode, ext in [("L", ".png"), ("P", ".png"), ("RGBA", ".png"), ("CMYK", ".jpg"), ("RGB", ".webp"),
                      ("RGB", ".jpeg"), ("LA", ".png"), ("I;16", ".png")]:
        path = write_image(tmp_path / f"x_{mode.replace(';', '')}{ext}", (80, 48), mode=mode)
        arr = load_image(path, (64, 32))
        assert arr.shape == (3, 32, 64) and arr.dtype == np.float32 and -1 <= arr.min() <= arr.max() <= 1, mode


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (80, 40), (255, 0, 0))
    im.paste((0, 0, 255), (0, 0, 20, 40))  # blue on the left
    exif = Image.Exif()
    exif[0x0112] = 6  # stored rotated: viewers turn it 90° clockwise
    im.save(tmp_path / "rot.jpg", exif=exif, quality=95)
    assert image_size(tmp_path / "rot.jpg") == (40, 80)
    arr = load_image(tmp_path / "rot.jpg", (40, 80))
    assert arr.shape == (3, 80, 40)
    top, bottom = arr[:, 5, 20], arr[:, 75, 20]
    assert top[2] > 0.5 and top[0] < 0 and bottom[0] > 0.5  # the blue strip went to the top


def test_keep_tokens_and_shuffled_variants_are_stable():
    sub = Subset(image_dir=".", keep_tokens=1, shuffle_caption=True)
    cap = "mychar, red hat, blue coat, smiling, outdoors"
    variants = caption_variants(cap, sub, 6)
    assert variants[0] == cap and len(variants) == 6 == len(set(variants))
    assert all(v.startswith("mychar, ") and sorted(v.split(", ")) == sorted(cap.split(", ")) for v in variants)
    assert caption_variants(cap, sub, 6) == variants  # from the text alone: same cache across runs
    assert caption_variants("mychar, one", sub, 6) == ("mychar, one",)
    assert caption_variants(cap, Subset(image_dir="."), 6) == (cap,)
    prefixed = Subset(image_dir=".", class_token="tok", caption_prefix="photo of", caption_suffix="!")
    assert compose_caption("a dog", prefixed) == "photo of tok, a dog !"


def test_subsets_repeats_and_dropout_shape_the_epoch(tmp_path, make_cfg):
    a = make_folder(tmp_path / "a", 3, size=(64, 64))
    b = make_folder(tmp_path / "b", 2, size=(128, 64), caption="b photo")
    dm = _dm(make_cfg, f"data.path={a}", "data.num_repeats=2", "data.batch_size=2", "data.buckets.min_size=64",
             f"+data.subsets=[{{path: {b}, num_repeats: 3, class_token: bee, caption_dropout_rate: 0.5}}]")
    records = dm.scan()
    assert len(records) == 5 and dm.samples_per_epoch() == 3 * 2 + 2 * 3
    assert {it.bucket for it in dm.items} == {(64, 64), (128, 64)}
    assert records[3].caption == "bee, b photo 0"
    assert dm.batches_per_epoch() == 3 + 3  # 6 samples per bucket, batches of 2
    dm.build_cache(FakeEncoder(), "fake")
    assert dm._empty_caption_file.is_file()  # dropout needs the empty caption's embedding


FLUXGYM_TOML = """[general]
shuffle_caption = false
caption_extension = '.txt'
keep_tokens = 1

[[datasets]]
resolution = 512
batch_size = 1
keep_tokens = 1

  [[datasets.subsets]]
  image_dir = '{folder}'
  class_tokens = 'mychar'
  num_repeats = 10"""


def test_fluxgym_dataset_toml(tmp_path, make_cfg):
    folder = make_folder(tmp_path / "ds", 2)
    make_folder(folder, 1, caption=None, start=2)
    toml = tmp_path / "dataset.toml"
    toml.write_text(FLUXGYM_TOML.format(folder=folder))
    dm = _dm(make_cfg, f"data.path={toml}", "data.batch_size=4")
    records = dm.scan()
    s = dm.settings
    assert s.batch_size == 1 and s.buckets.resolution == (512, 512) and not s.buckets.enabled  # FluxGym: square crop
    sub = s.subsets[0]
    assert (sub.num_repeats, sub.keep_tokens, sub.class_token, sub.prepend_class_token) == (10, 1, "mychar", False)
    assert [r.caption for r in records] == ["a photo 0", "a photo 1", "mychar"]  # kohya: class token if uncaptioned
    assert {it.bucket for it in dm.items} == {(512, 512)} and dm.batches_per_epoch() == 30


def test_kohya_toml_with_buckets_subsets_and_relative_dirs(tmp_path, caplog):
    make_folder(tmp_path / "one", 1)
    make_folder(tmp_path / "two", 1)
    (tmp_path / "d.toml").write_text("""
[general]
enable_bucket = true
flip_aug = true
[[datasets]]
resolution = [768, 512]
batch_size = 2
min_bucket_reso = 320
max_bucket_reso = 1280
bucket_reso_steps = 64
bucket_no_upscale = true
  [[datasets.subsets]]
  image_dir = 'one'
  num_repeats = 2
  shuffle_caption = true
  keep_tokens = 1
  caption_dropout_rate = 0.1
  [[datasets.subsets]]
  image_dir = 'two'
  caption_prefix = 'photo of'
""")
    with caplog.at_level(logging.WARNING):
        s = parse_dataset_toml(tmp_path / "d.toml", DataSettings(subsets=()))
    assert "flip_aug" in caplog.text and "ignored" in caplog.text
    b = s.buckets
    assert (b.enabled, b.resolution, b.min_size, b.max_size, b.upscale, s.batch_size) == (
        True, (768, 512), 320, 1280, False, 2)
    one, two = s.subsets
    assert one.image_dir == tmp_path / "one" and one.num_repeats == 2 and one.shuffle_caption
    assert one.caption_dropout_rate == 0.1 and two.caption_prefix == "photo of" and two.num_repeats == 1


@pytest.mark.parametrize("text,error", [
    ("[[datasets]]\nbatch_size = 1\n", "has no \\[\\[datasets.subsets\\]\\]"),
    ("[general]\nshuffle_caption = 'yes'\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = 'x'\n", "true or false"),
    ("[[datasets]]\nbatch_size = 1\n[[datasets]]\nbatch_size = 2\n[[datasets.subsets]]\nimage_dir='x'\n",
     "disagree on batch_size"),
    ("this is = not toml [", "does not parse"),
])
def test_bad_dataset_toml_is_one_line_naming_the_file(tmp_path, text, error):
    (tmp_path / "d.toml").write_text(text)
    with pytest.raises(FluxLoraError, match=error) as e:
        parse_dataset_toml(tmp_path / "d.toml", DataSettings(subsets=()))
    assert str(tmp_path / "d.toml") in str(e.value) and "\n" not in str(e.value)


def _undecodable(folder):
    (folder / "img_001.png").write_bytes(b"this is not a png at all")
    return folder / "img_001.png", "does not decode"


def _truncated_body(folder):
    path = folder / "img_002.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path)
    path.write_bytes(path.read_bytes()[:300])  # header intact, pixels cut: fails while caching, not while scanning
    return path, "does not decode"


def _bad_utf8(folder):
    (folder / "img_000.txt").write_bytes(b"a photo of \xff\xfe caf\xe9")
    return folder / "img_000.txt", "is not valid UTF-8 (byte 11)"


def _empty(folder):
    for p in folder.iterdir():
        p.unlink()
    (folder / "notes.txt").write_text("no images here")
    return folder, "holds no images"


def _too_small(folder):
    write_image(folder / "img_003.png", (40, 30))
    return folder / "img_003.png", "40x30 is smaller than one bucket step (64 px)"


def _missing(folder):
    return folder / "nope", "does not exist"


@pytest.mark.parametrize("breakage", [_undecodable, _truncated_body, _bad_utf8, _empty, _missing, _too_small])
def test_broken_input_is_a_one_line_error_naming_the_file(tmp_path, make_cfg, breakage):
    folder = make_folder(tmp_path / "ds", 4)
    bad, text = breakage(folder)
    dm = _dm(make_cfg, f"data.path={bad if breakage is _missing else folder}", "data.buckets.min_size=64")
    t0 = time.monotonic()
    with pytest.raises(FluxLoraError) as e:
        dm.scan()
        dm.build_cache(FakeEncoder(), "fake")
    msg = str(e.value)
    assert str(bad) in msg and text in msg and "\n" not in msg, msg
    assert time.monotonic() - t0 < 5
    if dm.cache_dir.exists():
        assert_cache_intact(dm.cache_dir)


def test_unknown_subset_key_and_missing_path_are_reported(tmp_path):
    cfg = OmegaConf.create({"path": str(tmp_path), "subsets": [{"path": str(tmp_path), "num_repeat": 2}]})
    with pytest.raises(FluxLoraError, match=r"data.subsets\[0\]: unknown key\(s\) \['num_repeat'\]"):
        data_settings(cfg)
    with pytest.raises(FluxLoraError, match="data.path is not set"):
        data_settings(OmegaConf.create({"path": "???"}))
