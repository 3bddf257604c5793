"""CIFAR-10/100 from torchvision's on-disk pickle batches (torchvision not needed).

The batches are Python pickles, and a pickle can name any function to call while it loads. They are therefore read
with :class:`BatchUnpickler`, which rebuilds only NumPy arrays, lists, dicts, strings, bytes and numbers: a file
that asks for anything else is refused with an error naming the file, before any of it runs.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from ._core import (
    DatasetInfo,
    InMemoryDataset,
    candidate_dirs,
    download_root,
    not_found,
    register_dataset,
    require,
    with_info,
)

# name -> (folder, train files, test files, label key, torchvision class, mean, std)
_SPECS = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels",
                "CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "fine_labels",
                 "CIFAR100", (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
}
CIFAR10_INFO = DatasetInfo("cifar10", (3, 32, 32), 10, "static")
CIFAR100_INFO = DatasetInfo("cifar100", (3, 32, 32), 100, "static")


# the globals a CIFAR batch (written by Python 2 or 3, NumPy 1 or 2) needs to rebuild its arrays: nothing else
_ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy.core.numeric", "_frombuffer"),
            ("numpy._core.numeric", "_frombuffer"), ("_codecs", "encode")}


class RefusedGlobal(pickle.UnpicklingError):
    """A pickle asked for a function or class outside the allow-list."""


class BatchUnpickler(pickle.Unpickler):
    """An unpickler that rebuilds NumPy arrays and plain containers only (see the module docstring)."""

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise RefusedGlobal(f"refused to load {module}.{name} (a CIFAR batch holds only arrays, lists and dicts)")


def _read_batch(path: Path, label_key: str, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> (uint8 [N, 3, 32, 32], int64 [N]); keys may be bytes (Python 2 pickles) or str."""
    try:
        with open(path, "rb") as f:
            entry = BatchUnpickler(f, encoding="bytes").load()
    except RefusedGlobal as e:
        raise RefusedGlobal(f"{path}: {e}") from None
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError,
            MemoryError) as e:
        raise ValueError(f"{path} is not a CIFAR batch file ({type(e).__name__}: {str(e)[:120]})") from None
    if not isinstance(entry, dict):
        raise ValueError(f"{path} is not a CIFAR batch file (holds a {type(entry).__name__}, not a dict)")
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    if "data" not in entry or label_key not in entry:
        raise ValueError(f"{path} is not a CIFAR batch file (needs the keys 'data' and {label_key!r})")
    try:
        data = np.asarray(entry["data"], dtype=np.uint8)
        labels = np.asarray(entry[label_key], dtype=np.int64)
    except (ValueError, TypeError, OverflowError) as e:
        raise ValueError(f"{path}: data or labels of the wrong type ({e})") from None
    if data.ndim != 2 or data.shape[1] != 3072 or labels.ndim != 1 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
    bad = labels[(labels < 0) | (labels >= num_classes)]
    if len(bad):
        raise ValueError(f"{path}: label {int(bad[0])} out of range for {num_classes} classes")
    return data.reshape(-1, 3, 32, 32), labels


def _load_cifar(info: DatasetInfo, split: str, root, download: bool) -> InMemoryDataset:
    folder, train_files, test_files, key, tv_class, mean, std = _SPECS[info.name]
    files = train_files if split == "train" else test_files
    dirs = candidate_dirs(root, (folder,))
    found = next((d for d in dirs if all((d / f).is_file() for f in files)), None)
    if found is None and download:
        tv = require("torchvision", f"download=True for {info.name!r}", "torchvision")
        where = download_root(root)
        getattr(tv.datasets, tv_class)(str(where), train=split == "train", download=True)
        dirs.append(where / folder)
        found = dirs[-1] if all((dirs[-1] / f).is_file() for f in files) else None
    if found is None:
        how = (f"download=True with torchvision installed (pip install torchvision), or unpack the python "
               f"version of {info.name} so that {folder}/ sits in one of these folders")
        raise not_found(info.name, split, ", ".join(files), dirs, how)
    parts = [_read_batch(found / f, key, info.num_classes) for f in files]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    return InMemoryDataset(x, y, info, mean, std)


@register_dataset("cifar10")
@with_info(CIFAR10_INFO)
def cifar10(split: str = "train", root=None, download: bool = False) -> InMemoryDataset:
    """CIFAR-10 (50000/10000 32x32 colour images, 10 classes) from ``cifar-10-batches-py``."""
    return _load_cifar(CIFAR10_INFO, split, root, download)


@register_dataset("cifar100")
@with_info(CIFAR100_INFO)
def cifar100(split: str = "train", root=None, download: bool = False) -> InMemoryDataset:
    """CIFAR-100 (50000/10000 32x32 colour images, 100 fine classes) from ``cifar-100-python``."""
    return _load_cifar(CIFAR100_INFO, split, root, download)
