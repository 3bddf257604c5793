"""The one mask engine every method uses.

* **Connection masks**: a bool buffer ``weight_mask`` on every prunable Conv/Linear (``torch.nn.utils.prune``
  style, so masks travel in ``state_dict``). Masked weights are exactly 0.0 after every optimizer step: the
  engine's step pre-hook zeroes their gradients (after DDP has averaged them, so all ranks agree) and its
  post-hook re-zeroes the weights. Stock SGD, Adam, AdamW and RMSprop skip that pass over every weight (about 1%
  of a fc3 step): their update of a weight with zero gradient and zero first-moment state is exactly 0 (tests
  check it for every option that could change that); subclasses and other optimizers keep it. Changing a mask
  zeroes the optimizer state of every weight that died or was regrown, so regrown weights start at 0 with clean
  state. The one exception is the second moments of *dead* weights (Adam's ``exp_avg_sq``, RMSprop's
  ``square_avg``), which are parked at 1.0: their first moments and gradients are 0, so their update stays exactly
  0, and PyTorch's CPU ``sqrt`` is about 6x slower on exact zeros (measured), which made Adam's step 1.8x slower at
  50% density (fc3's layers, one thread).
* **Fused Adam/AdamW** (``fused=True``, the trainer's default where PyTorch has it): the dead weights' second
  moments are parked at +inf instead, so their update ``m / (sqrt(v) + eps)`` is exactly 0 *whatever their
  gradient*, and the step pre-hook skips the gradient pass too (about 2% of a fc3 step). The fused kernels take
  the square root in registers, as fast on inf as on 1.0 (the unfused ``sqrt`` is not, so they keep 1.0). Their
  gradients then stay dense in ``.grad`` after the step; :meth:`MaskEngine.before_step` (called before gradient
  clipping) still masks them all. A layer whose state the engine did not park itself (a loaded optimizer state)
  is parked before its first step.
* **Unit masks**: a bool buffer ``unit_mask`` on a spiking layer, one entry per neuron (FC) or channel (conv),
  multiplied into its output spikes: inside the fused loops of spikeprune's neurons
  (:func:`~spikeprune.neurons.set_unit_gate`, no pass over the spikes of its own), by a forward hook on other
  frameworks' neurons. The neuron keeps integrating behind the mask, so activity statistics (of the *pre-mask*
  spikes) can bring it back. Unit masks imply zero fan-in rows and fan-out columns;
  :meth:`MaskEngine.effective_weights` folds them in, :meth:`MaskEngine.remove` makes it permanent.
* **Unit gradients**: with ``track_unit_grad`` the engine accumulates ``|∂L/∂g|`` of each unit's gate as if it
  were open (the RigL-style dense signal SCA regrows by); under DDP each step's signed gate gradient is averaged
  over ranks before its magnitude is accumulated, like DDP averages weight gradients.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import numpy as np
import torch
from torch import nn

from .. import dist
from ..adapters import neuron_spikes, with_spikes
from ..graph import SYNAPTIC, UnitGroup, analyze, unit_index
from ..kernels import kernels_for, t_major_dense, unit_sums
from ..neurons import BaseNeuron, is_neuron, set_unit_gate
from ..perf import keep_versions
from .hooks import MethodHook, StaticUnitMask

DenseGradHook = Callable[[str, nn.Module, torch.Tensor], None]
PARKED_STATE = ("exp_avg_sq", "max_exp_avg_sq", "square_avg")  # second moments: only ever under a square root
# exact types whose step leaves a masked weight (0.0, zero gradient, zero first moments) exactly 0.0
ZERO_KEEPING = (torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop)


# Whole-mask primitives. On CPU this torch's bool kernels are slow: over 640k entries ``mask.sum()`` takes 1.2 ms,
# ``mask.any()`` 0.6 ms, ``masked_fill_`` 1.3 ms and ``nonzero()`` 1.5 ms, against 0.1, 0.02, 0.2-0.35 and 0.5 ms
# for the forms below (measured, 2 threads), and rewiring every step (Deep R) calls them on every layer.
_BITS = {torch.float32: torch.int32, torch.float64: torch.int64}


def count(mask: torch.Tensor) -> int:
    """Number of true (or non-zero) entries."""
    return int(torch.count_nonzero(mask))


def any_true(mask: torch.Tensor) -> bool:
    """Whether any entry of a bool tensor is true."""
    return mask.numel() > 0 and bool(mask.view(torch.uint8).max())


def flat_true(mask: torch.Tensor) -> torch.Tensor:
    """Flat (row-major) indices of the true entries, int64, on ``mask``'s device."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.flatnonzero(mask.detach().numpy()).astype(np.int64, copy=False))
    return mask.reshape(-1).nonzero().squeeze(1)


