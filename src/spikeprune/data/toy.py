"""Small offline datasets: scikit-learn's 8x8 digits and a synthetic one for tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from ._core import DatasetInfo, InMemoryDataset, register_dataset, require, with_info

DIGITS_INFO = DatasetInfo("digits", (1, 8, 8), 10, "static")


@register_dataset("digits")
@with_info(DIGITS_INFO)
def digits(split: str = "train", root=None, download: bool = False) -> InMemoryDataset:
    """scikit-learn's bundled 8x8 digits (1797 images, values scaled to [0, 1]), split 80/20 with seed 0."""
    datasets = require("sklearn.datasets", "dataset 'digits'", "scikit-learn")
    d = datasets.load_digits()
    x = torch.tensor(d.data, dtype=torch.float32).reshape(-1, 1, 8, 8) / 16
    y = torch.tensor(d.target, dtype=torch.int64)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    n_test = round(0.2 * len(y))
    idx = (perm[:n_test] if split == "test" else perm[n_test:]).sort().values
    return InMemoryDataset(x[idx], y[idx], DIGITS_INFO)


def _synthetic_info(in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, T: int | None = None,
                    **_) -> DatasetInfo:
    if T is None:
        return DatasetInfo("synthetic", tuple(in_shape), int(num_classes), "static")
    return DatasetInfo("synthetic", tuple(in_shape), int(num_classes), "events", int(T))


class SyntheticFrames(Dataset):
    """For tests only: event-style samples ``[T, C, H, W]`` (float32) held in memory, iterated like the real event
    datasets (a plain ``Dataset``, so ``build_loaders`` wraps it in an ``EventLoader``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, info: DatasetInfo):
        self.x, self.y, self.info = x, y.long(), info

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i], int(self.y[i])

    def __repr__(self) -> str:
        return f"SyntheticFrames(n={len(self)}, x={list(self.x.shape)})"


@register_dataset("synthetic")
@with_info(_synthetic_info)
def synthetic(split: str = "train", root=None, download: bool = False, n: int = 256,
              in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, seed: int = 0,
              T: int | None = None) -> InMemoryDataset | SyntheticFrames:
    """For tests only: deterministic uint8 noise around one random binary pattern per class (learnable).

    With ``T`` set the dataset mimics an event dataset (kind ``"events"``): each sample is ``T`` frames
    ``[T, C, H, W]`` (float event counts in [0, 1]) drawn around the class pattern."""
    info = _synthetic_info(in_shape, num_classes, T)
    if n < 0 or info.num_classes < 1 or len(info.in_shape) != 3 or (T is not None and T < 1):
        raise ValueError(f"synthetic needs n >= 0, num_classes >= 1, T >= 1 or null and in_shape (C, H, W), got "
                         f"n={n}, num_classes={num_classes}, T={T}, in_shape={in_shape}")
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand((info.num_classes, *info.in_shape), generator=g) > 0.5
    g = torch.Generator().manual_seed(2 * seed + 1 + int(split == "test"))
    y = (torch.arange(n) % info.num_classes)[torch.randperm(n, generator=g)]
    if T is not None:
        p = 0.2 + 0.6 * protos[y].float()  # per-pixel event probability
        x = (torch.rand((n, int(T), *info.in_shape), generator=g) < p.unsqueeze(1)).float()
        return SyntheticFrames(x, y, info)
    x = 0.25 + 0.5 * protos[y].float() + 0.15 * torch.randn((n, *info.in_shape), generator=g)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return InMemoryDataset(x, y, info)
