"""The compiled CPU kernels, from Python: the one module the rest of spikeprune calls them through.

:mod:`spikeprune._ext` builds and loads the C++ extension (first use or ``python -m spikeprune._ext``) and says
whether it can take a tensor (:func:`kernels_for`); this module adds what is built on it: per-unit sums for the
activity monitors (:func:`unit_sums`), the spike-sparse ``Linear`` (:func:`sparse_input_linear`, forward and weight
gradient over the non-zero inputs or their temporal differences) and the masked ``Linear`` over its kept weights
(:func:`masked_linear`). Every function returns ``None`` (or falls back to eager PyTorch) where the kernels cannot
take its tensors, with the same values either way. Timings behind each threshold: ``docs/performance.md``.
"""

from __future__ import annotations

import torch

from ._ext import cpu_kernels, kernels_for, t_major_dense, use_cpp

__all__ = ["MASKED_MAX_DENSITY", "MASKED_MIN_ROWS", "SPARSE_MAX_DENSITY", "cpu_kernels", "kernels_for",
           "masked_index", "masked_linear", "pack_weight", "sparse_input_linear", "t_major_dense", "unit_sums",
           "use_cpp"]

_UNIT_OPS = {"sum": 0, "abs": 1, "dot": 2}

# The share of non-zero inputs up to which Linear takes the spike-sparse path. Forward plus backward of 512 x 800 ->
# 800 at 2 threads takes 0.75x the dense time at 20%, 0.8x at 30% and 1.0x at 40%; the margin below that break-even
# is for other thread counts. Layers whose outputs do not fill whole blocks of 64 get a lower limit (see
# sparse_input_linear).
SPARSE_MAX_DENSITY = 0.35


def unit_sums(x: torch.Tensor, op: str = "sum", y: torch.Tensor | None = None, unit_dim: int = 2) -> torch.Tensor:
    """Per-unit sums over every dim but ``unit_dim``: ``sum x`` (``op="sum"``), ``sum |x|`` (``"abs"``) or
    ``sum x * y`` (``"dot"``). The activity monitors and the gate-gradient hook run this on every training step;
    PyTorch's reductions that keep a short innermost dim (16 channels, channels-last) run at about 1 GB/s on CPU,
    so ``[T, B, C, ...]`` CPU tensors go through one pass of the compiled kernel instead (eager elsewhere)."""
    if op not in _UNIT_OPS:
        raise ValueError(f"op must be one of {sorted(_UNIT_OPS)}, got {op!r}")
    if (op == "dot") != (y is not None):
        raise ValueError("y is needed by op 'dot' and only by it")
    ext = kernels_for(x) if unit_dim == 2 and x.dim() >= 3 else None
    if ext is not None and t_major_dense(x) and (y is None or (y.dtype == x.dtype and y.stride() == x.stride())):
        return ext.unit_reduce(x, y, _UNIT_OPS[op])
    dims = [d for d in range(x.dim()) if d != unit_dim]
    if op == "sum":
        return x.sum(dims)
    return x.abs().sum(dims) if op == "abs" else (x * y).sum(dims)


def _sparse_forward(weight: torch.Tensor, bias: torch.Tensor | None, rows: list, ext, packed: torch.Tensor | None,
                    steps: int) -> torch.Tensor:
    """``x W^T + b`` from the rows of ``x`` (or of its temporal differences, with ``steps`` > 1)."""
    ptr, cols, vals = rows
    packed = ext.pack_weight(weight) if packed is None else packed
    if steps <= 1:
        return ext.sparse_input_linear(ptr, cols, vals, packed, bias, weight.shape[0])
    y = ext.sparse_input_linear(ptr, cols, vals, packed, None, weight.shape[0])
    yv = y.view(steps, -1, y.shape[1])
    for t in range(1, steps):  # running sums over the steps (in place: 3x faster than cumsum_ here)
        yv[t].add_(yv[t - 1])
    return y if bias is None else y.add_(bias)


