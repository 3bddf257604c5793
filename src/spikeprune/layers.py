"""Time-distributed layers and input encoders for multi-step ``[T, B, ...]`` tensors.

The wrappers subclass their ``torch.nn`` counterparts (so ``isinstance(m, nn.Conv2d)`` holds and
``torch.nn.utils.prune``, Torch-Pruning and NIR exporters see ordinary layers). In multi-step mode they fold
``[T, B, ...]`` into ``[T*B, ...]``, run the layer once, and unfold; a ``[B, ...]`` input passes straight through,
which is how a *static* first layer (direct encoding: compute conv+BN once, then repeat) stays cheap.
"""

from __future__ import annotations

import torch
from torch import nn

from .kernels import (
    MASKED_MAX_DENSITY,
    SPARSE_MAX_DENSITY,
    masked_index,
    masked_linear,
    pack_weight,
    sparse_input_linear,
)

__all__ = [
    "Conv2d", "Linear", "BatchNorm1d", "BatchNorm2d", "MaxPool2d", "AvgPool2d", "AdaptiveAvgPool2d",
    "Flatten", "Dropout", "Repeat", "RateEncoder", "EventInput", "VotingLayer", "seq_apply",
]


def seq_apply(fn, x: torch.Tensor, static_dims: int) -> torch.Tensor:
    """Apply ``fn`` to ``x`` folding a leading time axis when ``x`` has ``static_dims + 1`` dimensions."""
    if x.dim() == static_dims + 1:
        T, B = x.shape[:2]
        y = fn(x.flatten(0, 1))
        return y.view(T, B, *y.shape[1:])
    return fn(x)