def fill_(t: torch.Tensor, where: torch.Tensor, value: float) -> torch.Tensor:
    """``t.masked_fill_(where, value)``, bit for bit; float CPU tensors go through integer bit masks."""
    it = _BITS.get(t.dtype)
    if it is None or t.device.type != "cpu" or where.dtype != torch.bool or where.shape != t.shape:
        return t.masked_fill_(where, value)
    bits = t.view(it)
    keep = where.view(torch.uint8).to(it).sub_(1)  # all ones where kept, 0 where filled
    bits.bitwise_and_(keep)
    fill = int(torch.tensor(value, dtype=t.dtype).view(it))
    if fill:  # not +0.0
        bits.bitwise_or_(keep.bitwise_not_().bitwise_and_(fill))
    return t


def _fill_at(t: torch.Tensor, where: torch.Tensor | None, at: torch.Tensor | None, value: float) -> None:
    """``fill_(t, where, value)``, or by the flat (row-major) indices ``at`` instead of the mask when given."""
    if at is None:
        fill_(t, where, value)
    elif t.is_contiguous():
        t.view(-1).index_fill_(0, at.to(t.device), value)
    else:
        t[torch.unravel_index(at.to(t.device), t.shape)] = value


def fused_adam(optimizer: torch.optim.Optimizer | None) -> bool:
    """Whether ``optimizer`` is a stock Adam/AdamW running PyTorch's fused kernels in every param group."""
    return type(optimizer) in (torch.optim.Adam, torch.optim.AdamW) and all(
        g.get("fused") for g in optimizer.param_groups)


class _UnitGate(torch.autograd.Function):
    """Spikes ``s`` [T, B, C, ...] times the unit mask ``m`` [C] (compiled, in ``s``'s layout); the backward
    scales the gradient by ``m`` and, with ``on_gate``, hands it ``sum(g * s)`` per unit from the same pass."""

    @staticmethod
    def forward(ctx, s, m, ext, on_gate):
        ctx.ext, ctx.on_gate = ext, on_gate
        ctx.save_for_backward(m, s.detach() if on_gate is not None else None)
        return ext.unit_scale(s, m, None)[0]

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        m, s = ctx.saved_tensors
        if s is not None and g.stride() != s.stride():  # a gradient in another layout: one copy into the spikes'
            g = torch.empty_like(s).copy_(g)
        elif not t_major_dense(g):
            g = g.contiguous()
        gx, dot = ctx.ext.unit_scale(g, m, s)
        if ctx.on_gate is not None:
            ctx.on_gate(dot)
        return gx, None, None, None


class ForeignPruningError(RuntimeError):
    """A layer the engine masks was also pruned with ``torch.nn.utils.prune`` (same ``weight_mask`` name)."""


def _foreign_pruning(name: str, layer: nn.Module) -> ForeignPruningError | None:
    mask = layer._buffers.get("weight_mask")
    if "weight_orig" not in layer._parameters and (mask is None or mask.dtype == torch.bool):
        return None
    return ForeignPruningError(
        f"layer {name!r} was pruned with torch.nn.utils.prune, whose weight_mask replaces spikeprune's: the two "
        "would silently diverge. Prune a layer with one of them (torch.nn.utils.prune.remove(layer, 'weight') "
        "first, or spikeprune.export.torch_prune.from_torch_prune(model) to adopt its masks; to_torch_prune(model) "
        "exports spikeprune's)")


