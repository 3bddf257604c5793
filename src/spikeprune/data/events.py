"""Event-camera datasets through the optional ``tonic`` package, turned into ``[T, 2, 48, 48]`` frames."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ._core import DatasetInfo, candidate_dirs, download_root, not_found, register_dataset, require, with_info

SIZE = 48


class FrameDataset(Dataset):
    """Wraps a tonic dataset whose transform makes ``[T, 2, H, W]`` frames; resizes them to 48x48."""

    def __init__(self, base: Dataset, indices: list[int], info: DatasetInfo):
        self.base, self.indices, self.info = base, indices, info

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        frames, label = self.base[self.indices[i]]
        frames = torch.as_tensor(np.asarray(frames), dtype=torch.float32)
        return F.interpolate(frames, size=(SIZE, SIZE), mode="area"), int(label)


def _dvs_info(T: int = 10, **_) -> DatasetInfo:
    return DatasetInfo("dvs_cifar10", (2, SIZE, SIZE), 10, "events", int(T))


@register_dataset("dvs_cifar10")
@with_info(_dvs_info)
def dvs_cifar10(split: str = "train", root=None, download: bool = False, T: int = 10) -> FrameDataset:
    """CIFAR10-DVS via tonic as ``T`` event-count frames at 48x48; the first 90% of each class (by file name)
    is the train split, the rest the test split (the dataset has no official split)."""
    tonic = require("tonic", "dataset 'dvs_cifar10'", "tonic")
    tried = [d / "CIFAR10DVS" for d in candidate_dirs(root)]
    where = next((d.parent for d in tried if d.is_dir()), None)
    if where is None and not download:
        raise not_found("dvs_cifar10", split, "CIFAR10DVS/", tried, "download=True (tonic fetches it, "
                        "several GB), or unpack CIFAR10DVS/ into one of these folders")
    where = where or download_root(root)
    cls = tonic.datasets.CIFAR10DVS
    to_frame = tonic.transforms.ToFrame(sensor_size=cls.sensor_size, n_time_bins=T)
    base = cls(save_to=str(where), transform=to_frame)
    targets = np.asarray(base.targets)
    indices: list[int] = []
    for c in range(10):
        idx = sorted(np.flatnonzero(targets == c).tolist(), key=lambda i: base.data[i])
        k = int(0.9 * len(idx))
        indices += idx[:k] if split == "train" else idx[k:]
    return FrameDataset(base, indices, _dvs_info(T))
