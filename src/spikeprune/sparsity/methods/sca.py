"""SCA (Li et al., ICML 2024): structured pruning of convolution channels by spiking channel activity, with
pruned channels regrown during training (docs/methods.md §5).

During each epoch the activity of every conv channel, ``A_c = mean_{t,n,h,w}(s + |u|)`` (``activity:
membrane`` gives ``mean |u|``), is averaged over the training batches, gathered before any channel gate. At the
end of the epoch (after evaluation) channels are ranked globally over all prunable conv channels and the most
active are kept; among the rest, some are regrown by a gradient score. Masks are recomputed every epoch, so
channels come and go; they freeze at ``freeze_epoch`` for fine-tuning. ``l1`` adds ``λ·sign(w)`` to the gradients
of the pruned conv layers (the reference recipe uses 3e-5).

Two variants (``mode``):

* ``hard`` (the paper's, as the derived code runs it): a pruned channel's conv filter rows are masked through the
  mask engine's connection masks (exactly 0.0 after every step, gradients masked) and its BN ``γ_c, β_c`` are
  zeroed after every optimizer step, so its BN output is exactly 0 and its neurons never fire. Regrowth ranks
  channels by ``|∂L/∂γ_c|`` summed over the epoch's steps (``regrow_score: bn_grad``). For a pruned channel this is
  taken *as if it were alive*: each pruned channel holds the filter it would be regrown with (``regrow_init:
  reinit``: a fresh Kaiming-uniform draw, as ``nn.Conv2d`` initialises, redrawn at each update); a probe computes
  that filter's output on the conv's input, normalised with its batch statistics (``x̂̃_c``), and a gradient hook
  on the BN output forms ``Σ δ_c x̂̃_c``, with ``δ_c`` the true gradient at the channel's BN output (its neurons'
  surrogate gradient is non-zero at rest, and the consumers still hold their columns). That is exactly the
  ``∂L/∂γ_c`` the channel would get alive with that filter and ``γ_c = β_c = 0`` (which computes the same
  network); the forward is not touched. A regrown channel starts from that filter with
  ``γ = 1, β = 0`` and fresh running statistics (``regrow_init: zero``: the filter starts at 0 instead).
  Channels tied by a residual add (``residual: true``; ResNet19's stem and block outputs of a stage, their
  downsample shortcuts) form one group: a channel of the group is pruned in every producer of the group at once,
  ranked by its mean activity over the group's neurons and by its ``|∂L/∂γ|`` summed over the group's BNs. The
  channel gates (unit masks) stay open while training, so the probe sees ``δ``; at the end of training they are
  closed on the pruned channels (``measure`` and ``compact`` then see them), and the consumers' columns of
  pruned residual channels are masked.
* ``soft`` (the default, this library's earlier reading [R]): a channel gate on the spiking output silences a
  pruned channel, whose filter and BN keep their values and stop learning; regrowth ranks by the gate gradient
  ``|∂L/∂g_c|`` taken as if the gate were open; residual-coupled channels are not pruned. It stays the default so
  the recorded benches keep their meaning; the paper recipes set ``mode: hard``.

Schedule: without ``target_keep`` every update keeps the top ``keep`` fraction by activity and regrows up to
``regrow`` (fractions of all channels; the derived code's ``a = 0.8, b = 0.1``). With ``target_keep`` the retained
fraction falls from 1 to ``target_keep`` along a cubic ramp over the first ``ramp`` of the epochs and stays
there: each update retains ``⌊k_e·N⌋`` channels, ``⌊regrow·N⌋`` of them by the regrowth score (exploration) and
the rest by activity (topped up by activity where too few have a positive score).

[R] choices (docs/methods.md §5): ``s+|u|`` as default score, the gate gradient in the soft variant, the probe
filter of the hard variant, the cubic ramp, ``keep``=0.4/``regrow``=0.1 defaults, at least ``min_channels`` per
group. Under DDP the summed ``|∂L/∂γ|`` is averaged over ranks at the update (abs before the mean).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ... import dist
from ...graph import _module_kind, trace
from ..hooks import MethodHook
from ..loop import LoopState
from ..scores import ActivityMonitor
from . import register_method
from ._base import Method, MethodConfig


@dataclass
class SCAConfig(MethodConfig):
    mode: Literal["soft", "hard"] = "soft"
    activity: Literal["spikes+membrane", "membrane"] = "spikes+membrane"
    keep: float = 0.4
    regrow: float = 0.1
    target_keep: float | None = None  # retained fraction reached by the ramp (null: keep + regrow every update)
    ramp: float = 0.5  # fraction of the epochs over which the retained fraction falls to target_keep
    regrow_score: Literal["auto", "gate", "bn_grad"] = "auto"  # auto: bn_grad (hard), gate (soft)
    regrow_init: Literal["reinit", "zero"] = "reinit"  # hard: a regrown channel's filter (BN: γ=1, β=0)
    residual: bool = True  # hard: prune channels tied by residual adds together
    start_epoch: int = 1
    freeze_epoch: int | None = None
    l1: float = 3e-5
    min_channels: int = 2

    def validate(self, key: str) -> None:
        self.check(0 < self.keep <= 1, f"{key}.keep", f"must be in (0, 1], got {self.keep}")
        self.check(0 <= self.regrow <= 1 - self.keep + 1e-9 or self.target_keep is not None, f"{key}.regrow",
                   f"must be in [0, 1 - keep], got {self.regrow}")  # 1 - 0.9 < 0.1 in floats
        if self.target_keep is not None:
            self.check(0 < self.target_keep <= 1, f"{key}.target_keep", f"must be in (0, 1], got {self.target_keep}")
            self.check(0 <= self.regrow < self.target_keep, f"{key}.regrow",
                       f"must be in [0, target_keep) with target_keep, got {self.regrow}")
        self.check(0 < self.ramp <= 1, f"{key}.ramp", f"must be in (0, 1], got {self.ramp}")
        self.check(self.regrow_score != "bn_grad" or self.mode == "hard", f"{key}.regrow_score",
                   "bn_grad needs mode: hard (a soft-pruned channel's gate stops its BN gradient)")
        self.check(self.regrow_score != "gate" or self.mode == "soft", f"{key}.regrow_score",
                   "gate needs mode: soft (a hard-pruned channel emits no spikes, so its gate gradient is 0)")
        self.check(self.start_epoch >= 0, f"{key}.start_epoch", "must be >= 0")
        self.check(self.freeze_epoch is None or self.freeze_epoch >= 0, f"{key}.freeze_epoch",
                   f"must be >= 0 or null, got {self.freeze_epoch}")
        self.check(self.l1 >= 0, f"{key}.l1", "must be >= 0")
        self.check(self.min_channels >= 1, f"{key}.min_channels", "must be >= 1")


@dataclass
class ChannelTie:
    """Conv channels pruned as one: ``units`` channels shared by ``neurons``, produced by ``producers`` (conv
    layers, each followed by the BN of ``norm_of``) and read by ``consumers`` ((layer, columns per channel))."""

    name: str  # the first neuron
    units: int
    neurons: list[str]
    producers: list[str]
    norm_of: dict[str, str | None] = field(default_factory=dict)
    consumers: list[tuple[str, int]] = field(default_factory=list)
    gated: bool = True  # one private group: the engine's unit mask can close it


def _residual_ties(model: nn.Module, groups, taken: set[str]) -> list[ChannelTie]:
    """Channel spaces joined by residual adds: union-find over neurons and producers reached through norms,
    channel-preserving modules and adds; one tie per component holding a residual-coupled neuron."""
    modules = dict(model.named_modules())
    graph = trace(model)

    def kind(n) -> str:
        if n.op == "call_module":
            return _module_kind(modules[n.target])
        if n.op in ("call_function", "call_method"):
            import operator

            if n.target in (operator.add, torch.add, "add", operator.iadd, "add_"):
                return "mix"
            return "other"
        return n.op

    parent: dict[str, str] = {}

    def find(a: str) -> str:
        while parent.setdefault(a, a) != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    bad: set[str] = set()
    norm_of: dict[str, str | None] = {}

    def sources(node, root: str) -> list[str]:
        """Neurons and synaptic layers whose channels reach ``node`` unchanged; norms met on the way are noted."""
        out, stack, seen = [], list(node.all_input_nodes), set()
        while stack:
            n = stack.pop()
            if n in seen:
                continue
            seen.add(n)
            k = kind(n)
            if k in ("neuron", "synaptic"):
                out.append(n.target)
            elif k == "norm":
                prev = n.all_input_nodes[0] if n.all_input_nodes else None
                if prev is not None and kind(prev) == "synaptic":
                    norm_of[prev.target] = n.target
                stack.extend(n.all_input_nodes)
            elif k in ("pass", "mix"):
                stack.extend(n.all_input_nodes)
            else:
                bad.add(root)
        return out

    for node in graph.nodes:
        k = kind(node)
        if k == "neuron" or k == "mix":
            root = node.target if k == "neuron" else f"@{node.name}"
            for s in sources(node, root):
                parent[find(s)] = find(root)
            find(root)
    coupled = {g.neuron for g in groups if g.coupled and not g.is_output}
    by_neuron = {g.neuron: g for g in groups}
    comps: dict[str, list[str]] = {}
    for a in list(parent):
        comps.setdefault(find(a), []).append(a)
    ties = []
    for members in comps.values():
        neurons = [m for m in members if m in by_neuron]
        if not coupled.intersection(neurons) or any(find(b) == find(members[0]) for b in bad):
            continue
        prods = [m for m in members if not m.startswith("@") and m not in by_neuron]
        if not prods or any(not isinstance(modules[p], nn.Conv2d) for p in prods) or taken.intersection(prods):
            continue
        units = {by_neuron[n].units for n in neurons} | {modules[p].out_channels for p in prods}
        if len(units) != 1 or any(by_neuron[n].is_output for n in neurons):
            continue
        order = {m: i for i, m in enumerate(modules)}
        neurons.sort(key=order.get)
        prods.sort(key=order.get)
        cons = sorted({c for n in neurons for c in by_neuron[n].consumers if c[0] not in prods},
                      key=lambda c: order[c[0]])
        ties.append(ChannelTie(neurons[0], units.pop(), neurons, prods, {p: norm_of.get(p) for p in prods}, cons,
                               gated=False))
    return ties


@register_method("sca")
class SCA(Method):
    Config = SCAConfig
    name = "sca"

    def requirements(self) -> list[tuple[str, str]]:
        req = [*super().requirements(), ("example_input", "trace which conv channels it can mask")]
        if self.cfg.target_keep is not None:
            req.append(("epochs", "ramp the retained channels to target_keep over the run"))
        return req

    @property
    def hard(self) -> bool:
        return self.cfg.mode == "hard"

    def setup(self, state: LoopState) -> None:
        super().setup(state)
        c = self.cfg
        self.epochs = state.epochs
        modules = dict(self.engine.model.named_modules())
        conv_groups = [g for g in self.engine.unit_groups()
                       if all(isinstance(modules[p], nn.Conv2d) for p in g.producers)]
        self.ties: list[ChannelTie] = []
        for g in conv_groups:
            norm = {p: None for p in g.producers}
            if len(g.producers) == 1 and len(g.norms) == 1:
                norm[g.producers[0]] = g.norms[0]
            self.ties.append(ChannelTie(g.neuron, g.units, [g.neuron], list(g.producers), norm,
                                        list(g.consumers), gated=True))
        if self.hard and c.residual:
            taken = {p for t in self.ties for p in t.producers}
            self.ties += _residual_ties(self.engine.model, self.engine.groups, taken)
        if not self.ties:
            raise ValueError("sca found no prunable conv channel group (conv -> [BN] -> neuron) in the model")
        self.neurons = [t.name for t in self.ties]  # one name per tie (its first neuron)
        self.engine.enable_units([t.name for t in self.ties if t.gated])
        self.score = "gate" if not self.hard else "bn_grad"
        if self.hard:
            missing = [p for t in self.ties for p in t.producers if t.norm_of.get(p) is None]
            if missing:
                raise ValueError(f"sca mode: hard ranks regrowth by the BN scale gradient, but {missing} have no "
                                 "BatchNorm right after them: use mode: soft")
            unmasked = [p for t in self.ties for p in t.producers if p not in self.engine.layers]
            if unmasked:
                raise ValueError(f"sca mode: hard masks the filters of {unmasked}, which ignored_layers / prune_first "
                                 "leave out: let them be masked or use mode: soft")
        self.engine.track_unit_grad = not self.hard
        watch = [n for t in self.ties for n in t.neurons]
        self.monitor = ActivityMonitor(self.engine.model, watch, c.activity, ema=None)
        self.conv_layers = [p for t in self.ties for p in t.producers if p in self.engine.layers]
        if c.l1 > 0:
            self.engine.dense_grad_hooks.append(self._l1)
        self.channel_masks = {t.name: self._installed_mask(t) for t in self.ties}  # a loaded net keeps its masks
        self.bn_grad: dict[str, torch.Tensor] = {}
        self.candidates: dict[str, torch.Tensor] = {}  # hard: producer -> the filters pruned channels regrow with
        self._probe: dict[str, tuple] = {}  # producer -> (pruned indices, candidate output) of this forward
        self._handles = []
        if self.hard:
            self._install_probe(modules)
        self.updates = 0

    def _installed_mask(self, t: ChannelTie) -> torch.Tensor:
        """The channels a tie has alive now: its unit mask (soft), or the rows its filters keep (hard)."""
        if not self.hard:
            return self.engine.unit_mask(t.name).detach().cpu().clone() if t.gated else torch.ones(t.units,
                                                                                                  dtype=torch.bool)
        alive = torch.zeros(t.units, dtype=torch.bool)
        for p in t.producers:
            alive |= self.engine.mask(p).reshape(t.units, -1).any(1).cpu()
        return alive

    # ------------------------------------------------------------------------------------ hard: the probe
    def _install_probe(self, modules: dict[str, nn.Module]) -> None:
        for t in self.ties:
            for p in t.producers:
                bn = t.norm_of[p]
                self._handles.append(modules[p].register_forward_hook(MethodHook(self._conv_hook(t, p))))
                self._handles.append(modules[bn].register_forward_hook(MethodHook(self._bn_hook(t, p))))

    def _probing(self, mod: nn.Module) -> bool:
        return mod.training and torch.is_grad_enabled() and self.cfg.regrow > 0 and self._active_now

    def _conv_hook(self, tie: ChannelTie, p: str):
        def hook(mod, inputs, out):
            self._probe.pop(p, None)
            dead = ~self.channel_masks[tie.name]
            if not self._probing(mod) or not bool(dead.any()) or p not in self.candidates:
                return None
            idx = dead.nonzero().flatten().to(out.device)
            x = inputs[0].detach()
            lead = x.shape[:-3]
            z = F.conv2d(x.reshape(-1, *x.shape[-3:]), self.candidates[p].to(out.device)[idx], None, mod.stride,
                         mod.padding, mod.dilation, mod.groups)
            self._probe[p] = (idx, z, lead)
            return None
        return hook

    def _bn_hook(self, tie: ChannelTie, p: str):
        def hook(mod, inputs, out):
            got = self._probe.pop(p, None)
            if got is None or not self._probing(mod) or not out.requires_grad:
                return None
            idx, z, lead = got
            with torch.no_grad():
                mean = z.mean((0, 2, 3), keepdim=True)
                var = z.var((0, 2, 3), unbiased=False, keepdim=True)
                xhat = (z - mean) / torch.sqrt(var + mod.eps)

            def on_grad(grad: torch.Tensor) -> None:  # δ at the BN output: ∂L/∂γ̃_c = Σ δ_c · x̂̃_c
                d = grad.detach().reshape(-1, *grad.shape[-3:]).index_select(1, idx)
                self._add_probe_grad(tie.name, idx, (d * xhat.to(d.dtype)).sum((0, 2, 3)))

            out.register_hook(on_grad)
            return None
        return hook

    def _add_probe_grad(self, tie: str, idx: torch.Tensor, grad: torch.Tensor) -> None:
        acc = self.bn_grad.get(tie)
        if acc is None or acc.device != grad.device:
            acc = self.bn_grad[tie] = torch.zeros(self.channel_masks[tie].numel(), device=grad.device)
        acc.index_add_(0, idx, grad.detach().abs().float())

    @property
    def _active_now(self) -> bool:
        st = self.state
        return st is not None and self._active(st) and not st.is_last_epoch()

    def _draw_candidates(self) -> None:
        """Fresh regrowth filters for every producer (Kaiming-uniform as ``nn.Conv2d.reset_parameters``)."""
        modules = dict(self.engine.model.named_modules())
        for t in self.ties:
            for p in t.producers:
                w = modules[p].weight
                cand = torch.empty(w.shape, dtype=w.dtype)
                fan_in = w[0].numel()
                bound = 1 / math.sqrt(fan_in)  # kaiming_uniform_(a=sqrt(5)) gives U(-1/sqrt(fan_in), 1/sqrt(fan_in))
                cand.uniform_(-bound, bound, generator=self.generator)
                self.candidates[p] = cand.to(w.device)

    @torch.no_grad()
    def _collect_bn_grad(self) -> None:
        """This step's |∂L/∂γ| of the alive channels (the pruned ones come from the probe)."""
        modules = dict(self.engine.model.named_modules())
        for t in self.ties:
            alive = self.channel_masks[t.name]
            for p in t.producers:
                gw = modules[t.norm_of[p]].weight.grad
                if gw is None:
                    continue
                acc = self.bn_grad.get(t.name)
                if acc is None or acc.device != gw.device:
                    acc = self.bn_grad[t.name] = torch.zeros(t.units, device=gw.device)
                acc += gw.abs().float() * alive.to(gw.device)

    @torch.no_grad()
    def _zero_dead_bn(self) -> None:
        modules = dict(self.engine.model.named_modules())
        for t in self.ties:
            dead = ~self.channel_masks[t.name]
            if not bool(dead.any()):
                continue
            for p in t.producers:
                bn = modules[t.norm_of[p]]
                dev = bn.weight.device
                bn.weight[dead.to(dev)] = 0
                bn.bias[dead.to(dev)] = 0
                if modules[p].bias is not None:
                    modules[p].bias[dead.to(dev)] = 0

    # ------------------------------------------------------------------------------------------- loop
    def _l1(self, name: str, layer: nn.Module, grad: torch.Tensor) -> None:
        if name in self.conv_layers:
            grad.add_(torch.sign(layer.weight), alpha=self.cfg.l1)

    def _active(self, state: LoopState) -> bool:
        frozen = self.cfg.freeze_epoch is not None and state.epoch + 1 >= self.cfg.freeze_epoch
        return state.epoch + 1 >= self.cfg.start_epoch and not frozen

    def on_train_start(self, state: LoopState) -> None:
        if self.hard and not self.candidates:
            self._draw_candidates()

    def on_epoch_start(self, state: LoopState) -> None:
        self.monitor.reset()
        self.engine.pop_unit_grad()
        self.bn_grad = {}
        if self.hard and not self.candidates:
            self._draw_candidates()

    def on_step_end(self, state: LoopState) -> None:
        if self.hard:
            if self._active_now and self.cfg.regrow > 0:
                self._collect_bn_grad()
            self._zero_dead_bn()

    def on_epoch_end(self, state: LoopState, metrics: dict) -> None:
        if self._active(state) and not state.is_last_epoch():
            self.update(self._retained(state.epoch))

    def on_train_end(self, state: LoopState) -> None:
        if self.hard:
            self.close_gates()

    def _retained(self, epoch: int) -> float | None:
        """The retained fraction after epoch ``epoch`` (0-based) under ``target_keep`` (None without it)."""
        c = self.cfg
        if c.target_keep is None:
            return None
        ramp_epochs = max(1, round(c.ramp * (self.epochs or 1)))
        s = min(1.0, (epoch + 1) / ramp_epochs)
        return c.target_keep + (1 - c.target_keep) * (1 - s) ** 3

    # ------------------------------------------------------------------------------------------ update
    def _scores(self) -> tuple[list[ChannelTie], torch.Tensor, torch.Tensor]:
        acts = self.monitor.values()
        dev = next(self.engine.model.parameters()).device  # statistics may come from a CPU checkpoint
        if self.hard:
            grads = {k: dist.all_mean(v.to(dev)) for k, v in self.bn_grad.items()}
            self.bn_grad = {}
        else:
            grads = self.engine.pop_unit_grad()
        ties = [t for t in self.ties if any(n in acts for n in t.neurons)]
        a = torch.cat([torch.stack([acts[n].float().to(dev) for n in t.neurons if n in acts]).mean(0)
                       for t in ties]) if ties else torch.zeros(0, device=dev)
        g = torch.cat([grads[t.name].float().to(dev) if t.name in grads else torch.zeros(t.units, device=dev)
                       for t in ties]) if ties else torch.zeros(0, device=dev)
        return ties, a, g

    @torch.no_grad()
    def update(self, retained: float | None = None) -> dict:
        """Keep the globally most active channels, regrow by the gradient score; ``retained``: the fraction to
        retain under ``target_keep`` (None: ``keep`` by activity plus up to ``regrow`` by gradient)."""
        ties, a, g = self._scores()
        total = a.numel()
        if total == 0:
            return {}
        keep = torch.zeros(total, dtype=torch.bool, device=a.device)
        # ⌊keep·N⌋ and ⌊regrow·N⌋, robust to float products such as 0.29 * 100 = 28.999...
        n_regrow = math.floor(self.cfg.regrow * total + 1e-9)
        if retained is None:
            keep[torch.topk(a, max(1, math.floor(self.cfg.keep * total + 1e-9))).indices] = True
            n_regrow = min(n_regrow, total - int(keep.sum()))
        else:
            n_total = max(1, math.floor(retained * total + 1e-9))
            n_regrow = min(n_regrow, n_total - 1)
            keep[torch.topk(a, n_total - n_regrow).indices] = True
        if n_regrow:
            cand = torch.where(keep, torch.full_like(g, -1.0), g)
            top = torch.topk(cand, n_regrow)
            keep[top.indices[top.values > 0]] = True
            if retained is not None and int(keep.sum()) < n_total:  # too few positive scores: top up by activity
                rest = torch.where(keep, torch.full_like(a, -math.inf), a)
                keep[torch.topk(rest, n_total - int(keep.sum())).indices] = True
        start = 0
        new = {}
        for t in ties:
            m = keep[start:start + t.units].clone()
            floor = min(self.cfg.min_channels, t.units)
            if int(m.sum()) < floor:  # never disconnect a layer
                m[torch.topk(a[start:start + t.units], floor).indices] = True
            start += t.units
            new[t.name] = m.cpu()
        self.apply_channel_masks(new)
        self.monitor.reset()
        self.updates += 1
        kept = sum(int(m.sum()) for m in self.channel_masks.values())
        rec = {"channels_kept": kept, "channels": sum(m.numel() for m in self.channel_masks.values())}
        if retained is not None:
            rec["target"] = retained
        self.history.append(rec)
        return rec

    @torch.no_grad()
    def apply_channel_masks(self, masks: dict[str, torch.Tensor]) -> None:
        """Install new channel masks: soft, through the unit gates; hard, by the filters and BN (see the module
        docstring), regrown channels re-initialised from their probe filters."""
        if not self.hard:
            for name, m in masks.items():
                self.engine.set_unit_mask(name, m)
                self.channel_masks[name] = m.clone()
            return
        modules = dict(self.engine.model.named_modules())
        ties = {t.name: t for t in self.ties}
        opt = self.engine.optimizer
        for name, m in masks.items():
            t = ties[name]
            old = self.channel_masks[name]
            grown, died = m & ~old, old & ~m
            self.channel_masks[name] = m.clone()
            if not bool((grown | died).any()):
                continue
            for p in t.producers:
                conv, bn = modules[p], modules[t.norm_of[p]]
                dev = conv.weight.device
                rows = m.to(dev).view(-1, *([1] * (conv.weight.dim() - 1))).expand_as(conv.weight)
                self.engine.set_mask(p, rows.clone())  # pruned rows 0.0, regrown rows start at 0.0
                gi, di = grown.to(dev), died.to(dev)
                if self.cfg.regrow_init == "reinit" and p in self.candidates and bool(gi.any()):
                    conv.weight[gi] = self.candidates[p].to(dev)[gi] * self.engine.mask(p)[gi]
                if conv.bias is not None:
                    conv.bias[gi | di] = 0
                bn.weight[di], bn.bias[di] = 0, 0
                bn.weight[gi], bn.bias[gi] = 1, 0
                if bn.running_mean is not None:
                    bn.running_mean[gi], bn.running_var[gi] = 0, 1
                for par in (bn.weight, bn.bias, conv.bias):
                    st = opt.state.get(par) if (opt is not None and par is not None) else None
                    for v in (st or {}).values():
                        if torch.is_tensor(v) and v.shape == par.shape:
                            v[gi | di] = 0
        if self.hard:
            self._draw_candidates()

    @torch.no_grad()
    def close_gates(self) -> None:
        """Hard mode, end of training: the unit masks of private groups take the channel masks, and the
        consumers' columns of pruned residual channels are masked (measure and compact then see them)."""
        for t in self.ties:
            m = self.channel_masks[t.name]
            if t.gated:
                self.engine.set_unit_mask(t.name, m)
                continue
            dead = ~m
            if not bool(dead.any()):
                continue
            for layer, span in t.consumers:
                if layer not in self.engine.layers:
                    continue
                w = self.engine.mask(layer)
                cols = dead.to(w.device).repeat_interleave(span)
                keep = w.clone()
                keep[:, cols] = False
                self.engine.set_mask(layer, keep)

    # ---------------------------------------------------------------------------------------- reporting
    def channel_fraction(self) -> float:
        kept = sum(int(m.sum()) for m in self.channel_masks.values())
        return kept / max(1, sum(m.numel() for m in self.channel_masks.values()))

    def density(self) -> float:
        """Fraction of non-zero prunable weights as ``measure`` will count them: in hard mode the pruned channels'
        consumer columns count as dead already (their gates only close at the end of training)."""
        if not self.hard:
            return self.engine.density()
        eff = self.engine.effective_weights()
        for t in self.ties:
            dead = ~self.channel_masks[t.name]
            if bool(dead.any()):
                for layer, span in t.consumers:
                    if layer in eff:
                        eff[layer][:, dead.to(eff[layer].device).repeat_interleave(span)] = 0
        nz = sum(int((eff[n] != 0).sum()) for n in self.engine.layers)
        return nz / max(1, sum(eff[n].numel() for n in self.engine.layers))

    def epoch_metrics(self, state: LoopState) -> dict:
        return {"density": self.density(), "channels_kept": self.channel_fraction()}

    def summary(self) -> dict:
        return {"mode": self.cfg.mode,
                "channels_kept": {n: int(m.sum()) for n, m in self.channel_masks.items()},
                "channels": {n: m.numel() for n, m in self.channel_masks.items()},
                "tied": {t.name: t.neurons for t in self.ties if len(t.neurons) > 1},
                "channel_fraction": self.channel_fraction()}

    def extra_state(self) -> dict:
        return {"monitor": self.monitor.state_dict(),
                "unit_grad": {k: v.cpu() for k, v in self.engine.unit_grad.items()},
                "channel_masks": {k: v.clone() for k, v in self.channel_masks.items()},
                "bn_grad": {k: v.cpu() for k, v in self.bn_grad.items()},
                "candidates": {k: v.cpu() for k, v in self.candidates.items()}, "updates": self.updates}

    def load_extra_state(self, state: dict) -> None:
        self.monitor.load_state_dict(state.get("monitor", {}))
        self.engine.unit_grad = dict(state.get("unit_grad", {}))
        masks = state.get("channel_masks")
        if masks is None and not self.hard:  # a soft checkpoint from before channel_masks: the unit masks hold them
            masks = {t.name: self.engine.unit_mask(t.name).cpu() for t in self.ties if t.gated}
        for k, v in (masks or {}).items():
            if k in self.channel_masks:
                self.channel_masks[k] = v.clone().to(torch.bool)
        self.bn_grad = dict(state.get("bn_grad", {}))
        dev = next(self.engine.model.parameters()).device
        self.candidates = {k: v.to(dev) for k, v in state.get("candidates", {}).items()}
        self.updates = int(state.get("updates", 0))
