"""MNIST and Fashion-MNIST from their IDX files (gzip or not), read with a small parser of our own."""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
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

# IDX type byte -> big-endian numpy dtype
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
FASHION_SYSTEM_DIRS = ("/usr/share/datasets/fashion-mnist",)  # Debian: apt-get install dataset-fashion-mnist


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (gzip or not) into a native-endian array; corrupt files raise ``ValueError``."""
    path = Path(path)
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as e:
            raise ValueError(f"{path}: corrupt gzip file ({e})") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise ValueError(f"{path}: not an IDX file (bad magic number 0x{raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: corrupt IDX file (header truncated)")
    dims = struct.unpack(f">{ndim}I", raw[4:header])
    dtype = np.dtype(_IDX_TYPES[raw[2]])
    need = math.prod(dims) * dtype.itemsize
    if len(raw) - header != need:
        raise ValueError(f"{path}: corrupt IDX file (header says shape {dims} = {need} data bytes, "
                         f"file has {len(raw) - header})")
    return np.frombuffer(raw, dtype, offset=header).reshape(dims).astype(dtype.newbyteorder("="))


def _find(folder: Path, stem: str) -> Path | None:
    for name in (stem + ".gz", stem):
        if (folder / name).is_file():
            return folder / name
    return None


def _find_pair(dirs: list[Path], split: str) -> tuple[Path, Path] | None:
    for d in dirs:
        images, labels = (_find(d, stem) for stem in _FILES[split])
        if images and labels:
            return images, labels
    return None


def _load_mnist_like(info: DatasetInfo, split: str, root, download: bool, subdirs: tuple[str, ...],
                     system: tuple[str, ...], tv_class: str, mean: float, std: float) -> InMemoryDataset:
    dirs = candidate_dirs(root, subdirs, system)
    found = _find_pair(dirs, split)
    if found is None and download:
        tv = require("torchvision", f"download=True for {info.name!r}", "torchvision")
        where = download_root(root)
        getattr(tv.datasets, tv_class)(str(where), train=split == "train", download=True)
        dirs.append(where / tv_class / "raw")
        found = _find_pair(dirs[-1:], split)
    if found is None:
        how = ("download=True with torchvision installed (pip install torchvision), or copy the four "
               "*-ubyte.gz files into one of these folders")
        if system:
            how = "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or " + how
        raise not_found(info.name, split, " and ".join(s + "[.gz]" for s in _FILES[split]), dirs, how)
    images, labels = (read_idx(p) for p in found)
    if images.ndim != 3 or images.dtype != np.uint8 or images.shape[1:] != info.in_shape[1:]:
        raise ValueError(f"{found[0]}: expected uint8 images [N, 28, 28], got {images.dtype} {images.shape}")
    if labels.ndim != 1 or len(labels) != len(images):
        raise ValueError(f"{found[1]}: expected {len(images)} labels, got shape {labels.shape}")
    if len(labels) and labels.max() >= info.num_classes:
        raise ValueError(f"{found[1]}: label {labels.max()} out of range for {info.num_classes} classes")
    x = torch.from_numpy(images).unsqueeze(1)
    return InMemoryDataset(x, torch.from_numpy(labels.astype(np.int64)), info, (mean,), (std,))


FASHION_INFO = DatasetInfo("fashion_mnist", (1, 28, 28), 10, "static")
MNIST_INFO = DatasetInfo("mnist", (1, 28, 28), 10, "static")


@register_dataset("fashion_mnist")
@with_info(FASHION_INFO)
def fashion_mnist(split: str = "train", root=None, download: bool = False) -> InMemoryDataset:
    """Fashion-MNIST (60000/10000 28x28 grey images); searches root, $SPIKEPRUNE_DATA, then Debian's copy."""
    return _load_mnist_like(FASHION_INFO, split, root, download, ("fashion-mnist", "FashionMNIST/raw"),
                            FASHION_SYSTEM_DIRS, "FashionMNIST", 0.2860, 0.3530)


@register_dataset("mnist")
@with_info(MNIST_INFO)
def mnist(split: str = "train", root=None, download: bool = False) -> InMemoryDataset:
    """MNIST (60000/10000 28x28 digits) from plain or torchvision-layout (``MNIST/raw``) IDX files."""
    return _load_mnist_like(MNIST_INFO, split, root, download, ("mnist", "MNIST/raw"), (),
                            "MNIST", 0.1307, 0.3081)
