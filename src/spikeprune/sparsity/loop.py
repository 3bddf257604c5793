"""The loop state: everything a compression method may read about the training loop that drives it.

Methods take a :class:`LoopState`, never the trainer. :class:`~spikeprune.train.Trainer` fills one for its runs
and :func:`spikeprune.prune` fills one for your own loop, so a method behaves the same under both. A method that
needs a field the loop may not know (the run's length for a schedule, an example batch to trace the model) says
so in :meth:`Method.requirements <spikeprune.sparsity.methods.Method.requirements>`; ``prune()`` checks those at
attach time and stops with one line naming the argument to pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


class LoopStateError(ValueError):
    """A method asked the loop for something it does not know (the message names the ``prune()`` argument)."""


def _silent(*args, **kwargs) -> None:
    return None


def default_optimizer_factory(optimizer: torch.optim.Optimizer) -> Callable[[Iterable], torch.optim.Optimizer]:
    """Optimizers of ``optimizer``'s kind with its construction settings (for a method's own parameters)."""
    kind, defaults = type(optimizer), dict(optimizer.defaults)

    def make(params: Iterable) -> torch.optim.Optimizer:
        return kind(list(params), **defaults)

    return make


# what each field is called where a user passes it (for the one-line errors)
_ARGUMENT = {"epochs": "epochs=N", "steps_per_epoch": "steps_per_epoch=N (or data=loader with a length)",
             "example_input": "example_input=x (one small batch, as the model takes it)",
             "batches": "data=loader", "optimizer": "optimizer=opt", "validation": "{'val_acc': ...} to "
             "pruner.epoch_end() and validation=True to prune()"}


@dataclass(eq=False)
class LoopState:
    """The state of the training loop a method is driven by (see the module docstring).

    ``epoch`` and ``step_in_epoch`` are 0-based and count what is done: during ``on_step_end`` of the first step
    ``step == 1`` and ``step_in_epoch == 1``. ``steps_per_epoch`` and ``epochs`` are ``None`` where the loop does
    not say; :meth:`total_steps` then raises :class:`LoopStateError`."""

    model: nn.Module
    optimizer: torch.optim.Optimizer | None = None
    example_input: torch.Tensor | None = None
    epoch: int = 0
    step: int = 0  # optimizer steps done in the whole run (``global_step`` of the trainer)
    step_in_epoch: int = 0
    steps_per_epoch: int | None = None
    epochs: int | None = None
    seed: int = 0
    world_size: int = 1
    rank: int = 0
    log: Callable[..., None] = _silent
    optimizer_factory: Callable[[Iterable], torch.optim.Optimizer] | None = None
    batches: Iterable | None = None  # where next_batch() draws from (the training data)
    validation: bool = False  # epoch_end metrics carry ``val_acc``
    metrics: dict = field(default_factory=dict)  # the last epoch's metrics (val_acc, test_acc, ...)
    scaler: Any = None  # AMP's GradScaler when the loop scales the loss
    _batch_iter: Iterator | None = field(default=None, repr=False)

    # the trainer's name for ``step``
    @property
    def global_step(self) -> int:
        return self.step

    @global_step.setter
    def global_step(self, value: int) -> None:
        self.step = value

    @property
    def device(self) -> torch.device:
        p = next(self.model.parameters(), None)
        return p.device if p is not None else torch.device("cpu")

    # ------------------------------------------------------------------------------------ asking
    def missing(self, what: str) -> bool:
        if what == "validation":
            return not self.validation
        return getattr(self, what) is None

    def require(self, who: str, what: str, why: str) -> None:
        """Raise :class:`LoopStateError` in one line when ``what`` is unknown: ``who needs what to why: pass X``."""
        if self.missing(what):
            raise LoopStateError(f"{who} needs {what.replace('_', ' ')} to {why}: pass {_ARGUMENT.get(what, what)}")

    def total_steps(self, who: str = "this method") -> int:
        """Optimizer steps of the whole run (``epochs × steps_per_epoch``)."""
        self.require(who, "epochs", "plan its schedule")
        self.require(who, "steps_per_epoch", "plan its schedule in steps")
        return max(1, int(self.steps_per_epoch) * int(self.epochs))

    def is_last_epoch(self, epoch: int | None = None) -> bool:
        """Whether ``epoch`` (default: the current one) is the last of the run; never when the length is unknown."""
        e = self.epoch if epoch is None else epoch
        return self.epochs is not None and e + 1 >= self.epochs

    @property
    def progress(self) -> float:
        """Epochs done, with the fraction of the current epoch when its length is known."""
        frac = self.step_in_epoch / self.steps_per_epoch if self.steps_per_epoch else 0.0
        return self.epoch + frac

    def lr(self) -> float:
        """The optimizer's current learning rate (first parameter group)."""
        if self.optimizer is None:
            raise LoopStateError(f"the loop state has no optimizer: pass {_ARGUMENT['optimizer']}")
        return float(self.optimizer.param_groups[0]["lr"])

    def make_optimizer(self, params: Iterable) -> torch.optim.Optimizer:
        """An optimizer of the run's kind and settings for a method's own parameters (hidden weights)."""
        if self.optimizer_factory is not None:
            return self.optimizer_factory(params)
        if self.optimizer is None:
            raise LoopStateError(f"the loop state has no optimizer: pass {_ARGUMENT['optimizer']}")
        return default_optimizer_factory(self.optimizer)(params)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next ``(x, y)`` of the training data (cycling), moved to the model's device."""
        if self.batches is None:
            raise LoopStateError(f"this method needs batches of training data: pass {_ARGUMENT['batches']}")
        for _ in range(2):
            if self._batch_iter is None:
                self._batch_iter = iter(self.batches)
            try:
                x, y = next(self._batch_iter)[:2]
                return x.to(self.device), y.to(self.device)
            except StopIteration:
                self._batch_iter = None
        raise LoopStateError("the data passed as data= yields no batch")

    def __getstate__(self) -> dict:  # picklable: a live iterator (and a lambda logger) stay behind
        st = dict(self.__dict__)
        st["_batch_iter"] = None
        if not _picklable(st.get("log")):
            st["log"] = _silent
        if not _picklable(st.get("optimizer_factory")):
            st["optimizer_factory"] = None
        return st


def _picklable(obj: Any) -> bool:
    import pickle

    try:
        pickle.dumps(obj)
        return True
    except Exception:
        return False


def loop_field(name: str) -> property:
    """A class attribute that reads and writes ``self.loop.<name>`` (the trainer's ``epoch``, ``global_step``...)."""

    def get(self):
        return getattr(self.loop, name)

    def put(self, value) -> None:
        setattr(self.loop, name, value)

    return property(get, put)


__all__ = ["LoopState", "LoopStateError", "default_optimizer_factory", "loop_field"]
