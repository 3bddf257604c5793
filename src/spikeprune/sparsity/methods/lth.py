"""Lottery tickets in SNNs (Kim et al., ECCV 2022): iterative magnitude pruning with late rewinding.

The run is cut into rounds of ``epochs_per_round`` epochs. At the end of each round but the last, the ``rate``
(25%) smallest-magnitude surviving weights are pruned over all prunable layers together (global magnitude), and
every parameter and buffer is rewound to its value after ``rewind_epoch`` epochs (a copy taken then; the masks stay),
with the optimizer state cleared. The number of pruning rounds is the smallest ``R`` with
``(1 − rate)^R ≤ target_density + 0.005``; the ``R``-th prune goes exactly to ``target_density``, and the round after
it trains the final ticket, so the run needs ``train.epochs ≥ (R + 1) · epochs_per_round``
(``epochs_per_round: null`` takes ``train.epochs // (R + 1)``).

Chosen here because the trainer runs one fixed schedule [R]: rounds live inside one run, so the learning-rate
schedule is *not* restarted per round (use ``scheduler: none`` or a per-round-sized budget); the rewound copy holds
every parameter and buffer (BN statistics included); the optimizer state is cleared at each rewind (Kim et al.
build a new optimizer per round). Reference values: rate 0.25, rewind to epoch 20 of 300.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..loop import LoopState
from . import register_method
from ._base import Method, MethodConfig
from ._common import check_density, magnitude_masks


def lth_rounds(target: float, rate: float) -> int:
    """Pruning rounds to reach ``target`` density (within half a point) removing ``rate`` per round."""
    return 0 if target >= 1 else max(1, math.ceil(math.log(target + 0.005) / math.log(1 - rate) - 1e-9))


@dataclass
class LTHConfig(MethodConfig):
    target_density: float = 0.1
    rate: float = 0.25
    epochs_per_round: int | None = None
    rewind_epoch: int = 1  # late rewinding: weights after this many epochs (0: at initialisation)

    def validate(self, key: str) -> None:
        check_density(self, key)
        self.check(0 < self.rate < 1, f"{key}.rate", f"must be in (0, 1), got {self.rate}")
        self.check(self.epochs_per_round is None or self.epochs_per_round >= 1, f"{key}.epochs_per_round",
                   "must be >= 1 or null")
        self.check(self.rewind_epoch >= 0, f"{key}.rewind_epoch", "must be >= 0")


@register_method("lth")
class LTH(Method):
    Config = LTHConfig
    name = "lth"

    def requirements(self) -> list[tuple[str, str]]:
        return [*super().requirements(), ("epochs", "split the run into pruning rounds")]

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        c, epochs = self.cfg, state.epochs
        self.rounds = lth_rounds(c.target_density, c.rate)
        self.per_round = c.epochs_per_round or max(1, epochs // (self.rounds + 1))
        c.check(self.rounds * self.per_round < epochs, "method.epochs_per_round",
                f"gives {self.rounds} pruning rounds x {self.per_round} epochs + a final round, more than "
                f"train.epochs={epochs}")
        c.check(c.rewind_epoch < self.per_round, "method.rewind_epoch",
                f"must be below epochs_per_round ({self.per_round}): the copy is taken before the first prune")
        self.rewind_state: dict | None = None
        self.done = 0

    def _snapshot(self) -> None:
        sd = self.engine.model.state_dict()
        self.rewind_state = {k: v.detach().clone() for k, v in sd.items() if not k.endswith(("_mask",))}

    def round_density(self, r: int) -> float:
        """Density after pruning round ``r`` (1-based)."""
        return self.cfg.target_density if r >= self.rounds else (1 - self.cfg.rate) ** r

    @torch.no_grad()
    def rewind(self) -> None:
        """Surviving weights (and every other parameter and buffer) back to the stored copy; pruned stay 0."""
        self.engine.model.load_state_dict(self.rewind_state, strict=False)
        self.engine.apply()
        self.state.optimizer.state.clear()

    def on_train_start(self, state: LoopState) -> None:
        if self.cfg.rewind_epoch == 0:
            self._snapshot()

    def on_epoch_end(self, state: LoopState, metrics: dict) -> None:
        e = state.epoch + 1
        if e == self.cfg.rewind_epoch:
            self._snapshot()
        if e % self.per_round or self.done >= self.rounds:
            return
        self.done += 1
        dens = self.round_density(self.done)
        self.engine.set_masks(magnitude_masks(self.engine, dens, "global"))
        self.rewind()
        self.history.append({"round": self.done, "epoch": e, "density": dens, "test_acc": metrics.get("test_acc")})

    def summary(self) -> dict:
        return {"rounds": self.history, "epochs_per_round": self.per_round}

    def extra_state(self) -> dict:
        st = None if self.rewind_state is None else {k: v.cpu() for k, v in self.rewind_state.items()}
        return {"rewind_state": st, "done": self.done}

    def load_extra_state(self, state: dict) -> None:
        self.rewind_state, self.done = state.get("rewind_state"), state.get("done", 0)