class MaskEngine:
    """Owns every mask of one model. ``prunable`` layers are the Conv/Linear weights not in ``ignored_layers``
    (names or modules); ``prune_first``/``prune_last`` include the first and last synaptic layer."""

    def __init__(self, model: nn.Module, ignored_layers: Iterable[str | nn.Module] = (), prune_first: bool = True,
                 prune_last: bool = True, example_input: torch.Tensor | None = None):
        self.model = model.module if hasattr(model, "module") and isinstance(model.module, nn.Module) else model
        ignored = {x if isinstance(x, str) else self._name_of(x) for x in ignored_layers}
        named = [(n, m) for n, m in self.model.named_modules() if isinstance(m, SYNAPTIC)]
        if not named:
            raise ValueError(f"{type(self.model).__name__} has no Conv/Linear layer to prune")
        unknown = ignored - {n for n, _ in named}
        if unknown:
            raise ValueError(f"ignored_layers names no Conv/Linear layer: {sorted(unknown)}; "
                             f"layers are {[n for n, _ in named]}")
        if not prune_first:
            ignored.add(named[0][0])
        if not prune_last:
            ignored.add(named[-1][0])
        self.layers: dict[str, nn.Module] = {n: m for n, m in named if n not in ignored}
        for n, m in self.layers.items():
            if (err := _foreign_pruning(n, m)) is not None:
                raise err
            if getattr(m, "weight_mask", None) is None:
                m.register_buffer("weight_mask", torch.ones_like(m.weight, dtype=torch.bool))
        self._example = example_input
        self._groups: list[UnitGroup] | None = None
        self._unit_hooks: dict[str, torch.utils.hooks.RemovableHandle | None] = {}  # None: gated inside the neuron
        self._opt_hooks: list = []
        self._steps = 0  # optimizer steps since attach (second moments of dead weights are re-parked every 4096)
        self.optimizer: torch.optim.Optimizer | None = None
        self.dense_grad_hooks: list[DenseGradHook] = []
        self.track_unit_grad = False
        self._multipliers: dict[int, tuple] = {}  # id(layer) -> (mask key, float mask)
        self._grads_masked = False
        self._inf_parked: dict[int, torch.Tensor] = {}  # id(layer) -> the exp_avg_sq whose dead entries are all +inf
        self.unit_grad: dict[str, torch.Tensor] = {}
        self._unit_grad_step: dict[str, torch.Tensor] = {}  # DDP: this step's signed local gate grads
        self.version = 0  # bumped by every set_mask/set_unit_mask (the trainer checks ranks agree when it moves)

    # ------------------------------------------------------------------------------------------- helpers
    def _name_of(self, module: nn.Module) -> str:
        for n, m in self.model.named_modules():
            if m is module:
                return n
        raise ValueError(f"{type(module).__name__} is not a submodule of the model")

    def mask(self, name: str) -> torch.Tensor:
        return self.layers[name].weight_mask

    def masks(self) -> dict[str, torch.Tensor]:
        return {n: m.weight_mask for n, m in self.layers.items()}

    # ------------------------------------------------------------------------------- connection masks
    @torch.no_grad()
    def set_mask(self, name: str, mask: torch.Tensor) -> None:
        """Install a new connection mask: dead weights become 0.0, regrown ones start at 0.0, and the optimizer
        state of every weight whose status changed is cleared."""
        layer = self.layers[name]
        if (err := _foreign_pruning(name, layer)) is not None:
            raise err
        mask = mask.to(device=layer.weight.device, dtype=torch.bool)
        if mask.shape != layer.weight.shape:
            raise ValueError(f"mask for {name} has shape {tuple(mask.shape)}, weight has "
                             f"{tuple(layer.weight.shape)}")
        changed = mask ^ layer.weight_mask
        grown = changed & mask
        fill_(layer.weight, ~mask | grown, 0.0)
        layer.weight_mask.copy_(mask)
        self._clear_state(layer, changed)
        self.version += 1

    def set_masks(self, masks: dict[str, torch.Tensor]) -> None:
        for n, m in masks.items():
            self.set_mask(n, m)

    def _multiplier(self, m: nn.Module) -> torch.Tensor | None:
        """``weight_mask`` in the weight's dtype, cached until the mask changes: multiplying by a bool tensor
        converts it on every call, 6x slower than by a float one (measured, 800x800 on CPU), twice per step.
        ``None`` for a mask with nothing masked (methods that only mask units): there is nothing to multiply."""
        mask = m.weight_mask
        key = (mask.data_ptr(), mask._version, m.weight.dtype, m.weight.device)
        hit = self._multipliers.get(id(m))
        if hit is None or hit[0] != key:
            hit = self._multipliers[id(m)] = (key, None if count(mask) == mask.numel() else mask.to(m.weight.dtype))
        return hit[1]

    @torch.no_grad()
    def apply(self) -> None:
        """Zero every masked weight (idempotent)."""
        for m in self.layers.values():
            mult = self._multiplier(m)
            if mult is not None:
                m.weight.mul_(mult)

    @torch.no_grad()
    def _clear_state(self, layer: nn.Module, where: torch.Tensor) -> None:
        """Zero ``layer``'s optimizer state at ``where``, then park the dead weights' second moments."""
        if self.optimizer is None:
            return
        p = layer.weight
        state = self.optimizer.state.get(p)
        n = count(where)
        if not state or n == 0:
            return
        # a few changed weights (Deep R rewires a handful every step): fill them by index, not by whole-tensor passes
        at = flat_true(where) if 16 * n < where.numel() else None
        for v in state.values():
            if torch.is_tensor(v) and v.shape == p.shape:
                _fill_at(v, where, at, 0.0)
        self._park(layer, where, at)

    @torch.no_grad()
    def _park(self, layer: nn.Module, where: torch.Tensor | None = None, at: torch.Tensor | None = None) -> None:
        """Set the second moments of the dead weights among ``where`` (default: all of them; ``at``: its flat
        indices, when known) to 1.0, or +inf under a fused Adam/AdamW (see the module docstring)."""
        state = self.optimizer.state.get(layer.weight) if self.optimizer is not None else None
        if not state:
            return
        inf = fused_adam(self.optimizer)
        if at is not None:  # the dead among them
            at, dead = at[~layer.weight_mask.reshape(-1)[at]], None
        else:
            dead = ~layer.weight_mask if where is None else where & ~layer.weight_mask
        for k in PARKED_STATE:
            v = state.get(k)
            if torch.is_tensor(v) and v.shape == layer.weight.shape:
                _fill_at(v, dead, at, math.inf if inf else 1.0)
        if not inf:
            self._inf_parked.pop(id(layer), None)
        elif where is None:
            self._inf_parked[id(layer)] = state.get("exp_avg_sq")  # every dead weight is parked now

    def _parked_at_inf(self, layer: nn.Module) -> bool:
        """Whether every dead weight of ``layer`` has its second moments at +inf under a fused Adam/AdamW, so that
        its gradient needs no masking: parks them first when the optimizer's state is not the one the engine
        parked (a first step, a loaded state dict)."""
        if not fused_adam(self.optimizer):
            return False
        state = self.optimizer.state.get(layer.weight)
        if not state or not torch.is_tensor(state.get("exp_avg_sq")):
            return False  # no state before the first step: that step must see masked gradients
        if self._inf_parked.get(id(layer)) is not state["exp_avg_sq"]:
            self._park(layer)
        return True

    def _after_step(self) -> None:
        if type(self.optimizer) not in ZERO_KEEPING:
            self.apply()
        # optimizers create their state at the first step, and a parked 1.0 decays (Adam: x0.999 per step, 1.7%
        # left after 4096 steps), so park again then and every 4096 steps (one masked fill, negligible)
        if self._steps % 4096 == 0 and self.optimizer is not None:
            for m in self.layers.values():
                self._park(m)
        self._steps += 1

    def attach(self, optimizer: torch.optim.Optimizer) -> None:
        """Keep masked weights at 0.0 under ``optimizer``: grads masked before each step, weights after."""
        self.detach_optimizer()
        self.optimizer = optimizer
        keep_versions(optimizer)  # a fused optimizer's steps would leave version-keyed caches stale
        self._opt_hooks = [optimizer.register_step_pre_hook(lambda *a: self._pre_step()),
                           optimizer.register_step_post_hook(lambda *a: self._after_step())]
        self._steps = 0
        for m in self.layers.values():  # state may hold values from before the masks existed
            self._clear_state(m, ~m.weight_mask)

    def detach_optimizer(self) -> None:
        for h in self._opt_hooks:
            h.remove()
        self._opt_hooks = []
        self.optimizer = None
        self._inf_parked.clear()  # (it holds that optimizer's state tensors)

    def check_ownership(self) -> None:
        """Raise :class:`ForeignPruningError` if ``torch.nn.utils.prune`` took over a layer's ``weight_mask``."""
        for n, m in self.layers.items():
            if (err := _foreign_pruning(n, m)) is not None:
                raise err

    def _pre_step(self) -> None:
        self.check_ownership()  # before the step: nothing is corrupted yet
        if self._grads_masked:  # before_step already ran for these gradients (e.g. before clipping)
            self._mask_grads()
        else:
            self.before_step(parked=True)
        self._grads_masked = False

    @torch.no_grad()
    def before_step(self, parked: bool = False) -> None:
        """Show dense gradients to the hooks that want them (regrowth scores), then mask them. The optimizer's
        step pre-hook calls it (with ``parked``: layers parked at +inf keep dense gradients); call it yourself
        before gradient clipping so the norm sees masked gradients (the hooks then do not see the same gradients
        twice)."""
        self._grads_masked = True
        self._reduce_unit_grad()
        if self.dense_grad_hooks:
            for name, m in self.layers.items():
                if m.weight.grad is not None:
                    for hook in self.dense_grad_hooks:
                        hook(name, m, m.weight.grad)
        self._mask_grads(parked)

    def _mask_grads(self, parked: bool = False) -> None:
        with torch.no_grad():
            for m in self.layers.values():
                if m.weight.grad is None or (parked and self._parked_at_inf(m)):
                    continue
                mult = self._multiplier(m)
                if mult is not None:
                    m.weight.grad.mul_(mult)

    # ------------------------------------------------------------------------------------ unit masks
    @property
    def groups(self) -> list[UnitGroup]:
        """The model's spiking layers and the weights tied to their units (see :mod:`spikeprune.graph`)."""
        if self._groups is None:
            x = self._example
            if x is None:
                if not hasattr(self.model, "example_input"):
                    raise ValueError("unit masks need an example_input to analyse the model")
                x = self.model.example_input(2)
            x = x.to(next(self.model.parameters()).device)
            self._groups = analyze(self.model, x)
        return self._groups

    def unit_groups(self) -> list[UnitGroup]:
        """Groups whose units can be masked (private producers, not the output layer)."""
        return [g for g in self.groups if g.prunable]

    def group(self, neuron: str) -> UnitGroup:
        for g in self.groups:
            if g.neuron == neuron:
                return g
        raise ValueError(f"{neuron!r} is not a spiking layer of the model")

    def enable_units(self, neurons: Iterable[str] | None = None) -> list[str]:
        """Give each prunable spiking layer a ``unit_mask`` buffer and the hook that applies it."""
        names = [g.neuron for g in self.unit_groups()] if neurons is None else list(neurons)
        modules = dict(self.model.named_modules())
        for n in names:
            g = self.group(n)
            if not g.prunable:
                raise ValueError(f"spiking layer {n!r} cannot take a unit mask "
                                 f"({'residual-coupled' if g.coupled else 'output layer or no producer'})")
            mod = modules[n]
            if getattr(mod, "unit_mask", None) is None:
                dev = next(self.model.parameters()).device
                mod.register_buffer("unit_mask", torch.ones(g.units, dtype=torch.bool, device=dev))
            if n not in self._unit_hooks:
                if isinstance(mod, BaseNeuron):  # gated inside the neuron's fused loops: no pass of its own
                    set_unit_gate(mod, functools.partial(self._gate, n, mod))
                    self._unit_hooks[n] = None
                else:
                    feat = len(g.unit_shape)
                    for k, h in list(mod._forward_hooks.items()):  # the static form a saved model was loaded with
                        if isinstance(h, StaticUnitMask):
                            del mod._forward_hooks[k]
                    self._unit_hooks[n] = mod.register_forward_hook(
                        MethodHook(self._unit_hook(n, feat), frozen=functools.partial(StaticUnitMask, feat)))
        return names

    def _gate(self, name: str, mod: nn.Module) -> tuple:
        """What a spikeprune neuron's folded gate needs at each forward: its mask and the gate-gradient sink."""
        return mod.unit_mask, (functools.partial(self._add_gate_grad, name) if self.track_unit_grad else None)

    def _unit_hook(self, name: str, feat_dims: int):
        def hook(mod, inputs, result):
            out = neuron_spikes(result)  # snnTorch neurons may return (spk, mem): only spk is masked
            unit_dim = out.dim() - feat_dims
            track = self.track_unit_grad and torch.is_grad_enabled() and out.requires_grad
            ext = kernels_for(out) if unit_dim == 2 and out.dim() >= 3 else None
            if ext is not None and t_major_dense(out):  # one compiled pass each way, gate gradient included
                on_gate = functools.partial(self._add_gate_grad, name) if track else None
                y = _UnitGate.apply(out, mod.unit_mask.to(out.dtype), ext, on_gate)
                return with_spikes(result, y)
            m = mod.unit_mask.view(-1, *([1] * (feat_dims - 1))).to(out.dtype)
            y = out * m
            if track:
                s = out.detach()
                # dL/dgate, one pass without a product copy
                y.register_hook(lambda gy: self._add_gate_grad(name, unit_sums(gy.detach(), "dot", s, unit_dim)))
            return with_spikes(result, y)

        return hook

    def _add_gate_grad(self, name: str, g: torch.Tensor) -> None:
        """Accumulate one step's gate gradient ``g`` of unit layer ``name`` (see ``track_unit_grad``)."""
        if dist.is_dist():  # local gradient: averaged over ranks before |.| (_reduce_unit_grad)
            prev = self._unit_grad_step.get(name)
            self._unit_grad_step[name] = g if prev is None else prev + g
            return
        acc = g.abs()
        prev = self.unit_grad.get(name)  # may come from a CPU checkpoint (resume)
        self.unit_grad[name] = acc if prev is None else prev.to(acc.device) + acc

    def unit_mask(self, neuron: str) -> torch.Tensor:
        return dict(self.model.named_modules())[neuron].unit_mask

    def unit_masks(self) -> dict[str, torch.Tensor]:
        modules = dict(self.model.named_modules())
        return {n: modules[n].unit_mask for n in self._unit_hooks}

    @torch.no_grad()
    def set_unit_mask(self, neuron: str, mask: torch.Tensor) -> None:
        um = self.unit_mask(neuron)
        if mask.shape != um.shape:
            raise ValueError(f"unit mask for {neuron} has shape {tuple(mask.shape)}, expected {tuple(um.shape)}")
        um.copy_(mask.to(torch.bool))
        self.version += 1

    @torch.no_grad()
    def _reduce_unit_grad(self) -> None:
        """Under DDP: average this step's gate gradients over ranks (like DDP averages weight gradients), then
        accumulate their magnitude, so ``unit_grad`` is ``|∂L/∂gate|`` of the global batch on every rank."""
        if not self._unit_grad_step:
            return
        names = sorted(self._unit_grad_step)
        sizes = [self._unit_grad_step[n].numel() for n in names]
        flat = dist.all_mean(torch.cat([self._unit_grad_step[n].reshape(-1).float() for n in names]))
        self._unit_grad_step = {}
        for n, g in zip(names, flat.split(sizes)):
            acc = g.abs()
            prev = self.unit_grad.get(n)  # may come from a CPU checkpoint (resume)
            self.unit_grad[n] = acc if prev is None else prev.to(acc.device) + acc

    def pop_unit_grad(self) -> dict[str, torch.Tensor]:
        """Accumulated ``|∂L/∂gate|`` per unit since the last call, averaged over ranks."""
        self._reduce_unit_grad()
        out = {n: dist.all_mean(g.clone()) for n, g in self.unit_grad.items()}
        self.unit_grad = {}
        return out

    # ------------------------------------------------------------------------------------ reporting
    @torch.no_grad()
    def effective_weights(self) -> dict[str, torch.Tensor]:
        """Every synaptic layer's weight with connection masks and dead units folded in (rows of dead units
        zeroed in their producers, columns zeroed in their consumers)."""
        modules = dict(self.model.named_modules())
        out = {n: m.weight.detach().clone() for n, m in modules.items() if isinstance(m, SYNAPTIC)}
        for n, m in self.layers.items():
            out[n].mul_(m.weight_mask)
        if self._has_unit_masks(modules):  # the graph analysis needs an example input: only when units matter
            fold_units(out, self.groups, modules)
        return out

    @staticmethod
    def _has_unit_masks(modules: dict[str, nn.Module]) -> bool:
        return any(getattr(m, "unit_mask", None) is not None for m in modules.values())

    def density(self) -> float:
        """Fraction of non-zero prunable weights, counted from the (effective) weights themselves."""
        self.check_ownership()
        eff = self.effective_weights()
        nz = sum(count(eff[n]) for n in self.layers)
        return nz / max(1, sum(eff[n].numel() for n in self.layers))

    def mask_checksum(self) -> torch.Tensor:
        """A cheap fingerprint of every mask (compared across DDP ranks after each update)."""
        dev = next(self.model.parameters()).device
        acc = torch.zeros(2, dtype=torch.float64, device=dev)
        for i, m in enumerate([*self.masks().values(), *self.unit_masks().values()]):
            f = m.flatten().to(torch.float64)
            acc[0] += f.sum()
            acc[1] += (f * torch.arange(1, f.numel() + 1, device=dev, dtype=torch.float64)).sum() * (i + 1) % 1e9
        return acc

    @torch.no_grad()
    def remove(self) -> None:
        """Make every mask permanent: fold them into the weights and drop the buffers and hooks."""
        eff = self.effective_weights()
        modules = dict(self.model.named_modules())
        for n, w in eff.items():
            modules[n].weight.copy_(w)
        for g in (self.groups if self._has_unit_masks(modules) else []):
            mod = modules[g.neuron]
            if getattr(mod, "unit_mask", None) is not None:
                dead = ~mod.unit_mask
                for p in g.producers:
                    if modules[p].bias is not None:
                        modules[p].bias[dead] = 0
                for b in g.norms:
                    bn = modules[b]
                    if bn.weight is not None:
                        bn.weight[dead] = 0
                        bn.bias[dead] = 0
        self.detach_optimizer()
        for n, h in self._unit_hooks.items():
            if h is None:
                set_unit_gate(modules[n], None)
            else:
                h.remove()
        for n in list(self._unit_hooks):
            del modules[n]._buffers["unit_mask"]
        self._unit_hooks = {}
        for m in self.layers.values():
            del m._buffers["weight_mask"]
        self.layers = {}

    def reattach(self) -> None:
        """Re-register unit hooks after a ``load_state_dict`` created the buffers (resume)."""
        for n, mod in self.model.named_modules():
            if is_neuron(mod) and getattr(mod, "unit_mask", None) is not None and n not in self._unit_hooks:
                self.enable_units([n])


