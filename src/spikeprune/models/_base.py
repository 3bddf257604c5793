"""Base class of the zoo's SNNs: input validation, encoding, and ``[T, B, classes]`` outputs."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

try:  # torch >= 2.5 tells symbolic tracing apart from export
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as is_fx_tracing
except ImportError:  # pragma: no cover
    from torch.fx._symbolic_trace import is_fx_tracing

from ..layers import EventInput, RateEncoder, Repeat
from ..neurons import BaseNeuron, make_neuron

ENCODINGS = ("direct", "rate", "events")


class SpikingModel(nn.Module):
    """An SNN classifier. ``forward`` takes ``[B, *in_shape]`` (static images; ``direct`` or ``rate``
    encoding) or ``[B, T, *in_shape]`` (``events``) and returns per-step logits ``[T, B, num_classes]``."""

    def __init__(self, name: str, in_shape: Sequence[int], num_classes: int, T: int, encoding: str):
        super().__init__()
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
        if int(T) < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        if int(num_classes) < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.name = name
        self.in_shape = tuple(int(s) for s in in_shape)
        self.num_classes = int(num_classes)
        self.T = int(T)
        self.encoding = encoding

    def check_input(self, x: torch.Tensor) -> None:
        if is_fx_tracing():
            return
        want = (self.T, *self.in_shape) if self.encoding == "events" else self.in_shape
        if x.dim() != len(want) + 1 or tuple(x.shape[1:]) != want:
            form = "[B, T, " if self.encoding == "events" else "[B, "
            raise ValueError(f"{self.name} expects input {form}{', '.join(map(str, self.in_shape))}] "
                             f"({self.encoding} encoding, T={self.T}), got shape {list(x.shape)}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.body(x)

    def example_input(self, batch: int = 2) -> torch.Tensor:
        shape = (batch, self.T, *self.in_shape) if self.encoding == "events" else (batch, *self.in_shape)
        return torch.rand(shape)

    def neurons(self) -> list[BaseNeuron]:
        return [m for m in self.modules() if isinstance(m, BaseNeuron)]

    def set_T(self, T: int) -> None:
        """Change the number of time steps (direct/rate encoders follow)."""
        if int(T) < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        self.T = int(T)
        for m in self.modules():
            if isinstance(m, (Repeat, RateEncoder)):
                m.T = int(T)


def insert_encoder(layers: list[nn.Module], encoding: str, T: int) -> list[nn.Module]:
    """Put the encoder into a layer list: ``direct`` repeats the output of the static stem (everything
    before the first neuron) T times; ``rate`` draws Bernoulli spikes from the input; ``events`` transposes."""
    layers = list(layers)
    if encoding == "direct":
        i = next(i for i, m in enumerate(layers) if isinstance(m, BaseNeuron))
        layers.insert(i, Repeat(T))
    elif encoding == "rate":
        layers.insert(0, RateEncoder(T))
    elif encoding == "events":
        layers.insert(0, EventInput())
    else:
        raise ValueError(f"encoding must be one of {ENCODINGS}, got {encoding!r}")
    return layers


def neuron_factory(neuron: str | dict | None):
    """Return a zero-argument callable that makes a fresh neuron of the requested kind."""
    make_neuron(neuron)  # validate once, early
    return lambda: make_neuron(neuron)
