"""Export a (compressed) SNN to the Neuromorphic Intermediate Representation (NIR), and import NIR graphs.

:func:`to_nir` takes a spikeprune model (or a SpikingJelly multi-step net built from the same kinds of layers),
makes its masks permanent on a copy (connection masks folded, dead neurons/channels sliced out by
:func:`spikeprune.compact.compact`, or only zeroed with ``compact_units=False``), folds each BatchNorm into the
Conv/Linear before it (eval statistics), and writes one NIR node per layer of the sequential structure:

==========================================  =================================================================
module                                      NIR node(s)
==========================================  =================================================================
``Linear`` without / with bias              ``nir.Linear`` / ``nir.Affine``
``Conv2d`` (+ ``BatchNorm2d``)              ``nir.Conv2d`` (BN folded into weight and bias)
``LIF`` / ``PLIF`` / SJ ``LIFNode``         ``nir.LIF``
``IF`` / SJ ``IFNode``                      ``nir.IF``
``AvgPool2d``                               ``nir.AvgPool2d``
``MaxPool2d`` on spikes                     ``nir.SumPool2d`` + ``nir.Threshold(0.5)`` (the max of 0/1 spikes is
                                            "any spike in the window"; NIR has no max pooling)
``Flatten``                                 ``nir.Flatten`` (per-sample shapes, no batch axis; negative
                                            ``start_dim`` for the snntorch/spikingjelly targets)
``VotingLayer``                             ``nir.Linear`` with fixed ``1/group`` blocks
input normalisation (``normalize=``)        a diagonal 1x1 ``nir.Conv2d`` / ``nir.Affine`` in front
``Repeat`` / ``EventInput`` / ``Dropout``   nothing (per-step graph: the input is presented at every step)
==========================================  =================================================================

Max pooling of analog values (e.g. the zoo ``convnet``, which pools the membrane input before its neurons) has no
NIR node and is refused with a ``ValueError``.

**Neuron parameters.** spikeprune neurons are discrete-time: ``H = V + (X - (V - V_reset)) / tau`` (LIF with
``decay_input``), ``H = V - (V - V_reset) / tau + X`` (without), ``H = V + X`` (IF). NIR neurons are continuous:
``tau dv/dt = (v_leak - v) + r I`` and ``dv/dt = r I``. Forward-Euler with step ``dt`` gives exactly the discrete
update for ``tau_nir = tau · dt``, ``v_leak = V_reset`` (0 for reset by subtraction), ``r = 1`` (``decay_input``)
or ``r = tau`` (without), and for IF ``r = 1 / dt``. ``dt`` defaults to 1 (time in units of simulation steps, so
``tau=2`` stays ``2``); pass ``dt=1e-3`` for a 1 ms step (``tau_nir = 2e-3`` s). It is stored in the graph's
metadata and used again on import. Hard reset maps to ``v_reset``; reset by subtraction has no NIR field: it is
recorded in the node's metadata (``reset: subtract``) and ``v_reset`` is 0. spikeprune fires at ``H >= V_th``,
NIR at ``v > v_threshold``.

**Targets.** ``target="snntorch"`` / ``"spikingjelly"`` write what those frameworks' own importers read
correctly as released (``dt`` 1e-4, max pooling of spikes as AvgPool2d + a firing node they map) and refuse, with
the reason, what they would change (reset by subtraction, IF for snnTorch, ...); see
:mod:`spikeprune.export.interop` for the importers and exporters themselves and ``docs/interop.md`` for the table.

**Readout.** The graph's output is the last layer's per-step value; spikeprune classifiers average it over the
``T`` steps (``T`` and the encoding are in the graph's metadata).

Weights are written dense (NIR has no sparse encoding; HDF5 gzip shrinks the zeros). A JSON file beside the graph
summarises the sparsity of every layer (:func:`export_nir`). :func:`from_nir` builds a spikeprune model from a
sequential NIR graph of the node types above.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from ..compact import _clean_copy, compact
from ..graph import SYNAPTIC, analyze, trace
from ..layers import AvgPool2d, Conv2d, Flatten, Linear, MaxPool2d, VotingLayer
from ..neurons import IF, LIF, PLIF, BaseNeuron, is_neuron

__all__ = ["to_nir", "export_nir", "from_nir", "permanent_copy", "sparsity_summary", "TARGETS"]

_IDENTITY = ("Repeat", "EventInput", "RateEncoder", "Identity", "Dropout")


def _nir():
    try:
        import nir
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("NIR export needs the 'nir' package: pip install 'spikeprune[nir]'") from None
    return nir


# ---------------------------------------------------------------------------------------- permanent copy
def _example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor | None:
    if example_input is not None:
        return example_input
    return model.example_input(2) if hasattr(model, "example_input") else None


@torch.no_grad()
def permanent_copy(model: nn.Module, example_input: torch.Tensor | None = None,
                   compact_units: bool = True) -> nn.Module:
    """A clean inference copy of ``model`` with every mask made permanent: masked weights 0.0, dead units sliced
    out (``compact_units``) or zeroed in place (their fan-in rows, biases, BN entries and fan-out columns), no mask
    buffers, hooks or observers. ``model`` is left untouched."""
    x = _example(model, example_input)
    if compact_units:
        return compact(model, x)
    from ..measure import effective_weights

    has_units = any(getattr(m, "unit_mask", None) is not None for m in model.modules())
    if has_units and x is None:
        raise ValueError("folding unit masks needs an example_input to analyse the model")
    eff = effective_weights(model, x)
    groups = analyze(model, x) if has_units else []
    new = _clean_copy(model)
    modules = dict(new.named_modules())
    for name, w in eff.items():
        modules[name].weight.copy_(w)
    for g in groups:
        um = modules[g.neuron]._buffers.get("unit_mask")
        if um is None:
            continue
        dead = ~um.to(torch.bool)
        for p in g.producers:
            if modules[p].bias is not None:
                modules[p].bias[dead] = 0
        for b in g.norms:
            bn = modules[b]
            if bn.weight is not None:  # a dead channel leaves its BN at 0 (its input rows are 0 already)
                bn.weight[dead] = 0
                bn.bias[dead] = 0
    for m in modules.values():
        m._buffers.pop("weight_mask", None)
        m._buffers.pop("unit_mask", None)
    return new


# ------------------------------------------------------------------------------------------ structure
def _chain(model: nn.Module) -> list[tuple[str, nn.Module | str, fx.Node]]:
    """The model as a list of ``(name, module or op, node)`` steps from input to output; ValueError if not a
    simple chain."""
    g = trace(model)
    modules = dict(model.named_modules())
    steps = []
    prev = None
    for node in g.nodes:
        if node.op == "placeholder":
            if prev is not None:
                raise ValueError("NIR export supports models with one input")
            prev = node
            continue
        if node.op == "output":
            if node.args[0] is not prev:
                raise ValueError("NIR export needs the last layer's output to be the model's output")
            break
        if node.op == "get_attr":
            continue
        ins = node.all_input_nodes
        if ins != [prev]:
            raise ValueError(f"NIR export supports sequential networks only; {node.name} ({node.target}) does not "
                             "take exactly the previous layer's output (residual adds, concatenations, ...)")
        if node.op == "call_module":
            steps.append((node.target, modules[node.target], node))
        elif node.target in (torch.flatten, "flatten"):
            steps.append((node.name, "flatten", node))
        else:
            raise ValueError(f"NIR export: unsupported operation {node.target!r} in {type(model).__name__}")
        prev = node
    return steps


def _input_shape(model: nn.Module, example_input: torch.Tensor | None,
                 input_shape: tuple[int, ...] | None) -> tuple[int, ...]:
    if input_shape is not None:
        return tuple(int(s) for s in input_shape)
    if hasattr(model, "in_shape"):
        return tuple(int(s) for s in model.in_shape)
    if example_input is None:
        raise ValueError("NIR export needs input_shape=(C, H, W) (one sample, one step) or an example_input")
    multi = any(getattr(m, "step_mode", None) == "m" for m in model.modules())
    return tuple(example_input.shape[2:] if multi else example_input.shape[1:])


def _pair(v) -> tuple[int, int]:
    a = [int(x) for x in np.asarray(v).reshape(-1)]
    return (a[0], a[0]) if len(a) == 1 else (a[0], a[1])


def _conv_out(feat, k, s, p, d=(1, 1)):
    c, h, w = feat
    return tuple(int(math.floor((n + 2 * p[i] - d[i] * (k[i] - 1) - 1) / s[i] + 1)) for i, n in enumerate((h, w)))


def _bn_fold(m: nn.Module, bn: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Weight and bias of ``m`` followed by ``bn`` in eval mode (``w·γ/σ``, ``(b − μ)·γ/σ + β``)."""
    w = m.weight.detach().double()
    b = m.bias.detach().double() if m.bias is not None else torch.zeros(w.shape[0], dtype=torch.float64)
    std = (bn.running_var.double() + bn.eps).sqrt()
    gamma = bn.weight.detach().double() if bn.weight is not None else torch.ones_like(std)
    beta = bn.bias.detach().double() if bn.bias is not None else torch.zeros_like(std)
    scale = gamma / std
    w = w * scale.view(-1, *([1] * (w.dim() - 1)))
    b = (b - bn.running_mean.double()) * scale + beta
    return w.to(m.weight.dtype), b.to(m.weight.dtype)


