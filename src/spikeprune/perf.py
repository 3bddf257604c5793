"""Process-wide CPU performance settings that the trainer applies (and the benchmarks, to every framework alike).

The compiled kernels and the autograd functions built on them are in :mod:`spikeprune.kernels`."""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys

import torch

__all__ = ["keep_freed_memory", "keep_versions"]

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers


@functools.cache
def keep_freed_memory(mmap_threshold: int = 256 << 20, trim_threshold: int = 512 << 20) -> bool:
    """Make glibc's ``malloc`` keep freed blocks below ``mmap_threshold`` bytes for reuse instead of unmapping them.

    A CPU training step allocates its ``[T, B, ...]`` spike and membrane tensors afresh; with glibc's defaults
    most of them land in newly mapped pages that the kernel must fault in and zero on first write, which costs
    about as much as the neuron arithmetic itself (fc3 at T=8: a step 10% faster with this,
    ``benchmarks/throughput.py``). The price is that the process keeps its peak heap instead of returning it to the
    system. Returns ``True`` when applied (idempotent); ``False``, doing nothing, where libc is not glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold))) and bool(
            libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold)))
    except (OSError, AttributeError):
        return False


def keep_versions(optimizer: torch.optim.Optimizer) -> None:
    """Make ``optimizer``'s fused steps bump the version counters of the params they update, as every other
    in-place update does. PyTorch's fused kernels (``fused=True``, torch 2.13 on CPU, measured) skip it, so caches
    keyed on ``(data_ptr, _version)``, such as :class:`~spikeprune.layers.Linear`'s packed weights for inference,
    would go on serving the weights of before training. Idempotent; a no-op for unfused optimizers."""
    if getattr(optimizer, "_spikeprune_versions", False) or not any(g.get("fused") for g in optimizer.param_groups):
        return
    from torch.autograd.graph import increment_version

    def bump(opt: torch.optim.Optimizer, args: tuple, kwargs: dict) -> None:
        for g in opt.param_groups:
            if g.get("fused"):
                for p in g["params"]:
                    increment_version(p)

    optimizer.register_step_post_hook(bump)
    optimizer._spikeprune_versions = True
