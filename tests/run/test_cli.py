"""`python -m fluxlora` as a user runs it: the demo, Hydra sweeps, one-line errors for bad input, non-finite loss.

Every CLI test runs the app in a subprocess with `output.root=<tmp_path>` and cwd=tmp_path, so nothing lands in
the repo. Start-up (imports) costs ~10 s a process on the CPU, so the bad-input cases are launched together.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from safetensors import safe_open

from fluxlora.errors import FluxLoraError

TIMEOUT_S = 240
LOSS_LINE = re.compile(r"^loss: mean of first \d+ steps \S+ -> last \d+ steps \S+", re.M)
SAVED_LINE = re.compile(r"^LoRA saved to (.+\.safetensors)$", re.M)
TRANSFORMER_LATENT_CHANNELS = 4  # the tiny transformer's in_channels (16) is 4 latent channels packed 2×2


def cli_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "HYDRA_FULL_ERROR")}
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU tests
    return env


def cli_args(tmp_path: Path, *overrides: str) -> list[str]:
    return [sys.executable, "-m", "fluxlora", *overrides, f"output.root={tmp_path}"]


def run_cli(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(cli_args(tmp_path, *overrides), cwd=tmp_path, env=cli_env(), capture_output=True,
                          text=True, timeout=TIMEOUT_S)


def explain(proc) -> str:
    return f"exit {proc.returncode}\n--- stdout (tail)\n{proc.stdout[-3000:]}\n--- stderr (tail)\n{proc.stderr[-3000:]}"


def lora_keys(path: Path) -> list[str]:
    with safe_open(str(path), "pt") as f:
        return list(f.keys())


# ---------------------------------------------------------------------------------------------------- demo run


@pytest.mark.slow
def test_demo_run_writes_lora_samples_logs_and_loss_summary(tmp_path):
    proc = run_cli(tmp_path, "+vram=12gb", "trainer.max_epochs=2")
    assert proc.returncode == 0, explain(proc)

    saved = SAVED_LINE.findall(proc.stdout)
    assert saved, explain(proc)
    lora = Path(saved[-1])
    out = tmp_path / "flux-lora"
    assert lora == out / "flux-lora.safetensors" and lora.is_file()
    keys = lora_keys(lora)
    assert keys and all(k.startswith("lora_unet_single_blocks_") for k in keys), keys  # 12gb: single blocks
    assert any(k.endswith(".lora_down.weight") for k in keys) and any(k.endswith(".alpha") for k in keys)

    assert (out / "loss_curve.png").is_file()
    assert (out / "config.yaml").is_file()
    assert OmegaConf.load(out / "config.yaml").lora.train_blocks == "single"
    assert list((out / "sample").glob("*_grid.png"))
    metrics = list((out / "logs").glob("**/metrics.csv"))  # logs/metrics.csv (or a logger subfolder)
    assert metrics and "train/loss" in metrics[0].read_text().splitlines()[0]
    assert LOSS_LINE.search(proc.stdout), explain(proc)


# ---------------------------------------------------------------------------------------------------- sweeps


@pytest.mark.slow
def test_sweep_runs_every_job_in_its_own_folder(tmp_path):
    proc = run_cli(tmp_path, "-m", "+vram=12gb,16gb", "optim.lr=1e-4,4e-4", "trainer.max_steps=2")
    assert proc.returncode == 0, explain(proc)

    loras = sorted(tmp_path.glob("flux-lora_*/flux-lora_*.safetensors"))
    assert [p.name for p in loras] == [f"flux-lora_{i}.safetensors" for i in range(4)], explain(proc)
    assert len(set(SAVED_LINE.findall(proc.stdout))) == 4
    combos = set()
    for i in range(4):
        cfg = OmegaConf.load(tmp_path / f"flux-lora_{i}" / "config.yaml")
        combos.add((cfg.lora.train_blocks, float(cfg.optim.lr)))
        keys = lora_keys(tmp_path / f"flux-lora_{i}" / f"flux-lora_{i}.safetensors")
        has_double = any(k.startswith("lora_unet_double_blocks_") for k in keys)
        assert has_double == (cfg.lora.train_blocks == "all")  # 12gb: single blocks; 16gb: all blocks
    assert combos == {(b, lr) for b in ("single", "all") for lr in (1e-4, 4e-4)}


@pytest.mark.slow
def test_sweep_goes_on_after_a_failed_job_and_exits_non_zero(tmp_path):
    # job 0 (rank 0) raises a config error; job 1 must still train and save
    proc = run_cli(tmp_path, "-m", "data.class_token=sks", "lora.rank=0,4", "trainer.max_steps=2")
    assert proc.returncode != 0, explain(proc)
    assert "lora.rank must be >= 1, got 0" in proc.stdout + proc.stderr, explain(proc)
    assert not list((tmp_path / "flux-lora_0").glob("*.safetensors"))
    assert (tmp_path / "flux-lora_1" / "flux-lora_1.safetensors").is_file(), explain(proc)
    assert LOSS_LINE.search(proc.stdout), explain(proc)


# ---------------------------------------------------------------------------------------------------- bad input


def _png(path: Path) -> None:
    from PIL import Image

    Image.new("RGB", (16, 16), (200, 30, 30)).save(path)


def _bad_input_cases(root: Path) -> dict[str, tuple[list[str], str]]:
    """name → (overrides, text the error line must name)."""
    empty = root / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("a caption without an image")
    garbage = root / "garbage"
    garbage.mkdir()
    (garbage / "x.png").write_bytes(b"this is not a png\x00\x01\x02" * 8)
    (garbage / "x.txt").write_text("a photo of sks")
    bad_utf8 = root / "bad_utf8"
    bad_utf8.mkdir()
    _png(bad_utf8 / "y.png")
    (bad_utf8 / "y.txt").write_bytes(b"a photo of \xff\xfe sks")
    folder = ["data=folder", "data.num_workers=0"]
    return {
        "missing_dataset": ([*folder, f"data.path={root / 'no_such_dataset'}"], str(root / "no_such_dataset")),
        "no_images": ([*folder, f"data.path={empty}"], str(empty)),
        "undecodable_image": ([*folder, f"data.path={garbage}"], str(garbage / "x.png")),
        "caption_not_utf8": ([*folder, f"data.path={bad_utf8}"], str(bad_utf8 / "y.txt")),
        "missing_model": (["model=flux-dev", f"model.path={root / 'no_such_model'}"], str(root / "no_such_model")),
    }


@pytest.fixture(scope="module")
def bad_input_runs(tmp_path_factory):
    """Launch every bad-input case at once (each is mostly start-up time), then collect them."""
    root = tmp_path_factory.mktemp("bad_input")
    cases = _bad_input_cases(root)
    running = {}
    for name, (overrides, _) in cases.items():
        cwd = root / f"run_{name}"
        cwd.mkdir()
        out, err = (cwd / "stdout.txt").open("w"), (cwd / "stderr.txt").open("w")
        proc = subprocess.Popen(cli_args(cwd, *overrides), cwd=cwd, env=cli_env(), stdout=out, stderr=err, text=True)
        running[name] = (proc, out, err, cwd)
    results = {}
    try:
        for name, (proc, out, err, cwd) in running.items():
            rc = proc.wait(timeout=TIMEOUT_S)
            out.close()
            err.close()
            results[name] = SimpleNamespace(returncode=rc, stdout=(cwd / "stdout.txt").read_text(),
                                            stderr=(cwd / "stderr.txt").read_text(), expect=cases[name][1], cwd=cwd)
    finally:
        for proc, *_ in running.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


@pytest.mark.slow
@pytest.mark.parametrize("case", ["missing_dataset", "no_images", "undecodable_image", "caption_not_utf8",
                                  "missing_model"])
def test_bad_input_is_a_one_line_error_naming_the_path(bad_input_runs, case):
    res = bad_input_runs[case]
    assert res.returncode not in (0, None), explain(res)
    errors = [line for line in res.stderr.splitlines() if line.startswith("fluxlora: error:")]
    assert len(errors) == 1, explain(res)
    assert res.expect in errors[0], f"{errors[0]!r} does not name {res.expect}"
    assert "Traceback" not in res.stderr, explain(res)  # a user error is one line, not a stack trace
    assert not list(res.cwd.glob("**/*.safetensors"))


@pytest.mark.slow
def test_unknown_config_key_is_hydras_error_naming_the_key(tmp_path):
    proc = run_cli(tmp_path, "optim.lrr=1")
    assert proc.returncode != 0
    assert "lrr" in proc.stderr and "Could not override 'optim.lrr'" in proc.stderr, explain(proc)
    assert not list(tmp_path.glob("**/*.safetensors"))


# ---------------------------------------------------------------------------------------------------- non-finite loss


def _nan_module(nonfinite: str, max_skips: int = 10):
    from diffusers import FluxTransformer2DModel

    from fluxlora.training.flow import FlowConfig
    from fluxlora.lora.inject import LoraSettings
    from fluxlora.models.tiny import TRANSFORMER
    from fluxlora.training.module import FluxLoRAModule

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(**TRANSFORMER)
    optim = OmegaConf.create({"name": "adamw", "lr": 1e-4})
    module = FluxLoRAModule(transformer, LoraSettings(rank=2, alpha=2), FlowConfig(), optim, total_steps=10,
                            nonfinite=nonfinite, max_nonfinite_skips=max_skips)
    module._trainer = SimpleNamespace(global_step=7)  # the step the message must name
    module.log = lambda *args, **kwargs: None  # no logger connector without a real Trainer
    return module


def _batch(nan: bool) -> dict:
    latents = torch.randn(2, TRANSFORMER_LATENT_CHANNELS, 4, 4)
    if nan:
        latents[1, 0, 0, 0] = float("nan")
    return {"latents": latents, "t5": torch.randn(2, 8, 32), "pooled": torch.randn(2, 32),
            "t5_mask": torch.ones(2, 8), "path": ["/data/mychar/a.png", "/data/mychar/b.png"]}


class _CountingOptimizer:
    """Stands in for Lightning's optimizer: counts the steps the module lets through."""

    def __init__(self) -> None:
        self.steps = 0

    def step(self) -> None:
        self.steps += 1


