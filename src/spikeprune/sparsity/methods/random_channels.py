"""Random channel pruning: the structured control. The channels kept are drawn uniformly at random (from the
method's seeded generator, the same on every rank), on the same schedule as ``l1_filter`` and ``slimming``, so a
criterion that does not beat it is not choosing channels. Schedule, scope and floor: see ``_channels.py``."""

from __future__ import annotations

import torch

from . import register_method
from ._channels import ChannelPruning, ChannelPruningConfig


@register_method("random_channels")
class RandomChannels(ChannelPruning):
    Config = ChannelPruningConfig
    name = "random_channels"

    def channel_scores(self) -> dict[str, torch.Tensor]:
        return {g.neuron: torch.rand(g.units, generator=self.generator) for g in self.groups}
