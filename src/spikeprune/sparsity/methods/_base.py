"""What every compression method shares: its config fields, the mask engine, history and resume state."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from ...callbacks import Callback
from ...config import ConfigError
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
    """A compression method: a trainer callback that owns a :class:`MaskEngine`."""

    Config = MethodConfig
    name = "method"

    def __init__(self, cfg: MethodConfig | None = None):
        self.cfg = cfg if cfg is not None else self.Config()
        self.engine: MaskEngine | None = None
        self.trainer: Any = None  # the trainer (or spikeprune.prune's stand-in) this method was set up on
        self.history: list[dict] = []
        self.generator = torch.Generator()

    def setup(self, trainer: Any) -> None:
        self.trainer = trainer
        self.engine = MaskEngine(trainer.model, self.cfg.ignored_layers, self.cfg.prune_first,
                                 self.cfg.prune_last, example_input=trainer.example_input)
        self.engine.attach(trainer.optimizer)
        # the same seed on every rank: random draws agree without communication
        self.generator.manual_seed(int(trainer.cfg.seed) * 1000003 + 17)

    def epoch_metrics(self, trainer: Any) -> dict:
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
