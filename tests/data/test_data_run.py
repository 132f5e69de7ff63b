"""Whole training runs (tiny model, CPU) on users' data layouts: folders with buckets and repeats, a dataset.toml."""

import json
from pathlib import Path

from helpers.data_fakes import make_folder

from fluxlora.run.train import run


def test_run_on_two_folders_with_buckets_repeats_workers_and_bf16_cache(make_cfg, tmp_path):
    a = make_folder(tmp_path / "a", 3, (96, 64))
    b = make_folder(tmp_path / "b", 2, (64, 128), caption="bee, red, round")
    cfg = make_cfg("data=folder", f"data.path={a}", "data.resolution=128", "data.buckets.min_size=64",
                   "data.num_repeats=2", "data.batch_size=2", "data.num_workers=2", "data.timeout=30",
                   f"+data.subsets=[{{path: {b}, shuffle_caption: true, keep_tokens: 1, caption_dropout_rate: 0.5}}]",
                   "data.caption_variants=3", "trainer.max_epochs=1", "~callbacks.sampler")
    assert run(cfg) is not None
    out = Path(cfg.output.dir)
    manifest = json.loads((out / "cache" / "manifest.json").read_text())
    assert manifest["dtype"] == "bfloat16" and len(manifest["files"]) == 5
    assert {tuple(f["bucket"]) for f in manifest["files"].values()} == {(64, 64), (64, 128)}
    assert (out / "cache" / "empty_caption.npz").is_file()
    steps = [line for line in (out / "logs" / "csv" / "metrics.csv").read_text().splitlines()[1:] if line]
    assert len(steps) >= 3 + 2  # 6 + 4 samples per epoch in batches of 2


def test_run_on_a_fluxgym_dataset_toml(make_cfg, tmp_path):
    folder = make_folder(tmp_path / "imgs", 2, (80, 64))
    toml = tmp_path / "dataset.toml"
    toml.write_text(f"[general]\ncaption_extension = '.txt'\nkeep_tokens = 1\n[[datasets]]\nresolution = 64\n"
                    f"batch_size = 2\n  [[datasets.subsets]]\n  image_dir = '{folder}'\n  class_tokens = 'mychar'\n"
                    f"  num_repeats = 2\n")
    cfg = make_cfg("data=folder", f"data.path={toml}", "data.num_workers=0", "trainer.max_epochs=1",
                   "~callbacks.sampler")
    assert run(cfg) is not None
    manifest = json.loads((Path(cfg.output.dir) / "cache" / "manifest.json").read_text())
    assert [f["bucket"] for f in manifest["files"].values()] == [[64, 64], [64, 64]]
