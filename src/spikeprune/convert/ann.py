"""The ReLU twin of a zoo model, its training loop, and BN folding (the ANN side of conversion)."""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .. import layers as L
from ..neurons import is_neuron

_SYN = (nn.Conv2d, nn.Linear)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)


# ============================================================================================ the ANN twin
def _torch_layer(m: nn.Module) -> nn.Module:
    """A plain ``torch.nn`` copy of one zoo layer (same parameters); None to drop it."""
    if isinstance(m, nn.Conv2d):
        new = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                        bias=m.bias is not None, padding_mode=m.padding_mode)
    elif isinstance(m, nn.Linear):
        new = nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    elif isinstance(m, nn.BatchNorm2d):
        new = nn.BatchNorm2d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    elif isinstance(m, nn.BatchNorm1d):
        new = nn.BatchNorm1d(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
    elif isinstance(m, nn.AvgPool2d):
        new = nn.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)
    elif isinstance(m, nn.AdaptiveAvgPool2d):
        new = nn.AdaptiveAvgPool2d(m.output_size)
    elif isinstance(m, nn.Dropout):
        new = nn.Dropout(m.p)
    else:
        raise TypeError(type(m).__name__)
    own = set(new.state_dict())  # mask buffers (weight_mask) are not copied
    new.load_state_dict({k: v for k, v in m.state_dict().items() if k in own})
    return new.to(next(iter(m.state_dict().values()), torch.empty(0)).device)


def ann_from_snn(model: nn.Module) -> nn.Sequential:
    """The ReLU ANN with the layer structure (and current parameters) of a zoo SNN whose body is one
    ``nn.Sequential`` (``lenet5``, ``fc3``, ...): neurons become ReLU, ``Repeat`` is dropped. Max-pooling, spiking
    read-outs, voting and non-direct encodings raise a ``ValueError`` naming the layer."""
    name = getattr(model, "name", type(model).__name__)
    body = getattr(model, "body", None)
    if not isinstance(body, nn.Sequential):
        raise ValueError(f"{name}: ANN conversion needs a model whose body is one nn.Sequential")
    if getattr(model, "encoding", "direct") != "direct":
        raise ValueError(f"{name}: ANN conversion needs direct encoding, got {model.encoding!r}")
    out: list[nn.Module] = []
    for child, m in body.named_children():
        where = f"{name}: layer body.{child} ({type(m).__name__})"
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)):
            raise ValueError(f"{where} is a max-pool, which ANN->SNN conversion does not support: the maximum of "
                             "spike trains is not the spike train of the maximum. Use average pooling (e.g. lenet5, "
                             "fc3) or replace the max-pool before converting.")
        if is_neuron(m):
            out.append(nn.ReLU())
        elif isinstance(m, L.Repeat):
            continue
        elif isinstance(m, L.Flatten):
            out.append(nn.Flatten(-m.dims))
        elif isinstance(m, (nn.Flatten,)):
            out.append(nn.Flatten(m.start_dim, m.end_dim))
        elif isinstance(m, (*_SYN, *_BN, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout)):
            out.append(_torch_layer(m))
        else:
            raise ValueError(f"{where} has no ANN counterpart for conversion")
    last = [m for m in out if not isinstance(m, nn.Dropout)][-1]
    if isinstance(last, nn.ReLU):
        raise ValueError(f"{name}: the model ends with a spiking layer; conversion needs a non-spiking read-out "
                         "(build it with spiking_readout=False)")
    ann = nn.Sequential(*out)
    ann.in_shape = tuple(getattr(model, "in_shape", ()))
    ann.num_classes = getattr(model, "num_classes", None)
    ann.source = name
    return ann


def make_ann(name: str, **kw) -> nn.Sequential:
    """ReLU ANN mirroring zoo model ``name`` (options as for :func:`spikeprune.models.create_model`)."""
    from ..models import create_model

    kw.setdefault("T", 1)
    kw.setdefault("neuron", "if")
    return ann_from_snn(create_model(name, **kw))


