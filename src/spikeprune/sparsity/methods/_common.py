"""What the baselines share: the training clock, magnitude pruning to a density, drop-and-grow selection, hidden
(reparameterised) weights (Grad R, STDS), and the drop-and-grow family (SET, RigL, ESL-SNN), whose members differ
only in their defaults.

Every baseline reports its sparsity through the mask engine alone (``weight_mask`` / ``unit_mask``), so all
metrics come from one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..loop import LoopState
from ..masks import any_true, count, init_masks, select_per_row
from ..scores import GradientMomentum
from ._base import Method, MethodConfig


# ------------------------------------------------------------------------------------------- clock
def total_steps(state: LoopState, who: str = "this method") -> int:
    """Optimizer steps of the whole run (``epochs`` × steps per epoch); a one-line error where the loop does not
    say."""
    return state.total_steps(who)


def schedule_requirements(why: str = "plan its schedule") -> list[tuple[str, str]]:
    return [("epochs", why), ("steps_per_epoch", why + " in steps")]


def cubic_sparsity(t: float, s_i: float, s_f: float, t0: float, span: float) -> float:
    """Zhu & Gupta (2017): ``s_t = s_f + (s_i - s_f)(1 - (t - t0)/(nΔt))^3`` on ``[t0, t0 + nΔt]``, flat outside."""
    if span <= 0 or t >= t0 + span:
        return s_f
    if t <= t0:
        return s_i
    return s_f + (s_i - s_f) * (1 - (t - t0) / span) ** 3


def check_density(cfg: MethodConfig, key: str, name: str = "target_density") -> None:
    v = getattr(cfg, name)
    cfg.check(0 < v <= 1, f"{key}.{name}", f"must be in (0, 1], got {v}")


# -------------------------------------------------------------------------------------- selection
def pick(score: torch.Tensor, k: int, candidates: torch.Tensor, largest: bool = True) -> torch.Tensor:
    """Bool mask shaped like ``score`` choosing the ``k`` best candidates (ties by position)."""
    return select_per_row(score.reshape(1, -1), int(k), candidates.reshape(1, -1), largest).reshape(score.shape)


@torch.no_grad()
def magnitude_masks(engine, density: float, scope: str = "layer",
                    scores: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Keep the ``round(density · n)`` largest scores (default ``|w|``) among the active weights, per layer
    (``scope: layer``) or over all prunable layers together (``global``). Pruned weights stay pruned."""
    scores = scores or {n: m.weight.detach().abs() for n, m in engine.layers.items()}
    masks = engine.masks()
    if scope == "layer":
        return {n: pick(s, round(density * s.numel()), masks[n]) for n, s in scores.items()}
    flat = torch.cat([s.flatten() for s in scores.values()])
    keep = pick(flat, round(density * flat.numel()), torch.cat([masks[n].flatten() for n in scores]))
    return {n: k.view_as(scores[n]) for n, k in zip(scores, keep.split([s.numel() for s in scores.values()]))}


