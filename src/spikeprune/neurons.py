"""Spiking neurons on multi-step ``[T, B, ...]`` tensors.

All neurons share one charge equation, ``H[t] = a * V[t-1] + b * X[t] + c``:

* LIF, ``decay_input=True``:  ``H = V + (X - (V - V_reset)) / tau``  (SpikingJelly's ``LIFNode``)
* LIF, ``decay_input=False``: ``H = V - (V - V_reset) / tau + X``
* IF:                         ``H = V + X``

then fire ``S = Θ(H - V_th)`` and reset, hard ``V = H (1 - S) + V_reset S`` or soft (``v_reset=None``)
``V = H - V_th S``. The whole sequence runs inside one autograd function whose backward is the exact
BPTT recursion with a surrogate derivative, so no autograd node is made per time step and only the
pre-spike membrane ``H`` is saved. :func:`reference_multistep` is the plain step-by-step loop, kept as the
ground truth for tests.

Observers (``neuron.observers``) receive ``(module, spikes, membrane)`` right after each forward, before any
neuron mask is applied; nothing is stored when no observer is attached.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

__all__ = [
    "Surrogate", "ATan", "Sigmoid", "Triangle", "SURROGATES", "make_surrogate",
    "BaseNeuron", "LIF", "IF", "PLIF", "NEURONS", "make_neuron", "reference_multistep", "is_neuron",
]


# --------------------------------------------------------------------------------------------- surrogates
class Surrogate:
    """Heaviside forward with a smooth derivative ``grad(x)`` for the backward pass."""

    name = "base"

    def __init__(self, alpha: float):
        if not alpha > 0:
            raise ValueError(f"surrogate alpha must be > 0, got {alpha}")
        self.alpha = float(alpha)

    def grad(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha})"


class ATan(Surrogate):
    """``σ'(x) = (α/2) / (1 + (π/2 · α · x)²)`` (SpikingJelly's default, α=2)."""

    name = "atan"

    def __init__(self, alpha: float = 2.0):
        super().__init__(alpha)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return (self.alpha / 2) / (1 + (math.pi / 2 * self.alpha * x).square())


class Sigmoid(Surrogate):
    """``σ'(x) = α · sg(αx) · (1 - sg(αx))`` (α=4 as in SpikingJelly)."""

    name = "sigmoid"

    def __init__(self, alpha: float = 4.0):
        super().__init__(alpha)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.alpha * x)
        return self.alpha * s * (1 - s)


class Triangle(Surrogate):
    """``σ'(x) = α · max(0, 1 - α|x|)``: peak α, support ``|x| < 1/α``, unit area."""

    name = "triangle"

    def __init__(self, alpha: float = 1.0):
        super().__init__(alpha)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (1 - self.alpha * x.abs()).clamp_min(0)


SURROGATES: dict[str, type[Surrogate]] = {"atan": ATan, "sigmoid": Sigmoid, "triangle": Triangle}


def make_surrogate(spec: str | Surrogate | None, alpha: float | None = None) -> Surrogate:
    """Build a surrogate from a name (``"atan"``, ``"sigmoid"``, ``"triangle"``) or pass one through."""
    if spec is None:
        spec = "atan"
    if isinstance(spec, Surrogate):
        return spec
    if spec not in SURROGATES:
        raise ValueError(f"unknown surrogate {spec!r}; choose one of {sorted(SURROGATES)}")
    return SURROGATES[spec]() if alpha is None else SURROGATES[spec](alpha)


# --------------------------------------------------------------------------------------- fused dynamics
def _coeffs(kind: str, k: torch.Tensor | float, decay_input: bool):
    """Return (a, b) of ``H = a V + b X + c`` for a decay rate ``k = 1/tau``."""
    if kind == "if":
        return 1.0, 1.0
    return 1 - k, (k if decay_input else 1.0)


