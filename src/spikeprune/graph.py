"""Which weights belong to which spiking units: a small dependency analysis of an SNN.

A *unit group* is one spiking layer and the tensors tied to its units (FC neurons or conv channels):
the synaptic layers that *produce* its input (their output rows), the norms in between (per-channel scale
and shift), and the synaptic layers that *consume* its spikes (their input columns, ``span`` columns per unit
after a flatten). Masking a unit means zeroing exactly those rows, entries and columns; compaction slices them.
Groups whose units are mixed with others by a residual add are marked ``coupled`` and left out of structured
masks (residual stages would have to be pruned together; see docs).

The analysis traces the model with ``torch.fx`` (leaf modules kept whole) and runs one example forward to read
shapes. It only needs an ``example_input``.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from .adapters import reset_states, step_shape
from .neurons import BaseNeuron, is_neuron

SYNAPTIC = (nn.Conv2d, nn.Conv1d, nn.Linear)
NORMS = (nn.BatchNorm1d, nn.BatchNorm2d)
# modules that keep the unit (channel/feature) axis in place
PASS_THROUGH = (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.Dropout, nn.Identity, nn.MaxPool1d,
                nn.AvgPool1d)


@dataclass
class UnitGroup:
    """A spiking layer and the weights tied to its units."""

    neuron: str
    units: int
    unit_shape: tuple[int, ...]
    producers: list[str] = field(default_factory=list)
    norms: list[str] = field(default_factory=list)
    consumers: list[tuple[str, int]] = field(default_factory=list)  # (layer, columns per unit)
    coupled: bool = False
    is_output: bool = False

    @property
    def prunable(self) -> bool:
        """Structured masks are allowed: private producers, known consumers, not an output."""
        return not self.coupled and not self.is_output and bool(self.producers)


class _LeafTracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return len(list(m.children())) == 0 or is_neuron(m)


def _module_kind(mod: nn.Module) -> str:
    if is_neuron(mod):
        return "neuron"
    if isinstance(mod, SYNAPTIC):
        return "synaptic"
    if isinstance(mod, NORMS):
        return "norm"
    if isinstance(mod, PASS_THROUGH) or type(mod).__name__ in ("Repeat", "EventInput", "Dropout"):
        return "pass"
    if type(mod).__name__ == "Flatten" or isinstance(mod, nn.Flatten):
        return "flatten"
    return "other"


def trace(model: nn.Module) -> fx.Graph:
    """Symbolically trace ``model`` with every childless module (and every neuron) as a leaf."""
    try:
        return _LeafTracer().trace(model)
    except Exception as e:  # fx raises many kinds; report one line
        raise ValueError(f"cannot analyse {type(model).__name__} with torch.fx ({type(e).__name__}: {e}); "
                         "structured masks need a traceable model") from None


def analyze(model: nn.Module, example_input: torch.Tensor) -> list[UnitGroup]:
    """Return one :class:`UnitGroup` per spiking layer of ``model``."""
    graph = trace(model)
    modules = dict(model.named_modules())
    shapes = _output_shapes(model, example_input)

    def kind(node: fx.Node) -> str:
        if node.op == "call_module":
            return _module_kind(modules[node.target])
        if node.op in ("call_function", "call_method"):
            if node.target in (operator.add, torch.add, "add", operator.iadd, "add_", torch.cat):
                return "mix"
            if node.target in (torch.flatten, "flatten", "view", "reshape"):
                return "flatten"
            return "pass"
        return node.op  # placeholder / output / get_attr

    groups = []
    for node in graph.nodes:
        if node.op != "call_module" or kind(node) != "neuron":
            continue
        name = node.target
        shape = shapes.get(name)
        if shape is None:  # never ran in the example forward
            continue
        unit_shape = tuple(shape[2:]) if len(shape) > 2 else tuple(shape[1:])
        g = UnitGroup(neuron=name, units=unit_shape[0] if unit_shape else 1, unit_shape=unit_shape)
        _walk_up(node, kind, g)
        _walk_down(node, kind, g, modules)
        groups.append(g)
    return groups


def _walk_up(node: fx.Node, kind, g: UnitGroup) -> None:
    stack = [a for a in node.all_input_nodes]
    seen = set()
    while stack:
        n = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        k = kind(n)
        if k == "synaptic":
            g.producers.append(n.target)
        elif k == "norm":
            g.norms.append(n.target)
            stack.extend(n.all_input_nodes)
        elif k == "pass":
            stack.extend(n.all_input_nodes)
        elif k == "mix":
            g.coupled = True
            stack.extend(n.all_input_nodes)
        else:  # neuron output feeding a neuron directly, flatten, input, unknown op
            g.coupled = True


def _walk_down(node: fx.Node, kind, g: UnitGroup, modules: dict) -> None:
    stack = [(u, False) for u in node.users]
    seen = set()
    while stack:
        n, flat = stack.pop()
        if n in seen:
            continue
        seen.add(n)
        k = kind(n)
        if k == "synaptic":
            mod = modules[n.target]
            fan = mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels
            if fan % g.units:
                g.coupled = True
                continue
            span = fan // g.units if (flat or isinstance(mod, nn.Linear)) else 1
            if isinstance(mod, nn.Linear) and not flat and fan != g.units:
                g.coupled = True
            g.consumers.append((n.target, span))
        elif k in ("pass", "norm"):
            stack.extend((u, flat) for u in n.users)
        elif k == "flatten":
            stack.extend((u, True) for u in n.users)
        elif k == "output":
            g.is_output = True
        else:  # mix, another neuron, unknown
            g.coupled = True


def probe(model: nn.Module, x: torch.Tensor, handles: list) -> torch.Tensor:
    """One eval-mode, gradient-free forward of ``x`` for hooks to observe; the hooks in ``handles`` are removed,
    the training mode restored and neuron state reset afterwards, whatever happens."""
    was = model.training
    model.eval()
    try:
        reset_states(model)
        with torch.no_grad():
            return model(x)
    finally:
        model.train(was)
        reset_states(model)  # stateful neurons must not keep the example's state
        for m in model.modules():
            if isinstance(m, BaseNeuron):
                m.reset()
        for h in handles:
            h.remove()


def _output_shapes(model: nn.Module, x: torch.Tensor) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, m in model.named_modules():
        if is_neuron(m):  # foreign neurons: spikes of (spk, mem), single-step outputs as [1, B, ...]
            hooks.append(m.register_forward_hook(
                lambda mod, i, o, name=name: shapes.__setitem__(name, step_shape(mod, o))))
    probe(model, x, hooks)
    return shapes


def unit_index(units: int, span: int) -> torch.Tensor:
    """Column -> unit map for a consumer reading ``units`` units with ``span`` columns each."""
    return torch.arange(units).repeat_interleave(span)


def numel(shape) -> int:
    return math.prod(shape)