def regrow(mask: torch.Tensor, drop: torch.Tensor, grow_score: torch.Tensor,
           growable: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Remove ``drop`` from ``mask`` and grow as many of the previously inactive (and ``growable``) entries with the
    largest ``grow_score``. Where too few qualify (a dense layer), the best dropped ones come back, so the count is
    always kept. Returns ``(new mask, grown)``."""
    n = count(drop)
    grow = pick(grow_score, n, ~mask if growable is None else ~mask & growable)
    short = n - count(grow)
    if short > 0:
        grow = grow | pick(grow_score, short, drop)
    return (mask & ~drop) | grow, grow & ~mask


class HiddenWeights:
    """A hidden real tensor θ per prunable layer (Grad R, STDS), stepped by an optimizer of the run's own kind and
    settings, at the run's current learning rate, from gradients the method supplies."""

    def __init__(self, theta: dict[str, torch.Tensor], state: LoopState):
        self.theta = {n: nn.Parameter(t.detach().clone()) for n, t in theta.items()}
        self.opt = state.make_optimizer(list(self.theta.values()))

    @torch.no_grad()
    def step(self, grads: dict[str, torch.Tensor], lr: float) -> None:
        for n, p in self.theta.items():
            p.grad = grads.get(n)
        for g in self.opt.param_groups:
            g["lr"] = lr
        self.opt.step()
        for p in self.theta.values():
            p.grad = None

    def state_dict(self) -> dict:
        return {"theta": {n: p.detach().cpu() for n, p in self.theta.items()}, "opt": self.opt.state_dict()}

    @torch.no_grad()
    def load_state_dict(self, st: dict) -> None:
        for n, t in st.get("theta", {}).items():
            self.theta[n].copy_(t)
        if "opt" in st:
            self.opt.load_state_dict(st["opt"])


class HiddenWeightMethod(Method):
    """A method whose weights are a function of a hidden θ (Grad R, STDS): the dense gradient of every step is read
    through the engine's ``dense_grad_hooks`` (before masking), θ takes its optimizer step after the run's step, and
    the mask and weights are then written from θ through the engine (the run's own update of ``w`` is overwritten)."""

    def requirements(self) -> list[tuple[str, str]]:
        return [*super().requirements(), *schedule_requirements("plan its sparsity schedule")]

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        self.hidden = HiddenWeights({n: self.init_theta(n, m.weight.detach()) for n, m in self.engine.layers.items()},
                                    state)
        self.grads: dict[str, torch.Tensor] = {}
        self.engine.dense_grad_hooks.append(lambda n, layer, g: self.grads.__setitem__(n, self.theta_grad(n, g)))

    def init_theta(self, name: str, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def theta_grad(self, name: str, grad: torch.Tensor) -> torch.Tensor:
        """``∂L/∂θ`` from the dense ``∂L/∂w`` (a new tensor: the engine masks ``grad`` in place next)."""
        raise NotImplementedError

    def mask_and_weight(self, name: str, theta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError

    def after_theta_step(self, state: LoopState, lr: float) -> None:
        """Method-specific changes to θ after its optimizer step (prior terms, thresholds)."""

    def on_step_end(self, state: LoopState) -> None:
        if not self.grads:  # the step was skipped (AMP overflow)
            return
        lr = state.lr()
        self.hidden.step(self.grads, lr)
        self.grads = {}
        self.after_theta_step(state, lr)
        self.write()

    @torch.no_grad()
    def write(self) -> None:
        for n, layer in self.engine.layers.items():
            mask, w = self.mask_and_weight(n, self.hidden.theta[n].detach())
            if not torch.equal(mask, self.engine.mask(n)):  # (a mask change is checked across DDP ranks)
                self.engine.set_mask(n, mask)
            layer.weight.copy_(w)

    def extra_state(self) -> dict:
        return {"hidden": self.hidden.state_dict()}

    def load_extra_state(self, state: dict) -> None:
        self.hidden.load_state_dict(state.get("hidden", {}))


# ---------------------------------------------------------------------------------- drop and grow
@dataclass
class DropGrowConfig(MethodConfig):
    target_density: float = 0.1  # constant density of every run (the initial mask's)
    init: Literal["er", "erk", "uniform"] = "erk"
    fraction: float = 0.3  # drop fraction (ζ of SET, α of RigL)
    decay: Literal["cosine", "constant"] = "cosine"  # f(t) = fraction/2 (1 + cos(π t / T_end)) or constant
    update_every: int = 100  # steps between updates (ΔT); 0 = once per epoch, after evaluation
    end: float = 0.75  # T_end as a fraction of the run's steps: no update from there on
    drop: Literal["magnitude", "signed"] = "magnitude"  # smallest |w|, or smallest positive + largest negative
    grow: Literal["gradient", "momentum", "random"] = "gradient"
    momentum: float = 0.9  # EMA of the dense gradient for grow: momentum
    grow_init: Literal["zero", "random"] = "zero"  # regrown weights start at 0 or at U(±1/sqrt(fan_in))

    def validate(self, key: str) -> None:
        check_density(self, key)
        self.check(0 <= self.fraction <= 1, f"{key}.fraction", f"must be in [0, 1], got {self.fraction}")
        self.check(self.update_every >= 0, f"{key}.update_every", "must be >= 0 (0: once per epoch)")
        self.check(0 < self.end <= 1, f"{key}.end", f"must be in (0, 1], got {self.end}")
        self.check(0 <= self.momentum < 1, f"{key}.momentum", f"must be in [0, 1), got {self.momentum}")


class DropGrow(Method):
    """Sparse from scratch at a constant density: drop ``f(t)`` of each layer's active weights and grow as many."""

    Config = DropGrowConfig

    def requirements(self) -> list[tuple[str, str]]:
        return [*super().requirements(), *schedule_requirements("decay its drop fraction and stop at `end` of the run")]

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        self.t_end = self.cfg.end * total_steps(state, self.name)
        self.grads: dict[str, torch.Tensor] = {}
        self.momentum = GradientMomentum(self.cfg.momentum) if self.cfg.grow == "momentum" else None
        if self.momentum is not None:
            self.engine.dense_grad_hooks.append(self.momentum)
        if self.cfg.grow == "gradient":
            self.engine.dense_grad_hooks.append(self._capture)

    def _capture(self, name: str, layer: nn.Module, grad: torch.Tensor) -> None:
        every = self.cfg.update_every  # the step being taken is global_step + 1; epoch mode keeps the last one
        if every == 0 or (self.state.step + 1) % every == 0:
            self.grads[name] = grad.detach().abs()  # a new tensor: the engine masks ``grad`` in place next

    def on_train_start(self, state: LoopState) -> None:
        init_masks(self.engine, self.cfg.init, self.cfg.target_density, self.generator)

    def drop_fraction(self, t: int) -> float:
        c = self.cfg
        if t >= self.t_end:
            return 0.0
        return c.fraction if c.decay == "constant" else c.fraction / 2 * (1 + math.cos(math.pi * t / self.t_end))

    def on_step_end(self, state: LoopState) -> None:
        t = state.step
        if self.cfg.update_every and t % self.cfg.update_every == 0 and t < self.t_end:
            self.update(t)

    def on_epoch_end(self, state: LoopState, metrics: dict) -> None:
        if self.cfg.update_every == 0 and state.epoch + 1 < self.cfg.end * state.epochs:
            self.update(state.step)

    def drop_mask(self, w: torch.Tensor, m: torch.Tensor, f: float) -> torch.Tensor:
        if self.cfg.drop == "magnitude":
            return pick(w.abs(), int(f * count(m)), m, largest=False)
        pos, neg = m & (w > 0), m & (w < 0)  # SET: the smallest positive and the largest negative weights
        return (pick(w, int(f * count(pos)), pos, largest=False)
                | pick(-w, int(f * count(neg)), neg, largest=False))

    def grow_score(self, name: str, w: torch.Tensor) -> torch.Tensor:
        if self.cfg.grow == "gradient" and name in self.grads:
            return self.grads[name]
        if self.cfg.grow == "momentum" and name in self.momentum.buf:
            return self.momentum.buf[name].abs()
        return torch.rand(w.shape, generator=self.generator).to(w.device)  # random (also: no gradient yet)

    @torch.no_grad()
    def update(self, t: int) -> dict:
        f = self.drop_fraction(t)
        moved = 0
        for name, layer in self.engine.layers.items():
            w, m = layer.weight, self.engine.mask(name)
            score = self.grow_score(name, w)
            # a zero-init connection with no gradient would stay 0 (pruned, as measured): keep a dropped one instead
            growable = score > 0 if self.cfg.grow_init == "zero" else None
            new, grown = regrow(m, self.drop_mask(w, m, f), score, growable)
            self.engine.set_mask(name, new)
            if self.cfg.grow_init == "random" and any_true(grown):
                bound = 1 / math.sqrt(w[0].numel())
                vals = (torch.rand(w.shape, generator=self.generator) * 2 - 1).mul_(bound).to(w.device)
                w[grown] = vals[grown]
            moved += count(grown)
        self.grads = {}
        rec = {"step": t, "fraction": f, "moved": moved}
        self.history.append(rec)
        return rec

    def extra_state(self) -> dict:
        return {"momentum": self.momentum.state_dict()} if self.momentum is not None else {}

    def load_extra_state(self, state: dict) -> None:
        if self.momentum is not None:
            self.momentum.load_state_dict(state.get("momentum", {}))
