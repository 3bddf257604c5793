"""Calibration, the converted IF network (:class:`ConvertedSNN`) and its evaluation over time steps."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from .. import layers as L
from ..models._base import SpikingModel
from ..neurons import IF, is_neuron
from .ann import _BN, _SYN, _device_of, _torch_layer, fold_bn


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
    from ..measure import effective_weights

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
    from ..graph import unit_index

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
