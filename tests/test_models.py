"""Model zoo: shapes, input validation, weight counts, registry errors and backward passes."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from spikeprune.layers import BatchNorm2d, Conv2d, Repeat
from spikeprune.models import create_model, list_models

BIG = {"cifarnet", "vgg_snn", "resnet19", "sew_resnet18", "vgg16_bn"}


def weight_count(model: nn.Module) -> int:
    """Number of conv/linear weights."""
    return sum(m.weight.numel() for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear)))


def test_zoo_is_complete():
    assert set(list_models()) >= {"fc2", "fc3", "convnet", "lenet5", "cifarnet", "vgg_snn", "resnet19",
                                  "sew_resnet18", "vgg16_bn"}


@pytest.mark.parametrize("name", list_models())
def test_forward_shape_and_bad_input(name):
    torch.manual_seed(0)
    model = create_model(name)
    model.set_T(2)
    batch = 1 if name in BIG else 2
    with torch.no_grad():
        out = model(model.example_input(batch))
    assert out.shape == (2, batch, model.num_classes)
    assert torch.isfinite(out).all()
    wrong = torch.rand(batch, model.in_shape[0] + 1, *model.in_shape[1:])
    expected = ", ".join(map(str, model.in_shape)) + "]"
    with pytest.raises(ValueError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        model(wrong)


@pytest.mark.parametrize("name, expected", [("resnet19", 12.6e6), ("vgg_snn", 9.2e6), ("cifarnet", 36.7e6),
                                            ("vgg16_bn", 14.7e6)])
def test_weight_counts(name, expected):
    n = weight_count(create_model(name))
    print(name, n)
    assert abs(n - expected) / expected < 0.02


def test_fc3_weight_count_exact():
    assert weight_count(create_model("fc3")) == 784 * 800 + 800 * 800 + 800 * 10


def test_registry_errors():
    with pytest.raises(ValueError, match="nope"):
        create_model("nope")
    with pytest.raises(ValueError, match="bogus"):
        create_model("fc3", bogus=1)


@pytest.mark.parametrize("name", ["resnet19", "sew_resnet18"])
def test_residual_direct_stem_is_static(name):
    body = create_model(name, image_size=8).body
    assert [type(m) for m in body[:3]] == [Conv2d, BatchNorm2d, Repeat]


def test_sew_imagenet_stem_and_events():
    model = create_model("sew_resnet18", image_size=96, T=1, num_classes=5)
    assert any(isinstance(m, nn.MaxPool2d) for m in model.body[:5])
    with torch.no_grad():
        assert model(model.example_input(1)).shape == (1, 1, 5)
    events = create_model("resnet19", image_size=8, in_channels=2, T=2, encoding="events")
    with torch.no_grad():
        assert events(events.example_input(2)).shape == (2, 2, 10)
    with pytest.raises(ValueError, match=r"\[B, T, 2, 8, 8\]"):
        events(torch.rand(2, 2, 8, 8))


@pytest.mark.parametrize("bn, image_size", [(False, 28), (True, 32)])
def test_lenet5_variants(bn, image_size):
    model = create_model("lenet5", bn=bn, image_size=image_size, T=2)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == bn
    assert all(m.bias is not None for m in model.modules() if isinstance(m, nn.Linear))
    with torch.no_grad():
        assert model(model.example_input(2)).shape == (2, 2, 10)


@pytest.mark.parametrize("name, kwargs", [("convnet", {}), ("resnet19", {"image_size": 8})])
def test_backward_reaches_every_weight(name, kwargs):
    torch.manual_seed(0)
    model = create_model(name, T=2, **kwargs)
    out = model(model.example_input(2))
    nn.functional.cross_entropy(out.mean(0), torch.tensor([0, 1])).backward()
    for mod in model.modules():
        if isinstance(mod, (nn.Conv2d, nn.Linear)):
            assert mod.weight.grad is not None and torch.isfinite(mod.weight.grad).all()


@pytest.mark.parametrize("shape", [(3, 2, 5, 8, 8), (2, 7, 7, 9), (4, 2, 16, 6, 5)])
def test_maxpool_without_grad_equals_the_pooling_kernel(shape):
    # the inference shortcut (max of four strided views) gives the pooling kernel's values, odd sizes included,
    # in either memory layout; with autograd the kernel itself runs
    from spikeprune.layers import MaxPool2d

    torch.manual_seed(0)
    x = torch.randn(*shape)
    pool = MaxPool2d(2)
    want = torch.nn.functional.max_pool2d(x.flatten(0, -4), 2).reshape(*shape[:-2], shape[-2] // 2, shape[-1] // 2)
    for inp in (x, x.flatten(0, -4).contiguous(memory_format=torch.channels_last).reshape(shape)):
        with torch.no_grad():
            assert torch.equal(pool(inp), want)
    xg = x.clone().requires_grad_()
    out = pool(xg)
    assert torch.equal(out.detach(), want) and out.grad_fn is not None
    out.sum().backward()
    assert xg.grad.sum() == want.numel()  # one input per window gets the gradient


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("kind", ["spikes", "sparse_analog"])
@pytest.mark.parametrize("n_out", [10, 64, 130])  # below, at and past one 64-float block (a zero-padded tail)
@pytest.mark.parametrize("shape", [(3, 5, 97), (4, 45, 300)])  # one tile; input and row tiles (180 rows, 90 per row)
def test_linear_on_sparse_input_equals_dense(backend, dtype, kind, n_out, shape):
    # the spike-sparse path (compiled) and the dense layer (eager) give the same outputs and the same gradients for
    # x, W and b, whether the non-zeros are all 1 (spikes) or not
    from spikeprune._ext import cpu_kernels
    from spikeprune.layers import Linear

    torch.manual_seed(0)
    n_in = shape[-1]
    x = (torch.rand(shape) < (0.1 if n_in < 100 else 0.3)).to(dtype)
    if kind == "sparse_analog":
        x = x * torch.randn_like(x)
    x[1, 2] = 0  # an empty row
    x[2, 3:] = 0  # trailing empty rows (the index list must not be written past its end)
    layer = Linear(n_in, n_out).to(dtype)
    layer.max_input_density = 8.0  # the sparse path whatever the layer's width (its limit scales with it)
    ref = torch.nn.Linear(n_in, n_out).to(dtype)
    ref.load_state_dict(layer.state_dict())
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    y, want = layer(xa), ref(xb)
    if backend == "cpp" and cpu_kernels() is not None:
        assert "SparseInputLinear" in type(y.grad_fn.next_functions[0][0]).__name__  # under the [T, B] view
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    assert y.shape == (*shape[:2], n_out)
    assert torch.allclose(y, want, rtol=0, atol=tol)
    for a, b in ((xa.grad, xb.grad), (layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)):
        assert torch.allclose(a, b, rtol=0, atol=tol)
    assert torch.equal(layer.weight.grad != 0, ref.weight.grad != 0)  # untouched inputs' weights get exactly 0


def test_linear_sparse_path_is_taken_only_below_the_density_limit():
    from spikeprune._ext import cpu_kernels
    from spikeprune.kernels import sparse_input_linear
    from spikeprune.layers import Linear

    if cpu_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable")
    torch.manual_seed(0)
    w = torch.randn(64, 40)
    sparse = (torch.rand(6, 40) < 0.1).float()
    sparse[0, :4] = 1  # 4 + about 20 of 240 non-zero: 0.1 (the limit at 0.25 is 60)
    dense = torch.rand(6, 40) + 0.1
    assert sparse_input_linear(sparse, w) is not None
    assert sparse_input_linear(dense, w) is None  # every input non-zero: the dense kernel is faster
    assert sparse_input_linear(sparse.double(), w) is None  # mixed dtypes: left to F.linear (which raises)
    # 8 outputs are summed as a block of 64: the limit is 8/64 of max_density (0.25 -> 7.5 of 240 inputs)
    assert sparse_input_linear(sparse, w[:8]) is None
    assert sparse_input_linear(sparse, w[:8], max_density=2.0) is not None
    layer = Linear(40, 8, bias=False)
    layer.max_input_density = 0.0  # switched off: plain nn.Linear
    y = layer(sparse.requires_grad_())
    assert "SparseInputLinear" not in type(y.grad_fn).__name__
    layer.max_input_density = 2.0
    assert "SparseInputLinear" in type(layer(sparse).grad_fn).__name__


def test_linear_sparse_path_trains_a_masked_layer_like_the_dense_one():
    # a pruned layer (weight * mask, as the mask engine leaves it) gets the same dense gradient (regrowth scores
    # need the gradient of the pruned weights too)
    from spikeprune.layers import Linear

    torch.manual_seed(1)
    layer = Linear(50, 20, bias=False)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(20, 50) < 0.3)
    x = (torch.rand(4, 7, 50) < 0.15).float()
    layer(x).square().sum().backward()
    w = layer.weight.detach().clone().requires_grad_()
    torch.nn.functional.linear(x, w).square().sum().backward()
    assert torch.allclose(layer.weight.grad, w.grad, rtol=0, atol=1e-5)
    assert int((layer.weight.grad[layer.weight == 0] != 0).sum()) > 0


def test_linear_inference_reuses_the_packed_weight_until_it_changes():
    from spikeprune._ext import cpu_kernels
    from spikeprune.layers import Linear

    if cpu_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable")
    torch.manual_seed(0)
    layer = Linear(30, 70)
    x = (torch.rand(4, 30) < 0.1).float()
    with torch.no_grad():
        y1 = layer(x)
        packed = layer.__dict__["_packed_cache"][1]
        layer(x)
        assert layer.__dict__["_packed_cache"][1] is packed  # unchanged weight: packed once
        layer.train()  # no mode change (it is training): kept; a repacking per eval() call made inference 10x slower
        assert layer.__dict__["_packed_cache"][1] is packed
        layer.eval()  # a mode change: dropped (a fused optimizer may have stepped without bumping the version)
        assert "_packed_cache" not in layer.__dict__
        layer(x)
        packed = layer.__dict__["_packed_cache"][1]
        layer.weight.mul_(2.0)  # an in-place change (an optimizer step, a mask) bumps the version: packed again
        y2 = layer(x)
    assert layer.__dict__["_packed_cache"][1] is not packed
    assert torch.allclose(y2 - layer.bias, 2 * (y1 - layer.bias), atol=1e-5)
    assert torch.allclose(y2, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)


@pytest.mark.parametrize("switch_mode", [False, True])
def test_linear_inference_sees_the_steps_of_a_fused_optimizer(switch_mode):
    # PyTorch's fused Adam updates weights in place without bumping their version: the packed weight must not
    # outlive the step (the run's optimizer bumps versions; any mode switch drops the packed weight too)
    from types import SimpleNamespace

    from spikeprune._ext import cpu_kernels
    from spikeprune.layers import Linear
    from spikeprune.train import make_optimizer

    if cpu_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable")
    torch.manual_seed(0)
    layer = Linear(30, 70)
    x = (torch.rand(8, 30) < 0.1).float()
    if switch_mode:  # a plain fused Adam (no version bumps), with the usual train()/eval() around the step
        opt = torch.optim.Adam(layer.parameters(), lr=0.1, fused=True)
        version = layer.weight._version
    else:
        opt = make_optimizer(layer.parameters(), SimpleNamespace(optimizer="adam", lr=0.1, weight_decay=0.0))
        assert opt.param_groups[0]["fused"]
    layer.eval()
    with torch.no_grad():
        before = layer(x)
    if switch_mode:
        layer.train()
    layer(x).square().sum().backward()
    opt.step()
    if switch_mode:
        assert layer.weight._version == version  # what makes the version-keyed cache unsafe on its own
        layer.eval()
    with torch.no_grad():
        after = layer(x)
    assert not torch.allclose(after, before)
    assert torch.allclose(after, torch.nn.functional.linear(x, layer.weight, layer.bias), atol=1e-5)


@pytest.mark.parametrize("fused", [True, False])
def test_make_optimizer_fused_switch(fused):
    from types import SimpleNamespace

    from spikeprune.train import make_optimizer

    for name, cls in [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)]:
        cfg = SimpleNamespace(optimizer=name, lr=0.1, weight_decay=0.0, momentum=0.9, nesterov=False,
                              fused_optimizer=fused)
        opt = make_optimizer(nn.Linear(3, 2).parameters(), cfg)
        assert type(opt) is cls and bool(opt.param_groups[0]["fused"]) is fused


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("analog", [False, True])
def test_linear_takes_temporal_differences_of_persistent_spikes(dtype, analog):
    # most neurons that fire at step t fired at t - 1: x[t] - x[t-1] has far fewer non-zeros, and the layer sums
    # W (x[t] - x[t-1]) over the steps instead (dW from the suffix sums of g); same outputs and gradients
    from spikeprune._ext import cpu_kernels
    from spikeprune.layers import Linear

    if cpu_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable")
    torch.manual_seed(0)
    base = torch.rand(45, 300) < 0.25
    persistent = torch.stack([base ^ (torch.rand(45, 300) < 0.03) for _ in range(5)]).to(dtype)
    if analog:  # values that stay the same while the unit stays on
        persistent = persistent * (1 + torch.rand(45, 300, dtype=dtype))
    fresh = (torch.rand(5, 45, 300) < 0.25).to(dtype)  # independent steps: the differences are denser
    tol = 1e-4 if dtype == torch.float32 else 1e-11
    for x, delta in ((persistent, True), (fresh, False)):
        layer = Linear(300, 128).to(dtype)
        ref = torch.nn.Linear(300, 128).to(dtype)
        ref.load_state_dict(layer.state_dict())
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        y, want = layer(xa), ref(xb)
        node = y.grad_fn.next_functions[0][0]
        assert "SparseInputLinear" in type(node).__name__ and (node.steps == 5) is delta
        g = torch.randn_like(want)
        y.backward(g)
        want.backward(g)
        assert torch.allclose(y, want, rtol=0, atol=tol)
        for a, b in ((xa.grad, xb.grad), (layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)):
            assert torch.allclose(a, b, rtol=0, atol=tol)
    layer.eval()
    with torch.no_grad():  # inference (packed weight) takes it too
        assert torch.allclose(layer(persistent), torch.nn.functional.linear(persistent, layer.weight, layer.bias),
                              rtol=0, atol=tol)


def test_dense_but_persistent_input_qualifies_through_its_differences():
    # 60% of the inputs are on (above the 35% limit) but they barely change over the steps: the differences hold
    # about 15% + 4% x 3/4 non-zeros and the sparse path takes them; an input that changes at every step stays dense
    from spikeprune._ext import cpu_kernels
    from spikeprune.layers import Linear

    if cpu_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable")
    torch.manual_seed(1)
    base = torch.rand(40, 200) < 0.6
    steady = torch.stack([base ^ (torch.rand(40, 200) < 0.02) for _ in range(4)]).float()
    assert float((steady != 0).float().mean()) > 0.55
    changing = (torch.rand(4, 40, 200) < 0.6).float()
    layer = Linear(200, 96)
    ref = torch.nn.Linear(200, 96)
    ref.load_state_dict(layer.state_dict())
    x = steady.clone().requires_grad_()
    y = layer(x)
    node = y.grad_fn.next_functions[0][0]
    assert "SparseInputLinear" in type(node).__name__ and node.steps == 4
    xr = steady.clone().requires_grad_()
    want = ref(xr)
    g = torch.randn_like(want)
    y.backward(g)
    want.backward(g)
    assert torch.allclose(y, want, rtol=0, atol=1e-4)
    for a, b in ((x.grad, xr.grad), (layer.weight.grad, ref.weight.grad), (layer.bias.grad, ref.bias.grad)):
        assert torch.allclose(a, b, rtol=0, atol=1e-4)
    assert "SparseInputLinear" not in type(layer(changing.requires_grad_()).grad_fn).__name__
    # the differences of an exactly repeated analog input are x[0] and then zeros: a sixth of the work
    static = (torch.rand(40, 200) + 0.5).expand(6, 40, 200).requires_grad_()
    node = layer(static).grad_fn.next_functions[0][0]
    assert "SparseInputLinear" in type(node).__name__ and node.steps == 6
    assert torch.allclose(layer(static), ref(static), rtol=0, atol=1e-4)


def test_vgg16_bn_plan():
    """SCA's snnvgg16_bn: 13 3x3 conv + BN + neuron in the VGG-16 plan, five pools, FC(512 -> classes)."""
    model = create_model("vgg16_bn", num_classes=100)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in convs] == [64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512]
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    assert sum(isinstance(m, BatchNorm2d) for m in model.modules()) == 13
    assert [m for m in model.modules() if isinstance(m, nn.Linear)][0].in_features == 512
    with pytest.raises(ValueError, match="image_size >= 32"):
        create_model("vgg16_bn", image_size=16)
