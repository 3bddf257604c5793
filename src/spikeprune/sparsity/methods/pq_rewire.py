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

Left open by the paper and chosen here [R] (docs/methods.md §4.2): p=0.5, q=1, γ=1, β=0.9, η_r=0.001, the epochs per
iteration, ``epoch_frequency``, equal prune/regrow counts inside an iteration with the SAP net prune at its end,
no rewinding, and momentum = EMA(0.9) of the dense gradient.

**Landing on a target.** With ``target_density`` set, each net prune is capped so that the mask count never falls
below ``round(target_density · weights)``; the cut is shared among the scopes in proportion to their SAP counts.
Once the target is reached the run stops net pruning (Stage II rewiring, which keeps the count, goes on). So the
run ends on the target when it reaches it, not anywhere within one iteration's 15% below it.

**Reaching a target within a budget** (both are choices of ours [R], off by default):

* ``iterations: N`` cuts the first ``end`` of the run's optimizer steps into ``N`` equal iterations (instead of
  ``epochs_per_iteration`` whole epochs); each ends with the net prune and holds ``rewires_per_iteration``
  prune-and-regrow steps evenly spaced inside it; the rest of the run fine-tunes the final mask. Short iterations
  keep the per-iteration cut the PQ-index bound gives (about 15% for Gaussian-like weights) and simply allow more
  of them in the same epochs: 0.5 · 0.85^N, so N = 20 reaches about 2%.
* ``rate: budget`` makes each net prune remove at least the fraction that reaches ``target_density`` geometrically
  over the net prunes left (``1 − (target/d)^(1/left)``) when the bound's own count falls short. The bound still
  decides *where* the cut falls: the total is shared among the scopes in proportion to their SAP counts (each scope
  capped at β of its active weights). ``rate: bound`` (default) is the paper's rule alone.
* ``regrow: false`` turns Stage II off (no rewiring inside an iteration, net prunes only): the ablation of the
  topology exploration.

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
from ._common import schedule_requirements, total_steps


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
    iterations: int | None = None  # step-based iterations: this many over the first `end` of the run (null: epochs)
    end: float = 0.75  # with iterations: the fraction of the run's steps they span (the rest fine-tunes)
    rewires_per_iteration: int = 1  # with iterations: Stage II prune-and-regrow steps inside each iteration
    rate: Literal["bound", "budget"] = "bound"  # budget: at least the cut that reaches target_density in time
    regrow: bool = True  # Stage II rewiring on (false: net prunes only, the no-regrowth ablation)

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
        self.check(self.iterations is None or self.iterations >= 1, f"{key}.iterations", "must be >= 1 or null")
        self.check(0 < self.end <= 1, f"{key}.end", f"must be in (0, 1], got {self.end}")
        self.check(self.rewires_per_iteration >= 0, f"{key}.rewires_per_iteration", "must be >= 0")
        self.check(self.rate == "bound" or self.target_density is not None, f"{key}.rate",
                   "budget needs a target_density")
        self.check(self.iterations is None or self.select == "last", f"{key}.select",
                   "val_acc needs epoch iterations (iterations: null): a step iteration ends between evaluations")


