"""Starting the other ranks of `python -m fluxlora trainer.devices=N`, and ending them with the run.

Lightning's script launcher re-runs the command line in N-1 child processes when `trainer.fit` starts. fluxlora starts
them earlier, before the model is loaded, so every rank loads, caches its share of the dataset and trains in parallel;
the Trainer then finds LOCAL_RANK set and starts nobody. The child command is built from Hydra's own record of the job
(its overrides, its output folder), so it works for a single run and for each job of a `-m` sweep (Lightning's
default would re-run the whole sweep in every child). An observer thread replaces Lightning's (which SIGKILLs the
main process 5 s after a child fails): it names the rank that died, gives the training thread a moment to fail
through its own collective error, and otherwise ends the group with exit status 75.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Optional

from lightning.fabric.plugins.environments import LightningEnvironment
from lightning.pytorch.strategies.launchers.subprocess_script import _SubprocessScriptLauncher
from typing_extensions import override

from fluxlora.distributed.health import heartbeat_path
from fluxlora.heartbeat import beat_stage, read_beat

log = logging.getLogger(__name__)

ENV_KEYS = ("MASTER_ADDR", "MASTER_PORT", "NODE_RANK", "LOCAL_RANK", "WORLD_SIZE")
_KEEP_HYDRA = ("hydra.job_logging", "hydra/job_logging", "hydra.hydra_logging", "hydra/hydra_logging",
               "hydra.verbose")
_POLL_S = 0.5


def child_command(local_rank: int, name: str) -> tuple[list[str], str]:
    """`python -m fluxlora` for rank `local_rank` of this Hydra job: its overrides (one job of a sweep, never the
    sweep), its run name, and Hydra's output folder of this job; with the job's working directory."""
    from hydra.core.hydra_config import HydraConfig

    if not HydraConfig.initialized():
        from fluxlora.errors import FluxLoraError

        raise FluxLoraError("a multi-process run started from Python has nobody to start its other ranks: run "
                            "`python -m fluxlora trainer.devices=N`, or start the ranks with torchrun or SLURM")
    hc = HydraConfig.get()
    task = [o for o in hc.overrides.task if o.split("=", 1)[0].lstrip("+~") != "name"]
    kept = [o for o in hc.overrides.hydra if o.startswith(_KEEP_HYDRA)]
    config = [f"--config-dir={src.path.split('://', 1)[-1]}" for src in hc.runtime.config_sources
              if src.provider == "command-line"]  # `--config-dir`/`--config-name` are not overrides
    if hc.job.config_name and hc.job.config_name != "config":
        config.append(f"--config-name={hc.job.config_name}")
    cmd = [sys.executable, "-m", "fluxlora", *config, *task, *kept, f"name={name}",
           f'hydra.run.dir="{hc.runtime.output_dir}"', "hydra.output_subdir=null",
           f"hydra.job.name={hc.job.name}_rank{local_rank}"]
    return cmd, hc.runtime.cwd


def exit_text(rc: int) -> str:
    if rc < 0:
        try:
            return f"was killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"was killed by signal {-rc}"
    return f"exited with status {rc}"


class RankLauncher(_SubprocessScriptLauncher):
    """Lightning's script launcher, started by fluxlora before the model is loaded, with an observer that names a
    rank that dies and ends the group.

    Args:
        num_processes: ranks on this machine (this process is local rank 0).
        num_nodes: machines.
        name: the run name the children use (a sweep job's name, e.g. ``flux-lora_1``).
        heartbeat_file: rank 0's heartbeat file; rank R's is beside it (``heartbeat.rankR.json``).
        on_failure: called by the observer with a message when a rank died and the training thread did not fail by
            itself within `grace_s`; it must end this process.
        grace_s: that moment.
    """

    def __init__(self, num_processes: int, num_nodes: int, name: str, heartbeat_file: Optional[str | Path],
                 on_failure: Callable[[str], None], grace_s: float = 5.0) -> None:
        super().__init__(LightningEnvironment(), num_processes, num_nodes)
        self.name = name
        self.heartbeat_file = Path(heartbeat_file) if heartbeat_file else None
        self.on_failure = on_failure
        self.grace_s = float(grace_s)
        self.failure: Optional[str] = None
        self._saved_env = {k: os.environ.get(k) for k in ENV_KEYS}
        self._ending = threading.Event()
        self._observer: Optional[threading.Thread] = None

    def start(self) -> None:
        """Start local ranks 1..N-1 (after this, LOCAL_RANK=0 and MASTER_PORT are set here too) and watch them."""
        self.cluster_environment.validate_settings(num_devices=self.num_processes, num_nodes=self.num_nodes)
        self._call_children_scripts()
        log.info("started ranks %s (pids %s); this process is rank %d", list(range(1, self.num_processes)),
                 [p.pid for p in self.procs], self.cluster_environment.node_rank() * self.num_processes)
        self._observer = threading.Thread(target=self._observe, name="fluxlora-rank-observer", daemon=True)
        self._observer.start()

    @override
    def launch(self, function: Callable, *args, trainer=None, **kwargs):
        return function(*args, **kwargs)  # the ranks were started by start(), before the model was loaded

    @override
    def _call_children_scripts(self) -> None:
        self._check_can_spawn_children()
        env = self.cluster_environment
        os.environ["MASTER_ADDR"] = env.main_address
        os.environ["MASTER_PORT"] = str(env.main_port)
        os.environ["NODE_RANK"] = str(env.node_rank())
        os.environ["LOCAL_RANK"] = str(env.local_rank())
        os.environ["WORLD_SIZE"] = f"{self.num_processes * self.num_nodes}"
        for local_rank in range(1, self.num_processes):
            env_copy = dict(os.environ, LOCAL_RANK=str(local_rank))
            command, cwd = child_command(local_rank, self.name)
            self.procs.append(subprocess.Popen(command, env=env_copy, cwd=cwd))

    def global_rank(self, index: int) -> int:
        return self.cluster_environment.node_rank() * self.num_processes + index + 1

    def _observe(self) -> None:
        while not self._ending.wait(_POLL_S):
            for i, proc in enumerate(self.procs):
                rc = proc.poll()
                if rc is None or rc == 0:
                    continue
                self.failure = self._describe(i, proc, rc)
                log.error("%s", self.failure)
                if not self._ending.wait(self.grace_s):  # the training thread usually fails by itself first
                    self.on_failure(self.failure)
                return

    def _describe(self, index: int, proc: subprocess.Popen, rc: int) -> str:
        rank = self.global_rank(index)
        text = f"rank {rank} (pid {proc.pid}) {exit_text(rc)}"
        if self.heartbeat_file is not None:
            beat = read_beat(heartbeat_path(self.heartbeat_file, rank))
            if beat.get("pid") == proc.pid:
                text += f"; its last heartbeat: {beat_stage(beat)}"
                if beat.get("error"):
                    text += f"; its error: {beat['error']}"
        return text

    def kill_all(self, sig: int = signal.SIGKILL) -> None:
        """End every rank this process started (a stalled one does not react to anything gentler)."""
        self._ending.set()
        for proc in self.procs:
            if proc.poll() is None:
                try:
                    proc.send_signal(sig)
                except ProcessLookupError:
                    pass

    def finish(self, failed: bool, timeout_s: float) -> list[str]:
        """End of the run: wait up to `timeout_s` for the ranks to exit (at once when `failed`), end the rest,
        restore the environment. Returns a line per rank that did not end cleanly."""
        self._ending.set()
        if failed:
            self.kill_all()
        deadline = time.monotonic() + (0.0 if failed else timeout_s)
        problems = []
        for i, proc in enumerate(self.procs):
            try:
                rc = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = proc.wait(timeout=30)
                problems.append(f"rank {self.global_rank(i)} (pid {proc.pid}) did not exit within {timeout_s:g}s "
                                "after training and was killed")
                continue
            if rc != 0 and not failed:
                problems.append(f"rank {self.global_rank(i)} (pid {proc.pid}) {exit_text(rc)}")
        for key, value in self._saved_env.items():  # the next job of a sweep starts its own group
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        return problems
