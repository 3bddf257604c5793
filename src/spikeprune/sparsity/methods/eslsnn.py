"""ESL-SNN (Shen et al., AAAI 2023): efficient sparse learning of SNNs, sparse from scratch at a fixed density.

The mask starts as an Erdős–Rényi graph at ``target_density`` and keeps that density. Weights train every step;
every ``update_every`` steps (``T_iter``) until ``end`` of the run, each layer drops the ``⌊f(t)·n_active⌋``
smallest ``|w|`` and regrows as many inactive connections with the largest ``|momentum|`` (an EMA of the dense
gradient; ``grow: gradient`` uses the step's gradient instead), with the cosine-decayed fraction
``f(t) = fraction/2 (1 + cos(π t / T_end))``.

The paper gives no code; chosen here [R]: momentum growth (the sparse-momentum rule the same group uses in its
ICLR'25 work), ``fraction`` 0.3 with cosine decay, ``update_every`` 100, ``end`` 0.75, momentum 0.9, ER with the
kernel size ignored, grown weights at 0, no growth where the momentum is exactly 0 (as in ``rigl``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from . import register_method
from ._common import DropGrow, DropGrowConfig


@dataclass
class ESLSNNConfig(DropGrowConfig):
    init: Literal["er", "erk", "uniform"] = "er"
    grow: Literal["gradient", "momentum", "random"] = "momentum"


@register_method("eslsnn")
class ESLSNN(DropGrow):
    Config = ESLSNNConfig
    name = "eslsnn"
