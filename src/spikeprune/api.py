"""Use a compression method in your own training loop, on a spikeprune, SpikingJelly or snnTorch model."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from .adapters import invalidate, reset_states, uses_framework
from .sparsity.loop import LoopState, LoopStateError, default_optimizer_factory
from .sparsity.methods import Method, create_method

__all__ = ["prune", "Pruner", "LoopState", "LoopStateError"]

class Pruner:
    """A compression method attached to a model and optimizer, driven by your loop.

    Call :meth:`step` after every ``optimizer.step()`` and :meth:`epoch_end` once per epoch (after evaluation,
    with the metrics you have: ``{"val_acc": ...}`` for methods that select on validation accuracy). Anything
    else is looked up on the method (``pruner.engine``, ``pruner.summary()``, ``pruner.kappa`` ...). The loop's
    counters are in ``pruner.state`` (a :class:`~spikeprune.sparsity.loop.LoopState`)."""

    def __init__(self, method: Method, state: LoopState):
        self.method = method
        self.state = state
        self._finished = False

    def __getattr__(self, name: str) -> Any:
        if name in ("method", "state"):  # not set yet (copy/pickle): never recurse
            raise AttributeError(name)
        return getattr(self.method, name)

    @property
    def model(self) -> nn.Module:
        return self.state.model

    @property
    def epoch(self) -> int:
        return self.state.epoch

    @property
    def global_step(self) -> int:
        return self.state.step

    def step(self) -> None:
        """After each optimizer step: the method's per-step work (mask updates every ``update_every`` steps)."""
        self.state.step += 1
        self.state.step_in_epoch += 1
        self.method.on_step_end(self.state)

    def epoch_end(self, metrics: dict | None = None) -> dict:
        """End of an epoch: the method's epoch work (rewiring, channel selection), then the next epoch starts.
        Returns the method's numbers for the epoch (density, compression, ...)."""
        metrics = dict(metrics or {})
        self.state.metrics = metrics
        self.method.on_epoch_end(self.state, metrics)
        out = self.method.epoch_metrics(self.state)
        self.state.epoch += 1
        self.state.step_in_epoch = 0
        self.method.on_epoch_start(self.state)
        return out

    def density(self) -> float:
        """Fraction of non-zero prunable weights (connection masks and dead units folded in)."""
        return self.method.engine.density()

    def finish(self) -> None:
        """End of training: the method's last word (e.g. ``pq_rewire`` restores its best iteration)."""
        if not self._finished:
            self.method.on_train_end(self.state)
            self._finished = True

    def remove(self) -> nn.Module:
        """Finish, make every mask permanent in the model (masked weights 0.0, no buffers or hooks left) and
        detach from the optimizer. Returns the model."""
        self.finish()
        mon = getattr(self.method, "monitor", None)
        if mon is not None and hasattr(mon, "close"):
            mon.close()
        self.method.engine.remove()
        invalidate(self.model)
        return self.model

    def state_dict(self) -> dict:
        return {"method": self.method.state_dict(), "epoch": self.state.epoch, "global_step": self.state.step,
                "step_in_epoch": self.state.step_in_epoch}

    def load_state_dict(self, state: dict) -> None:
        self.method.load_state_dict(state["method"])
        self.state.epoch, self.state.step = int(state["epoch"]), int(state["global_step"])
        self.state.step_in_epoch = int(state.get("step_in_epoch", 0))
        self.method.engine.reattach()

    def __repr__(self) -> str:
        return f"Pruner({type(self.method).__name__}, epoch={self.state.epoch}, step={self.state.step})"