class _SparseInputLinear(torch.autograd.Function):
    """``x W^T + b`` over the non-zero entries of ``x`` (its CSR rows), and ``dW = g^T x`` the same way. Only the
    rows are kept for the backward, not ``x``; ``dx = g W`` stays a dense matrix product.

    With ``steps`` > 1 the rows are those of the *temporal differences* of ``x`` viewed as ``[steps, N, in]``
    (``d[0] = x[0]``, ``d[t] = x[t] - x[t-1]``): ``y[t] = y[t-1] + W d[t]``, and ``dW = sum_t G[t]^T d[t]`` with the
    suffix sums ``G[t] = sum_{s >= t} g[s]``."""

    @staticmethod
    def forward(ctx, x, weight, bias, rows, ext, packed, steps=1, index=None):
        ctx.ext, ctx.n_in, ctx.steps, ctx.index = ext, x.shape[1], steps, index
        ctx.save_for_backward(weight, *rows)
        return _sparse_forward(weight, bias, rows, ext, packed, steps)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        weight, ptr, cols, vals = ctx.saved_tensors
        g = g.contiguous()
        gx = _input_grad(g, weight, ctx.index, ctx.ext) if ctx.needs_input_grad[0] else None
        gw = None
        if ctx.needs_input_grad[1]:
            gs = g
            if ctx.steps > 1:  # suffix sums over the steps
                gs = g.clone()
                gv = gs.view(ctx.steps, -1, g.shape[1])
                for t in range(ctx.steps - 2, -1, -1):
                    gv[t].add_(gv[t + 1])
            gw = ctx.ext.sparse_input_weight_grad(ptr, cols, vals, gs, ctx.n_in)
        gb = g.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None, None, None, None


# The temporal differences of a multi-step input are taken when they have fewer non-zeros than this share of the
# input's own (their +-1 values cost a multiply, and the running and suffix sums a pass each: the kernels alone
# broke even at 0.85-0.9 on fc3's layer shape, measured); 0 switches them off.
DELTA_GAIN = 0.8


