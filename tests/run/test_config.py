"""Tier presets and config composition."""

import pytest
from hydra import compose, initialize_config_module


def _compose(*overrides):
    with initialize_config_module(config_module="fluxlora.conf", version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_is_the_embedded_demo():
    cfg = _compose()
    assert cfg.model.source == "tiny" and cfg.data.source == "synthetic"
    assert "vram" not in cfg  # tiers are added with +vram, never by default


def test_12gb_tier_translates_fluxgym_flags():
    cfg = _compose("+vram=12gb")
    assert cfg.optim.name == "adafactor"
    assert dict(cfg.optim.kwargs) == {"relative_step": False, "scale_parameter": False, "warmup_init": False}
    assert cfg.optim.scheduler == "constant_with_warmup"
    assert cfg.trainer.gradient_clip_val == 0.0
    assert cfg.lora.train_blocks == "single"
    assert cfg.memory.base_storage == "fp8" and cfg.memory.gradient_checkpointing
    assert cfg.lora.rank == 4  # FluxGym's default rank
    assert cfg.memory.blocks_to_swap == 20  # measured on the H100 (README "VRAM tiers"): fits 11 GiB at 1024 px
    assert cfg.speed.compile_blocks == "auto"


@pytest.mark.parametrize("tier,optim,blocks,swap", [("8gb", "adafactor", "single", 34), ("16gb", "adafactor", "all", 4),
                                                    ("20gb", "adamw", "all", 0), ("24gb", "adamw", "all", 0)])
def test_every_tier_composes(tier, optim, blocks, swap):
    cfg = _compose(f"+vram={tier}")
    assert cfg.optim.name == optim and cfg.lora.train_blocks == blocks
    assert cfg.memory.blocks_to_swap == swap  # the counts measured to fit (README "VRAM tiers")


def test_command_line_wins_over_tier():
    cfg = _compose("+vram=12gb", "optim.lr=3e-4", "lora.train_blocks=all")
    assert cfg.optim.lr == 3e-4 and cfg.lora.train_blocks == "all" and cfg.optim.name == "adafactor"


def test_tier_wins_over_main_config():
    assert _compose().trainer.gradient_clip_val == 1.0
    assert _compose("+vram=16gb").trainer.gradient_clip_val == 0.0


def test_callbacks_are_named_nodes():
    cfg = _compose("~callbacks.sampler")
    assert "sampler" not in cfg.callbacks and "lora_saver" in cfg.callbacks
