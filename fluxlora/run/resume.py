"""Which checkpoint a run continues from: `resume=auto` (newest valid one of the run name), a path, or none.

A checkpoint that does not load, or was made for other LoRA layers, is reported and the one before it is tried.
The checkpoint callback owns its folder's layout (file names, the run-record key), as Lightning's ModelCheckpoint
owns its own: the functions here take it as `layout` (the callback's class, found by its config name) and import
nothing from `fluxlora.callbacks`.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Protocol

import torch

from fluxlora.errors import FluxLoraError
from fluxlora.lora.settings import LoraSettings

log = logging.getLogger("fluxlora")

_REQUIRED = ("state_dict", "global_step", "loops", "optimizer_states")


class CheckpointLayout(Protocol):
    """What the run needs to know of the checkpoint callback's files (`fluxlora.callbacks.PeriodicCheckpoint`)."""

    RUN_KEY: str
    """The checkpoint's top-level key holding {"finished": bool, ...}."""

    @staticmethod
    def step_of(path: Path) -> Optional[int]: ...

    @classmethod
    def checkpoints_in(cls, folder: Path) -> list[Path]: ...

    @staticmethod
    def clean_folder(folder: Path) -> list[Path]: ...


@dataclass
class ResumePlan:
    """Where a run starts."""

    path: Optional[Path] = None
    """The checkpoint to continue from; None = a fresh start."""
    checkpoint: Optional[dict] = field(default=None, repr=False)
    """Its contents (already loaded once to check it)."""
    rejected: list[str] = field(default_factory=list)
    """Checkpoints that were tried and did not load, with why."""
    run_key: str = "fluxlora_run"
    """The layout's run-record key (what `finished` reads)."""

    @property
    def global_step(self) -> int:
        return int(self.checkpoint.get("global_step", 0)) if self.checkpoint else 0

    def finished(self, max_steps: int, max_epochs: Optional[int]) -> bool:
        """True when the checkpoint is the end of a completed run that the current limits would not extend."""
        info = (self.checkpoint or {}).get(self.run_key) or {}
        if not info.get("finished"):
            return False
        if max_steps and max_steps > 0:
            return self.global_step >= max_steps
        return max_epochs is not None and int(self.checkpoint.get("epoch", 0)) >= max_epochs


def load_checked(path: Path) -> tuple[Optional[dict], str]:
    """(checkpoint, "") when `path` loads and has what a resume needs, else (None, why not)."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torn zip, truncated pickle, not a checkpoint at all
        return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    if not isinstance(ckpt, dict):
        return None, "not a checkpoint dict"
    missing = [k for k in _REQUIRED if k not in ckpt]
    if missing:
        return None, f"missing {missing}"
    return ckpt, ""


def incompatibility(ckpt: dict, own: dict[str, torch.Tensor]) -> str:
    """Why the checkpoint's LoRA weights do not fit this model ("" when they do)."""
    sd = ckpt["state_dict"]
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    shapes = [k for k in own if k in sd and tuple(sd[k].shape) != tuple(own[k].shape)]
    if not (missing or unexpected or shapes):
        return ""
    parts = [f"{len(missing)} LoRA tensors missing (e.g. {missing[0]})" if missing else "",
             f"{len(unexpected)} unexpected (e.g. {unexpected[0]})" if unexpected else "",
             f"{len(shapes)} of another shape (e.g. {shapes[0]})" if shapes else ""]
    return ", ".join(p for p in parts if p)


def plan_resume(resume: Any, folder: Path, owner: bool = True,
                layout: Optional[CheckpointLayout] = None) -> ResumePlan:
    """Pick the checkpoint to continue from.

    Args:
        resume: ``auto`` (newest valid checkpoint in `folder`), None/``null``/``never`` (fresh start), or a path.
        folder: this run name's checkpoint folder (``outputs/<name>/checkpoints``).
        owner: this process may move an earlier run's checkpoints aside (rank 0 of a multi-process run only).
        layout: the checkpoint callback's class (its file names); None when checkpointing is off: ``auto`` then
            finds nothing, and a named file is tried alone.
    """
    value = _resume_value(resume)
    if value is None:
        if owner:
            _set_aside(folder)
        return ResumePlan()
    key = {"run_key": layout.RUN_KEY} if layout is not None else {}
    if value == "auto":
        found = layout.checkpoints_in(folder) if layout is not None else []
        plan = _first_valid(found, **key)
        if plan.path is None and found:
            log.warning("resume=auto: no checkpoint in %s loads (%s); starting fresh", folder, "; ".join(plan.rejected))
            if owner:
                _set_aside(folder)
        elif plan.path is None:
            log.info("resume=auto: no checkpoint in %s; starting fresh", folder)
        return plan
    path = resume_file(value)
    older = [p for p in layout.checkpoints_in(path.parent) if not _same(p, path) and _older(p, path, layout)] \
        if layout is not None else []
    plan = _first_valid([path, *older], **key)
    if plan.path is None:
        raise FluxLoraError(f"resume={value}: the checkpoint does not load ({'; '.join(plan.rejected)})")
    return plan


def base_model(cfg: Any) -> dict:
    """The base model a run trains on, as its config names it (recorded in every checkpoint): the preset and the
    files. A checkpoint of another base model is never resumed or called complete under the same run name."""
    model = cfg.model
    return {k: None if model.get(k) is None else str(model.get(k)) for k in ("preset", "path", "transformer")}


