"""Convolutional SNNs: ``convnet`` (small, Fashion-MNIST on a CPU), ``lenet5``, ``cifarnet``, ``vgg_snn``,
``vgg16_bn`` (SCA's VGG-16-BN)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import nn

from ..layers import AvgPool2d, BatchNorm2d, Conv2d, Dropout, Flatten, Linear, MaxPool2d, VotingLayer
from . import register_model
from ._base import SpikingModel, insert_encoder, neuron_factory


class SequentialSNN(SpikingModel):
    """A zoo model whose body is one ``nn.Sequential`` (the encoder is inserted automatically)."""

    def __init__(self, name: str, layers: list[nn.Module], in_shape: Sequence[int], num_classes: int, T: int,
                 encoding: str):
        super().__init__(name, in_shape, num_classes, T, encoding)
        self.body = nn.Sequential(*insert_encoder(layers, encoding, T))


def conv_bn(cin: int, cout: int, make: Callable[[], nn.Module] | None = None, k: int = 3, stride: int = 1,
            padding: int = 1, bn: bool = True, bias: bool = False) -> list[nn.Module]:
    """``Conv2d [+ BatchNorm2d] [+ neuron]``: the neuron is left out when ``make`` is None."""
    layers: list[nn.Module] = [Conv2d(cin, cout, k, stride, padding, bias=bias)]
    if bn:
        layers.append(BatchNorm2d(cout))
    if make is not None:
        layers.append(make())
    return layers


def pooled(image_size: int, factor: int, name: str) -> int:
    """Feature-map side after downsampling by ``factor``; a ``ValueError`` when the image is too small."""
    side = image_size // factor
    if side < 1:
        raise ValueError(f"{name} needs image_size >= {factor}, got {image_size}")
    return side


@register_model("convnet")
def convnet(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, T: int = 4, neuron="lif",
            encoding: str = "direct", channels: tuple[int, int] = (16, 32),
            hidden: int = 256, pool: str = "max") -> SequentialSNN:
    """Small CNN for 28x28 inputs on a CPU: 2x[conv3x3+BN+maxpool2+LIF] -> FC(hidden)+LIF -> FC(classes).

    Pooling the membrane input before the neuron (not the spikes after it) keeps spikes binary for the next layer,
    lets the first pool run once in the static stem, and gives the neurons 4x fewer elements to integrate.
    ``pool="avg"`` uses average pooling, which NIR can express (NIR has no max pooling)."""
    if pool not in ("max", "avg"):
        raise ValueError(f"convnet pool must be 'max' or 'avg', got {pool!r}")
    Pool = MaxPool2d if pool == "max" else AvgPool2d
    make = neuron_factory(neuron)
    c1, c2 = channels
    feat = pooled(image_size, 4, "convnet")
    layers = [*conv_bn(in_channels, c1), Pool(2), make(), *conv_bn(c1, c2), Pool(2), make(),
              Flatten(3), Linear(c2 * feat * feat, hidden, bias=False), make(),
              Linear(hidden, num_classes, bias=False)]
    return SequentialSNN("convnet", layers, (in_channels, image_size, image_size), num_classes, T, encoding)


@register_model("lenet5")
def lenet5(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, T: int = 4, neuron="lif",
           encoding: str = "direct", bn: bool = False) -> SequentialSNN:
    """DynSNN's LeNet-5-like net: 6C5-AP2-16C5-AP2-FC120-FC84-FC(classes); biases, BN optional (ANN->SNN)."""
    make = neuron_factory(neuron)
    pad = 2 if image_size <= 28 else 0  # 28x28 (MNIST) keeps 28 after conv1, as 32x32 without padding
    feat = pooled((image_size + 2 * pad - 4) // 2 - 4, 2, "lenet5")
    layers = [*conv_bn(in_channels, 6, make, 5, padding=pad, bn=bn, bias=not bn), AvgPool2d(2),
              *conv_bn(6, 16, make, 5, padding=0, bn=bn, bias=not bn), AvgPool2d(2),
              Flatten(3), Linear(16 * feat * feat, 120), make(), Linear(120, 84), make(),
              Linear(84, num_classes)]
    return SequentialSNN("lenet5", layers, (in_channels, image_size, image_size), num_classes, T, encoding)


@register_model("cifarnet")
def cifarnet(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, T: int = 8, neuron="lif",
             encoding: str = "direct", dropout: float = 0.5, voting: int = 10) -> SequentialSNN:
    """Grad R / STDS / UPR "6 Conv, 2 FC" CIFAR net: 3x conv256, MP2, 3x conv256, MP2, FC2048, FC(10*classes),
    voting; no biases (docs/methods.md §1)."""
    make = neuron_factory(neuron)
    feat = pooled(image_size, 4, "cifarnet")
    layers = [*conv_bn(in_channels, 256, make), *conv_bn(256, 256, make), *conv_bn(256, 256, make),
              MaxPool2d(2), *conv_bn(256, 256, make), *conv_bn(256, 256, make), *conv_bn(256, 256, make),
              MaxPool2d(2),
              Flatten(3), Dropout(dropout), Linear(256 * feat * feat, 2048, bias=False), make(),
              Dropout(dropout), Linear(2048, num_classes * voting, bias=False), make(), VotingLayer(voting)]
    return SequentialSNN("cifarnet", layers, (in_channels, image_size, image_size), num_classes, T, encoding)


@register_model("vgg_snn")
def vgg_snn(num_classes: int = 10, in_channels: int = 2, image_size: int = 48, T: int = 10, neuron="lif",
            encoding: str = "events") -> SequentialSNN:
    """TET's VGGSNN for DVS-CIFAR10: 64C3-128C3-AP2-256C3-256C3-AP2-(512C3-512C3-AP2)x2 -> FC(classes)."""
    make = neuron_factory(neuron)
    feat = pooled(image_size, 16, "vgg_snn")
    layers: list[nn.Module] = []
    cin = in_channels
    for cout in (64, 128, "A", 256, 256, "A", 512, 512, "A", 512, 512, "A"):
        if cout == "A":
            layers.append(AvgPool2d(2))
        else:
            layers += conv_bn(cin, cout, make)
            cin = cout
    layers += [Flatten(3), Linear(512 * feat * feat, num_classes)]
    return SequentialSNN("vgg_snn", layers, (in_channels, image_size, image_size), num_classes, T, encoding)


VGG16_PLAN = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")


@register_model("vgg16_bn")
def vgg16_bn(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, T: int = 4, neuron="lif",
             encoding: str = "direct", pool: str = "max", width: float = 1.0) -> SequentialSNN:
    """SCA's ``snnvgg16_bn`` (CIFAR style, docs/methods.md §1.3 and §5): 13 x [conv3x3 + BN + LIF] in the VGG-16
    plan 64,64,M,128,128,M,256x3,M,512x3,M,512x3,M, then FC(512 -> classes); no conv biases.

    The pools follow the neuron (max of spikes is still a spike; ``pool="avg"`` gives pooled rates, which
    ``measure.pooled_spikes`` decides how to count). ``width`` scales every conv width (tiny nets for tests)."""
    if pool not in ("max", "avg"):
        raise ValueError(f"vgg16_bn pool must be 'max' or 'avg', got {pool!r}")
    if not width > 0:
        raise ValueError(f"vgg16_bn width must be > 0, got {width}")
    Pool = MaxPool2d if pool == "max" else AvgPool2d
    make = neuron_factory(neuron)
    feat = pooled(image_size, 32, "vgg16_bn")
    layers: list[nn.Module] = []
    cin = in_channels
    for v in VGG16_PLAN:
        if v == "M":
            layers.append(Pool(2))
        else:
            cout = max(1, round(v * width))
            layers += conv_bn(cin, cout, make)
            cin = cout
    layers += [Flatten(3), Linear(cin * feat * feat, num_classes)]
    return SequentialSNN("vgg16_bn", layers, (in_channels, image_size, image_size), num_classes, T, encoding)