@torch.no_grad()
def fold_units(weights: dict[str, torch.Tensor], groups: list[UnitGroup], modules: dict[str, nn.Module]) -> None:
    """Zero, in ``weights``, the fan-in rows and fan-out columns of every unit whose ``unit_mask`` is off."""
    for g in groups:
        um = getattr(modules[g.neuron], "unit_mask", None)
        if um is None or bool(um.all()):
            continue
        dead = ~um.to(torch.bool)
        for p in g.producers:
            weights[p][dead] = 0
        for c, span in g.consumers:
            cols = dead[unit_index(g.units, span).to(dead.device)]
            weights[c][:, cols] = 0


# ------------------------------------------------------------------------------------ initial masks
def random_mask(shape, density: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A bool mask with exactly ``round(density * numel)`` ones at uniformly random places."""
    n = math.prod(shape)
    k = int(round(density * n))
    idx = torch.randperm(n, generator=generator)[:k]
    m = torch.zeros(n, dtype=torch.bool)
    m[idx] = True
    return m.view(shape)


def erk_densities(shapes: dict[str, tuple[int, ...]], density: float, kernel: bool = True) -> dict[str, float]:
    """Per-layer densities of the Erdős–Rényi(-Kernel) rule with overall ``density`` (Evci et al. 2020):
    ERK ``d_l ∝ (sum of dims) / (product of dims)``, ER ``d_l ∝ (n_in + n_out) / (n_in · n_out)`` (kernel size
    ignored); layers that would exceed 1 are kept dense and the rest rescaled."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")

    def score(s: tuple[int, ...]) -> float:
        if kernel:  # ERK: (n_out + n_in + k_h + k_w) / (n_out n_in k_h k_w)
            return sum(s) / math.prod(s)
        n_out, n_in = s[0], (s[1] if len(s) > 1 else 1)  # ER: (n_in + n_out) / (n_in n_out), kernel ignored
        return (n_out + n_in) / (n_out * n_in)

    total = sum(math.prod(s) for s in shapes.values())
    dense: set[str] = set()
    while True:
        budget = density * total - sum(math.prod(shapes[n]) for n in dense)
        raw = {n: score(s) for n, s in shapes.items() if n not in dense}
        if not raw:  # everything dense (density 1 up to rounding)
            return {n: 1.0 for n in shapes}
        eps = budget / sum(raw[n] * math.prod(shapes[n]) for n in raw)
        over = [n for n in raw if eps * raw[n] > 1 + 1e-12]
        if not over:
            return {n: 1.0 if n in dense else min(1.0, eps * raw[n]) for n in shapes}
        dense.update(over)


