"""Atomic, checksummed checkpoints with fallback to the previous good one.

A checkpoint file is ``b"SPKP1" + sha256(payload) + payload`` where the payload is ``torch.save`` bytes. It is
written to a temporary file, fsynced and renamed, so a crash or a full disk never leaves a half-written
``ckpt-*.pt``; a truncated or corrupted file fails its checksum and :func:`load_latest` falls back.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
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


def save(obj: Any, path: str | Path) -> Path:
    """Write ``obj`` atomically to ``path`` (temp file, fsync, rename) with its checksum."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    payload = buf.getvalue()
    return atomic_write(path, MAGIC + hashlib.sha256(payload).digest() + payload)


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
    if hashlib.sha256(payload).digest() != digest:
        raise CheckpointError(f"checkpoint {path} fails its checksum (truncated or corrupted)")
    return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=False)


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
