"""Spiking neurons on multi-step ``[T, B, ...]`` tensors.

All neurons share one charge equation, ``H[t] = a * V[t-1] + b * X[t] + c``:

* LIF, ``decay_input=True``:  ``H = V + (X - (V - V_reset)) / tau``  (SpikingJelly's ``LIFNode``)
* LIF, ``decay_input=False``: ``H = V - (V - V_reset) / tau + X``
* IF:                         ``H = V + X``

then fire ``S = Θ(H - V_th)`` and reset, hard ``V = H (1 - S) + V_reset S`` or soft (``v_reset=None``)
``V = H - V_th S``. The whole sequence runs inside one autograd function whose backward is the exact
BPTT recursion with a surrogate derivative, so no autograd node is made per time step and only the
pre-spike membrane ``H`` is saved. The forward does three or four in-place elementwise operations per step; the
backward computes the surrogate, ``dV/dH`` and the input gradients for all steps at once and loops only over one
multiply-add per step. On CUDA the same two loops run through ``torch.compile`` (fused kernels) when triton is
available (:func:`use_compile`). On CPU, for a constant decay (LIF, IF) and the built-in surrogates, each loop is
one call into the compiled kernel of :mod:`spikeprune._ext` (all T steps per block of neurons while their membrane
stays in cache), with the eager loops as the fallback when it cannot be built. :func:`reference_multistep` is the
plain step-by-step loop, kept as the ground truth for tests.

Observers (``neuron.observers``) receive ``(module, spikes, membrane)`` right after each forward; nothing is stored
when no observer is attached. A unit gate (:func:`set_unit_gate`, the mask engine's unit masks) is folded into the
fused loops: the spikes leave the neuron gated and their gradient is gated on the way back, with no pass of its own;
an observer with ``unit_stats = 1`` (or 2) also receives the per-unit sums ``[1, C]`` (float64) of the *pre-gate* spikes
(and, as a second row, of ``|H|``), counted inside the fused loop: a masked neuron keeps integrating, so its activity
can bring it back.
"""

from __future__ import annotations

import importlib.util
import math
import os
import weakref
from collections.abc import Callable

import torch
from torch import nn

from .kernels import kernels_for, t_major_dense, unit_sums

