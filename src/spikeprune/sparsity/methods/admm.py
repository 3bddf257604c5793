"""ADMM connection pruning (Deng et al., TNNLS 2021): ``min L(W) s.t. W ∈ S``, S = at most ``k_l`` non-zeros in
layer ``l`` (``k_l = round(target_density · n_l)``), solved by ADMM, then hard pruning and fine-tuning.

* **W-step**: ordinary training, with ``ρ(W − Z + U)`` added to each prunable layer's gradient (the gradient of
  ``ρ/2 ||W − Z + U||²``), through the mask engine's ``dense_grad_hooks``.
* **Z-/U-steps**, after every epoch: ``Z = Proj_S(W + U)`` (the ``k_l`` largest ``|W + U|`` per layer, the rest 0),
  ``U ← U + W − Z``. ``Z = Proj_S(W)``, ``U = 0`` at the start.
* After ``prune_epoch`` epochs, W is cut to its ``k_l`` largest ``|w|`` per layer and fine-tuned without the ADMM
  term for the rest of the run.
* **Activity regularisation** (``activity`` = λ): adds ``λ · (spikes per sample)`` to the loss. As its gradient with
  respect to every spike is the constant ``λ/B``, it is applied as a gradient hook on every spiking layer's output
  during training (the trainer's loss stays the task loss).

Chosen here [R]: ρ = 0.01 (docs/methods.md: 1e-3–1e-2), constant; Z/U updated once per epoch; the hard prune keeps the
largest ``|W|`` (not Z's support); ``prune_epoch: null`` = 3/4 of the epochs; λ counts spikes summed over T and
all spiking layers, per sample; no weight quantisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ...neurons import is_neuron
from ..hooks import MethodHook
from ..loop import LoopState
from . import register_method
from ._base import Method, MethodConfig
from ._common import check_density, pick


@dataclass
class ADMMConfig(MethodConfig):
    target_density: float = 0.1
    rho: float = 0.01
    prune_epoch: int | None = None  # hard prune after this many epochs (null: 3/4 of train.epochs)
    activity: float = 0.0  # λ of the spike-count regulariser

    def validate(self, key: str) -> None:
        check_density(self, key)
        self.check(self.rho >= 0, f"{key}.rho", f"must be >= 0, got {self.rho}")
        self.check(self.prune_epoch is None or self.prune_epoch >= 0, f"{key}.prune_epoch", "must be >= 0 or null")
        self.check(self.activity >= 0, f"{key}.activity", f"must be >= 0, got {self.activity}")


def project(w: torch.Tensor, density: float) -> torch.Tensor:
    """``Proj_S``: ``w`` with all but its ``round(density · n)`` largest ``|w|`` set to 0."""
    return w * pick(w.abs(), round(density * w.numel()), torch.ones_like(w, dtype=torch.bool))


@register_method("admm")
class ADMM(Method):
    Config = ADMMConfig
    name = "admm"

    def requirements(self) -> list[tuple[str, str]]:
        if self.cfg.prune_epoch is None:
            return [*super().requirements(), ("epochs", "hard-prune after 3/4 of them (or set prune_epoch)")]
        return super().requirements()

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        epochs = state.epochs
        self.prune_epoch = round(0.75 * epochs) if self.cfg.prune_epoch is None else self.cfg.prune_epoch
        if epochs is not None:
            self.cfg.check(self.prune_epoch <= epochs, "method.prune_epoch",
                           f"must be <= train.epochs ({epochs}), got {self.prune_epoch}")
        self.Z: dict[str, torch.Tensor] = {}
        self.U: dict[str, torch.Tensor] = {}
        self.pruned = False
        self.engine.dense_grad_hooks.append(self._admm_grad)
        self._hooks = []
        if self.cfg.activity > 0:
            self._hooks = [m.register_forward_hook(MethodHook(self._spike_penalty))  # (inert in a saved model)
                           for m in self.engine.model.modules() if is_neuron(m)]

    def _admm_grad(self, name: str, layer: nn.Module, grad: torch.Tensor) -> None:
        if not self.pruned and name in self.Z and self.cfg.rho > 0:
            grad.add_((layer.weight.detach() - self.Z[name] + self.U[name]).mul_(self.cfg.rho))

    def _spike_penalty(self, mod: nn.Module, inputs, out: torch.Tensor) -> None:
        if mod.training and torch.is_grad_enabled() and out.requires_grad:
            c = self.cfg.activity / out.shape[1]  # d(λ Σ spikes / B)/d spike, outputs are [T, B, ...]
            out.register_hook(lambda g: g + c)

    @torch.no_grad()
    def z_u_step(self) -> None:
        for n, layer in self.engine.layers.items():
            w = layer.weight
            if n not in self.Z:
                self.Z[n], self.U[n] = project(w, self.cfg.target_density), torch.zeros_like(w)
            else:
                self.Z[n] = project(w + self.U[n], self.cfg.target_density)
                self.U[n].add_(w - self.Z[n])

    def on_train_start(self, state: LoopState) -> None:
        if self.prune_epoch == 0:
            self.hard_prune()
        else:
            self.z_u_step()

    def hard_prune(self) -> None:
        for n, layer in self.engine.layers.items():
            w = layer.weight
            self.engine.set_mask(n, pick(w.abs(), round(self.cfg.target_density * w.numel()), self.engine.mask(n)))
        self.pruned, self.Z, self.U = True, {}, {}

    def on_epoch_end(self, state: LoopState, metrics: dict) -> None:
        if self.pruned:
            return
        if state.epoch + 1 >= self.prune_epoch:
            self.hard_prune()
        else:
            self.z_u_step()
        self.history.append({"epoch": state.epoch + 1, "pruned": self.pruned})

    def epoch_metrics(self, state: LoopState) -> dict:
        out = super().epoch_metrics(state)
        if self.Z:  # the primal residual ||W - Z|| / ||W||
            w = {n: m.weight.detach() for n, m in self.engine.layers.items()}
            num = sum(float((w[n] - self.Z[n]).pow(2).sum()) for n in w)
            den = sum(float(v.pow(2).sum()) for v in w.values())
            out["admm_residual"] = (num / max(den, 1e-30)) ** 0.5
        return out

    def extra_state(self) -> dict:
        return {"Z": {k: v.cpu() for k, v in self.Z.items()}, "U": {k: v.cpu() for k, v in self.U.items()},
                "pruned": self.pruned}

    def load_extra_state(self, state: dict) -> None:
        dev = {n: m.weight.device for n, m in self.engine.layers.items()}
        self.Z = {k: v.to(dev[k]) for k, v in state.get("Z", {}).items()}
        self.U = {k: v.to(dev[k]) for k, v in state.get("U", {}).items()}
        self.pruned = state.get("pruned", False)