def _neuron_params(m: nn.Module) -> dict:
    if isinstance(m, BaseNeuron):
        p = {"v_threshold": m.v_threshold, "v_reset": m.v_reset}
        if m.kind == "if":
            return {"kind": "if", **p}
        tau = m.tau_value if isinstance(m, PLIF) else m.tau
        return {"kind": "lif", "tau": float(tau), "decay_input": bool(m.decay_input), **p}
    from ..adapters import framework_of

    fw = framework_of(m)
    if fw == "spikingjelly":
        from ..adapters.spikingjelly import neuron_params

        return neuron_params(m)
    raise ValueError(f"NIR export: no mapping for neuron {type(m).__name__}"
                     + (" (snnTorch nets: use snntorch.export_to_nir)" if fw == "snntorch" else ""))


TARGETS = ("generic", "snntorch", "spikingjelly")
# the time step each importer assumes when it is not told (snnTorch 1.0.0's import_from_nir hard-codes 1e-4;
# SpikingJelly 2.0.0's import_from_nir defaults to 1e-4); spikeprune's own graphs default to 1 (time in steps)
DEFAULT_DT = {"generic": 1.0, "snntorch": 1e-4, "spikingjelly": 1e-4}


def _refuse(target: str, name: str, why: str) -> ValueError:
    return ValueError(f"NIR export (target {target}): {name}: {why}")