def _device_of(m: nn.Module) -> torch.device:
    p = next(m.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def evaluate_ann(ann: nn.Module, loader, max_batches: int | None = None) -> float:
    """Top-1 accuracy of ``ann`` on ``loader``."""
    dev = _device_of(ann)
    was = ann.training
    ann.eval()
    correct = n = 0
    try:
        for b, (x, y) in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x, y = x.to(dev), y.to(dev)
            correct += int((ann(x).argmax(-1) == y).sum())
            n += len(y)
    finally:
        ann.train(was)
    return correct / max(1, n)


def ann_optimizer(ann: nn.Module, optimizer: str, lr: float, weight_decay: float = 0.0,
                  momentum: float = 0.9) -> torch.optim.Optimizer:
    """The ANN's optimizer: ``adam`` or ``sgd`` (with ``momentum``)."""
    if optimizer == "adam":
        return torch.optim.Adam(ann.parameters(), lr=lr, weight_decay=weight_decay)
    if optimizer == "sgd":
        return torch.optim.SGD(ann.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")


def train_ann(ann: nn.Module, train_loader, test_loader=None, epochs: int = 10, lr: float = 1e-3,
              optimizer: str = "adam", weight_decay: float = 0.0, momentum: float = 0.9, scheduler: str = "cosine",
              max_steps_per_epoch: int | None = None, log: Callable[[str], None] | None = print,
              activity_l1: float = 0.0, unit_hoyer: float = 0.0,
              penalty_layers: Sequence[int] | None = None) -> float | None:
    """Train ``ann`` with cross-entropy (Adam or SGD, cosine or constant lr); print one line per epoch and return
    the final test accuracy (None without ``test_loader``).

    ``activity_l1`` > 0 adds ``activity_l1 · Σ_ℓ mean(a_ℓ)`` over the hidden ReLU outputs (a firing-rate
    penalty: after conversion the rates are ``a/λ``). Being scale-invariant in neither direction, it mostly shrinks
    activations (the next layer scales back up) rather than silencing units.

    ``unit_hoyer`` > 0 adds ``unit_hoyer · Σ_ℓ H_ℓ`` with the scale-invariant Hoyer measure of unit activity
    ``H_ℓ = Σ_i r_i / (sqrt(n_ℓ) · sqrt(Σ_i r_i²))``, ``r_i`` the RMS activation of unit ``i`` (channel ``i`` in conv
    layers) over the batch [R]: it concentrates the activity of each layer into fewer units, so the others fade.
    ``penalty_layers``: ordinals of the ReLUs that are penalised (0 = the first; default all)."""
    if epochs < 0 or lr <= 0 or activity_l1 < 0 or unit_hoyer < 0:
        raise ValueError(f"need epochs >= 0, lr > 0, activity_l1 >= 0 and unit_hoyer >= 0, got {epochs=}, {lr=}, "
                         f"{activity_l1=}, {unit_hoyer=}")
    dev = _device_of(ann)
    acts: list[torch.Tensor] = []

    def penalty_hook(mod, inputs, out):
        if not mod.training:
            return
        pen = out.new_zeros(())
        if activity_l1 > 0:
            pen = pen + activity_l1 * out.mean()
        if unit_hoyer > 0:
            r = out.transpose(0, 1).reshape(out.shape[1], -1).square().mean(1).add(1e-12).sqrt()
            pen = pen + unit_hoyer * r.sum() / (math.sqrt(r.numel()) * r.square().sum().sqrt())
        acts.append(pen)

    relus = [m for m in ann.modules() if isinstance(m, nn.ReLU)]
    chosen = range(len(relus)) if penalty_layers is None else list(penalty_layers)
    if any(not 0 <= i < len(relus) for i in chosen):
        raise ValueError(f"penalty_layers must be ReLU ordinals in [0, {len(relus)}), got {list(chosen)}")
    handles = [relus[i].register_forward_hook(penalty_hook) for i in chosen] \
        if activity_l1 > 0 or unit_hoyer > 0 else []
    opt = ann_optimizer(ann, optimizer, lr, weight_decay, momentum)
    steps = len(train_loader) if max_steps_per_epoch is None else min(len(train_loader), max_steps_per_epoch)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, epochs * steps)) if scheduler == "cosine"
             else None)
    acc = None
    for ep in range(epochs):
        if hasattr(train_loader, "set_epoch"):
            train_loader.set_epoch(ep)
        ann.train()
        t0, tot, pen_tot, correct, n = time.time(), 0.0, 0.0, 0, 0
        for b, (x, y) in enumerate(train_loader):
            if b >= steps:
                break
            x, y = x.to(dev), y.to(dev)
            acts.clear()
            out = ann(x)
            loss = F.cross_entropy(out, y)
            if acts:
                penalty = torch.stack(acts).sum()
                pen_tot += penalty.item() * len(y)
                loss = loss + penalty
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            tot += loss.item() * len(y)
            correct += int((out.argmax(-1) == y).sum())
            n += len(y)
        acc = evaluate_ann(ann, test_loader) if test_loader is not None else None
        if log is not None:
            msg = f"ann epoch {ep + 1}/{epochs}: loss {tot / max(1, n):.4f}"
            if handles:
                msg += f" (penalty {pen_tot / max(1, n):.4f})"
            msg += f", train acc {100 * correct / max(1, n):.2f}%"
            if acc is not None:
                msg += f", test acc {100 * acc:.2f}%"
            log(msg + f" ({time.time() - t0:.0f} s)")
    for h in handles:
        h.remove()
    ann.eval()
    return acc if epochs > 0 or test_loader is None else evaluate_ann(ann, test_loader)


# =============================================================================================== BN folding
@torch.no_grad()
def fold_bn(ann: nn.Sequential) -> nn.Sequential:
    """A copy of ``ann`` with every BatchNorm folded into the Conv/Linear right before it (eval statistics):
    ``W' = W·γ/σ``, ``b' = (b − μ)·γ/σ + β`` with ``σ = sqrt(var + eps)``."""
    mods = list(ann.children())
    out: list[nn.Module] = []
    for i, m in enumerate(mods):
        if not isinstance(m, _BN):
            out.append(copy.deepcopy(m))
            continue
        prev = out[-1] if out else None
        if not isinstance(prev, _SYN):
            raise ValueError(f"cannot fold BatchNorm at position {i}: it does not follow a Conv/Linear layer")
        if m.running_mean is None:
            raise ValueError(f"cannot fold BatchNorm at position {i}: it tracks no running statistics")
        if prev.weight.shape[0] != m.num_features:
            raise ValueError(f"cannot fold BatchNorm at position {i}: {m.num_features} features after a layer "
                             f"with {prev.weight.shape[0]} outputs")
        std = (m.running_var + m.eps).sqrt()
        gamma = m.weight if m.affine else torch.ones_like(std)
        beta = m.bias if m.affine else torch.zeros_like(std)
        scale = gamma / std
        b = prev.bias if prev.bias is not None else torch.zeros_like(std)
        new_b = (b - m.running_mean) * scale + beta
        prev.weight.mul_(scale.view(-1, *([1] * (prev.weight.dim() - 1))))
        if prev.bias is None:
            prev.bias = nn.Parameter(new_b.clone())
        else:
            prev.bias.copy_(new_b)
    new = nn.Sequential(*out)
    for k in ("in_shape", "num_classes", "source"):
        if hasattr(ann, k):
            setattr(new, k, getattr(ann, k))
    return new.train(ann.training)
