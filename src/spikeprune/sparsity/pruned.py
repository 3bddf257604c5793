"""Load a pruned model's weights and masks into a fresh net: one call for a ``state_dict``, a ``torch.save``'d
state file or a safetensors file.

A pruned model's ``state_dict`` holds its masks as buffers: ``<layer>.weight_mask`` (bool, one per weight) on each
pruned Conv/Linear and ``<neuron>.unit_mask`` (bool, one per neuron or channel) on each spiking layer with unit
masks. A fresh net has no such buffers, so ``net.load_state_dict(state)`` fails on unexpected keys.
:func:`load_pruned` creates them first (and the hooks that apply unit masks on SpikingJelly and snnTorch neurons),
then loads: the fresh net's outputs equal the pruned model's. Unit masks are placed by tracing the net once, on
``example_input`` (one small batch as the net takes it; spikeprune's zoo models make their own).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..graph import SYNAPTIC
from .masks import MaskEngine

__all__ = ["load_pruned", "read_state"]


def read_state(source: dict | str | Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """A state dict from ``source``: a dict (returned as is), a ``.safetensors`` file, or a ``torch.save``'d state
    dict (read with ``weights_only=True``: nothing but tensors is unpickled)."""
    if isinstance(source, dict):
        return source
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {path}")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError:  # pragma: no cover - depends on the environment
            raise ImportError("safetensors files need the 'safetensors' package: pip install safetensors") from None
        return load_file(str(path), device=str(map_location))
    state = torch.load(path, map_location=map_location, weights_only=True)
    if isinstance(state, nn.Module):  # pragma: no cover - weights_only refuses modules
        return state.state_dict()
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"{path} holds no state dict of tensors (a whole pickled model loads with "
                         "torch.load(path, weights_only=False))")
    return state


def load_pruned(model: nn.Module, source: dict | str | Path, example_input: torch.Tensor | None = None,
                strict: bool = True, map_location: str | torch.device = "cpu") -> nn.Module:
    """Load a pruned ``state_dict`` (a dict, a ``.pt`` state file or a ``.safetensors`` file), masks included, into
    ``model``, a fresh net of the same architecture; returns ``model``.

    ``weight_mask`` buffers are created on the layers the state masks, ``unit_mask`` buffers on the spiking layers
    it masks (with the hooks that apply them), then ``model.load_state_dict(state, strict)`` runs. Unit masks need
    ``example_input`` (one small batch, as the model takes it) unless the model makes its own
    (``model.example_input``). Train on from here with :func:`spikeprune.prune` (it keeps the loaded masks), or
    deploy as is: masked weights are 0.0 and dead units silent."""
    load_into(model, read_state(source, map_location), example_input, strict)
    return model


def load_into(model: nn.Module, state: dict, example_input: torch.Tensor | None = None,
              strict: bool = True) -> MaskEngine | None:
    """:func:`load_pruned` of a state dict; returns the :class:`MaskEngine` holding the masks (``None``: dense)."""
    weight_masked = [k[: -len(".weight_mask")] for k in state if k.endswith(".weight_mask")]
    unit_masked = [k[: -len(".unit_mask")] for k in state if k.endswith(".unit_mask")]
    if not weight_masked and not unit_masked:
        model.load_state_dict(state, strict=strict)
        return None
    modules = dict(model.named_modules())
    missing = [n for n in [*weight_masked, *unit_masked] if n not in modules]
    if missing:
        raise ValueError(f"the state masks modules this model does not have: {missing[:5]} (another architecture?)")
    if unit_masked and example_input is None:
        if not hasattr(model, "example_input"):
            shown = ", ".join(unit_masked[:3]) + (" ..." if len(unit_masked) > 3 else "")
            raise ValueError(f"the state has unit masks ({shown}): pass example_input= (one small batch, as the "
                             "model takes it) to trace which layers they gate")
        example_input = model.example_input(2)
    if example_input is not None:
        p = next(model.parameters(), None)
        example_input = example_input.to(p.device) if p is not None else example_input
    ignored = [n for n, m in modules.items() if isinstance(m, SYNAPTIC) and n not in weight_masked]
    engine = MaskEngine(model, ignored_layers=ignored, example_input=example_input)
    if unit_masked:
        engine.enable_units(unit_masked)
    model.load_state_dict(state, strict=strict)
    return engine