def _neuron_node(nir, p: dict, feat: tuple[int, ...], dt: float, name: str, target: str = "generic"):
    """The NIR node of one spikeprune-convention neuron (``p`` from :func:`_neuron_params`), parameters in float64
    (float32 time constants would turn ``tau=2`` into ``1.99999995`` on import)."""
    full = lambda v: np.full(feat, v, dtype=np.float64)  # noqa: E731
    vr = 0.0 if p["v_reset"] is None else float(p["v_reset"])
    soft = p["v_reset"] is None
    if target == "snntorch":
        if soft:
            raise _refuse(target, name, "reset by subtraction: snnTorch 1.0.0's import_from_nir always builds "
                          "reset_mechanism='zero' and its own subtract reset acts after the leak (use --target "
                          "generic with spikeprune.export.interop.to_snntorch, or train with v_reset=0)")
        if vr != 0.0:
            raise _refuse(target, name, f"v_reset={vr}: snnTorch resets to 0 only (its importer asserts v_leak=0)")
        if p["kind"] == "if":
            raise _refuse(target, name, "IF: snnTorch 1.0.0's import_from_nir maps nir.IF to Leaky(beta=0.9) and "
                          "asserts r=1 (use --target generic with spikeprune.export.interop.to_snntorch)")
    if target == "spikingjelly":
        if soft:
            raise _refuse(target, name, "reset by subtraction: NIR has no soft reset and SpikingJelly 2.0.0's "
                          "import_from_nir builds a hard reset to v_reset (use --target generic with "
                          "spikeprune.export.interop.to_spikingjelly)")
        if p["kind"] == "lif" and not p["tau"] > 1.0:
            raise _refuse(target, name, f"tau={p['tau']}: SpikingJelly needs tau > 1 (tau_nir / dt > 1)")
    meta = {"reset": "subtract" if soft else "hard", "spikeprune_kind": p["kind"]}
    if p["kind"] == "if":
        return nir.IF(r=full(1.0 / dt), v_threshold=full(p["v_threshold"]), v_reset=full(vr), metadata=meta)
    tau = p["tau"]
    return nir.LIF(tau=full(tau * dt), r=full(1.0 if p["decay_input"] else tau), v_leak=full(vr),
                   v_threshold=full(p["v_threshold"]), v_reset=full(vr), metadata=meta)


def _spike_max_pool(nir, name: str, k, s, p, feat_in, feat_out, dt: float, target: str) -> list[tuple[str, Any]]:
    """Max pooling of 0/1 spikes ("any spike in the window") in nodes the target's importer knows:

    * generic: ``SumPool2d`` + ``Threshold(0.5)`` (NIR's own nodes);
    * snnTorch (its importer maps neither): ``AvgPool2d`` + a LIF without memory (``tau = dt``, beta 0) firing at
      ``0.5 / k²``, i.e. at one spike in the window;
    * SpikingJelly (its importer maps neither, and needs ``tau / dt > 1``): ``AvgPool2d`` + an IF firing at
      ``0.5 / k²`` with hard reset to 0 (its input is 0 or at least ``1 / k²``, so it never keeps a charge).

    Exact for binary spikes; the nodes carry ``spikeprune_module: MaxPool2d`` so :func:`from_nir` rebuilds the
    max pooling."""
    meta = {"spikeprune_module": "MaxPool2d"}
    if target == "generic":
        return [(name, nir.SumPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array(p),
                                     metadata=dict(meta))),
                (f"{name}.threshold", nir.Threshold(threshold=np.full(feat_out, 0.5, dtype=np.float64),
                                                    metadata=dict(meta)))]
    if any(p):
        raise _refuse(target, name, "padded max pooling: the average-pooling form counts the padding")
    full = lambda v: np.full(feat_out, v, dtype=np.float64)  # noqa: E731
    th = 0.5 / (k[0] * k[1])
    pool = nir.AvgPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array(p), metadata=dict(meta))
    if target == "snntorch":
        fire = nir.LIF(tau=full(dt), r=full(1.0), v_leak=full(0.0), v_threshold=full(th), v_reset=full(0.0),
                       metadata={**meta, "reset": "hard", "spikeprune_kind": "lif"})
    else:
        fire = nir.IF(r=full(1.0 / dt), v_threshold=full(th), v_reset=full(0.0),
                      metadata={**meta, "reset": "hard", "spikeprune_kind": "if"})
    return [(name, pool), (f"{name}.fire", fire)]


