"""UPR (Shi et al., ICLR 2024): unstructured pruning of weights *and* neurons with learnable masks and an
SOP-weighted penalty, then hard masks and fine-tuning.

**Search** (the first ``search_epochs`` epochs): every prunable weight and every prunable spiking unit (an FC
neuron or a conv channel) has a real mask parameter θ (``theta_init`` = 0). The forward pass uses soft masks
``sigmoid(τθ)``: for weights, a forward pre-hook on each prunable layer swaps in ``w · sigmoid(τθ_w)`` for the
duration of its call (a forward hook puts the parameter back, so optimizer, engine and checkpoints only ever see the
plain weight); for units, a forward hook multiplies the spikes by ``sigmoid(τθ_n)``. The temperature rises
exponentially per step, ``τ = τ0 (τ1/τ0)^(t/T_search)``, from 5 to 1000. The masks are trained by their own Adam
(``mask_lr``) on the task gradient plus the gradient of the penalty
``λ · Σ_layers [λ_w Σ sigmoid(τθ_w) + λ_n Σ sigmoid(τθ_n)]``, where ``λ_w`` is the number of output positions of
the layer and ``λ_n`` the fan-out of one unit (synapses its spike reaches in the consuming layers): an SOP proxy.
The penalty does not depend on the data, so its gradient is added to θ's directly (the run's loss is unchanged).

**Fine-tune** (the remaining epochs): the hooks are removed and the hard masks ``1[θ_w > 0]`` and ``1[θ_n > 0]`` are
installed through the mask engine (``set_mask``; ``enable_units``/``set_unit_mask``); the plain weights train on.

λ: ``lmbda: null`` scales λ at the first step so that the penalty and task gradients on θ have the same mean
magnitude [R]. With ``target_density`` set, λ is then adapted after each step [R], ``λ ← λ·(ρ_pred/ρ_ref)^gain``,
with ρ the density the hard masks would give now (units folded in), extrapolated ``control_horizon`` ahead from its
trend, and ρ_ref gliding cubically from 1 to the target at ``control_end`` of the search. As the masks freeze while
τ grows, the controller cannot always land exactly; so at the end of the search [R] every mask parameter is lowered
by the common offset δ (the largest that keeps at least the target, units folded in) and the weight parameters by a
further ε (the quantile that removes the surplus), so the hard masks hold exactly ``target_density``; ``(δ, ε)`` is
reported as ``theta_offsets`` (small when the controller landed). ``target_density: null`` keeps λ fixed and
applies no offset (the paper sweeps λ: 1e-11 on CIFAR-10).

Chosen here [R]: unit masks per channel for conv layers (UPR masks every neuron position), units of residual-coupled
layers are not masked, ``search_epochs: null`` = 80% of the run (UPR: 800 + 200 epochs), mask lr 1e-3, the task
gradient of θ is unscaled from AMP's loss scale.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from torch import nn

from ... import dist
from ...adapters import neuron_spikes, with_spikes
from ...graph import probe
from ..loop import LoopState
from ..masks import fold_units
from . import register_method
from ._base import Method, MethodConfig
from ._common import cubic_sparsity


def upr_temperature(t: int, steps: int, t_init: float = 5.0, t_final: float = 1000.0) -> float:
    """``τ(t) = τ0 · (τ1/τ0)^(t/steps)``, held at τ1 after ``steps``."""
    return t_init * math.exp(math.log(t_final / t_init) * min(1.0, t / max(1, steps)))


class DensityController:
    """Adapts a penalty strength ``v`` so the density follows a reference that glides (cubically) from 1 to
    ``target`` at step ``end``, then stays there. The density is extrapolated ``horizon`` steps ahead from its recent
    trend (the masks lag the penalty) and compared with the reference there: ``v ← v · (ρ_pred / ρ_ref)^gain``
    (denser than wanted: stronger penalty)."""

    def __init__(self, value: float, target: float, end: int, gain: float, horizon: int = 1):
        self.value, self.target, self.end, self.gain, self.horizon = float(value), target, end, gain, horizon
        self.last: float | None = None
        self.slope = 0.0

    def reference(self, t: int) -> float:
        return 1 - cubic_sparsity(t, 0.0, 1 - self.target, 0, self.end)

    def update(self, t: int, density: float) -> float:
        if self.last is not None:
            self.slope += (density - self.last - self.slope) / self.horizon
        self.last = density
        pred = max(1e-4, density + self.horizon * self.slope)
        self.value = min(1e12, max(1e-12, self.value * (pred / self.reference(t + self.horizon)) ** self.gain))
        return self.value

    def state_dict(self) -> dict:
        return {"value": self.value, "last": self.last, "slope": self.slope}

    def load_state_dict(self, st: dict) -> None:
        self.value, self.last, self.slope = st.get("value", self.value), st.get("last"), st.get("slope", 0.0)


class SoftWeight:
    """``w · sigmoid(τθ)`` for the duration of a layer's call: ``pre`` swaps it in, ``post`` puts the plain weight
    back, so the optimizer, the engine and checkpoints only ever see the plain weight. ``τ`` is read from ``owner``
    (the method) while it searches; a pickled model (``torch.save``) keeps θ and τ as they are then."""

    def __init__(self, theta: torch.Tensor, owner=None, tau: float = 1.0):
        self.theta, self.owner, self._tau, self.saved = theta, owner, float(tau), None

    @property
    def tau(self) -> float:
        return self.owner.tau if self.owner is not None else self._tau

    def pre(self, mod: nn.Module, args) -> None:
        p = mod._parameters["weight"]
        self.saved = p
        mod._parameters["weight"] = p * torch.sigmoid(self.tau * self.theta)

    def post(self, mod: nn.Module, args, out) -> None:
        mod._parameters["weight"], self.saved = self.saved, None

    def __reduce__(self):
        return type(self), (self.theta.detach().clone(), None, self.tau)


class SoftUnit:
    """Forward hook: a spiking layer's output times ``sigmoid(τθ_n)`` per unit (frozen like :class:`SoftWeight`
    when pickled)."""

    def __init__(self, theta: torch.Tensor, feat_dims: int, owner=None, tau: float = 1.0):
        self.theta, self.feat_dims, self.owner, self._tau = theta, int(feat_dims), owner, float(tau)

    def __call__(self, mod: nn.Module, args, out):
        tau = self.owner.tau if self.owner is not None else self._tau
        s = neuron_spikes(out)  # snnTorch neurons may return (spk, mem): only spk is masked
        return with_spikes(out, s * torch.sigmoid(tau * self.theta).view(-1, *([1] * (self.feat_dims - 1))))

    def __reduce__(self):
        tau = self.owner.tau if self.owner is not None else self._tau
        return type(self), (self.theta.detach().clone(), self.feat_dims, None, tau)


@dataclass
class UPRConfig(MethodConfig):
    target_density: float | None = 0.1
    lmbda: float | None = None  # λ (null: scaled at the first step)
    prune_neurons: bool = True
    search_epochs: int | None = None  # null: 80% of train.epochs
    temp_init: float = 5.0
    temp_final: float = 1000.0
    theta_init: float = 0.0
    mask_lr: float = 1e-3
    control_gain: float = 0.1
    control_end: float = 0.75  # fraction of the search at which the reference reaches the target
    control_horizon: float = 0.1  # look-ahead of the controller, as a fraction of the search

    def validate(self, key: str) -> None:
        self.check(self.target_density is None or 0 < self.target_density <= 1, f"{key}.target_density",
                   f"must be in (0, 1] or null, got {self.target_density}")
        self.check(self.lmbda is None or self.lmbda > 0, f"{key}.lmbda", f"must be > 0 or null, got {self.lmbda}")
        self.check(self.target_density is not None or self.lmbda is not None, f"{key}.lmbda",
                   "must be set when target_density is null")
        self.check(self.search_epochs is None or self.search_epochs >= 1, f"{key}.search_epochs", "must be >= 1")
        self.check(0 < self.temp_init <= self.temp_final, f"{key}.temp_init' and '{key}.temp_final",
                   f"needs 0 < temp_init <= temp_final, got {self.temp_init}, {self.temp_final}")
        self.check(self.mask_lr > 0, f"{key}.mask_lr", f"must be > 0, got {self.mask_lr}")
        self.check(self.control_gain > 0, f"{key}.control_gain", f"must be > 0, got {self.control_gain}")
        self.check(0 < self.control_end <= 1, f"{key}.control_end", f"must be in (0, 1], got {self.control_end}")
        self.check(0 < self.control_horizon <= 1, f"{key}.control_horizon",
                   f"must be in (0, 1], got {self.control_horizon}")


@register_method("upr")
class UPR(Method):
    Config = UPRConfig
    name = "upr"

    def requirements(self) -> list[tuple[str, str]]:
        why = "plan its mask search (temperature and density schedule)"
        need = [("steps_per_epoch", why + " in steps"),
                ("example_input", "measure the SOP cost of each weight and unit")]
        if self.cfg.search_epochs is None:
            need.insert(0, ("epochs", why + " over 80% of them (or set search_epochs)"))
        return [*super().requirements(), *need]

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        c, epochs = self.cfg, state.epochs
        self.search_epochs = max(1, round(0.8 * epochs)) if c.search_epochs is None else c.search_epochs
        if epochs is not None:
            c.check(self.search_epochs <= max(1, epochs), "method.search_epochs",
                    f"must be <= train.epochs ({epochs}), got {self.search_epochs}")
        self.search_steps = self.search_epochs * max(1, int(state.steps_per_epoch))
        self.modules = dict(self.engine.model.named_modules())
        self.neurons = self.engine.enable_units() if c.prune_neurons else []
        self.cost_w, self.cost_n = self._costs(state.example_input)
        self.theta_w = {n: nn.Parameter(torch.full_like(m.weight.detach(), c.theta_init))
                        for n, m in self.engine.layers.items()}
        dev = next(self.engine.model.parameters()).device
        self.theta_n = {g: nn.Parameter(torch.full((self.engine.group(g).units,), c.theta_init, device=dev))
                        for g in self.neurons}
        self.params = [*self.theta_w.values(), *self.theta_n.values()]
        self.opt = torch.optim.Adam(self.params, lr=c.mask_lr)
        self.lmbda = DensityController(c.lmbda or 1.0, c.target_density or 1.0,
                                       round(c.control_end * self.search_steps), c.control_gain,
                                       max(1, round(c.control_horizon * self.search_steps)))
        self.scaled = c.lmbda is not None
        self.tau = c.temp_init
        self.searching = True
        self.delta = (0.0, 0.0)
        self._handles: list = []
        self._install()

    # ------------------------------------------------------------------------------ costs and hooks
    @torch.no_grad()
    def _costs(self, x: torch.Tensor) -> tuple[dict[str, float], dict[str, float]]:
        """λ_w per layer (output positions) and λ_n per unit (synapses one spike reaches downstream)."""
        shapes: dict[str, tuple] = {}
        hooks = [m.register_forward_hook(lambda mod, i, o, n=n: shapes.__setitem__(n, tuple(o.shape)))
                 for n, m in self.engine.layers.items()]
        probe(self.engine.model, x, hooks)
        cost_w = {n: float(math.prod(shapes[n][-2:])) if isinstance(m, nn.Conv2d) else 1.0
                  for n, m in self.engine.layers.items()}
        cost_n = {}
        for g in (self.engine.group(n) for n in self.neurons):
            per_unit = 0.0
            for c, span in g.consumers:
                m = self.modules[c]
                if isinstance(m, nn.Linear):
                    per_unit += m.out_features * span
                else:
                    per_unit += (m.out_channels * math.prod(m.kernel_size) / math.prod(m.stride)
                                 * math.prod(g.unit_shape[1:]))
            cost_n[g.neuron] = per_unit
        return cost_w, cost_n

    def _install(self) -> None:
        for n, layer in self.engine.layers.items():
            soft = SoftWeight(self.theta_w[n], self)
            self._handles += [layer.register_forward_pre_hook(soft.pre), layer.register_forward_hook(soft.post)]
        for g in self.neurons:
            feat = len(self.engine.group(g).unit_shape)
            self._handles.append(self.modules[g].register_forward_hook(SoftUnit(self.theta_n[g], feat, self)))

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    # ---------------------------------------------------------------------------------- search
    def penalty(self) -> torch.Tensor:
        """``Σ_layers [λ_w Σ sigmoid(τθ_w) + λ_n Σ sigmoid(τθ_n)]`` (without the global λ)."""
        p = sum(self.cost_w[n] * torch.sigmoid(self.tau * t).sum() for n, t in self.theta_w.items())
        return p + sum(self.cost_n[n] * torch.sigmoid(self.tau * t).sum() for n, t in self.theta_n.items())

    @torch.no_grad()
    def hard_masks(self, shift: float = 0.0) -> dict[str, torch.Tensor]:
        """The connection masks ``θ_w − shift > 0`` with the units ``θ_n − shift ≤ 0`` folded in (what fine-tuning
        will use)."""
        masks = {n: (t > shift).float() for n, t in self.theta_w.items()}
        groups = [self.engine.group(n) for n in self.neurons]
        for g in groups:  # tied layers the engine does not prune still take the fold
            for n in [*g.producers, *(c for c, _ in g.consumers)]:
                masks.setdefault(n, torch.ones_like(self.modules[n].weight))
        units = {n: SimpleNamespace(unit_mask=t > shift) for n, t in self.theta_n.items()}
        fold_units(masks, groups, {**self.modules, **units})
        return {n: masks[n] for n in self.theta_w}

    def hard_density(self, shift: float = 0.0) -> float:
        ms = self.hard_masks(shift).values()
        return sum(float(m.sum()) for m in ms) / max(1, sum(m.numel() for m in ms))

    @torch.no_grad()
    def offsets(self) -> tuple[float, float]:
        """``(δ, ε)``: lowering every θ by δ (bisection: the largest δ that keeps at least ``target_density``, units
        folded in) and then θ_w alone by ε (the quantile that removes the surplus weights) leaves exactly the target."""
        target = self.cfg.target_density
        ts = [*self.theta_w.values(), *self.theta_n.values()]
        lo, hi = min(float(t.min()) for t in ts) - 1, max(float(t.max()) for t in ts) + 1
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if self.hard_density(mid) >= target else (lo, mid)
        masks = self.hard_masks(lo)
        on = torch.cat([(t - lo)[masks[n].bool()] for n, t in self.theta_w.items()])
        surplus = on.numel() - round(target * sum(t.numel() for t in self.theta_w.values()))
        return lo, (float(on.kthvalue(surplus).values) if surplus > 0 else 0.0)

    def on_step_end(self, state: LoopState) -> None:
        if not self.searching:
            return
        scaler = state.scaler
        unscale = 1.0 / scaler.get_scale() if scaler is not None else 1.0
        task = [dist.all_mean(p.grad * unscale) if p.grad is not None else torch.zeros_like(p) for p in self.params]
        with torch.enable_grad():
            pen = torch.autograd.grad(self.penalty(), self.params)
        if all(bool(torch.isfinite(g).all()) for g in task):
            if not self.scaled:  # λ so that both gradients have the same mean magnitude
                num = sum(float(g.abs().sum()) for g in task)
                den = sum(float(g.abs().sum()) for g in pen)
                self.lmbda.value = num / den if num > 0 and den > 0 else 1.0
                self.scaled = True
            for p, g, q in zip(self.params, task, pen):
                p.grad = g + self.lmbda.value * q
            self.opt.step()
        for p in self.params:
            p.grad = None
        t = state.step
        self.tau = upr_temperature(t, self.search_steps, self.cfg.temp_init, self.cfg.temp_final)
        if self.cfg.target_density is not None:
            self.lmbda.update(t, self.hard_density())

    def on_epoch_end(self, state: LoopState, metrics: dict) -> None:
        if self.searching and state.epoch + 1 >= self.search_epochs:
            self.finish_search()

    @torch.no_grad()
    def finish_search(self) -> None:
        """Remove the soft masks and install the hard ones through the engine."""
        self._remove()
        self.searching = False
        if self.cfg.target_density is not None:
            self.delta = self.offsets()
            for t in self.theta_n.values():
                t.sub_(self.delta[0])
            for t in self.theta_w.values():
                t.sub_(sum(self.delta))
        for n, t in self.theta_w.items():
            self.engine.set_mask(n, t > 0)
        for n, t in self.theta_n.items():
            self.engine.set_unit_mask(n, t > 0)
        self.history.append({"search_end": True, "density": self.engine.density(), "lambda": self.lmbda.value,
                             "theta_offsets": self.delta})

    # ------------------------------------------------------------------------------- reporting
    def epoch_metrics(self, state: LoopState) -> dict:
        out = {**super().epoch_metrics(state), "lambda": self.lmbda.value, "temperature": self.tau}
        if self.searching:
            out["hard_density"] = self.hard_density()
        return out

    def summary(self) -> dict:
        return {"lambda": self.lmbda.value, "search_epochs": self.search_epochs, "theta_offsets": self.delta,
                "units_alive": {n: int(self.engine.unit_mask(n).sum()) for n in self.neurons}}

    def extra_state(self) -> dict:
        return {"theta_w": {k: v.detach().cpu() for k, v in self.theta_w.items()},
                "theta_n": {k: v.detach().cpu() for k, v in self.theta_n.items()}, "opt": self.opt.state_dict(),
                "lmbda": self.lmbda.state_dict(), "scaled": self.scaled, "tau": self.tau,
                "searching": self.searching, "delta": self.delta}

    @torch.no_grad()
    def load_extra_state(self, state: dict) -> None:
        for src, dst in (("theta_w", self.theta_w), ("theta_n", self.theta_n)):
            for k, v in state.get(src, {}).items():
                dst[k].copy_(v)
        if "opt" in state:
            self.opt.load_state_dict(state["opt"])
        self.lmbda.load_state_dict(state.get("lmbda", {}))
        self.scaled, self.tau = state.get("scaled", self.scaled), state.get("tau", self.tau)
        self.searching, self.delta = state.get("searching", True), tuple(state.get("delta", (0.0, 0.0)))
        if not self.searching:
            self._remove()