class Conv2d(nn.Conv2d):
    """``nn.Conv2d`` on ``[T, B, C, H, W]`` or ``[B, C, H, W]``.

    On CPU the input is made channels-last (NHWC) first: oneDNN's convolution, batch norm and max pooling are
    faster in that layout (a ``convnet`` training step 1.2-1.3x, ``benchmarks/throughput.py``), and the layout
    carries on through BN, pooling and the neurons to the next convolution. Weights keep their usual layout."""

    def _conv(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            return super().forward(x)
        y = super().forward(x.contiguous(memory_format=torch.channels_last))
        # a 1-channel input is both layouts at once and oneDNN then answers NCHW: the output is made channels-last
        # too, so BN, pooling, neurons (and their gradients) stay in one layout up to the next convolution
        return y.contiguous(memory_format=torch.channels_last)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seq_apply(self._conv, x, 4)


class WeightCached:
    """A module that keeps structures built from its weights, keyed on their ``(data_ptr, _version)``: they are
    dropped whenever the module switches between training and eval mode too, because PyTorch's fused optimizers
    update weights in place without bumping their version (``perf.keep_versions`` covers the run's own optimizer).
    Subclasses drop theirs in ``_drop_caches`` and call ``super()._drop_caches()``."""

    def _drop_caches(self) -> None:
        pass

    def train(self, mode: bool = True):
        if mode != self.training:
            self._drop_caches()
        return super().train(mode)


class Linear(WeightCached, nn.Linear):
    """``nn.Linear`` on any leading dimensions. On CPU:

    * a mostly-zero input (spikes: at most ``max_input_density`` non-zero) runs
      :func:`spikeprune.kernels.sparse_input_linear`, whose forward and weight gradient only touch the inputs that
      spiked;
    * a weight masked by a bool ``weight_mask`` buffer (the mask engine's) that keeps at most
      ``max_weight_density`` of its entries computes only with those, in the forward of a dense input
      (:func:`spikeprune.kernels.masked_linear`) and in the input gradient: the masked weights are 0.0 anyway.

    Same values and gradients as the dense layer up to float summation order."""

    max_input_density: float = SPARSE_MAX_DENSITY
    max_weight_density: float = MASKED_MAX_DENSITY

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu":
            index = self._weight_index()
            if self.max_input_density > 0:
                packed = None if torch.is_grad_enabled() else self._packed()
                y = sparse_input_linear(x, self.weight, self.bias, self.max_input_density, packed, index)
                if y is not None:
                    return y
            if index is not None:
                y = masked_linear(x, self.weight, self.bias, index)
                if y is not None:
                    return y
        return super().forward(x)

    def _weight_index(self) -> tuple | None:
        """The kept entries of ``weight_mask`` (:func:`spikeprune.kernels.masked_index`) when it keeps at most
        ``max_weight_density``, else ``None``. Built on the second call that sees the same mask: a mask rewired at
        every step (Deep R, Grad R) never pays for an index it would use once."""
        mask = self._buffers.get("weight_mask")
        if (mask is None or mask.dtype != torch.bool or self.max_weight_density <= 0 or mask.device.type != "cpu"
                or mask.shape != self.weight.shape):
            return None
        hit = self.__dict__.get("_index_cache")
        if hit is None or hit[0] is not mask or hit[1] != mask._version:
            self.__dict__["_index_cache"] = (mask, mask._version, None)
            return None
        if hit[2] is None:
            keep = int(mask.count_nonzero()) <= self.max_weight_density * mask.numel()
            index = masked_index(mask) if keep else None
            self.__dict__["_index_cache"] = hit = (mask, mask._version, index or False)
        return hit[2] or None

    def _drop_caches(self) -> None:
        self.__dict__.pop("_packed_cache", None)
        super()._drop_caches()

    def _packed(self) -> torch.Tensor | None:
        """The packed weight, kept while the weight is unchanged (inference: packing costs a pass over it)."""
        w = self.weight
        key = (w.data_ptr(), w._version, w.dtype, tuple(w.shape))
        hit = self.__dict__.get("_packed_cache")
        if hit is None or hit[0] != key:
            hit = self.__dict__["_packed_cache"] = (key, pack_weight(w))
        return hit[1]


class BatchNorm2d(nn.BatchNorm2d):
    """BatchNorm over ``T*B*H*W`` (tdBN-style statistics shared across time steps)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seq_apply(super().forward, x, 4)


class BatchNorm1d(nn.BatchNorm1d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seq_apply(super().forward, x, 2)


class MaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` on ``[T, B, C, H, W]`` or ``[B, C, H, W]``.

    Without autograd, the common 2x2 / stride-2 pool is the elementwise maximum of the four strided quarter views:
    the same values, 1.0-2.8x faster on CPU than the pooling kernel, which also writes argmax indices and does not
    vectorise over a channel count that is not a multiple of 8 (compacted nets). Training keeps the pooling kernel
    (its gradient goes to one input per window, as everyone's does)."""

    def _pairwise(self) -> bool:
        two = (2, (2, 2))
        return (self.kernel_size in two and self.stride in two and self.padding in (0, (0, 0))
                and self.dilation in (1, (1, 1)) and not self.ceil_mode and not self.return_indices)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() >= 4 and not (torch.is_grad_enabled() and x.requires_grad) and self._pairwise():
            h, w = x.shape[-2] // 2 * 2, x.shape[-1] // 2 * 2  # floor mode: an odd last row/column is dropped
            top, bottom = x[..., 0:h:2, :w], x[..., 1:h:2, :w]
            return torch.maximum(torch.maximum(top[..., 0::2], top[..., 1::2]),
                                 torch.maximum(bottom[..., 0::2], bottom[..., 1::2]))
        return seq_apply(super().forward, x, 4)


class AvgPool2d(nn.AvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seq_apply(super().forward, x, 4)


class AdaptiveAvgPool2d(nn.AdaptiveAvgPool2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return seq_apply(super().forward, x, 4)


class Flatten(nn.Module):
    """Flatten the last ``dims`` feature dimensions, whatever the leading ``[T, B]`` or ``[B]`` axes."""

    def __init__(self, dims: int = 3):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(-self.dims)


class Dropout(nn.Dropout):
    """Dropout whose mask is shared across time steps (one mask per sample), as in SNN practice."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0:
            return x
        mask = torch.empty_like(x[0]).bernoulli_(1 - self.p) / (1 - self.p)
        return x * mask


class Repeat(nn.Module):
    """Direct encoding: ``[B, ...] -> [T, B, ...]`` by repeating the same (static) tensor T times.

    Uses ``expand`` so no copy is made; placed after the first conv/linear (+BN) the static layer runs once.
    """

    def __init__(self, T: int):
        super().__init__()
        if int(T) < 1:
            raise ValueError(f"T must be >= 1, got {T}")
        self.T = int(T)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(0).expand(self.T, *x.shape)

    def extra_repr(self) -> str:
        return f"T={self.T}"


class RateEncoder(nn.Module):
    """Rate (Bernoulli/Poisson) coding: each step fires with probability equal to the clamped input."""

    def __init__(self, T: int, gain: float = 1.0):
        super().__init__()
        self.T, self.gain = int(T), float(gain)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = (x * self.gain).clamp(0, 1)
        return torch.bernoulli(p.unsqueeze(0).expand(self.T, *p.shape).contiguous())


class EventInput(nn.Module):
    """Event-camera frames arrive as ``[B, T, ...]``; make them ``[T, B, ...]`` (SpikingJelly's order)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.transpose(0, 1).contiguous()


class VotingLayer(nn.Module):
    """Average groups of ``group`` output neurons into one class score (Grad R / UPR CIFAR nets)."""

    def __init__(self, group: int = 10):
        super().__init__()
        self.group = group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (-1, self.group)).mean(-1)