def _normalize_node(nir, mean, std, feat: tuple[int, ...], dtype):
    """Input normalisation ``(x - mean) / std`` (per channel) as a node every importer maps: a 1x1 ``Conv2d`` with a
    diagonal ``C x C`` weight (``groups=1``: SpikingJelly 2.0.0 refuses grouped convolutions) for ``(C, H, W)``
    inputs, a diagonal ``Affine`` for flat ones. Off-diagonal zeros add exact zeros: same values as the data
    pipeline's normalisation."""
    mean = np.asarray(mean, dtype=np.float64).reshape(-1)
    std = np.asarray(std, dtype=np.float64).reshape(-1)
    c = feat[0]
    if mean.size == 1:
        mean, std = np.full(c, mean[0]), np.full(c, std[0])
    if mean.size != c or std.size != c:
        raise ValueError(f"NIR export: normalisation has {mean.size} channels, the input has {c}")
    if np.any(std <= 0):
        raise ValueError("NIR export: normalisation std must be > 0")
    meta = {"spikeprune_module": "Normalize", "mean": mean.tolist(), "std": std.tolist()}
    if len(feat) == 3:
        w = np.zeros((c, c, 1, 1), dtype=dtype)
        w[np.arange(c), np.arange(c), 0, 0] = 1.0 / std
        return nir.Conv2d(input_shape=feat[1:], weight=w, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1,
                          bias=(-mean / std).astype(dtype), metadata=meta)
    if len(feat) == 1:
        return nir.Affine(weight=np.diag(1.0 / std).astype(dtype), bias=(-mean / std).astype(dtype), metadata=meta)
    raise ValueError(f"NIR export: cannot normalise an input of shape {feat}")


def _flatten_dims(m: nn.Module | str, node: fx.Node, feat: tuple[int, ...]) -> int:
    """How many trailing feature dims a flatten merges."""
    if isinstance(m, Flatten):
        return int(m.dims)
    if isinstance(m, nn.Flatten):  # torch / SpikingJelly: dim 0 is the batch (SJ multi-step folds T into it)
        end = m.end_dim if m.end_dim >= 0 else len(feat) + 1 + m.end_dim
        if end != len(feat):
            raise ValueError("NIR export: Flatten must flatten up to the last dimension")
        return len(feat) + 1 - m.start_dim
    start = node.args[1] if len(node.args) > 1 else node.kwargs.get("start_dim", 0)
    return len(feat) + 1 - int(start)