__all__ = [
    "Surrogate", "ATan", "Sigmoid", "Triangle", "SURROGATES", "make_surrogate",
    "BaseNeuron", "LIF", "IF", "PLIF", "NEURONS", "make_neuron", "reference_multistep", "is_neuron",
    "use_compile", "set_unit_gate", "unit_gate",
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

    def grad_(self, x: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        """``scale · grad(x)``, allowed to overwrite ``x`` (a temporary of the caller's) to save memory and
        kernels; the fused backward folds the input coefficient ``b`` into ``scale``."""
        return self.grad(x) * scale

    def add_grad_(self, out: torch.Tensor, g: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        """``out += scale · grad(x) · g`` in place (``x`` may be overwritten); subclasses fuse it into fewer
        kernels for the fused backward."""
        return out.addcmul_(self.grad_(x, scale), g)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(alpha={self.alpha})"


class ATan(Surrogate):
    """``σ'(x) = (α/2) / (1 + (π/2 · α · x)²)`` (SpikingJelly's default, α=2)."""

    name = "atan"

    def __init__(self, alpha: float = 2.0):
        super().__init__(alpha)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return (self.alpha / 2) / (1 + (math.pi / 2 * self.alpha * x).square())

    def grad_(self, x: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        y = x.mul_(math.pi / 2 * self.alpha).square_().add_(1)
        return torch.div(self.alpha / 2 * scale, y, out=y)

    def add_grad_(self, out: torch.Tensor, g: torch.Tensor, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
        # two kernels: y = 1 + (π/2 α x)², then out += (α/2 scale) g / y
        y = torch.addcmul(torch.ones((), dtype=x.dtype, device=x.device), x, x, value=(math.pi / 2 * self.alpha) ** 2,
                          out=x)
        return out.addcdiv_(g, y, value=self.alpha / 2 * scale)


class Sigmoid(Surrogate):
    """``σ'(x) = α · sg(αx) · (1 - sg(αx))`` (α=4 as in SpikingJelly)."""

    name = "sigmoid"

    def __init__(self, alpha: float = 4.0):
        super().__init__(alpha)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.alpha * x)
        return self.alpha * s * (1 - s)

    def grad_(self, x: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        s = x.mul_(self.alpha).sigmoid_()
        one_minus = torch.rsub(s, 1)
        return s.mul_(self.alpha * scale).mul_(one_minus)


class Triangle(Surrogate):
    """``σ'(x) = α · max(0, 1 - α|x|)``: peak α, support ``|x| < 1/α``, unit area."""

    name = "triangle"

    def __init__(self, alpha: float = 1.0):
        super().__init__(alpha)

    def grad(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * (1 - self.alpha * x.abs()).clamp_min(0)

    def grad_(self, x: torch.Tensor, scale: float | torch.Tensor = 1.0) -> torch.Tensor:
        return x.abs_().mul_(-self.alpha).add_(1).clamp_min_(0).mul_(self.alpha * scale)


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


def _is_one(a) -> bool:
    return isinstance(a, float) and a == 1.0


def _forward_loop(x, k, v0, kind, v_th, v_reset, decay_input, keep_membrane: bool = True):
    """All T steps without a graph; returns ``(spikes, pre-spike membrane H or None, last V)``.

    Each step charges straight into its slice of the membrane buffer (one ``lerp`` for the usual LIF), fires into
    the spike buffer and resets into a reused ``V``: three elementwise kernels on a ``[B, ...]`` slice that stays
    in cache, no allocation, and ``X`` is read once. Without ``keep_membrane`` (inference, no observer) ``H`` lives
    in one reused ``[B, ...]`` buffer."""
    a, b = _coeffs(kind, k, decay_input)
    c = 0.0 if (kind == "if" or v_reset is None) else k * v_reset
    s_seq = torch.empty_like(x)  # x's layout (channels-last stays channels-last) unless x is an expanded view
    h_seq = torch.empty_like(s_seq) if keep_membrane else None
    h_buf = None if keep_membrane else torch.empty_like(s_seq[0])
    v_buf = torch.empty_like(s_seq[0])
    xs, ss = x.unbind(0), s_seq.unbind(0)  # views made once (one call, not 3T indexing calls)
    hs = h_seq.unbind(0) if keep_membrane else None
    v = v0  # None: at rest at 0 (the caller passes V_reset explicitly when it is not 0)
    for t in range(len(xs)):
        h, s = (hs[t] if keep_membrane else h_buf), ss[t]
        if v is None:  # H = b X + c
            torch.mul(xs[t], b, out=h)
        elif kind != "if" and decay_input:  # H = V + k (X - V) (+ k V_reset)
            torch.lerp(v, xs[t], k, out=h)
        elif torch.is_tensor(a):
            torch.addcmul(xs[t], v, a, out=h)
        else:
            torch.add(xs[t], v, alpha=a, out=h)
        if not (isinstance(c, float) and c == 0.0):
            h.add_(c)
        torch.ge(h, v_th, out=s)  # straight into the float spike buffer (a bool mask is slower on CPU)
        if v_reset is None:  # soft reset: V = H - V_th S
            v = torch.add(h, s, alpha=-v_th, out=v_buf)
        else:  # hard reset: V = H - H S + V_reset S, i.e. exactly H or V_reset
            v = torch.addcmul(h, h, s, value=-1.0, out=v_buf)
            if v_reset != 0.0:
                v.add_(s, alpha=v_reset)
    return s_seq, h_seq, v


def _backward_steps(h_seq, k, g_s, g_h_out, g_v_last, kind, v_th, v_reset, decay_input, surrogate, need_v0_grad):
    """BPTT of :func:`_forward_loop` for the common case (detached reset, constant decay), one step at a time.

    It computes ``out[t] = b dL/dH[t]`` (the input gradient) backwards from ``T-1``: ``out[t] = a dV[t]/dH[t]
    out[t+1] + b dL/dH[t] (direct) + b σ'(H[t]-V_th) dL/dS[t]``, with ``dV/dH = 1 - S`` (hard reset) or 1 (soft).
    Every kernel (four or five per step with ATan) works on a ``[B, ...]`` slice that stays in cache; the
    ``[T, B, ...]`` tensors are each touched once, which is what makes this faster than whole-sequence passes."""
    a, b = _coeffs(kind, k, decay_input)
    T = h_seq.shape[0]
    out = torch.empty_like(h_seq)
    tmp = torch.empty_like(out[0])
    keep = None if v_reset is None else torch.empty_like(tmp)
    zero = torch.zeros((), dtype=out.dtype, device=out.device)
    outs, hs = out.unbind(0), h_seq.unbind(0)
    gs = g_s.unbind(0) if g_s is not None else None
    for t in range(T - 1, -1, -1):
        g = outs[t]
        nxt, scale = (outs[t + 1], a) if t < T - 1 else (g_v_last, b)
        if nxt is None:
            g.zero_()
        elif keep is None:
            torch.mul(nxt, scale, out=g)
        else:
            torch.addcmul(zero, torch.lt(hs[t], v_th, out=keep), nxt, value=scale, out=g)
        if g_h_out is not None:
            g.add_(g_h_out[t], alpha=b)
        if gs is not None:
            surrogate.add_grad_(g, gs[t], torch.sub(hs[t], v_th, out=tmp), b)
    g_v0 = out[0] * (a / b) if need_v0_grad else None
    return out, g_v0


def _backward_loop(h_seq, k, v0, g_s, g_h_out, g_v_last, kind, v_th, v_reset, decay_input, detach_reset, surrogate,
                   need_k_grad, need_v0_grad):
    """Exact BPTT of :func:`_forward_loop`; returns ``(dL/dX, dL/dk or None, dL/dV0 or None)``.

    With ``g[t] = dL/dH[t]``: ``g[t] = gin[t] + a · dV[t]/dH[t] · g[t+1]``, where ``gin[t] = dL/dS[t] σ'(H[t] - V_th)
    + dL/dH[t]`` (direct). Everything but this one-multiply-add recursion (the surrogate, ``gin``, ``dV/dH``,
    ``dL/dX = b g`` and ``dL/dk``) is computed for all steps at once."""
    a, b = _coeffs(kind, k, decay_input)
    T = h_seq.shape[0]
    sg = surrogate.grad_(h_seq - v_th) if (g_s is not None or not detach_reset) else None
    if g_s is not None:
        g = sg.mul_(g_s) if detach_reset else g_s * sg  # the reset needs no surrogate when detached
        if g_h_out is not None:
            g.add_(g_h_out)
    elif g_h_out is not None:
        g = g_h_out.clone(memory_format=torch.contiguous_format)
    else:
        g = torch.zeros_like(h_seq)
    # dV[t]/dH[t]: a Python 1.0 (soft reset, detached) or a [T, ...] tensor; the surrogate buffer is reused
    if v_reset is None:
        dv = 1.0 if detach_reset else sg.mul_(-v_th).add_(1)
    else:
        keep = torch.lt(h_seq, v_th, out=torch.empty_like(h_seq))  # 1 - S
        dv = keep if detach_reset else torch.rsub(h_seq, v_reset).mul_(sg).add_(keep)
    if g_v_last is not None:
        g[T - 1].add_(g_v_last if _is_one(dv) else g_v_last * dv[T - 1])
    if _is_one(dv):
        for t in range(T - 2, -1, -1):
            if torch.is_tensor(a):
                g[t].addcmul_(g[t + 1], a)
            else:
                g[t].add_(g[t + 1], alpha=a)
    else:
        m = dv if _is_one(a) else dv.mul_(a)
        for t in range(T - 2, -1, -1):
            g[t].addcmul_(m[t], g[t + 1])
    g_k = None
    if need_k_grad:
        v_first = torch.zeros_like(h_seq[0]) if v0 is None else v0
        v_prev = torch.cat([v_first.unsqueeze(0), _after_reset(h_seq[:-1], v_th, v_reset)])
        # dH/dk: decay_input -> X - (V - Vr) = (H - V)/k ; otherwise -(V - Vr)
        if decay_input:
            dh_dk = (h_seq - v_prev).div_(k)
        else:
            dh_dk = v_prev.neg_() if v_reset is None else v_prev.sub_(v_reset).neg_()
        g_k = (g * dh_dk).sum()
    g_v0 = g[0] * a if need_v0_grad else None
    g_x = g if _is_one(b) else g.mul_(b)
    return g_x, g_k, g_v0


# ------------------------------------------------------------------------------- CPU: compiled kernels
_SURROGATE_CODES = {ATan: 0, Sigmoid: 1, Triangle: 2}  # the surrogates _ext/neuron.cpp knows (exact types)


def _like(t: torch.Tensor | None, ref: torch.Tensor) -> torch.Tensor | None:
    """``t`` in ``ref``'s memory layout (gradients may arrive in another one)."""
    if t is None or t.stride() == ref.stride():
        return t
    return torch.empty_like(ref).copy_(t)


def _unit_view(gate: torch.Tensor, dim: int) -> torch.Tensor:
    """A ``[C]`` gate shaped to broadcast over ``[T, B, C, ...]`` (the last dim of a ``[T, C]`` tensor)."""
    return gate.view(-1, *([1] * (dim - 3))) if dim >= 3 else gate


def _units_ok(x: torch.Tensor) -> bool:
    """Whether the compiled kernels can find the units (dim 2) of ``x`` (steps contiguous or channels-last)."""
    step = x[0]
    return x.dim() >= 3 and (step.is_contiguous() or (step.dim() == 4 and step.is_contiguous(
        memory_format=torch.channels_last)))


def _forward(x, k, v0, kind, v_th, v_reset, decay_input, keep_membrane: bool = True, gate=None, stats: int = 0):
    """:func:`_forward_loop` through the compiled CPU kernel when it applies (constant decay), else eagerly:
    ``(spikes, H or None, last V, unit sums or None)``. ``gate`` [C] multiplies the spikes of each unit (dim 2);
    ``stats`` 1 or 2 (needs ``keep_membrane``) returns the per-unit sums ``[stats, C]`` (float64) of the pre-gate
    spikes and, with 2, of ``|H|``."""
    ext = kernels_for(x) if not torch.is_tensor(k) else None
    if ext is not None:
        x = x if t_major_dense(x, broadcast=True) else x.contiguous()
        if (gate is not None or stats) and not _units_ok(x):
            ext = None
    if ext is None:
        s, h, v = _loops(x)[0](x, k, v0, kind, v_th, v_reset, decay_input, keep_membrane)
        st = None
        if stats:  # only the sums asked for (|H| is a second pass over the membrane)
            st = torch.stack([unit_sums(s, "sum")] + ([unit_sums(h, "abs")] if stats > 1 else [])).double()
        return (s if gate is None else s * _unit_view(gate, s.dim())), h, v, st
    a, b = _coeffs(kind, k, decay_input)
    c = 0.0 if (kind == "if" or v_reset is None) else k * v_reset
    v0 = None if v0 is None else _like(v0, x[0])
    s, h, v, st = ext.lif_forward(x, v0, float(a), float(b), float(c), kind != "if" and decay_input, float(k), v_th,
                                  0.0 if v_reset is None else v_reset, v_reset is not None, keep_membrane,
                                  gate, int(stats))
    return s, (h if keep_membrane else None), v, (st if stats else None)


def _backward_cpp(h_seq, k, g_s, g_h_out, g_v_last, kind, v_th, v_reset, decay_input, surrogate, need_v0_grad,
                  gate=None, gate_grad: bool = False):
    """:func:`_backward_steps` through the compiled CPU kernel, ``(dX, dV0, gate gradient)``; ``None`` when it does
    not apply. With ``gate``, ``g_s`` is the gradient of the gated spikes."""
    code = _SURROGATE_CODES.get(type(surrogate))
    ext = kernels_for(h_seq) if code is not None else None
    if ext is None or not t_major_dense(h_seq) or (gate is not None and not _units_ok(h_seq)):
        return None
    a, b = _coeffs(kind, k, decay_input)
    g_x, dot = ext.lif_backward(h_seq, _like(g_s, h_seq), _like(g_h_out, h_seq), _like(g_v_last, h_seq[0]),
                                float(a), float(b), v_th, v_reset is not None, code, surrogate.alpha, gate,
                                gate_grad)
    return g_x, (g_x[0] * (a / b) if need_v0_grad else None), (dot if gate_grad else None)


def _gate_grad_eager(g_s, h_seq, gate, v_th, want_dot: bool):
    """Eager gate of a spike gradient: ``(g_s * gate, sum g_s * [H >= V_th] per unit or None)``."""
    if g_s is None:
        return None, (torch.zeros_like(gate) if want_dot else None)
    dot = unit_sums(g_s, "dot", (h_seq >= v_th).to(g_s.dtype)) if want_dot else None
    return g_s * _unit_view(gate, g_s.dim()), dot


class _MultiStep(torch.autograd.Function):
    """Forward over all T steps without a graph; backward is the BPTT recursion."""

    @staticmethod
    def forward(ctx, x, k, v0, kind, v_th, v_reset, decay_input, detach_reset, surrogate, need_k_grad, gate=None,
                on_gate=None, stats=0):
        ctx.set_materialize_grads(False)
        s_seq, h_seq, v, st = _forward(x, k, v0, kind, v_th, v_reset, decay_input, True, gate, stats)
        # a constant decay stays a Python float: a float32 copy would make float64 gradients inexact
        ctx.save_for_backward(h_seq, k if torch.is_tensor(k) else None, v0, gate)
        ctx.k_const = None if torch.is_tensor(k) else float(k)
        ctx.cfg = (kind, v_th, v_reset, decay_input, detach_reset, surrogate, need_k_grad)
        ctx.on_gate = on_gate  # receives the gate gradient sum dL/dS * S_pre per unit in the backward
        st = x.new_empty(0) if st is None else st
        ctx.mark_non_differentiable(st)
        return s_seq, h_seq, v, st

    @staticmethod
    def backward(ctx, g_s, g_h_out, g_v_last, _):
        h_seq, k, v0, gate = ctx.saved_tensors
        if k is None:
            k = ctx.k_const
        kind, v_th, v_reset, decay_input, detach_reset, surrogate, need_k_grad = ctx.cfg
        want_dot = ctx.on_gate is not None
        res = g_k = None
        # a detached reset and a constant decay: the closed-form step recursion (compiled, else eager)
        steps = detach_reset and not torch.is_tensor(k) and not _compile_wanted(h_seq)
        if steps:
            res = _backward_cpp(h_seq, k, g_s, g_h_out, g_v_last, kind, v_th, v_reset, decay_input, surrogate,
                                ctx.needs_input_grad[2], gate, want_dot)  # no spike gradient: gate gradient 0
        if res is not None:
            g_x, g_v0, dot = res
        else:
            dot = None
            if gate is not None:
                g_s, dot = _gate_grad_eager(g_s, h_seq, gate, v_th, want_dot)
            if steps:
                g_x, g_v0 = _backward_steps(h_seq, k, g_s, g_h_out, g_v_last, kind, v_th, v_reset, decay_input,
                                            surrogate, ctx.needs_input_grad[2])
            else:
                g_x, g_k, g_v0 = _loops(h_seq)[1](h_seq, k, v0, g_s, g_h_out, g_v_last, kind, v_th, v_reset,
                                                  decay_input, detach_reset, surrogate, need_k_grad,
                                                  ctx.needs_input_grad[2])
        if want_dot:
            ctx.on_gate(dot)
        return g_x, g_k, g_v0, None, None, None, None, None, None, None, None, None, None


# ----------------------------------------------------------------------------------- CUDA: torch.compile
_COMPILE: dict[str, bool | None] = {"enabled": None}  # None: compile on CUDA when triton is importable
_COMPILED: dict = {}


def use_compile(enabled: bool | None = None) -> None:
    """Choose how CUDA tensors run the fused neuron: ``True`` through ``torch.compile`` of the same forward and
    backward loops (fused GPU kernels), ``False`` eagerly, ``None`` (default) compiled when ``triton`` is
    importable. The environment variable ``SPIKEPRUNE_COMPILE=0`` / ``1`` sets it at import. CPU tensors always
    run the eager loops."""
    _COMPILE["enabled"] = enabled


def _compile_wanted(x: torch.Tensor) -> bool:
    if x.device.type != "cuda":
        return False
    enabled = _COMPILE["enabled"]
    if enabled is None:
        enabled = _COMPILE["enabled"] = importlib.util.find_spec("triton") is not None
    return enabled


def _loops(x: torch.Tensor):
    """``(forward, backward)`` loop functions for tensors like ``x``: compiled on CUDA (see :func:`use_compile`)."""
    if not _compile_wanted(x):
        return _forward_loop, _backward_loop
    if not _COMPILED:
        _COMPILED["fwd"] = _compiled(_forward_loop)
        _COMPILED["bwd"] = _compiled(_backward_loop)
    return _COMPILED["fwd"], _COMPILED["bwd"]


def _compiled(fn):
    """``torch.compile(fn)``, allowed more recompilations than dynamo's default 8: every neuron configuration
    (kind, reset, surrogate) and, at first, every layer shape compiles its own graph."""
    import torch._dynamo

    compiled = torch.compile(fn, dynamic=None)
    limit = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"

    def run(*args):
        with torch._dynamo.config.patch(**{limit: 64}):
            return compiled(*args)

    return run


if os.environ.get("SPIKEPRUNE_COMPILE") in ("0", "1"):
    use_compile(os.environ["SPIKEPRUNE_COMPILE"] == "1")


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
_GATES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # neuron -> its unit gate provider


def set_unit_gate(neuron: nn.Module, provider: Callable[[], tuple] | None) -> None:
    """Fold a unit gate into ``neuron`` (a :class:`BaseNeuron`): ``provider()`` returns ``(mask [C], on_gate)`` at
    every forward; the output spikes of unit ``c`` are multiplied by ``mask[c]`` and, when ``on_gate`` is not
    ``None``, the backward calls it with ``sum dL/dS * S_pre`` per unit (the gate's gradient). Kept outside the
    module (copies and pickles of the neuron are not gated, like hooks); ``None`` removes it."""
    if provider is None:
        _GATES.pop(neuron, None)
    else:
        _GATES[neuron] = provider


def unit_gate(neuron: nn.Module) -> Callable[[], tuple] | None:
    """The unit gate provider folded into ``neuron`` (see :func:`set_unit_gate`), or ``None``."""
    return _GATES.get(neuron)


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

    def __getstate__(self) -> dict:
        """Pickled (``torch.save(model)``, ``deepcopy``) without transient observers (a method's activity monitor):
        they belong to the training run, not to the model."""
        state = super().__getstate__()
        state["observers"] = [o for o in state.get("observers", []) if not getattr(o, "transient", False)]
        return state

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
        if v0 is None and self.v_reset:  # at rest at a non-zero V_reset (None: at rest at 0, no tensor needed)
            v0 = torch.full_like(x[0], self.v_reset)
        k = self.decay()
        need_k_grad = torch.is_tensor(k) and k.requires_grad
        if torch.is_tensor(k):
            k = k.to(x.dtype)
        gate = on_gate = None
        provider = _GATES.get(self)
        if provider is not None:
            mask, on_gate = provider()
            gate = mask.to(x.dtype)
        elif self._buffers.get("unit_mask") is not None:  # a saved pruned model, loaded without its engine
            gate = self._buffers["unit_mask"].to(x.dtype)
        grad = torch.is_grad_enabled() and (x.requires_grad or need_k_grad)
        if not self.observers and not grad:
            # nothing will differentiate or look at the membrane: no [T, B, ...] membrane buffer, no graph (nothing
            # here requires grad, so no no_grad context is needed, which saves microseconds at batch 1)
            spikes, _, v_last, _ = _forward(x, k.detach() if torch.is_tensor(k) else k, v0, self.kind,
                                            self.v_threshold, self.v_reset, self.decay_input, False, gate)
            if self.stateful:
                self.v = v_last
            return spikes
        stats = max((int(getattr(o, "unit_stats", 0)) for o in self.observers), default=0) if x.dim() >= 3 else 0
        spikes, membrane, v_last, st = _MultiStep.apply(
            x, k, v0, self.kind, self.v_threshold, self.v_reset, self.decay_input, self.detach_reset,
            self.surrogate, need_k_grad, gate, on_gate if grad else None, stats)
        if self.stateful:
            self.v = v_last.detach()
        for obs in self.observers:
            if getattr(obs, "unit_stats", False):
                obs(self, spikes, membrane, st if stats else None)
            else:
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
