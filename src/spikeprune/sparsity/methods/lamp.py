"""LAMP: layer-adaptive magnitude-based pruning (Lee, Park, Mo, Ahn, Shin; ICLR 2021).

Magnitude pruning with one global ranking whose score rescales each weight by the weights of its own layer that
are at least as large. In a layer with its weights sorted by magnitude, ``|w_1| <= |w_2| <= ... <= |w_n|``,

    score(u) = w_u² / Σ_{v >= u} w_v²

so the largest weight of every layer scores 1 (no layer is ever cut off) and the per-layer densities come out of
the ranking itself: no per-layer ratio is set by hand. The weights with the lowest scores over all prunable layers
are removed. Only active weights are scored (a pruned weight never comes back); ties in magnitude are ordered by
position.

Schedules are those of ``magnitude`` (``schedule: oneshot`` after ``prune_epoch`` epochs, or ``cubic``: the
gradual schedule of Zhu & Gupta, 2017, every ``update_every`` steps up to ``end`` of the run); the LAMP ranking
replaces the per-layer magnitude one at every prune. The paper prunes iteratively with retraining; the gradual
cubic schedule is our choice of iteration [R], the same as ``magnitude``'s so the two differ only in the ranking.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import register_method
from ._common import magnitude_masks
from .magnitude import Magnitude, MagnitudeConfig


@dataclass
class LAMPConfig(MagnitudeConfig):
    """``magnitude``'s options; ``scope`` is ignored (LAMP ranks globally)."""


@torch.no_grad()
def lamp_scores(weight: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """The LAMP score of every weight of one layer (inactive ones, where ``mask`` is False, score 0)."""
    sq = weight.detach().to(torch.float64).pow(2).reshape(-1)
    if mask is not None:
        sq = sq * mask.reshape(-1).to(sq.dtype)
    order = torch.argsort(sq, stable=True)  # ascending; ties by position
    s = sq[order]
    suffix = torch.flip(torch.cumsum(torch.flip(s, [0]), 0), [0])  # Σ_{v >= u} w_v²
    score = torch.where(suffix > 0, s / suffix.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(s))
    out = torch.empty_like(score)
    out[order] = score
    out = out.reshape(weight.shape).to(torch.float32)
    if mask is not None:
        out = out.masked_fill(~mask.to(torch.bool), 0.0)
    return out


@register_method("lamp")
class LAMP(Magnitude):
    Config = LAMPConfig
    name = "lamp"

    def prune(self, density: float, step: int) -> None:
        masks = self.engine.masks()
        scores = {n: lamp_scores(layer.weight, masks[n]) for n, layer in self.engine.layers.items()}
        self.engine.set_masks(magnitude_masks(self.engine, density, "global", scores))
        self.history.append({"step": step, "density": density})