@torch.no_grad()
def to_nir(model: nn.Module, example_input: torch.Tensor | None = None, *, dt: float | None = None,
           target: str = "generic", compact_units: bool = True, input_shape: tuple[int, ...] | None = None,
           normalize: tuple | None = None):
    """Return a ``nir.NIRGraph`` of ``model`` with its masks made permanent (see the module docstring).

    ``example_input`` (one small batch as the model takes it; default ``model.example_input(2)``) is needed for
    models with unit masks; ``input_shape`` is one sample's shape at one step (default ``model.in_shape``).

    ``target`` picks the importer the graph is written for: ``generic`` (NIR as specified, ``dt`` default 1),
    ``snntorch`` (``snntorch.import_from_nir`` 1.0.0 as released: ``dt`` 1e-4, which it assumes, LIF only, hard
    reset to 0, max pooling of spikes as AvgPool2d + memoryless LIF) or ``spikingjelly``
    (``spikingjelly.activation_based.nir_exchange.import_from_nir`` 2.0.0: ``dt`` 1e-4, its default, hard reset,
    ungrouped convolutions, max pooling of spikes as AvgPool2d + IF). Constructs a target cannot express are
    refused with a one-line ``ValueError``. ``normalize=(mean, std)`` (per channel) puts the data pipeline's input
    normalisation in front of the graph (a diagonal 1x1 Conv2d / Affine), so that the graph takes raw inputs, and
    records it in the graph's metadata."""
    nir = _nir()
    if target not in TARGETS:
        raise ValueError(f"NIR export: target must be one of {list(TARGETS)}, got {target!r}")
    if dt is None:
        dt = DEFAULT_DT[target]
    if dt <= 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    if target == "snntorch" and not math.isclose(dt, 1e-4, rel_tol=1e-9):
        raise ValueError(f"NIR export (target snntorch): dt={dt}, but snnTorch 1.0.0's import_from_nir assumes "
                         "dt=1e-4 (it would misread every time constant); leave dt unset")
    x = _example(model, example_input)
    inf = permanent_copy(model, x, compact_units).eval()
    feat = _input_shape(model, x, input_shape)
    steps = _chain(inf)
    wdtype = next((p.dtype for p in inf.parameters() if p.is_floating_point()), torch.float32)
    npdtype = np.float64 if wdtype == torch.float64 else np.float32
    nodes: dict[str, Any] = {"input": nir.Input(input_type={"input": np.array(feat)})}
    order = ["input"]
    if normalize is not None:
        nodes["normalize"] = _normalize_node(nir, normalize[0], normalize[1], feat, npdtype)
        order.append("normalize")
    last_neuron = False
    i = 0
    while i < len(steps):
        name, m, node = steps[i]
        nxt = steps[i + 1][1] if i + 1 < len(steps) else None
        key = name
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            if isinstance(nxt, (nn.BatchNorm1d, nn.BatchNorm2d)):
                w, b = _bn_fold(m, nxt)
                i += 1
            else:
                w, b = m.weight.detach(), (m.bias.detach() if m.bias is not None else None)
            w = w.cpu().numpy().astype(npdtype)
            if isinstance(m, nn.Linear):
                if len(feat) != 1 or feat[0] != m.in_features:
                    raise ValueError(f"NIR export: {name} expects {m.in_features} features, gets shape {feat}")
                nodes[key] = nir.Linear(weight=w) if b is None else nir.Affine(
                    weight=w, bias=b.cpu().numpy().astype(npdtype))
                feat = (m.out_features,)
            else:
                if m.padding_mode != "zeros" or isinstance(m.padding, str):
                    raise ValueError(f"NIR export: {name} needs numeric zero padding")
                if target == "spikingjelly" and m.groups != 1:
                    raise _refuse(target, name, f"groups={m.groups}: SpikingJelly 2.0.0's import_from_nir refuses "
                                  "grouped convolutions")
                k, s, p, d = _pair(m.kernel_size), _pair(m.stride), _pair(m.padding), _pair(m.dilation)
                bias = np.zeros(m.out_channels, npdtype) if b is None else b.cpu().numpy().astype(npdtype)
                nodes[key] = nir.Conv2d(input_shape=feat[1:], weight=w, stride=s, padding=p, dilation=d,
                                        groups=m.groups, bias=bias)
                feat = (m.out_channels, *_conv_out(feat, k, s, p, d))
            last_neuron = False
        elif isinstance(m, nn.Module) and is_neuron(m):
            nodes[key] = _neuron_node(nir, _neuron_params(m), feat, dt, name, target)
            last_neuron = True
        elif isinstance(m, nn.MaxPool2d):
            if not last_neuron:
                raise ValueError(f"NIR export: {name} max-pools analog values (not spikes); NIR has no max pooling. "
                                 "Max pooling of spikes (right after a spiking layer) is exported as SumPool2d + "
                                 "Threshold(0.5); pool after the neuron or use AvgPool2d")
            k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
            if m.ceil_mode or _pair(m.dilation) != (1, 1):
                raise ValueError(f"NIR export: {name} uses ceil_mode/dilation")
            out = (feat[0], *_conv_out(feat, k, s, p))
            made = _spike_max_pool(nir, name, k, s, p, feat, out, dt, target)
            for key, n in made[:-1]:
                nodes[key] = n
                order.append(key)
            key = made[-1][0]
            nodes[key] = made[-1][1]
            feat = out
        elif isinstance(m, nn.AvgPool2d):
            k, s, p = _pair(m.kernel_size), _pair(m.stride or m.kernel_size), _pair(m.padding)
            if m.ceil_mode or (any(p) and not m.count_include_pad) or m.divisor_override:
                raise ValueError(f"NIR export: {name} uses ceil_mode/count_include_pad=False/divisor_override")
            nodes[key] = nir.AvgPool2d(kernel_size=np.array(k), stride=np.array(s), padding=np.array(p))
            feat = (feat[0], *_conv_out(feat, k, s, p))
            last_neuron = False
        elif m == "flatten" or isinstance(m, (Flatten, nn.Flatten)):
            dims = _flatten_dims(m, node, feat)
            if not 1 <= dims <= len(feat):
                raise ValueError(f"NIR export: cannot place flatten {name} on per-sample shape {feat}")
            start = len(feat) - dims
            # importers map start_dim straight onto torch's Flatten of a batched tensor: snnTorch 1.0.0 as is
            # (start_dim 0 would flatten the batch), SpikingJelly 2.0.0 shifted by one; a negative start_dim means
            # the same per sample and in both of them
            nodes[key] = nir.Flatten(input_type={"input": np.array(feat)},
                                     start_dim=start if target == "generic" else start - len(feat), end_dim=-1)
            feat = (*feat[:start], math.prod(feat[start:]))
        elif isinstance(m, VotingLayer):
            g = int(m.group)
            if len(feat) != 1 or feat[0] % g:
                raise ValueError(f"NIR export: {name} (VotingLayer of {g}) needs a flat input divisible by {g}")
            classes = feat[0] // g
            w = np.kron(np.eye(classes), np.full((1, g), 1.0 / g)).astype(npdtype)
            nodes[key] = nir.Linear(weight=w, metadata={"spikeprune_module": "VotingLayer", "group": g})
            feat = (classes,)
            last_neuron = False
        elif type(m).__name__ in _IDENTITY or isinstance(m, nn.Dropout):
            i += 1
            continue  # per-step semantics: encoders and dropout vanish
        elif isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
            raise ValueError(f"NIR export: {name} (BatchNorm) must directly follow a Conv2d/Linear to be folded")
        else:
            what = type(m).__name__ if isinstance(m, nn.Module) else m
            raise ValueError(f"NIR export: no NIR node for {name} ({what})")
        order.append(key)
        i += 1
    nodes["output"] = nir.Output(output_type={"output": np.array(feat)})
    order.append("output")
    edges = list(zip(order[:-1], order[1:]))
    from .._version import __version__

    meta = {"producer": f"spikeprune {__version__}", "target": target, "dt": float(dt),
            "readout": "mean of the output over T steps"}
    if hasattr(model, "T"):
        meta["T"] = int(model.T)
    if hasattr(model, "encoding"):
        meta["encoding"] = str(model.encoding)
    if normalize is not None:
        meta["input_normalization"] = json.dumps({"mean": np.asarray(normalize[0], dtype=float).reshape(-1).tolist(),
                                                  "std": np.asarray(normalize[1], dtype=float).reshape(-1).tolist(),
                                                  "in_graph": True})
    return nir.NIRGraph(nodes=nodes, edges=edges, metadata=meta)


