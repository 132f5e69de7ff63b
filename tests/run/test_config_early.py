"""Every configuration mistake ends the run within seconds, before any model file is opened, with one line naming
the key or file: settings groups, optimizer, sample prompts, dataset.toml keys, a data.path that is a file.

The in-process cases time each mistake and replace the model loader with one that fails the test if it is called;
one slow case runs the real CLI for several mistakes at once and checks the single `fluxlora: error:` line (and that
a mistake in the settings is reported before Lightning, peft or transformers are imported).
"""

from __future__ import annotations

import subprocess
import time
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import pytest
from omegaconf import OmegaConf

from helpers.faults import fluxlora_cmd, subprocess_env
from fluxlora.data.settings import DataSettings, parse_dataset_toml
from fluxlora.errors import FluxLoraError
from fluxlora.training.optim import check_optim
from fluxlora.run.train import run

LIMIT_S = 5.0  # in-process, no imports: a check that waits for nothing takes well under a second
TRAINING_STACK = {"lightning", "peft", "transformers"}
"""Packages the settings check runs without: seconds of start-up, loaded only once the settings pass. (diffusers'
schedules may load for it: `check_optim` builds the optimizer and schedule, so that they refuse what they refuse.)"""
SETTINGS_CASES = ("lr_not_a_number", "fp8_matmul_on_auto")
"""CLI cases that end in the settings check (the others end in the dataset scan or a callback, under Lightning)."""


def _dataset(root: Path) -> dict[str, Path]:
    """A folder of two captioned images, a dataset.toml with a misspelt key, prompt files good and bad."""
    from PIL import Image

    img = root / "ds" / "img"
    img.mkdir(parents=True)
    for i in range(2):
        Image.new("RGB", (64, 64), (60 * i, 0, 0)).save(img / f"{i}.png")
        (img / f"{i}.txt").write_text("a photo of sks")
    toml = root / "ds" / "dataset.toml"
    toml.write_text('[general]\n[[datasets]]\nresolution = 64\n[[datasets.subsets]]\nimage_dir = "img"\n'
                    'num_repeat = 10\n')
    bad_prompts = root / "bad_prompts.txt"
    bad_prompts.write_text("# comment\na cat --w abc --h 64\n")
    return {"img": img, "toml": toml, "png": img / "0.png", "bad_prompts": bad_prompts,
            "no_prompts": root / "no_such_prompts.txt", "no_ckpt": root / "no_such.ckpt"}