@register_method("pq_rewire")
class PQRewire(Method):
    Config = PQRewireConfig
    name = "pq_rewire"

    def requirements(self) -> list[tuple[str, str]]:
        req = super().requirements()
        if self.cfg.iterations is not None:
            req += schedule_requirements("cut the run into iterations")
        elif self.cfg.rate == "budget":
            req += [("epochs", "count the net prunes left to reach target_density")]
        return req

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        self.prune_steps: list[int] = []
        self.rewire_steps: set[int] = set()
        if self.cfg.iterations is not None:
            n, span = self.cfg.iterations, self.cfg.end * total_steps(state, self.name)
            bounds = [0] + [max(1, round(k * span / n)) for k in range(1, n + 1)]
            self.prune_steps = sorted(set(bounds[1:]))
            r = self.cfg.rewires_per_iteration
            for a, b in zip(bounds, bounds[1:]):
                self.rewire_steps |= {a + round(j * (b - a) / (r + 1)) for j in range(1, r + 1)} - {a, b}
        if self.cfg.select == "val_acc" and not state.validation:
            from ...schema import ConfigError

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
        if self.cfg.iterations is None and n is not None and n > self.window:
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

    def _active(self) -> tuple[int, int]:
        """Active (mask) and all prunable weights."""
        masks = self.engine.masks().values()
        return sum(count(m) for m in masks), sum(m.numel() for m in masks)

    def target_count(self) -> int | None:
        """The fewest active weights the net prunes may leave (``round(target_density · weights)``)."""
        if self.cfg.target_density is None:
            return None
        return round(self.cfg.target_density * self._active()[1])

    def net_counts(self, left: int | None = None) -> dict[str, torch.Tensor]:
        """Per-scope counts of one net prune: the SAP counts, raised (``rate: budget``, ``left`` net prunes to go)
        to the geometric share of what remains to the target, and capped so the count lands on the target."""
        c = self.cfg
        counts = {n: self._counts(layer.weight, self.engine.mask(n)) for n, layer in self.engine.layers.items()}
        goal = self.target_count()
        if goal is None:
            return counts
        active, total = self._active()
        k = torch.cat([v.reshape(-1) for v in counts.values()]).to(torch.float64)
        sap = int(k.sum())
        self.last_sap = sap  # the bound's own total, recorded beside what was cut
        want = sap
        if c.rate == "budget" and left is not None and left >= 1 and active > goal:
            d = active / total
            nxt = math.ceil(total * d * (c.target_density / d) ** (1 / left) - 1e-9)
            want = max(sap, active - max(goal, nxt))
        want = min(want, max(0, active - goal))
        if want == sap:
            return counts
        sizes = torch.cat([scope_view(self.engine.mask(n), c.scope).sum(1).reshape(-1) for n in counts])
        if want < sap:  # the last cut: shared in proportion to the SAP counts, never above them
            cap, weight = k, k
        else:  # a larger cut: where the bound puts it (in proportion), each scope at most β of its active weights
            cap = torch.floor(c.beta * sizes.to(torch.float64) + 1e-9)
            weight = k if sap > 0 else sizes.to(torch.float64)
        alloc = allocate(weight, cap, want)
        out, start = {}, 0
        for n, v in counts.items():
            out[n] = alloc[start:start + v.numel()].reshape(v.shape).to(v.dtype)
            start += v.numel()
        return out

    @torch.no_grad()
    def rewire(self, regrow: bool, counts: dict[str, torch.Tensor] | None = None) -> dict:
        """Prune ⌊c·d⌋ smallest active weights per scope (or ``counts``); regrow as many by momentum when
        ``regrow``."""
        moved = pruned = 0
        for name, layer in self.engine.layers.items():
            w, m = layer.weight, self.engine.mask(name)
            k = self._counts(w, m) if counts is None else counts[name]
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
    def _net_prunes_left(self, state: LoopState) -> int | None:
        """Net prunes still to come, this one included (epoch iterations: ends of iterations before the last
        epoch; step iterations: the boundaries from this step on)."""
        if self.cfg.iterations is not None:
            return sum(1 for t in self.prune_steps if t >= state.step)
        if state.epochs is None:
            return None
        e = self.cfg.epochs_per_iteration
        return sum(1 for ep in range(state.epoch, state.epochs - 1) if (ep + 1) % e == 0)

    def on_step_end(self, state: LoopState) -> None:
        if self.cfg.iterations is None:
            return
        t = state.step
        if t in self.rewire_steps and self.cfg.regrow:
            self.rewire(regrow=True)
        if t in self.prune_steps:
            self._end_iteration(state, state.metrics or {}, prune=True)

    def on_epoch_end(self, state: LoopState, metrics: dict) -> None:
        c = self.cfg
        if c.iterations is not None:
            return
        j = state.epoch % c.epochs_per_iteration + 1  # epoch within the iteration, 1-based
        if j < c.epochs_per_iteration:
            if c.regrow and self._regrows_after(state, state.epoch):
                self.rewire(regrow=True)
            return
        self._end_iteration(state, metrics, prune=not state.is_last_epoch())

    def _end_iteration(self, state: LoopState, metrics: dict, prune: bool) -> None:
        """Record the iteration, then the SAP net prune (capped at the target; none once it is reached)."""
        c = self.cfg
        dens = self.engine.density()
        rec = {"iteration": len(self.history) + 1, "epoch": state.epoch + 1, "step": state.step, "density": dens,
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
        goal = self.target_count()
        reached = goal is not None and self._active()[0] <= goal
        if prune and not reached:
            if goal is None:  # the bound's own counts
                out = self.rewire(regrow=False)
            else:  # capped at the target (and raised to the budget's share with rate: budget)
                self.last_sap = None
                out = self.rewire(regrow=False, counts=self.net_counts(self._net_prunes_left(state)))
                rec["sap_count"] = self.last_sap
            rec["net_pruned"] = (out or {}).get("pruned")

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


def allocate(weight: torch.Tensor, cap: torch.Tensor, n: int) -> torch.Tensor:
    """Integers ``a`` with ``sum(a) = min(n, sum(cap))``, ``0 <= a <= cap``, in proportion to ``weight`` where no
    cap binds (water-filling, then the largest remainders; ties by position)."""
    cap = cap.to(torch.float64).clamp_min(0)
    weight = weight.to(torch.float64).clamp_min(0)
    n = int(min(n, int(cap.sum())))
    share = torch.zeros_like(cap)
    free = cap > 0
    left = float(n)
    for _ in range(cap.numel() + 1):  # each pass fixes at least one capped entry
        w = torch.where(free, weight, torch.zeros_like(weight))
        if left <= 0 or not bool(free.any()):
            break
        if float(w.sum()) <= 0:  # no weight left among the free: share evenly
            w = free.to(torch.float64)
        trial = left * w / w.sum()
        over = free & (trial >= cap)
        if not bool(over.any()):
            share = torch.where(free, trial, share)
            break
        share = torch.where(over, cap, share)
        left -= float(cap[over].sum())
        free = free & ~over
    a = torch.minimum(torch.floor(share + 1e-9), cap)
    short = n - int(a.sum())
    if short > 0:
        frac = torch.where(a < cap, share - a, torch.full_like(share, -1.0))
        order = torch.argsort(-frac, stable=True)[:short]
        a[order] += 1
    return a.to(torch.long)
