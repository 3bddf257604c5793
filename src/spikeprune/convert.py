"""ANN→SNN conversion, and DynSNN on converted networks (methods.md §3 item 5).

Pipeline::

    ann = make_ann("lenet5")                       # ReLU twin of a zoo model (plain torch layers)
    train_ann(ann, train_loader, test_loader, epochs=10)
    lam = calibrate(ann, calib_loader, "percentile", 99.9)
    snn = to_snn(ann, lam, T=128)                  # IF neurons, reset by subtraction, direct input
    accuracy_vs_T(snn, test_loader, Ts=(8, 16, 32, 64, 128, 256))
    res = dynsnn_convert(snn, calib_loader, target_compression=0.6)   # mask fading units, re-balance

Choices (record them with results):

* **ANN twin** — :func:`ann_from_snn` mirrors a zoo model layer by layer: neurons become ``ReLU``, the direct
  encoder ``Repeat`` is dropped (T=1, static input), ``Dropout`` is kept for training and skipped by conversion.
  ``train_ann`` can add a firing-rate penalty (``activity_l1``) or a unit-level Hoyer sparsity penalty
  (``unit_hoyer``) on the hidden ReLUs [R], so the units the task does not need fade during training (DynSNN then
  finds them).
  Max-pooling is refused: the max of spike trains is not the spike train of the max (the usual fixes — gating by
  rate or lateral inhibition — are not implemented). Spiking read-outs and voting layers are refused as well.
* **BN folding** — :func:`fold_bn` merges every BatchNorm into the Conv/Linear right before it (eval statistics).
* **Calibration** (Diehl et al. 2015, Rueckauer et al. 2017) — λ_ℓ is the maximum of layer ℓ's ReLU output over
  the calibration set (``"max"``) or a percentile of its *positive* values (``"percentile"``, zeros left out as
  in the SNN Toolbox); one λ per layer.
* **Normalisation by thresholds** (our choice among the equivalent forms) — the synaptic weights stay the ANN's
  weights; layer ℓ's IF neurons get ``V_th,ℓ = λ_ℓ / λ_{ℓ-1}`` and its bias becomes ``b_ℓ / λ_{ℓ-1}``
  (λ_0 = 1: the analog input). A spike of layer ℓ then stands for the activation λ_ℓ, the firing rate
  approximates ``clip(a_ℓ / λ_ℓ, 0, 1)``, and the spike trains equal those of Rueckauer's weight normalisation
  (``W_ℓ λ_{ℓ-1}/λ_ℓ``, ``V_th = 1``) up to rounding. The read-out layer's input is multiplied back by
  ``λ_{L-1}`` (``output_scale``) so the logits are on the ANN's scale.
* **IF neurons** — reset by subtraction (``v_reset=None``), initial membrane ``v_init · V_th`` with
  ``v_init = 0.5`` by default (rounds the rate instead of flooring it, halving the quantisation error at small T).
* **Direct input** — the first Conv/Linear sees the analog image; its output is computed once and repeated T times
  (the same as feeding the image every step). The read-out layer is a non-spiking accumulator: the model outputs
  its input current ``[T, B, K]``; the mean over T is its membrane potential / T.
* **DynSNN on converted nets** [R] — per-unit firing rates (channel means in conv layers) on a calibration subset;
  unit ``i`` of layer ℓ fades when ``rate_i < κ · mean_ℓ(rate)``; with ``target_compression`` the smallest κ that
  reaches it is found by bisection. Units are masked with the mask engine's unit masks (at least ``min_alive`` of
  each layer survive). Optionally (``compensate``, [R]) the mean input each dead unit sent to its consumers is
  folded into their biases (mean replacement). Then thresholds are re-balanced: the calibration is re-run on the
  masked ANN (dead units' fan-in rows and biases zeroed) and λ, V_th and the biases are updated. Compression =
  ``1 − density`` of the effective weights (a masked unit loses its fan-in row and fan-out column), as
  :func:`spikeprune.measure.measure` reports it.
"""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from . import layers as L
from .config import DataConfig
from .models._base import SpikingModel
from .neurons import IF, is_neuron

