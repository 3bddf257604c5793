"""NIR to and from snnTorch and SpikingJelly: the importers and exporters as released, with every workaround for
their quirks kept here, each named with the upstream version it applies to.

spikeprune -> other framework (a graph from :func:`spikeprune.export.nir.to_nir`):

* ``to_nir(model, target="snntorch")`` / ``target="spikingjelly"`` write a graph their own importers
  (``snntorch.import_nir.import_from_nir``, ``spikingjelly.activation_based.nir_exchange.import_from_nir``) read
  correctly as released, or refuse the construct with the reason;
* :func:`to_snntorch` / :func:`to_spikingjelly` read any spikeprune graph (``generic`` included) into that
  framework's modules through ``nirtorch``, mapping what their importers get wrong or lack (below); the result
  runs ``T`` steps like a zoo model (:class:`StepRunner`).

other framework -> spikeprune:

* :func:`from_snntorch` runs snnTorch's ``export_to_nir`` on a net and repairs the graph before
  :func:`spikeprune.export.nir.from_nir`;
* :func:`from_spikingjelly` runs SpikingJelly's ``export_to_nir`` (its graphs need no repair, only their ``dt``).

Quirks worked around (``QUIRKS`` lists them for the docs and the tests):
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from torch import nn

from ..adapters import framework_of, reset_states
from .nir import _meta_str, _nir, _uniform, from_nir

__all__ = ["to_snntorch", "to_spikingjelly", "from_snntorch", "from_spikingjelly", "StepRunner", "Heaviside",
           "QUIRKS", "SNNTORCH_DT", "SPIKINGJELLY_DT"]

SNNTORCH_DT = 1e-4  # snnTorch 1.0.0: export_to_nir and import_from_nir hard-code dt = 1e-4
SPIKINGJELLY_DT = 1e-4  # SpikingJelly 2.0.0: export_to_nir / import_from_nir default dt

QUIRKS = {
    "snntorch-1.0.0-import-dt": "import_from_nir hard-codes dt=1e-4: a graph with dt=1 gets threshold x 10^4 and "
                                "beta 0.99995 and never fires (to_snntorch reads dt from the graph)",
    "snntorch-1.0.0-import-flatten": "import_from_nir maps nir.Flatten(start_dim=0) to nn.Flatten(0), which "
                                     "flattens the batch (to_snntorch shifts the dims; to_nir targets write a "
                                     "negative start_dim)",
    "snntorch-1.0.0-import-pooling": "import_from_nir has no SumPool2d/Threshold mapping (max pooling of spikes) "
                                     "(to_snntorch maps them; target snntorch writes AvgPool2d + memoryless LIF)",
    "snntorch-1.0.0-import-if": "import_from_nir maps nir.IF to Leaky(beta=0.9) and asserts r=1 (to_snntorch builds "
                                "Leaky(beta=1))",
    "snntorch-1.0.0-import-reset": "import_from_nir always builds reset_mechanism='zero' (to_snntorch refuses "
                                   "reset by subtraction instead of changing it)",
    "snntorch-1.0.0-import-dtype": "import_from_nir copies weights through torch.Tensor (float32) (to_snntorch "
                                   "keeps the graph's dtype)",
    "snntorch-1.0.0-spike-dtype": "spike functions return float32 whatever the input dtype (to_snntorch casts "
                                  "the spikes back)",
    "snntorch-1.0.0-export-types": "export_to_nir's infer_types() fails with nir 1.0.8 (Flatten/Conv2d written "
                                   "without input types); from_snntorch exports without it and fills the types in",
    "snntorch-1.0.0-export-batch": "export_to_nir writes the sample's batch axis into the Input/Output types "
                                   "(from_snntorch drops it)",
    "snntorch-1.0.0-export-reset": "export_to_nir writes v_reset=0 for every Leaky whatever its reset_mechanism; "
                                   "snnTorch's default subtract reset acts after the leak (H' = beta H + X - "
                                   "theta S), which no NIR node and no spikeprune neuron express: from_snntorch "
                                   "refuses it (reset_mechanism='zero' imports exactly)",
    "spikingjelly-2.0.0-import-pooling": "import_from_nir has no SumPool2d/Threshold mapping (to_spikingjelly maps "
                                         "them; target spikingjelly writes AvgPool2d + IF)",
    "spikingjelly-2.0.0-import-reset": "import_from_nir always builds a hard reset (to_spikingjelly builds "
                                       "v_reset=None for nodes marked reset: subtract)",
    "spikingjelly-2.0.0-groups": "export_to_nir/import_from_nir refuse grouped convolutions (target spikingjelly "
                                 "refuses them; input normalisation is written as an ungrouped 1x1 conv)",
    "spikingjelly-2.0.0-export-dt": "export_to_nir does not record dt in the graph (from_spikingjelly passes it)",
    "spikingjelly-2.0.0-export-maxpool": "export_to_nir fails on MaxPool2d (a TraceError) and refuses soft reset "
                                         "(from_spikingjelly falls back to spikeprune's to_nir, which reads "
                                         "SpikingJelly nets directly)",
}
__doc__ += "".join(f"\n* ``{k}``: {v};" for k, v in QUIRKS.items())


class Heaviside(nn.Module):
    """``Θ(x - threshold)`` as a float tensor: NIR's ``Threshold`` node (0/1 output, strict ``>``)."""

    def __init__(self, threshold: float):
        super().__init__()
        self.threshold = float(threshold)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x > self.threshold).to(x.dtype)


