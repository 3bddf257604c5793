"""Masked Linear layers that compute over their kept weights only (``kernels.masked_linear``, ``masked_matmul``)."""

from __future__ import annotations

import pytest
import torch

from spikeprune._ext import cpu_kernels
from spikeprune.kernels import MASKED_MIN_ROWS, masked_index, masked_linear
from spikeprune.layers import Linear

pytestmark = pytest.mark.skipif(cpu_kernels() is None, reason="compiled CPU kernels unavailable")


def masked_layer(n_in: int, n_out: int, density: float, dtype=torch.float32, seed: int = 0) -> Linear:
    """A Linear with a bool ``weight_mask`` and its masked weights at 0.0, as the mask engine leaves them."""
    torch.manual_seed(seed)
    layer = Linear(n_in, n_out).to(dtype)
    mask = torch.rand(n_out, n_in) < density
    with torch.no_grad():
        layer.weight.mul_(mask)
    layer.register_buffer("weight_mask", mask)
    return layer


def path(y: torch.Tensor) -> str:
    """The autograd node that computed ``y``, behind a reshaping view."""
    fn = y.grad_fn
    if type(fn).__name__ == "ViewBackward0":
        fn = fn.next_functions[0][0]
    return type(fn).__name__


def test_masked_index_by_hand():
    mask = torch.tensor([[True, False, True], [False, True, True]])
    ext = cpu_kernels()
    ptr, loc, off = ext.masked_index(mask, False)  # by output row: row 0 keeps inputs 0, 2; row 1 keeps 1, 2
    assert ptr.tolist() == [0, 2, 4] and loc.tolist() == [0, 2, 1, 2] and off.tolist() == [0, 2, 4, 5]
    ptr, loc, off = ext.masked_index(mask, True)  # by input column: 0 <- row 0; 1 <- row 1; 2 <- rows 0, 1
    assert ptr.tolist() == [0, 1, 2, 4] and loc.tolist() == [0, 1, 0, 1] and off.tolist() == [0, 4, 2, 5]


@pytest.mark.parametrize("by_cols", [False, True])
def test_masked_index_lists_every_kept_weight_once_by_block(by_cols):
    torch.manual_seed(0)
    mask = torch.rand(70, 150) < 0.3  # 150 inputs: blocks of 64, 64 and 22 (rows); 70 outputs: 64 and 6 (cols)
    ptr, loc, off = cpu_kernels().masked_index(mask, by_cols)
    R, K = (150, 70) if by_cols else (70, 150)
    nblk = (K + 63) // 64
    assert ptr.numel() == nblk * R + 1 and int(ptr[-1]) == int(mask.sum())
    assert sorted(off.tolist()) == mask.flatten().nonzero().flatten().tolist()
    for b in range(nblk):
        for r in range(R):
            for q in range(int(ptr[b * R + r]), int(ptr[b * R + r + 1])):
                i, j = divmod(int(off[q]), 150)
                assert (j, i)[0 if by_cols else 1] == r  # the entry belongs to output r of the product
                assert (i if by_cols else j) == b * 64 + int(loc[q])  # and to column b * 64 + loc of its input


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows, n_in, n_out, density", [
    (64, 70, 130, 0.3), (200, 784, 800, 0.1), (65, 64, 64, 1.0), (100, 129, 3, 0.5), (70, 40, 50, 0.0)])
