"""What this process is to Hydra: a single run or one job of a sweep, and the run name that follows from it.

`__main__` (how a failure is reported) and the run (which folder it writes, how long a sibling rank may linger)
both ask; the answer lives here once.
"""

from __future__ import annotations

import re

from omegaconf import DictConfig

from fluxlora.errors import FluxLoraError


def is_multirun() -> bool:
    """True inside a job of `--multirun`: a failure is then recorded by Hydra and the sweep goes on."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def job_name(cfg: DictConfig) -> str:
    """The run name; a sweep job gets its job number appended so jobs never share a folder."""
    from hydra.core.hydra_config import HydraConfig

    name = str(cfg.name)
    if not re.fullmatch(r"[\w.\-]+", name):
        raise FluxLoraError(f"name={name!r} may hold only letters, digits, '.', '_' and '-'")
    return f"{name}_{HydraConfig.get().job.num}" if is_multirun() else name