class KeepDtype(nn.Module):
    """Casts a module's output to its input's dtype: snnTorch 1.0.0's spike functions return ``.float()``, so a
    float64 net would meet float32 spikes at its next layer."""

    def __init__(self, module: nn.Module):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor):
        out = self.module(x)
        if isinstance(out, (tuple, list)):  # (spk, mem) of an output=True neuron
            return type(out)(o.to(x.dtype) for o in out)
        return out.to(x.dtype)


class StepRunner(nn.Module):
    """Run a ``nirtorch`` graph module (``forward(x, state) -> (out, state)``) over time like a zoo model:
    ``[B, ...]`` repeated ``T`` times (``T`` given) or ``[T, B, ...]`` (``T=None``) in, ``[T, B, ...]`` out.
    Neurons that keep their own state (snnTorch ``init_hidden=True``) are reset before every call."""

    def __init__(self, gm: nn.Module, T: int | None):
        super().__init__()
        self.gm = gm
        self.T = None if T is None else int(T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        reset_states(self.gm)
        steps = [x] * self.T if self.T is not None else list(x.unbind(0))
        state, outs = None, []
        for xt in steps:
            out, state = self.gm(xt, state)
            outs.append(out[0] if isinstance(out, (tuple, list)) else out)
        return torch.stack(outs)


def _meta(graph) -> dict:
    return dict(getattr(graph, "metadata", None) or {})


def _graph_dt(graph, dt: float | None, default: float) -> float:
    if dt is not None:
        return float(dt)
    m = _meta(graph)
    return float(np.asarray(m["dt"]).item()) if "dt" in m else default


def _graph_T(graph, T: int | None) -> int | None:
    if T is not None:
        return int(T)
    m = _meta(graph)
    return int(np.asarray(m["T"]).item()) if "T" in m else None


def _torch_flatten(n) -> nn.Flatten:
    """NIR dims are per sample; torch's Flatten sees the batch axis first."""
    s, e = int(n.start_dim), int(n.end_dim)
    return nn.Flatten(s + 1 if s >= 0 else s, e + 1 if e >= 0 else e)


def _linear(n, bias: bool) -> nn.Linear:
    w = torch.from_numpy(np.array(n.weight))
    m = nn.Linear(w.shape[1], w.shape[0], bias=bias).to(w.dtype)
    m.weight.data = w
    if bias:
        m.bias.data = torch.from_numpy(np.array(n.bias))
    return m


def _conv2d(n) -> nn.Conv2d:
    w = torch.from_numpy(np.array(n.weight))
    g = int(np.asarray(n.groups).item())
    ints = lambda a: tuple(int(v) for v in np.asarray(a).reshape(-1))  # noqa: E731
    m = nn.Conv2d(w.shape[1] * g, w.shape[0], tuple(w.shape[2:]), stride=ints(n.stride), padding=ints(n.padding),
                  dilation=ints(n.dilation), groups=g, bias=True).to(w.dtype)
    m.weight.data = w
    m.bias.data = torch.from_numpy(np.array(n.bias)).to(w.dtype)
    return m


def _pool_args(n) -> tuple:
    return tuple(tuple(int(v) for v in np.asarray(a).reshape(-1)) for a in (n.kernel_size, n.stride, n.padding))


# ------------------------------------------------------------------------------------------- to snnTorch
def to_snntorch(graph, T: int | None = None, dt: float | None = None, dtype: torch.dtype = torch.float32
                ) -> StepRunner:
    """snnTorch modules (``snn.Leaky(init_hidden=True)``, ``nn.Linear``/``Conv2d``/pooling) for a sequential NIR
    graph, wired by ``nirtorch.nir_to_torch`` and run over ``T`` steps (default: the graph's ``T``).

    Works around snnTorch 1.0.0's ``import_from_nir`` (see ``QUIRKS``): ``dt`` from the graph (else 1e-4), Flatten
    dims, SumPool2d/Threshold, IF, weight dtype. Refused with a ``ValueError``: reset by subtraction (snnTorch's
    subtract reset acts after the leak; spikeprune's and NIR's before), a reset or leak potential other than 0."""
    nir = _nir()
    import nirtorch
    import snntorch as snn

    if isinstance(graph, str) or hasattr(graph, "__fspath__"):
        graph = nir.read(str(graph))
    step = _graph_dt(graph, dt, SNNTORCH_DT)

    def leaky(n, key: str, r_dt_over_tau: np.ndarray, beta: float):
        if _meta_str(n, "reset") == "subtract":
            raise ValueError(f"to_snntorch: {key} resets by subtraction, which snnTorch's Leaky cannot express "
                             "(its subtract reset acts after the leak)")
        if not np.allclose(np.asarray(n.v_reset), 0.0):
            raise ValueError(f"to_snntorch: {key} resets to {_uniform(n.v_reset, 'v_reset', key)}; snnTorch resets "
                             "to 0 only")
        scale = _uniform(r_dt_over_tau, "r*dt/tau", key)
        th = _uniform(n.v_threshold, "v_threshold", key) / scale  # the state is kept 1/scale times larger
        # reset_delay=False: reset in the step that fires; 'zero' with it is exactly a hard reset to 0
        f64 = lambda v: torch.tensor(v, dtype=torch.float64)  # noqa: E731  (python floats become float32 buffers)
        return KeepDtype(snn.Leaky(beta=f64(beta), threshold=f64(th), reset_mechanism="zero", init_hidden=True,
                                   reset_delay=False))

    def map_lif(n):
        key = "LIF"
        if not np.allclose(np.asarray(n.v_leak), 0.0):
            raise ValueError("to_snntorch: a LIF leaks towards v_leak != 0; snnTorch's Leaky leaks towards 0")
        tau = _uniform(n.tau, "tau", key)
        return leaky(n, key, np.asarray(n.r, dtype=np.float64) * step / tau, 1.0 - step / tau)

    def map_if(n):  # snnTorch 1.0.0 import_from_nir: Leaky(beta=0.9) and assert r == 1
        return leaky(n, "IF", np.asarray(n.r, dtype=np.float64) * step, 1.0)

    node_map = {
        nir.Affine: lambda n: _linear(n, True),
        nir.Linear: lambda n: _linear(n, False),
        nir.Conv2d: _conv2d,
        nir.Flatten: _torch_flatten,  # snnTorch 1.0.0: nn.Flatten(node.start_dim) flattens the batch
        nir.AvgPool2d: lambda n: nn.AvgPool2d(*_pool_args(n)),
        nir.SumPool2d: lambda n: nn.AvgPool2d(*_pool_args(n), divisor_override=1),  # unmapped in snnTorch 1.0.0
        nir.Threshold: lambda n: Heaviside(_uniform(n.threshold, "threshold", "Threshold")),  # unmapped too
        nir.LIF: map_lif,
        nir.IF: map_if,
    }
    gm = nirtorch.nir_to_torch(graph, node_map, dtype=dtype)
    return StepRunner(gm.to(dtype), _graph_T(graph, T))


# ---------------------------------------------------------------------------------------- to SpikingJelly
def to_spikingjelly(graph, T: int | None = None, dt: float | None = None, dtype: torch.dtype = torch.float32
                    ) -> StepRunner:
    """SpikingJelly modules for a sequential NIR graph: SpikingJelly 2.0.0's own node mappings
    (``nir_exchange.from_nir._NodeMapper``) with ``dt`` from the graph (else 1e-4), plus SumPool2d/Threshold
    (max pooling of spikes) and reset by subtraction (``v_reset=None``) for nodes marked ``reset: subtract``, both
    of which its ``import_from_nir`` lacks. Runs single-step modules over ``T`` steps."""
    nir = _nir()
    import nirtorch
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.nir_exchange import from_nir as sj_from_nir

    if isinstance(graph, str) or hasattr(graph, "__fspath__"):
        graph = nir.read(str(graph))
    mapper = sj_from_nir._NodeMapper(dt=_graph_dt(graph, dt, SPIKINGJELLY_DT))
    node_map = dict(mapper.map_dict)

    def soft(fn):
        def make(n):
            m = fn(n)
            if _meta_str(n, "reset") == "subtract":  # SpikingJelly 2.0.0 import_from_nir: always hard
                m.module.v_reset = None
            return m
        return make

    node_map[nir.LIF] = soft(mapper.map_lif)
    node_map[nir.IF] = soft(mapper.map_if)
    node_map[nir.SumPool2d] = lambda n: nn.AvgPool2d(*_pool_args(n), divisor_override=1)
    node_map[nir.Threshold] = lambda n: Heaviside(_uniform(n.threshold, "threshold", "Threshold"))
    gm = nirtorch.nir_to_torch(graph, node_map, dtype=dtype)
    functional.set_step_mode(gm, "s")
    return StepRunner(gm.to(dtype), _graph_T(graph, T))


# ------------------------------------------------------------------------------------------ from snnTorch
def _snntorch_reset_check(net: nn.Module) -> None:
    """Refuse snnTorch neurons whose dynamics the exported graph does not carry."""
    for name, m in net.named_modules():
        if framework_of(m) != "snntorch":
            continue
        kind = type(m).__name__
        if kind != "Leaky":
            raise ValueError(f"from_snntorch: {name} is snn.{kind}; only snn.Leaky maps to a spikeprune neuron")
        mech = getattr(m, "reset_mechanism", "subtract")
        if mech != "zero":
            raise ValueError(f"from_snntorch: {name} uses reset_mechanism={mech!r}: snnTorch 1.0.0's export_to_nir "
                             "writes it as a reset to 0, and its subtract reset (after the leak) has no NIR or "
                             "spikeprune form; use reset_mechanism='zero'")
        if float(torch.as_tensor(m.graded_spikes_factor).reshape(-1)[0]) != 1.0 or m.inhibition:
            raise ValueError(f"from_snntorch: {name} uses graded spikes or inhibition, which NIR cannot express")


@torch.no_grad()
def _module_inputs(net: nn.Module, sample: torch.Tensor) -> dict[str, tuple[int, ...]]:
    """Per-sample input shape of every submodule on ``sample`` (forward hooks; neuron state reset after)."""
    shapes: dict[str, tuple[int, ...]] = {}
    def hook(name):
        def record(mod, inp, out):
            shapes.setdefault(name, tuple(inp[0].shape[1:]))  # returns None: the output stays
        return record

    hooks = [m.register_forward_hook(hook(name)) for name, m in net.named_modules() if name]
    try:
        reset_states(net)
        net(sample)
    finally:
        for h in hooks:
            h.remove()
        reset_states(net)
    return shapes


def snntorch_graph(net: nn.Module, sample: torch.Tensor):
    """snnTorch 1.0.0's ``export_to_nir(net, sample)`` made readable: when its final ``infer_types()`` fails
    (nir 1.0.8: Flatten and Conv2d are written without input types), the same graph without it; then the batch
    axis is dropped from the Input/Output types, the missing types filled in from a forward pass, and ``dt``
    (1e-4, hard-coded by snnTorch) recorded."""
    nir = _nir()
    import nirtorch
    import snntorch as snn
    from snntorch import export_nir

    _snntorch_reset_check(net)
    # snnTorch 1.0.0 spikes are float32 whatever the input, so a float64 net cannot run its own forward: trace a
    # float32 copy and take the parameters from the net itself below
    traced = copy.deepcopy(net).float()
    sample32 = sample.float()
    shapes = _module_inputs(traced, sample32)  # first: nirtorch's tracer leaves the modules unusable
    try:
        graph = export_nir.export_to_nir(traced, sample32)
    except Exception:  # noqa: BLE001 -- snnTorch 1.0.0 + nir 1.0.8: infer_types() fails (ValueError, IndexError)
        graph = nirtorch.extract_nir_graph(traced, export_nir._extract_snntorch_module, sample32,
                                           model_name="snntorch", ignore_submodules_of=[snn.RLeaky, snn.RSynaptic])
    modules = dict(net.named_modules())
    nodes = dict(graph.nodes)
    for key, n in nodes.items():
        m = modules.get(key)
        if isinstance(m, (nn.Linear, nn.Conv2d)):  # full precision from the net
            n.weight = m.weight.detach().cpu().numpy()
            if m.bias is not None:
                n.bias = m.bias.detach().cpu().numpy()
        elif type(m).__name__ == "Leaky" and type(n).__name__ == "LIF" and key in shapes:
            # snnTorch 1.0.0 writes scalar parameters (no neuron shape: nir 1.0.8's type check fails) from the
            # float32 copy: rewritten per neuron, in float64, from the net, as its exporter computes them
            full = lambda v, shape=shapes[key]: np.broadcast_to(np.asarray(v, np.float64), shape).copy()  # noqa: E731
            beta = full(m.beta.detach().cpu().double().numpy())
            with np.errstate(divide="ignore"):
                tau = SNNTORCH_DT / (1.0 - beta)
            nodes[key] = nir.LIF(tau=tau, r=tau / SNNTORCH_DT, v_leak=full(0.0), v_reset=full(0.0),
                                 v_threshold=full(m.threshold.detach().cpu().double().numpy()),
                                 metadata={"reset": "hard"})
        kind = type(n).__name__
        if kind == "Input":
            shape = np.asarray(n.input_type["input"]).tolist()
            if len(shape) == sample.dim():  # snnTorch 1.0.0 writes the sample's batch axis
                shape = shape[1:]
            nodes[key] = nir.Input(input_type={"input": np.array(shape)})
        elif kind == "Output":
            shape = np.asarray(n.output_type["output"]).tolist()
            if shape and len(shape) > 1 and shape[0] == sample.shape[0]:
                shape = shape[1:]
            nodes[key] = nir.Output(output_type={"output": np.array(shape)})
        elif kind == "Flatten" and key in shapes:
            nodes[key] = nir.Flatten(input_type={"input": np.array(shapes[key])}, start_dim=int(n.start_dim),
                                     end_dim=int(n.end_dim))
        elif kind == "Conv2d" and key in shapes and n.input_shape is None:
            nodes[key] = nir.Conv2d(input_shape=shapes[key][1:], weight=n.weight, stride=n.stride, padding=n.padding,
                                    dilation=n.dilation, groups=n.groups, bias=n.bias)
        elif kind in ("LIF", "IF", "CubaLIF"):
            n.metadata = {**(n.metadata or {}), "reset": "hard"}  # checked by _snntorch_reset_check
    meta = {**_meta(graph), "dt": SNNTORCH_DT, "producer": "snntorch export_to_nir (repaired by spikeprune)"}
    return nir.NIRGraph(nodes=nodes, edges=list(graph.edges), metadata=meta)


def from_snntorch(net: nn.Module, sample: torch.Tensor, T: int | None = None) -> nn.Module:
    """A spikeprune model from a single-step snnTorch net (``nn.Sequential`` of ``nn.Linear``/``Conv2d``/
    ``AvgPool2d``/``Flatten`` and ``snn.Leaky(init_hidden=True, reset_mechanism='zero')``), through snnTorch's own
    ``export_to_nir`` (:func:`snntorch_graph`). ``net`` may be a
    :class:`spikeprune.adapters.snntorch.SnnTorchSequence` (its ``T`` is used). ``sample``: one step's input
    ``[B, ...]``. The result repeats a static input ``T`` times, like the zoo models and ``SnnTorchSequence``."""
    if T is None and hasattr(net, "net") and hasattr(net, "T"):
        T = net.T
    inner = net.net if hasattr(net, "net") and hasattr(net, "readout") else net
    graph = snntorch_graph(inner, sample)
    return from_nir(graph, T=T or 4, dt=SNNTORCH_DT)


# -------------------------------------------------------------------------------------- from SpikingJelly
def from_spikingjelly(net: nn.Module, example_input: torch.Tensor, T: int | None = None,
                      dt: float = SPIKINGJELLY_DT, fallback: bool = True) -> nn.Module:
    """A spikeprune model from a SpikingJelly net through SpikingJelly 2.0.0's own ``export_to_nir`` (hard reset
    only, as it refuses soft reset; :func:`spikeprune.export.nir.to_nir` reads SpikingJelly nets directly and
    keeps soft reset). ``example_input``: ``[T, B, ...]`` for a multi-step net (``T`` taken from it), ``[B, ...]``
    for a single-step one. Its graph does not record ``dt``; pass the one it was exported with. Where its exporter
    fails (max pooling, soft reset: SpikingJelly 2.0.0), ``fallback`` uses :func:`spikeprune.export.nir.to_nir`
    on the net instead."""
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.nir_exchange import export_to_nir

    if not math.isfinite(dt) or dt <= 0:
        raise ValueError(f"dt must be > 0, got {dt}")
    multi = any(getattr(m, "step_mode", "s") == "m" for m in net.modules())
    if T is None:
        T = int(example_input.shape[0]) if multi else 4
    try:
        graph = export_to_nir(net, example_input, dt=dt)
    except Exception as e:  # noqa: BLE001
        # SpikingJelly 2.0.0's export_to_nir has no MaxPool2d mapping (its tracer fails: "symbolically traced
        # variables cannot be used as inputs to control flow") and refuses soft reset; spikeprune's own
        # exporter reads SpikingJelly nets directly (max pooling of spikes, soft reset included)
        if not fallback:
            raise
        from .nir import to_nir

        try:
            graph = to_nir(net, example_input, dt=dt)
        except ValueError as e2:
            raise ValueError(f"from_spikingjelly: SpikingJelly's export_to_nir failed ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''}) and so did spikeprune's ({e2})") from None
    finally:
        functional.reset_net(net)
    return from_nir(graph, T=T, dt=dt)