def init_masks(engine: MaskEngine, kind: str, density: float, generator: torch.Generator | None = None) -> None:
    """Initial connection masks: ``dense``, ``uniform`` (same density per layer), ``er`` or ``erk``."""
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    shapes = {n: tuple(m.weight.shape) for n, m in engine.layers.items()}
    if kind == "dense":
        dens = {n: 1.0 for n in shapes}
    elif kind == "uniform":
        dens = {n: density for n in shapes}
    elif kind in ("er", "erk"):
        dens = erk_densities(shapes, density, kernel=kind == "erk")
    else:
        raise ValueError(f"init must be one of ['dense', 'uniform', 'er', 'erk'], got {kind!r}")
    for n, s in shapes.items():
        engine.set_mask(n, random_mask(s, dens[n], generator))


def select_per_row(score: torch.Tensor, k: torch.Tensor | int, candidates: torch.Tensor,
                   largest: bool = True) -> torch.Tensor:
    """Bool mask choosing, in each row of ``score``, the ``k[row]`` best entries among ``candidates``
    (largest or smallest scores; ties broken by position). Rows with fewer candidates take them all."""
    score = score.reshape(candidates.shape[0], -1)
    cand = candidates.reshape(score.shape)
    fill = float("-inf") if largest else float("inf")
    s = fill_(score.to(torch.float32, copy=True), ~cand, fill)
    kk = k.reshape(-1) if torch.is_tensor(k) else None
    if kk is None or kk.numel() == 1 or bool((kk == kk[0]).all()):
        # one k for every row (a whole layer is one row): a selection instead of a sort, same choice
        return _select_first_k(s, int(k if kk is None else kk[0]), largest, cand).reshape(candidates.shape)
    order = torch.argsort(s, dim=1, descending=largest, stable=True)
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(s.shape[1], device=s.device).expand_as(order).contiguous())
    k = k.to(s.device).reshape(-1, 1) if torch.is_tensor(k) else torch.tensor([[int(k)]], device=s.device)
    return ((ranks < k) & cand).reshape(candidates.shape)


