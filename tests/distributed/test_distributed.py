"""The pieces of a DDP run that need no second process: which rank this is, the strategy, naming a missing rank from
heartbeat files, the child command of a sweep job, the SLURM launcher config."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.conf import ConfigSourceInfo
from omegaconf import OmegaConf, open_dict

from fluxlora.distributed.strategy import BoundedDDPStrategy, DistributedSettings, build_strategy, is_collective_failure, \
    rank_info
from fluxlora.errors import FluxLoraError
from fluxlora.distributed.health import diagnose, heartbeat_path, peers_summary
from fluxlora.distributed.launch import child_command

CPU = torch.device("cpu")
_ENV = ("LOCAL_RANK", "NODE_RANK", "GROUP_RANK", "WORLD_SIZE", "RANK", "TORCHELASTIC_RUN_ID", "SLURM_NTASKS",
        "SLURM_PROCID", "SLURM_LOCALID", "SLURM_NODEID", "SLURM_JOB_NAME", "SLURM_NTASKS_PER_NODE", "LSB_JOBID", "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE")


@pytest.fixture
def clean_env(monkeypatch):
    for key in _ENV:
        monkeypatch.delenv(key, raising=False)
    return monkeypatch


def test_rank_info_follows_lightnings_environments(make_cfg, clean_env):
    one = rank_info(make_cfg(), CPU)
    assert (one.rank, one.world_size, one.launches, one.distributed) == (0, 1, False, False)
    parent = rank_info(make_cfg("trainer.devices=2"), CPU)  # `python -m fluxlora trainer.devices=2`
    assert (parent.rank, parent.world_size, parent.launches, parent.environment) == (0, 2, True, "lightning")
    clean_env.setenv("LOCAL_RANK", "1")
    clean_env.setenv("NODE_RANK", "1")
    child = rank_info(make_cfg("trainer.devices=2", "trainer.num_nodes=2"), CPU)  # started by rank 0 of node 1
    assert (child.rank, child.local_rank, child.world_size, child.launches) == (3, 1, 4, False)
    for key in ("LOCAL_RANK", "NODE_RANK"):
        clean_env.delenv(key)
    for key, value in {"SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_LOCALID": "0", "SLURM_NODEID": "1",
                       "SLURM_NTASKS_PER_NODE": "2", "SLURM_JOB_NAME": "train"}.items():
        clean_env.setenv(key, value)
    slurm = rank_info(make_cfg("trainer.devices=2", "trainer.num_nodes=2"), CPU)
    assert (slurm.rank, slurm.local_rank, slurm.world_size, slurm.environment, slurm.launches) == (
        2, 0, 4, "slurm", False)
    with pytest.raises(FluxLoraError, match="the slurm environment has 4 processes, but trainer.devices=2 x "
                                            "trainer.num_nodes=1 asks for 2"):
        rank_info(make_cfg("trainer.devices=2"), CPU)


def test_strategy_is_bounded_ddp_and_other_launchers_are_refused(make_cfg, clean_env):
    cfg = make_cfg("trainer.devices=2", "distributed.timeout_s=30", "distributed.setup_timeout_s=600")
    info = rank_info(cfg, CPU)
    dist = DistributedSettings(**OmegaConf.to_container(cfg.distributed))
    strategy = build_strategy(cfg, info, dist)
    assert isinstance(strategy, BoundedDDPStrategy)
    assert (strategy.timeout_s, strategy.setup_timeout_s, strategy._timeout.total_seconds()) == (30, 600, 600)
    assert strategy._ddp_kwargs["find_unused_parameters"] is False
    assert build_strategy(make_cfg("trainer.strategy=ddp"), rank_info(make_cfg(), CPU), dist) == "auto"
    with pytest.raises(FluxLoraError, match="trainer.strategy=ddp_spawn with 2 processes is not supported: use "
                                            "trainer.strategy=ddp"):
        build_strategy(make_cfg("trainer.devices=2", "trainer.strategy=ddp_spawn"), info, dist)
    with pytest.raises(ValueError, match="distributed.timeout_s=0"):
        DistributedSettings(timeout_s=0)


def _write_beat(base: Path, rank: int, pid: int, state: str = "running", error: str = "", stage: str = "training_step",
                step: int = 3, age: float = 5.0) -> None:
    record = {"pid": pid, "state": state, "stage": stage, "step": step, "time": time.time() - age,
              "rank": rank, "host": socket.gethostname()}
    if error:
        record["error"] = error
    heartbeat_path(base, rank).write_text(json.dumps(record))


def test_diagnose_names_the_rank_that_caused_a_failed_collective(tmp_path):
    base = tmp_path / "heartbeat.json"
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    alive = os.getpid()
    timeout = "RuntimeError: [gloo/transport/tcp/unbound_buffer.cc:78] Timed out waiting 8000ms for recv operation"
    assert heartbeat_path(base, 0) == base and heartbeat_path(base, 2).name == "heartbeat.rank2.json"

    _write_beat(base, 1, alive, age=10.3)  # alive, no error, not here: stalled
    ranks, text, verdict = diagnose(base, 0, 2, settle_s=0.2)
    assert ranks == (1,) and verdict == "running"
    assert text.startswith(f"rank 1 did not arrive (pid {alive} on host {socket.gethostname()}: last heartbeat 10.")
    assert "s ago in stage 'training_step' at step 3)" in text

    _write_beat(base, 1, gone.pid)  # its process is gone: died, found without waiting
    t0 = time.monotonic()
    assert diagnose(base, 0, 2, settle_s=5)[0:3:2] == ((1,), "dead") and time.monotonic() - t0 < 1

    # four ranks: 1 failed in the same collective (a survivor), 2 failed on its own, 3 never arrived
    _write_beat(base, 1, alive, state="exception", error=timeout)
    _write_beat(base, 2, gone.pid, state="exception", error="FluxLoraError: non-finite loss at step 3")
    _write_beat(base, 3, alive)
    ranks, text, verdict = diagnose(base, 0, 4, settle_s=0.2)
    assert ranks == (2,) and verdict == "failed" and "non-finite loss" in text  # the first cause wins
    _write_beat(base, 2, alive, state="exception", error=timeout)
    ranks, text, _ = diagnose(base, 0, 4, settle_s=0.2)
    assert ranks == (3,) and text.startswith("rank 3 did not arrive")
    heartbeat_path(base, 3).unlink()
    assert diagnose(base, 0, 4, settle_s=0.2)[0] == (3,)  # no file at all: named too
    summary = peers_summary(base, 0, 3)
    assert summary.startswith("rank 1 failed") and "rank 2 failed" in summary


def test_collective_failures_are_told_from_a_ranks_own_errors():
    assert is_collective_failure(RuntimeError("[../gloo/transport/tcp/pair.cc:534] Connection closed by peer"))
    assert is_collective_failure(torch.distributed.DistBackendError("NCCL error: remote process exited"))
    wrapped = ValueError("step failed")
    wrapped.__cause__ = RuntimeError("Timed out waiting 8000ms for recv operation to complete")
    assert is_collective_failure(wrapped)
    assert not is_collective_failure(FluxLoraError("stage 'data loading' made no progress for 60s"))
    assert not is_collective_failure(RuntimeError("CUDA out of memory"))


def test_child_command_reruns_one_sweep_job_not_the_sweep(tmp_path):
    with initialize_config_module(config_module="fluxlora.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["optim.lr=1e-4", "name=mine", "trainer.devices=2"],
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(tmp_path / "sweep" / "1")
        cfg.hydra.runtime.cwd = str(tmp_path)
        cfg.hydra.overrides.hydra = ["hydra.verbose=true", "hydra/launcher=basic", "hydra.sweep.dir=x"]
        cfg.hydra.runtime.config_sources = [
            ConfigSourceInfo(path="fluxlora.conf", schema="pkg", provider="main"),
            ConfigSourceInfo(path=str(tmp_path / "myconf"), schema="file", provider="command-line")]
    HydraConfig.instance().set_config(cfg)
    try:
        cmd, cwd = child_command(1, "mine_1")
    finally:
        HydraConfig.instance().cfg = None
    assert cmd[:3] == [sys.executable, "-m", "fluxlora"] and cwd == str(tmp_path)
    assert cmd[3:] == [f"--config-dir={tmp_path / 'myconf'}", "optim.lr=1e-4", "trainer.devices=2", "hydra.verbose=true", "name=mine_1",
                       f'hydra.run.dir="{tmp_path / "sweep" / "1"}"', "hydra.output_subdir=null",
                       "hydra.job.name=fluxlora_rank1"]
    assert "-m" not in cmd[3:] and "--multirun" not in cmd


def test_slurm_launcher_config_asks_for_one_task_per_gpu():
    """`hydra/launcher=fluxlora_slurm` fills hydra-submitit-launcher's SLURM fields from the trainer settings, as
    Lightning's SLURMEnvironment needs them (SLURM_NTASKS = devices x num_nodes, one task per GPU)."""
    import fluxlora.conf

    own = OmegaConf.load(Path(fluxlora.conf.__file__).parent / "hydra" / "launcher" / "fluxlora_slurm.yaml")
    assert list(own.defaults) == ["submitit_slurm"]
    fields = OmegaConf.to_container(own, resolve=False)
    fields.pop("defaults")
    merged = OmegaConf.create({"trainer": {"devices": 8, "num_nodes": 2}, "hydra": {"launcher": fields}})
    launcher = OmegaConf.to_container(merged.hydra.launcher, resolve=True)
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install hydra-submitit-launcher")
    with initialize_config_module(config_module="fluxlora.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=["hydra/launcher=fluxlora_slurm", "trainer.devices=8",
                                                       "trainer.num_nodes=2"], return_hydra_config=True)
    launcher = OmegaConf.to_container(cfg.hydra.launcher, resolve=True)
    assert launcher["_target_"].endswith("submitit_launcher.SlurmLauncher")
    assert (launcher["nodes"], launcher["tasks_per_node"], launcher["gpus_per_node"]) == (2, 8, 8)


