"""DynSNN (Liu et al., ICASSP 2022): mask *fading* neurons whose firing activity falls below a threshold
found during training.

For every prunable spiking layer an EMA of each unit's would-be firing rate is kept, computed *before* the unit
mask so masked neurons keep integrating and can come back. Every ``update_every`` steps the threshold
``θ_ℓ = κ · mean(activity of alive units)`` is recomputed and ``mask = activity >= θ_ℓ``. With
``target_compression`` set, κ itself is learned: after each update it moves by ``κ ← κ·exp(κ_lr·(target −
compression))`` so the run settles at the requested fraction of removed weights. Masks freeze at
``freeze_epoch`` for fine-tuning. Conv layers are masked per channel. Compression = removed weights (a masked
unit loses its fan-in row and fan-out column), measured from the effective weights.

Left open by the paper and chosen here [R]: the EMA (β=0.9), the κ·mean threshold rule, the update period, the
κ controller, per-channel masks in conv layers, and no co-activity term.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

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
    update_every: int = 100  # steps between mask updates
    warmup_epochs: int = 1
    freeze_epoch: int | None = None  # masks stop changing from this epoch (0-based) on
    min_alive: float = 0.02  # never mask more than 1 - min_alive of a layer

    def validate(self, key: str) -> None:
        self.check(0 <= self.beta < 1, f"{key}.beta", f"must be in [0, 1), got {self.beta}")
        self.check(self.kappa > 0, f"{key}.kappa", f"must be > 0, got {self.kappa}")
        self.check(0 < self.percentile < 100, f"{key}.percentile", "must be in (0, 100)")
        self.check(self.target_compression is None or 0 <= self.target_compression < 1,
                   f"{key}.target_compression", f"must be in [0, 1) or null, got {self.target_compression}")
        self.check(self.kappa_lr >= 0, f"{key}.kappa_lr", f"must be >= 0, got {self.kappa_lr}")
        self.check(self.update_every >= 1, f"{key}.update_every", "must be >= 1")
        self.check(self.freeze_epoch is None or self.freeze_epoch >= 0, f"{key}.freeze_epoch",
                   f"must be >= 0 or null, got {self.freeze_epoch}")
        self.check(self.warmup_epochs >= 0, f"{key}.warmup_epochs", "must be >= 0")
        self.check(0 <= self.min_alive <= 1, f"{key}.min_alive", "must be in [0, 1]")


@register_method("dynsnn")
class DynSNN(Method):
    Config = DynSNNConfig
    name = "dynsnn"

    def setup(self, trainer: Any) -> None:
        super().setup(trainer)
        self.neurons = self.engine.enable_units()
        self.monitor = ActivityMonitor(self.engine.model, self.neurons, "spikes", ema=self.cfg.beta)
        self.kappa = self.cfg.kappa
        self.compression = 0.0
        self.dense_nonzero = None

    def _active(self, trainer: Any) -> bool:
        frozen = self.cfg.freeze_epoch is not None and trainer.epoch >= self.cfg.freeze_epoch
        return trainer.epoch >= self.cfg.warmup_epochs and not frozen

    def on_step_end(self, trainer: Any) -> None:
        if self._active(trainer) and trainer.global_step % self.cfg.update_every == 0:
            self.update()

    @torch.no_grad()
    def update(self) -> None:
        """Recompute every layer's threshold and unit mask from the activity EMAs (revival allowed)."""
        acts = self.monitor.values()
        for n in self.neurons:
            if n not in acts:
                continue
            alive = self.engine.unit_mask(n)
            a = acts[n].to(alive.device)  # (a resumed monitor holds CPU tensors)
            ref = a[alive] if alive.any() else a
            if self.cfg.threshold == "mean":
                theta = self.kappa * ref.mean()
            else:
                theta = torch.quantile(ref.float(), min(0.999, self.cfg.percentile / 100 * self.kappa / self.cfg.kappa))
            mask = a >= theta
            floor = max(1, math.ceil(self.cfg.min_alive * a.numel()))
            if int(mask.sum()) < floor:
                mask = torch.zeros_like(mask)
                mask[torch.topk(a, floor).indices] = True
            self.engine.set_unit_mask(n, mask)
        self.compression = 1 - self.engine.density()
        if self.cfg.target_compression is not None:
            self.kappa *= math.exp(self.cfg.kappa_lr * (self.cfg.target_compression - self.compression))

    def epoch_metrics(self, trainer: Any) -> dict:
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
