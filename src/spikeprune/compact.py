"""Compaction: turn a masked SNN into a physically smaller dense one.

Every dead unit (a ``unit_mask`` entry that is False) of every prunable group (see :mod:`spikeprune.graph`) is
sliced out: its producer rows and bias entries, its BatchNorm entries, and its consumer input columns (``span``
columns per unit after a flatten). Connection masks (``weight_mask``) are folded into the weights (masked weights
become 0.0). Neurons hold per-layer scalar parameters only, so dropping a unit drops nothing else, and the
compacted model gives the masked model's outputs. Residual-coupled groups are left whole (they cannot be masked).

The compacted model is a clean inference copy of the same class: no mask buffers, no forward/backward hooks and no
neuron observers. Those belong to training tools (mask engine, activity observers, measurement) and are bound to
the old shapes; their local functions would also stop ``torch.save`` from pickling the model. Stateful neurons are
reset.
"""

from __future__ import annotations

import copy
import itertools
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .graph import UnitGroup, analyze
from .measure import measure
from .neurons import is_neuron

__all__ = ["compact", "compact_report", "timed_inference"]

_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_HOOK_FLAGS = ("_forward_hooks_with_kwargs", "_forward_hooks_always_called", "_forward_pre_hooks_with_kwargs")


def _clean_copy(model: nn.Module) -> nn.Module:
    """Deep copy without hooks and observers (shared through the memo so they are never copied, then dropped)."""
    memo: dict = {}
    for m in model.modules():
        for fn in itertools.chain(*(getattr(m, d, {}).values() for d in _HOOKS), getattr(m, "observers", ())):
            memo[id(fn)] = fn
    new = copy.deepcopy(model, memo)
    for m in new.modules():
        for d in _HOOKS + _HOOK_FLAGS:
            if getattr(m, d, None) is not None:
                getattr(m, d).clear()
        if isinstance(getattr(m, "observers", None), list):
            m.observers = []
    return new


def _reset_neurons(model: nn.Module) -> None:
    for m in model.modules():
        if is_neuron(m) and callable(getattr(m, "reset", None)):
            m.reset()


def _take(m: nn.Module, name: str, dim: int, idx: torch.Tensor) -> None:
    """Keep entries ``idx`` along ``dim`` of parameter or buffer ``name`` (if present)."""
    t = getattr(m, name, None)
    if t is None:
        return
    sliced = t.detach().index_select(dim, idx.to(t.device))
    if isinstance(t, nn.Parameter):
        setattr(m, name, nn.Parameter(sliced, requires_grad=t.requires_grad))
    else:
        m._buffers[name] = sliced


def _check_dense(name: str, m: nn.Module) -> None:
    if getattr(m, "groups", 1) != 1:
        raise ValueError(f"cannot compact grouped convolution {name!r} (groups={m.groups})")


@torch.no_grad()
def _slice_group(modules: dict[str, nn.Module], g: UnitGroup, alive: torch.Tensor) -> None:
    """Remove the dead units of one group from its producers, norms and consumers."""
    keep = alive.nonzero().flatten().cpu()
    if keep.numel() == 0:  # torch layers cannot have 0 channels: keep unit 0 and cut it off from its consumers
        keep = torch.zeros(1, dtype=torch.long)
    n = keep.numel()
    for p in g.producers:
        m = modules[p]
        _check_dense(p, m)
        _take(m, "weight", 0, keep)
        _take(m, "bias", 0, keep)
        setattr(m, "out_features" if isinstance(m, nn.Linear) else "out_channels", n)
    for b in g.norms:
        bn = modules[b]
        for attr in ("weight", "bias", "running_mean", "running_var"):
            _take(bn, attr, 0, keep)
        bn.num_features = n
    for c, span in g.consumers:
        m = modules[c]
        _check_dense(c, m)
        cols = (keep[:, None] * span + torch.arange(span)).flatten()  # unit u owns columns u*span .. u*span+span-1
        _take(m, "weight", 1, cols)
        setattr(m, "in_features" if isinstance(m, nn.Linear) else "in_channels", n * span)
        if not alive.any():
            m.weight.zero_()


