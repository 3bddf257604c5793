"""TensorBoard logging of a training run (``train.tensorboard: true``): event files in ``RUN_DIR/tb``.

Per epoch (step = epoch number): every numeric metric of the epoch (``metrics/train_loss``,
``metrics/test_acc``, ``metrics/lr``, ...) as a scalar; per layer the density of its connection mask (scalar) and
the distribution of its kept weights (histogram); per spiking layer the mean firing rate (scalar) and the
distribution of its neurons' firing rates (histogram), measured on the trainer's example batch. Needs the
``tensorboard`` package (``pip install tensorboard``); without it the run goes on and says so once."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .callbacks import Callback

__all__ = ["TensorBoardLogger", "available"]


def available() -> bool:
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter  # noqa: F401
    except ImportError:
        return False
    return True


@torch.no_grad()
def firing_rates(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-neuron firing rate (spikes per step, averaged over the batch) of every spiking layer on ``x``."""
    from .adapters import neuron_spikes, reset_states, step_shape
    from .neurons import is_neuron

    rates: dict[str, torch.Tensor] = {}
    hooks = []
    for name, m in model.named_modules():
        if name and is_neuron(m):
            def hook(mod, inp, out, name=name):
                s = neuron_spikes(out).detach().float()
                s = s.reshape(step_shape(mod, out))  # [T, B, ...]
                rates[name] = s.mean(dim=(0, 1)).reshape(-1).cpu()
            hooks.append(m.register_forward_hook(hook))
    was = model.training
    # the compression method's observers must not count this extra forward
    observers = {m: m.observers for m in model.modules() if isinstance(getattr(m, "observers", None), list)}
    model.eval()
    try:
        for m in observers:
            m.observers = []
        reset_states(model)
        model(x)
    finally:
        for h in hooks:
            h.remove()
        for m, obs in observers.items():
            m.observers = obs
        reset_states(model)
        model.train(was)
    return rates


class TensorBoardLogger(Callback):
    """Writes scalars and histograms to ``log_dir`` (default ``RUN_DIR/tb``) at the end of every epoch."""

    def __init__(self, log_dir: str | Path | None = None):
        self.log_dir = None if log_dir is None else Path(log_dir)
        self.writer = None

    def setup(self, trainer: Any) -> None:
        from . import dist

        if not dist.is_main():
            return
        if not available():
            trainer.log("warning: train.tensorboard is on but the 'tensorboard' package is not installed "
                        "(pip install tensorboard); no TensorBoard logs")
            return
        from torch.utils.tensorboard import SummaryWriter

        self.log_dir = self.log_dir or Path(trainer.run_dir) / "tb"
        self.writer = SummaryWriter(str(self.log_dir))

    def on_epoch_end(self, trainer: Any, metrics: dict) -> None:
        w = self.writer
        if w is None:
            return
        step = int(getattr(trainer, "epoch", 0)) + 1
        for k, v in metrics.items():
            if k == "epoch" or isinstance(v, bool) or not isinstance(v, (int, float)):
                continue
            w.add_scalar(f"metrics/{k}", float(v), step)
        model = trainer.model
        for name, m in model.named_modules():
            mask = m._buffers.get("weight_mask") if hasattr(m, "_buffers") else None
            weight = getattr(m, "weight", None)
            if mask is None or not torch.is_tensor(weight):
                continue
            keep = mask.to(torch.bool)
            w.add_scalar(f"density/{name}", float(keep.float().mean()), step)
            kept = weight.detach()[keep].float().cpu()
            if kept.numel():
                w.add_histogram(f"weights/{name}", kept, step)
        x = getattr(trainer, "example_input", None)
        if x is not None:
            for name, r in firing_rates(model, x).items():
                w.add_scalar(f"firing_rate/{name}", float(r.mean()), step)
                w.add_histogram(f"firing_rates/{name}", r, step)
        w.flush()

    def on_train_end(self, trainer: Any) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
