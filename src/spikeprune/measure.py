"""Honest measurement of a (sparse) SNN, computed from the tensors themselves.

* **connectivity**: non-zero effective weights / weights, per synaptic layer and in total. The effective weight
  is the weight with its connection mask and any dead units folded in (a masked neuron loses its fan-in row and
  fan-out column).
* **effective SOPs**: every input spike times its non-zero outgoing synapses (to alive units), summed over T and
  positions, averaged per sample. A layer whose input is not binary (the direct-encoded first layer) counts
  **MACs** instead, over its non-zero weights. **Dense SOPs** use all weights, as most tools do.
* **pooled spikes** (``pooled_spikes``): a layer fed by *average-pooled spikes* (an average pool whose input was
  binary, possibly flattened) does not see binary input. ``"mac"`` (default, NeuroBench's rule) counts it as MACs
  over its non-zero weights, like any analog input; ``"sop"`` counts it as synaptic events with the UPR formula
  ``Σ x · fan-out`` (docs/methods.md §2.2: ``conv2d(input, 1[w ≠ 0])`` summed, so a pooled value of 1/4 is a
  quarter event), as the UPR-style counts of the papers do. Both figures are kept: :attr:`Measurement.other_rule`
  holds the totals under the rule not chosen whenever the two differ, and :meth:`Measurement.table` names the rule
  in its header.
* **energy**: ``pj_per_ac * SOPs + pj_per_mac * MACs`` (45 nm figures 0.9 / 4.6 pJ by default).
* **firing rate**: emitted spikes / (T × neurons × samples), per spiking layer and overall (every neuron,
  i.e. every channel at every position, weighs the same; not an average of per-layer rates).

The per-layer fan-out of every input position is computed once as the input-gradient of a convolution with
all-ones output gradient and the binary weight map, so SOPs cost one multiply-add per input element.

**Input layout.** A batch is ``[B, ...]`` (the model adds time itself: spikeprune's zoo models and ``Repeat``,
:class:`~spikeprune.adapters.snntorch.SnnTorchSequence` with ``T``) or ``[T, B, ...]`` (SpikingJelly multi-step
nets, ``SnnTorchSequence`` without ``T``). :func:`input_layout` tells which from the model (an ``input_layout``
attribute of ``"B"`` or ``"TB"`` wins), else from the labels; ``measure(..., layout="TB")`` says it outright. A
layout that cannot be told, or labels that contradict it, stop with one line: samples are never miscounted.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import framework_of, neuron_spikes, reset_states, unit_axis, uses_framework
from .graph import SYNAPTIC, analyze
from .neurons import is_neuron


@dataclass
class LayerStats:
    name: str
    kind: str  # "linear" | "conv"
    weights: int
    nonzero: int
    input: str = ""  # "spikes" | "pooled spikes" | "analog" | "" (did not run)
    sops: float = 0.0
    dense_sops: float = 0.0
    macs: float = 0.0  # effective MACs (analog input, non-zero weights)
    dense_macs: float = 0.0  # conventional dense MACs (Cout·Hout·Wout·Cin·k², all frames)
    in_rate: float = 0.0
    # a layer fed by average-pooled spikes, under both rules (per sample): SOPs by Σ x·fan-out, or MACs
    pooled_sops: float = 0.0
    pooled_dense_sops: float = 0.0
    pooled_macs: float = 0.0

    @property
    def connectivity(self) -> float:
        return self.nonzero / max(1, self.weights)


@dataclass
class NeuronStats:
    name: str
    units: int
    alive: int
    firing_rate: float = 0.0
    unit_rates: list[float] = field(default_factory=list)


@dataclass
class Measurement:
    """Totals are per sample; ``layers`` and ``neurons`` hold the per-layer break-down."""

    accuracy: float | None
    samples: int
    weights: int
    nonzero: int
    params: int
    sops: float
    dense_sops: float
    macs: float
    dense_macs: float
    energy_uj: float
    firing_rate: float
    neurons: int
    neurons_alive: int
    layers: list[LayerStats]
    spiking: list[NeuronStats]
    pj_per_ac: float = 0.9
    pj_per_mac: float = 4.6
    pooled_spikes: str = "mac"  # how average-pooled spikes into a layer were counted ("mac" | "sop")
    # the totals under the other rule ({"pooled_spikes", "sops", "dense_sops", "macs", "energy_uj"}) when they differ
    other_rule: dict | None = None

    @property
    def connectivity(self) -> float:
        return self.nonzero / max(1, self.weights)

    def summary(self) -> dict:
        """Flat dict of the headline numbers (``other_rule`` only when the pooled-spike rules differ)."""
        d = {"accuracy": self.accuracy, "connectivity": self.connectivity, "params": self.params,
             "weights_nonzero": self.nonzero, "sops": self.sops, "dense_sops": self.dense_sops,
             "macs": self.macs, "energy_uj": self.energy_uj, "firing_rate": self.firing_rate,
             "neurons_alive": self.neurons_alive, "neurons": self.neurons, "pooled_spikes": self.pooled_spikes}
        if self.other_rule is not None:
            d["other_rule"] = dict(self.other_rule)
        return d

    def to_dict(self) -> dict:
        d = self.summary()
        d["layers"] = [dict(asdict(l), connectivity=l.connectivity) for l in self.layers]
        d["spiking"] = [asdict(n) for n in self.spiking]
        d["pj_per_ac"], d["pj_per_mac"], d["samples"] = self.pj_per_ac, self.pj_per_mac, self.samples
        return d

    def rule_line(self) -> str:
        """One line naming how pooled spikes were counted, with the other rule's totals where they differ."""
        line = f"measure: pooled_spikes={self.pooled_spikes} ({POOLED_RULES[self.pooled_spikes]})"
        o = self.other_rule
        if o is not None:
            line += (f"; with pooled_spikes={o['pooled_spikes']}: eff. SOPs {o['sops']:,.0f}, dense SOPs "
                     f"{o['dense_sops']:,.0f}, MACs {o['macs']:,.0f}, energy {o['energy_uj']:.4g} µJ")
        return line

    def table(self) -> str:
        """The pooled-spike rule (and the other rule's totals where they differ), then a per-layer Markdown
        table followed by the totals."""
        rows = [self.rule_line(), "",
                "| layer | input | conn. % | non-zero | eff. SOPs | dense SOPs | MACs |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for l in self.layers:
            rows.append(f"| {l.name} | {l.input or '-'} | {100 * l.connectivity:.2f} | {l.nonzero:,} | "
                        f"{l.sops:,.0f} | {l.dense_sops:,.0f} | {l.macs:,.0f} |")
        rows.append(f"| **total** |  | {100 * self.connectivity:.2f} | {self.nonzero:,} | {self.sops:,.0f} | "
                    f"{self.dense_sops:,.0f} | {self.macs:,.0f} |")
        rows += ["", "| spiking layer | alive / units | firing rate |", "|---|---:|---:|"]
        rows += [f"| {n.name} | {n.alive} / {n.units} | {n.firing_rate:.4f} |" for n in self.spiking]
        return "\n".join(rows)


@torch.no_grad()
def effective_weights(model: nn.Module, example_input: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Weights of every synaptic layer with ``weight_mask`` buffers and dead units (``unit_mask``) folded in."""
    from .sparsity.masks import fold_units

    modules = dict(model.named_modules())
    out = {}
    for n, m in modules.items():
        if isinstance(m, SYNAPTIC):
            w = m.weight.detach().clone()
            mask = getattr(m, "weight_mask", None)
            out[n] = w * mask if mask is not None else w
    if any(getattr(m, "unit_mask", None) is not None for m in modules.values() if is_neuron(m)):
        if example_input is None:
            example_input = model.example_input(2)
        fold_units(out, analyze(model, example_input), modules)
    return out


def _fanout(m: nn.Module, w_bin: torch.Tensor, in_shape: tuple[int, ...]) -> torch.Tensor:
    """Number of (non-zero) outgoing synapses of every input element, shaped like one input frame."""
    if isinstance(m, nn.Linear):
        return w_bin.sum(0)
    x = torch.zeros((1, *in_shape), device=w_bin.device)
    out_shape = F.conv2d(x, w_bin, None, m.stride, m.padding, m.dilation, m.groups).shape
    return torch.nn.grad.conv2d_input((1, *in_shape), w_bin, torch.ones(out_shape, device=w_bin.device),
                                      m.stride, m.padding, m.dilation, m.groups)[0]


LAYOUTS = ("B", "TB")
POOLED_RULES = {"mac": "average-pooled spikes into a layer count as MACs, NeuroBench's rule",
                "sop": "average-pooled spikes into a layer count as synaptic events, sum of x * fan-out (UPR)"}
_AVG_POOLS = (nn.AvgPool1d, nn.AvgPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d)
_RESHAPES = (nn.Flatten, nn.Dropout, nn.Identity)  # keep pooled values (a flatten of channels-last data copies them)


def rule_note(rows: list[dict], label: str = "name") -> str:
    """The line a results table carries: the pooled-spike rule its rows were measured with and, for every row whose
    figures the other rule would change (``other_rule`` in its summary), those figures, so both can be compared.
    Rows without ``pooled_spikes`` were measured before the option existed, under ``mac``."""
    rules = sorted({r.get("pooled_spikes") or "mac" for r in rows}) or ["mac"]
    line = "measure: " + "; ".join(f"pooled_spikes={k} ({POOLED_RULES[k]})" for k in rules)
    diff = [r for r in rows if r.get("other_rule")]
    if not diff:
        return line + "; no layer here takes average-pooled spikes, so the other rule gives the same figures"
    parts = [f"{r.get(label) or '?'} (pooled_spikes={r['other_rule']['pooled_spikes']}): eff. SOPs "
             f"{r['other_rule']['sops']:,.0f}, dense SOPs {r['other_rule']['dense_sops']:,.0f}, energy "
             f"{r['other_rule']['energy_uj']:.4g} µJ" for r in diff]
    return line + ". Under the other rule: " + "; ".join(parts)


def _reshape_module(m: nn.Module) -> bool:
    return isinstance(m, _RESHAPES) or type(m).__name__ in ("Flatten", "Dropout")


def _storage(x: torch.Tensor) -> int:
    return x.untyped_storage().data_ptr()
_SNNTORCH_WRAP = ("wrap it: spikeprune.adapters.snntorch.SnnTorchSequence(net, T=...) for [B, ...] batches or "
                  "SnnTorchSequence(net) for [T, B, ...] batches")


def input_layout(model: nn.Module, layout: str | None = None) -> str | None:
    """``"B"`` (batches ``[B, ...]``, the model adds time) or ``"TB"`` (``[T, B, ...]``) as far as ``model`` tells,
    ``None`` where it does not. ``layout`` (or a ``model.input_layout`` attribute) is taken as given. A plain
    snnTorch net (one time step per call) raises: it must be wrapped first."""
    layout = layout if layout is not None else getattr(model, "input_layout", None)
    if layout is not None:
        if layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {list(LAYOUTS)} ([B, ...] or [T, B, ...]), got {layout!r}")
        return layout
    from .adapters.snntorch import SnnTorchSequence
    from .layers import Repeat
    from .models._base import SpikingModel

    if isinstance(model, SpikingModel):
        return "B"
    if isinstance(model, SnnTorchSequence):
        return "B" if model.T is not None else "TB"
    mods = list(model.modules())
    if any(isinstance(m, SnnTorchSequence) for m in mods):
        return None
    if isinstance(model, nn.Sequential) and any(framework_of(m) == "snntorch" for m in mods):
        raise ValueError(f"measure: this nn.Sequential runs its snnTorch neurons one time step per call; "
                         f"{_SNNTORCH_WRAP}")
    if any(isinstance(m, Repeat) for m in mods):
        return "B"
    if uses_framework(model, "spikingjelly"):
        modes = {getattr(m, "step_mode", None) for m in mods if framework_of(m) == "spikingjelly"}
        if "s" in modes:
            raise ValueError("measure: the SpikingJelly net has single-step neurons; set "
                             "functional.set_step_mode(net, 'm') and feed [T, B, ...] batches")
        return "TB"
    return None


def _resolve_layout(layout: str | None, x: torch.Tensor, y: torch.Tensor | None) -> str:
    """The layout of batch ``x`` with labels ``y``: checks a known layout against the labels, or infers it."""
    n = None if y is None else (y.shape[0] if y.dim() else 1)
    fits = {"B": x.dim() >= 1 and x.shape[0] == n, "TB": x.dim() >= 2 and x.shape[1] == n}
    if layout is not None:
        if n is not None and not fits[layout]:
            axis = 0 if layout == "B" else 1
            raise ValueError(f"measure: the input is taken as {'[B, ...]' if layout == 'B' else '[T, B, ...]'} but its "
                             f"batch axis {axis} has {x.shape[axis]} entries and the labels {n}: pass "
                             f"layout='{'TB' if layout == 'B' else 'B'}' if the batches are "
                             f"{'[T, B, ...]' if layout == 'B' else '[B, ...]'}")
        return layout
    if fits["B"] != fits["TB"]:
        return "B" if fits["B"] else "TB"
    raise ValueError(f"measure cannot tell whether the input {list(x.shape)} is [B, ...] or [T, B, ...]: pass "
                     "layout='B' or layout='TB' (or set model.input_layout)")


@torch.no_grad()
def measure(model: nn.Module, loader, device: str | torch.device | None = None, max_batches: int | None = None,
            pj_per_ac: float = 0.9, pj_per_mac: float = 4.6, prunable: list[str] | None = None,
            unit_rates: bool = False, layout: str | None = None, pooled_spikes: str = "mac") -> Measurement:
    """Run ``loader`` through ``model`` (eval mode) and measure accuracy, connectivity, SOPs, energy and
    firing rates. ``prunable`` restricts the connectivity total to those layers (default: all Conv/Linear).
    ``layout`` is ``"B"`` for ``[B, ...]`` batches or ``"TB"`` for ``[T, B, ...]`` (default: told by the model, see
    :func:`input_layout`); per-sample numbers divide by the batch axis of that layout. ``pooled_spikes``:
    ``"mac"`` or ``"sop"``, how a layer fed by average-pooled spikes is counted (module docstring)."""
    if pj_per_ac < 0 or pj_per_mac < 0:
        raise ValueError("pj_per_ac and pj_per_mac must be >= 0")
    if pooled_spikes not in POOLED_RULES:
        raise ValueError(f"pooled_spikes must be one of {list(POOLED_RULES)}, got {pooled_spikes!r}")
    device = torch.device(device) if device is not None else next(model.parameters()).device
    layout = input_layout(model, layout)
    it = iter(loader)
    first = next(it, None)
    if first is None:
        raise ValueError("measure() got an empty loader")
    x0 = first[0].to(device)
    layout = _resolve_layout(layout, x0, first[1] if len(first) > 1 else None)
    batch_axis = 0 if layout == "B" else 1
    eff = effective_weights(model, x0.narrow(batch_axis, 0, min(2, x0.shape[batch_axis])))
    modules = dict(model.named_modules())
    layers = {n: LayerStats(n, "linear" if isinstance(modules[n], nn.Linear) else "conv", w.numel(),
                            int((w != 0).sum())) for n, w in eff.items()}
    bins = {n: (w != 0).to(torch.float32) for n, w in eff.items()}
    dense = {n: torch.ones_like(w) for n, w in bins.items()}
    fan_cache: dict = {}
    spk_sum: dict[str, torch.Tensor] = {}
    spk_cnt: dict[str, float] = {}
    spk_total = [0.0, 0]  # all emitted spikes, all neuron-steps (T x neurons x samples, positions included)
    pooled_out: set[int] = set()  # storages of this forward's average pools of binary input
    hooks = []

    def pool_hook(mod, inputs, out):
        x = inputs[0]
        if torch.is_tensor(out) and bool(((x == 0) | (x == 1)).all()):
            pooled_out.add(_storage(out))

    def reshape_hook(mod, inputs, out):  # pooled spikes stay pooled through a flatten (even when it copies)
        if torch.is_tensor(out) and inputs and torch.is_tensor(inputs[0]) and _storage(inputs[0]) in pooled_out:
            pooled_out.add(_storage(out))

    def syn_hook(name):
        def hook(mod, inputs):
            x = inputs[0].detach().float()
            feat = x.shape[-1:] if isinstance(mod, nn.Linear) else x.shape[-3:]
            frames = x.numel() // math.prod(feat)
            ls = layers[name]
            spikes = bool(((x == 0) | (x == 1)).all())
            pooled = not spikes and _storage(inputs[0]) in pooled_out and bool((x >= 0).all())
            ls.input = "spikes" if spikes else ("pooled spikes" if pooled else "analog")
            key = (name, tuple(feat))
            if key not in fan_cache:
                fan_cache[key] = (_fanout(mod, bins[name], tuple(feat)), _fanout(mod, dense[name], tuple(feat)))
            f_eff, f_dense = fan_cache[key]
            xs = x.reshape(frames, *feat).sum(0)
            taps_dense = float(_dense_macs(mod, feat)) * frames
            if spikes:
                ls.sops += float((xs * f_eff).sum())
                ls.dense_sops += float((xs * f_dense).sum())
                ls.in_rate += float(x.mean()) * frames
            elif pooled:  # both rules; the chosen one is applied at the end
                ls.pooled_sops += float((xs * f_eff).sum())
                ls.pooled_dense_sops += float((xs * f_dense).sum())
                ls.pooled_macs += float(f_eff.sum()) * frames
                ls.in_rate += float(x.mean()) * frames
            else:
                ls.macs += float(f_eff.sum()) * frames
            ls.dense_macs += taps_dense
            ls._frames = getattr(ls, "_frames", 0) + frames
        return hook

    def neuron_hook(name):
        def hook(mod, inputs, out):
            s = neuron_spikes(out).detach().float()
            unit_dim = unit_axis(mod, s)
            per_unit = s.transpose(0, unit_dim).reshape(s.shape[unit_dim], -1).mean(1)
            spk_sum[name] = spk_sum.get(name, 0) + per_unit * (s.numel() // s.shape[unit_dim])
            spk_cnt[name] = spk_cnt.get(name, 0) + s.numel() // s.shape[unit_dim]
            spk_total[0] += float(s.sum())
            spk_total[1] += s.numel()
        return hook

    for n, m in modules.items():
        if isinstance(m, _AVG_POOLS):
            hooks.append(m.register_forward_hook(pool_hook))
        elif _reshape_module(m):
            hooks.append(m.register_forward_hook(reshape_hook))
        if isinstance(m, SYNAPTIC):
            hooks.append(m.register_forward_pre_hook(syn_hook(n)))
        elif is_neuron(m):
            hooks.append(m.register_forward_hook(neuron_hook(n)))
    was = model.training
    model.eval()
    correct = samples = 0
    has_labels = True
    try:
        batch = first
        b = 0
        while batch is not None and (max_batches is None or b < max_batches):
            x, y = batch[0].to(device), batch[1].to(device)
            if b:
                _resolve_layout(layout, x, y)  # every batch: labels and batch axis agree
            reset_states(model)  # SpikingJelly / snnTorch neurons keep their state between calls
            pooled_out.clear()
            out = model(x)
            if not torch.is_tensor(out):
                raise ValueError(f"measure: {type(model).__name__} returned a {type(out).__name__}, not per-step "
                                 "outputs [T, B, K]" + (f"; {_SNNTORCH_WRAP}" if uses_framework(model, "snntorch")
                                                        else ""))
            logits = out.mean(0) if out.dim() == 3 else out
            correct += int((logits.argmax(-1) == y).sum())
            samples += x.shape[batch_axis]
            b += 1
            batch = next(it, None)
    finally:
        model.train(was)
        reset_states(model)
        for h in hooks:
            h.remove()
    n = max(1, samples)
    for ls in layers.values():
        frames = getattr(ls, "_frames", 0)
        ls.in_rate = ls.in_rate / frames if frames and ls.input in ("spikes", "pooled spikes") else 0.0
        ls.sops /= n
        ls.dense_sops /= n
        ls.macs /= n
        ls.dense_macs /= n
        ls.pooled_sops /= n
        ls.pooled_dense_sops /= n
        ls.pooled_macs /= n
        if hasattr(ls, "_frames"):
            del ls._frames
    spiking = []
    for name, m in modules.items():
        if not is_neuron(m) or name not in spk_sum:
            continue
        per_unit = (spk_sum[name] / spk_cnt[name]).cpu()
        um = getattr(m, "unit_mask", None)
        alive = int(um.sum()) if um is not None else per_unit.numel()
        spiking.append(NeuronStats(name, per_unit.numel(), alive, float(per_unit.mean()),
                                   per_unit.tolist() if unit_rates else []))
    prune_set = set(prunable) if prunable is not None else set(layers)
    weights = sum(l.weights for n_, l in layers.items() if n_ in prune_set)
    nonzero = sum(l.nonzero for n_, l in layers.items() if n_ in prune_set)
    other_params = _other_params(model, eff)
    base_sops = sum(l.sops for l in layers.values())
    base_dense = sum(l.dense_sops for l in layers.values())
    base_macs = sum(l.macs for l in layers.values())
    p_sops = sum(l.pooled_sops for l in layers.values())
    p_dense = sum(l.pooled_dense_sops for l in layers.values())
    p_macs = sum(l.pooled_macs for l in layers.values())
    rules = {"mac": (base_sops, base_dense, base_macs + p_macs), "sop": (base_sops + p_sops, base_dense + p_dense,
                                                                          base_macs)}
    for ls in layers.values():  # the per-layer figures under the chosen rule
        if pooled_spikes == "sop":
            ls.sops += ls.pooled_sops
            ls.dense_sops += ls.pooled_dense_sops
        else:
            ls.macs += ls.pooled_macs
    sops, dense_sops, macs = rules[pooled_spikes]
    other = "sop" if pooled_spikes == "mac" else "mac"
    o_sops, o_dense, o_macs = rules[other]
    other_rule = None
    if any(ls.input == "pooled spikes" for ls in layers.values()):
        other_rule = {"pooled_spikes": other, "sops": o_sops, "dense_sops": o_dense, "macs": o_macs,
                      "energy_uj": (pj_per_ac * o_sops + pj_per_mac * o_macs) * 1e-6}
    return Measurement(
        accuracy=correct / n if has_labels else None, samples=samples, weights=weights, nonzero=nonzero,
        params=sum(l.nonzero for l in layers.values()) + other_params, sops=sops, dense_sops=dense_sops, macs=macs,
        dense_macs=sum(l.dense_macs for l in layers.values()),
        energy_uj=(pj_per_ac * sops + pj_per_mac * macs) * 1e-6,
        firing_rate=spk_total[0] / max(1, spk_total[1]), neurons=sum(s.units for s in spiking),
        neurons_alive=sum(s.alive for s in spiking), layers=list(layers.values()), spiking=spiking,
        pj_per_ac=pj_per_ac, pj_per_mac=pj_per_mac, pooled_spikes=pooled_spikes, other_rule=other_rule)


def _dense_macs(m: nn.Module, feat) -> int:
    if isinstance(m, nn.Linear):
        return m.in_features * m.out_features
    h, w = feat[-2:]
    kh, kw = m.kernel_size
    ho = (h + 2 * m.padding[0] - m.dilation[0] * (kh - 1) - 1) // m.stride[0] + 1
    wo = (w + 2 * m.padding[1] - m.dilation[1] * (kw - 1) - 1) // m.stride[1] + 1
    return m.out_channels * ho * wo * (m.in_channels // m.groups) * kh * kw


def _other_params(model: nn.Module, eff: dict[str, torch.Tensor]) -> int:
    """Non-zero parameters outside the synaptic weights (biases, norms, learnable taus)."""
    weights = {id(m.weight) for n, m in model.named_modules() if n in eff}
    return sum(int((p != 0).sum()) for p in model.parameters() if id(p) not in weights)


def count_weights(model: nn.Module) -> int:
    """Dense number of Conv/Linear weights."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, SYNAPTIC))
