"""PQ-index structure learning (Shen, Xu, Pan, Chen, ICLR 2025): a two-stage rewiring loop.

Training starts sparse from an ER/ERK mask at ``init_density`` (0.5). Training is cut into iterations of
``epochs_per_iteration`` epochs. Every ``epoch_frequency`` epochs inside an iteration:

* **Stage I**: for each scope (a whole layer, or each output neuron with ``scope: neuron``) the PQ index
  ``I_{p,q}`` of the active weights gives the SAP bound ``r`` and the rewiring ratio
  ``c = clamp(γ(1 − r/d), 0, β)``;
* **Stage II**: the ``⌊c·d⌋`` smallest-magnitude active weights are pruned and as many inactive ones with the
  largest dense-gradient momentum are regrown at 0 (density unchanged: topology exploration).

At the end of each iteration the SAP *net* prune removes ``⌊c·d⌋`` weights per scope without regrowth, so the
density falls about 15% per iteration for Gaussian-like weights (0.5 → 0.42 → 0.36 → 0.30 …). Each iteration's
accuracy and density are recorded; with ``select: val_acc`` the best iteration (on the validation split) is
restored at the end, and ``target_density`` stops the net pruning once reached.

Left open by the paper and chosen here [R] (methods.md §4.2): p=0.5, q=1, γ=1, β=0.9, η_r=0.001, the epochs per
iteration, ``epoch_frequency``, equal prune/regrow counts inside an iteration with the SAP net prune at its end,
no rewinding, and momentum = EMA(0.9) of the dense gradient.

The momentum is only read by a regrowth, so it is kept over the last ``K`` steps before each one, where
``β^K < 2^-24``: a gradient K steps old weighs less than float32's rounding of the average (K = 160 for β = 0.9).
Elsewhere the step skips that pass over every weight (about 4% of a fc3 training step, measured). With epochs of at
most K steps, or a loop that does not tell its epoch length, the average runs at every step.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..loop import LoopState
from ..masks import any_true, count, init_masks, scope_view, select_per_row
from ..scores import GradientMomentum, pq_index, sap_prune_count
from . import register_method
from ._base import Method, MethodConfig


@dataclass
class PQRewireConfig(MethodConfig):
    scope: Literal["layer", "neuron"] = "layer"
    p: float = 0.5
    q: float = 1.0
    eta: float = 0.001
    gamma: float = 1.0
    beta: float = 0.9
    init: Literal["er", "erk", "uniform"] = "erk"
    init_density: float = 0.5
    epochs_per_iteration: int = 3
    epoch_frequency: int = 1
    momentum: float = 0.9
    target_density: float | None = None
    select: Literal["last", "val_acc"] = "last"

    def validate(self, key: str) -> None:
        self.check(self.p > 0, f"{key}.p", f"must be > 0 (0 < p < q), got {self.p}")
        self.check(self.q > self.p, f"{key}.p' and '{key}.q", f"must satisfy 0 < p < q, got p={self.p}, q={self.q}")
        self.check(self.eta >= 0, f"{key}.eta", "must be >= 0")
        self.check(self.gamma > 0, f"{key}.gamma", "must be > 0")
        self.check(0 < self.beta < 1, f"{key}.beta", f"must be in (0, 1), got {self.beta}")
        self.check(0 < self.init_density <= 1, f"{key}.init_density", f"must be in (0, 1], got {self.init_density}")
        self.check(self.epochs_per_iteration >= 1, f"{key}.epochs_per_iteration", "must be >= 1")
        self.check(self.epoch_frequency >= 1, f"{key}.epoch_frequency", "must be >= 1")
        self.check(0 <= self.momentum < 1, f"{key}.momentum", "must be in [0, 1)")
        self.check(self.target_density is None or 0 < self.target_density < 1, f"{key}.target_density",
                   "must be in (0, 1) or null")


@register_method("pq_rewire")
class PQRewire(Method):
    Config = PQRewireConfig
    name = "pq_rewire"

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        if self.cfg.select == "val_acc" and not state.validation:
            from ...config import ConfigError

            raise ConfigError("config key 'method.select' is val_acc but the loop has no validation set: set "
                              "data.val_split (spikeprune.prune: validation=True and pass {'val_acc': ...} to "
                              "pruner.epoch_end())")
        self.momentum = GradientMomentum(self.cfg.momentum)
        self.engine.dense_grad_hooks.append(self._observe)
        self.best_state: dict | None = None
        b = self.cfg.momentum
        self.window = 1 if b == 0 else math.ceil(24 * math.log(2) / -math.log(b)) + 1  # b^window < 2^-24
        self.window_epoch = -1  # the epoch whose regrowth window has started (its average began from zero)

    def _observe(self, name: str, layer: Any, grad: Any) -> None:
        """The dense gradient of the step now running, for the momentum when a regrowth will read it."""
        tr = self.state
        n = tr.steps_per_epoch
        if n is not None and n > self.window:
            step = tr.step_in_epoch + 1  # this step, 1-based
            if not (self._regrows_after(tr, tr.epoch) and step > n - self.window):
                return
            if self.window_epoch != tr.epoch:  # the window opens: the average starts from zero, as at step 1
                self.momentum.buf = {}
                self.window_epoch = tr.epoch
        self.momentum(name, layer, grad)

    def _regrows_after(self, state: LoopState, epoch: int) -> bool:
        """Whether epoch ``epoch`` (0-based) ends with a prune-and-regrow (Stage II with regrowth)."""
        c = self.cfg
        j = epoch % c.epochs_per_iteration + 1
        return j < c.epochs_per_iteration and j % c.epoch_frequency == 0 and not state.is_last_epoch(epoch)

    def on_train_start(self, state: LoopState) -> None:
        init_masks(self.engine, self.cfg.init, self.cfg.init_density, self.generator)

    # ------------------------------------------------------------------------------ the two stages
    def _counts(self, w: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """Stage I: per-scope number of weights to rewire (or prune), from the PQ index."""
        c = self.cfg
        wv, mv = scope_view(w, c.scope), scope_view(m, c.scope)
        idx = pq_index(wv, c.p, c.q, mask=mv, dim=1)
        return sap_prune_count(mv.sum(1), idx, c.eta, c.gamma, c.beta, c.p, c.q)

    @torch.no_grad()
    def rewire(self, regrow: bool) -> dict:
        """Prune ⌊c·d⌋ smallest active weights per scope; regrow as many by momentum when ``regrow``."""
        moved = pruned = 0
        for name, layer in self.engine.layers.items():
            w, m = layer.weight, self.engine.mask(name)
            k = self._counts(w, m)
            mv = scope_view(m, self.cfg.scope)
            drop = select_per_row(scope_view(w.abs(), self.cfg.scope), k, mv, largest=False)
            new = mv & ~drop
            if regrow:
                mom = self.momentum.buf.get(name)
                if mom is None:  # no gradient seen yet: random, from the method's generator (same on all ranks)
                    mom = torch.rand(w.shape, generator=self.generator).to(w.device)
                score = scope_view(mom.abs(), self.cfg.scope)
                n_drop = drop.sum(1)
                grow = select_per_row(score, n_drop, ~mv, largest=True)
                short = n_drop - grow.sum(1)
                if any_true(short > 0):
                    # too few inactive places (e.g. a layer ERK keeps dense): the best just-dropped weights stay,
                    # so the scope's count is unchanged as Stage II requires
                    grow = grow | select_per_row(score, short, drop, largest=True)
                new = new | grow
                moved += count(grow & ~mv)
            pruned += count(mv & ~new)
            self.engine.set_mask(name, new.reshape(m.shape))
        return {"pruned": pruned, "regrown": moved}

    # --------------------------------------------------------------------------------- schedule
    def on_epoch_end(self, state: LoopState, metrics: dict) -> None:
        c = self.cfg
        j = state.epoch % c.epochs_per_iteration + 1  # epoch within the iteration, 1-based
        last_epoch = state.is_last_epoch()
        if j < c.epochs_per_iteration:
            if self._regrows_after(state, state.epoch):
                self.rewire(regrow=True)
            return
        # end of an iteration: record it, then the SAP net prune
        dens = self.engine.density()
        rec = {"iteration": len(self.history) + 1, "epoch": state.epoch + 1, "density": dens,
               "test_acc": metrics.get("test_acc"), "val_acc": metrics.get("val_acc")}
        self.history.append(rec)
        state.log(f"  pq_rewire iteration {rec['iteration']}: density {100 * dens:.2f}%"
                    + (f", val {100 * rec['val_acc']:.2f}%" if rec["val_acc"] is not None else "")
                    + (f", test {100 * rec['test_acc']:.2f}%" if rec["test_acc"] is not None else ""))
        if c.select == "val_acc":
            if rec["val_acc"] is None:
                raise ValueError("pq_rewire with select=val_acc needs the validation accuracy: pass "
                                 "{'val_acc': ...} to pruner.epoch_end()")
            best = max(h["val_acc"] for h in self.history)
            if rec["val_acc"] >= best:
                self.best_state = copy.deepcopy({k: v.cpu() for k, v in self.engine.model.state_dict().items()})
                rec["best"] = True
        reached = c.target_density is not None and dens <= c.target_density
        if not last_epoch and not reached:
            self.rewire(regrow=False)

    def on_train_end(self, state: LoopState) -> None:
        if self.cfg.select == "val_acc" and self.best_state is not None:
            self.engine.model.load_state_dict(self.best_state)
            best = next(h for h in reversed(self.history) if h.get("best"))
            state.log(f"  pq_rewire: restored iteration {best['iteration']} (best validation accuracy)")

    def trajectory(self) -> str:
        """The per-iteration density trajectory, one line."""
        return " -> ".join(f"{100 * h['density']:.1f}%" for h in self.history)

    def summary(self) -> dict:
        return {"iterations": self.history, "trajectory": self.trajectory()}

    def extra_state(self) -> dict:
        return {"momentum": self.momentum.state_dict(), "best_state": self.best_state,
                "window_epoch": self.window_epoch}

    def load_extra_state(self, state: dict) -> None:
        self.momentum.load_state_dict(state.get("momentum", {}))
        self.best_state = state.get("best_state")
        self.window_epoch = state.get("window_epoch", -1)
