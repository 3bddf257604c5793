"""L1-norm filter pruning (Li, Kadav, Durdanovic, Samet, Graf; "Pruning Filters for Efficient ConvNets", ICLR 2017).

A conv filter's importance is the sum of the absolute values of its kernel weights, ``s_c = Σ |W[c, :, :, :]|``;
the filters with the smallest sums are pruned with their feature maps (and the next layer's kernels on them), and
the network is retrained. Here a filter is a channel of a conv group (summed over the group's producers) and is
pruned through its unit mask; ``spikeprune compact`` then removes it. Schedule, scope and floor: see
``_channels.py`` (the paper prunes once and retrains, with a ratio chosen per layer from a sensitivity analysis;
the same ratio in every layer, ``scope: layer``, is our default [R]).
"""

from __future__ import annotations

import torch

from . import register_method
from ._channels import ChannelPruning, ChannelPruningConfig


@register_method("l1_filter")
class L1Filter(ChannelPruning):
    Config = ChannelPruningConfig
    name = "l1_filter"

    @torch.no_grad()
    def channel_scores(self) -> dict[str, torch.Tensor]:
        modules = dict(self.engine.model.named_modules())
        out = {}
        for g in self.groups:
            out[g.neuron] = sum(modules[p].weight.detach().abs().reshape(g.units, -1).sum(1) for p in g.producers)
        return out
