"""SpikingJelly 2.x (``spikingjelly.activation_based``) models.

What works unchanged: SpikingJelly's ``layer.Linear``/``layer.Conv2d``/``layer.BatchNorm2d`` subclass the
``torch.nn`` layers, so the mask engine's connection masks (buffers + optimizer hooks) and
:func:`spikeprune.measure.measure` see ordinary layers; ``neuron.LIFNode``/``IFNode``/``ParametricLIFNode`` are
recognised as spiking layers and kept whole when the model is traced with ``torch.fx``, so the unit analysis
(:mod:`spikeprune.graph`) finds their producers and consumers. Use multi-step nets (``step_mode='m'``, input
``[T, B, ...]``). A single-step net (``step_mode='s'``) whose ``forward`` takes one step also works (unit axis 1),
as long as the time loop is outside it: a loop inside ``forward`` is unrolled by the trace.

What the user (or spikeprune, where it runs the model) must do:

* call ``functional.reset_net(net)`` before or after every batch: SpikingJelly neurons keep ``v`` between calls.
  spikeprune's graph analysis and :func:`spikeprune.measure.measure` do it themselves;
* after a structural change (compaction, a module swap) call :func:`invalidate` (``functional.invalidate_reset_cache``):
  ``reset_net`` caches the list of resettable modules since 2.0;
* activity methods that score the membrane (``sca``'s ``s + |u|``) need the membrane of every step. A multi-step
  node keeps only the last step's ``v`` unless ``store_v_seq=True``, so :func:`store_membrane` sets it (done by
  :func:`spikeprune.prune` when the method asks for membrane activity). ``v_seq`` holds the membrane *after* the
  reset of each step (spikeprune's own neurons report the pre-spike membrane ``H``).
"""

from __future__ import annotations

import torch
from torch import nn

from . import framework_of

__all__ = ["reset", "invalidate", "membrane", "store_membrane", "neuron_params", "is_node"]


def _functional():
    from spikingjelly.activation_based import functional

    return functional


def is_node(m: nn.Module) -> bool:
    """True for a SpikingJelly neuron (``BaseNode`` subclass)."""
    return framework_of(m) == "spikingjelly"


def reset(model: nn.Module) -> None:
    """``functional.reset_net(model)``: clear ``v`` (and ``v_seq``) of every node before a new batch."""
    try:
        functional = _functional()
    except ImportError:  # a look-alike module without the package: reset what can be reset
        for m in model.modules():
            if is_node(m) and callable(getattr(m, "reset", None)):
                m.reset()
        return
    functional.reset_net(model)


def invalidate(model: nn.Module) -> None:
    """Drop ``reset_net``'s cached module list after a structural change (no-op before SpikingJelly 2.0)."""
    try:
        fn = getattr(_functional(), "invalidate_reset_cache", None)
    except ImportError:
        return
    if fn is not None:
        fn(model)


def store_membrane(model: nn.Module, neurons: list[str] | None = None) -> list[str]:
    """Set ``store_v_seq=True`` on the multi-step nodes of ``model`` (all, or those named) so that the membrane of
    every step is kept in ``v_seq`` after a forward (costs one ``[T, B, ...]`` tensor per node). Returns the names."""
    done = []
    for name, m in model.named_modules():
        if is_node(m) and (neurons is None or name in neurons) and hasattr(m, "store_v_seq"):
            if getattr(m, "step_mode", "s") == "m" and not m.store_v_seq:
                m.store_v_seq = True
            done.append(name)
    return done


def membrane(m: nn.Module) -> torch.Tensor | None:
    """Membrane after the last forward, shaped like its spikes: ``v_seq`` ``[T, B, ...]`` for a multi-step node
    with ``store_v_seq=True``, ``v`` ``[B, ...]`` for a single-step node, else None."""
    if getattr(m, "step_mode", "m") == "m":
        v = getattr(m, "v_seq", None) if getattr(m, "store_v_seq", False) else None
    else:
        v = getattr(m, "v", None)
    return v if torch.is_tensor(v) else None


def neuron_params(m: nn.Module) -> dict:
    """``{"kind": "lif"|"if", "tau", "decay_input", "v_threshold", "v_reset"}`` of a LIF/PLIF/IF node, in
    spikeprune's convention (``v_reset=None``: reset by subtraction)."""
    name = type(m).__name__
    p = {"v_threshold": float(m.v_threshold), "v_reset": None if m.v_reset is None else float(m.v_reset)}
    if name == "IFNode":
        return {"kind": "if", **p}
    if name == "ParametricLIFNode":
        tau = float(1.0 / torch.sigmoid(m.w.detach()).item())
        return {"kind": "lif", "tau": tau, "decay_input": bool(m.decay_input), **p}
    if name == "LIFNode":
        return {"kind": "lif", "tau": float(m.tau), "decay_input": bool(m.decay_input), **p}
    raise ValueError(f"no parameter mapping for SpikingJelly neuron {name} (supported: LIFNode, ParametricLIFNode, "
                     "IFNode)")
