"""Event-driven inference for unstructured-sparse SNNs: compute only with the weights that matter.

A spiking layer's input is binary and mostly zero, and a pruned layer's weights are mostly zero. A dense
``F.linear`` ignores both. :class:`EventLinear` and :class:`EventConv2d` are drop-in replacements (subclasses of
the project's ``Linear``/``Conv2d``, so ``isinstance(m, nn.Linear)`` still holds) that can run one of several
paths, all giving the dense result up to float rounding:

=========  =========================================================================  ==========================
mode       what it computes                                                           uses the sparsity of
=========  =========================================================================  ==========================
``dense``  ``F.linear`` / ``F.conv2d`` (BLAS, oneDNN, cuBLAS)                         nothing
``csr``    CSR weight times the input (``torch.sparse.mm``), Linear only              weights
``gather`` the sum of the weight columns of the inputs that spiked                    input spikes
           (``F.embedding_bag``), Linear only
``event``  every spike adds only the non-zero weights of its input (scatter-add):      spikes and weights
           the work is exactly the effective synaptic operations (SOPs); on CPU, a
           multi-step input whose units mostly keep firing adds only the *changes*
           from one step to the next to the previous step's output
=========  =========================================================================  ==========================

``mode="auto"`` (default) times the candidate paths once per *(input shape, input-rate bucket)* on the real input
(the first call with a new shape or rate, or :meth:`calibrate`) and keeps the fastest one for that key; the
layer's density is fixed, so this chooses per layer, batch size, density and input rate. The timings are kept in
``layer.calibration`` and the choices in ``layer.choice``; ``layer.last_mode`` says which path the last call took.

The sparse paths run only when no gradient is needed (under ``torch.no_grad()`` / ``torch.inference_mode()``, or
with inputs and weights that do not require grad); otherwise the layer is an ordinary dense layer, so training
through it is unchanged. Their index structures are built lazily and rebuilt when the weights change.

:func:`to_event_driven` returns an inference copy of a model with masks folded (via :func:`~spikeprune.compact`)
and every synaptic layer whose input is spikes swapped for its event-driven version; an analog-input Linear layer
(direct encoding) may only use its sparse weights (``dense`` or ``csr``), and an analog-input conv stays dense.

On CPU the ``event`` and ``csr`` paths of :class:`EventLinear` run as one call each into the compiled kernels of
:mod:`spikeprune._ext` (eager PyTorch when they are unavailable): at batch 1 the eager paths spend most of their time
launching small kernels.

What to expect: on a CPU, event-driven paths win at small batches and low rates and densities (batch 1: the
dense kernel is memory-bound on the whole weight matrix); at large batches dense BLAS usually wins, which ``auto``
finds out by itself. Event-driven convolution is exact but rarely faster than oneDNN on a CPU; it exists so that
the SOP count of a conv layer is also executable work, and so ``auto`` can be asked.
"""

from __future__ import annotations

import math
import time
import warnings
from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from . import layers
from .graph import probe
from .kernels import kernels_for
from .neurons import BaseNeuron, _coeffs, unit_gate

__all__ = ["EventLinear", "EventConv2d", "EventChain", "to_event_driven", "event_layers", "event_report",
           "check_network", "compile_chain", "LINEAR_MODES", "CONV_MODES"]

LINEAR_MODES = ("dense", "csr", "gather", "event")
CONV_MODES = ("dense", "event")
_ANALOG_PATHS = ("auto", "dense", "csr")  # what a Linear layer with analog (non-spike) input gets: weight sparsity
_CHUNK = 1 << 22  # scatter-add at most this many (spike, weight) pairs at once (bounded temporary memory)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rate_bucket(x: torch.Tensor) -> int:
    """Half-octave bucket of the fraction of non-zero inputs (-99: no input at all)."""
    nz = int(torch.count_nonzero(x))
    if nz == 0:
        return -99
    return math.floor(2 * math.log2(nz / x.numel()))


