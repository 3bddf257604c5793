"""Convolutional SNNs: ``convnet`` (small, for Fashion-MNIST on a CPU), ``lenet5``, ``cifarnet``, ``vgg_snn``."""

from __future__ import annotations

from torch import nn

from ..layers import AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, VotingLayer
from . import register_model
from ._base import SpikingModel, insert_encoder, neuron_factory


class SequentialSNN(SpikingModel):
    """A zoo model whose body is one ``nn.Sequential`` (the encoder is inserted automatically)."""

    def __init__(self, name, layers, in_shape, num_classes, T, encoding):
        super().__init__(name, in_shape, num_classes, T, encoding)
        self.body = nn.Sequential(*insert_encoder(layers, encoding, T))


def conv_bn(cin: int, cout: int, make, k: int = 3, stride: int = 1, padding: int = 1) -> list[nn.Module]:
    return [Conv2d(cin, cout, k, stride, padding, bias=False), BatchNorm2d(cout), make()]


@register_model("convnet")
def convnet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, T: int = 4, neuron="lif",
            encoding: str = "direct", channels: tuple[int, int] = (32, 64), hidden: int = 256) -> SequentialSNN:
    """Small CNN for 28x28 inputs on a CPU: 2x[conv3x3+BN+LIF+maxpool2] -> FC(hidden)+LIF -> FC(classes)."""
    make = neuron_factory(neuron)
    c1, c2 = channels
    feat = image_size // 4
    layers = [*conv_bn(in_channels, c1, make), MaxPool2d(2), *conv_bn(c1, c2, make), MaxPool2d(2),
              Flatten(3), Linear(c2 * feat * feat, hidden, bias=False), make(),
              Linear(hidden, num_classes, bias=False)]
    return SequentialSNN("convnet", layers, (in_channels, image_size, image_size), num_classes, T, encoding)
