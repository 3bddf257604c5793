"""Network slimming (Liu, Li, Shen, Huang, Yan, Zhang; ICCV 2017): channel scaling factors of BatchNorm with an L1
penalty.

Training adds ``λ·Σ|γ|`` over the BN scales of the prunable channels (its subgradient ``λ·sign(γ)`` is added to
their gradients before every optimizer step), which drives the scales of unneeded channels towards zero; then the
channels with the smallest ``|γ|``, ranked over all layers together (one global threshold, ``scope: global``), are
pruned and the network is fine-tuned without the penalty. Here a channel is pruned through its unit mask (the gate
after its neuron) and ``spikeprune compact`` removes it. Every pruned conv group needs a BatchNorm.

Paper values: λ = 1e-4 (VGG on CIFAR; 1e-5 for ResNet and DenseNet), SGD. Chosen here [R]: the run's optimizer
(Adam in the Fashion-MNIST recipes) takes the penalised gradients, the penalty stops at the prune, one prune
(Liu et al. also iterate), schedule and floor as in ``_channels.py``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from ..loop import LoopState
from . import register_method
from ._channels import ChannelPruning, ChannelPruningConfig


@dataclass
class SlimmingConfig(ChannelPruningConfig):
    scope: Literal["layer", "global"] = "global"
    l1: float = 1e-4  # λ of the L1 penalty on the BN scales (0: none)

    def validate(self, key: str) -> None:
        super().validate(key)
        self.check(self.l1 >= 0, f"{key}.l1", f"must be >= 0, got {self.l1}")


@register_method("slimming")
class Slimming(ChannelPruning):
    Config = SlimmingConfig
    name = "slimming"

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        modules = dict(self.engine.model.named_modules())
        missing = [g.neuron for g in self.groups if not any(modules[b].weight is not None for b in g.norms)]
        if missing:
            raise ValueError(f"slimming needs a BatchNorm (with a scale) after each pruned conv; none before "
                             f"{missing}: use l1_filter or random_channels on this network")
        self.norms = {g.neuron: next(modules[b] for b in g.norms if modules[b].weight is not None)
                      for g in self.groups}
        self._hook = state.optimizer.register_step_pre_hook(lambda *a: self._penalty())

    @torch.no_grad()
    def _penalty(self) -> None:
        if self.pruned or self.cfg.l1 <= 0:
            return
        for bn in self.norms.values():
            if bn.weight.grad is not None:
                bn.weight.grad.add_(torch.sign(bn.weight), alpha=self.cfg.l1)

    @torch.no_grad()
    def channel_scores(self) -> dict[str, torch.Tensor]:
        return {n: bn.weight.detach().abs() for n, bn in self.norms.items()}

    def __getstate__(self) -> dict:  # the optimizer's hook handle stays behind (torch.save of a model)
        st = dict(self.__dict__)
        st.pop("_hook", None)
        return st
