"""DynSNN (Liu et al., ICASSP 2022): mask *fading* neurons whose firing activity falls below a threshold
found during training.

For every prunable spiking layer an EMA of each unit's would-be firing rate is kept, computed *before* the unit
mask so masked neurons keep integrating and can come back. Every ``update_every`` steps the threshold
``θ_ℓ = κ · mean(activity of alive units)`` is recomputed and ``mask = activity >= θ_ℓ``. With
``target_compression`` set, κ itself is learned: after each update it moves by ``κ ← κ·exp(κ_lr·(target −
compression))`` so the run settles at the requested fraction of removed weights; ``ramp_epochs`` raises that
target along a cubic ramp (as in gradual magnitude pruning) so the network is not cut by half in one update.
``reference: all`` takes the mean over all units instead of the alive ones, which removes a feedback loop
(masking a unit raises the alive mean, which masks more units). Masks freeze at
``freeze_epoch`` for fine-tuning. Conv layers are masked per channel. Compression = removed weights (a masked
unit loses its fan-in row and fan-out column), measured from the effective weights.

``kappa_rule: solved`` (with ``target_compression``) replaces the κ controller by a search: at every update κ is
set, by bisection over the same ``θ_ℓ = κ · mean`` rule, to the smallest value whose masks reach the current target
(the ramp's value). The run then lands on the target when the ramp ends (within one unit's weights) instead of
wherever the controller has got to by ``freeze_epoch``, and a cubic ramp reaches any target within the budget.
The threshold rule and the revival of units are unchanged; only how κ follows the target differs [R]. ``learned``
(default) is the controller above, the ablation "with and without the learned threshold" compares the two.

Left open by the paper and chosen here [R]: the EMA (β=0.9), the κ·mean threshold rule, the update period, the
κ controller and its ramp, the reference set of the mean, per-channel masks in conv layers, and no co-activity
term.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch

from ..loop import LoopState
from ..scores import ActivityMonitor
from . import register_method
from ._base import Method, MethodConfig


@dataclass
class DynSNNConfig(MethodConfig):
    beta: float = 0.9
    kappa: float = 0.2
    threshold: Literal["mean", "percentile"] = "mean"
    percentile: float = 10.0  # with threshold: percentile, θ is this percentile of alive activity (× κ/κ0)
    target_compression: float | None = None
    kappa_lr: float = 2.0
    ramp_epochs: float = 0.0  # the target compression rises (cubic) over this many epochs after warm-up
    reference: Literal["alive", "all"] = "alive"  # which units' mean activity sets θ
    update_every: int = 100  # steps between mask updates
    warmup_epochs: int = 1
    freeze_epoch: int | None = None  # masks stop changing from this epoch (0-based) on
    min_alive: float = 0.02  # never mask more than 1 - min_alive of a layer
    kappa_rule: Literal["learned", "solved"] = "learned"  # κ by the controller, or solved for the target each update

    def validate(self, key: str) -> None:
        self.check(0 <= self.beta < 1, f"{key}.beta", f"must be in [0, 1), got {self.beta}")
        self.check(self.kappa > 0, f"{key}.kappa", f"must be > 0, got {self.kappa}")
        self.check(0 < self.percentile < 100, f"{key}.percentile", "must be in (0, 100)")
        self.check(self.target_compression is None or 0 <= self.target_compression < 1,
                   f"{key}.target_compression", f"must be in [0, 1) or null, got {self.target_compression}")
        self.check(self.kappa_lr >= 0, f"{key}.kappa_lr", f"must be >= 0, got {self.kappa_lr}")
        self.check(self.ramp_epochs >= 0, f"{key}.ramp_epochs", f"must be >= 0, got {self.ramp_epochs}")
        self.check(self.update_every >= 1, f"{key}.update_every", "must be >= 1")
        self.check(self.freeze_epoch is None or self.freeze_epoch >= 0, f"{key}.freeze_epoch",
                   f"must be >= 0 or null, got {self.freeze_epoch}")
        self.check(self.warmup_epochs >= 0, f"{key}.warmup_epochs", "must be >= 0")
        self.check(0 <= self.min_alive <= 1, f"{key}.min_alive", "must be in [0, 1]")
        self.check(self.kappa_rule == "learned" or self.target_compression is not None, f"{key}.kappa_rule",
                   "solved needs a target_compression")


def smallest_kappa(compression: Callable[[float], float], target: float, start: float, steps: int,
                   rtol: float = 0.0, saturated: Callable[[float], bool] = lambda k: k >= 2.0 ** 20,
                   max_doublings: int | None = None) -> tuple[float, bool]:
    """The smallest κ whose masks reach ``target`` compression (``compression`` non-decreasing in κ; it may set
    masks as it goes): double from ``start`` until reached, then ``steps`` bisections (stopping early once the
    bracket is within ``rtol``). Returns ``(κ, True)``, or ``(the last κ tried, False)`` when ``saturated(κ)`` or
    ``max_doublings`` ends the doubling first. Used by the method and by post-conversion masking."""
    lo, hi, n = 0.0, start, 0
    while compression(hi) < target:
        if saturated(hi) or n == max_doublings:
            return hi, False
        lo, hi, n = hi, 2 * hi, n + 1
    for _ in range(steps):
        mid = (lo + hi) / 2
        if compression(mid) >= target:
            hi = mid
        else:
            lo = mid
        if hi - lo < rtol * hi:
            break
    return hi, True


@register_method("dynsnn")
class DynSNN(Method):
    Config = DynSNNConfig
    name = "dynsnn"

    def requirements(self) -> list[tuple[str, str]]:
        return [*super().requirements(), ("example_input", "trace which spiking units it can mask")]

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        self.neurons = self.engine.enable_units()
        self.monitor = ActivityMonitor(self.engine.model, self.neurons, "spikes", ema=self.cfg.beta)
        self.kappa = self.cfg.kappa
        self.progress = 0.0
        self.compression = 0.0
        self.dense_nonzero = None

    def _active(self, state: LoopState) -> bool:
        frozen = self.cfg.freeze_epoch is not None and state.epoch >= self.cfg.freeze_epoch
        return state.epoch >= self.cfg.warmup_epochs and not frozen

    def on_step_end(self, state: LoopState) -> None:
        self.progress = state.progress
        if self._active(state) and state.step % self.cfg.update_every == 0:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        """Recompute every layer's threshold and unit mask from the activity EMAs (revival allowed)."""
        acts = self.monitor.values()
        inputs = {}
        for n in self.neurons:
            if n not in acts:
                continue
            alive = self.engine.unit_mask(n)
            a = acts[n].to(alive.device)  # (a resumed monitor holds CPU tensors)
            inputs[n] = (a, a[alive] if (self.cfg.reference == "alive" and alive.any()) else a)
        if self.cfg.kappa_rule == "solved" and inputs:
            self.kappa = self._solve_kappa(inputs, self.current_target())
        self._apply(inputs, self.kappa)
        self.compression = 1 - self.engine.density()
        if self.cfg.target_compression is not None and self.cfg.kappa_rule == "learned":
            self.kappa *= math.exp(self.cfg.kappa_lr * (self.current_target() - self.compression))

    def _apply(self, inputs: dict, kappa: float) -> None:
        for n, (a, ref) in inputs.items():
            if self.cfg.threshold == "mean":
                theta = kappa * ref.mean()
            else:
                theta = torch.quantile(ref.float(), min(0.999, self.cfg.percentile / 100 * kappa / self.cfg.kappa))
            mask = a >= theta
            floor = max(1, math.ceil(self.cfg.min_alive * a.numel()))
            if int(mask.sum()) < floor:
                mask = torch.zeros_like(mask)
                mask[torch.topk(a, floor).indices] = True
            self.engine.set_unit_mask(n, mask)

    def _solve_kappa(self, inputs: dict, target: float, steps: int = 40) -> float:
        """The smallest κ (bisection) whose masks remove at least ``target`` of the weights; the masks grow
        monotonically with κ because the reference means are fixed during the search."""
        def compression(k: float) -> float:
            self._apply(inputs, k)
            return 1 - self.engine.density()

        def saturated(k: float) -> bool:  # a larger κ masks nothing more: every layer at its min_alive floor
            if self.cfg.threshold == "percentile":
                return self.cfg.percentile / 100 * k / self.cfg.kappa >= 0.999
            return all(k * float(ref.mean()) > float(a.max()) for a, ref in inputs.values())

        if compression(0.0) >= target:
            return 0.0
        return smallest_kappa(compression, target, max(self.kappa, 1e-6), steps, saturated=saturated,
                              max_doublings=60)[0]

    def current_target(self) -> float:
        """The compression κ is steered to now: the final target, reached by a cubic ramp (Zhu & Gupta)."""
        c = self.cfg
        if c.target_compression is None or c.ramp_epochs <= 0:
            return c.target_compression or 0.0
        p = min(1.0, max(0.0, (self.progress - c.warmup_epochs) / c.ramp_epochs))
        return c.target_compression * (1 - (1 - p) ** 3)

    def epoch_metrics(self, state: LoopState) -> dict:
        alive = sum(int(self.engine.unit_mask(n).sum()) for n in self.neurons)
        total = sum(self.engine.unit_mask(n).numel() for n in self.neurons)
        dens = self.engine.density()
        return {"density": dens, "compression": 1 - dens, "kappa": self.kappa, "units_alive": alive,
                "units": total}

    def summary(self) -> dict:
        return {"kappa": self.kappa, "units_alive": {n: int(self.engine.unit_mask(n).sum()) for n in self.neurons},
                "units": {n: self.engine.unit_mask(n).numel() for n in self.neurons}}

    def extra_state(self) -> dict:
        return {"kappa": self.kappa, "monitor": self.monitor.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.kappa = state.get("kappa", self.kappa)
        self.monitor.load_state_dict(state.get("monitor", {}))