# ------------------------------------------------------------------------------------------- summaries
def sparsity_summary(model: nn.Module, graph) -> dict:
    """Per-node weight counts of ``graph`` and the unit counts of ``model`` before/after compaction."""
    layers = []
    for name, node in graph.nodes.items():
        w = getattr(node, "weight", None)
        if w is None or _meta_str(node, "spikeprune_module") in ("Normalize", "VotingLayer"):
            continue  # fixed maps, not trained synapses
        nz = int(np.count_nonzero(w))
        layers.append({"node": name, "type": type(node).__name__, "shape": list(w.shape), "weights": int(w.size),
                       "nonzero": nz, "density": nz / max(1, w.size)})
    units = []
    for name, m in model.named_modules():
        um = getattr(m, "unit_mask", None)
        if um is not None and is_neuron(m):
            units.append({"neuron": name, "units": int(um.numel()), "alive": int(um.sum())})
    total = sum(l["weights"] for l in layers)
    nonzero = sum(l["nonzero"] for l in layers)
    before = sum(m.weight.numel() for m in model.modules() if isinstance(m, SYNAPTIC))
    return {"format": "nir", "dt": float(np.asarray(graph.metadata.get("dt", 1.0))), "layers": layers,
            "units": units, "weights_exported": total, "nonzero": nonzero, "density": nonzero / max(1, total),
            "weights_before_compaction": before, "density_before_compaction": nonzero / max(1, before)}


def export_nir(model: nn.Module, path: str | Path, example_input: torch.Tensor | None = None, *,
               dt: float | None = None, target: str = "generic", compact_units: bool = True,
               input_shape: tuple[int, ...] | None = None, normalize: tuple | None = None) -> dict:
    """Write ``model`` (masks made permanent) to ``path`` (``.nir``, HDF5) and a sparsity summary beside it
    (``<path stem>.sparsity.json``). Returns the summary. ``dt``/``target``/``normalize`` as in :func:`to_nir`."""
    nir = _nir()
    graph = to_nir(model, example_input, dt=dt, target=target, compact_units=compact_units, input_shape=input_shape,
                   normalize=normalize)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    nir.write(str(path), graph)
    summary = {"file": path.name, "target": target, **sparsity_summary(model, graph)}
    if normalize is not None:
        summary["input_normalization"] = json.loads(graph.metadata["input_normalization"])
    path.with_name(path.stem + ".sparsity.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


# ----------------------------------------------------------------------------------------------- import
def _uniform(a, what: str, node: str) -> float:
    a = np.asarray(a, dtype=np.float64)
    if a.size == 0:
        raise ValueError(f"NIR import: {node} has an empty {what}")
    if not np.allclose(a, a.flat[0], rtol=1e-6, atol=0):
        raise ValueError(f"NIR import: {node} has per-neuron {what}; spikeprune neurons share one value per layer")
    return float(a.flat[0])


def _meta_str(node, key: str, default: str = "") -> str:
    v = (getattr(node, "metadata", None) or {}).get(key, default)
    if isinstance(v, bytes):
        v = v.decode()
    if isinstance(v, np.ndarray):
        v = v.item()
        v = v.decode() if isinstance(v, bytes) else v
    return str(v)


def _order(graph) -> list[str]:
    succ: dict[str, list[str]] = {}
    for a, b in graph.edges:
        succ.setdefault(a, []).append(b)
    starts = [k for k, n in graph.nodes.items() if type(n).__name__ == "Input"]
    if len(starts) != 1:
        raise ValueError("NIR import needs exactly one Input node")
    order, cur = [], starts[0]
    while True:
        order.append(cur)
        nxt = succ.get(cur, [])
        if not nxt:
            break
        if len(nxt) > 1:
            raise ValueError(f"NIR import supports sequential graphs only ({cur} feeds {nxt})")
        cur = nxt[0]
        if cur in order:
            raise ValueError("NIR import: the graph has a cycle")
    if type(graph.nodes[order[-1]]).__name__ != "Output" or len(order) != len(graph.nodes):
        raise ValueError("NIR import supports sequential graphs Input -> ... -> Output only")
    return order


def _t(a, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64 if dtype == torch.float64 else np.float32))


