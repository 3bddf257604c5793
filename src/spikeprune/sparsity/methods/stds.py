"""STDS (Chen et al., ICML 2022): state transition of dendritic spines, a soft-threshold reparameterisation.

Each weight is ``w = sign(θ)·max(|θ| − d(t), 0)`` of a hidden θ (``θ = w0``); the mask is ``|θ| > d(t)``. The
backward pass is straight-through (``∂L/∂θ = ∂L/∂w`` for every connection, from the dense gradient read through
the mask engine's ``dense_grad_hooks``), so dormant "spines" keep learning and can re-emerge. θ takes an optimizer
step of the run's kind and learning rate; the threshold then grows as ``d(t) = D·inc(t/N)``, ``N = end·steps``,
with ``sineInc(x) = (1 + sin(π(x − 0.5)))/2`` (or ``linear``: x), and stays at D after N.

``target_density`` sets D online [R]: after every step D is the ``|θ|`` value that leaves exactly
``target_density`` of all prunable connections above it, so the density reaches the target at ``t = N`` and stays
there. With ``target_density: null`` D is the fixed ``flat_width`` (the paper's knob; calibrate per recipe).

Chosen here [R]: one D over all prunable layers (STDS uses one flat width), the ramp ends at ``end`` = 1.0 of the
run, θ is trained by the run's optimizer kind (the reference uses Adam).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..loop import LoopState
from . import register_method
from ._base import MethodConfig
from ._common import HiddenWeightMethod, total_steps


def sine_inc(x: float) -> float:
    """``(1 + sin(π(x − 0.5)))/2``: 0 at 0, 1/2 at 1/2, 1 at 1."""
    return (1 + math.sin(math.pi * (x - 0.5))) / 2


@dataclass
class STDSConfig(MethodConfig):
    target_density: float | None = 0.1
    flat_width: float = 0.01  # D when target_density is null
    schedule: Literal["sine", "linear"] = "sine"
    end: float = 1.0  # N as a fraction of the run's steps

    def validate(self, key: str) -> None:
        self.check(self.target_density is None or 0 < self.target_density <= 1, f"{key}.target_density",
                   f"must be in (0, 1] or null, got {self.target_density}")
        self.check(self.flat_width >= 0, f"{key}.flat_width", f"must be >= 0, got {self.flat_width}")
        self.check(0 < self.end <= 1, f"{key}.end", f"must be in (0, 1], got {self.end}")


@register_method("stds")
class STDS(HiddenWeightMethod):
    Config = STDSConfig
    name = "stds"

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        self.N = max(1, round(self.cfg.end * total_steps(state, self.name)))
        self.D = self.cfg.flat_width
        self.threshold = 0.0

    def init_theta(self, name: str, w: torch.Tensor) -> torch.Tensor:
        return w.clone()

    def theta_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad.clone()

    def mask_and_weight(self, name: str, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = theta.abs()
        return a > self.threshold, theta.sign() * (a - self.threshold).clamp(min=0)

    def inc(self, t: int) -> float:
        x = min(1.0, t / self.N)
        return sine_inc(x) if self.cfg.schedule == "sine" else x

    @torch.no_grad()
    def after_theta_step(self, state: LoopState, lr: float) -> None:
        if self.cfg.target_density is not None:
            a = torch.cat([t.detach().abs().flatten() for t in self.hidden.theta.values()])
            pruned = a.numel() - round(self.cfg.target_density * a.numel())
            self.D = float(a.kthvalue(pruned).values) if pruned > 0 else 0.0
        self.threshold = self.D * self.inc(state.step)

    def epoch_metrics(self, state: LoopState) -> dict:
        return {**super().epoch_metrics(state), "threshold": self.threshold, "flat_width": self.D}

    def summary(self) -> dict:
        return {"flat_width": self.D, "threshold": self.threshold}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "D": self.D, "threshold": self.threshold}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.D, self.threshold = state.get("D", self.D), state.get("threshold", self.threshold)
