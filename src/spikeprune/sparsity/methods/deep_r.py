"""Deep R (Bellec et al., ICLR 2018): rewiring under a fixed connection budget.

Each connection has a sign ``s`` fixed at initialisation and a hidden ``θ ≥ 0`` with ``w = s·θ`` while active;
here ``θ`` is implicit, ``θ = s·w``. The run's optimizer trains the active weights; after each step (from the
run's learning rate η) the L1 term ``θ ← θ − η·l1`` and, with ``temperature`` T > 0, the noise
``θ ← θ + sqrt(η)·T·N(0, 1)`` are applied to the active connections. A connection whose weight reached 0 or crossed
it (``s·w ≤ 0``) becomes dormant (its mask bit goes off), and exactly as many dormant connections of that layer,
drawn at random from the method's generator, are activated with ``w = eps·s``, so every layer keeps its budget
(the connection count of its initial mask at ``target_density``) at every step.

Chosen here [R]: the budget is exact per layer (Deep R re-activates each dormant connection with probability
``(cur_s − max_s)/cur_s``, which keeps it only on average); the optimizer is the run's own (the reference uses
Adam); a uniform initial mask (``init``); T ≡ sqrt(2·T_paper) as in the Grad R repository's Deep R; signs of exact
zeros at initialisation are drawn at random.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..loop import LoopState
from ..masks import count, flat_true, init_masks
from . import register_method
from ._base import Method, MethodConfig
from ._common import check_density


@dataclass
class DeepRConfig(MethodConfig):
    target_density: float = 0.1
    init: Literal["uniform", "er", "erk"] = "uniform"
    l1: float = 1e-5
    temperature: float = 0.0
    eps: float = 1e-8  # |w| of a re-activated connection

    def validate(self, key: str) -> None:
        check_density(self, key)
        self.check(self.l1 >= 0, f"{key}.l1", f"must be >= 0, got {self.l1}")
        self.check(self.temperature >= 0, f"{key}.temperature", f"must be >= 0, got {self.temperature}")
        self.check(self.eps > 0, f"{key}.eps", f"must be > 0, got {self.eps}")


@register_method("deep_r")
class DeepR(Method):
    Config = DeepRConfig
    name = "deep_r"

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        self.signs: dict[str, torch.Tensor] = {}
        self._cast: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # signs as weights, per layer
        self.budget: dict[str, int] = {}

    def on_train_start(self, state: LoopState) -> None:
        for n, layer in self.engine.layers.items():
            w = layer.weight.detach()
            coin = torch.rand(w.shape, generator=self.generator).to(w.device) < 0.5
            self.signs[n] = torch.where(w != 0, w.sign(), torch.where(coin, 1.0, -1.0)).to(torch.int8)
        init_masks(self.engine, self.cfg.init, self.cfg.target_density, self.generator)
        self.budget = {n: count(m) for n, m in self.engine.masks().items()}

    def on_step_end(self, state: LoopState) -> None:
        self.rewire(state.lr())

    @torch.no_grad()
    def rewire(self, lr: float) -> int:
        """L1 + noise on active θ, dormant where ``s·w ≤ 0``, random re-activation up to the budget."""
        regrown = 0
        for n, layer in self.engine.layers.items():
            w, m, s = layer.weight, self.engine.mask(n), self._signs_as(n, layer.weight)
            if self.cfg.l1:
                w.addcmul_(s, m, value=-lr * self.cfg.l1)
            if self.cfg.temperature:
                noise = torch.randn(w.shape, generator=self.generator).to(w.device)
                w.addcmul_(noise, m, value=self.cfg.temperature * math.sqrt(lr))
            alive = m & (w * s > 0)
            need = self.budget[n] - count(alive)
            if need == 0:  # alive ⊆ mask and the mask holds the budget: nothing died
                continue
            dormant = flat_true(~alive)  # draw `need` of them, uniformly
            at = torch.unravel_index(dormant[self._draw(dormant.numel(), need).to(dormant.device)], w.shape)
            grow = alive.clone()
            grow[at] = True
            self.engine.set_mask(n, grow)
            w[at] = self.cfg.eps * s[at]
            regrown += need
        return regrown

    def _signs_as(self, name: str, w: torch.Tensor) -> torch.Tensor:
        """The fixed signs of layer ``name`` in ``w``'s dtype and device, converted once (not at every step)."""
        s = self.signs[name]
        hit = self._cast.get(name)
        if hit is None or hit[0] is not s or hit[1].dtype != w.dtype or hit[1].device != w.device:
            hit = self._cast[name] = (s, s.to(device=w.device, dtype=w.dtype))
        return hit[1]

    def _draw(self, n: int, k: int) -> torch.Tensor:
        """``k`` distinct indices of ``range(n)``, uniformly: rejection sampling when ``k`` is a small part of ``n``
        (a step re-activates a handful of the ~10⁵-10⁶ dormant connections, and a full permutation of them each
        step doubled the cost of a training step), a permutation otherwise."""
        if 4 * k > n:
            return torch.randperm(n, generator=self.generator)[:k]
        picked = torch.empty(0, dtype=torch.long)
        while picked.numel() < k:
            draw = torch.randint(n, (2 * (k - picked.numel()),), generator=self.generator)
            picked = torch.cat([picked, draw]).unique(sorted=False)
        return picked[torch.randperm(picked.numel(), generator=self.generator)[:k]]

    def extra_state(self) -> dict:
        return {"signs": {k: v.cpu() for k, v in self.signs.items()}, "budget": self.budget}

    def load_extra_state(self, state: dict) -> None:
        dev = {n: m.weight.device for n, m in self.engine.layers.items()}
        self.signs = {k: v.to(dev[k]) for k, v in state.get("signs", {}).items()}
        self.budget = dict(state.get("budget", {}))
