"""In-process training runs of the embedded default: outputs, checkpoint contents, optimizers, schedules."""

from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from fluxlora.training.optim import SCHEDULES, build_optimizer, build_scheduler
from fluxlora.run.train import run


def test_demo_trains_and_writes_everything(make_cfg):
    cfg = make_cfg("+vram=12gb", "trainer.max_epochs=8")
    last = run(cfg)
    out = Path(cfg.output.dir)
    lora = out / "flux-lora.safetensors"
    assert lora.is_file() and (out / "loss_curve.png").is_file() and (out / "config.yaml").is_file()
    assert list((out / "sample").glob("*_grid.png"))
    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
        meta = f.metadata()
    assert keys and all(k.startswith("lora_unet_single_blocks_") for k in keys)  # 12gb: single blocks only
    assert meta["ss_optimizer"] == "adafactor" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert isinstance(last, float)


def test_checkpoint_holds_lora_weights_not_the_base_model(make_cfg):
    cfg = make_cfg("trainer.max_epochs=1", "callbacks.checkpoint.every_n_steps=1", "~callbacks.sampler")
    run(cfg)
    ckpt = torch.load(Path(cfg.output.dir) / "checkpoints" / "last.ckpt", weights_only=False)
    sd = ckpt["state_dict"]
    assert sd and all(".lora_A." in k or ".lora_B." in k for k in sd)
    assert ckpt["optimizer_states"] and ckpt["lr_schedulers"]


@pytest.mark.parametrize("optim", ["adamw", "adamw8bit", "adafactor"])
def test_each_optimizer_trains(make_cfg, optim):
    cfg = make_cfg(f"optim={optim}", "trainer.max_steps=3", "~callbacks.sampler", "lora.train_blocks=double")
    assert run(cfg) is not None


@pytest.mark.parametrize("name", SCHEDULES)
def test_schedules(name):
    from omegaconf import OmegaConf

    p = torch.nn.Parameter(torch.zeros(2))
    cfg = OmegaConf.create({"name": "adamw", "lr": 1.0, "weight_decay": 0.0, "betas": [0.9, 0.999], "eps": 1e-8,
                            "kwargs": {}, "scheduler": name, "warmup_steps": 2})
    opt = build_optimizer([p], cfg)
    sched = build_scheduler(opt, cfg, total_steps=10)
    lrs = []
    for _ in range(10):
        lrs.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    if name == "constant":
        assert lrs == [1.0] * 10
    else:
        assert lrs[0] == 0.0 and lrs[2] == pytest.approx(1.0)  # warm-up over 2 steps
    if name in ("cosine", "linear"):
        assert lrs[-1] < 0.2


class _PoisonBatch:
    """A callback that turns one batch's latents into NaN, as a corrupt sample or an lr blow-up would."""

    def __init__(self, step: int) -> None:
        import lightning as L

        class _CB(L.Callback):
            def on_train_batch_start(cb, trainer, pl_module, batch, batch_idx):
                if trainer.global_step == step:
                    batch["latents"].fill_(float("nan"))

        self.callback = _CB()


@pytest.mark.parametrize("policy", ["stop", "skip"])
def test_nonfinite_loss_in_a_real_run(make_cfg, policy, monkeypatch):
    from fluxlora.run import job as job_mod
    from fluxlora.errors import FluxLoraError

    real = job_mod.build_callbacks
    monkeypatch.setattr(job_mod, "build_callbacks", lambda *a, **k: {**real(*a, **k), "poison": _PoisonBatch(2).callback})
    cfg = make_cfg("trainer.max_steps=4", "~callbacks.sampler", f"train.nonfinite={policy}")
    if policy == "stop":
        with pytest.raises(FluxLoraError, match=r"non-finite loss at step 2 on batch \[.*img_0"):
            run(cfg)
    else:
        run(cfg)
        lora = Path(cfg.output.dir) / "flux-lora.safetensors"
        with safe_open(str(lora), "pt") as f:
            assert all(torch.isfinite(f.get_tensor(k)).all() for k in f.keys())
