"""DynSNN on a converted network, post-training: mask the units that fade on a calibration set, re-balance."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

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