def prune(model: nn.Module, method: str | dict | Method = "dynsnn", example_input: torch.Tensor | None = None,
          optimizer: torch.optim.Optimizer | None = None, *, epochs: int | None = None,
          steps_per_epoch: int | None = None, data: Iterable | None = None, validation: bool = False,
          seed: int = 0, log=None, **options) -> Pruner:
    """Attach a compression method to ``model`` for your own training loop; returns a :class:`Pruner`.

    ``model`` is a spikeprune model, a SpikingJelly 2.x multi-step net, or an snnTorch net wrapped in
    :class:`spikeprune.adapters.snntorch.SnnTorchSequence`; it must map one batch to per-step outputs (unit
    methods trace it once on ``example_input``: one small batch, as the model takes it). ``method`` is a registered
    name (``dynsnn``, ``pq_rewire``, ``sca``; options as keywords, as in a recipe's ``method:``), a spec dict or a
    :class:`~spikeprune.sparsity.Method`. ``epochs`` and ``steps_per_epoch`` are the length of your loop; methods
    with a schedule (``magnitude``, ``lth``, ``set``, ``rigl``, ``eslsnn``, ``grad_r``, ``stds``, ``admm``, ``upr``)
    need them and say so in one line (:class:`LoopStateError`) when they are missing. ``data`` is your training
    loader (optional): its length gives ``steps_per_epoch`` and its first batch ``example_input`` where these are
    not passed. ``validation=True`` promises ``{"val_acc": ...}`` at every :meth:`Pruner.epoch_end` (``pq_rewire``
    with ``select: val_acc``). ``seed`` seeds the method's random draws, ``log`` receives its messages (default:
    silent). The same ``seed``, data order and loop give the same masks as :class:`~spikeprune.train.Trainer`.

    Example (SpikingJelly; reset the net's state per batch as usual)::

        net = nn.Sequential(layer.Flatten(), layer.Linear(784, 256), neuron.LIFNode(step_mode="m"),
                            layer.Linear(256, 10))
        functional.set_step_mode(net, "m")
        opt = torch.optim.Adam(net.parameters(), 1e-3)
        pruner = spikeprune.prune(net, "dynsnn", example_input=x0, optimizer=opt, epochs=5,
                                  warmup_epochs=1, update_every=50, target_compression=0.6)
        for epoch in range(5):
            for x, y in loader:                         # x: [T, B, 1, 28, 28]
                loss = F.cross_entropy(net(x).mean(0), y)
                opt.zero_grad(); loss.backward(); opt.step()
                pruner.step()
                functional.reset_net(net)
            pruner.epoch_end({"val_acc": evaluate(net)})
        pruner.remove()                                 # masks made permanent; pruner.summary() for numbers

    Masked weights are exactly 0.0 after every ``optimizer.step()`` (the engine hooks the optimizer). SpikingJelly
    nets get ``store_v_seq=True`` on the monitored nodes when the method scores the membrane.
    """
    if optimizer is None:
        raise ValueError("prune() needs the optimizer that trains the model (masks are re-applied after its steps)")
    if isinstance(method, Method):
        if options:
            raise ValueError("options go to create_method(); pass either a Method or a name with options")
        meth = method
    else:
        meth = create_method(method, **options)
    if steps_per_epoch is None and data is not None and hasattr(data, "__len__"):
        steps_per_epoch = len(data)
    if example_input is None and hasattr(model, "example_input"):
        example_input = model.example_input(2)
    if example_input is None and data is not None and any(w == "example_input" for w, _ in meth.requirements()):
        example_input = next(iter(data))[0]  # (only when needed: a shuffling loader draws from the global RNG)
    if example_input is not None:
        example_input = example_input.to(next(model.parameters()).device)
    from . import dist

    state = LoopState(model=model, optimizer=optimizer, example_input=example_input,
                      steps_per_epoch=None if steps_per_epoch is None else int(steps_per_epoch),
                      epochs=None if epochs is None else int(epochs), seed=int(seed), world_size=dist.world_size(),
                      rank=dist.rank(), log=log or _silent, optimizer_factory=default_optimizer_factory(optimizer),
                      batches=data, validation=bool(validation))
    meth.check_loop(state)  # one line naming the missing argument, before anything is attached
    meth.setup(state)  # unit methods analyse the model here
    if getattr(meth, "neurons", None) == []:
        warnings.warn(f"{meth.name}: no spiking layer of {type(model).__name__} can take a unit mask (all are "
                      "output layers, residual-coupled, or fed state from another neuron call); nothing will be "
                      "pruned", stacklevel=2)
    mon = getattr(meth, "monitor", None)
    if mon is not None and getattr(mon, "what", "spikes") != "spikes" and uses_framework(model, "spikingjelly"):
        from .adapters.spikingjelly import store_membrane

        store_membrane(model, list(getattr(meth, "neurons", []) or []))
    meth.on_train_start(state)
    meth.on_epoch_start(state)
    reset_states(model)
    return Pruner(meth, state)


def _silent(*args, **kwargs) -> None:
    return None
