"""FLUX.1 Kontext's paired datasets: pairing by stem (config key and dataset.toml), its one-line errors, control
latents in the content-keyed cache (an edited control rebuilds its entry), and batches that never mix control sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers.data_fakes import FakeEncoder, make_folder, write_image

from fluxlora.data import FluxDataModule
from fluxlora.data.images import load_image
from fluxlora.errors import FluxLoraError
from fluxlora.models.sampling import load_prompts


def _paired(root: Path, count: int = 4, size=(64, 64), control_size=(64, 64)) -> tuple[Path, Path]:
    images = make_folder(root / "images", count=count, size=size, caption="make it blue")
    controls = root / "controls"
    for i in range(count):
        write_image(controls / f"img_{i:03d}.png", control_size, (10, 20 + 30 * i, 200))
    return images, controls


def _dm(make_cfg, tmp_path, *overrides) -> FluxDataModule:
    cfg = make_cfg("data=folder", "data.num_workers=0", "data.resolution=64", "data.buckets.enabled=false",
                   *overrides)
    return FluxDataModule(cfg.data, cache_dir=tmp_path / "cache")


def _images_encoded(enc: FakeEncoder) -> int:
    return sum(shape[0] for shape in enc.image_calls)


def test_pairs_by_stem_and_caches_control_latents_beside_the_target(make_cfg, tmp_path):
    images, controls = _paired(tmp_path)
    dm = _dm(make_cfg, tmp_path, f"data.path={images}", f"data.control_path={controls}", "data.batch_size=2")
    records = dm.scan()
    assert dm.paired and [r.control.name for r in records] == [r.path.name for r in records]
    assert all(it.control_bucket == it.bucket == (64, 64) for it in dm.items)
    enc = FakeEncoder()
    dm.build_cache(enc, "enc")
    assert _images_encoded(enc) == 8  # 4 targets + 4 controls, in the VAE stage
    batch = next(iter(dm.train_dataloader()))
    assert batch["control"].shape == batch["latents"].shape == (2, 4, 8, 8)
    assert not torch.equal(batch["control"], batch["latents"])  # the control's own pixels, not the target's


def test_a_target_without_a_control_is_one_line_naming_the_file(make_cfg, tmp_path):
    images, controls = _paired(tmp_path)
    (controls / "img_002.png").unlink()
    dm = _dm(make_cfg, tmp_path, f"data.path={images}", f"data.control_path={controls}")
    with pytest.raises(FluxLoraError, match=r"image .*img_002\.png has no control image img_002\.\* in") as e:
        dm.scan()
    assert "\n" not in str(e.value)


def test_a_control_without_a_target_is_one_line_naming_the_file(make_cfg, tmp_path):
    images, controls = _paired(tmp_path)
    write_image(controls / "stray.png")
    dm = _dm(make_cfg, tmp_path, f"data.path={images}", f"data.control_path={controls}")
    with pytest.raises(FluxLoraError, match=r"control image .*stray\.png has no target image stray\.\*"):
        dm.scan()


def test_a_missing_control_folder_is_named(make_cfg, tmp_path):
    images, _ = _paired(tmp_path)
    dm = _dm(make_cfg, tmp_path, f"data.path={images}", f"data.control_path={tmp_path / 'nowhere'}")
    with pytest.raises(FluxLoraError, match=r"control images: dataset folder .*nowhere does not exist"):
        dm.scan()


def test_dataset_toml_control_directory_is_read_relative_to_the_toml(make_cfg, tmp_path):
    _paired(tmp_path)
    toml = tmp_path / "dataset.toml"
    toml.write_text('[general]\nresolution = 64\nbatch_size = 2\n\n[[datasets]]\n\n[[datasets.subsets]]\n'
                    'image_dir = "images"\ncontrol_directory = "controls"\n', encoding="utf-8")
    dm = _dm(make_cfg, tmp_path, f"data.path={toml}")
    records = dm.scan()
    assert dm.paired and all(r.control == tmp_path / "controls" / r.path.name for r in records)


def test_editing_a_control_image_rebuilds_only_its_entry(make_cfg, tmp_path):
    images, controls = _paired(tmp_path)
    overrides = (f"data.path={images}", f"data.control_path={controls}")
    dm = _dm(make_cfg, tmp_path, *overrides)
    dm.build_cache(FakeEncoder(), "enc")
    again = FakeEncoder()
    _dm(make_cfg, tmp_path, *overrides).build_cache(again, "enc")
    assert _images_encoded(again) == 0  # nothing changed: every file reused
    write_image(controls / "img_001.png", (64, 64), (250, 250, 0))  # same size, new content
    rebuilt = FakeEncoder()
    dm2 = _dm(make_cfg, tmp_path, *overrides)
    dm2.build_cache(rebuilt, "enc")
    assert _images_encoded(rebuilt) == 2  # that entry's target and control, nothing else
    sample = dm2.train_dataloader().dataset[1]
    want = rebuilt.images([load_image(controls / "img_001.png", (64, 64))])[0]
    torch.testing.assert_close(sample["control"].float(), want, rtol=0, atol=1e-2)  # stored as bfloat16


def test_keep_batches_only_items_whose_control_sizes_agree(make_cfg, tmp_path):
    images = make_folder(tmp_path / "images", count=6, caption="edit")
    controls = tmp_path / "controls"
    for i in range(6):
        write_image(controls / f"img_{i:03d}.png", (64, 64) if i % 2 else (128, 64))
    dm = _dm(make_cfg, tmp_path, f"data.path={images}", f"data.control_path={controls}", "data.batch_size=3",
             "data.control_resize=keep")
    dm.scan()
    assert {it.control_bucket for it in dm.items} == {(64, 64), (64, 32)}  # 128x64 scaled to about 64x64 px
    dm.build_cache(FakeEncoder(), "enc")
    loader = dm.train_dataloader()
    for batch in loader:
        assert batch["control"].shape[0] == 3 and batch["latents"].shape[-2:] == (8, 8)
    shapes = {tuple(b["control"].shape[-2:]) for b in loader}
    assert shapes == {(8, 8), (4, 8)}


def test_mixed_paired_and_unpaired_subsets_are_refused(make_cfg, tmp_path):
    images, controls = _paired(tmp_path)
    other = make_folder(tmp_path / "other", count=2)
    dm = _dm(make_cfg, tmp_path, f"data.path={images}", f"data.control_path={controls}",
             f"data.subsets=[{{path: {other}}}]")
    with pytest.raises(FluxLoraError, match=r"subset .*other has no control folder but others do"):
        dm.scan()


def test_control_resize_must_be_known(make_cfg, tmp_path):
    images, controls = _paired(tmp_path)
    dm = _dm(make_cfg, tmp_path, f"data.path={images}", "data.control_resize=stretch")
    with pytest.raises(FluxLoraError, match=r"data.control_resize='stretch' is not one of bucket, keep"):
        dm.scan()


# ---- the run refuses a mismatch before any model loads


def test_kontext_without_controls_and_controls_without_kontext_fail_before_loading(make_cfg, tmp_path, monkeypatch):
    from fluxlora.run import job, train

    monkeypatch.setattr(job, "load_components", lambda *a, **k: pytest.fail("a model was loaded"))
    images, controls = _paired(tmp_path)
    with pytest.raises(FluxLoraError, match=r"model=tiny-kontext \(FLUX.1 Kontext\) trains on paired images"):
        train.run(make_cfg("model=tiny-kontext", "data=folder", f"data.path={images}", "~callbacks.sampler"))
    with pytest.raises(FluxLoraError, match=r"only FLUX.1 Kontext uses; model=tiny would ignore them"):
        train.run(make_cfg("data=folder", f"data.path={images}", f"data.control_path={controls}",
                           "~callbacks.sampler"))


# ---- sample prompts: --ci


def test_kontext_prompts_need_ci_and_resolve_it_against_the_prompts_file(tmp_path):
    write_image(tmp_path / "before.png")
    file = tmp_path / "prompts.txt"
    file.write_text("make it blue --ci before.png --d 3\n", encoding="utf-8")
    (p,) = load_prompts([], str(file), {}, kontext=True)
    assert p.control_image == str(tmp_path / "before.png") and p.seed == 3 and p.prompt == "make it blue"
    with pytest.raises(FluxLoraError, match=r"sample.prompts\[0\]: a FLUX.1 Kontext prompt needs its control image"):
        load_prompts(["make it blue --d 3"], None, {}, kontext=True)
    file.write_text("make it blue --ci missing.png\n", encoding="utf-8")
    with pytest.raises(FluxLoraError, match=r"line 1: --ci .*missing\.png does not exist"):
        load_prompts([], str(file), {}, kontext=True)
    with pytest.raises(FluxLoraError, match=r"a control image is for FLUX.1 Kontext"):
        load_prompts([f"a photo --ci {tmp_path / 'before.png'}"], None, {})


def test_a_kontext_prompt_without_ci_fails_when_the_sampler_is_built(make_cfg):
    from fluxlora.run.build import build_callbacks

    cfg = make_cfg("model=tiny-kontext", "sample.prompts=[make the circle red]")
    with pytest.raises(FluxLoraError, match=r"needs its control image: add --ci"):
        build_callbacks(cfg, prebuilt={})


def test_validation_batches_share_the_control_size_too(make_cfg, tmp_path):
    images = make_folder(tmp_path / "images", count=6, caption="edit")
    controls = tmp_path / "controls"
    for i in range(6):
        write_image(controls / f"img_{i:03d}.png", (64, 64) if i % 2 else (128, 64))
    cfg = make_cfg("data=folder", "data.num_workers=0", "data.resolution=64", "data.buckets.enabled=false",
                   f"data.path={images}", f"data.control_path={controls}", "data.control_resize=keep")
    dm = FluxDataModule(cfg.data, cache_dir=tmp_path / "cache", val_split=4)
    dm.scan()
    dm.build_cache(FakeEncoder(), "enc")
    plan = dm.validation_plan(batch_size=4)
    assert sum(len(b) for b in plan) == 4
    for batch in plan:
        assert len({dm.val_entries[i].control_bucket for i in batch}) == 1
        assert dm.validation_batch(batch)["control"].shape[0] == len(batch)