__all__ = [
    "make_ann", "ann_from_snn", "train_ann", "evaluate_ann", "fold_bn", "calibrate", "ConversionIF",
    "ConvertedSNN", "to_snn", "snn_to_ann", "set_lambdas", "accuracy_vs_T", "firing_rates", "dynsnn_convert",
    "DynSNNConvertResult", "ConvertRunConfig", "load_convert_config", "run_convert", "plot_accuracy_vs_T",
    "write_table",
]

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
    from .models import create_model

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
    if optimizer == "adam":
        opt = torch.optim.Adam(ann.parameters(), lr=lr, weight_decay=weight_decay)
    elif optimizer == "sgd":
        opt = torch.optim.SGD(ann.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
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


# ============================================================================================== calibration
def _relu_names(ann: nn.Module) -> list[str]:
    return [n for n, m in ann.named_modules() if isinstance(m, nn.ReLU)]


@torch.no_grad()
def calibrate(ann: nn.Module, loader, method: str = "percentile", percentile: float = 99.9,
              max_batches: int | None = None, max_values: int = 1 << 20, seed: int = 0) -> dict[str, float]:
    """Per-layer normalisation factors λ_ℓ: the maximum (``"max"``) or the ``percentile`` of the positive values
    (``"percentile"``, numpy's linear interpolation) of each ReLU's output over ``loader``. Returns
    ``{relu module name: λ}`` in network order. A batch contributes at most ``max_values`` positive values per
    layer to the percentile (a seeded random subset beyond that); the maximum is always exact. A layer that never
    activates gets λ = 1."""
    if method not in ("max", "percentile"):
        raise ValueError(f"method must be 'max' or 'percentile', got {method!r}")
    if not 0 < percentile <= 100:
        raise ValueError(f"percentile must be in (0, 100], got {percentile}")
    names = _relu_names(ann)
    if not names:
        raise ValueError("calibrate() found no ReLU in the ANN")
    mods = dict(ann.named_modules())
    maxes = {n: 0.0 for n in names}
    values: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    gen = torch.Generator().manual_seed(seed)

    def hook(name):
        def fn(mod, inp, out):
            a = out.detach().flatten()
            if a.numel():
                maxes[name] = max(maxes[name], float(a.max()))
            if method == "percentile":
                pos = a[a > 0].float().cpu()
                if pos.numel() > max_values:
                    pos = pos[torch.randperm(pos.numel(), generator=gen)[:max_values]]
                values[name].append(pos)
        return fn

    handles = [mods[n].register_forward_hook(hook(n)) for n in names]
    dev = _device_of(ann)
    was = ann.training
    ann.eval()
    try:
        seen = 0
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            ann(batch[0].to(dev))
            seen += 1
        if not seen:
            raise ValueError("calibrate() got an empty loader")
    finally:
        ann.train(was)
        for h in handles:
            h.remove()
    lam = {}
    for n in names:
        if method == "max":
            v = maxes[n]
        else:
            pos = torch.cat(values[n]) if values[n] else torch.empty(0)
            v = float(np.percentile(pos.numpy(), percentile)) if pos.numel() else 0.0
        lam[n] = v if v > 0 else 1.0
    return lam


# ================================================================================================ the SNN
class ConversionIF(IF):
    """IF neuron for converted networks: reset by subtraction and initial membrane ``v_init · V_th``.

    With ``carry = True`` the membrane is kept between calls (long runs evaluated in chunks of time steps); call
    :meth:`reset` before each new input."""

    def __init__(self, v_threshold: float = 1.0, v_init: float = 0.5):
        super().__init__(v_threshold=v_threshold, v_reset=None, stateful=True)
        if not 0 <= v_init < 1:
            raise ValueError(f"v_init must be in [0, 1), got {v_init}")
        self.v_init = float(v_init)
        self.carry = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.carry or self.v is None:
            self.v = torch.full_like(x[0], self.v_init * self.v_threshold)
        out = super().forward(x)
        if not self.carry:
            self.v = None
        return out

    def extra_repr(self) -> str:
        return f"v_threshold={self.v_threshold:.6g}, v_init={self.v_init}, reset=subtract"


class ConvertedSNN(SpikingModel):
    """An IF-neuron SNN built by :func:`to_snn`: ``body`` (spikeprune layers, direct encoding) and a read-out
    scaled by ``output_scale``. ``stages`` lists ``(synaptic layer, IF neuron or None)`` in order; ``lambdas``
    holds the λ of each IF layer; ``calibration`` how they were obtained."""

    def __init__(self, name: str, layers: list[nn.Module], in_shape: Sequence[int], num_classes: int, T: int,
                 lambdas: Sequence[float], output_scale: float, calibration: dict | None = None):
        super().__init__(name, in_shape, num_classes, T, "direct")
        self.body = nn.Sequential(*layers)
        self.register_buffer("lambdas", torch.tensor([float(v) for v in lambdas], dtype=torch.float64))
        self.register_buffer("output_scale", torch.tensor(float(output_scale)))
        self.calibration = dict(calibration or {})
        self.stages = _stages(self.body)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        return self.body(x) * self.output_scale

    def if_neurons(self) -> list[str]:
        return [n for _, n in self.stages if n is not None]


def _stages(body: nn.Sequential) -> list[tuple[str, str | None]]:
    """``(synaptic layer name, following IF neuron name or None)`` for every Conv/Linear of ``body``."""
    stages: list[tuple[str, str | None]] = []
    for child, m in body.named_children():
        name = f"body.{child}"
        if isinstance(m, _SYN):
            stages.append((name, None))
        elif is_neuron(m):
            if not stages or stages[-1][1] is not None:
                raise ValueError(f"IF layer {name} does not follow a Conv/Linear layer")
            stages[-1] = (stages[-1][0], name)
    return stages


def _spiking_layer(m: nn.Module) -> nn.Module:
    """The spikeprune (multi-step) version of a Conv2d/Linear, with the same parameters."""
    if isinstance(m, nn.Conv2d):
        new = L.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation, m.groups,
                       bias=m.bias is not None, padding_mode=m.padding_mode)
    else:
        new = L.Linear(m.in_features, m.out_features, bias=m.bias is not None)
    own = set(new.state_dict())
    new.load_state_dict({k: v for k, v in m.state_dict().items() if k in own})
    return new.to(m.weight.device)