def _select_first_k(s: torch.Tensor, k: int, largest: bool, cand: torch.Tensor) -> torch.Tensor:
    """What a stable sort of each row of ``s`` would rank first ``k`` times (ties by position), among ``cand``:
    everything strictly better than the k-th value, then the first of the entries equal to it. O(n) per row
    (a selection) where the sort was O(n log n): the epoch-end rewiring of fc3 spent 70% of its time sorting. On
    CPU the selection is NumPy's ``partition`` (0.4 ms for 600k floats, where ``torch.kthvalue`` takes 8)."""
    n = s.shape[1]
    if k <= 0 or n == 0:
        return torch.zeros_like(cand)
    if k >= n:
        return cand.clone()
    v = -s if largest else s
    if v.device.type == "cpu" and v.dtype in (torch.float32, torch.float64):
        thr = torch.from_numpy(np.partition(v.detach().numpy(), k - 1, axis=1)[:, k - 1:k].copy())
    else:
        thr = v.kthvalue(k, dim=1, keepdim=True).values
    better = v < thr
    equal = v == thr
    need = k - better.sum(1, keepdim=True)
    if bool((equal.sum(1, keepdim=True) <= need).all()):  # no tie to break (continuous scores): no cumsum pass
        return (better | equal) & cand
    return (better | (equal & (equal.cumsum(1) <= need))) & cand


def scope_view(t: torch.Tensor, scope: str) -> torch.Tensor:
    """``[rows, cols]`` view for a scope: one row per output unit (``neuron``) or one row (``layer``)."""
    if scope == "neuron":
        return t.reshape(t.shape[0], -1)
    if scope == "layer":
        return t.reshape(1, -1)
    raise ValueError(f"scope must be 'layer' or 'neuron' here, got {scope!r}")