def check_base_model(cfg: Any, path: Path, ckpt: dict) -> None:
    """A FluxLoraError when checkpoint `path` was made on another base model than `cfg` names (one recorded by an
    earlier version, without the record, passes)."""
    recorded = (ckpt.get("fluxlora") or {}).get("base_model")
    if not recorded or recorded == base_model(cfg):
        return
    then, now = (", ".join(f"model.{k}={v}" for k, v in d.items() if v is not None)
                 for d in (recorded, base_model(cfg)))
    raise FluxLoraError(f"resume={cfg.get('resume')}: checkpoint {path} was trained on another base model "
                        f"({then}; this run: {now}); pass resume=null to start over (earlier checkpoints "
                        "are moved aside) or use another name=")


def _resume_value(resume: Any) -> Optional[str]:
    """`resume` as `auto` or a path; None for a fresh start (null, false, "none", "never", ...)."""
    value = None if resume is None or resume is False else str(resume)
    return None if value in ("", "null", "none", "never", "false") else value


def resume_file(value: str) -> Path:
    """The checkpoint file `resume=<path>` names; a FluxLoraError when there is none."""
    path = Path(value).expanduser()
    if not path.is_file():
        raise FluxLoraError(f"resume={value}: no such checkpoint file")
    return path


def _older(p: Path, than: Path, layout: CheckpointLayout) -> bool:
    sp, st = layout.step_of(p), layout.step_of(than)
    if sp is not None and st is not None:
        return sp < st
    return p.stat().st_mtime <= than.stat().st_mtime


def _same(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _first_valid(paths: list[Path], **key: str) -> ResumePlan:
    rejected = []
    for p in paths:
        ckpt, why = load_checked(p)
        if ckpt is not None:
            if rejected:
                log.warning("resuming from the previous checkpoint %s instead", p)
            return ResumePlan(p, ckpt, rejected, **key)
        msg = f"{p} does not load ({why})"
        log.warning("checkpoint %s; trying the one before it", msg)
        rejected.append(msg)
    return ResumePlan(rejected=rejected, **key)


def _set_aside(folder: Path) -> None:
    """A fresh start moves an earlier run's checkpoints away, so pruning and resume=auto never mix two runs."""
    if folder.is_dir() and any(folder.iterdir()):
        dest = folder.with_name(f"{folder.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
        folder.rename(dest)
        log.warning("starting fresh: the earlier checkpoints of this run name were moved to %s", dest)


def resume_plan(cfg: Any, module: Any, folder: Path, layout: Optional[CheckpointLayout],
                owner: bool = True) -> ResumePlan:
    """The run's resume plan (`cfg.resume`), checked against the LoRA layers of `module`. Only the `owner` (rank 0)
    cleans up or moves files; the other ranks of a multi-process run only read."""
    if layout is not None and owner:
        for p in layout.clean_folder(folder):
            log.info("removed %s, left by an interrupted save", p.name)
    plan = plan_resume(cfg.get("resume"), folder, owner, layout)
    if plan.path is None:
        return plan
    check_base_model(cfg, plan.path, plan.checkpoint)
    why = incompatibility(plan.checkpoint, module.state_dict())
    if why:
        raise FluxLoraError(f"resume={cfg.get('resume')}: checkpoint {plan.path} was made for other LoRA layers "
                            f"({why}); pass resume=null to start over (earlier checkpoints are moved aside) or use "
                            "another name=")
    log.info("found checkpoint %s (step %d)", plan.path, plan.global_step)
    return plan


def finished_run(cfg: Any, lora: LoraSettings, folder: Path, layout: Optional[CheckpointLayout]) \
        -> Optional[ResumePlan]:
    """The plan of a run that has nothing left to do, told from its checkpoint alone, before anything is loaded or
    written. None when there is training to do, or when the checkpoint was made with other LoRA settings (or by a
    version that did not record them): the full check after loading then decides and names the difference."""
    value = _resume_value(cfg.get("resume"))
    if value is None or layout is None:
        return None
    for path in layout.checkpoints_in(folder) if value == "auto" else [resume_file(value)]:
        ckpt, _ = load_checked(path)
        if ckpt is None:
            continue  # not this one: the full check reports it
        check_base_model(cfg, path, ckpt)  # before loading: a run name reused for another model is a config mistake
        plan = ResumePlan(path, ckpt, run_key=layout.RUN_KEY)
        recorded = (ckpt.get("fluxlora") or {}).get("lora")
        try:
            same = recorded is not None and LoraSettings(**recorded) == lora
        except (TypeError, ValueError):  # settings of another version: the full check decides
            same = False
        done = plan.finished(int(cfg.trainer.max_steps), cfg.trainer.get("max_epochs"))
        return plan if same and done else None
    return None


def report_complete(name: str, out: Path, plan: ResumePlan) -> None:
    """Say that the run has nothing left to do (resume=auto on a finished run)."""
    lora = out / f"{name}.safetensors"
    msg = (f"run '{name}' is already complete at step {plan.global_step} (checkpoint {plan.path}); nothing to do. "
           f"LoRA: {lora if lora.exists() else '(not found)'}. Pass resume=null to train again from scratch, or raise "
           "trainer.max_epochs / trainer.max_steps to train further.")
    log.info("%s", msg)
    print(msg, flush=True)
    return None
