"""Small models and inputs shared by the mask-engine and method tests."""

from __future__ import annotations

import math

import torch
from torch import nn

from spikeprune.graph import SYNAPTIC
from spikeprune.models import create_model
from spikeprune.sparsity import MaskEngine, random_mask


def conv(channels=(4, 6)) -> nn.Module:
    """A tiny zoo convnet for 8x8 inputs."""
    return create_model("convnet", channels=channels, hidden=16, image_size=8)


def x8(batch: int = 4, seed: int = 0) -> torch.Tensor:
    return torch.rand((batch, 1, 8, 8), generator=torch.Generator().manual_seed(seed))


def liven(model: nn.Module, gain: float = 5.0, seed: int = 0, shift_running_mean: bool = False) -> nn.Module:
    """Weights large enough that every layer spikes (so every layer gets gradients)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SYNAPTIC):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * gain / math.sqrt(m.weight[0].numel()))
            if isinstance(m, nn.BatchNorm2d):
                m.bias.copy_(0.3 + 0.2 * torch.rand(m.bias.shape, generator=g))
                if shift_running_mean:
                    m.running_mean.copy_(0.1 * torch.randn(m.running_mean.shape, generator=g))
    return model


def mask_randomly(model: nn.Module, example_input: torch.Tensor, seed: int = 0, density: float = 0.5,
                  dead_every: int = 3) -> MaskEngine:
    """Random connection masks (``density``) on every prunable layer and every ``dead_every``-th unit dead."""
    eng = MaskEngine(model, example_input=example_input)
    g = torch.Generator().manual_seed(seed)
    for n, layer in eng.layers.items():
        eng.set_mask(n, random_mask(layer.weight.shape, density, g))
    for n in eng.enable_units():
        um = torch.ones_like(eng.unit_mask(n))
        um[::dead_every] = False
        eng.set_unit_mask(n, um)
    return eng