def _ell(rows: torch.Tensor, cols: torch.Tensor, n_rows: int, *payload: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Pack the entries ``(rows[j], cols[j], payload[j])`` (sorted by row) into ``[n_rows, K]`` tables, K the
    largest row count; padding entries hold index 0 and value 0 (they add 0.0 somewhere harmless)."""
    counts = torch.bincount(rows, minlength=n_rows)
    K = max(1, int(counts.max())) if rows.numel() else 1
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - start[rows]
    out = []
    for p in (cols, *payload):
        t = torch.zeros((n_rows, K), dtype=p.dtype, device=p.device)
        t[rows, pos] = p
        out.append(t)
    return tuple(out)


class _EventMixin(layers.WeightCached):
    """Mode handling, calibration and the weight-structure cache shared by the event layers."""

    MODES: tuple[str, ...] = ()

    def _init_event(self, mode: str, repeats: int, paths: Iterable[str] | None = None) -> None:
        self.paths = tuple(self.MODES if paths is None else paths)
        if not self.paths or any(p not in self.MODES for p in self.paths):
            raise ValueError(f"paths must be a non-empty subset of {self.MODES}, got {self.paths}")
        if mode != "auto" and mode not in self.paths:
            raise ValueError(f"mode must be 'auto' or one of {self.paths}, got {mode!r}")
        if int(repeats) < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        self.mode = mode
        self.repeats = int(repeats)
        self.calibration: dict[tuple, dict[str, float]] = {}
        self.choice: dict[tuple, str] = {}
        self.last_mode: str | None = None
        self.last_key: tuple | None = None  # the (shape, rate bucket) key of the last auto call
        self.dense_shapes: set[tuple] = set()  # input shapes check_network gave to dense: no key is computed
        self._struct: dict | None = None
        self._struct_key: tuple | None = None

    # ------------------------------------------------------------------------------------- structures
    def _drop_caches(self) -> None:
        self._struct_key = None
        super()._drop_caches()

    def _weight_key(self) -> tuple:
        w = self.weight  # a new device, dtype or shape is a new storage: its address and version say it all
        return (w.data_ptr(), w._version)

    def _structures(self) -> dict:
        key = self._weight_key()
        if self._struct is None or self._struct_key != key:
            with torch.no_grad():
                self._struct = self._build(self.weight.detach())
            self._struct_key = key
        return self._struct

    def __getstate__(self) -> dict:
        # copies and pickles leave the index structures out; they are rebuilt on first use
        state = self.__dict__.copy()
        state["_struct"] = state["_struct_key"] = None
        return state

    @property
    def density(self) -> float:
        """Fraction of non-zero weights."""
        return float(torch.count_nonzero(self.weight)) / max(1, self.weight.numel())

    # ---------------------------------------------------------------------------------------- dispatch
    def _needs_grad(self, x: torch.Tensor) -> bool:
        return torch.is_grad_enabled() and (x.requires_grad or self.weight.requires_grad
                                            or (self.bias is not None and self.bias.requires_grad))

    def _key(self, x: torch.Tensor) -> tuple:
        return (tuple(x.shape), _rate_bucket(x))

    def _run(self, x: torch.Tensor, mode: str) -> torch.Tensor:
        if mode == "dense":
            return self._dense(x)
        return getattr(self, f"_{mode}")(x, self._structures())

    def _dispatch(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "dense" or self._needs_grad(x) or (self.dense_shapes and x.shape in self.dense_shapes):
            self.last_mode = "dense"
            return self._dense(x)
        if self.mode != "auto":
            self.last_mode = self.mode
            return self._run(x, self.mode)
        key = self.last_key = self._key(x)
        mode = self.choice.get(key)
        if mode is None:
            return self._calibrate(x)
        self.last_mode = mode
        return self._run(x, mode)

    @torch.no_grad()
    def calibrate(self, x: torch.Tensor, modes: Iterable[str] | None = None) -> torch.Tensor:
        """Time every path (or ``modes``) on the layer input ``x`` (best of ``repeats`` runs after one warm-up; a
        path still 10x slower than the best so far after two runs is not run again), remember the fastest for
        ``x``'s key (shape, rate bucket) and return the layer's output. ``auto`` calls it by itself on every new
        key; calling it directly re-times a key."""
        x2, restore = self._flat(x)
        return restore(self._calibrate(x2, modes))

    @torch.no_grad()
    def _calibrate(self, x: torch.Tensor, modes: Iterable[str] | None = None) -> torch.Tensor:
        key = self._key(x)
        self._structures()
        times: dict[str, float] = {}
        best_out = None
        for mode in (self.paths if modes is None else tuple(modes)):
            y = self._run(x, mode)  # warm-up
            best = math.inf
            for i in range(self.repeats):
                _sync(x.device)
                t0 = time.perf_counter()
                y = self._run(x, mode)
                _sync(x.device)
                best = min(best, time.perf_counter() - t0)
                if i >= 1 and best > 10 * min(times.values(), default=math.inf):
                    break
            times[mode] = best
            if best <= min(times.values()):
                best_out = y
        choice = min(times, key=times.get)
        self.calibration[key] = times
        self.choice[key] = choice
        self.last_mode = choice
        return best_out

    def _event_repr(self) -> str:
        return f"mode={self.mode!r}" + ("" if self.paths == self.MODES else f", paths={self.paths}")


class EventLinear(_EventMixin, layers.Linear):
    """``nn.Linear`` with event-driven inference paths (see the module docstring); ``mode`` is ``"auto"``,
    ``"dense"``, ``"csr"``, ``"gather"`` or ``"event"``; ``repeats`` timed runs per path in calibration; ``paths``
    limits the paths ``auto`` chooses from (default all)."""

    MODES = LINEAR_MODES

    def __init__(self, in_features: int, out_features: int, bias: bool = True, mode: str = "auto",
                 repeats: int = 3, device=None, dtype=None, paths: Iterable[str] | None = None):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self._init_event(mode, repeats, paths)

    @classmethod
    def from_linear(cls, linear: nn.Linear, mode: str = "auto", repeats: int = 3,
                    paths: Iterable[str] | None = None) -> EventLinear:
        """An ``EventLinear`` sharing ``linear``'s parameters (a ``weight_mask`` must be folded in first:
        :func:`to_event_driven` does it)."""
        if getattr(linear, "weight_mask", None) is not None:
            raise ValueError("fold the connection mask into the weights first (spikeprune.compact or "
                             "MaskEngine.remove); to_event_driven does both")
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, mode=mode, repeats=repeats,
                  device="meta", paths=paths)
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # input shapes check_network kept dense: straight to F.linear (the general dispatch costs ~10 us a call)
        if self.dense_shapes and x.dim() and (x.numel() // max(1, x.shape[-1]), x.shape[-1]) in self.dense_shapes:
            self.__dict__["last_mode"] = "dense"  # a plain attribute: skips nn.Module.__setattr__'s checks
            return F.linear(x, self.weight, self.bias)
        x2, restore = self._flat(x)
        return restore(self._dispatch(x2))

    def _flat(self, x: torch.Tensor):
        lead = x.shape[:-1]
        # the steps of a multi-step [T, B, in] input, for the event path's temporal differences
        self.__dict__["_steps"] = x.shape[0] if x.dim() >= 3 else 1
        return x.reshape(-1, self.in_features), lambda y: y.reshape(*lead, self.out_features)

    # ---------------------------------------------------------------------------------------- the paths
    def _dense(self, x2: torch.Tensor) -> torch.Tensor:
        return F.linear(x2, self.weight, self.bias)

    def _build(self, w: torch.Tensor) -> dict:
        with warnings.catch_warnings():  # "sparse CSR support is in beta"
            warnings.simplefilter("ignore", UserWarning)
            csr = w.to_sparse_csr()
        cols, rows = (w != 0).t().nonzero(as_tuple=True)  # (input i, output o), sorted by input
        out_idx, vals = _ell(cols, rows, self.in_features, w[rows, cols])
        colptr = torch.cat([cols.new_zeros(1), torch.bincount(cols, minlength=self.in_features).cumsum(0)])
        return {"csr": csr, "wt": w.t().contiguous(), "ell_idx": out_idx, "ell_val": vals,
                # plain CSR/CSC arrays for the compiled kernels (int64 indices)
                "csr_arrays": (csr.crow_indices().long(), csr.col_indices().long(), csr.values()),
                "csc_arrays": (colptr, rows, w[rows, cols].contiguous())}

    def _bias(self, y: torch.Tensor) -> torch.Tensor:
        return y if self.bias is None else y.add_(self.bias)

    def _compiled(self, x2: torch.Tensor):
        """The compiled CPU kernels when they can take ``x2`` (see :mod:`spikeprune._ext`), else ``None``."""
        return kernels_for(x2) if x2.dtype == self.weight.dtype else None

    def _csr(self, x2: torch.Tensor, st: dict) -> torch.Tensor:
        ext = self._compiled(x2)
        if ext is not None:  # one call: each output row's non-zero weights times the input
            return ext.csr_linear(x2.contiguous(), *st["csr_arrays"], self.bias, self.out_features)
        return self._bias(torch.sparse.mm(st["csr"], x2.t()).t().contiguous())

    @staticmethod
    def _spikes(x2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Row, column and (for non-binary inputs) value of every non-zero input, sorted by row."""
        r, c = x2.nonzero(as_tuple=True)
        v = x2[r, c]
        return r, c, (None if bool((v == 1).all()) else v)

    def _gather(self, x2: torch.Tensor, st: dict) -> torch.Tensor:
        r, c, v = self._spikes(x2)
        counts = torch.bincount(r, minlength=x2.shape[0])
        offsets = torch.cumsum(counts, 0) - counts
        y = F.embedding_bag(c, st["wt"], offsets, mode="sum", per_sample_weights=v)
        return self._bias(y)

    def _event(self, x2: torch.Tensor, st: dict) -> torch.Tensor:
        ext = self._compiled(x2)
        if ext is not None:  # one call: every non-zero input (or change of an input) adds its column's weights
            steps = self.__dict__.get("_steps", 1)
            return ext.event_linear(x2.contiguous(), *st["csc_arrays"], self.bias, self.out_features,
                                    steps if x2.shape[0] % steps == 0 else 1)
        r, c, v = self._spikes(x2)
        n_out = self.out_features
        y = torch.zeros(x2.shape[0] * n_out, dtype=x2.dtype, device=x2.device)
        idx, val = st["ell_idx"], st["ell_val"]
        step = max(1, _CHUNK // idx.shape[1])
        for i in range(0, r.numel(), step):
            rr, cc = r[i:i + step], c[i:i + step]
            tgt = idx.index_select(0, cc).add_((rr * n_out).unsqueeze(1))
            w = val.index_select(0, cc)
            if v is not None:
                w.mul_(v[i:i + step].unsqueeze(1))
            y.scatter_add_(0, tgt.flatten(), w.flatten())
        return self._bias(y.view(x2.shape[0], n_out))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._event_repr()


class EventConv2d(_EventMixin, layers.Conv2d):
    """``Conv2d`` (``[T, B, C, H, W]`` or ``[B, C, H, W]``) with an event-driven path: every input spike at
    ``(c, y, x)`` adds the non-zero taps of input channel ``c`` to the outputs it reaches. ``mode`` is ``"auto"``,
    ``"dense"`` or ``"event"``. Needs ``groups=1``, zero padding given as numbers."""

    MODES = CONV_MODES

    def __init__(self, *args, mode: str = "auto", repeats: int = 3, **kw):
        super().__init__(*args, **kw)
        if self.groups != 1 or self.padding_mode != "zeros" or isinstance(self.padding, str):
            raise ValueError("EventConv2d needs groups=1 and numeric zero padding")
        self._init_event(mode, repeats)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, mode: str = "auto", repeats: int = 3) -> EventConv2d:
        """An ``EventConv2d`` sharing ``conv``'s parameters (fold any ``weight_mask`` first)."""
        if getattr(conv, "weight_mask", None) is not None:
            raise ValueError("fold the connection mask into the weights first (spikeprune.compact or "
                             "MaskEngine.remove); to_event_driven does both")
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding, conv.dilation,
                  conv.groups, conv.bias is not None, conv.padding_mode, mode=mode, repeats=repeats, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        return new

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if x.dim() != 4:  # unbatched [C, H, W]
            return super()._conv_forward(x, weight, bias)
        return self._dispatch(x)

    def _dense(self, x: torch.Tensor) -> torch.Tensor:
        return super()._conv_forward(x, self.weight, self.bias)

    def _flat(self, x: torch.Tensor):
        if x.dim() == 5:  # [T, B, C, H, W]
            T = x.shape[0]
            return x.flatten(0, 1), lambda y: y.unflatten(0, (T, -1))
        return x, lambda y: y

    def _out_hw(self, h: int, w: int) -> tuple[int, int]:
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = self.kernel_size, self.stride, self.padding, self.dilation
        return (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1

    def _build(self, w: torch.Tensor) -> dict:
        c, o, ky, kx = (w != 0).permute(1, 0, 2, 3).nonzero(as_tuple=True)  # taps sorted by input channel
        ph, pw = self.padding
        dh, dw = self.dilation
        # output row of an input spike at row iy through tap ky: (iy + ph - ky * dh) / sh
        return dict(zip(("o", "dy", "dx", "val"),
                        _ell(c, o, self.in_channels, ph - ky * dh, pw - kx * dw, w[o, c, ky, kx])))

    def _event(self, x: torch.Tensor, st: dict) -> torch.Tensor:
        N, _, H, W = x.shape
        Ho, Wo = self._out_hw(H, W)
        sh, sw = self.stride
        C_out = self.out_channels
        n, c, iy, ix = x.nonzero(as_tuple=True)
        v = x[n, c, iy, ix]
        v = None if bool((v == 1).all()) else v
        size = N * C_out * Ho * Wo
        y = torch.zeros(size + 1, dtype=x.dtype, device=x.device)  # the last slot takes taps that fall outside
        step = max(1, _CHUNK // st["o"].shape[1])
        for i in range(0, n.numel(), step):
            cc = c[i:i + step]
            oy = st["dy"].index_select(0, cc).add_(iy[i:i + step].unsqueeze(1))
            ox = st["dx"].index_select(0, cc).add_(ix[i:i + step].unsqueeze(1))
            ok = (oy >= 0) & (ox >= 0)
            if sh != 1:
                ok &= oy.remainder(sh) == 0
                oy = oy.div_(sh, rounding_mode="floor")
            if sw != 1:
                ok &= ox.remainder(sw) == 0
                ox = ox.div_(sw, rounding_mode="floor")
            ok &= (oy < Ho) & (ox < Wo)
            tgt = st["o"].index_select(0, cc).add_(n[i:i + step].unsqueeze(1) * C_out)
            tgt = torch.where(ok, tgt.mul_(Ho).add_(oy).mul_(Wo).add_(ox), size)
            w = st["val"].index_select(0, cc)
            if v is not None:
                w = w * v[i:i + step].unsqueeze(1)
            y.scatter_add_(0, tgt.flatten(), w.flatten())
        y = y[:size].view(N, C_out, Ho, Wo)
        return y if self.bias is None else y.add_(self.bias.view(1, -1, 1, 1))

    def extra_repr(self) -> str:
        return super().extra_repr() + ", " + self._event_repr()


# ------------------------------------------------------------------------------------------- model swap
def _eligible(m: nn.Module) -> bool:
    if type(m) in (EventLinear, EventConv2d):
        return False
    if isinstance(m, nn.Linear):
        return True
    return (isinstance(m, nn.Conv2d) and m.groups == 1 and m.padding_mode == "zeros"
            and not isinstance(m.padding, str))


@torch.no_grad()
def _spiking_inputs(model: nn.Module, x: torch.Tensor, names: list[str]) -> set[str]:
    """Names of the layers whose input was binary (0/1) in one forward of ``x``."""
    modules = dict(model.named_modules())
    binary: dict[str, bool] = {}
    hooks = []
    for n in names:
        def hook(mod, inputs, n=n):
            t = inputs[0]
            binary[n] = binary.get(n, True) and bool(((t == 0) | (t == 1)).all())
        hooks.append(modules[n].register_forward_pre_hook(hook))
    probe(model, x, hooks)
    return {n for n, b in binary.items() if b}


def to_event_driven(model: nn.Module, mode: str = "auto", example_input: torch.Tensor | None = None,
                    layers: Iterable[str] | None = None, repeats: int = 3) -> nn.Module:
    """Return an inference copy of ``model`` whose spiking-input Linear/Conv2d layers are event-driven.

    The copy is :func:`~spikeprune.compact` of the model (connection masks folded into the weights, dead units
    removed, no hooks), in eval mode. ``layers`` names the layers to swap; by default every Linear and
    (groups=1) Conv2d whose input is binary in one forward of ``example_input`` (default
    ``model.example_input(2)``). A Linear layer with analog input (the direct-encoded first layer) can still use
    its weights' sparsity: with ``mode`` ``"auto"`` or ``"csr"`` it becomes an ``EventLinear`` limited to the
    ``dense`` and ``csr`` paths; with the input-driven modes it stays dense. Without any example input, every
    such layer but the first is swapped. ``mode``/``repeats`` go to each new layer."""
    from .compact import compact

    if example_input is None and hasattr(model, "example_input"):
        example_input = model.example_input(2)
    new = compact(model, example_input)
    modules = dict(new.named_modules())
    candidates = [n for n, m in modules.items() if n and _eligible(m)]
    if layers is not None:
        chosen = list(layers)
        bad = [n for n in chosen if n not in candidates]
        if bad:
            raise ValueError(f"not swappable Linear/Conv2d layers: {bad}; candidates are {candidates}")
    elif example_input is not None:
        x = example_input.to(next(new.parameters()).device)
        spiking = _spiking_inputs(new, x, candidates)
        chosen = [n for n in candidates if n in spiking
                  or (mode in _ANALOG_PATHS and isinstance(modules[n], nn.Linear))]
    else:
        spiking = set(candidates[1:])
        chosen = candidates[1:]
    for name in chosen:
        m = modules[name]
        paths = None if (layers is not None or name in spiking) else _ANALOG_PATHS[1:]
        swap = (EventLinear.from_linear(m, mode, repeats, paths) if isinstance(m, nn.Linear)
                else EventConv2d.from_conv(m, mode, repeats))
        parent_name, _, attr = name.rpartition(".")
        setattr(modules[parent_name] if parent_name else new, attr, swap)
    new.eval()
    return new


@torch.no_grad()
def check_network(model: nn.Module, inputs: Iterable[torch.Tensor], rounds: int = 5) -> dict:
    """Hold ``auto`` to "never slower than dense" for the whole network on ``inputs`` (batches of one shape).

    Each layer's choice is timed on its own; in the network it can still lose to dense (a path timed back-to-back
    on one layer runs with warmer caches than it does in the network, and Python dispatch adds up). So the whole
    network is timed against every event layer forced dense. When dense wins, each layer is tried on its own: the
    network with that layer's choices against the same network with that layer dense (the others as chosen so
    far); a layer that does not win goes dense, so one layer that loses does not cost the others their gain. A
    last network duel then sends every layer dense if dense still wins. Each duel takes ``rounds`` interleaved
    rounds (median); a layer that goes dense gets ``dense`` for every key these inputs reached. Returns
    ``{"auto_s": ..., "dense_s": ..., "kept": "auto" | "dense", "layers": {layer: (its choices' s, dense s)},
    "keys": {layer: keys seen}}`` (seconds per pass over ``inputs``; ``layers``: the per-layer duels, if any)."""
    inputs = list(inputs)
    layers = event_layers(model)
    seen: dict[str, set] = {n: set() for n in layers}
    for x in inputs:  # the layers calibrate the keys they have not seen
        model(x)
        for n, m in layers.items():
            if m.mode == "auto" and m.last_key is not None:
                seen[n].add(m.last_key)
    modes = {n: m.mode for n, m in layers.items()}

    def duel(dense: list[str]) -> tuple[float, float]:
        """Median seconds per pass: the layers as chosen, and with those in ``dense`` forced dense."""
        times: dict[bool, list[float]] = {False: [], True: []}
        for r in range(rounds):
            for forced in ((False, True) if r % 2 == 0 else (True, False)):
                for n in dense:
                    layers[n].mode = "dense" if forced else modes[n]
                t0 = time.perf_counter()
                for x in inputs:
                    model(x)
                _sync(inputs[0].device)
                times[forced].append(time.perf_counter() - t0)
        for n in dense:
            layers[n].mode = modes[n]
        return tuple(sorted(v)[len(v) // 2] for v in (times[False], times[True]))

    def to_dense(names: Iterable[str]) -> None:  # for these input shapes, whatever their rates
        for n in names:
            for k in seen[n]:
                layers[n].choice[k] = "dense"
                layers[n].dense_shapes.add(torch.Size(k[0]))

    per_layer = {}
    auto_s, dense_s = duel(list(layers))
    if auto_s > dense_s:
        for n, m in layers.items():
            if modes[n] == "auto" and any(m.choice.get(k) != "dense" for k in seen[n]):
                per_layer[n] = duel([n])
                if per_layer[n][1] < per_layer[n][0]:
                    to_dense([n])
        if per_layer:
            auto_s, dense_s = duel(list(layers))
    kept = "auto" if auto_s <= dense_s else "dense"
    if kept == "dense":
        to_dense(layers)
    return {"auto_s": auto_s, "dense_s": dense_s, "kept": kept, "layers": per_layer, "keys": seen}


class EventChain(layers.WeightCached, nn.Module):
    """A ``Sequential`` of Flatten / Repeat / Linear / LIF-IF layers run as **one** call into the compiled CPU
    kernels, each Linear on a fixed path (``dense``, ``csr`` or ``event``).

    At batch 1 the event-driven work of a sparse fc layer is tens of microseconds, about what Python spends
    launching a layer; this removes the launches. It runs only for inference on CPU float tensors (no grad, no
    neuron observers); otherwise, or without the compiled kernels, the wrapped layers run as usual. Build it with
    :func:`compile_chain`."""

    def __init__(self, body: nn.Sequential, paths: dict[str, str]):
        super().__init__()
        self.body = body
        self.paths = dict(paths)
        for name, m in body.named_children():
            _chain_op(name, m, self.paths.get(name, "dense"))  # raises on what the chain cannot run
        self._ops: tuple | None = None
        self._ops_key: tuple | None = None
        self._id: tuple | None = None  # (extension, id of the ops registered on its side)
        self._params = list(body.parameters())
        self._neurons = [m for m in body if isinstance(m, BaseNeuron)]

    def _drop_caches(self) -> None:
        self._ops_key = None

    def _layer_keys(self) -> tuple:
        return tuple((p.data_ptr(), p._version) for p in self._params)

    def _build_ops(self) -> tuple:
        key = self._layer_keys()
        if self._ops is None or self._ops_key != key:
            ops = [_chain_op(n, m, self.paths.get(n, "dense")) for n, m in self.body.named_children()]
            self._ops = tuple(list(col) for col in zip(*ops)) if ops else ([], [], [])
            self._ops_key = key
            self._release()
        return self._ops

    def _chain_id(self, ext) -> int:
        """The id of this chain's ops registered on the C++ side (re-registered when a weight changed)."""
        ops = self._build_ops()
        if self._id is None:
            self._id = (ext, ext.chain_register(*ops))
        return self._id[1]

    def _release(self) -> None:
        if getattr(self, "_id", None) is not None:
            ext, cid = self._id
            ext.chain_release(cid)
        self._id = None

    def __del__(self) -> None:
        try:
            self._release()
        except Exception:  # interpreter shutdown: the extension may be gone already
            pass

    def __getstate__(self) -> dict:  # copies and pickles rebuild and re-register their ops
        state = self.__dict__.copy()
        state["_ops"] = state["_ops_key"] = state["_id"] = None
        return state

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in self._params)):
            return self.body(x)
        ext = None if any(m.observers or unit_gate(m) is not None for m in self._neurons) else kernels_for(x)
        if ext is None:
            return self.body(x)
        return ext.chain_run(self._chain_id(ext), x)


def _chain_op(name: str, m: nn.Module, path: str) -> tuple[int, list[torch.Tensor], list[float]]:
    """``(kind, tensors, scalars)`` of one layer for the compiled chain (see ``chain_forward`` in
    ``_ext/chain.cpp``); ``ValueError`` for a layer it cannot run."""
    if isinstance(m, layers.Flatten):
        return 0, [], [float(m.dims)]
    if isinstance(m, layers.Repeat):
        return 1, [], [float(m.T)]
    if isinstance(m, nn.Linear):
        bias = [] if m.bias is None else [m.bias.detach()]
        if path == "dense":
            return 2, [m.weight.detach(), *bias], []
        if not isinstance(m, EventLinear) or path not in ("csr", "event"):
            raise ValueError(f"layer {name}: path {path!r} needs an EventLinear and 'csr' or 'event'")
        st = m._structures()
        arrays = st["csr_arrays"] if path == "csr" else st["csc_arrays"]
        return (3 if path == "csr" else 4), [*arrays, *bias], [float(m.out_features)]
    if isinstance(m, BaseNeuron):
        k = m.decay()
        if torch.is_tensor(k) or m.stateful or m.v_reset not in (None, 0.0):
            raise ValueError(f"layer {name}: the chain runs neurons with a constant decay, no state and V_reset 0 "
                             "or a soft reset")
        a, b = _coeffs(m.kind, k, m.decay_input)
        return 5, [], [float(a), float(b), 0.0, float(m.kind != "if" and m.decay_input), float(k), m.v_threshold,
                       0.0, float(m.v_reset is not None)]
    raise ValueError(f"layer {name}: {type(m).__name__} cannot run in the compiled chain")


@torch.no_grad()
def compile_chain(model: nn.Module, inputs: Iterable[torch.Tensor], attr: str = "body", rounds: int = 5) -> nn.Module:
    """Replace ``model.<attr>`` (a ``Sequential``, e.g. of :func:`to_event_driven`'s copy) by an
    :class:`EventChain`, each EventLinear fixed to the path ``auto`` takes on ``inputs`` after
    :func:`check_network` with ``rounds`` (so the chain never uses a path slower than dense there). Build one per
    deployment batch size: the best path depends on it. Returns ``model``.

    A model with no event-driven layer (one that did not go through :func:`to_event_driven`) is converted first,
    ``to_event_driven(model, "auto", example_input)`` with its own ``example_input`` or the first two samples of
    the first input: the chain is then built on that inference copy, which is returned (``model`` itself is left
    as it was)."""
    body = getattr(model, attr, None)
    if not isinstance(body, nn.Sequential):
        raise ValueError(f"model.{attr} must be an nn.Sequential, got {type(body).__name__}")
    if not event_layers(model):
        inputs = list(inputs)
        example = None if hasattr(model, "example_input") or not inputs else inputs[0][:2]
        model = to_event_driven(model, mode="auto", example_input=example)
        if not event_layers(model):
            raise ValueError("compile_chain: no layer of the model can run event-driven (no Linear/Conv2d with "
                             "spiking input); run the model as it is")
        body = getattr(model, attr)
    keys = check_network(model, inputs, rounds)["keys"]
    paths = {}
    for n, m in body.named_children():  # the path each layer takes on these inputs now (the most common one)
        if not isinstance(m, EventLinear):
            continue
        chosen = [m.choice[k] for k in keys.get(f"{attr}.{n}", ())] if m.mode == "auto" else [m.mode]
        if chosen:
            best = max(set(chosen), key=chosen.count)
            paths[n] = "event" if best == "gather" else best  # the chain's one input-driven path
    setattr(model, attr, EventChain(body, paths))
    return model


def event_layers(model: nn.Module) -> dict[str, EventLinear | EventConv2d]:
    """The event-driven layers of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, (EventLinear, EventConv2d))}


def event_report(model: nn.Module) -> list[dict]:
    """Per event-driven layer: its mode, weight density, and for every calibrated key (input shape, rate
    bucket) the timings of each path and the choice."""
    rows = []
    for name, m in event_layers(model).items():
        rows.append({"layer": name, "kind": "linear" if isinstance(m, nn.Linear) else "conv", "mode": m.mode,
                     "density": m.density, "last_mode": m.last_mode,
                     "calibration": [{"shape": list(k[0]), "rate_bucket": k[1], "choice": m.choice[k],
                                      "seconds": dict(m.calibration[k])} for k in m.calibration]})
    return rows
