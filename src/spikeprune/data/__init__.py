"""Datasets and loaders: ``create_dataset(name, split)``, ``dataset_info(name)``, ``build_loaders(name)``.

Files are searched in ``root``, then ``$SPIKEPRUNE_DATA``, then system folders (Debian's Fashion-MNIST);
nothing is downloaded unless ``download=True``."""

from __future__ import annotations

import os

from torch.utils.data import Dataset

from ._core import (
    DATASETS,
    ENV_VAR,
    DatasetInfo,
    DatasetNotFoundError,
    InMemoryDataset,
    register_dataset,
    with_info,
)

SPLITS = ("train", "test")


def list_datasets(pattern: str = "*") -> list[str]:
    """Names of the registered datasets (optionally filtered by a glob ``pattern``)."""
    return DATASETS.names(pattern)


def create_dataset(name: str, split: str = "train", root: str | os.PathLike | None = None,
                   download: bool = False, **kw) -> InMemoryDataset | Dataset:
    """Load split ``"train"`` or ``"test"`` of a registered dataset; unknown names or options raise
    ``ValueError``, missing files ``DatasetNotFoundError``."""
    DATASETS.get(name)
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return DATASETS.build(name, split=split, root=root, download=download, **kw)


def dataset_info(name: str, **kw) -> DatasetInfo:
    """Shape, classes and kind of a dataset without loading it (``kw``: e.g. ``T``, ``in_shape``)."""
    info = getattr(DATASETS.get(name), "info", None)
    if info is None:  # a user dataset registered without @with_info: load it once
        return create_dataset(name, "test", **kw).info
    return info(**kw) if callable(info) else info


from . import cifar, events, idx, toy  # noqa: E402,F401  (registration side effects)
from .idx import read_idx  # noqa: E402
from .loader import EventLoader, FastLoader, build_loaders, split_indices  # noqa: E402

__all__ = ["DATASETS", "ENV_VAR", "DatasetInfo", "DatasetNotFoundError", "EventLoader", "FastLoader",
           "InMemoryDataset", "build_loaders", "create_dataset", "dataset_info", "list_datasets", "read_idx",
           "register_dataset", "split_indices", "with_info"]