def _ints(a) -> tuple[int, ...]:
    return tuple(int(v) for v in np.asarray(a).reshape(-1))


def _spike_max_pool_form(layers: list[nn.Module], pool, nxt, dt: float) -> bool:
    """True if ``pool`` (AvgPool2d) of spikes followed by ``nxt`` is max pooling of spikes written by another tool
    (snnTorch's exporter turns the memoryless LIF of a ``target="snntorch"`` graph back into a plain node): a LIF
    without memory (``tau = dt``) or an IF, no input scaling, reset to 0, firing between 0 and one spike in the
    window. Such a pair is "any spike in the window", and a LIF with ``tau = 1`` step has no spikeprune form."""
    if not layers or not isinstance(layers[-1], (BaseNeuron, MaxPool2d)) or nxt is None:
        return False
    kind = type(nxt).__name__
    try:
        if kind == "LIF":
            tau = _uniform(nxt.tau, "tau", "pool") / dt
            scale = _uniform(nxt.r, "r", "pool") * dt / _uniform(nxt.tau, "tau", "pool")
            if not (math.isclose(tau, 1.0, rel_tol=1e-6) and np.allclose(np.asarray(nxt.v_leak), 0.0)):
                return False
        elif kind == "IF":
            scale = _uniform(nxt.r, "r", "pool") * dt
        else:
            return False
        th = _uniform(nxt.v_threshold, "v_threshold", "pool") / scale
        vr = 0.0 if getattr(nxt, "v_reset", None) is None else _uniform(nxt.v_reset, "v_reset", "pool")
    except ValueError:
        return False
    k = math.prod(_ints(pool.kernel_size)) if len(_ints(pool.kernel_size)) > 1 else _ints(pool.kernel_size)[0] ** 2
    return (vr == 0.0 and _meta_str(nxt, "reset") != "subtract" and not any(_ints(pool.padding))
            and 0.0 < th < 1.0 / k)