@torch.no_grad()
def compact(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """Return a new, physically smaller model without the dead units of ``model`` (which is left untouched).

    ``example_input`` (default ``model.example_input(2)``) is needed to analyse the model when it has unit masks.
    Raises ``ValueError`` for a dead unit outside a prunable group or a structure the slices would break.
    """
    if isinstance(getattr(model, "module", None), nn.Module):  # DDP / DataParallel
        model = model.module
    new = _clean_copy(model)
    modules = dict(new.named_modules())
    unit_masks: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        wm = m._buffers.pop("weight_mask", None)
        if wm is not None:
            m.weight.masked_fill_(~wm.to(torch.bool), 0.0)
        um = m._buffers.pop("unit_mask", None)
        if um is not None and not bool(um.all()):
            unit_masks[name] = um.to(torch.bool)
    _reset_neurons(new)
    if not unit_masks:
        return new
    if example_input is None:
        if not hasattr(model, "example_input"):
            raise ValueError("compacting unit masks needs an example_input to analyse the model")
        example_input = model.example_input(2)
    x = example_input.to(next(new.parameters()).device)
    groups = {g.neuron: g for g in analyze(new, x)}
    for name, alive in unit_masks.items():
        g = groups.get(name)
        if g is None or not g.prunable:
            raise ValueError(f"spiking layer {name!r} has dead units but is not a prunable group "
                             "(residual-coupled, output layer, or not reached by the example input)")
        _slice_group(modules, g, alive)
    was = new.training
    new.eval()
    try:  # a layer between a neuron and its consumers that depends on the unit count (e.g. BN after it) fails here
        new(x)
    except RuntimeError as e:
        raise ValueError(f"compacted {type(new).__name__} does not run: {e}") from None
    finally:
        new.train(was)
        _reset_neurons(new)
    return new


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def _forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    was = model.training
    model.eval()
    try:
        return model(x.to(_device(model)))
    finally:
        model.train(was)


@torch.no_grad()
def timed_inference(model: nn.Module, batches: Sequence[torch.Tensor], repeats: int = 3, warmup: int = 1) -> float:
    """Seconds per batch of ``model`` in eval mode over ``batches`` (after ``warmup`` untimed passes)."""
    if not batches:
        raise ValueError("timed_inference needs at least one batch")
    dev = _device(model)
    batches = [b.to(dev) for b in batches]

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    was = model.training
    model.eval()
    try:
        with torch.no_grad():  # inference: no graph (and the neurons keep no membrane buffer)
            for _ in range(warmup):
                model(batches[0])
            sync()
            t0 = time.perf_counter()
            for _ in range(repeats):
                for b in batches:
                    model(b)
            sync()
        return (time.perf_counter() - t0) / (max(1, repeats) * len(batches))
    finally:
        model.train(was)


def _params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "-"


def compact_report(model: nn.Module, loader: Iterable, out: str | None = None, max_batches: int | None = None,
                   repeats: int = 3, timing_batches: int = 5, reference: nn.Module | None = None) -> str:
    """Compact ``model``, measure and time both versions on ``loader``, save the compacted module to ``out``
    (whole module: its shapes no longer match the class defaults) and return a Markdown comparison table.

    ``reference``: the same network at full width with its masks folded into the weights (no mask hooks); it is
    timed too, and its time over the compacted one's is the speed-up that compaction itself brings (the masked
    model's own time also pays for applying the masks)."""
    batches = [b[0] for b in itertools.islice(loader, min(timing_batches, max_batches or timing_batches))]
    if not batches:
        raise ValueError("compact_report() got an empty loader")
    small = compact(model, batches[0][:2].to(_device(model)))
    before = measure(model, loader, max_batches=max_batches)
    after = measure(small, loader, max_batches=max_batches)
    diff = float((_forward(model, batches[0]) - _forward(small, batches[0])).abs().max())
    t_before = timed_inference(model, batches, repeats)
    t_after = timed_inference(small, batches, repeats)
    t_ref = timed_inference(reference, batches, repeats) if reference is not None else None
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        import io

        from .checkpoint import atomic_write

        buf = io.BytesIO()
        torch.save(small, buf)
        atomic_write(out, buf.getvalue())
    p0, p1 = _params(model), _params(small)
    acc = [f"{100 * m.accuracy:.2f}%" if m.accuracy is not None else "-" for m in (before, after)]
    where = f"{_device(model).type}, batch {batches[0].shape[0]}"
    rows = ["| | original | compacted | original / compacted |", "|---|---:|---:|---:|",
            f"| parameters (stored) | {p0:,} | {p1:,} | {_ratio(p0, p1)} |",
            f"| parameters (non-zero) | {before.params:,} | {after.params:,} | {_ratio(before.params, after.params)} |",
            f"| dense MACs / sample | {before.dense_macs:,.0f} | {after.dense_macs:,.0f} | "
            f"{_ratio(before.dense_macs, after.dense_macs)} |",
            f"| accuracy | {acc[0]} | {acc[1]} | |",
            f"| max abs output difference (first batch) | | {diff:.3g} | |",
            f"| inference s / batch ({where}) | {t_before:.4g} | {t_after:.4g} | {_ratio(t_before, t_after)} |"]
    if t_ref is not None:
        rows.append(f"| inference s / batch, masks folded at full width (no mask hooks) | {t_ref:.4g} | "
                    f"{t_after:.4g} | {_ratio(t_ref, t_after)} |")
    if out is not None:
        rows.append(f"\ncompacted model saved to `{out}` (load with `torch.load(path, weights_only=False)`)")
    return "\n".join(rows)
