"""What every compression method shares: its config fields, the mask engine, history and resume state."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ...callbacks import Callback
from ...schema import ConfigError
from ..loop import LoopState
from ..masks import MaskEngine


@dataclass
class MethodConfig:
    """Options common to every method."""

    ignored_layers: list[str] = field(default_factory=list)
    prune_first: bool = True
    prune_last: bool = True

    def validate(self, key: str) -> None:
        """Subclasses add range checks; each error names ``method.<field>``."""

    @staticmethod
    def check(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"config key '{key}' {msg}")


class Method(Callback):
    """A compression method: a callback that owns a :class:`MaskEngine`.

    Its hooks receive a :class:`~spikeprune.sparsity.loop.LoopState` (filled by the trainer or by
    :func:`spikeprune.prune`), never the trainer itself. What a method needs from the loop beyond the model and
    optimizer is listed by :meth:`requirements`, checked before :meth:`setup`."""

    Config = MethodConfig
    name = "method"
    wants_loop_state = True  # the trainer passes its LoopState to this callback's hooks

    def __init__(self, cfg: MethodConfig | None = None):
        self.cfg = cfg if cfg is not None else self.Config()
        self.engine: MaskEngine | None = None
        self.state: LoopState | None = None  # the loop this method was set up on
        self.history: list[dict] = []
        self.generator = torch.Generator()

    def requirements(self) -> list[tuple[str, str]]:
        """``(field, why)`` pairs of :class:`LoopState` fields this method (with its config) cannot do without;
        ``spikeprune.prune`` turns a missing one into a one-line error naming the argument to pass."""
        return [("optimizer", "re-apply the masks after every optimizer step")]

    def check_loop(self, state: LoopState) -> None:
        for what, why in self.requirements():
            state.require(self.name, what, why)

    def setup(self, state: LoopState) -> None:
        self.check_loop(state)
        self.state = state
        self.engine = MaskEngine(state.model, self.cfg.ignored_layers, self.cfg.prune_first,
                                 self.cfg.prune_last, example_input=state.example_input)
        self.engine.attach(state.optimizer)
        # the same seed on every rank: random draws agree without communication
        self.generator.manual_seed(int(state.seed) * 1000003 + 17)

    def epoch_metrics(self, state: LoopState) -> dict:
        return {"density": self.engine.density()} if self.engine else {}

    def state_dict(self) -> dict:
        return {"history": self.history, "generator": self.generator.get_state(), **self.extra_state()}

    def load_state_dict(self, state: dict) -> None:
        self.history = list(state.get("history", []))
        if "generator" in state:
            self.generator.set_state(state["generator"])
        self.load_extra_state(state)

    def extra_state(self) -> dict:
        """Method-specific state (EMAs, counters) to checkpoint."""
        return {}

    def load_extra_state(self, state: dict) -> None: ...

    def summary(self) -> dict:
        """Method-specific numbers for the final report."""
        return {}
