"""Residual SNNs: ``resnet19`` (tdBN/TET family) and ``sew_resnet18`` (SEW ADD, Fang et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..layers import AdaptiveAvgPool2d, Flatten, Linear, MaxPool2d
from . import register_model
from ._base import SpikingModel, insert_encoder, neuron_factory
from .cnn import conv_bn

Make = Callable[[], nn.Module]


def shortcut(cin: int, cout: int, stride: int, make: Make | None = None) -> nn.Module:
    """Identity, or ``1x1 conv + BN [+ neuron]`` when the stride or the width changes."""
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(*conv_bn(cin, cout, make, k=1, stride=stride, padding=0))


class BasicBlock(nn.Module):
    """Spiking basic block: ``LIF(BN(conv(LIF(BN(conv(x))))) + shortcut(x))`` (tdBN / TET ResNet19)."""

    def __init__(self, cin: int, cout: int, stride: int, make: Make):
        super().__init__()
        self.residual = nn.Sequential(*conv_bn(cin, cout, make, stride=stride), *conv_bn(cout, cout))
        self.shortcut = shortcut(cin, cout, stride)
        self.sn = make()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.sn(self.residual(x) + self.shortcut(x))


class SEWBlock(nn.Module):
    """SEW block (ADD): ``LIF(BN(conv(LIF(BN(conv(x)))))) + shortcut(x)``; downsample 1x1 conv+BN+LIF."""

    def __init__(self, cin: int, cout: int, stride: int, make: Make):
        super().__init__()
        self.residual = nn.Sequential(*conv_bn(cin, cout, make, stride=stride), *conv_bn(cout, cout, make))
        self.shortcut = shortcut(cin, cout, stride, make)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.residual(x) + self.shortcut(x)


def make_stages(block: type[nn.Module], cin: int, plan: Sequence[tuple[int, int, int]],
                make: Make) -> list[nn.Module]:
    """One ``nn.Sequential`` of blocks per ``(blocks, width, stride)`` entry of ``plan``."""
    stages = []
    for n, width, stride in plan:
        blocks = []
        for i in range(n):
            blocks.append(block(cin, width, stride if i == 0 else 1, make))
            cin = width
        stages.append(nn.Sequential(*blocks))
    return stages


class SpikingResNet(SpikingModel):
    """``body = stem (conv+BN+neuron, encoder inserted) -> stages -> head`` on ``[T, B, ...]`` tensors."""

    def __init__(self, name: str, stem: list[nn.Module], stages: list[nn.Module], head: list[nn.Module],
                 in_shape: Sequence[int], num_classes: int, T: int, encoding: str):
        super().__init__(name, in_shape, num_classes, T, encoding)
        self.body = nn.Sequential(*insert_encoder(stem, encoding, T), *stages, *head)


@register_model("resnet19")
def resnet19(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, T: int = 2, neuron="lif",
             encoding: str = "direct") -> SpikingResNet:
    """tdBN/TET ResNet19: conv128, BasicBlock stages [3,3,2] x 128/256/512, avgpool, FC256+LIF, FC."""
    make = neuron_factory(neuron)
    stages = make_stages(BasicBlock, 128, [(3, 128, 1), (3, 256, 2), (2, 512, 2)], make)
    head = [AdaptiveAvgPool2d(1), Flatten(3), Linear(512, 256), make(), Linear(256, num_classes)]
    return SpikingResNet("resnet19", conv_bn(in_channels, 128, make), stages, head,
                         (in_channels, image_size, image_size), num_classes, T, encoding)


@register_model("sew_resnet18")
def sew_resnet18(num_classes: int = 10, in_channels: int = 3, image_size: int = 32, T: int = 4, neuron="lif",
                 encoding: str = "direct") -> SpikingResNet:
    """SEW-ResNet-18 (ADD): ImageNet stem (7x7/2 + maxpool) above 64 px, else 3x3/1; [2,2,2,2] blocks."""
    make = neuron_factory(neuron)
    if image_size > 64:
        stem = [*conv_bn(in_channels, 64, make, k=7, stride=2, padding=3), MaxPool2d(3, 2, 1)]
    else:
        stem = conv_bn(in_channels, 64, make)
    stages = make_stages(SEWBlock, 64, [(2, 64, 1), (2, 128, 2), (2, 256, 2), (2, 512, 2)], make)
    head = [AdaptiveAvgPool2d(1), Flatten(3), Linear(512, num_classes)]
    return SpikingResNet("sew_resnet18", stem, stages, head, (in_channels, image_size, image_size),
                         num_classes, T, encoding)
