"""Subclassable callbacks of fluxlora, importable as `fluxlora.callbacks`."""

from fluxlora.callbacks.loss_summary import LossSummary
from fluxlora.callbacks.lora_saver import LoRASaver
from fluxlora.callbacks.model_card import ModelCard
from fluxlora.callbacks.sampler import TimedSampler

__all__ = ["LoRASaver", "LossSummary", "ModelCard", "TimedSampler"]