@torch.no_grad()
def to_snn(ann: nn.Sequential, thresholds: Mapping[str, float] | Sequence[float], T: int = 128,
           v_init: float = 0.5, calibration: dict | None = None) -> ConvertedSNN:
    """Convert a ReLU ``nn.Sequential`` into a :class:`ConvertedSNN` (threshold balancing, see the module doc).

    ``thresholds``: the λ of every ReLU (the dict from :func:`calibrate`, or a list in network order). BatchNorm is
    folded first; Dropout is dropped; max-pooling is refused. The result outputs ``[T, B, classes]``."""
    if any(isinstance(m, _BN) for m in ann.modules()):
        ann = fold_bn(ann)
    relus = _relu_names(ann)
    lam = [float(thresholds[n]) for n in relus] if isinstance(thresholds, Mapping) else [float(v) for v in thresholds]
    if len(lam) != len(relus):
        raise ValueError(f"need one threshold per ReLU ({len(relus)}), got {len(lam)}")
    if any(not v > 0 for v in lam):
        raise ValueError(f"thresholds must be > 0, got {lam}")
    in_shape = tuple(getattr(ann, "in_shape", ()))
    if not in_shape:
        raise ValueError("the ANN has no in_shape attribute (build it with make_ann/ann_from_snn or set it)")
    feat_dims = len(in_shape)
    out: list[nn.Module] = []
    k = 0  # next ReLU / λ index
    lam_prev = 1.0
    pending: nn.Module | None = None  # synaptic layer waiting for its ReLU
    first = True
    for i, m in enumerate(ann.children()):
        if isinstance(m, (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AdaptiveMaxPool2d)):
            raise ValueError(f"ANN layer {i} ({type(m).__name__}) is a max-pool, which conversion does not support")
        if isinstance(m, nn.Dropout):
            continue
        if isinstance(m, _SYN):
            if pending is not None:
                raise ValueError(f"ANN layer {i}: two Conv/Linear layers without a ReLU in between")
            new = _spiking_layer(m)
            if new.bias is not None:
                new.bias.div_(lam_prev)
            out.append(new)
            pending = new
        elif isinstance(m, nn.ReLU):
            if pending is None:
                raise ValueError(f"ANN layer {i}: ReLU does not follow a Conv/Linear layer")
            if first:
                out.append(L.Repeat(T))
                first = False
            out.append(ConversionIF(lam[k] / lam_prev, v_init))
            lam_prev = lam[k]
            k += 1
            pending = None
        elif isinstance(m, nn.AvgPool2d):
            out.append(L.AvgPool2d(m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad,
                                   m.divisor_override))
        elif isinstance(m, nn.AdaptiveAvgPool2d):
            out.append(L.AdaptiveAvgPool2d(m.output_size))
        elif isinstance(m, nn.Flatten):
            if m.end_dim != -1:
                raise ValueError(f"ANN layer {i}: only Flatten up to the last dimension is supported")
            out.append(L.Flatten(feat_dims))
            feat_dims = 1
        elif isinstance(m, nn.Identity):
            continue
        else:
            raise ValueError(f"ANN layer {i} ({type(m).__name__}) cannot be converted")
    if pending is None:
        raise ValueError("the ANN must end with a Conv/Linear read-out (no ReLU after it)")
    if first:
        raise ValueError("the ANN has no ReLU: nothing to convert")
    cal = {"v_init": float(v_init), **(calibration or {})}
    name = f"{getattr(ann, 'source', 'ann')}_snn"
    snn = ConvertedSNN(name, out, in_shape, getattr(ann, "num_classes", None) or out[-1].weight.shape[0], T, lam,
                       lam_prev, cal)
    return snn.to(_device_of(ann))


@torch.no_grad()
def snn_to_ann(snn: ConvertedSNN, masked: bool = True) -> nn.Sequential:
    """The ANN a :class:`ConvertedSNN` approximates (weights as in the SNN, biases back on the ANN scale). With
    ``masked`` the connection masks and dead units are folded in: a dead unit's fan-in row and bias are zeroed, so
    its ReLU outputs exactly 0."""
    from .measure import effective_weights

    eff = effective_weights(snn) if masked else {}
    lam = [float(v) for v in snn.lambdas]
    prev = {}
    k = 0
    for syn, neu in snn.stages:
        prev[syn] = lam[k - 1] if k > 0 else 1.0
        if neu is not None:
            k += 1
    out: list[nn.Module] = []
    for child, m in snn.body.named_children():
        name = f"body.{child}"
        if isinstance(m, _SYN):
            new = _torch_layer(m)
            if name in eff:
                new.weight.copy_(eff[name])
            if new.bias is not None:
                new.bias.mul_(prev[name])
            out.append(new)
        elif is_neuron(m):
            um = getattr(m, "unit_mask", None)
            if masked and um is not None and out[-1].bias is not None:
                out[-1].bias[~um.to(torch.bool)] = 0
            out.append(nn.ReLU())
        elif isinstance(m, L.Repeat):
            continue
        elif isinstance(m, L.Flatten):
            out.append(nn.Flatten(-m.dims))
        else:
            out.append(_torch_layer(m))
    ann = nn.Sequential(*out).to(_device_of(snn))
    ann.in_shape, ann.num_classes, ann.source = snn.in_shape, snn.num_classes, snn.name.removesuffix("_snn")
    return ann.eval()


@torch.no_grad()
def set_lambdas(snn: ConvertedSNN, lambdas: Mapping[str, float] | Sequence[float]) -> None:
    """Re-normalise a converted SNN in place for new per-layer λ (thresholds ``λ_ℓ/λ_{ℓ-1}``, biases
    ``b_ℓ/λ_{ℓ-1}``, read-out scale ``λ_{L-1}``). A mapping may be keyed by IF neuron names or hold the values in
    network order (as :func:`calibrate` returns them for the twin ANN)."""
    neurons = snn.if_neurons()
    if isinstance(lambdas, Mapping):
        new = [float(lambdas[n]) for n in neurons] if all(n in lambdas for n in neurons) else \
            [float(v) for v in lambdas.values()]
    else:
        new = [float(v) for v in lambdas]
    if len(new) != len(neurons) or any(not v > 0 for v in new):
        raise ValueError(f"need {len(neurons)} positive λ values, got {new}")
    old = [float(v) for v in snn.lambdas]
    modules = dict(snn.named_modules())
    k = 0
    for syn, neu in snn.stages:
        old_prev, new_prev = (old[k - 1], new[k - 1]) if k > 0 else (1.0, 1.0)
        m = modules[syn]
        if m.bias is not None:
            m.bias.mul_(old_prev / new_prev)
        if neu is not None:
            modules[neu].v_threshold = new[k] / new_prev
            k += 1
    snn.lambdas.copy_(torch.tensor(new, dtype=torch.float64))
    snn.output_scale.fill_(new[-1])


