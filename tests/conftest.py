"""Shared fixtures: the Hydra config composed once per test with CPU, tiny sizes and tmp outputs."""

from __future__ import annotations

import os
import tempfile

import pytest
from hydra import compose, initialize_config_module
from omegaconf import DictConfig, open_dict

os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # tests are CPU tests unless marked gpu
# one intra-op thread (set before torch loads; subprocesses inherit it): tiny models gain nothing from more, and on a
# busy 2-core box OpenMP barriers waiting for descheduled threads made in-process runs 6x slower (measured)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# compiled graphs of the tests stay out of the user's cache (speed.compile_cache defaults to ~/.cache/fluxlora/compile;
# a TORCHINDUCTOR_CACHE_DIR set here wins over it, in this process and the runs it starts)
os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), f"fluxlora-tests-inductor-{os.getuid()}"))


def compose_cfg(root, *overrides: str) -> DictConfig:
    """The config with outputs under `root`, CPU, 2 epochs, no progress bar, then `overrides`."""
    with initialize_config_module(config_module="fluxlora.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            f"output.root={root}", "trainer.accelerator=cpu", "trainer.max_epochs=2",
            "callbacks.progress=null", *overrides,
        ])
    with open_dict(cfg):
        cfg.hydra = None  # not a Hydra run: no run folder
    return cfg


@pytest.fixture
def make_cfg(tmp_path):
    """compose(overrides) → a config that writes under tmp_path and runs fast on the CPU."""

    def _make(*overrides: str) -> DictConfig:
        return compose_cfg(tmp_path / "outputs", *overrides)

    return _make


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