def _cases(p: dict[str, Path]) -> dict[str, tuple[list[str], str]]:
    """name -> (overrides, the text the one line must hold)."""
    folder = ["data=folder", "data.num_workers=0"]
    return {
        "lr_not_a_number": (["optim.lr=abc"], "optim.lr='abc' is not a number"),
        "scheduler": (["optim.scheduler=cosin"], "optim.scheduler='cosin' is not one of"),
        "optimizer_kwarg": (["+optim.kwargs.betas2=1"], "unexpected keyword argument 'betas2'"),
        "warmup": (["optim.warmup_steps=-2"], "optim.warmup_steps=-2 must be a whole number >= 0"),
        "lora_rank": (["lora.rank=abc"], "lora.rank='abc' must be a whole number"),
        "flow_number": (["flow.guidance_scale=abc"], "flow.guidance_scale='abc' must be a number"),
        "memory_bool": (["memory.gradient_checkpointing=yes"], "memory.gradient_checkpointing='yes' must be true"),
        "max_steps": (["trainer.max_steps=abc"], "trainer.max_steps='abc' must be a whole number"),
        "nonfinite": (["train.nonfinite=ignore"], "train.nonfinite='ignore' is not one of"),
        "prompts_file_missing": ([f"sample.prompts_file={p['no_prompts']}"],
                                 f"sample.prompts_file {p['no_prompts']} does not exist"),
        "prompt_flag": ([f"sample.prompts_file={p['bad_prompts']}"],
                        f"sample.prompts_file {p['bad_prompts']} line 2: sample prompt 'a cat --w abc --h 64': "
                        "--w 'abc' is not a number"),
        "toml_misspelt_key": ([*folder, f"data.path={p['toml']}"],
                              "unknown key 'num_repeat' in [[datasets.subsets]] (did you mean num_repeats?)"),
        "data_path_is_a_file": ([*folder, f"data.path={p['png']}"], f"dataset folder {p['png']} is a file, not a "
                                                                    "folder"),
        "resume_missing": ([f"resume={p['no_ckpt']}"], f"resume={p['no_ckpt']}: no such checkpoint file"),
        "resolution": (["data.resolution=abc"], "data.resolution: resolution = 'abc' is not N or [W, H]"),
        "num_workers": (["data.num_workers=-1"], "data.num_workers=-1 must be a whole number >= 0"),
        "read_timeout": (["data.read_timeout=abc"], "data.read_timeout='abc' must be a number of seconds >= 0"),
        "t5_max_length": (["model.t5_max_length=abc"], "model.t5_max_length='abc' must be a whole number >= 1"),
        "seed": (["seed=abc"], "seed='abc' must be a whole number"),
        "precision": (["trainer.precision=fp7"], "trainer.precision='fp7' is not one of"),
        "budget": (["memory.budget_gb=abc"], "memory.budget_gb='abc' must be a number or null"),
        "t5_storage": (["memory.t5_storage=fp4"], "memory.t5_storage='fp4' is not one of"),
        "paired_swap": (["memory.paired_blocks_to_swap=-1"], "memory.paired_blocks_to_swap must be >= 0 or null"),
        "loha_swap": (["memory.loha_blocks_to_swap=-1"], "memory.loha_blocks_to_swap must be >= 0 or null"),
        "loha_swap_nf4": (["+vram=16gb", "lora.type=loha", "memory.base_storage=nf4", "memory.blocks_to_swap=0"],
                          "memory.loha_blocks_to_swap with memory.base_storage=nf4 is not supported"),
        "blocks_per_graph": (["speed.blocks_per_graph=0"], "speed.blocks_per_graph=0 must be a whole number >= 1"),
        "blocks_per_graph_tier": (["+vram=12gb", "speed.blocks_per_graph=4"],
                                  "speed.blocks_per_graph=4 runs whole groups of blocks in one call"),
        "graph_scope": (["speed.graph_scope=whole"], "speed.graph_scope='whole' is not one of auto, step, blocks"),
        "dynamic_shapes": (["speed.dynamic_shapes=sometimes"],
                           "speed.dynamic_shapes='sometimes' is not one of true, false, auto"),
        "graph_scope_chroma": (["speed.graph_scope=step", "+model.arch=chroma"],
                               "speed.graph_scope=step needs FLUX.1 or Kontext"),
        "cache_batch": (["data.cache_batch_size=0"], "data.cache_batch_size=0 must be a positive integer or auto"),
        # the shipped memory.base_storage=auto keeps the bf16 base on the CPU: fp8 matmuls have no fp8 weights
        "fp8_matmul_on_auto": (["memory.fp8_matmul=true"],
                               "memory.fp8_matmul=true needs fp8 storage; memory.base_storage=auto chose none here"),
    }


@pytest.fixture
def no_model_loading(monkeypatch):
    """The model loader fails the test if a config mistake lets the run get that far."""
    from fluxlora.run import job as job_mod

    calls = []

    def load(*args, **kwargs):
        calls.append(args)
        raise AssertionError("the model loader was called before the configuration was checked")

    monkeypatch.setattr(job_mod, "load_components", load)
    return calls


@pytest.mark.parametrize("case", list(_cases(defaultdict(Path))))  # the names only
def test_config_mistake_ends_before_loading_naming_the_key(tmp_path, make_cfg, no_model_loading, case):
    overrides, expect = _cases(_dataset(tmp_path))[case]
    # a model path that would fail loudly if anything opened it
    cfg = make_cfg("model=flux-dev", f"model.path={tmp_path / 'no_such_model'}", *overrides)
    t0 = time.monotonic()
    with pytest.raises(FluxLoraError) as e:
        run(cfg)
    elapsed = time.monotonic() - t0
    assert expect in str(e.value) and "\n" not in str(e.value)
    assert elapsed < LIMIT_S, f"{case}: {elapsed:.1f}s"
    assert no_model_loading == []
    assert not (Path(cfg.output.dir) / "config.yaml").exists()  # written only when training starts


