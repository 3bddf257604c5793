"""SCA (Li et al., ICML 2024): structured pruning of convolution channels by spiking channel activity, with
pruned channels regrown during training.

During each epoch the activity of every conv channel, ``A_c = mean_{t,n,h,w}(s + |u|)`` (``activity:
membrane`` gives ``mean |u|``), is averaged over the training batches, gathered before the channel mask so
masked channels still show what they would do. At the end of the epoch (after evaluation) channels are ranked
globally over all prunable conv layers and the top ``keep`` fraction is kept; among the rest, up to ``regrow``
fraction of all channels are revived, those with the largest ``|∂L/∂g_c|``: the gradient of the channel gate,
taken as if the gate were open (a dense, RigL-style signal). Masks are recomputed from scratch every epoch, so
channels come and go; they freeze at ``freeze_epoch`` for fine-tuning. ``l1`` adds ``λ·sign(w)`` to the
gradients of the pruned conv layers (the reference recipe uses 3e-5).

Left open by the paper and chosen here [R] (docs/methods.md §5): ``s+|u|`` as default score, the gate placed on the
spiking output (so the whole channel is silenced and its BN and filter freeze while masked), the gate gradient
in place of the BN-scale gradient, ``keep``=0.4/``regrow``=0.1 defaults, and at least ``min_channels`` per layer.
Channels of residual-coupled layers are not pruned.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..loop import LoopState
from ..scores import ActivityMonitor
from . import register_method
from ._base import Method, MethodConfig


@dataclass
class SCAConfig(MethodConfig):
    activity: Literal["spikes+membrane", "membrane"] = "spikes+membrane"
    keep: float = 0.4
    regrow: float = 0.1
    start_epoch: int = 1
    freeze_epoch: int | None = None
    l1: float = 3e-5
    min_channels: int = 2

    def validate(self, key: str) -> None:
        self.check(0 < self.keep <= 1, f"{key}.keep", f"must be in (0, 1], got {self.keep}")
        self.check(0 <= self.regrow <= 1 - self.keep + 1e-9, f"{key}.regrow",  # 1 - 0.9 < 0.1 in floats
                   f"must be in [0, 1 - keep], got {self.regrow}")
        self.check(self.start_epoch >= 0, f"{key}.start_epoch", "must be >= 0")
        self.check(self.freeze_epoch is None or self.freeze_epoch >= 0, f"{key}.freeze_epoch",
                   f"must be >= 0 or null, got {self.freeze_epoch}")
        self.check(self.l1 >= 0, f"{key}.l1", "must be >= 0")
        self.check(self.min_channels >= 1, f"{key}.min_channels", "must be >= 1")


@register_method("sca")
class SCA(Method):
    Config = SCAConfig
    name = "sca"

    def requirements(self) -> list[tuple[str, str]]:
        return [*super().requirements(), ("example_input", "trace which conv channels it can mask")]

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        modules = dict(self.engine.model.named_modules())
        self.neurons = [g.neuron for g in self.engine.unit_groups()
                        if all(isinstance(modules[p], nn.Conv2d) for p in g.producers)]
        if not self.neurons:
            raise ValueError("sca found no prunable conv channel group (conv -> [BN] -> neuron) in the model")
        self.engine.enable_units(self.neurons)
        self.engine.track_unit_grad = True
        self.monitor = ActivityMonitor(self.engine.model, self.neurons, self.cfg.activity, ema=None)
        self.conv_layers = [p for n in self.neurons for p in self.engine.group(n).producers if p in self.engine.layers]
        if self.cfg.l1 > 0:
            self.engine.dense_grad_hooks.append(self._l1)

    def _l1(self, name: str, layer: nn.Module, grad: torch.Tensor) -> None:
        if name in self.conv_layers:
            grad.add_(torch.sign(layer.weight), alpha=self.cfg.l1)

    def _active(self, state: LoopState) -> bool:
        frozen = self.cfg.freeze_epoch is not None and state.epoch + 1 >= self.cfg.freeze_epoch
        return state.epoch + 1 >= self.cfg.start_epoch and not frozen

    def on_epoch_start(self, state: LoopState) -> None:
        self.monitor.reset()
        self.engine.pop_unit_grad()

    def on_epoch_end(self, state: LoopState, metrics: dict) -> None:
        if self._active(state) and not state.is_last_epoch():
            self.update()

    @torch.no_grad()
    def update(self) -> dict:
        """Keep the globally most active ``keep`` fraction of channels, regrow up to ``regrow`` by gate gradient."""
        acts = self.monitor.values()
        grads = self.engine.pop_unit_grad()
        names = [n for n in self.neurons if n in acts]
        sizes = [acts[n].numel() for n in names]
        dev = next(self.engine.model.parameters()).device  # statistics may come from a CPU checkpoint
        a = torch.cat([acts[n].float().to(dev) for n in names])
        g = torch.cat([grads[n].float().to(dev) if n in grads else torch.zeros(s, device=dev)
                       for n, s in zip(names, sizes)])
        total = a.numel()
        keep = torch.zeros(total, dtype=torch.bool, device=a.device)
        # ⌊keep·N⌋ and ⌊regrow·N⌋, robust to float products such as 0.29 * 100 = 28.999...
        keep[torch.topk(a, max(1, math.floor(self.cfg.keep * total + 1e-9))).indices] = True
        n_regrow = min(math.floor(self.cfg.regrow * total + 1e-9), total - int(keep.sum()))
        if n_regrow:
            cand = torch.where(keep, torch.full_like(g, -1.0), g)
            top = torch.topk(cand, n_regrow)
            keep[top.indices[top.values > 0]] = True
        start = 0
        for n, s in zip(names, sizes):
            m = keep[start:start + s].clone()
            if int(m.sum()) < min(self.cfg.min_channels, s):  # never disconnect a layer
                m[torch.topk(a[start:start + s], min(self.cfg.min_channels, s)).indices] = True
            start += s
            self.engine.set_unit_mask(n, m)
        self.monitor.reset()
        kept = sum(int(self.engine.unit_mask(n).sum()) for n in self.neurons)
        rec = {"channels_kept": kept, "channels": total}
        self.history.append(rec)
        return rec

    def channel_fraction(self) -> float:
        kept = sum(int(self.engine.unit_mask(n).sum()) for n in self.neurons)
        return kept / max(1, sum(self.engine.unit_mask(n).numel() for n in self.neurons))

    def epoch_metrics(self, state: LoopState) -> dict:
        return {"density": self.engine.density(), "channels_kept": self.channel_fraction()}

    def summary(self) -> dict:
        return {"channels_kept": {n: int(self.engine.unit_mask(n).sum()) for n in self.neurons},
                "channels": {n: self.engine.unit_mask(n).numel() for n in self.neurons},
                "channel_fraction": self.channel_fraction()}

    def extra_state(self) -> dict:
        return {"monitor": self.monitor.state_dict(),
                "unit_grad": {k: v.cpu() for k, v in self.engine.unit_grad.items()}}

    def load_extra_state(self, state: dict) -> None:
        self.monitor.load_state_dict(state.get("monitor", {}))
        self.engine.unit_grad = dict(state.get("unit_grad", {}))