class _MultiStep(torch.autograd.Function):
    """Forward over all T steps without a graph; backward is the BPTT recursion."""

    @staticmethod
    def forward(ctx, x, k, v0, kind, v_th, v_reset, decay_input, detach_reset, surrogate, need_k_grad):
        a, b = _coeffs(kind, k, decay_input)
        c = 0.0 if (kind == "if" or v_reset is None) else k * v_reset
        ctx.set_materialize_grads(False)
        h_seq = torch.empty_like(x)
        s_seq = torch.empty_like(x)
        v = v0
        for t in range(x.shape[0]):
            h = h_seq[t]
            if kind == "if":
                torch.add(v, x[t], out=h)
            else:
                torch.mul(v, a, out=h)
                if torch.is_tensor(b):
                    h.addcmul_(x[t], b)
                else:
                    h.add_(x[t], alpha=b)
                if not (isinstance(c, float) and c == 0.0):
                    h.add_(c)
            spike = h >= v_th
            s_seq[t] = spike
            v = h - v_th * s_seq[t] if v_reset is None else h.masked_fill(spike, v_reset)
        # a constant decay stays a Python float: a float32 copy would make float64 gradients inexact
        ctx.save_for_backward(h_seq, k if torch.is_tensor(k) else None, v0)
        ctx.k_const = None if torch.is_tensor(k) else float(k)
        ctx.cfg = (kind, v_th, v_reset, decay_input, detach_reset, surrogate, need_k_grad)
        return s_seq, h_seq, v

    @staticmethod
    def backward(ctx, g_s, g_h_out, g_v_last):
        h_seq, k, v0 = ctx.saved_tensors
        if k is None:
            k = ctx.k_const
        kind, v_th, v_reset, decay_input, detach_reset, surrogate, need_k_grad = ctx.cfg
        a, b = _coeffs(kind, k, decay_input)
        g_x = torch.empty_like(h_seq)
        g_v = g_v_last if g_v_last is not None else torch.zeros_like(h_seq[0])
        g_k = torch.zeros((), dtype=h_seq.dtype, device=h_seq.device) if need_k_grad else None
        for t in range(h_seq.shape[0] - 1, -1, -1):
            h = h_seq[t]
            sg = surrogate.grad(h - v_th)
            s = (h >= v_th).to(h.dtype)
            if v_reset is None:
                dv_dh = 1.0 if detach_reset else 1 - v_th * sg
            else:
                dv_dh = 1 - s if detach_reset else 1 - s + (v_reset - h) * sg
            g_h = g_v * dv_dh
            if g_s is not None:
                g_h = g_h + g_s[t] * sg
            if g_h_out is not None:
                g_h = g_h + g_h_out[t]
            g_x[t] = g_h * b
            if need_k_grad:
                v_prev = v0 if t == 0 else _after_reset(h_seq[t - 1], v_th, v_reset)
                vr = 0.0 if v_reset is None else v_reset
                # dH/dk: decay_input -> X - (V - Vr) = (H - V)/k ; otherwise -(V - Vr)
                dh_dk = (h - v_prev) / k if decay_input else -(v_prev - vr)
                g_k = g_k + (g_h * dh_dk).sum()
            g_v = g_h * a
        g_v0 = g_v if ctx.needs_input_grad[2] else None
        return g_x, g_k, g_v0, None, None, None, None, None, None, None


def _after_reset(h: torch.Tensor, v_th: float, v_reset: float | None) -> torch.Tensor:
    s = (h >= v_th).to(h.dtype)
    return h - v_th * s if v_reset is None else h * (1 - s) + v_reset * s


def reference_multistep(x, kind, k, v_th, v_reset, decay_input, detach_reset, surrogate, v0=None):
    """Plain step-by-step loop with autograd (slow, for tests): returns spikes ``[T, B, ...]``."""

    class _Spike(torch.autograd.Function):
        @staticmethod
        def forward(ctx, u):
            ctx.save_for_backward(u)
            return (u >= 0).to(u.dtype)

        @staticmethod
        def backward(ctx, g):
            (u,) = ctx.saved_tensors
            return g * surrogate.grad(u)

    v = torch.zeros_like(x[0]) if v0 is None else v0
    vr = 0.0 if v_reset is None else v_reset
    out = []
    for t in range(x.shape[0]):
        if kind == "if":
            h = v + x[t]
        elif decay_input:
            h = v + (x[t] - (v - vr)) * k
        else:
            h = v - (v - vr) * k + x[t]
        s = _Spike.apply(h - v_th)
        sr = s.detach() if detach_reset else s
        v = h - v_th * sr if v_reset is None else h * (1 - sr) + v_reset * sr
        out.append(s)
    return torch.stack(out)


