"""Shared pieces of the data package: the registry, ``DatasetInfo``, ``InMemoryDataset`` and path search."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import torch
from torch.utils.data import Dataset

from ..registry import Registry

DATASETS = Registry("dataset")
register_dataset = DATASETS.register

ENV_VAR = "SPIKEPRUNE_DATA"
KINDS = ("static", "events")


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about a dataset: per-step input shape ``[C, H, W]``, classes and kind.

    ``kind`` is ``"static"`` (samples are images ``[C, H, W]``) or ``"events"`` (samples are frames
    ``[T, C, H, W]``; ``T`` holds the number of frames)."""

    name: str
    in_shape: tuple
    num_classes: int
    kind: str = "static"
    T: int | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        object.__setattr__(self, "in_shape", tuple(int(s) for s in self.in_shape))


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are in none of the searched folders; the message lists them and how to get it."""


def with_info(info: DatasetInfo | Callable[..., DatasetInfo]) -> Callable:
    """Attach ``info`` (or a function of the dataset's options) so ``dataset_info`` loads nothing."""

    def deco(fn):
        fn.info = info
        return fn

    return deco


def require(module: str, what: str, pip: str) -> ModuleType:
    """Import an optional dependency, or raise an ``ImportError`` saying which package to install."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ImportError(f"{what} needs the optional package {pip!r}: pip install {pip}") from e


def candidate_dirs(root: str | os.PathLike | None, subdirs: Sequence[str] = (),
                   system: Iterable[str | os.PathLike] = ()) -> list[Path]:
    """Where to look for a dataset's files. An explicit ``root`` is the only place searched (with its ``subdirs``):
    falling back to another copy would train on files other than the ones named, while the run records the root
    it was given. Without one: ``$SPIKEPRUNE_DATA`` (and its ``subdirs``), then ``system``."""
    if root is not None and str(root) != "":
        base = Path(root).expanduser()
        return list(dict.fromkeys([base] + [base / s for s in subdirs]))
    out: list[Path] = []
    env = os.environ.get(ENV_VAR) or None
    if env is not None:
        base = Path(env).expanduser()
        out += [base] + [base / s for s in subdirs]
    out += [Path(s) for s in system]
    return list(dict.fromkeys(out))


def download_root(root: str | os.PathLike | None) -> Path:
    """Where ``download=True`` writes: ``root``, else ``$SPIKEPRUNE_DATA``, else ``./data``."""
    return Path(root or os.environ.get(ENV_VAR) or "data").expanduser()


def not_found(name: str, split: str, wanted: str, tried: Sequence[Path], how: str) -> DatasetNotFoundError:
    """One error naming the dataset, every folder tried and the ways to get the files."""
    lines = [f"dataset {name!r} ({split} split) not found: looked for {wanted} in"]
    lines += [f"  {p}" for p in tried] or ["  (no folder: pass root= or set $" + ENV_VAR + ")"]
    lines += [f"To get it: {how}.", f"Point root= (--data-root) or ${ENV_VAR} at the folder with the files."]
    return DatasetNotFoundError("\n".join(lines))


class InMemoryDataset(Dataset):
    """A whole dataset held as two tensors (``x`` ``[N, C, H, W]`` uint8 or float, ``y`` ``[N]`` int64), so
    batches are tensor slices; uint8 is scaled to [0, 1] and per-channel ``mean``/``std`` applied on the
    fly."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo,
                 mean: Sequence[float] | torch.Tensor | None = None,
                 std: Sequence[float] | torch.Tensor | None = None):
        if x.dim() != 4 or y.dim() != 1 or len(x) != len(y):
            raise ValueError(f"expected x [N, C, H, W] and y [N], got {list(x.shape)} and {list(y.shape)}")
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.x = x
        self.y = y.long()
        self.info = info
        self.mean = None if mean is None else torch.as_tensor(mean, dtype=torch.float32).reshape(-1, 1, 1)
        self.std = None if std is None else torch.as_tensor(std, dtype=torch.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        i = range(len(self))[int(i)]
        return self.transform(self.x[i:i + 1])[0], int(self.y[i])

    def transform(self, x: torch.Tensor, augment: Callable | None = None) -> torch.Tensor:
        """Raw batch -> float32 model input: uint8 / 255, ``augment`` (on [0, 1] values), then normalise."""
        x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
        if augment is not None:
            x = augment(x)
        if self.mean is not None:
            x = (x - self.mean.to(x.device)) / self.std.to(x.device)
        return x

    def subset(self, indices: Sequence[int] | torch.Tensor) -> InMemoryDataset:
        """A new dataset holding only ``indices`` (same info and normalisation)."""
        idx = torch.as_tensor(indices, dtype=torch.long)
        return InMemoryDataset(self.x[idx], self.y[idx], self.info, self.mean, self.std)

    def to(self, device: str | torch.device) -> InMemoryDataset:
        """Move the tensors to ``device`` (e.g. keep a small dataset on the GPU); returns ``self``."""
        self.x, self.y = self.x.to(device), self.y.to(device)
        return self

    def __repr__(self) -> str:
        return f"InMemoryDataset({self.info.name}, n={len(self)}, x={list(self.x.shape)} {self.x.dtype})"
