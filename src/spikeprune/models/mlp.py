"""Fully connected SNNs: ``fc3`` (DynSNN's 3 FC, 784-800-800-10) and ``fc2`` (Grad R's 784-800-10)."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from ..layers import Flatten, Linear
from . import register_model
from ._base import SpikingModel, insert_encoder, neuron_factory


class MLP(SpikingModel):
    """``Flatten -> [Linear -> neuron] x hidden -> Linear`` (+ neuron when ``spiking_readout``)."""

    def __init__(self, name: str, hidden: Sequence[int], num_classes: int = 10, in_channels: int = 1,
                 image_size: int = 28, T: int = 4, neuron: str | dict | None = "lif", encoding: str = "direct",
                 spiking_readout: bool = False, bias: bool = False):
        super().__init__(name, (in_channels, image_size, image_size), num_classes, T, encoding)
        make = neuron_factory(neuron)
        widths = [in_channels * image_size * image_size, *hidden]
        layers: list[nn.Module] = [Flatten(3)]
        for i, o in zip(widths[:-1], widths[1:]):
            layers += [Linear(i, o, bias=bias), make()]
        layers.append(Linear(widths[-1], num_classes, bias=bias))
        if spiking_readout:
            layers.append(make())
        self.body = nn.Sequential(*insert_encoder(layers, encoding, T))


@register_model("fc3")
def fc3(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, T: int = 4, neuron="lif",
        encoding: str = "direct", spiking_readout: bool = False, hidden: Sequence[int] = (800, 800)) -> MLP:
    """DynSNN's "3 FC" net, 784-800-800-10 (widths are our reconstruction, docs/methods.md §1)."""
    return MLP("fc3", hidden, num_classes, in_channels, image_size, T, neuron, encoding, spiking_readout)


@register_model("fc2")
def fc2(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, T: int = 8, neuron="lif",
        encoding: str = "direct", spiking_readout: bool = True) -> MLP:
    """Grad R's MNIST "2 FC" net: Linear(784,800) -> LIF -> Linear(800,10) -> LIF, spike-count output."""
    return MLP("fc2", (800,), num_classes, in_channels, image_size, T, neuron, encoding, spiking_readout)
