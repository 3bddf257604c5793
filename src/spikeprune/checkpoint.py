"""Atomic, checksummed checkpoints with fallback to the previous good one.

A checkpoint file is ``b"SPKP1" + sha256(payload) + payload`` where the payload is ``torch.save`` bytes. It is
written to a temporary file, fsynced and renamed, so a crash or a full disk never leaves a half-written
``ckpt-*.pt``; a truncated or corrupted file fails its checksum and :func:`load_latest` falls back.

Nothing read here can run code: payloads are loaded with ``torch.load(weights_only=True)``, which rebuilds only
tensors and plain containers (the checksum guards against corruption, not against a forged file, so it is not what
keeps loading safe). :func:`plain` turns what a training state holds (NumPy arrays and scalars, paths) into those
types before saving. A finished run's ``model.pt`` is a plain ``torch.save`` state dict with a ``model.pt.sha256``
beside it (:func:`save_model` / :func:`load_model`), so ``sha256sum -c`` checks it too.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from collections import OrderedDict
from pathlib import Path
from typing import Any

import torch

MAGIC = b"SPKP1"
_NAME = re.compile(r"ckpt-(\d+)\.pt$")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read (missing, truncated, or failing its checksum)."""


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically: temp file, fsync, rename, fsync of the folder. A crash leaves the old
    file or the new one, never a mix."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)
    return path


def plain(obj: Any) -> Any:
    """``obj`` with NumPy arrays as tensors, NumPy scalars as Python numbers and paths as strings: the types that
    ``torch.load(weights_only=True)`` accepts. Anything else that is not a tensor, number, string, bytes, ``None``
    or a list/tuple/dict of them raises ``TypeError`` now instead of making an unloadable checkpoint."""
    import numpy as np

    if isinstance(obj, dict):
        items = [(plain(k), plain(v)) for k, v in obj.items()]
        return OrderedDict(items) if isinstance(obj, OrderedDict) else dict(items)
    if isinstance(obj, (list, tuple)):
        return tuple(plain(v) for v in obj) if isinstance(obj, tuple) else [plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.copy())
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if obj is None or isinstance(obj, (bool, int, float, str, bytes, torch.Tensor, torch.Size, torch.dtype,
                                       torch.device)):
        return obj
    raise TypeError(f"cannot checkpoint a {type(obj).__name__} (only tensors, numbers, strings and containers)")


def _digest(payload: bytes) -> bytes:
    return hashlib.sha256(payload).digest()


def save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` (made :func:`plain`) atomically to ``path`` (temp file, fsync, rename) with its checksum."""
    buf = io.BytesIO()
    torch.save(plain(obj), buf)
    payload = buf.getvalue()
    return atomic_write(path, MAGIC + _digest(payload) + payload)


def load(path: str | Path, map_location: Any = "cpu") -> Any:
    """Read a checkpoint written by :func:`save`, verifying its checksum."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror}") from None
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 32:
        raise CheckpointError(f"{path} is not a spikeprune checkpoint (or is truncated)")
    digest, payload = data[len(MAGIC):len(MAGIC) + 32], data[len(MAGIC) + 32:]
    if _digest(payload) != digest:
        raise CheckpointError(f"checkpoint {path} fails its checksum (truncated or corrupted)")
    return _safe_load(io.BytesIO(payload), path, map_location)


def _safe_load(f: Any, path: Path, map_location: Any = "cpu") -> Any:
    """``torch.load`` that rebuilds only tensors and plain containers: a file asking for any other object (the
    way a malicious pickle runs code) is refused with a :class:`CheckpointError` naming the file."""
    import pickle
    import zipfile

    try:
        return torch.load(f, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e)
        glob = next((ln.strip() for ln in text.splitlines() if "global" in ln.lower()), "")
        if glob:  # the file names a function or class to call: how a malicious pickle runs code
            raise CheckpointError(f"{path} asks to load objects other than tensors and plain data; refused "
                                  f"({glob[:160]})") from None
        raise CheckpointError(f"{path} is not a readable PyTorch file ({text.splitlines()[0][:160]})") from None
    except (RuntimeError, EOFError, ValueError, zipfile.BadZipFile, KeyError, AttributeError, TypeError,
            OverflowError, MemoryError) as e:
        raise CheckpointError(f"{path} is not a readable PyTorch file ({type(e).__name__}: "
                              f"{str(e).splitlines()[0][:160] if str(e) else 'no detail'})") from None


def save_model(state: dict, path: str | Path) -> Path:
    """Write a model ``state_dict`` as a plain ``torch.save`` file (any PyTorch user can read it) and its sha256
    beside it (``<name>.sha256``, the ``sha256sum`` format), both atomically."""
    path = Path(path)
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()
    atomic_write(path, data)
    atomic_write(path.with_name(path.name + ".sha256"), f"{hashlib.sha256(data).hexdigest()}  {path.name}\n".encode())
    return path


def load_model(path: str | Path, map_location: Any = "cpu", warn=None) -> dict:
    """Read a model file written by :func:`save_model`: its checksum is verified when ``<name>.sha256`` is there
    (a missing one is reported through ``warn``), and only tensors and plain containers are rebuilt."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e.strerror}") from None
    side = path.with_name(path.name + ".sha256")
    if side.is_file():
        try:
            want = side.read_text().split()[0].lower()
        except (OSError, UnicodeDecodeError, IndexError):
            raise CheckpointError(f"cannot read the checksum file {side}") from None
        if hashlib.sha256(data).hexdigest() != want:
            raise CheckpointError(f"{path} fails its checksum ({side.name}): the file is corrupted or was changed")
    elif warn is not None:
        warn(f"warning: {path} has no {side.name} beside it; its integrity is not checked")
    state = _safe_load(io.BytesIO(data), path, map_location)
    if not isinstance(state, dict) or not all(isinstance(k, str) and torch.is_tensor(v) for k, v in state.items()):
        raise CheckpointError(f"{path} does not hold a model state_dict (names to tensors)")
    return state


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Checkpoints of a run, newest first."""
    d = Path(run_dir)
    found = [(int(m.group(1)), p) for p in d.glob("ckpt-*.pt") if (m := _NAME.search(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def save_rotating(obj: Any, run_dir: str | Path, step: int, keep: int = 2) -> Path:
    """Save ``ckpt-<step>.pt`` and delete all but the ``keep`` newest. Checkpoints of a *later* step belong to a
    timeline that a resume abandoned (e.g. a corrupt newest file it skipped) and are deleted too: counting them
    as newest would delete the file just written and keep only them."""
    path = save(obj, Path(run_dir) / f"ckpt-{step:09d}.pt")
    found = list_checkpoints(run_dir)
    later = [p for p in found if int(_NAME.search(p.name).group(1)) > step]
    kept = [p for p in found if p not in later]
    for old in [*later, *kept[keep:]]:
        old.unlink(missing_ok=True)
    return path


def load_latest(run_dir: str | Path, map_location: Any = "cpu", warn=print) -> tuple[Any, Path]:
    """Load the newest readable checkpoint, skipping (and reporting) corrupt ones."""
    errors = []
    for p in list_checkpoints(run_dir):
        try:
            return load(p, map_location), p
        except CheckpointError as e:
            errors.append(str(e))
            warn(f"warning: {e}; trying the previous checkpoint")
    raise CheckpointError(f"no readable checkpoint in {run_dir}" + (f" ({'; '.join(errors)})" if errors else ""))
