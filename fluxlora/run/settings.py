"""The run's configuration checked before anything is loaded or written, and parsed once into `RunSettings`: every
settings group, the optimizer, the trainer's numbers. A mistake ends the run within seconds, in one line naming the
key; what passes is handed down typed, so nothing downstream parses a group again. Nothing imported here loads
Lightning, peft or transformers (torch; diffusers' schedules once `check_optim` builds one): `python -m fluxlora`
reports a mistake after torch's start-up, not the training stack's."""

from __future__ import annotations

import typing
from dataclasses import dataclass, field, fields, replace
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from fluxlora.distributed.settings import DistributedSettings, requested_processes
from fluxlora.errors import FluxLoraError
from fluxlora.training.flow import FlowConfig
from fluxlora.lora.settings import LoraSettings, check_export_format
from fluxlora.perf.memory import MemorySettings
from fluxlora.models.components import resolve_dtype
from fluxlora.training.optim import OptimSettings, check_optim
from fluxlora.training.settings import NONFINITE, TrainSettings
from fluxlora.perf.speed import SpeedSettings, check_block_groups, step_scope
from fluxlora.training.validation import ValidationSettings


def settings(cls, node: Any, group: str | None = None):
    """A settings dataclass from a config node; a bad value becomes a one-line FluxLoraError naming `group.key`."""
    group = group or cls.__name__
    known = {f.name for f in fields(cls)}
    values = OmegaConf.to_container(node, resolve=True)
    unknown = set(values) - known
    if unknown:
        raise FluxLoraError(f"unknown key(s) {sorted(unknown)} for {group}; known: {sorted(known)}")
    hints = typing.get_type_hints(cls)
    for key, value in values.items():
        allowed = typing.get_args(hints[key]) or (hints[key],)
        if not any(_fits(value, t) for t in allowed):
            names = " or ".join(_TYPE_NAMES.get(t, str(t)) for t in allowed)
            raise FluxLoraError(f"{group}.{key}={value!r} must be {names}")
    try:
        return cls(**values)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise FluxLoraError(str(e)) from e


_TYPE_NAMES = {int: "a whole number", float: "a number", bool: "true or false", str: "a string", dict: "a mapping",
               list: "a list", tuple: "a list", type(None): "null"}


def _fits(value: Any, t: Any) -> bool:
    """`value` (from a config) has type `t` of a settings field; an int is a float, a bool is not a number."""
    if t is type(None):
        return value is None
    if t in (int, float):
        return isinstance(value, int if t is int else (int, float)) and not isinstance(value, bool)
    if t in (bool, str, dict, list, tuple):
        return isinstance(value, t)
    return True  # a type a config value cannot be checked against here: the dataclass checks it


@dataclass(frozen=True)
class RunSettings:
    """Every settings group of a run, parsed and checked once (`check_config`) and passed down."""

    lora: LoraSettings = field(default_factory=LoraSettings)
    flow: FlowConfig = field(default_factory=FlowConfig)
    memory: MemorySettings = field(default_factory=MemorySettings)
    speed: SpeedSettings = field(default_factory=SpeedSettings)
    distributed: DistributedSettings = field(default_factory=DistributedSettings)
    optim: OptimSettings = field(default_factory=OptimSettings)
    train: TrainSettings = field(default_factory=TrainSettings)
    validation: ValidationSettings = field(default_factory=ValidationSettings)


_GROUPS = {"lora": LoraSettings, "flow": FlowConfig, "memory": MemorySettings, "speed": SpeedSettings,
           "distributed": DistributedSettings, "validation": ValidationSettings}


def check_config(cfg: DictConfig) -> RunSettings:
    """Every settings group, checked before anything is loaded or written, as the run's RunSettings: a mistake ends
    the run within seconds, in one line naming the key. (The dataset and the callbacks' files are checked next,
    still before loading.) A group left out of the config keeps its defaults."""
    groups = {key: settings(cls, cfg[key], key) for key, cls in _GROUPS.items() if cfg.get(key) is not None}
    _check_format(cfg, groups.get("lora"))
    _check_block_groups(cfg, groups.get("speed"), groups.get("memory"))
    if str(cfg.train.nonfinite) not in NONFINITE:
        raise FluxLoraError(f"train.nonfinite={cfg.train.nonfinite!r} is not one of {NONFINITE}")
    _whole(cfg.train, "max_nonfinite_skips", "train", 0)
    _whole(cfg.trainer, "max_steps", "trainer", -1)
    _whole(cfg.trainer, "accumulate_grad_batches", "trainer", 1)
    if cfg.trainer.get("max_epochs") is not None:
        _whole(cfg.trainer, "max_epochs", "trainer", -1)
    _whole(cfg, "seed", "", -(2**63))
    _whole(cfg.model, "t5_max_length", "model", 1)
    _check_data(cfg.data)
    validation = groups.get("validation")
    if validation is not None and validation.keep_best and (cfg.get("callbacks") or {}).get("lora_saver") is None:
        raise FluxLoraError("validation.keep_best=true needs callbacks.lora_saver, which writes the LoRA file")
    precision = cfg.trainer.get("precision")
    if precision is not None and precision not in _precisions():
        raise FluxLoraError(f"trainer.precision={precision!r} is not one of {sorted(set(map(str, _precisions())))} "
                            "(null: bf16-mixed on CUDA, 32-true on the CPU)")
    try:
        optim = check_optim(cfg.optim)
    except ValueError as e:
        raise FluxLoraError(str(e)) from None
    resolve_dtype(cfg.model.get("dtype"))
    train = TrainSettings(str(cfg.train.nonfinite), int(cfg.train.max_nonfinite_skips))
    return RunSettings(**groups, optim=optim, train=train)