def test_masked_matmul_equals_the_dense_products(dtype, rows, n_in, n_out, density):
    layer = masked_layer(n_in, n_out, density, dtype)
    w = layer.weight.detach()
    rows_idx, cols_idx = masked_index(layer.weight_mask)
    ext = cpu_kernels()
    x, g = torch.randn(rows, n_in, dtype=dtype), torch.randn(rows, n_out, dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 1e-12
    assert torch.allclose(ext.masked_matmul(x, w, *rows_idx, n_out), x @ w.t(), rtol=0, atol=tol)
    assert torch.allclose(ext.masked_matmul(g, w, *cols_idx, n_in), g @ w, rtol=0, atol=tol)


def test_masked_matmul_bad_arguments():
    layer = masked_layer(10, 6, 0.5)
    rows_idx, _ = masked_index(layer.weight_mask)
    ext = cpu_kernels()
    with pytest.raises(RuntimeError, match="another shape"):
        ext.masked_matmul(torch.randn(4, 10), layer.weight.detach(), *rows_idx, 7)
    with pytest.raises(RuntimeError, match="another shape"):  # a weight of another layer
        ext.masked_matmul(torch.randn(4, 10), torch.randn(6, 11), *rows_idx, 6)
    with pytest.raises(RuntimeError, match="dtype"):
        ext.masked_matmul(torch.randn(4, 10, dtype=torch.float64), layer.weight.detach(), *rows_idx, 6)
    with pytest.raises(RuntimeError, match="bool"):
        ext.masked_index(layer.weight_mask.float(), False)


def test_layer_takes_the_kept_weights_path_from_its_second_call_with_the_same_mask():
    layer = masked_layer(784, 300, 0.2)  # under the kept-weights limit on every CPU (0.25 with AVX-512)
    ref = torch.nn.Linear(784, 300)
    ref.load_state_dict({"weight": layer.weight.detach(), "bias": layer.bias.detach()})
    x = torch.rand(2, 64, 784, requires_grad=True)  # [T, B, in], dense: 128 rows
    first = layer(x)
    assert "Masked" not in path(first)  # a mask seen once: no index yet (Deep R rewires every step)
    y = layer(x)
    assert path(y) == "_MaskedLinearBackward"
    g = torch.randn_like(y)
    gx, gw, gb = torch.autograd.grad(y, (x, layer.weight, layer.bias), g)
    y2 = ref(x)
    rx, rw, rb = torch.autograd.grad(y2, (x, ref.weight, ref.bias), g)
    assert torch.allclose(y, y2, rtol=0, atol=1e-5) and torch.allclose(gx, rx, rtol=0, atol=1e-5)
    assert torch.allclose(gw, rw, rtol=0, atol=1e-4) and torch.allclose(gb, rb, rtol=0, atol=1e-4)
    # the weight gradient stays dense (regrowth scores read the gradients of masked weights too)
    assert bool((gw[~layer.weight_mask] != 0).any())
    with torch.no_grad():  # inference takes it too, without an autograd node
        assert torch.allclose(layer(x), y2, rtol=0, atol=1e-5)


def test_mask_changes_density_limit_and_small_batches_fall_back_to_dense():
    layer = masked_layer(200, 100, 0.2)
    x = torch.rand(MASKED_MIN_ROWS, 200, requires_grad=True)
    layer(x)
    assert type(layer(x).grad_fn).__name__ == "_MaskedLinearBackward"
    assert "Masked" not in type(layer(x[: MASKED_MIN_ROWS - 1]).grad_fn).__name__  # too few rows for a tile
    with torch.no_grad():
        layer.weight_mask[0, :] = True  # an in-place change: the index is stale, built again on the next call
        layer.weight[0, :] = 1.0
    y = layer(x)
    assert "Masked" not in type(y.grad_fn).__name__
    y = layer(x)
    assert type(y.grad_fn).__name__ == "_MaskedLinearBackward"
    assert torch.allclose(y, torch.nn.functional.linear(x, layer.weight, layer.bias), rtol=1e-6, atol=1e-5)
    layer.max_weight_density = 0.1  # keeps about 21%: over the limit, dense
    layer.weight_mask.logical_not_().logical_not_()  # a new version of the same mask
    layer(x)
    assert "Masked" not in type(layer(x).grad_fn).__name__
    assert masked_linear(x.double(), layer.weight, layer.bias, masked_index(layer.weight_mask)) is None  # dtypes


def test_spike_input_gradient_sums_over_the_kept_weights(monkeypatch):
    ext = cpu_kernels()
    calls = []
    real = ext.masked_matmul
    monkeypatch.setattr(ext, "masked_matmul", lambda *a: calls.append(a[-1]) or real(*a))
    layer = masked_layer(300, 200, 0.2)
    x = ((torch.rand(4, 32, 300) < 0.1).float()).requires_grad_()  # spikes: the spike-sparse forward
    for _ in range(2):
        y = layer(x)
    assert path(y) == "_SparseInputLinearBackward" and not calls
    g = torch.randn_like(y)
    gx, gw = torch.autograd.grad(y, (x, layer.weight), g)
    assert calls == [300]  # dx = g W over the kept weights (300 inputs)
    w = layer.weight.detach()
    assert torch.allclose(gx, g @ w, rtol=0, atol=1e-5)
    assert torch.allclose(gw, g.reshape(-1, 200).t() @ x.detach().reshape(-1, 300), rtol=0, atol=1e-4)


def test_training_with_the_kept_weights_path_matches_dense_products():
    from spikeprune.models import create_model
    from spikeprune.sparsity.masks import MaskEngine, init_masks

    def run(max_weight_density: float) -> tuple[torch.nn.Module, MaskEngine]:
        torch.manual_seed(0)
        net = create_model("fc3", num_classes=10, in_channels=1, T=2, hidden=[256, 256])
        for m in net.modules():
            if isinstance(m, Linear):
                m.max_weight_density = max_weight_density
        engine = MaskEngine(net)
        init_masks(engine, "uniform", 0.3, torch.Generator().manual_seed(0))
        opt = torch.optim.Adam(net.parameters(), lr=1e-3)
        engine.attach(opt)
        gen = torch.Generator().manual_seed(1)
        for _ in range(6):
            x, y = torch.rand(64, 1, 28, 28, generator=gen), torch.randint(0, 10, (64,), generator=gen)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(net(x).mean(0), y).backward()
            opt.step()
        return net, engine

    calls = []
    ext = cpu_kernels()
    real = ext.masked_matmul
    fast, engine = run(0.5)
    dense, _ = run(0.0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ext, "masked_matmul", lambda *a: calls.append(a[-1]) or real(*a))
        run(0.5)
    assert calls  # the kept-weights path ran
    for (name, a), b in zip(fast.state_dict().items(), dense.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=0, atol=1e-5), name
    for name, m in engine.layers.items():
        assert torch.all(m.weight[~m.weight_mask] == 0), name  # masked weights stay exactly 0.0
