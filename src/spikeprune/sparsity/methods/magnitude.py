"""Magnitude pruning: one-shot (train, prune the smallest ``|w|``, fine-tune) or gradual (Zhu & Gupta, 2017).

* ``schedule: oneshot``: dense training for ``prune_epoch`` epochs, then the weights are cut to
  ``target_density`` by magnitude (after that epoch's evaluation) and the rest of the run fine-tunes them.
  ``prune_epoch: 0`` prunes at initialisation.
* ``schedule: cubic``: every ``update_every`` steps (Δt) between ``t0 = begin·steps`` and ``t0 + nΔt = end·steps``
  the sparsity follows ``s_t = s_f + (s_i − s_f)(1 − (t − t0)/(nΔt))³`` with ``s_f = 1 − target_density`` and
  ``s_i = 1 − initial_density``; the rest of the run fine-tunes at ``s_f``.

``scope: layer`` gives every layer the same density; ``global`` ranks all prunable weights together. Pruned
weights never come back.

Chosen here [R]: ``begin`` 0, ``end`` 0.75 of the run (Zhu & Gupta leave room for fine-tuning), Δt = 100 steps,
``scope: layer`` (their setting), one-shot pruning after half of the epochs when ``prune_epoch`` is null.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..loop import LoopState
from . import register_method
from ._base import Method, MethodConfig
from ._common import check_density, cubic_sparsity, magnitude_masks, schedule_requirements, total_steps


@dataclass
class MagnitudeConfig(MethodConfig):
    target_density: float = 0.1
    schedule: Literal["oneshot", "cubic"] = "cubic"
    scope: Literal["layer", "global"] = "layer"
    prune_epoch: int | None = None  # oneshot: prune after this many epochs (null: half of train.epochs)
    initial_density: float = 1.0  # cubic: 1 - s_i
    begin: float = 0.0  # cubic: t0 as a fraction of the run's steps
    end: float = 0.75  # cubic: t0 + nΔt as a fraction of the run's steps
    update_every: int = 100  # cubic: Δt in steps

    def validate(self, key: str) -> None:
        check_density(self, key)
        check_density(self, key, "initial_density")
        self.check(self.prune_epoch is None or self.prune_epoch >= 0, f"{key}.prune_epoch", "must be >= 0 or null")
        self.check(0 <= self.begin < self.end <= 1, f"{key}.begin' and '{key}.end",
                   f"need 0 <= begin < end <= 1, got begin={self.begin}, end={self.end}")
        self.check(self.update_every >= 1, f"{key}.update_every", "must be >= 1")


@register_method("magnitude")
class Magnitude(Method):
    Config = MagnitudeConfig
    name = "magnitude"

    def requirements(self) -> list[tuple[str, str]]:
        if self.cfg.schedule == "cubic":
            return [*super().requirements(), *schedule_requirements("plan its cubic sparsity schedule")]
        if self.cfg.prune_epoch is None:
            return [*super().requirements(), ("epochs", "prune after half of them (or set prune_epoch)")]
        return super().requirements()

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        c, epochs = self.cfg, state.epochs
        self.prune_epoch = epochs // 2 if c.prune_epoch is None else c.prune_epoch
        if epochs is not None:
            c.check(self.prune_epoch <= epochs, "method.prune_epoch",
                    f"must be <= train.epochs ({epochs}), got {self.prune_epoch}")
        self.t0 = self.span = 0
        if c.schedule == "cubic":
            steps = total_steps(state, self.name)
            self.t0 = round(c.begin * steps)
            self.span = max(self.t0 + 1, round(c.end * steps)) - self.t0

    def sparsity(self, t: int) -> float:
        """The cubic schedule's sparsity at step ``t``."""
        c = self.cfg
        return cubic_sparsity(t, 1 - c.initial_density, 1 - c.target_density, self.t0, self.span)

    def prune(self, density: float, step: int) -> None:
        self.engine.set_masks(magnitude_masks(self.engine, density, self.cfg.scope))
        self.history.append({"step": step, "density": density})

    def on_train_start(self, state: LoopState) -> None:
        if self.cfg.schedule == "oneshot" and self.prune_epoch == 0:
            self.prune(self.cfg.target_density, 0)
        elif self.cfg.schedule == "cubic" and self.t0 == 0 and self.cfg.initial_density < 1:
            self.prune(self.cfg.initial_density, 0)

    def on_step_end(self, state: LoopState) -> None:
        t = state.step
        if self.cfg.schedule != "cubic" or not self.t0 <= t <= self.t0 + self.span:
            return
        if (t - self.t0) % self.cfg.update_every == 0 or t == self.t0 + self.span:
            self.prune(1 - self.sparsity(t), t)

    def on_epoch_end(self, state: LoopState, metrics: dict) -> None:
        if self.cfg.schedule == "oneshot" and state.epoch + 1 == self.prune_epoch:
            self.prune(self.cfg.target_density, state.step)