def _linear_kernels(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
    """The compiled kernels when they can compute ``F.linear(x, weight, bias)`` (CPU, one float dtype, matching
    shapes, no autocast, a non-empty ``x``), else ``None``."""
    ext = kernels_for(x)
    if (ext is None or x.dim() < 2 or weight.dim() != 2 or x.dtype != weight.dtype or weight.device != x.device
            or (bias is not None and bias.dtype != x.dtype) or x.shape[-1] != weight.shape[1]
            or torch.is_autocast_enabled("cpu") or x.numel() == 0):
        return None
    return ext


def _needs_grad(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> bool:
    """Whether autograd must record the product (else the kernels run without an autograd node: its Python
    ``apply`` costs 30 us a call, more than a batch-1 layer's sums)."""
    return torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                        or (bias is not None and bias.requires_grad))


def sparse_input_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                        max_density: float = SPARSE_MAX_DENSITY, packed: torch.Tensor | None = None,
                        index: tuple | None = None) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` for a mostly-zero ``x`` (spikes), with the work of the forward and of the
    weight gradient proportional to the non-zero inputs instead of all of them; ``None`` when the compiled
    kernels cannot take these tensors or more than ``max_density`` of ``x`` is non-zero (dense is faster then;
    the kernels sum outputs in blocks of 64 floats, so a layer whose outputs leave a block part-empty, e.g. 10
    outputs, gets the limit times its share of used lanes, 10/64).
    A multi-step input ``[T, ...]`` (T > 1, 8 rows per step or more, 64 outputs or more: fc3 at batch 1 ran 0.94x
    the dense time with them against 1.00x without, measured) goes through its temporal differences when they
    have fewer than ``DELTA_GAIN`` of its non-zeros: a neuron that fires at step t mostly fired at t - 1 too (85%
    of fc3's first hidden layer on Fashion-MNIST, whose differences hold 10% non-zeros against its 25%,
    measured). The density limit then applies to the differences (their non-zeros over ``DELTA_GAIN``), so a
    busy input that barely changes over the steps qualifies too. One pass of the compiled kernel counts both and
    builds the rows of the cheaper.
    Same values as ``F.linear`` up to float summation order; gradients flow to ``x``, ``weight`` and ``bias``.
    ``packed``: ``weight`` already packed by :func:`pack_weight` (inference reuses it while the weight is
    unchanged). ``index``: ``weight``'s kept entries (:func:`masked_index`), when it is masked sparsely enough for
    the input gradient to sum over them only."""
    ext = _linear_kernels(x, weight, bias)
    if ext is None:
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    T = x.shape[0] if x.dim() >= 3 and 1 < x.shape[0] <= x2.shape[0] // 8 and weight.shape[0] >= 64 else 1
    rows, steps = ext.sparse_rows(x2, float(max_density), weight.shape[0], T, DELTA_GAIN)
    if not rows:
        return None
    b = bias if bias is None else bias.contiguous()
    if _needs_grad(x, weight, b):
        y = _SparseInputLinear.apply(x2, weight, b, rows, ext, packed, steps, index)
    else:  # inference: no autograd node
        y = _sparse_forward(weight.detach(), None if b is None else b.detach(), rows, ext, packed, steps)
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])


def pack_weight(weight: torch.Tensor) -> torch.Tensor | None:
    """``weight`` [out, in] in the layout :func:`sparse_input_linear` sums over (W^T in blocks of 64 outputs),
    or ``None`` when the compiled kernels cannot take it."""
    ext = kernels_for(weight)
    return None if ext is None or weight.dim() != 2 else ext.pack_weight(weight.detach())


# Up to this share of kept weights a masked Linear sums over its kept weights only (masked_matmul): its forward on a
# dense input and its input gradient dx = g W. At 2 threads (AVX2) on fc3's shapes (784 -> 800 on 64-128 rows,
# 800 x 800 on 256-512) that ran 0.32-0.37x the dense product at 10% kept, 0.6-0.7x at 30%, 0.73-0.79x at 40%,
# 0.85-0.93x at 50% and 0.92-0.97x at 55% (measured). The kernel uses 32-byte vectors, one load per multiply-add;
# where the dense product has 64-byte ones (AVX-512) its peak doubles, so the limit is halved there (not measured:
# no such CPU here).
MASKED_MAX_DENSITY = 0.25 if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else 0.5
# The kernel works on tiles of 64 rows (32 in float64): fewer rows leave lanes empty (32 rows ran 1.3-1.8x dense).
MASKED_MIN_ROWS = 64


def masked_index(mask: torch.Tensor) -> tuple | None:
    """The kept entries of a bool ``mask`` [out, in], listed twice for :func:`masked_linear`: by output row (the
    forward) and by input column (the input gradient); ``None`` where the compiled kernels are unavailable."""
    ext = cpu_kernels() if mask.device.type == "cpu" else None
    if ext is None or mask.dim() != 2:
        return None
    m = mask.contiguous()
    return ext.masked_index(m, False), ext.masked_index(m, True)


def _input_grad(g: torch.Tensor, weight: torch.Tensor, index: tuple | None, ext) -> torch.Tensor:
    """``dx = g W``: over the kept weights only when an ``index`` is given and ``g`` has enough rows."""
    if index is None or g.shape[0] < MASKED_MIN_ROWS:
        return g @ weight
    return ext.masked_matmul(g, weight.contiguous(), *index[1], weight.shape[1])


class _MaskedLinear(torch.autograd.Function):
    """``x W^T + b`` and ``dx = g W`` over the kept weights of a masked ``W`` (whose masked entries are 0.0, as the
    mask engine keeps them); ``dW = g^T x`` stays the dense product, so regrowth scores still see every gradient."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, ext):
        ctx.index, ctx.ext = index, ext
        ctx.save_for_backward(x, weight)
        y = ext.masked_matmul(x, weight, *index[0], weight.shape[0])
        return y if bias is None else y.add_(bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        g = g.contiguous()
        gx = _input_grad(g, weight, ctx.index, ctx.ext) if ctx.needs_input_grad[0] else None
        gw = g.t() @ x if ctx.needs_input_grad[1] else None
        gb = g.sum(0) if ctx.needs_input_grad[2] else None
        return gx, gw, gb, None, None


def masked_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  index: tuple) -> torch.Tensor | None:
    """``F.linear(x, weight, bias)`` summing over the kept weights of ``index`` (:func:`masked_index` of the
    weight's mask) only, for a weight whose other entries are 0.0; ``None`` when the kernels cannot take these
    tensors or ``x`` has fewer than ``MASKED_MIN_ROWS`` rows (the dense product is faster then). Same values as
    ``F.linear`` up to float summation order; gradients flow to ``x``, ``weight`` and ``bias``."""
    ext = _linear_kernels(x, weight, bias)
    if ext is None or x.numel() // x.shape[-1] < MASKED_MIN_ROWS:
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    w = weight.contiguous()
    b = bias if bias is None else bias.contiguous()
    if _needs_grad(x, weight, b):
        y = _MaskedLinear.apply(x2, w, b, index, ext)
    else:
        y = ext.masked_matmul(x2, w.detach(), *index[0], weight.shape[0])
        y = y if b is None else y.add_(b.detach())
    return y if x.dim() == 2 else y.view(*x.shape[:-1], weight.shape[0])