# ============================================================================================== evaluation
def _carry(snn: nn.Module, on: bool) -> None:
    for m in snn.modules():
        if isinstance(m, ConversionIF):
            m.carry = on
            m.v = None


@torch.no_grad()
def _run_steps(snn: ConvertedSNN, x: torch.Tensor, T: int, chunk: int,
               on_chunk: Callable[[int, torch.Tensor], None]) -> None:
    """Run ``x`` for ``T`` steps in chunks of ``chunk`` steps (membranes carried over); ``on_chunk(t0, out)`` gets
    each chunk's outputs ``[t, B, K]`` starting at step ``t0``."""
    T0 = snn.T
    _carry(snn, True)
    try:
        for t0 in range(0, T, chunk):
            snn.set_T(min(chunk, T - t0))
            on_chunk(t0, snn(x))
    finally:
        _carry(snn, False)
        snn.set_T(T0)


@torch.no_grad()
def accuracy_vs_T(snn: ConvertedSNN, loader, Ts: Iterable[int] = (8, 16, 32, 64, 128, 256),
                  max_batches: int | None = None, chunk: int = 32) -> dict[int, float]:
    """Accuracy after ``T`` steps for every ``T`` in ``Ts`` from one run of ``max(Ts)`` steps: the output
    accumulates causally, so the prediction at ``T`` is the argmax of the first ``T`` outputs' sum."""
    Ts = sorted({int(t) for t in Ts})
    if not Ts or Ts[0] < 1:
        raise ValueError(f"Ts must be positive integers, got {Ts}")
    dev = _device_of(snn)
    was = snn.training
    snn.eval()
    correct = dict.fromkeys(Ts, 0)
    n = 0
    try:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x, y = batch[0].to(dev), batch[1].to(dev)
            acc = [torch.zeros((x.shape[0], snn.num_classes), device=dev, dtype=torch.float64)]

            def take(t0, out, acc=acc, y=y):
                cs = out.double().cumsum(0) + acc[0]
                for t in Ts:
                    if t0 < t <= t0 + out.shape[0]:
                        correct[t] += int((cs[t - t0 - 1].argmax(-1) == y).sum())
                acc[0] = cs[-1]

            _run_steps(snn, x, Ts[-1], chunk, take)
            n += len(y)
    finally:
        snn.train(was)
    return {t: correct[t] / max(1, n) for t in Ts}


@torch.no_grad()
def firing_rates(snn: ConvertedSNN, loader, T: int | None = None, max_batches: int | None = None,
                 per_unit: bool = True, chunk: int = 32) -> dict[str, torch.Tensor]:
    """Would-be firing rate of every IF layer (spikes / (T · samples), before any unit mask): per unit (channel
    means in conv layers) with ``per_unit``, else per neuron (``[C, H, W]`` or ``[N]``)."""
    rates, _ = _activity(snn, loader, T, max_batches, chunk)
    return {n: r.reshape(r.shape[0], -1).mean(1) if per_unit else r for n, r in rates.items()}


