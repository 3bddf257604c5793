"""Checkpoints in the safetensors format: weights and masks, with a small JSON of config and metrics beside.

``save_safetensors(model, "m.safetensors", config=..., metrics=...)`` writes the model's ``state_dict`` (masks
are ``bool`` tensors ``*.weight_mask`` / ``*.unit_mask``) to ``m.safetensors`` and ``m.json`` holding
``{"format": "spikeprune-safetensors", "config": ..., "metrics": ..., "masks": [...]}`` (the same JSON is in the
safetensors header under ``"spikeprune"``). :func:`load_safetensors` reads both back and, given a model of the right
architecture, re-creates the mask buffers and hooks (:func:`spikeprune.load_pruned`) before loading.
Unlike ``torch.load`` nothing is unpickled, so files from others are safe to open.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import torch
from torch import nn

from ..schema import jsonable

__all__ = ["save_safetensors", "load_safetensors", "save_run_safetensors"]

FORMAT = "spikeprune-safetensors"


def _st():
    try:
        from safetensors import torch as st
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("safetensors checkpoints need the 'safetensors' package: "
                          "pip install 'spikeprune[safetensors]'") from None
    return st


def _sidecar(path: Path) -> Path:
    return path.with_suffix(".json")


def save_safetensors(model_or_state: nn.Module | dict, path: str | Path, config: dict | None = None,
                     metrics: dict | None = None, extra: dict | None = None) -> Path:
    """Write a model's (or a state dict's) tensors to ``path`` and config/metrics to ``<path>.json`` (with
    ``extra`` entries, e.g. ``input_normalization``). Returns ``path``."""
    st = _st()
    state = model_or_state.state_dict() if isinstance(model_or_state, nn.Module) else model_or_state
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in state.items() if torch.is_tensor(v)}
    masks = sorted(k for k in tensors if k.endswith((".weight_mask", ".unit_mask")))
    meta = {"format": FORMAT, "config": jsonable(config or {}), "metrics": jsonable(metrics or {}), "masks": masks,
            **jsonable(extra or {})}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    st.save_file(tensors, str(path), metadata={"spikeprune": json.dumps(meta)})
    _sidecar(path).write_text(json.dumps(meta, indent=2) + "\n")
    # safetensors creates its file 0600; give it the mode every other output gets (the JSON's: 0666 & ~umask)
    os.chmod(path, stat.S_IMODE(os.stat(_sidecar(path)).st_mode))
    return path


def load_safetensors(path: str | Path, model: nn.Module | None = None, device: str | torch.device = "cpu",
                     example_input: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """Read ``path`` (and its JSON, from beside it or from the header). With ``model``, load the tensors into it,
    masks included (buffers and hooks re-created by :func:`spikeprune.load_pruned`; unit masks need
    ``example_input`` unless the model makes its own). Returns ``(state_dict, meta)``."""
    st = _st()
    path = Path(path)
    state = st.load_file(str(path), device=str(device))
    side = _sidecar(path)
    if side.is_file():
        meta = json.loads(side.read_text())
    else:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get("spikeprune", "{}"))
    if model is not None:
        from ..sparsity.pruned import load_pruned

        load_pruned(model, state, example_input=example_input)
    return state, meta


def save_run_safetensors(run_dir: str | Path, out: str | Path | None = None, extra: dict | None = None) -> Path:
    """Convert a finished run's ``model.pt`` (+ ``config.json``, ``results.json`` headline numbers) to
    ``model.safetensors`` + ``model.json`` (default: in the run directory)."""
    rd = Path(run_dir)
    if not (rd / "model.pt").is_file():
        raise FileNotFoundError(f"{rd} is not a finished run (needs model.pt)")
    from ..checkpoint import load_model

    state = load_model(rd / "model.pt")  # checksum verified, tensors only
    if (rd / "config.json").is_file():  # the weights must fit the run's network, or the export is of nothing
        from ..runs import run_model

        run_model(rd, warn=lambda *_: None)
    config = json.loads((rd / "config.json").read_text()) if (rd / "config.json").is_file() else {}
    metrics = {}
    if (rd / "results.json").is_file():
        res = json.loads((rd / "results.json").read_text())
        metrics = {k: v for k, v in res.items() if not isinstance(v, (list, dict))}
    return save_safetensors(state, out or rd / "model.safetensors", config=config, metrics=metrics, extra=extra)