def test_a_firing_watchdog_names_the_other_ranks_and_ends_the_ranks_it_started(tmp_path, monkeypatch):
    import threading

    import fluxlora.heartbeat as wd
    from fluxlora.callbacks import StepHeartbeatWatchdog

    fired = threading.Event()
    monkeypatch.setattr(wd, "_exit", lambda code: fired.set())
    base = tmp_path / "heartbeat.json"
    _write_beat(base, 0, os.getpid(), stage="between_steps", step=4, age=2.0)
    w = StepHeartbeatWatchdog(setup_timeout_s=0.3, poll_s=0.05, gil_backstop_s=None, rank=1,
                              monitor_log=str(tmp_path / "monitor.rank1.log"),
                              heartbeat_file=str(heartbeat_path(base, 1)))
    w.peer_report = lambda: peers_summary(base, 1, 2)
    ended = []
    w.before_exit.append(lambda: ended.append(True))
    w.start("training_step")
    try:
        assert fired.wait(3)
    finally:
        w._killer.cancel()
        w.stop()
    log = (tmp_path / "monitor.rank1.log").read_text()
    assert "in stage 'training_step'" in log and "; other ranks: rank 0 is running (pid" in log
    assert "in stage 'between_steps' at step 4" in log and ended == [True]
    assert json.loads(heartbeat_path(base, 1).read_text())["rank"] == 1
