"""Subclassable callbacks of fluxlora, importable as `fluxlora.callbacks`."""

from fluxlora.callbacks.checkpoint import PeriodicCheckpoint
from fluxlora.callbacks.checkpoint_io import AtomicCheckpointIO, CheckpointMirror
from fluxlora.callbacks.loss_summary import LossSummary
from fluxlora.callbacks.lora_saver import LoRASaver
from fluxlora.callbacks.model_card import ModelCard
from fluxlora.callbacks.resume_state import ResumeState
from fluxlora.callbacks.sampler import TimedSampler
from fluxlora.callbacks.validation import ValidationLoss
from fluxlora.callbacks.watchdog import WATCHDOG_EXIT_CODE, StepHeartbeatWatchdog, heartbeat

__all__ = ["AtomicCheckpointIO", "CheckpointMirror", "LoRASaver", "LossSummary", "ModelCard", "PeriodicCheckpoint",
           "ResumeState", "StepHeartbeatWatchdog", "TimedSampler", "ValidationLoss", "WATCHDOG_EXIT_CODE",
           "heartbeat"]
