"""Adapters for models built with other SNN frameworks (imported lazily: the frameworks are optional)."""

from __future__ import annotations

from torch import nn

_FOREIGN_NEURONS = {
    # module path prefix -> class names that are spiking neurons
    "spikingjelly.activation_based.neuron": ("IFNode", "LIFNode", "ParametricLIFNode", "BaseNode"),
    "snntorch": ("Leaky", "Synaptic", "Lapicque", "Alpha", "RLeaky", "RSynaptic"),
}


def is_foreign_neuron(m: nn.Module) -> bool:
    """True if ``m`` is a neuron of SpikingJelly or snnTorch, checked by its class path (no import needed)."""
    for cls in type(m).__mro__:
        mod = cls.__module__ or ""
        for prefix, names in _FOREIGN_NEURONS.items():
            if mod.startswith(prefix) and cls.__name__ in names:
                return True
    return False
