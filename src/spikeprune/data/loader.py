"""Batch iteration: ``FastLoader`` slices in-memory tensors; ``build_loaders`` makes all three loaders."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from ._core import DatasetInfo, InMemoryDataset


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need world_size >= 1 and 0 <= rank < world_size, got {rank=}, {world_size=}")


class FastLoader:
    """Iterates an ``InMemoryDataset`` in ``(x float32 [B, C, H, W], y int64 [B])`` batches by slicing with a
    permutation of seed ``seed + epoch`` (call ``set_epoch`` each epoch); with ``world_size > 1`` each rank
    takes every ``world_size``-th index of the same permutation, wrapped so all ranks get equally many."""

    def __init__(self, dataset: InMemoryDataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                 drop_last: bool = False, augment: Callable | None = None, rank: int = 0,
                 world_size: int = 1):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        _check_rank(rank, world_size)
        self.dataset, self.batch_size, self.shuffle, self.seed = dataset, int(batch_size), shuffle, int(seed)
        self.drop_last, self.augment, self.rank, self.world_size = drop_last, augment, rank, world_size
        self.epoch = 0
        self.num_samples = math.ceil(len(dataset) / world_size)  # per rank

    def set_epoch(self, epoch: int) -> None:
        """Select the permutation of this epoch (``seed + epoch``), identical on every rank."""
        self.epoch = int(epoch)

    def indices(self) -> torch.Tensor:
        """This rank's sample indices for the current epoch, in iteration order."""
        n = len(self.dataset)
        if self.shuffle:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            order = torch.arange(n)
        total = self.num_samples * self.world_size
        if total > n:  # pad by wrapping around, like DistributedSampler
            order = torch.cat([order, order.repeat(math.ceil(total / n))[: total - n]])
        return order[self.rank:total:self.world_size]

    def __len__(self) -> int:
        if self.drop_last:
            return self.num_samples // self.batch_size
        return math.ceil(self.num_samples / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ds, idx = self.dataset, self.indices().to(self.dataset.x.device)
        for b in range(len(self)):
            sel = idx[b * self.batch_size:(b + 1) * self.batch_size]
            yield ds.transform(ds.x[sel], _for_batch(self.augment, self.epoch, b, self.rank)), ds.y[sel]


class EventLoader(DataLoader):
    """A ``DataLoader`` with ``set_epoch`` (seeded shuffling, also under ``DistributedSampler``) and an
    optional batch ``augment``, so trainers can treat it like ``FastLoader``."""

    def __init__(self, dataset: Dataset, batch_size: int, shuffle: bool = False, seed: int = 0,
                 augment: Callable | None = None, rank: int = 0, world_size: int = 1, num_workers: int = 0):
        _check_rank(rank, world_size)
        gen = torch.Generator().manual_seed(seed)
        sampler = (DistributedSampler(dataset, world_size, rank, shuffle=shuffle, seed=seed)
                   if world_size > 1 else None)
        super().__init__(dataset, batch_size=batch_size, shuffle=shuffle and sampler is None, sampler=sampler,
                         generator=gen, num_workers=num_workers)
        self.seed, self.augment, self._gen, self.rank, self.epoch = seed, augment, gen, rank, 0

    def set_epoch(self, epoch: int) -> None:
        """Select the shuffling of this epoch (``seed + epoch``)."""
        if isinstance(self.sampler, DistributedSampler):
            self.sampler.set_epoch(epoch)
        self._gen.manual_seed(self.seed + int(epoch))
        self.epoch = int(epoch)

    def __iter__(self):
        for b, (x, y) in enumerate(super().__iter__()):
            aug = _for_batch(self.augment, self.epoch, b, self.rank)
            yield (aug(x) if aug is not None else x), y


def _for_batch(augment: Callable | None, epoch: int, batch: int, rank: int) -> Callable | None:
    """An :class:`~spikeprune.data.augment.Augment` drawn for one batch (resumable); other callables as they are."""
    return augment.at(epoch, batch, rank) if hasattr(augment, "at") else augment


def split_indices(n: int, val_split: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded (train, val) split of ``range(n)``: ``round(n * val_split)`` go to val; both sorted."""
    if not 0.0 <= val_split < 1.0:
        raise ValueError(f"val_split must be in [0, 1), got {val_split}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_val = round(n * val_split)
    return perm[n_val:].sort().values, perm[:n_val].sort().values


def build_loaders(name: str, root: str | None = None, batch_size: int = 128,
                  eval_batch_size: int | None = None, val_split: float = 0.0, seed: int = 0,
                  download: bool = False, subset: int | None = None,
                  rank: int = 0, world_size: int = 1, augment: Callable | None = None, num_workers: int = 0,
                  **kw) -> tuple[FastLoader | EventLoader, FastLoader | EventLoader | None,
                                 FastLoader | EventLoader, DatasetInfo]:
    """Make (train, val or None, test, info) loaders: ``subset`` keeps the first N training samples, then
    ``val_split`` carves a seeded validation part out of them. Only the train loader is sharded over ranks
    (eval loaders see all samples, so metrics are exact); ``augment`` applies to training batches only."""
    from . import create_dataset

    train = create_dataset(name, "train", root=root, download=download, **kw)
    test = create_dataset(name, "test", root=root, download=download, **kw)
    n = len(train) if subset is None else min(int(subset), len(train))
    tr_idx, val_idx = split_indices(n, val_split, seed)
    eval_bs = eval_batch_size or batch_size
    if isinstance(train, InMemoryDataset):
        val = train.subset(val_idx) if len(val_idx) else None
        train_loader = FastLoader(train.subset(tr_idx), batch_size, True, seed, augment=augment, rank=rank,
                                  world_size=world_size)
        val_loader = FastLoader(val, eval_bs) if val is not None else None
        test_loader = FastLoader(test, eval_bs)
    else:
        val = Subset(train, val_idx.tolist()) if len(val_idx) else None
        train_loader = EventLoader(Subset(train, tr_idx.tolist()), batch_size, True, seed, augment, rank,
                                   world_size, num_workers)
        val_loader = EventLoader(val, eval_bs, num_workers=num_workers) if val is not None else None
        test_loader = EventLoader(test, eval_bs, num_workers=num_workers)
    return train_loader, val_loader, test_loader, test.info
