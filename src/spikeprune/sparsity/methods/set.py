"""SET (Mocanu et al., Nature Communications 2018): sparse evolutionary training.

The mask starts as an Erdős–Rényi graph at ``target_density`` and keeps that density. After each epoch (after
evaluation), in every layer, the fraction ζ (``fraction``, 0.3) of the smallest positive and of the largest
negative active weights is removed, and as many connections are added at random places (drawn from the method's
generator, so every rank agrees) among the previously inactive ones. No update follows the last epoch, so every
connection that ends the run was trained.

Left open or chosen here [R]: ER on Conv weights ignores the kernel size (``init: er``; ``erk`` is available);
new weights are drawn from ``U(±1/sqrt(fan_in))`` (PyTorch's default init bound; SET draws them from the
network's initial distribution); the counts are ``⌊ζ·n_pos⌋`` and ``⌊ζ·n_neg⌋`` per layer; the first and last
layers are pruned too (``prune_first``/``prune_last``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import register_method
from ._common import DropGrow, DropGrowConfig


@dataclass
class SETConfig(DropGrowConfig):
    init: Literal["er", "erk", "uniform"] = "er"
    decay: Literal["cosine", "constant"] = "constant"
    update_every: int = 0
    end: float = 1.0
    drop: Literal["magnitude", "signed"] = "signed"
    grow: Literal["gradient", "momentum", "random"] = "random"
    grow_init: Literal["zero", "random"] = "random"


@register_method("set")
class SET(DropGrow):
    Config = SETConfig
    name = "set"