def _train_batch(module, batch: dict, opt: _CountingOptimizer) -> None:
    """One automatic-optimization step as Lightning drives it: optimizer_step runs the closure."""

    def closure():
        loss = module.training_step(batch, 0)
        loss.backward()
        return loss

    module.optimizer_step(0, 0, opt, closure)


def test_nonfinite_loss_stop_names_step_and_files():
    module = _nan_module("stop")
    opt = _CountingOptimizer()
    assert torch.isfinite(module.flow_loss(_batch(nan=False)))  # the NaN comes from the batch, not the model
    _train_batch(module, _batch(nan=False), opt)
    assert opt.steps == 1
    before = {k: v.clone() for k, v in module.state_dict().items()}
    with pytest.raises(FluxLoraError) as info:
        _train_batch(module, _batch(nan=True), opt)
    msg = str(info.value)
    assert "step 7" in msg and "/data/mychar/a.png" in msg and "/data/mychar/b.png" in msg, msg
    assert "\n" not in msg
    assert opt.steps == 1  # the optimizer never saw the NaN gradients
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


def test_nonfinite_loss_skip_counts_then_stops():
    module = _nan_module("skip", max_skips=2)
    opt = _CountingOptimizer()
    _train_batch(module, _batch(nan=True), opt)
    _train_batch(module, _batch(nan=True), opt)
    assert module.nonfinite_skips == 2 and opt.steps == 0
    _train_batch(module, _batch(nan=False), opt)
    assert opt.steps == 1  # a finite step after skipped ones goes through
    with pytest.raises(FluxLoraError, match=r"more than 2 non-finite steps skipped") as info:
        _train_batch(module, _batch(nan=True), opt)
    assert "step 7" in str(info.value) and "/data/mychar/b.png" in str(info.value)
    assert module.nonfinite_skips == 3


