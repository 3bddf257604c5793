"""What the structured (conv channel) baselines share: the conv channel groups SCA masks, a score per channel, and
one prune to a kept fraction followed by fine-tuning.

Channels are masked through the mask engine's unit masks, as ``sca`` does (the gate sits on the spiking output, so
a pruned channel is silent and its filter and BN stop learning); ``spikeprune compact`` then removes them
physically, so MACs and run time fall. Only groups whose producers are all ``Conv2d`` are pruned (a conv, its BN,
its neuron); residual-coupled groups are left whole.

Schedule [R]: train for ``prune_epoch`` epochs (null: half of the run), prune once to ``keep`` of the channels
(after that epoch's evaluation), fine-tune for the rest; ``prune_epoch: 0`` prunes at initialisation. ``scope:
layer`` keeps ``round(keep · C)`` channels in every layer (the uniform ratio of Li et al.'s experiments), ``global``
ranks all layers' channels together (Liu et al.'s single threshold); every layer keeps ``min_channels``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from ..loop import LoopState
from ._base import Method, MethodConfig


@dataclass
class ChannelPruningConfig(MethodConfig):
    keep: float = 0.5  # fraction of the prunable conv channels kept
    prune_epoch: int | None = None  # prune after this many epochs (null: half of the run; 0: at initialisation)
    scope: Literal["layer", "global"] = "layer"
    min_channels: int = 1

    def validate(self, key: str) -> None:
        self.check(0 < self.keep <= 1, f"{key}.keep", f"must be in (0, 1], got {self.keep}")
        self.check(self.prune_epoch is None or self.prune_epoch >= 0, f"{key}.prune_epoch", "must be >= 0 or null")
        self.check(self.min_channels >= 1, f"{key}.min_channels", "must be >= 1")


class ChannelPruning(Method):
    """Prune conv channels once, by :meth:`channel_scores` (higher: kept), then fine-tune."""

    Config = ChannelPruningConfig

    def requirements(self) -> list[tuple[str, str]]:
        req = [*super().requirements(), ("example_input", "trace which conv channels it can mask")]
        if self.cfg.prune_epoch is None:
            req.append(("epochs", "prune after half of them (or set prune_epoch)"))
        return req

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        modules = dict(self.engine.model.named_modules())
        self.groups = [g for g in self.engine.unit_groups()
                       if all(isinstance(modules[p], nn.Conv2d) for p in g.producers)]
        if not self.groups:
            raise ValueError(f"{self.name} found no prunable conv channel group (conv -> [BN] -> neuron) in the model")
        self.neurons = [g.neuron for g in self.groups]
        self.engine.enable_units(self.neurons)
        self.prune_epoch = state.epochs // 2 if self.cfg.prune_epoch is None else self.cfg.prune_epoch
        if state.epochs is not None:
            self.cfg.check(self.prune_epoch <= state.epochs, "method.prune_epoch",
                           f"must be <= train.epochs ({state.epochs}), got {self.prune_epoch}")
        self.pruned = False

    def channel_scores(self) -> dict[str, torch.Tensor]:
        """One score per channel of every pruned group (keyed by neuron name)."""
        raise NotImplementedError

    @torch.no_grad()
    def prune(self) -> dict:
        c = self.cfg
        scores = {n: s.detach().float().flatten().cpu() for n, s in self.channel_scores().items()}
        keep: dict[str, torch.Tensor] = {}
        if c.scope == "layer":
            for n, s in scores.items():
                k = min(s.numel(), max(c.min_channels, round(c.keep * s.numel())))
                keep[n] = _top(s, k)
        else:
            names = list(scores)
            flat = torch.cat([scores[n] for n in names])
            chosen = _top(flat, max(1, math.floor(c.keep * flat.numel() + 1e-9)))
            for n, m in zip(names, chosen.split([scores[n].numel() for n in names])):
                floor = min(m.numel(), c.min_channels)
                if int(m.sum()) < floor:  # never disconnect a layer
                    m = m | _top(scores[n], floor)
                keep[n] = m
        for n, m in keep.items():
            self.engine.set_unit_mask(n, m.to(self.engine.unit_mask(n).device))
        self.pruned = True
        rec = {"channels_kept": sum(int(m.sum()) for m in keep.values()),
               "channels": sum(m.numel() for m in keep.values())}
        self.history.append(rec)
        return rec

    def on_train_start(self, state: LoopState) -> None:
        if self.prune_epoch == 0 and not self.pruned:
            self.prune()

    def on_epoch_end(self, state: LoopState, metrics: dict) -> None:
        if not self.pruned and state.epoch + 1 == self.prune_epoch:
            self.prune()

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
        return {"pruned": self.pruned}

    def load_extra_state(self, state: dict) -> None:
        self.pruned = bool(state.get("pruned", False))


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    """Bool mask of the ``k`` largest entries (ties by position)."""
    m = torch.zeros(score.numel(), dtype=torch.bool)
    if k > 0:
        order = torch.argsort(-score, stable=True)[:k]
        m[order] = True
    return m
