"""DynSNN on a converted network, post-training: mask the units that fade on a calibration set, re-balance."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from ..sparsity.methods.dynsnn import smallest_kappa
from .ann import ann_optimizer
from .snn import ConvertedSNN, _activity, _compensate, calibrate, set_lambdas, snn_to_ann


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
    from ..sparsity.masks import MaskEngine

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
        kappa, reached = smallest_kappa(apply, target_compression, max(kappa, 1e-3), 50, rtol=1e-6)
        if not reached:
            raise ValueError(f"target_compression {target_compression} cannot be reached (min_alive={min_alive}, "
                             f"excluded {sorted(excluded)}): at most {apply(2.0 ** 20):.3f}")
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


# ============================================================================ DynSNN while the ANN trains
# The paper masks by a threshold "determined during training" (docs/methods.md §3.1). Here [R]: the ANN (trained
# densely first, no penalty) is fine-tuned for a few epochs while DynSNN runs on its hidden ReLUs: an EMA of every
# unit's mean activation (channel mean in conv layers; the ANN-side twin of the firing rate, which after conversion
# is ``a/λ``) is kept before the unit gate, the rule ``a_i < κ · mean_ℓ(a)`` masks the fading units, κ is bisected
# at each update to meet a target compression that rises along a cubic ramp, masks are re-evaluated (units may
# revive) until the ramp ends and then frozen, and the rest of the fine-tune lets the network adapt to them. The
# masked ANN is then folded (dead rows, biases and columns zeroed) and converted as usual.
@dataclass
class AnnUnit:
    """One hidden ReLU of a sequential ANN and the weights tied to its units."""

    relu: int  # module index of the ReLU in the ``nn.Sequential``
    units: int
    producer: int  # module index of the Conv/Linear feeding it
    norm: int | None  # module index of a BatchNorm in between
    consumer: int | None  # module index of the Conv/Linear reading it
    span: int  # consumer columns per unit (positions after a flatten; 1 for conv consumers)


def ann_units(ann: torch.nn.Sequential) -> list[AnnUnit]:
    """The hidden ReLUs of ``ann`` in order, each with its producer, norm and consumer (through pools, dropout
    and a flatten; the span is read from the consumer's fan-in)."""
    from .ann import _BN, _SYN

    mods = list(ann.children())
    out = []
    for i, m in enumerate(mods):
        if not isinstance(m, torch.nn.ReLU):
            continue
        j = i - 1
        norm = None
        while j >= 0 and not isinstance(mods[j], _SYN):
            if isinstance(mods[j], _BN):
                norm = j
            j -= 1
        if j < 0:
            raise ValueError(f"ReLU at position {i} has no Conv/Linear before it")
        units = mods[j].weight.shape[0]
        k = i + 1
        while k < len(mods) and not isinstance(mods[k], _SYN):
            k += 1
        cons, span = (None, 1) if k >= len(mods) else (k, 1)
        if cons is not None:
            fan = mods[k].weight.shape[1]
            if fan % units:
                raise ValueError(f"ReLU at position {i}: {units} units do not divide the {fan} inputs of layer {k}")
            span = fan // units
        out.append(AnnUnit(i, units, j, norm, cons, span))
    return out


def _alive_weights(ann: torch.nn.Sequential, groups: list[AnnUnit], masks: Mapping[int, torch.Tensor]) -> tuple:
    """(live, total) synaptic weights of ``ann`` when the units of ``masks`` (keyed by ReLU position) are dead."""
    from .ann import _SYN

    mods = list(ann.children())
    rows: dict[int, float] = {}
    cols: dict[int, float] = {}
    for g in groups:
        m = masks.get(g.relu)
        if m is None:
            continue
        rows[g.producer] = float(m.sum())
        if g.consumer is not None:
            cols[g.consumer] = float(m.sum()) * g.span
    live = total = 0.0
    for i, m in enumerate(mods):
        if isinstance(m, _SYN):
            w = m.weight
            per = w[0, 0].numel()
            total += w.numel()
            live += rows.get(i, w.shape[0]) * cols.get(i, w.shape[1]) * per
    return live, total


@dataclass
class FadingResult:
    kappa: float
    compression: float  # 1 - live / total synaptic weights of the ANN (dead rows and columns)
    masks: dict[int, torch.Tensor] = field(repr=False)  # ReLU position -> alive units
    history: list[dict] = field(repr=False, default_factory=list)

    def alive(self) -> dict[int, int]:
        return {k: int(m.sum()) for k, m in self.masks.items()}


class FadingUnits:
    """DynSNN on the hidden ReLUs of a training ANN: activity EMAs before the gate, the gates, the κ rule."""

    def __init__(self, ann: torch.nn.Sequential, exclude: Iterable[int] = (), beta: float = 0.9,
                 min_alive: float = 0.02):
        self.ann, self.beta, self.min_alive = ann, beta, min_alive
        self.groups = ann_units(ann)
        excluded = set(exclude)
        self.pruned = [g for g in self.groups if g.relu not in excluded]
        dev = next(ann.parameters()).device
        self.ema = {g.relu: torch.zeros(g.units, device=dev) for g in self.pruned}
        self.seen = {g.relu: False for g in self.pruned}
        self.masks = {g.relu: torch.ones(g.units, dtype=torch.bool, device=dev) for g in self.pruned}
        mods = list(ann.children())
        self.handles = [mods[g.relu].register_forward_hook(self._hook(g.relu)) for g in self.pruned]
        self.kappa = 0.0

    def _hook(self, pos: int):
        def hook(mod, inputs, out):
            if mod.training:
                with torch.no_grad():
                    a = out.detach().transpose(0, 1).reshape(out.shape[1], -1).mean(1)
                    if self.seen[pos]:
                        self.ema[pos].mul_(self.beta).add_(a, alpha=1 - self.beta)
                    else:
                        self.ema[pos].copy_(a)
                        self.seen[pos] = True
            m = self.masks[pos]
            if bool(m.all()):
                return out
            return out * m.view(-1, *([1] * (out.dim() - 2))).to(out.dtype)
        return hook

    def compression(self, masks: Mapping[int, torch.Tensor] | None = None) -> float:
        live, total = _alive_weights(self.ann, self.groups, self.masks if masks is None else masks)
        return 1 - live / max(1.0, total)

    @torch.no_grad()
    def update(self, target: float) -> float:
        """Set the masks by the smallest κ whose fading units reach ``target`` compression; returns the compression."""
        rates = {k: v.clone() for k, v in self.ema.items()}
        if target <= 0:
            self.kappa = 0.0
            self.masks = {k: torch.ones_like(m) for k, m in self.masks.items()}
            return 0.0

        def comp(k: float) -> float:
            return self.compression(_fading_masks(rates, k, self.min_alive))

        hi, _ = smallest_kappa(comp, target, 1.0, 40, rtol=1e-5)  # unreachable (min_alive): as far as κ goes
        self.kappa = hi
        self.masks = _fading_masks(rates, hi, self.min_alive)
        return self.compression()

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


@torch.no_grad()
def fold_fading(ann: torch.nn.Sequential, masks: Mapping[int, torch.Tensor]) -> None:
    """Make the masks permanent in ``ann``: a dead unit's fan-in row, bias and BN scale/shift and its fan-out
    columns are zeroed, so it outputs 0 and nothing reads it (the ANN then computes what the gated one did)."""
    mods = list(ann.children())
    for g in ann_units(ann):
        m = masks.get(g.relu)
        if m is None:
            continue
        dead = ~m.to(torch.bool)
        p = mods[g.producer]
        p.weight[dead] = 0
        if p.bias is not None:
            p.bias[dead] = 0
        if g.norm is not None and mods[g.norm].affine:
            mods[g.norm].weight[dead] = 0
            mods[g.norm].bias[dead] = 0
        if g.consumer is not None:
            cols = dead.repeat_interleave(g.span) if g.span > 1 else dead
            mods[g.consumer].weight[:, cols] = 0


def train_ann_fading(ann: torch.nn.Sequential, train_loader, epochs: int, target_compression: float,
                     lr: float = 1e-3, optimizer: str = "adam", ramp: float = 0.3, beta: float = 0.9,
                     update_every: int = 20, min_alive: float = 0.02, exclude: Iterable[int] = (),
                     weight_decay: float = 0.0, momentum: float = 0.9, scheduler: str = "cosine",
                     max_steps_per_epoch: int | None = None, log=print) -> FadingResult:
    """Fine-tune ``ann`` (in place) with DynSNN on its hidden ReLUs (see the comment above): every
    ``update_every`` steps during the first ``ramp`` fraction of the steps the masks are recomputed for the target
    ``target_compression · (1 − (1 − s/S_ramp)³)``; then they are frozen and the fine-tune goes on. ``exclude``: ReLU
    positions (module indices) left whole. The masks are folded into ``ann`` at the end (:func:`fold_fading`)."""
    import torch.nn.functional as F

    if not 0 <= target_compression < 1:
        raise ValueError(f"target_compression must be in [0, 1), got {target_compression}")
    if epochs < 1 or not 0 < ramp <= 1 or update_every < 1 or not 0 <= beta < 1:
        raise ValueError(f"need epochs >= 1, ramp in (0, 1], update_every >= 1, beta in [0, 1), got {epochs=}, "
                         f"{ramp=}, {update_every=}, {beta=}")
    fading = FadingUnits(ann, exclude, beta, min_alive)
    dev = next(ann.parameters()).device
    opt = ann_optimizer(ann, optimizer, lr, weight_decay, momentum)
    steps = len(train_loader) if max_steps_per_epoch is None else min(len(train_loader), max_steps_per_epoch)
    total = max(1, epochs * steps)
    ramp_steps = max(1, math.ceil(ramp * total))
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, total) if scheduler == "cosine" else None
    history: list[dict] = []
    step = 0
    try:
        for ep in range(epochs):
            if hasattr(train_loader, "set_epoch"):
                train_loader.set_epoch(1000 + ep)
            ann.train()
            tot = correct = n = 0
            for b, (x, y) in enumerate(train_loader):
                if b >= steps:
                    break
                x, y = x.to(dev), y.to(dev)
                out = ann(x)
                loss = F.cross_entropy(out, y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if sched is not None:
                    sched.step()
                step += 1
                if step <= ramp_steps and (step % update_every == 0 or step == ramp_steps):
                    target = target_compression * (1 - (1 - step / ramp_steps) ** 3)
                    comp = fading.update(target)
                    history.append({"step": step, "target": target, "compression": comp, "kappa": fading.kappa})
                tot += loss.item() * len(y)
                correct += int((out.argmax(-1) == y).sum())
                n += len(y)
            if log is not None:
                log(f"fading fine-tune epoch {ep + 1}/{epochs}: loss {tot / max(1, n):.4f}, train acc "
                    f"{100 * correct / max(1, n):.2f}%, compression {100 * fading.compression():.2f}%, "
                    f"κ {fading.kappa:.4g}, alive {[int(m.sum()) for m in fading.masks.values()]}")
    finally:
        fading.remove()
    fold_fading(ann, fading.masks)
    ann.eval()
    return FadingResult(kappa=fading.kappa, compression=fading.compression(), masks=dict(fading.masks),
                        history=history)


@torch.no_grad()
def mask_converted(snn: ConvertedSNN, masks: Sequence[torch.Tensor | None]):
    """Give the IF layers of ``snn`` unit masks (``masks[k]`` for the k-th IF layer, None: left whole) through the
    mask engine, so ``measure`` and ``compact`` see the dead units; returns ``(engine, compression)``."""
    from ..sparsity.masks import MaskEngine

    engine = MaskEngine(snn)
    names = snn.if_neurons()
    if len(masks) != len(names):
        raise ValueError(f"need one mask (or None) per IF layer ({len(names)}), got {len(masks)}")
    chosen = [(n, m) for n, m in zip(names, masks) if m is not None]
    engine.enable_units([n for n, _ in chosen])
    for n, m in chosen:
        engine.set_unit_mask(n, m.to(engine.unit_mask(n).device))
    return engine, 1 - engine.density()
