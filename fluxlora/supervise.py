"""`python -m fluxlora.supervise [options] <hydra overrides>`: run training as a child and restart it when it hangs.

A frozen process cannot save itself or even run its own watchdog (SIGSTOP, a dead NFS mount in uninterruptible
sleep, a C call holding the GIL). The supervisor is a small parent process (no torch import) that starts
`python -m fluxlora <overrides>`, reads the heartbeat file the child's StepHeartbeatWatchdog keeps, kills the child's
process group when the last heartbeat is older than the child's own limit plus a grace period, and restarts it with
`resume=auto`, at most `--max-restarts` times. It also restarts a child that the watchdog ended (exit 75), one that
died from a signal it did not send, and one that faulthandler's GIL backstop ended. A child that exits 0 ends the
supervisor with 0; any other status that is not a hang (a config error, SIGTERM/SIGINT forwarded to it) is passed
through without a restart. Every start, stall, kill, restart and exit goes to `outputs/<name>/monitor.log`.

With `trainer.devices=N` the child is rank 0, which starts the other ranks in its own process group: a stale child is
killed with all of them, a rank that stalls or dies ends the group with exit 75 (the message names it), and after the
child has exited whatever is left of its group is killed before the restart starts a new group.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from fluxlora.heartbeat import WATCHDOG_EXIT_CODE, beat_age, beat_stage, beat_where, read_beat

_REFUSED = ("-m", "--multirun", "--cfg", "-c", "--help", "-h", "--info", "--run", "-r")


@dataclass
class Watch:
    """What the supervisor needs to know about the run, read from the composed config."""

    heartbeat: Path
    monitor_log: Path
    setup_timeout_s: float
    watchdog_exit_code: int


def read_watch(overrides: list[str]) -> Watch:
    """Compose the run's config (as `python -m fluxlora` would) to find its heartbeat file and limits."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="fluxlora.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    node = (cfg.get("callbacks") or {}).get("watchdog")
    if node is None or not node.get("heartbeat_file"):
        raise SystemExit("fluxlora.supervise: error: the run needs callbacks.watchdog with a heartbeat_file")
    out = Path(str(cfg.output.dir))
    return Watch(Path(str(node.heartbeat_file)), Path(str(node.get("monitor_log") or out / "monitor.log")),
                 float(node.setup_timeout_s), int(node.get("exit_code", WATCHDOG_EXIT_CODE)))


