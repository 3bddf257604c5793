"""The trainer's callback interface; compression methods are callbacks."""

from __future__ import annotations

from typing import Any


class Callback:
    """Hooks the :class:`~spikeprune.train.Trainer` calls. ``trainer`` exposes ``model``, ``optimizer``,
    ``epoch``, ``global_step``, ``cfg``, ``device`` and ``history``. Everything a callback needs to resume
    goes through ``state_dict``/``load_state_dict``; on resume, saved states are matched to callbacks by class
    name, so a resumed run may add or drop other callbacks.

    Hooks run at step boundaries: a ``KeyboardInterrupt`` raised inside one is not checkpointed (the step may be
    half-done); Ctrl-C is deferred by the trainer to the end of the step, which is saved.

    A callback with ``wants_loop_state = True`` (every compression method) receives the trainer's
    :class:`~spikeprune.sparsity.loop.LoopState` in place of the trainer, the same contract
    :func:`spikeprune.prune` fills for a user's own loop."""

    wants_loop_state = False

    def setup(self, trainer: Any) -> None:
        """Called once the model and optimizer exist (before a resumed state is loaded)."""

    def on_train_start(self, trainer: Any) -> None:
        """Called once before the first epoch (not again on resume)."""

    def on_epoch_start(self, trainer: Any) -> None: ...

    def on_step_end(self, trainer: Any) -> None:
        """After each optimizer step."""

    def on_epoch_end(self, trainer: Any, metrics: dict) -> None:
        """After training and evaluation of an epoch; mask updates go here."""

    def on_train_end(self, trainer: Any) -> None: ...

    def epoch_metrics(self, trainer: Any) -> dict:
        """Extra per-epoch numbers to log (thresholds, densities, ...)."""
        return {}

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None: ...
