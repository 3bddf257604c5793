"""snnTorch models: plain ``nn.Linear``/``nn.Conv2d`` layers with ``snn.Leaky`` (and friends) neurons, run one
time step per call.

spikeprune's tools expect a model that takes a whole sample and returns per-step outputs ``[T, B, K]``.
:class:`SnnTorchSequence` turns a single-step snnTorch net with hidden state (``init_hidden=True``) into one: it
resets every neuron *instance* itself before each sample (``snntorch.utils.reset`` only looks at the top-level
modules and uses a class-wide instance list, so it is unreliable for nested or several models), loops over the
steps and stacks the outputs.

Forms handled: neurons with ``init_hidden=True`` return ``spk`` (hidden layers) or ``(spk, mem)`` with
``output=True`` (the readout); explicit-state neurons return ``(spk, mem)``. The mask engine's unit masks multiply
``spk`` only (:func:`spikeprune.adapters.with_spikes`), so masked neurons keep integrating behind the mask.

Limits: unit (neuron/channel) masks need the net to be traceable by ``torch.fx`` one step at a time, which holds
for ``init_hidden=True`` nets wrapped in :class:`SnnTorchSequence`. A net that loops over time in its own
``forward`` with explicit state passes ``mem`` from one call of a neuron to the next, which the unit analysis
reads as a coupling: use connection-mask methods (``pq_rewire``) there, or rewrite it with ``init_hidden=True``.
"""

from __future__ import annotations

import torch
from torch import nn

try:  # torch >= 2.5 tells symbolic tracing apart from export
    from torch.fx._symbolic_trace import is_fx_symbolic_tracing as _is_fx_tracing
except ImportError:  # pragma: no cover
    from torch.fx._symbolic_trace import is_fx_tracing as _is_fx_tracing

from . import framework_of

__all__ = ["SnnTorchSequence", "reset", "membrane", "is_neuron"]

_STATE = ("syn", "mem", "spk")


def is_neuron(m: nn.Module) -> bool:
    return framework_of(m) == "snntorch"


@torch.no_grad()
def _zero_state(m: nn.Module) -> None:
    for attr in _STATE:
        t = getattr(m, attr, None)
        if torch.is_tensor(t):
            setattr(m, attr, torch.zeros_like(t))


def reset(model: nn.Module) -> None:
    """Zero the hidden state of every snnTorch neuron instance in ``model`` (detaching it from the last graph)."""
    for m in model.modules():
        if is_neuron(m):
            if callable(getattr(m, "reset_mem", None)):
                m.reset_mem()
            else:
                _zero_state(m)


def membrane(m: nn.Module) -> torch.Tensor | None:
    """``mem`` after the last step (``[B, ...]``), or None before the first step."""
    v = getattr(m, "mem", None)
    return v if torch.is_tensor(v) and v.numel() > 0 else None


class SnnTorchSequence(nn.Module):
    """Run a single-step snnTorch net over time: ``[T, B, ...]`` (``T=None``) or static ``[B, ...]`` input repeated
    ``T`` times (direct encoding), per-step outputs stacked to ``[T, B, K]``.

    ``readout``: ``"spikes"`` takes ``spk`` when the net returns ``(spk, mem)`` (an output neuron with
    ``output=True``), ``"membrane"`` takes ``mem``; a net ending in a plain layer returns its per-step values.
    ``in_shape`` (one sample, one step) enables :meth:`example_input`.

    >>> net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), snn.Leaky(0.9, init_hidden=True),
    ...                     nn.Linear(32, 10), snn.Leaky(0.9, init_hidden=True, output=True))
    >>> model = SnnTorchSequence(net, T=8, in_shape=(1, 8, 8))
    >>> model(torch.rand(4, 1, 8, 8)).shape
    torch.Size([8, 4, 10])
    """

    def __init__(self, net: nn.Module, T: int | None = None, readout: str = "spikes",
                 in_shape: tuple[int, ...] | None = None):
        super().__init__()
        if T is not None and int(T) < 1:
            raise ValueError(f"T must be >= 1 or None, got {T}")
        if readout not in ("spikes", "membrane"):
            raise ValueError(f"readout must be 'spikes' or 'membrane', got {readout!r}")
        self.net = net
        self.T = None if T is None else int(T)
        self.readout = readout
        self.in_shape = None if in_shape is None else tuple(int(s) for s in in_shape)

    def _pick(self, out):
        if isinstance(out, (tuple, list)):
            return out[0] if self.readout == "spikes" else out[1]
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _is_fx_tracing():  # the unit analysis sees one step: neurons appear once, with their single-step shapes
            return self._pick(self.net(x if self.T is not None else x[0]))
        reset(self.net)
        steps = [x] * self.T if self.T is not None else list(x.unbind(0))
        return torch.stack([self._pick(self.net(xt)) for xt in steps])

    def example_input(self, batch: int = 2) -> torch.Tensor:
        if self.in_shape is None:
            raise ValueError("SnnTorchSequence needs in_shape=... for example_input()")
        shape = (batch, *self.in_shape) if self.T is not None else (1, batch, *self.in_shape)
        return torch.rand(shape)

    def extra_repr(self) -> str:
        return f"T={self.T}, readout={self.readout!r}"