def device_for(cfg: DictConfig) -> torch.device:
    """The device `trainer.accelerator` asks for; a GPU asked for and not there is an error, not a CPU run."""
    acc = str(cfg.trainer.accelerator)
    if acc in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    if acc in ("gpu", "cuda"):
        raise FluxLoraError(f"trainer.accelerator={acc} but no CUDA device is visible")
    return torch.device("cpu")


def for_device(run: RunSettings, cfg: DictConfig, device: Any) -> RunSettings:
    """`run` with what depends on the device made concrete: `memory.base_storage` / `memory.fp8_matmul: auto`
    (`MemorySettings.resolved`), from the device and the bucket area `data.resolution` asks for, and the blocks
    swapped for a Kontext run (`memory.paired_blocks_to_swap`) or a LoHa (`memory.loha_blocks_to_swap`). A
    `speed.graph_scope=step` that cannot be (Chroma, several processes) is refused here, before loading."""
    from fluxlora.data.settings import parse_resolution

    w, h = parse_resolution(cfg.data.get("resolution", 512), "data")
    flux1 = _flux1(cfg)
    devices, nodes = requested_processes(cfg, device)
    try:
        step_scope(run.speed, devices * nodes, chroma=not flux1)  # speed.graph_scope=step where it cannot be
        return replace(run, memory=run.memory.resolved(device, int(round((w * h) ** 0.5)), flux1, devices * nodes,
                                                       paired=cfg.model.get("variant") == "kontext",
                                                       adapter=str(cfg.lora.get("type", "lora"))))
    except ValueError as e:
        raise FluxLoraError(str(e)) from None


def _check_format(cfg: DictConfig, lora: LoraSettings | None) -> None:
    """A LoRA type the chosen file format cannot hold ends the run now, not at the first save."""
    fmt = cfg.get("output", {}).get("format")
    if lora is not None and fmt is not None:
        try:
            check_export_format(str(fmt), lora.type)
        except ValueError as e:
            raise FluxLoraError(str(e)) from None
    if lora is not None and str(fmt) == "diffusers" and lora.init_from and lora.text_encoder_lora == "keep":
        from pathlib import Path

        from fluxlora.lora.text_encoder import text_encoder_keys
        from fluxlora.models.files import read_header

        path = Path(lora.init_from).expanduser()
        if path.is_file() and text_encoder_keys(list(read_header(path).shapes)):
            raise FluxLoraError(f"output.format=diffusers cannot carry the text-encoder LoRA layers of {path} "
                                "(lora.text_encoder_lora=keep writes them back in kohya files): set output.format="
                                "kohya or both, or lora.text_encoder_lora=drop")


def _flux1(cfg: DictConfig) -> bool:
    """A FLUX.1 transformer (dev, schnell, Kontext), not Chroma: `model.arch`, `flux` when unset."""
    return str(cfg.model.get("arch") or "flux") == "flux"


def _check_block_groups(cfg: DictConfig, speed: SpeedSettings | None, memory: MemorySettings | None) -> None:
    """`speed.blocks_per_graph` > 1 groups FLUX.1's blocks, none swapped or checkpointed (a tier checkpoints)."""
    k = speed.blocks_per_graph if speed is not None else 1
    if k == 1:
        return
    if not _flux1(cfg):
        raise FluxLoraError(f"speed.blocks_per_graph={k} groups FLUX.1's blocks only, not {cfg.model.arch}'s (each of "
                            "its blocks gets a modulation of its own); set speed.blocks_per_graph=1")
    memory = memory or MemorySettings()
    try:  # before loading, whether or not this device swaps and compiles: the settings cannot work together
        check_block_groups(speed, swapping=bool(memory.blocks_to_swap or memory.paired_blocks_to_swap
                                                   or memory.loha_blocks_to_swap),
                           checkpointing=memory.gradient_checkpointing)
    except ValueError as e:
        raise FluxLoraError(str(e)) from None


def _whole(node: Any, key: str, group: str, minimum: int) -> None:
    value = node.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        least = f" >= {minimum}" if minimum > -(2**63) else ""
        raise FluxLoraError(f"{group + '.' if group else ''}{key}={value!r} must be a whole number{least}")


def _check_data(data: Any) -> None:
    """The `data` numbers read before the dataset is scanned (its folders and dataset.toml are checked by the scan)."""
    from fluxlora.data.settings import parse_resolution

    parse_resolution(data.get("resolution", 512), "data.resolution")
    _whole(data, "num_workers", "data", 0)
    for key in ("timeout", "read_timeout", "cache_wait_timeout"):
        value = data.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0):
            raise FluxLoraError(f"data.{key}={value!r} must be a number of seconds >= 0")


def _precisions() -> list:
    """The values Lightning accepts for `trainer.precision`."""
    from lightning.fabric.plugins.precision.precision import _PRECISION_INPUT

    def flat(t: Any) -> list:
        return [x for a in typing.get_args(t) for x in (flat(a) if typing.get_args(a) else [a])]

    return flat(_PRECISION_INPUT)
