"""Getting compressed SNNs out (and back in): NIR graphs, ``torch.nn.utils.prune`` masks, safetensors checkpoints.

Each format lives in its own module and imports its package (``nir``, ``safetensors``) only when used:

* :mod:`spikeprune.export.nir` — :func:`to_nir`, :func:`export_nir`, :func:`from_nir`;
* :mod:`spikeprune.export.interop` — NIR to and from snnTorch and SpikingJelly (their quirks worked around);
* :mod:`spikeprune.export.torch_prune` — :func:`to_torch_prune`, :func:`from_torch_prune`;
* :mod:`spikeprune.export.safetensors` — :func:`save_safetensors`, :func:`load_safetensors`;
* :func:`export_run` — the ``spikeprune export RUN_DIR --format ...`` command.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["export_run", "input_normalization", "FORMATS"]

FORMATS = ("nir", "safetensors", "torch-prune")


def input_normalization(loader) -> dict | None:
    """``{"mean": [...], "std": [...]}`` the data pipeline applies to the inputs of ``loader`` (per channel), or
    None when it does not normalise (or does not say)."""
    ds = getattr(loader, "dataset", None)
    mean, std = getattr(ds, "mean", None), getattr(ds, "std", None)
    if mean is None or std is None:
        return None
    return {"mean": [float(v) for v in mean.reshape(-1)], "std": [float(v) for v in std.reshape(-1)]}


def _run_normalization(rd: Path, data_root: str | None) -> dict | None:
    """The normalisation of a run's dataset (loaded as the run was trained), or None if the data is not here."""
    try:
        from ..runs import load_run as _load_run

        _, _, test = _load_run(str(rd), data_root)
    except Exception:  # noqa: BLE001 -- the export itself does not need the data
        return None
    return input_normalization(test)


def export_run(run_dir: str | Path, fmt: str = "nir", out: str | Path | None = None, data_root: str | None = None,
               dt: float | None = None, target: str = "generic") -> tuple[Path, dict]:
    """Export a finished run (``RUN_DIR/model.pt`` with its masks) and return ``(path, summary)``.

    ``nir``: masks made permanent, dead units compacted, ``RUN_DIR/model.nir`` + ``model.sparsity.json``, written
    for ``target`` (``generic``, ``snntorch``, ``spikingjelly``: see :func:`spikeprune.export.nir.to_nir`; ``dt``
    defaults to the target's); the dataset's input normalisation, if any, is the graph's first node (the graph
    takes raw inputs) and is recorded in its metadata;
    ``safetensors``: ``model.safetensors`` + ``model.json`` (weights, masks, config, headline metrics, input
    normalisation);
    ``torch-prune``: ``model_torch_prune.pt``, a state dict in ``torch.nn.utils.prune`` form (``weight_orig`` and
    ``weight_mask`` per masked layer)."""
    rd = Path(run_dir)
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {list(FORMATS)}, got {fmt!r}")
    if fmt == "safetensors":
        from .safetensors import save_run_safetensors

        norm = _run_normalization(rd, data_root)
        path = save_run_safetensors(rd, out, extra={"input_normalization": norm})
        return path, json.loads(path.with_suffix(".json").read_text())
    from ..runs import load_run as _load_run

    cfg, model, test = _load_run(str(rd), data_root)
    x = next(iter(test))[0][:2]
    if fmt == "nir":
        from .nir import export_nir

        norm = input_normalization(test)
        path = Path(out or rd / "model.nir")
        return path, export_nir(model, path, x, dt=dt, target=target,
                                normalize=None if norm is None else (norm["mean"], norm["std"]))
    import torch

    from .torch_prune import to_torch_prune

    pruned = to_torch_prune(model, x)
    path = Path(out or rd / "model_torch_prune.pt")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pruned.state_dict(), path)
    masked = sorted(k[: -len(".weight_mask")] for k in pruned.state_dict() if k.endswith(".weight_mask"))
    return path, {"format": "torch-prune", "file": path.name, "masked_layers": masked}
