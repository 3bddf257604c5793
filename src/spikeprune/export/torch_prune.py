"""Interoperate with ``torch.nn.utils.prune``: its ``weight_orig`` parameter + ``weight_mask`` buffer + forward
pre-hook form.

* :func:`to_torch_prune` returns a copy of the model in that form: every Conv/Linear with a mask gets
  ``prune.custom_from_mask`` with the mask of its *effective* weights (connection mask and dead units' fan-in rows
  and fan-out columns), so ``module.weight == weight_orig * weight_mask`` is the masked model's weight, and any
  tool built on ``torch.nn.utils.prune`` (``prune.remove``, ``prune.is_pruned``, Lightning's ``ModelPruning``)
  takes it from there. spikeprune's own buffers, hooks and observers are left out of the copy.
* :func:`from_torch_prune` goes the other way, in place: each pruned module's mask becomes a mask-engine
  connection mask (``prune.remove`` first folds it into the weight), and the engine is returned.

Unit masks have no counterpart in ``torch.nn.utils.prune``: they travel as rows/columns of zeros in the masks, and
come back as connection masks.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from torch.nn.utils import prune as tprune

from ..compact import _clean_copy
from ..graph import SYNAPTIC
from ..sparsity.masks import MaskEngine

__all__ = ["to_torch_prune", "from_torch_prune", "torch_prune_masks"]


@torch.no_grad()
def _allowed(model: nn.Module, example_input: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Per synaptic layer with any mask: the bool mask of the weights the masks let live."""
    from ..measure import effective_weights

    modules = dict(model.named_modules())
    masked = {n for n, m in modules.items() if isinstance(m, SYNAPTIC) and getattr(m, "weight_mask", None) is not None}
    has_units = any(getattr(m, "unit_mask", None) is not None for m in modules.values())
    if not masked and not has_units:
        return {}
    # effective weights of an all-ones copy: exactly the entries the masks keep, whatever the weights' values
    ones = {}
    for n, m in modules.items():
        if isinstance(m, SYNAPTIC):
            ones[n] = m.weight.detach().clone()
            m.weight.fill_(1.0)
    try:
        if example_input is None and has_units and hasattr(model, "example_input"):
            example_input = model.example_input(2)
        eff = effective_weights(model, example_input)
    finally:
        for n, w in ones.items():
            modules[n].weight.copy_(w)
    out = {}
    for n, w in eff.items():
        keep = w != 0
        if n in masked or not bool(keep.all()):
            out[n] = keep
    return out


def to_torch_prune(model: nn.Module, example_input: torch.Tensor | None = None) -> nn.Module:
    """A copy of ``model`` with each masked Conv/Linear re-parametrised by ``torch.nn.utils.prune``
    (``weight_orig``, ``weight_mask`` as float 0/1, forward pre-hook). ``example_input`` is needed to fold unit
    masks (default ``model.example_input(2)``)."""
    masks = _allowed(model, example_input)
    new = _clean_copy(model)
    modules = dict(new.named_modules())
    for m in modules.values():
        m._buffers.pop("weight_mask", None)
        m._buffers.pop("unit_mask", None)
    for n, mask in masks.items():
        tprune.custom_from_mask(modules[n], "weight", mask.to(modules[n].weight.device))
    return new


def torch_prune_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    """``{layer: bool mask}`` of every module pruned with ``torch.nn.utils.prune`` on its ``weight``."""
    out = {}
    for n, m in model.named_modules():
        if hasattr(m, "weight_orig") and isinstance(getattr(m, "weight_mask", None), torch.Tensor):
            if any(isinstance(h, tprune.BasePruningMethod) and h._tensor_name == "weight"
                   for h in m._forward_pre_hooks.values()):
                out[n] = m.weight_mask.detach().to(torch.bool).clone()
    return out


def from_torch_prune(model: nn.Module, engine: MaskEngine | None = None,
                     ignored_layers: Iterable[str] = ()) -> MaskEngine:
    """Turn ``torch.nn.utils.prune`` masks of ``model`` into mask-engine connection masks, in place.

    Each pruned module is made permanent with ``prune.remove`` (weight = orig × mask), then its mask is installed
    in ``engine`` (a new :class:`MaskEngine` over ``model`` when None; ``ignored_layers`` as for the engine).
    Layers without a torch mask keep a dense mask. Returns the engine."""
    masks = torch_prune_masks(model)
    for n in masks:
        tprune.remove(dict(model.named_modules())[n], "weight")
    if engine is None:
        engine = MaskEngine(model, ignored_layers=ignored_layers)
    missing = sorted(set(masks) - set(engine.layers))
    if missing:
        raise ValueError(f"torch masks on layers the engine does not prune: {missing}")
    engine.set_masks(masks)
    return engine
