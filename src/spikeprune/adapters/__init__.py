"""Adapters for models built with other SNN frameworks (imported lazily: the frameworks are optional).

spikeprune's own neurons are multi-step (``[T, B, ...]`` in, spikes out, state reset every call). Models of other
frameworks differ in three ways, which the rest of the library asks about through the small functions here
(no framework is imported unless a model uses it):

* **Output form**: snnTorch neurons return ``spk`` or ``(spk, mem)``; :func:`neuron_spikes` picks the spikes and
  :func:`with_spikes` puts masked spikes back in the same form.
* **Time layout**: snnTorch neurons, and SpikingJelly neurons in ``step_mode='s'``, see one step ``[B, ...]`` per
  call (:func:`single_step`); the unit axis is then 1 instead of 2 (:func:`unit_axis`, :func:`step_shape`).
* **State**: SpikingJelly and snnTorch neurons keep their membrane between calls. Whoever runs such a model resets
  it per batch (:func:`reset_states`: ``functional.reset_net`` / each snnTorch instance's ``reset_mem``), and
  structural changes drop SpikingJelly's cached list of resettable modules (:func:`invalidate`). The membrane after
  a forward is read by :func:`neuron_membrane` (SpikingJelly multi-step: ``v_seq``, kept only with
  ``store_v_seq=True``; snnTorch: ``mem``).

Framework specifics live in :mod:`spikeprune.adapters.spikingjelly` and :mod:`spikeprune.adapters.snntorch`.
"""

from __future__ import annotations

import torch
from torch import nn

_FOREIGN_NEURONS = {
    # module path prefix -> class names that are spiking neurons
    "spikingjelly.activation_based.neuron": ("IFNode", "LIFNode", "ParametricLIFNode", "BaseNode"),
    "snntorch": ("Leaky", "Synaptic", "Lapicque", "Alpha", "RLeaky", "RSynaptic"),
}

__all__ = ["is_foreign_neuron", "framework_of", "neuron_spikes", "with_spikes", "single_step", "unit_axis",
           "step_shape", "neuron_membrane", "reset_states", "invalidate", "uses_framework"]


def framework_of(m: nn.Module) -> str | None:
    """``"spikingjelly"`` or ``"snntorch"`` if ``m`` is a neuron of that framework, else None (by class path)."""
    for cls in type(m).__mro__:
        mod = cls.__module__ or ""
        for prefix, names in _FOREIGN_NEURONS.items():
            if mod.startswith(prefix) and cls.__name__ in names:
                return prefix.split(".")[0]
    return None


def is_foreign_neuron(m: nn.Module) -> bool:
    """True if ``m`` is a neuron of SpikingJelly or snnTorch, checked by its class path (no import needed)."""
    return framework_of(m) is not None


def uses_framework(model: nn.Module, name: str) -> bool:
    """True if any submodule of ``model`` comes from package ``name`` (``"spikingjelly"``, ``"snntorch"``)."""
    return any((type(m).__module__ or "").split(".")[0] == name for m in model.modules())


# ------------------------------------------------------------------------------------------ neuron outputs
def neuron_spikes(out):
    """The spike tensor of a neuron's forward output (``spk`` of snnTorch's ``(spk, mem)``)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def with_spikes(out, spikes: torch.Tensor):
    """``out`` with its spikes replaced (keeps snnTorch's ``(spk, mem)`` form)."""
    if isinstance(out, (tuple, list)):
        return type(out)((spikes, *out[1:])) if isinstance(out, list) else (spikes, *out[1:])
    return spikes


def single_step(m: nn.Module) -> bool:
    """True if neuron ``m`` sees one time step ``[B, ...]`` per call (snnTorch; SpikingJelly ``step_mode='s'``)."""
    fw = framework_of(m)
    if fw == "snntorch":
        return True
    if fw == "spikingjelly":
        return getattr(m, "step_mode", "m") == "s"  # real nodes always say; multi-step otherwise
    return False


def unit_axis(m: nn.Module, spikes: torch.Tensor) -> int:
    """The axis of the units (neurons / channels) in a neuron's output: 1 for ``[B, C, ...]``, 2 for
    ``[T, B, C, ...]``."""
    return 1 if single_step(m) or spikes.dim() <= 2 else 2


def step_shape(m: nn.Module, out) -> tuple[int, ...]:
    """Shape of a neuron's spikes in the multi-step layout ``[T, B, ...]`` (single-step outputs get ``T=1``)."""
    s = neuron_spikes(out)
    return (1, *s.shape) if single_step(m) else tuple(s.shape)


def neuron_membrane(m: nn.Module) -> torch.Tensor | None:
    """The membrane potential behind the last forward's spikes, shaped like them, or None if not exposed.

    spikeprune neurons hand it to observers instead (this returns None). SpikingJelly multi-step neurons keep the
    sequence ``v_seq`` (post-reset membrane per step) only with ``store_v_seq=True``
    (:func:`spikeprune.adapters.spikingjelly.store_membrane`); snnTorch neurons hold ``mem`` of the last step."""
    fw = framework_of(m)
    if fw == "spikingjelly":
        from .spikingjelly import membrane

        return membrane(m)
    if fw == "snntorch":
        from .snntorch import membrane

        return membrane(m)
    return None


# ------------------------------------------------------------------------------------------------ state
def reset_states(model: nn.Module) -> None:
    """Reset the state of every foreign neuron of ``model`` (call before each new batch). spikeprune's own
    neurons reset themselves every call and are left alone."""
    fws = {framework_of(m) for m in model.modules()} - {None}
    if "spikingjelly" in fws:
        from .spikingjelly import reset

        reset(model)
    if "snntorch" in fws:
        from .snntorch import reset

        reset(model)


def invalidate(model: nn.Module) -> None:
    """Tell frameworks that cache module lists (SpikingJelly's ``reset_net``) that ``model``'s structure changed."""
    if any(framework_of(m) == "spikingjelly" for m in model.modules()):
        from .spikingjelly import invalidate as sj_invalidate

        sj_invalidate(model)
