"""Hooks that methods and the mask engine attach to a model, made safe to pickle.

``torch.save(model)`` and ``copy.deepcopy(model)`` pickle every hook and neuron observer with the module that holds
it. The live hooks of a method close over the method, its engine and the optimizer, none of which belongs in a
saved model (and closures cannot be pickled at all). Each is therefore a :class:`MethodHook`: it calls the live
function, and pickles as its ``frozen()`` form, a standalone hook that keeps the model's forward the same without
the method (a unit mask read from the module's own ``unit_mask`` buffer, UPR's soft masks at their current
values), or, where the hook only observes or shapes training (activity monitors, penalties), as an inert hook
(observers marked ``transient`` are dropped by the neuron's own pickling).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..adapters import neuron_spikes, with_spikes


class Inert:
    """What a training-only hook becomes in a saved model: does nothing."""

    transient = True

    def __call__(self, *args, **kwargs) -> None:
        return None


def _revive(frozen: Any) -> Any:
    return Inert() if frozen is None else frozen


class MethodHook:
    """A live hook ``fn`` that pickles as ``frozen()`` (or as an :class:`Inert` hook when ``frozen`` is None)."""

    def __init__(self, fn: Callable, frozen: Callable[[], Any] | None = None, unit_stats: int | None = None):
        self.fn, self.frozen = fn, frozen
        if unit_stats is not None:  # (neuron observers: which per-unit sums the neuron hands over)
            self.unit_stats = unit_stats

    @property
    def transient(self) -> bool:
        return self.frozen is None

    def __call__(self, *args, **kwargs):
        return self.fn(*args, **kwargs)

    def __reduce__(self):
        return _revive, (None if self.frozen is None else self.frozen(),)


class StaticUnitMask:
    """Forward hook: a foreign neuron's output spikes times its module's ``unit_mask`` buffer (what the engine's
    unit hook does, without the engine: the form a pruned model is saved with)."""

    def __init__(self, feat_dims: int):
        self.feat_dims = int(feat_dims)

    def __call__(self, mod, inputs, result):
        um = getattr(mod, "unit_mask", None)
        if um is None:
            return None
        out = neuron_spikes(result)
        return with_spikes(result, out * um.view(-1, *([1] * (self.feat_dims - 1))).to(out.dtype))


__all__ = ["MethodHook", "Inert", "StaticUnitMask"]