class Supervisor:
    """Runs, watches and restarts one training run.

    Args:
        overrides: Hydra overrides for `python -m fluxlora`.
        watch: heartbeat file, monitor log and limits of the run.
        max_restarts: restarts allowed after the first start.
        grace_s: extra seconds past the child's own limit before it is called stale.
        poll_s: how often the heartbeat file is read.
        module: the module the child runs (`python -m <module>`).

    Example::

        sys.exit(Supervisor(["+vram=12gb", "name=mychar"], read_watch(["+vram=12gb", "name=mychar"])).run())
    """

    def __init__(self, overrides: list[str], watch: Watch, max_restarts: int = 3, grace_s: float = 30.0,
                 poll_s: float = 1.0, module: str = "fluxlora") -> None:
        if max_restarts < 0 or grace_s < 0 or poll_s <= 0:
            raise ValueError("max_restarts and grace_s must be >= 0, poll_s > 0")
        self._overrides = list(overrides)
        self._watch = watch
        self._max_restarts = max_restarts
        self._grace = grace_s
        self._poll = poll_s
        self._module = module
        self._child: Optional[subprocess.Popen] = None
        self._forwarded: Optional[int] = None
        self.restarts = 0

    def log(self, msg: str) -> None:
        line = f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: {msg}"
        print(line, file=sys.stderr, flush=True)
        self._watch.monitor_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self._watch.monitor_log, "a", encoding="utf-8") as f:
            f.write(line + "\n")

    def command(self) -> list[str]:
        args = self._overrides
        if self.restarts:
            args = [a for a in args if not a.lstrip("+~").startswith("resume=")] + ["resume=auto"]
        return [sys.executable, "-m", self._module, *args]

    def run(self) -> int:
        """Start, watch and restart until a final status; returns it (128+N for a death by signal N)."""
        old = {s: signal.signal(s, self._forward) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            while True:
                rc, cause = self._run_once()
                if rc == 0 or cause is None or self._forwarded is not None:
                    self.log(f"done: exit status {_status(rc)}")
                    return _status(rc)
                if self.restarts >= self._max_restarts:
                    self.log(f"giving up after {self.restarts} restart(s); last cause: {cause}; "
                             f"exit status {_status(rc)}")
                    return _status(rc)
                self.restarts += 1
                self.log(f"restart {self.restarts}/{self._max_restarts} with resume=auto; cause: {cause}")
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def _run_once(self) -> tuple[int, Optional[str]]:
        """One child from start to exit: (exit code, cause to restart or None)."""
        cmd = self.command()
        log_size = self._watch.monitor_log.stat().st_size if self._watch.monitor_log.exists() else 0
        started = time.time()
        self._child = child = subprocess.Popen(cmd, start_new_session=True)  # own group: kill takes its workers
        self.log(f"started child pid {child.pid}: {' '.join(cmd[1:])}")
        while True:
            try:
                rc = child.wait(timeout=self._poll)
                break
            except subprocess.TimeoutExpired:
                pass
            stale = self._stale(child.pid, started)
            if stale:
                self.log(f"child pid {child.pid} is stale: {stale}; killing its process group")
                _kill_group(child)
                rc = child.wait(timeout=60)
                self.log(f"child pid {child.pid} killed (status {_status(rc)})")
                return rc, f"heartbeat stale ({stale})"
        self.log(f"child pid {child.pid} exited with status {_status(rc)}{self._last_stage(child.pid)}")
        _kill_group(child)  # the other ranks of a DDP run it started, should any be left: the restart starts anew
        return rc, self._cause(rc, log_size)

    def _stale(self, pid: int, started: float) -> str:
        """Why the child counts as hung ("" while it is fine)."""
        now = time.time()
        beat = read_beat(self._watch.heartbeat)
        if not beat or beat.get("pid") != pid:
            limit = self._watch.setup_timeout_s + self._grace
            return f"no heartbeat for {now - started:.1f}s after start (limit {limit:g}s)" \
                if now - started > limit else ""
        limit = float(beat["timeout_s"]) + self._grace
        if beat_age(beat, now) > limit:
            return f"{beat_where(beat, now)} (limit {beat['timeout_s']:g}s + {self._grace:g}s grace)"
        return ""

    def _last_stage(self, pid: int) -> str:
        beat = read_beat(self._watch.heartbeat)
        if beat.get("pid") != pid:
            return ""
        return f"; last heartbeat: {beat_stage(beat)} ({beat.get('state')})"

    def _cause(self, rc: int, log_size: int) -> Optional[str]:
        if self._forwarded is not None:
            return None
        if rc == self._watch.watchdog_exit_code:
            error = read_beat(self._watch.heartbeat).get("error", "")
            if error:  # a stage of another rank stalled or a rank died (DDP); the child named it
                return f"the child ended with exit {rc}: {error}"
            return f"the watchdog ended the child (exit {rc}; stacks in {self._watch.monitor_log})"
        if rc < 0 and -rc not in (signal.SIGTERM, signal.SIGINT):
            return f"the child died from signal {signal.Signals(-rc).name}"
        if rc == 1 and _new_text(self._watch.monitor_log, log_size).find("Timeout (") >= 0:
            return "faulthandler's GIL backstop ended the child (a C call held the GIL)"
        return None

    def _forward(self, signum: int, frame: object) -> None:
        """SIGTERM/SIGINT: pass to the child (it saves a checkpoint and exits); no restart after it."""
        self._forwarded = signum
        if self._child is not None and self._child.poll() is None:
            self.log(f"received {signal.Signals(signum).name}: forwarding to child pid {self._child.pid}")
            os.killpg(self._child.pid, signum)


def _kill_group(child: subprocess.Popen) -> None:
    try:
        os.killpg(child.pid, signal.SIGKILL)  # SIGKILL works on a stopped process, SIGTERM would wait for SIGCONT
    except ProcessLookupError:
        pass


def _new_text(path: Path, offset: int) -> str:
    try:
        with open(path, "r", encoding="utf-8", errors="replace") as f:
            f.seek(offset)
            return f.read()
    except OSError:
        return ""


def _status(rc: int) -> int:
    return 128 - rc if rc < 0 else rc


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m fluxlora.supervise",
        description="Run `python -m fluxlora <overrides>` as a child; kill and restart it (resume=auto) when its "
                    "heartbeat goes stale.")
    parser.add_argument("--max-restarts", type=int, default=3, help="restarts after the first start (default 3)")
    parser.add_argument("--grace-s", type=float, default=30.0,
                        help="seconds past the child's own heartbeat limit before it is killed (default 30)")
    parser.add_argument("--poll-s", type=float, default=1.0, help="heartbeat check period (default 1)")
    args, overrides = parser.parse_known_args(argv)
    refused = [a for a in overrides if a in _REFUSED or a.startswith("--")]
    if refused:
        parser.error(f"{refused}: the supervisor runs one training run; pass only Hydra overrides (no sweeps)")
    watch = read_watch(overrides)
    return Supervisor(overrides, watch, args.max_restarts, args.grace_s, args.poll_s).run()


if __name__ == "__main__":
    sys.exit(main())
