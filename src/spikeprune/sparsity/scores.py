"""Importance scores: small registered functions, plus monitors for scores that need running statistics.

Weight scores map a layer to a tensor shaped like its weight (higher = more important). Unit scores come from
:class:`ActivityMonitor` (firing / membrane activity, gathered by neuron observers *before* any unit mask) and
from the mask engine's gate gradients. :func:`pq_index` and :func:`sap_retained` are the PQ-index and SAP
retained-count bound of Diao et al. (ICLR'23), used by ``pq_rewire``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from .. import dist
from ..adapters import neuron_membrane, neuron_spikes, unit_axis
from ..kernels import unit_sums
from ..neurons import BaseNeuron
from ..registry import Registry
from .hooks import MethodHook

SCORES = Registry("score")
register_score = SCORES.register


@register_score("magnitude")
def magnitude(layer: nn.Module, **_) -> torch.Tensor:
    """``|w|``."""
    return layer.weight.detach().abs()


@register_score("gradient")
def gradient(layer: nn.Module, grad: torch.Tensor | None = None, **_) -> torch.Tensor:
    """``|∂L/∂w|`` of the dense gradient (RigL's growth signal)."""
    g = grad if grad is not None else layer.weight.grad
    if g is None:
        raise ValueError("gradient score needs a gradient; run a backward pass first")
    return g.detach().abs()


@register_score("momentum")
def momentum(layer: nn.Module, momentum: torch.Tensor | None = None, **_) -> torch.Tensor:
    """``|m|``, an exponential average of dense gradients (sparse-momentum growth, Dettmers & Zettlemoyer)."""
    if momentum is None:
        raise ValueError("momentum score needs a GradientMomentum tracker")
    return momentum.abs()


class GradientMomentum:
    """EMA of each prunable layer's *dense* gradient, fed by the engine before grads are masked."""

    def __init__(self, beta: float = 0.9):
        self.beta = beta
        self.buf: dict[str, torch.Tensor] = {}

    def __call__(self, name: str, layer: nn.Module, grad: torch.Tensor) -> None:
        b = self.buf.get(name)
        if b is not None and b.device != grad.device:
            b = self.buf[name] = b.to(grad.device)
        if b is None:
            self.buf[name] = grad.detach().clone().mul_(1 - self.beta)
        else:
            b.lerp_(grad, 1 - self.beta)  # β b + (1 - β) g in one pass

    def state_dict(self) -> dict:
        return {k: v.cpu() for k, v in self.buf.items()}

    def load_state_dict(self, st: dict) -> None:
        self.buf = {k: v.clone() for k, v in st.items()}


# ------------------------------------------------------------------------------------------ activity
ACTIVITY = ("spikes", "membrane", "spikes+membrane")


class ActivityMonitor:
    """Per-unit activity of spiking layers, reduced on the fly (no ``[T, B, ...]`` copy is kept).

    ``what``: ``spikes`` (would-be firing rate), ``membrane`` (mean ``|u|`` of the pre-spike membrane) or
    ``spikes+membrane`` (SCA's ``s + |u|``). ``ema`` (β) keeps an exponential average per batch; ``ema=None``
    keeps the running mean since the last :meth:`reset`. Values are averaged over DDP ranks when read.
    """

    def __init__(self, model: nn.Module, neurons: Iterable[str], what: str = "spikes", ema: float | None = 0.9):
        if what not in ACTIVITY:
            raise ValueError(f"activity must be one of {list(ACTIVITY)}, got {what!r}")
        self.what, self.ema = what, ema
        self.sum: dict[str, torch.Tensor] = {}
        self.count: dict[str, int] = {}
        self._handles = []
        modules = dict(model.named_modules())
        for n in neurons:
            mod = modules[n]
            if isinstance(mod, BaseNeuron):
                obs = MethodHook(self._observer(n), unit_stats=1 if self.what == "spikes" else 2)
                mod.observers.append(obs)
                self._handles.append((mod, obs))
            else:  # foreign neuron: spikes from the output, read before any unit-mask hook (prepended)
                self._handles.append(mod.register_forward_hook(MethodHook(self._hook(n)), prepend=True))

    def _hook(self, name: str):
        def hook(mod, inputs, out):
            if mod.training:  # adapters: spk of (spk, mem), the membrane each framework keeps, its unit axis
                s = neuron_spikes(out)
                self._update(name, s, neuron_membrane(mod), unit_axis(mod, s))
        return hook

    def _observer(self, name: str):
        def obs(mod, spikes, membrane, stats=None):
            if mod.training:
                self._update(name, spikes, membrane, stats=stats)
        # the neuron hands over per-unit sums of its pre-gate spikes (and |H|), counted in its fused loop
        obs.unit_stats = 1 if self.what == "spikes" else 2
        return obs

    @torch.no_grad()
    def _update(self, name: str, spikes: torch.Tensor, membrane: torch.Tensor | None,
                unit_dim: int | None = None, stats: torch.Tensor | None = None) -> None:
        unit_dim = unit_dim if unit_dim is not None else (2 if spikes.dim() > 2 else 1)
        count = spikes.numel() // max(1, spikes.shape[unit_dim])
        if stats is not None:  # [1 or 2, C]: sums of the pre-gate spikes (and of |membrane|)
            val = stats[0] if self.what == "spikes" else stats[-1] if self.what == "membrane" else stats.sum(0)
            val = (val / count).float()
        else:
            if self.what != "spikes" and membrane is None:
                raise ValueError(f"activity {self.what!r} needs membrane potentials, which {name} does not expose")
            val = 0
            if self.what != "membrane":
                val = unit_sums(spikes.float(), "sum", unit_dim=unit_dim) / count
            if self.what != "spikes":
                val = val + unit_sums(membrane.float(), "abs", unit_dim=unit_dim) / count
        prev = self.sum.get(name)
        if prev is not None and prev.device != val.device:  # loaded from a CPU checkpoint onto a GPU run
            self.sum[name] = prev.to(val.device)
        if self.ema is None:
            self.sum[name] = self.sum.get(name, 0) + val
            self.count[name] = self.count.get(name, 0) + 1
        elif name not in self.sum:
            self.sum[name], self.count[name] = val.clone(), 1
        else:
            self.sum[name].mul_(self.ema).add_(val, alpha=1 - self.ema)

    def values(self) -> dict[str, torch.Tensor]:
        """Current per-unit activity of every monitored layer (synchronised across ranks)."""
        out = {}
        for n, s in self.sum.items():
            v = s / self.count[n] if self.ema is None else s.clone()
            out[n] = dist.all_mean(v)
        return out

    def reset(self) -> None:
        self.sum, self.count = {}, {}

    def close(self) -> None:
        for h in self._handles:
            if isinstance(h, tuple):
                mod, obs = h
                if obs in mod.observers:
                    mod.observers.remove(obs)
            else:
                h.remove()
        self._handles = []

    def state_dict(self) -> dict:
        return {"sum": {k: v.cpu() for k, v in self.sum.items()}, "count": dict(self.count)}

    def load_state_dict(self, st: dict) -> None:
        self.sum = {k: v.clone() for k, v in st.get("sum", {}).items()}
        self.count = dict(st.get("count", {}))


# ------------------------------------------------------------------------------------------ PQ index
def pq_index(w: torch.Tensor, p: float = 0.5, q: float = 1.0, mask: torch.Tensor | None = None,
             dim: int | None = None) -> torch.Tensor:
    """PQ index ``I_{p,q}(w) = 1 - (mean|w|^p)^{1/p} / (mean|w|^q)^{1/q}`` over the active entries.

    0 for a flat vector, towards 1 for a sparse (compressible) one. ``dim`` computes one index per slice along
    the other dimensions (e.g. ``dim=1`` on a ``[rows, cols]`` matrix: one per row). Empty scopes give 0.
    """
    if not 0 < p < q:
        raise ValueError(f"PQ index needs 0 < p < q, got p={p}, q={q}")
    a = w.detach().abs().double()
    m = torch.ones_like(a) if mask is None else mask.to(a.dtype)
    red = dict(dim=dim) if dim is not None else {}
    d = m.sum(**red)
    safe = d.clamp_min(1)
    mp = ((a.pow(p) * m).sum(**red) / safe).pow(1 / p)
    mq = ((a.pow(q) * m).sum(**red) / safe).pow(1 / q)
    idx = 1 - mp / mq.clamp_min(1e-300)
    idx = torch.where((d > 0) & (mq > 0), idx, torch.zeros_like(idx))
    return idx.clamp_min(0).to(w.dtype if w.is_floating_point() else torch.float32)


def sap_retained(d: torch.Tensor | int, index: torch.Tensor | float, eta: float = 0.0, p: float = 0.5,
                 q: float = 1.0) -> torch.Tensor:
    """SAP bound on how many of ``d`` active weights to keep: ``ceil(d (1+η)^{-q/(q-p)} (1-I)^{qp/(q-p)})``."""
    d = torch.as_tensor(d, dtype=torch.float64)
    i = torch.as_tensor(index, dtype=torch.float64)
    r = d * (1 + eta) ** (-q / (q - p)) * (1 - i).clamp_min(0).pow(q * p / (q - p))
    return torch.ceil(r - 1e-9).clamp(max=d)


def sap_prune_count(d: torch.Tensor | int, index: torch.Tensor | float, eta: float, gamma: float, beta: float,
                    p: float = 0.5, q: float = 1.0) -> torch.Tensor:
    """How many weights to prune: ``floor(d · clamp(γ (1 - r/d), 0, β))`` with ``r`` from :func:`sap_retained`."""
    d = torch.as_tensor(d, dtype=torch.float64)
    r = sap_retained(d, index, eta, p, q)
    ratio = (gamma * (1 - r / d.clamp_min(1))).clamp(0, beta)
    return torch.floor(d * ratio + 1e-9).long()


def gaussian_pq_index(p: float = 0.5, q: float = 1.0) -> float:
    """Closed form of the PQ index of a large Gaussian vector (a sanity reference for tests and docs)."""
    def abs_moment(r):
        return 2 ** (r / 2) * math.gamma((r + 1) / 2) / math.sqrt(math.pi)
    return 1 - abs_moment(p) ** (1 / p) / abs_moment(q) ** (1 / q)
