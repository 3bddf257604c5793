"""CIFAR-10/100 from torchvision's on-disk pickle batches, read with ``pickle`` (torchvision not needed)."""

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


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One pickle batch -> (uint8 [N, 3, 32, 32], int64 [N]); keys may be bytes (Python 2 pickles) or str."""
    with open(path, "rb") as f:
        entry = pickle.load(f, encoding="bytes")  # local dataset files in torchvision's format
    entry = {k.decode() if isinstance(k, bytes) else k: v for k, v in entry.items()}
    data = np.asarray(entry["data"], dtype=np.uint8)
    labels = np.asarray(entry[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or len(labels) != len(data):
        raise ValueError(f"{path}: expected data [N, 3072] and N labels, got {data.shape} and {labels.shape}")
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
    parts = [_read_batch(found / f, key) for f in files]
    x = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    y = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    if len(y) and int(y.max()) >= info.num_classes:
        raise ValueError(f"{found}: label {int(y.max())} out of range for {info.num_classes} classes")
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
