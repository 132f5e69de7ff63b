"""`python -m fluxlora`: the Hydra entry point."""

from __future__ import annotations

import logging
import sys

import hydra
from omegaconf import DictConfig

from fluxlora.errors import FluxLoraError, RunInterrupted
from fluxlora.run.hydra_job import is_multirun

log = logging.getLogger("fluxlora")


@hydra.main(version_base="1.3", config_path="pkg://fluxlora.conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from fluxlora.run.train import run

    logging.raiseExceptions = False  # a log file on a full disk must not print tracebacks over the run's one line
    try:
        return run(cfg)
    except FluxLoraError as e:
        log.error("%s", e)
        interrupted = isinstance(e, RunInterrupted)  # SIGTERM/SIGINT: the whole sweep stops too
        if is_multirun() and not interrupted:
            raise  # Hydra records the failed job and the sweep goes on
        print(f"fluxlora: error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)  # 2; 75 when another rank of a DDP run stalled or died; 143/130 after a signal


def cli() -> None:
    """The `fluxlora` command and `python -m fluxlora`: main(), then the process ends with the run's exit status
    (fluxlora.process_exit owns how: SIGTERM/SIGINT before training, threads left running)."""
    from fluxlora.process_exit import run_main

    run_main(main)


if __name__ == "__main__":
    cli()