def test_dataset_toml_misspelling_suggests_the_key_and_unsupported_keys_warn(tmp_path, caplog):
    (tmp_path / "img").mkdir()
    toml = tmp_path / "dataset.toml"
    toml.write_text('[genral]\nflip_aug = true\n[[datasets]]\nbatch_sise = 2\n[[datasets.subsets]]\n'
                    'image_dir = "img"\nclass_token = "sks"\n')
    with pytest.raises(FluxLoraError) as e:
        parse_dataset_toml(toml, DataSettings(subsets=()))
    msg = str(e.value)
    assert "'genral' in the top level (did you mean general?)" in msg
    assert "'batch_sise' in [[datasets]] (did you mean batch_size?)" in msg
    assert "'class_token' in [[datasets.subsets]] (did you mean class_tokens?)" in msg
    toml.write_text('[general]\nflip_aug = true\n[[datasets]]\n[[datasets.subsets]]\nimage_dir = "img"\n'
                    'num_repeats = 3\nis_reg = false\n')
    settings = parse_dataset_toml(toml, DataSettings(subsets=()))
    assert settings.subsets[0].num_repeats == 3
    assert "flip_aug, is_reg not supported by fluxlora and ignored" in caplog.text


def test_every_shipped_optimizer_preset_passes_the_check():
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="fluxlora.conf", version_base="1.3"):
        for name in ("adamw", "adamw8bit", "adafactor"):
            check_optim(compose(config_name="config", overrides=[f"optim={name}"]).optim)
    with pytest.raises(ValueError, match=r"optim.betas\[1\]='x' is not a number"):
        check_optim(OmegaConf.create({"name": "adamw", "lr": 1e-4, "weight_decay": 0.0, "betas": [0.9, "x"],
                                      "eps": 1e-8, "kwargs": {}, "scheduler": "constant", "warmup_steps": 0}))


@pytest.mark.slow
def test_config_mistakes_on_the_cli_are_one_line_within_seconds(tmp_path):
    paths = _dataset(tmp_path)
    cases = {k: v for k, v in _cases(paths).items()
             if k in ("lr_not_a_number", "prompt_flag", "toml_misspelt_key", "data_path_is_a_file",
                      "fp8_matmul_on_auto")}
    running = {}
    for name, (overrides, _) in cases.items():  # together: each is mostly start-up (imports)
        cwd = tmp_path / name
        cwd.mkdir()
        cmd = fluxlora_cmd(cwd, "model=flux-dev", f"model.path={tmp_path / 'no_such_model'}", *overrides)
        cmd[1:1] = ["-X", "importtime"]  # every import, one stderr line each: which packages the check needed
        out = (cwd / "out.txt").open("w")
        running[name] = (subprocess.Popen(cmd, cwd=cwd, env=subprocess_env(), stdout=out, stderr=subprocess.STDOUT),
                         out, time.monotonic())
    results = {}
    try:
        for name, (proc, out, t0) in running.items():
            rc = proc.wait(timeout=240)
            out.close()
            results[name] = SimpleNamespace(rc=rc, s=time.monotonic() - t0,
                                            text=(tmp_path / name / "out.txt").read_text())
    finally:
        for proc, *_ in running.values():
            if proc.poll() is None:
                proc.kill()
    for name, r in results.items():
        lines = [x for x in r.text.splitlines() if not x.startswith("import time:")]
        text = "\n".join(lines)
        errors = [x for x in lines if x.startswith("fluxlora: error:")]
        assert r.rc == 2, f"{name}: {text[-2000:]}"
        assert len(errors) == 1 and cases[name][1] in errors[0], f"{name}: {errors}"
        assert "Traceback" not in text and "loading model" not in text, f"{name}: {text[-2000:]}"
        assert r.s < 90, f"{name} took {r.s:.0f}s"  # start-up of 4 processes sharing 2 cores; the check is ms
        if name in SETTINGS_CASES:
            imported = {x.rsplit("|", 1)[1].strip().split(".")[0] for x in r.text.splitlines()
                        if x.startswith("import time:")}
            assert not imported & TRAINING_STACK, f"{name} imported {sorted(imported & TRAINING_STACK)}"
