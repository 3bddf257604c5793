"""The model zoo: ``create_model(name, num_classes=, in_channels=, T=, neuron=...)`` and ``list_models()``."""

from __future__ import annotations

from torch import nn

from ..registry import Registry
from ._base import SpikingModel, insert_encoder, neuron_factory

MODELS = Registry("model")
register_model = MODELS.register


def create_model(name: str, **kwargs) -> SpikingModel:
    """Build a zoo model by name; unknown names and options raise a one-line ``ValueError``."""
    return MODELS.build(name, **kwargs)


def list_models(pattern: str = "*") -> list[str]:
    return MODELS.names(pattern)


from . import cnn, mlp, resnet  # noqa: E402,F401  (registration side effects)

__all__ = ["create_model", "list_models", "register_model", "SpikingModel", "insert_encoder",
           "neuron_factory", "nn"]