@torch.no_grad()
def from_nir(graph, T: int | None = None, encoding: str | None = None, dt: float | None = None) -> nn.Module:
    """Build a spikeprune ``SequentialSNN`` from a sequential NIR graph (or a ``.nir`` path) made of Input,
    Affine/Linear, Conv2d, LIF/IF, SumPool2d + Threshold (max pooling on spikes), AvgPool2d, Flatten and Output.

    ``T``/``encoding``/``dt`` default to the graph's metadata (as written by :func:`to_nir`), else 4 / ``direct``
    / 1. Neuron parameters must be one value per layer. The model takes ``[B, *input_shape]`` and returns
    ``[T, B, K]`` like the zoo models, in float64 when the graph's weights are float64.

    Nodes that :func:`to_nir` wrote for a construct NIR has no node for come back as that construct (node metadata
    ``spikeprune_module``): max pooling of spikes in its generic (SumPool2d + Threshold) and importer-specific
    (AvgPool2d + memoryless LIF / IF) forms, and ``VotingLayer``. Graphs written by snnTorch's or SpikingJelly's
    exporters: see :mod:`spikeprune.export.interop`."""
    nir = _nir()
    from ..models.cnn import SequentialSNN

    if isinstance(graph, (str, Path)):
        graph = nir.read(str(graph))
    meta = dict(getattr(graph, "metadata", None) or {})
    dt_arg = dt
    dt = float(dt if dt is not None else np.asarray(meta.get("dt", 1.0)).item())
    T = int(T if T is not None else np.asarray(meta.get("T", 4)).item())
    encoding = encoding or _meta_str(graph, "encoding", "direct") or "direct"
    order = _order(graph)
    inp = graph.nodes[order[0]]
    in_shape = tuple(int(s) for s in np.asarray(inp.input_type["input"]).tolist())
    layers: list[nn.Module] = []
    names = order[1:-1]
    wdt = torch.float64 if any(np.asarray(getattr(graph.nodes[k], "weight", np.zeros(0, np.float32))).dtype
                               == np.float64 for k in names) else torch.float32
    i = 0
    while i < len(names):
        key = names[i]
        n = graph.nodes[key]
        kind = type(n).__name__
        nxt = graph.nodes[names[i + 1]] if i + 1 < len(names) else None
        if kind == "Linear" and _meta_str(n, "spikeprune_module") == "VotingLayer":
            m = VotingLayer(int(np.asarray(n.metadata["group"]).item()))
        elif kind in ("Affine", "Linear"):
            w = _t(n.weight, wdt)
            m = Linear(w.shape[1], w.shape[0], bias=kind == "Affine").to(wdt)
            m.weight.copy_(w)
            if kind == "Affine":
                m.bias.copy_(_t(n.bias, wdt))
        elif kind == "Conv2d":
            w = _t(n.weight, wdt)
            b = np.asarray(n.bias)
            has_bias = bool(np.any(b != 0))
            pad = n.padding
            if isinstance(pad, (str, bytes)):
                raise ValueError(f"NIR import: {key} uses string padding {pad!r}")
            m = Conv2d(w.shape[1] * int(n.groups), w.shape[0], tuple(w.shape[2:]), stride=_pair(n.stride),
                       padding=_pair(pad), dilation=_pair(n.dilation), groups=int(n.groups), bias=has_bias).to(wdt)
            m.weight.copy_(w)
            if has_bias:
                m.bias.copy_(_t(b, wdt))
        elif kind == "LIF":
            vr = _uniform(n.v_reset, "v_reset", key)
            if not np.allclose(np.asarray(n.v_leak), vr):
                raise ValueError(f"NIR import: {key} has v_leak != v_reset, which spikeprune's LIF cannot express")
            tau = _uniform(n.tau, "tau", key) / dt
            if not tau > 1.0:
                raise ValueError(f"NIR import: {key} has tau_nir / dt = {tau:g} <= 1 step with dt={dt:g} ("
                                 + ("from the graph" if "dt" in meta and dt_arg is None else
                                    "given" if dt_arg is not None else "the graph does not record dt") +
                                 "); snnTorch and SpikingJelly write dt=1e-4: pass dt=1e-4")
            r = _uniform(n.r, "r", key)
            if math.isclose(r, 1.0, rel_tol=1e-6):
                decay_input = True
            elif math.isclose(r, tau, rel_tol=1e-6):
                decay_input = False
            else:
                raise ValueError(f"NIR import: {key} has r={r}, expected 1 (decay_input) or tau/dt={tau} "
                                 f"(dt={dt:g})")
            soft = _meta_str(n, "reset") == "subtract"
            m = LIF(tau=tau, decay_input=decay_input, v_threshold=_uniform(n.v_threshold, "v_threshold", key),
                    v_reset=None if soft else vr)
        elif kind == "IF":
            if not math.isclose(_uniform(n.r, "r", key) * dt, 1.0, rel_tol=1e-6):
                raise ValueError(f"NIR import: {key} has r != 1/dt (dt={dt:g}); spikeprune's IF integrates its input "
                                 "unscaled (is dt right? snnTorch and SpikingJelly write dt=1e-4)")
            soft = _meta_str(n, "reset") == "subtract"
            m = IF(v_threshold=_uniform(n.v_threshold, "v_threshold", key),
                   v_reset=None if soft else _uniform(n.v_reset, "v_reset", key))
        elif kind == "SumPool2d":
            if nxt is None or type(nxt).__name__ != "Threshold" or not np.allclose(np.asarray(nxt.threshold), 0.5):
                raise ValueError(f"NIR import: {key} (sum pooling) is supported only as max pooling of spikes, "
                                 "followed by Threshold(0.5)")
            k, s, p = (tuple(int(v) for v in np.asarray(a).reshape(-1)) for a in (n.kernel_size, n.stride, n.padding))
            m = MaxPool2d(k, s, p)
            i += 1
        elif kind == "AvgPool2d" and (_meta_str(n, "spikeprune_module") == "MaxPool2d"
                                      or _spike_max_pool_form(layers, n, nxt, dt)):
            if nxt is None or type(nxt).__name__ not in ("LIF", "IF"):
                raise ValueError(f"NIR import: {key} (max pooling of spikes) lacks its firing node")
            m = MaxPool2d(_ints(n.kernel_size), _ints(n.stride), _ints(n.padding))
            i += 1
        elif kind == "AvgPool2d":
            m = AvgPool2d(_ints(n.kernel_size), _ints(n.stride), _ints(n.padding))
        elif kind == "Flatten":
            shape = np.asarray(n.input_type["input"]).tolist()
            start = int(n.start_dim) % len(shape)
            if int(n.end_dim) not in (-1, len(shape) - 1):
                raise ValueError(f"NIR import: {key} must flatten up to the last dimension")
            m = Flatten(len(shape) - start)
        else:
            raise ValueError(f"NIR import: node {key} of type {kind} is not supported")
        layers.append(m)
        i += 1
    if not any(isinstance(m, BaseNeuron) for m in layers):
        raise ValueError("NIR import: the graph has no spiking layer")
    out_shape = np.asarray(graph.nodes[order[-1]].output_type["output"]).tolist()
    model = SequentialSNN("nir", layers, in_shape, int(math.prod(out_shape)), T, encoding)
    return model.eval()