# ------------------------------------------------------------------------------------------------ modules
class BaseNeuron(nn.Module):
    """Multi-step spiking neuron. Input and output are ``[T, B, ...]``; state is reset every call
    unless ``stateful=True`` (then call :meth:`reset` yourself between samples)."""

    kind = "lif"

    def __init__(self, v_threshold: float = 1.0, v_reset: float | None = 0.0, detach_reset: bool = True,
                 surrogate: str | Surrogate = "atan", alpha: float | None = None, stateful: bool = False):
        super().__init__()
        if not v_threshold > 0:
            raise ValueError(f"v_threshold must be > 0, got {v_threshold}")
        if v_reset is not None and v_reset >= v_threshold:
            raise ValueError(f"v_reset ({v_reset}) must be below v_threshold ({v_threshold})")
        self.v_threshold = float(v_threshold)
        self.v_reset = None if v_reset is None else float(v_reset)
        self.detach_reset = bool(detach_reset)
        self.surrogate = make_surrogate(surrogate, alpha)
        self.stateful = stateful
        self.v: torch.Tensor | None = None
        self.observers: list[Callable[[nn.Module, torch.Tensor, torch.Tensor], None]] = []

    # decay rate k = 1/tau; IF has none
    def decay(self) -> torch.Tensor | float:
        return 1.0

    @property
    def decay_input(self) -> bool:
        return True

    def reset(self) -> None:
        self.v = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() < 2:
            raise ValueError(f"{type(self).__name__} expects a multi-step tensor [T, B, ...], got shape "
                             f"{tuple(x.shape)}")
        v0 = self.v if (self.stateful and self.v is not None) else None
        if v0 is None:
            v0 = torch.full_like(x[0], 0.0 if self.v_reset is None else self.v_reset)
        k = self.decay()
        need_k_grad = torch.is_tensor(k) and k.requires_grad
        if torch.is_tensor(k):
            k = k.to(x.dtype)
        spikes, membrane, v_last = _MultiStep.apply(
            x, k, v0, self.kind, self.v_threshold, self.v_reset, self.decay_input, self.detach_reset,
            self.surrogate, need_k_grad)
        if self.stateful:
            self.v = v_last.detach()
        for obs in self.observers:
            obs(self, spikes, membrane)
        return spikes

    def extra_repr(self) -> str:
        return (f"v_threshold={self.v_threshold}, v_reset={self.v_reset}, detach_reset={self.detach_reset}, "
                f"surrogate={self.surrogate}")


class LIF(BaseNeuron):
    """Leaky integrate-and-fire; defaults follow SpikingJelly's ``LIFNode`` (tau=2, V_th=1, hard reset to 0,
    detached reset, ATan(α=2))."""

    kind = "lif"

    def __init__(self, tau: float = 2.0, decay_input: bool = True, **kw):
        super().__init__(**kw)
        if not tau > 1.0:
            raise ValueError(f"tau must be > 1, got {tau}")
        self.tau = float(tau)
        self._decay_input = bool(decay_input)

    @property
    def decay_input(self) -> bool:
        return self._decay_input

    def decay(self) -> float:
        return 1.0 / self.tau

    def extra_repr(self) -> str:
        return f"tau={self.tau}, decay_input={self._decay_input}, " + super().extra_repr()


class IF(BaseNeuron):
    """Integrate-and-fire (no leak). With ``v_reset=None`` it resets by subtraction, as used for ANN→SNN."""

    kind = "if"


class PLIF(LIF):
    """Parametric LIF (Fang et al. 2021): ``1/tau = sigmoid(w)`` is learned, one value per layer."""

    def __init__(self, init_tau: float = 2.0, decay_input: bool = True, **kw):
        super().__init__(tau=init_tau, decay_input=decay_input, **kw)
        self.w = nn.Parameter(torch.tensor(-math.log(init_tau - 1.0)))

    def decay(self) -> torch.Tensor:
        return torch.sigmoid(self.w)

    @property
    def tau_value(self) -> float:
        return float(1.0 / torch.sigmoid(self.w).item())


NEURONS: dict[str, type[BaseNeuron]] = {"lif": LIF, "if": IF, "plif": PLIF}


def make_neuron(spec: str | dict | None = "lif", **overrides) -> BaseNeuron:
    """Build a neuron from a name or a dict ``{"type": "lif", "tau": 2.0, ...}``."""
    if spec is None:
        spec = "lif"
    cfg = {"type": spec} if isinstance(spec, str) else dict(spec)
    cfg.update(overrides)
    kind = cfg.pop("type", "lif")
    if kind not in NEURONS:
        raise ValueError(f"unknown neuron {kind!r}; choose one of {sorted(NEURONS)}")
    try:
        return NEURONS[kind](**cfg)
    except TypeError as e:
        raise ValueError(f"bad option for neuron {kind!r}: {e}") from None


def is_neuron(m: nn.Module) -> bool:
    """True for spikeprune neurons and for neurons of supported frameworks (via adapters)."""
    if isinstance(m, BaseNeuron):
        return True
    from .adapters import is_foreign_neuron

    return is_foreign_neuron(m)
