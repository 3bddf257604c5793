"""Thin helpers over ``torch.distributed`` so single-process code needs no special cases.

Under ``torchrun`` every process runs the same program; :func:`init_from_env` joins the process group it
describes (gloo on CPU, nccl on GPU). Collectives here are no-ops in one process. :func:`convert_sync_batchnorm`
turns BatchNorm layers into ones whose training statistics are computed over the batches of all ranks (any
backend, CPU included, unlike ``torch.nn.SyncBatchNorm``).
"""

from __future__ import annotations

import atexit
import os
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from .layers import BatchNorm1d as _TBatchNorm1d
from .layers import BatchNorm2d as _TBatchNorm2d


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main() -> bool:
    return rank() == 0


def all_mean(t: torch.Tensor) -> torch.Tensor:
    """Average a tensor over ranks in place (no-op in one process); statistics that drive masks use it."""
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t.div_(world_size())
    return t


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if is_dist():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def broadcast(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    if is_dist():
        dist.broadcast(t, src)
    return t


def barrier() -> None:
    """Wait until every rank gets here (no-op in one process)."""
    if is_dist():
        dist.barrier()


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s (picklable) ``obj`` on every rank."""
    if not is_dist():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src)
    return box[0]


def all_gather_object(obj: Any, group: Any = None) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (``[obj]`` in one process)."""
    if not is_dist():
        return [obj]
    out: list = [None] * world_size()
    dist.all_gather_object(out, obj, group=group)
    return out


_GUARD: dict[str, Any] = {}
GUARD_TIMEOUT_S = float(os.environ.get("SPIKEPRUNE_GUARD_TIMEOUT", 300))


def guard_group() -> Any:
    """A CPU (gloo) process group for the trainer's mask checks, with a short timeout: a rank that reaches a check
    alone (its peers never call it) fails after ``SPIKEPRUNE_GUARD_TIMEOUT`` s (300) instead of hanging.
    Created on first use, which must happen on every rank at the same point (the trainer does it at start)."""
    if not is_dist():
        return None
    key = f"{id(dist.group.WORLD)}"
    if key not in _GUARD:
        _GUARD.clear()
        _GUARD[key] = dist.new_group(backend="gloo", timeout=timedelta(seconds=GUARD_TIMEOUT_S))
    return _GUARD[key]


def init_from_env() -> bool:
    """Join the process group that ``torchrun`` describes (gloo on CPU, nccl on GPU). Returns True if joined."""
    if is_dist() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return is_dist()
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend)
    atexit.register(_shutdown)
    return True


def backend() -> str | None:
    return dist.get_backend() if is_dist() else None


def _shutdown() -> None:
    if is_dist():
        _GUARD.clear()
        dist.destroy_process_group()


# ------------------------------------------------------------------------------------------ SyncBatchNorm
class _AllReduceSum(torch.autograd.Function):
    """Differentiable sum over ranks: the gradient of a sum is the sum of the ranks' gradients."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
        return x

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:
        g = g.contiguous().clone()
        dist.all_reduce(g, op=dist.ReduceOp.SUM)
        return g


class _SyncBatchNorm:
    """Mixin for a BatchNorm class: in training under DDP the batch mean and variance are taken over the
    batches of all ranks (two differentiable all-reduces per layer, gradients exact), and the running statistics
    are updated with those global values, so they stay identical on every rank. Otherwise: the plain layer."""

    _fold: int | None = None  # static dims of spikeprune's time-distributed BN ([T, B, ...] inputs are folded)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and is_dist() and world_size() > 1):
            return super().forward(x)
        if self._fold is not None and x.dim() == self._fold + 1:
            T, B = x.shape[:2]
            y = self._sync_forward(x.flatten(0, 1))
            return y.view(T, B, *y.shape[1:])
        return self._sync_forward(x)

    def _sync_forward(self, x: torch.Tensor) -> torch.Tensor:
        all_reduce = _AllReduceSum.apply
        C = x.shape[1]
        dims = [d for d in range(x.dim()) if d != 1]
        shape = [1, C] + [1] * (x.dim() - 2)
        xf = x.float()
        count = torch.full((1,), x.numel() // max(C, 1), dtype=torch.float32, device=x.device)
        s = all_reduce(torch.cat([xf.sum(dims), count]))
        n = s[C]
        mean = s[:C] / n
        xc = xf - mean.view(shape)
        var = all_reduce((xc * xc).sum(dims)) / n  # biased, as batch_norm normalises with
        y = xc * torch.rsqrt(var + self.eps).view(shape)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                f = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
                unbiased = var.detach() * n / (n - 1).clamp_min(1)
                self.running_mean.mul_(1 - f).add_(mean.detach().to(self.running_mean.dtype), alpha=f)
                self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)
        return y.to(x.dtype)


class SyncBatchNorm2d(_SyncBatchNorm, _TBatchNorm2d):
    """:class:`spikeprune.layers.BatchNorm2d` (statistics over ``T*B*H*W``) synchronised over ranks."""

    _fold = 4


class SyncBatchNorm1d(_SyncBatchNorm, _TBatchNorm1d):
    """:class:`spikeprune.layers.BatchNorm1d` synchronised over ranks."""

    _fold = 2


class _SyncTorchBatchNorm1d(_SyncBatchNorm, nn.BatchNorm1d):
    pass


class _SyncTorchBatchNorm2d(_SyncBatchNorm, nn.BatchNorm2d):
    pass


class _SyncTorchBatchNorm3d(_SyncBatchNorm, nn.BatchNorm3d):
    pass


_SYNC = {_TBatchNorm2d: SyncBatchNorm2d, _TBatchNorm1d: SyncBatchNorm1d, nn.BatchNorm1d: _SyncTorchBatchNorm1d,
         nn.BatchNorm2d: _SyncTorchBatchNorm2d, nn.BatchNorm3d: _SyncTorchBatchNorm3d}


def convert_sync_batchnorm(model: nn.Module) -> int:
    """Make every BatchNorm layer of ``model`` (spikeprune's or torch's 1d/2d/3d) synchronise its batch statistics
    over ranks, in place: the modules keep their parameters, buffers and names (checkpoints are unchanged), only
    their class changes. Returns how many layers were converted; layers of other classes raise ``ValueError``."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, _SyncBatchNorm) or not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        cls = _SYNC.get(type(m))
        if cls is None:
            raise ValueError(f"train.sync_bn cannot convert {name} ({type(m).__name__}); use BatchNorm1d/2d/3d")
        m.__class__ = cls
        n += 1
    return n


def sync_buffers(model: nn.Module) -> None:
    """Average every floating-point buffer (BatchNorm running statistics) over ranks, so evaluation and
    checkpoints see the same model everywhere; masks and counters (bool/int buffers) are left alone."""
    if not is_dist():
        return
    bufs = [b for b in model.buffers() if b.is_floating_point()]
    if not bufs:
        return
    flat = torch.cat([b.detach().reshape(-1).double() for b in bufs])
    all_mean(flat)
    i = 0
    for b in bufs:
        b.copy_(flat[i:i + b.numel()].view_as(b))
        i += b.numel()