def test_a_fused_optimizer_skips_a_nonfinite_step_on_the_device():
    """With a fused AdamW the update is queued before the host reads the flag, and skipped on the device (the
    optimizer's `found_inf`, as under GradScaler): the weights and the step count stay as they were; a finite step
    after it updates them."""
    from fluxlora.lora.inject import lora_parameters

    module = _nan_module("skip")
    opt = torch.optim.AdamW(lora_parameters(module.transformer).values(), lr=1e-2, fused=True)
    _train_batch(module, _batch(nan=False), opt)
    before = {k: v.clone() for k, v in module.state_dict().items()}
    steps = [float(s["step"]) for s in opt.state.values()]
    _train_batch(module, _batch(nan=True), opt)
    assert module.nonfinite_skips == 1 and not hasattr(opt, "found_inf")
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert [float(s["step"]) for s in opt.state.values()] == steps
    opt.zero_grad()
    _train_batch(module, _batch(nan=False), opt)
    assert any(not torch.equal(before[k], v) for k, v in module.state_dict().items())
    assert [float(s["step"]) for s in opt.state.values()] == [s + 1 for s in steps]
    module.nonfinite = "stop"
    with pytest.raises(FluxLoraError, match="non-finite loss at step 7"):
        _train_batch(module, _batch(nan=True), opt)


def test_nonfinite_check_covers_every_accumulated_micro_batch():
    module = _nan_module("stop")
    opt = _CountingOptimizer()
    module.training_step(_batch(nan=True), 0).backward()  # an earlier micro-batch of the same optimizer step
    with pytest.raises(FluxLoraError, match="non-finite"):
        _train_batch(module, _batch(nan=False), opt)
    assert opt.steps == 0


def test_nonfinite_setting_is_validated():
    with pytest.raises(ValueError, match="train.nonfinite"):
        _nan_module("ignore")
