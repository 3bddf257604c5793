"""Grad R (Chen et al., IJCAI 2021): gradient rewiring with a sign-fixed hidden parameter and a Laplace prior.

Each connection has a sign ``s`` fixed at initialisation and a hidden ``θ`` (``θ = |w0|``), with
``w = s·ReLU(θ)``. The gradient reaches θ for **all** connections, ``∂L/∂θ = s·∂L/∂w`` from the dense gradient
(read through the mask engine's ``dense_grad_hooks`` before masking), so a pruned connection whose gradient pushes
θ above 0 grows back. θ takes an optimizer step of the run's kind and learning rate η, then the prior term
``θ ← θ − η·α·sign(θ − μ)`` with ``μ = ln(2(1 − s_t))/α`` (``s_t = 1 − target_density ≥ 0.5``). The mask is
``θ > 0`` (set through the engine) and the active weights are ``s·θ``.

The sparsity reached depends on α. With ``control: true`` (default) α is set after every step by a predictive
controller [R]: the prior alone lowers every θ above μ by ``η·α`` per step, so
``α = v / (K·η)``, where v is the θ of rank ``ρ_ref(t + K)·n`` (all prunable connections together), makes the prior
bring the density to the reference ``ρ_ref`` within the next ``K = control_horizon·steps`` steps; gradients that hold
or regrow connections are answered at the next step. ``ρ_ref`` glides cubically (Zhu & Gupta) from 1 to
``target_density`` at ``control_end`` of the run and stays there. Below the reference v ≤ 0 and α drops to
``alpha_min``: only the gradient acts, regrowing what the loss needs. ``control: false`` keeps ``α = alpha`` (the
paper's setting; calibrate it per recipe).

Chosen here [R]: the run's optimizer kind and settings for θ (the reference uses Adam), the prior step uses η
without Adam's bias correction, exact zeros at initialisation get sign +1 (and start dormant).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..loop import LoopState
from . import register_method
from ._base import MethodConfig
from ._common import HiddenWeightMethod, cubic_sparsity, total_steps


@dataclass
class GradRConfig(MethodConfig):
    target_density: float = 0.1  # 1 - s of the paper; must be <= 0.5
    alpha: float = 1.0  # α of the Laplace prior with control: false
    control: bool = True
    control_end: float = 0.75  # the reference density reaches the target at this fraction of the run
    control_horizon: float = 0.02  # K as a fraction of the run's steps
    alpha_min: float = 1e-6

    def validate(self, key: str) -> None:
        self.check(0 < self.target_density <= 0.5, f"{key}.target_density",
                   f"must be in (0, 0.5] (Grad R needs a target sparsity >= 0.5), got {self.target_density}")
        self.check(self.alpha > 0, f"{key}.alpha", f"must be > 0, got {self.alpha}")
        self.check(0 < self.control_end <= 1, f"{key}.control_end", f"must be in (0, 1], got {self.control_end}")
        self.check(0 < self.control_horizon <= 1, f"{key}.control_horizon",
                   f"must be in (0, 1], got {self.control_horizon}")
        self.check(self.alpha_min > 0, f"{key}.alpha_min", f"must be > 0, got {self.alpha_min}")


def prior_center(sparsity: float, alpha: float) -> float:
    """μ of the Laplace prior: ``ln(2(1 − s))/α``."""
    return math.log(2 * (1 - sparsity)) / alpha


@register_method("grad_r")
class GradR(HiddenWeightMethod):
    Config = GradRConfig
    name = "grad_r"

    def setup(self, state: LoopState) -> None:
        self.signs: dict[str, torch.Tensor] = {}
        super().setup(state)
        steps = total_steps(state, self.name)
        self.end, self.horizon = round(self.cfg.control_end * steps), max(1, round(self.cfg.control_horizon * steps))
        self.alpha = self.cfg.alpha

    def reference(self, t: int) -> float:
        """ρ_ref(t): from 1 to ``target_density`` at ``control_end`` (cubic), flat after."""
        return 1 - cubic_sparsity(t, 0.0, 1 - self.cfg.target_density, 0, self.end)

    def control(self, t: int, lr: float) -> float:
        """α that lets the prior alone bring the density to ``ρ_ref(t + K)`` within K steps."""
        theta = torch.cat([p.detach().flatten() for p in self.hidden.theta.values()])
        keep = round(self.reference(t + self.horizon) * theta.numel())
        v = float(theta.kthvalue(theta.numel() - keep).values) if keep < theta.numel() else 0.0
        return max(self.cfg.alpha_min, v / (self.horizon * lr)) if v > 0 and lr > 0 else self.cfg.alpha_min

    def init_theta(self, name: str, w: torch.Tensor) -> torch.Tensor:
        self.signs[name] = torch.where(w < 0, -1.0, 1.0).to(w.dtype)
        return w.abs()

    def theta_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        return grad * self.signs[name]

    def mask_and_weight(self, name: str, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return theta > 0, theta.clamp(min=0) * self.signs[name]

    @torch.no_grad()
    def after_theta_step(self, state: LoopState, lr: float) -> None:
        if self.cfg.control:
            self.alpha = self.control(state.step, lr)
        mu = prior_center(1 - self.cfg.target_density, self.alpha)
        for theta in self.hidden.theta.values():
            theta.sub_(torch.sign(theta - mu), alpha=lr * self.alpha)

    def epoch_metrics(self, state: LoopState) -> dict:
        return {**super().epoch_metrics(state), "alpha": self.alpha}

    def summary(self) -> dict:
        return {"alpha": self.alpha}

    def extra_state(self) -> dict:
        return {**super().extra_state(), "alpha": self.alpha,
                "signs": {k: v.cpu() for k, v in self.signs.items()}}

    def load_extra_state(self, state: dict) -> None:
        super().load_extra_state(state)
        self.alpha = state.get("alpha", self.alpha)
        for k, v in state.get("signs", {}).items():
            self.signs[k].copy_(v)