@torch.no_grad()
def _activity(snn: ConvertedSNN, loader, T: int | None, max_batches: int | None, chunk: int,
              inputs: Iterable[str] = ()) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-neuron rates of every IF layer (before unit masks) and the mean input (per element, over time steps
    and samples) of the synaptic layers named in ``inputs``."""
    T = snn.T if T is None else int(T)
    sums: dict[str, torch.Tensor] = {}
    in_sums: dict[str, torch.Tensor] = {}
    frames: dict[str, int] = {}
    count = [0]
    modules = dict(snn.named_modules())
    names = snn.if_neurons()

    def obs_for(name):
        def obs(mod, spikes, membrane):
            sums[name] = sums.get(name, 0) + spikes.sum((0, 1)).double()
        return obs

    def pre_for(name):
        def pre(mod, args):
            x = args[0]
            feat = 1 if isinstance(mod, nn.Linear) else 3
            x = x.reshape(-1, *x.shape[x.dim() - feat:])
            in_sums[name] = in_sums.get(name, 0) + x.sum(0).double()
            frames[name] = frames.get(name, 0) + x.shape[0]
        return pre

    attached, handles = [], []
    for n in names:
        o = obs_for(n)
        modules[n].observers.append(o)
        attached.append((modules[n], o))
    for n in inputs:
        handles.append(modules[n].register_forward_pre_hook(pre_for(n)))
    dev = _device_of(snn)
    was = snn.training
    snn.eval()
    try:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x = batch[0].to(dev)
            _run_steps(snn, x, T, chunk, lambda t0, out: None)
            count[0] += x.shape[0]
    finally:
        snn.train(was)
        for mod, o in attached:
            mod.observers.remove(o)
        for h in handles:
            h.remove()
    if not count[0]:
        raise ValueError("firing_rates() got an empty loader")
    rates = {n: (sums[n] / (T * count[0])).float() for n in names}
    means = {n: (in_sums[n] / frames[n]).float() for n in in_sums}
    return rates, means


@torch.no_grad()
def _compensate(snn: ConvertedSNN, engine, names: Iterable[str], means: Mapping[str, torch.Tensor]) -> None:
    """Fold the mean input that every dead unit used to send into its consumers' biases (mean replacement): exact
    in expectation for Linear consumers; for Conv consumers the unit's spatial mean goes through the kernel sum
    (border effects ignored)."""
    modules = dict(snn.named_modules())
    from .graph import unit_index

    for n in names:
        g = engine.group(n)
        dead = ~engine.unit_mask(n).to(torch.bool)
        if not dead.any():
            continue
        for c, span in g.consumers:
            layer, mean = modules[c], means[c].to(dead.device)
            if layer.bias is None:
                layer.bias = nn.Parameter(torch.zeros(layer.weight.shape[0], device=layer.weight.device))
            if isinstance(layer, nn.Linear):
                cols = dead[unit_index(g.units, span).to(dead.device)]
                layer.bias += layer.weight[:, cols] @ mean[cols]
            else:
                layer.bias += (layer.weight[:, dead].sum((2, 3)) * mean[dead].mean((1, 2))).sum(1)


# ================================================================================================ DynSNN
@dataclass
class DynSNNConvertResult:
    kappa: float
    compression: float  # 1 - density of the effective weights
    units_removed: float  # fraction of units (FC neurons / conv channels) masked
    neurons_removed: float  # fraction of neurons (conv channels weighted by their positions) masked
    alive: dict[str, int]
    units: dict[str, int]
    silent: dict[str, int]  # units that never fired on the calibration set (rate 0)
    lambdas_before: list[float]
    lambdas_after: list[float]
    rates: dict[str, list[float]] = field(repr=False, default_factory=dict)
    engine: Any = field(repr=False, default=None)

    def summary(self) -> dict:
        d = asdict(self)
        d.pop("engine")
        d.pop("rates")
        return d


def _fading_masks(rates: dict[str, torch.Tensor], kappa: float, min_alive: float) -> dict[str, torch.Tensor]:
    masks = {}
    for n, a in rates.items():
        mask = a >= kappa * a.mean()
        floor = max(1, math.ceil(min_alive * a.numel()))
        if int(mask.sum()) < floor:
            mask = torch.zeros_like(mask)
            mask[torch.topk(a, floor).indices] = True
        masks[n] = mask
    return masks


@torch.no_grad()
def dynsnn_convert(snn: ConvertedSNN, calib_loader, target_compression: float | None = None, kappa: float = 0.2,
                   T: int | None = None, max_batches: int | None = None, rebalance: bool = True,
                   min_alive: float = 0.02, exclude: Iterable[str] = (), calibration: dict | None = None,
                   chunk: int = 32, rates: Mapping[str, torch.Tensor] | None = None,
                   compensate: bool = False) -> DynSNNConvertResult:
    """DynSNN on a converted SNN, post-training (no retraining). In place: adds unit masks to ``snn``.

    1. per-unit firing rates of every IF layer on ``calib_loader`` (``T`` steps, ``max_batches`` batches);
    2. fading units ``rate < κ · mean(rate of the layer)`` are masked with the mask engine's unit masks; with
       ``target_compression`` κ is the smallest value reaching it (bisection), else ``kappa`` is used;
    3. with ``compensate`` [R] the mean input each dead unit sent to its consumers (measured in step 1) is added
       to their biases (mean replacement: the average drive survives, only its fluctuation is lost);
    4. with ``rebalance`` the thresholds are re-calibrated on the masked network (same method as the conversion
       unless ``calibration`` = ``{"method": ..., "percentile": ...}``) and :func:`set_lambdas` applies them.

    ``exclude``: IF layers left whole; ``rates``: per-unit rates from :func:`firing_rates` of this (unmasked) SNN,
    to skip step 1 (e.g. when sweeping κ). Returns the compression (1 − density of the effective weights, as
    ``measure`` reports it) and the fraction of units and neurons removed."""
    from .sparsity.masks import MaskEngine

    if target_compression is not None and not 0 <= target_compression < 1:
        raise ValueError(f"target_compression must be in [0, 1) or None, got {target_compression}")
    if not kappa > 0:
        raise ValueError(f"kappa must be > 0, got {kappa}")
    engine = MaskEngine(snn)
    consumers = sorted({c for g in engine.groups for c, _ in g.consumers}) if compensate else []
    means: dict[str, torch.Tensor] = {}
    if rates is None or compensate:
        neuron_rates, means = _activity(snn, calib_loader, T, max_batches, chunk, consumers)
        if rates is None:
            rates = {n: r.reshape(r.shape[0], -1).mean(1) for n, r in neuron_rates.items()}
    rates = dict(rates)
    excluded = set(exclude)
    unknown = excluded - set(snn.if_neurons())
    if unknown:
        raise ValueError(f"exclude names no IF layer: {sorted(unknown)}; IF layers are {snn.if_neurons()}")
    names = [g.neuron for g in engine.unit_groups() if g.neuron not in excluded]
    engine.enable_units(names)
    rates = {n: rates[n].to(engine.unit_mask(n).device) for n in names}

    def apply(k: float) -> float:
        for n, m in _fading_masks(rates, k, min_alive).items():
            engine.set_unit_mask(n, m)
        return 1 - engine.density()

    if target_compression is None:
        comp = apply(kappa)
    else:
        lo, hi = 0.0, max(kappa, 1e-3)
        while apply(hi) < target_compression and hi < 1e6:
            lo, hi = hi, hi * 2
        if apply(hi) < target_compression:
            raise ValueError(f"target_compression {target_compression} cannot be reached (min_alive={min_alive}, "
                             f"excluded {sorted(excluded)}): at most {apply(hi):.3f}")
        for _ in range(50):
            mid = (lo + hi) / 2
            if apply(mid) >= target_compression:
                hi = mid
            else:
                lo = mid
            if hi - lo < 1e-6 * hi:
                break
        kappa = hi
        comp = apply(kappa)
    if compensate:
        _compensate(snn, engine, names, means)
    before = [float(v) for v in snn.lambdas]
    if rebalance:
        cal = {**snn.calibration, **(calibration or {})}
        lam = calibrate(snn_to_ann(snn), calib_loader, cal.get("method", "percentile"), cal.get("percentile", 99.9),
                        max_batches=max_batches)
        set_lambdas(snn, list(lam.values()))
    # units vs neurons (conv channels weigh by their positions)
    groups = {g.neuron: g for g in engine.groups}
    alive = {n: int(engine.unit_mask(n).sum()) for n in names}
    units = {n: engine.unit_mask(n).numel() for n in names}
    all_units = sum(groups[n].units for n in snn.if_neurons())
    per_unit = {n: math.prod(groups[n].unit_shape[1:]) for n in snn.if_neurons()}
    all_neurons = sum(groups[n].units * per_unit[n] for n in snn.if_neurons())
    dead_units = sum(units[n] - alive[n] for n in names)
    dead_neurons = sum((units[n] - alive[n]) * per_unit[n] for n in names)
    return DynSNNConvertResult(kappa=float(kappa), compression=float(comp), units_removed=dead_units / all_units,
                               neurons_removed=dead_neurons / all_neurons, alive=alive, units=units,
                               silent={n: int((rates[n] == 0).sum()) for n in names},
                               lambdas_before=before, lambdas_after=[float(v) for v in snn.lambdas],
                               rates={n: r.tolist() for n, r in rates.items()}, engine=engine)


# ========================================================================================= the run (CLI)
@dataclass
class ConvModelConfig:
    name: str = "lenet5"
    options: dict = field(default_factory=dict)  # model factory options (e.g. bn: true)


@dataclass
class ANNTrainConfig:
    epochs: int = 10
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Literal["cosine", "none"] = "cosine"
    activity_l1: float = 0.0  # firing-rate (activation) L1 penalty on the hidden ReLUs, see train_ann
    unit_hoyer: float = 0.0  # unit-level Hoyer sparsity penalty on the hidden ReLUs (fading units), see train_ann
    penalty_layers: list[int] | None = None  # ReLU ordinals the penalties apply to (None: all)
    max_steps_per_epoch: int | None = None
    checkpoint: str | None = None  # load this ANN state dict instead of training (else RUN_DIR/ann.pt is written)
    reuse: bool = True  # load RUN_DIR/ann.pt when it exists and was trained with the same settings

    def validate(self, key: str) -> None:
        from .config import _check

        _check(self.epochs >= 0, f"{key}.epochs", f"must be >= 0, got {self.epochs}")
        _check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(self.activity_l1 >= 0, f"{key}.activity_l1", "must be >= 0")
        _check(self.unit_hoyer >= 0, f"{key}.unit_hoyer", "must be >= 0")


@dataclass
class ConversionConfig:
    method: Literal["max", "percentile"] = "percentile"
    percentile: float = 99.9
    calib_samples: int = 5000  # first N training samples (seeded order) calibrate λ and DynSNN's rates
    v_init: float = 0.5
    Ts: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    chunk: int = 32  # time steps per forward during evaluation (memory)

    def validate(self, key: str) -> None:
        from .config import _check

        _check(0 < self.percentile <= 100, f"{key}.percentile", f"must be in (0, 100], got {self.percentile}")
        _check(self.calib_samples >= 1, f"{key}.calib_samples", "must be >= 1")
        _check(0 <= self.v_init < 1, f"{key}.v_init", f"must be in [0, 1), got {self.v_init}")
        _check(bool(self.Ts) and all(t >= 1 for t in self.Ts), f"{key}.Ts", "must be a non-empty list of T >= 1")
        _check(self.chunk >= 1, f"{key}.chunk", "must be >= 1")


@dataclass
class DynSNNConvertConfig:
    enabled: bool = True
    T: int = 128  # time steps of the rate estimate and of the reported comparison
    target_compression: float | None = 0.6
    kappa: float = 0.2  # used as is without target_compression (else the bisection's start)
    calib_samples: int = 2000
    rebalance: bool = True
    compensate: bool = False  # fold the dead units' mean input into their consumers' biases [R]
    min_alive: float = 0.02
    exclude: list[str] = field(default_factory=list)  # IF layers (e.g. body.2) kept whole

    def validate(self, key: str) -> None:
        from .config import _check

        _check(self.T >= 1, f"{key}.T", "must be >= 1")
        _check(self.target_compression is None or 0 <= self.target_compression < 1, f"{key}.target_compression",
               "must be in [0, 1) or null")
        _check(self.kappa > 0, f"{key}.kappa", "must be > 0")
        _check(self.calib_samples >= 1, f"{key}.calib_samples", "must be >= 1")
        _check(0 <= self.min_alive <= 1, f"{key}.min_alive", "must be in [0, 1]")


@dataclass
class ConvertRunConfig:
    name: str = "convert"
    seed: int = 0
    out_dir: str = "runs"
    model: ConvModelConfig = field(default_factory=ConvModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ann: ANNTrainConfig = field(default_factory=ANNTrainConfig)
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    dynsnn: DynSNNConvertConfig = field(default_factory=DynSNNConvertConfig)
    measure_batches: int | None = None  # measure() on the first N test batches (None: all)

    def validate(self, key: str) -> None:
        from .config import ConfigError, _check
        from .runs import check_name

        try:
            check_name(self.name)
        except ValueError as e:
            raise ConfigError(f"config key 'name' {e}") from None
        _check(bool(self.out_dir), "out_dir", "must not be empty")
        _check(self.measure_batches is None or self.measure_batches >= 1, "measure_batches", "must be >= 1 or null")

    @property
    def run_dir(self) -> Path:
        return Path(self.out_dir) / self.name


def load_convert_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ConvertRunConfig:
    """Read a ``convert`` recipe (strict keys and types, like :func:`spikeprune.config.load_config`)."""
    from .config import load_config

    return load_config(path, overrides, schema=ConvertRunConfig)


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def plot_accuracy_vs_T(path: str | os.PathLike, Ts: Sequence[int], curves: dict[str, Sequence[float]],
                       ann_acc: float | None = None, title: str = "") -> None:
    """Accuracy (%) against T (log2 axis) for each curve, with the ANN as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, acc in curves.items():
        ax.plot(Ts, [100 * a for a in acc], marker="o", label=label)
    if ann_acc is not None:
        ax.axhline(100 * ann_acc, color="k", ls="--", lw=1, label=f"ANN {100 * ann_acc:.2f}%")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(Ts))
    ax.set_xticklabels([str(t) for t in Ts])
    ax.set_xlabel("time steps T")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _write_atomic(Path(path), lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def _ann_fingerprint(cfg: ConvertRunConfig) -> dict:
    d = cfg.data
    return {"model": asdict(cfg.model), "seed": cfg.seed, "data": {"name": d.name, "subset": d.subset,
            "batch_size": d.batch_size, "val_split": d.val_split, "options": d.options},
            "train": {k: v for k, v in asdict(cfg.ann).items() if k not in ("checkpoint", "reuse")}}


def _subset_loader(loader, n: int, batch_size: int):
    """The first ``n`` samples of a training loader's dataset, unshuffled, as a new loader."""
    from .data import FastLoader

    ds = loader.dataset
    if hasattr(ds, "subset"):
        return FastLoader(ds.subset(torch.arange(min(n, len(ds)))), batch_size)
    from torch.utils.data import DataLoader, Subset

    return DataLoader(Subset(ds, list(range(min(n, len(ds))))), batch_size=batch_size)


def run_convert(cfg: ConvertRunConfig, log: Callable[[str], None] | None = None, overwrite: bool = False) -> dict:
    """The ``spikeprune convert`` pipeline: train (or load) the ANN, convert, accuracy vs T (Markdown, CSV and PNG
    in the run directory), DynSNN on the converted SNN, and ``results.json``. A directory holding a finished
    conversion (``results.json``) is refused unless ``overwrite`` (its ANN is still reused when ``ann.reuse`` and
    its settings match)."""
    from .checkpoint import atomic_write
    from .config import to_dict
    from .data import build_loaders
    from .measure import measure
    from .runs import RunError, check_writable
    from .train import seed_everything

    log = log or (lambda s: print(s, flush=True))
    rd = cfg.run_dir
    if (rd / "results.json").exists() and not overwrite:
        raise RunError(f"{rd} already holds a finished conversion (results.json); use --overwrite to run it again "
                       "(a matching ANN is reused), or another name")
    check_writable(rd)
    atomic_write(rd / "config.json", json.dumps(to_dict(cfg), indent=2, default=str).encode())
    seed_everything(cfg.seed)
    d = cfg.data
    train, _, test, info = build_loaders(d.name, root=d.root, batch_size=d.batch_size,
                                         eval_batch_size=d.eval_batch_size, val_split=d.val_split, seed=cfg.seed,
                                         download=d.download, subset=d.subset, **d.options)
    if info.kind != "static":
        raise ValueError(f"convert needs a static image dataset, {d.name!r} is {info.kind}")
    ann = make_ann(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_shape[0],
                   image_size=info.in_shape[-1], **cfg.model.options)
    t0 = time.time()
    ann_time = None
    ann_path, fp_path = rd / "ann.pt", rd / "ann.json"
    fp = _ann_fingerprint(cfg)
    if cfg.ann.checkpoint:
        ann.load_state_dict(torch.load(cfg.ann.checkpoint, map_location="cpu", weights_only=True))
        log(f"loaded ANN from {cfg.ann.checkpoint}")
    elif cfg.ann.reuse and ann_path.is_file() and fp_path.is_file() and \
            json.loads(fp_path.read_text()).get("settings") == fp:
        ann.load_state_dict(torch.load(ann_path, map_location="cpu", weights_only=True))
        ann_time = json.loads(fp_path.read_text()).get("train_seconds")
        log(f"reusing the ANN trained before ({ann_path}, trained in {ann_time or 0:.0f} s)")
    else:
        a = cfg.ann
        log(f"training the ANN twin of {cfg.model.name} for {a.epochs} epochs ({a.optimizer}, lr {a.lr})")
        train_ann(ann, train, None, a.epochs, a.lr, a.optimizer, a.weight_decay, a.momentum, a.scheduler,
                  a.max_steps_per_epoch, log, a.activity_l1, a.unit_hoyer, a.penalty_layers)
        ann_time = time.time() - t0
        _write_atomic(ann_path, lambda p: torch.save(ann.state_dict(), p))
        fp_path.write_text(json.dumps({"settings": fp, "train_seconds": ann_time}, indent=2))
    ann.eval()
    ann_acc = evaluate_ann(ann, test)
    log(f"ANN test accuracy {100 * ann_acc:.2f}%")

    c = cfg.conversion
    calib = _subset_loader(train, c.calib_samples, d.eval_batch_size)
    folded = fold_bn(ann)
    lam = calibrate(folded, calib, c.method, c.percentile)
    cal = {"method": c.method, "percentile": c.percentile, "calib_samples": c.calib_samples}
    snn = to_snn(folded, lam, T=cfg.dynsnn.T, v_init=c.v_init, calibration=cal)
    log(f"converted: λ = {[round(v, 4) for v in lam.values()]}; evaluating T = {sorted(c.Ts)}")
    t1 = time.time()
    snn_acc = accuracy_vs_T(snn, test, c.Ts, chunk=c.chunk)
    log("converted SNN: " + ", ".join(f"T={t}: {100 * a:.2f}%" for t, a in snn_acc.items())
        + f" ({time.time() - t1:.0f} s)")
    Ts = sorted(snn_acc)
    results: dict[str, Any] = {"name": cfg.name, "model": cfg.model.name, "dataset": d.name,
                               "ann_accuracy": ann_acc, "ann_train_seconds": ann_time, "lambdas": list(lam.values()),
                               "calibration": cal, "v_init": c.v_init,
                               "snn_accuracy": {str(t): a for t, a in snn_acc.items()}}
    curves = {"converted SNN": [snn_acc[t] for t in Ts]}
    rows = [{"T": t, "ann_acc": ann_acc, "snn_acc": snn_acc[t], "snn_minus_ann": snn_acc[t] - ann_acc} for t in Ts]

    dyn = cfg.dynsnn
    if dyn.enabled:
        dense_m = measure(snn, test, max_batches=cfg.measure_batches)
        dcalib = _subset_loader(train, dyn.calib_samples, d.eval_batch_size)
        t2 = time.time()
        res = dynsnn_convert(snn, dcalib, dyn.target_compression, dyn.kappa, T=dyn.T, rebalance=dyn.rebalance,
                             min_alive=dyn.min_alive, exclude=dyn.exclude, chunk=c.chunk, compensate=dyn.compensate)
        log(f"DynSNN: κ={res.kappa:.4g}, compression {100 * res.compression:.2f}%, units removed "
            f"{100 * res.units_removed:.1f}%, alive {res.alive} ({time.time() - t2:.0f} s)")
        pr_acc = accuracy_vs_T(snn, test, c.Ts, chunk=c.chunk)
        log("DynSNN SNN: " + ", ".join(f"T={t}: {100 * a:.2f}%" for t, a in pr_acc.items()))
        pr_m = measure(snn, test, max_batches=cfg.measure_batches)
        curves[f"DynSNN ({100 * res.compression:.1f}% compression)"] = [pr_acc[t] for t in Ts]
        for r in rows:
            r["dynsnn_acc"] = pr_acc[r["T"]]
            r["dynsnn_minus_snn"] = pr_acc[r["T"]] - snn_acc[r["T"]]
        results["dynsnn"] = {**res.summary(), "T": dyn.T, "target_compression": dyn.target_compression,
                             "rebalance": dyn.rebalance, "compensate": dyn.compensate,
                             "exclude": list(dyn.exclude), "calib_samples": dyn.calib_samples,
                             "accuracy": {str(t): a for t, a in pr_acc.items()},
                             "measure_compression": 1 - pr_m.connectivity,
                             "measure_dense": dense_m.summary(), "measure": pr_m.summary()}
        (rd / "dynsnn_measure.md").write_text(f"## converted SNN, T={dyn.T}\n\n{dense_m.table()}\n\n"
                                              f"## DynSNN on the converted SNN, T={dyn.T}\n\n{pr_m.table()}\n")
        torch.save(snn.state_dict(), rd / "snn_dynsnn.pt")
    results["rows"] = rows
    title = f"{cfg.model.name} on {d.name}: ANN→SNN ({c.method}" + \
        (f" {c.percentile}" if c.method == "percentile" else "") + ")"
    plot_accuracy_vs_T(rd / "accuracy_vs_T.png", Ts, curves, ann_acc, title)
    write_table(rd / "accuracy_vs_T", rows)
    atomic_write(rd / "results.json", json.dumps(results, indent=2, default=float).encode())
    log(f"run directory: {rd}")
    return results


def write_table(prefix: str | os.PathLike, rows: list[dict], header: Sequence[str] = ()) -> str:
    """Write ``rows`` as ``PREFIX.md`` (a Markdown table after ``header`` lines) and ``PREFIX.csv`` (``header``
    as ``#`` comment lines); returns the Markdown table."""
    prefix = str(prefix)
    keys = list(rows[0])
    pct = {k for k in keys if k != "T"}
    lines = ["| " + " | ".join(k if k == "T" else k + " (%)" for k in keys) + " |",
             "|" + "|".join("---:" for _ in keys) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) if k not in pct else
                                        (f"{100 * r[k]:+.2f}" if "minus" in k else f"{100 * r[k]:.2f}")
                                        for k in keys) + " |")
    table = "\n".join(lines)
    Path(prefix + ".md").write_text(("\n".join(header) + "\n\n" if header else "") + table + "\n")
    with open(prefix + ".csv", "w", newline="") as f:
        for h in header:
            f.write(f"# {h.lstrip('# ')}\n")
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows([{k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    return table


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin wrapper, the CLI calls run_convert
    import argparse

    p = argparse.ArgumentParser(prog="spikeprune convert")
    p.add_argument("--config", "-c")
    p.add_argument("--set", "-s", action="append", default=[])
    a = p.parse_args(argv)
    run_convert(load_convert_config(a.config, a.set))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
