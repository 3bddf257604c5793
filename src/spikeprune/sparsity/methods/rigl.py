"""RigL (Evci et al., ICML 2020): rigging the lottery, sparse from scratch with gradient regrowth.

The mask starts as an ERK graph at ``target_density`` and keeps that density. Every ``update_every`` (ΔT=100)
steps until ``T_end = end · steps`` (0.75 of the run), each layer drops ``⌊f(t)·n_active⌋`` of its smallest
``|w|``, ``f(t) = α/2 (1 + cos(π t / T_end))`` (α = ``fraction`` = 0.3), and grows as many of its previously
inactive connections with the largest ``|∂L/∂w|`` of the dense gradient of the update step (read through the mask
engine's ``dense_grad_hooks`` before the engine masks it). Grown weights start at 0 with clean optimizer state.

Left open or chosen here [R]: connections dropped at a step cannot be regrown at that same step, and inactive
connections whose gradient is exactly 0 (e.g. from a silent neuron) are not grown, since a zero-init weight without
gradient would stay 0; where too few places qualify (e.g. a layer ERK leaves dense) the best dropped ones stay, so the
count is kept. The gradient is that of one mini-batch, averaged over DDP ranks.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import register_method
from ._common import DropGrow, DropGrowConfig


@dataclass
class RigLConfig(DropGrowConfig):
    pass


@register_method("rigl")
class RigL(DropGrow):
    Config = RigLConfig
    name = "rigl"
