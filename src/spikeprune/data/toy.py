"""Small offline datasets: scikit-learn's 8x8 digits and a synthetic one for tests."""

from __future__ import annotations

from collections.abc import Sequence

import torch

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


def _synthetic_info(in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, **_) -> DatasetInfo:
    return DatasetInfo("synthetic", tuple(in_shape), int(num_classes), "static")


@register_dataset("synthetic")
@with_info(_synthetic_info)
def synthetic(split: str = "train", root=None, download: bool = False, n: int = 256,
              in_shape: Sequence[int] = (1, 28, 28), num_classes: int = 10, seed: int = 0) -> InMemoryDataset:
    """For tests only: deterministic uint8 noise around one random binary pattern per class (learnable)."""
    info = _synthetic_info(in_shape, num_classes)
    if n < 0 or info.num_classes < 1 or len(info.in_shape) != 3:
        raise ValueError(f"synthetic needs n >= 0, num_classes >= 1 and in_shape (C, H, W), got n={n}, "
                         f"num_classes={num_classes}, in_shape={in_shape}")
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand((info.num_classes, *info.in_shape), generator=g) > 0.5
    g = torch.Generator().manual_seed(2 * seed + 1 + int(split == "test"))
    y = (torch.arange(n) % info.num_classes)[torch.randperm(n, generator=g)]
    x = 0.25 + 0.5 * protos[y].float() + 0.15 * torch.randn((n, *info.in_shape), generator=g)
    x = (x.clamp(0, 1) * 255).round().to(torch.uint8)
    return InMemoryDataset(x, y, info)
