"""Event-driven inference: every path equals the dense layer, ``auto`` keeps what its own calibration found
fastest, the model swap keeps outputs, and the benchmark scripts run (tiny sizes, correctness only)."""

from __future__ import annotations

import copy
import csv
import importlib.util
import itertools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spikeprune.inference import (
    CONV_MODES,
    LINEAR_MODES,
    EventChain,
    EventConv2d,
    EventLinear,
    check_network,
    compile_chain,
    event_layers,
    event_report,
    to_event_driven,
)
from spikeprune.measure import measure
from spikeprune.models import create_model
from spikeprune.sparsity.masks import MaskEngine, random_mask

ROOT = Path(__file__).resolve().parents[1]
MODES = [*LINEAR_MODES, "auto"]


def sparse_linear(n_in: int, n_out: int, density: float, bias: bool = True, seed: int = 0, **kw) -> EventLinear:
    torch.manual_seed(seed)
    m = EventLinear(n_in, n_out, bias=bias, **kw)
    with torch.no_grad():
        m.weight.mul_(random_mask(m.weight.shape, density, torch.Generator().manual_seed(seed)))
        if bias:
            m.bias.uniform_(-1, 1)
    return m


def spikes(*shape, rate: float, seed: int = 1) -> torch.Tensor:
    return (torch.rand(shape, generator=torch.Generator().manual_seed(seed)) < rate).float()


# ------------------------------------------------------------------------------------------ EventLinear
@pytest.mark.parametrize("batch, density, mode", list(itertools.product([1, 32], [0.1, 0.5], MODES)))
def test_event_linear_equals_dense(batch, density, mode):
    m = sparse_linear(120, 70, density, mode=mode, repeats=1)
    x = spikes(4, batch, 120, rate=0.15)
    want = F.linear(x, m.weight, m.bias)
    with torch.no_grad():
        got = m(x)
    assert got.shape == (4, batch, 70)
    assert torch.allclose(got, want, rtol=0, atol=1e-5), (got - want).abs().max()
    assert m.last_mode == (m.choice[next(iter(m.choice))] if mode == "auto" else mode)


@pytest.mark.parametrize("mode", LINEAR_MODES)
def test_event_linear_edge_inputs(mode):
    m = sparse_linear(40, 30, 0.2, mode=mode, bias=False)
    with torch.no_grad():
        # no spike at all, a single sample, a 1-D input, analog (non-binary) sparse values
        assert torch.equal(m(torch.zeros(3, 2, 40)), torch.zeros(3, 2, 30))
        x1 = spikes(40, rate=0.3)
        assert torch.allclose(m(x1), F.linear(x1, m.weight), atol=1e-5)
        xa = torch.rand(5, 40) * spikes(5, 40, rate=0.4)
        assert torch.allclose(m(xa), F.linear(xa, m.weight), atol=1e-5)
    empty = sparse_linear(40, 30, 0.0, mode=mode)
    with torch.no_grad():
        assert torch.allclose(empty(spikes(2, 40, rate=0.5)), empty.bias.expand(2, 30), atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("batch", [1, 9])
def test_event_path_over_temporal_differences_equals_dense(dtype, batch):
    # units that keep firing (most of them) and some that start or stop: the event path adds only the changes
    # from one step to the next (+1, -1 and analog differences) to the previous step's output
    from spikeprune._ext import cpu_kernels

    if cpu_kernels() is None:
        pytest.skip("compiled CPU kernels unavailable")
    m = sparse_linear(90, 40, 0.3, mode="event").to(dtype)
    g = torch.Generator().manual_seed(3)
    base = torch.rand(batch, 90, generator=g) < 0.4
    steady = torch.stack([base ^ (torch.rand(batch, 90, generator=g) < 0.05) for _ in range(6)]).to(dtype)
    analog = steady * (1 + torch.rand(batch, 90, generator=g, dtype=dtype))  # constant while a unit stays on
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    ext = cpu_kernels()
    st = m._structures()
    for x in (steady, analog, torch.zeros(6, batch, 90, dtype=dtype)):
        want = F.linear(x, m.weight, m.bias)
        with torch.no_grad():
            assert torch.allclose(m(x), want, rtol=0, atol=tol)
            flat = x.reshape(-1, 90).contiguous()
            for steps in (1, 2, 3, 6):  # any split of the rows into steps gives the same outputs
                got = ext.event_linear(flat, *st["csc_arrays"], m.bias, 40, steps)
                assert torch.allclose(got, want.reshape(-1, 40), rtol=0, atol=tol), steps
    with pytest.raises(RuntimeError, match="steps must divide"):
        ext.event_linear(steady.reshape(-1, 90).contiguous(), *st["csc_arrays"], m.bias, 40, 4 * batch + 1)


def test_event_linear_float64_and_weight_updates():
    m = sparse_linear(60, 50, 0.2, mode="event").double()
    x = spikes(8, 60, rate=0.2).double()
    with torch.no_grad():
        assert torch.allclose(m(x), F.linear(x, m.weight, m.bias), rtol=0, atol=1e-12)
        m.weight.mul_(-2)  # in-place change: the cached index structures are rebuilt
        assert torch.allclose(m(x), F.linear(x, m.weight, m.bias), rtol=0, atol=1e-12)


def test_gradients_take_the_dense_path():
    m = sparse_linear(30, 20, 0.3, mode="event")
    x = spikes(4, 30, rate=0.3).requires_grad_()
    m(x).sum().backward()
    assert m.last_mode == "dense" and x.grad is not None and m.weight.grad is not None
    with torch.no_grad():
        m(x)
    assert m.last_mode == "event"


def test_bad_arguments():
    with pytest.raises(ValueError, match="mode"):
        EventLinear(3, 4, mode="fast")
    with pytest.raises(ValueError, match="repeats"):
        EventLinear(3, 4, repeats=0)
    with pytest.raises(ValueError, match="groups"):
        EventConv2d(4, 4, 3, groups=2)
    lin = nn.Linear(3, 4)
    lin.register_buffer("weight_mask", torch.ones(4, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="fold"):
        EventLinear.from_linear(lin)


def test_from_linear_shares_parameters():
    lin = nn.Linear(10, 6)
    ev = EventLinear.from_linear(lin, mode="csr")
    assert ev.weight is lin.weight and ev.bias is lin.bias
    assert isinstance(ev, nn.Linear) and "mode='csr'" in repr(ev)


# ------------------------------------------------------------------------------------------ auto mode
def test_auto_never_chooses_a_slower_path_in_its_own_calibration():
    m = sparse_linear(200, 150, 0.1, mode="auto", repeats=2)
    with torch.no_grad():
        for batch, rate in [(1, 0.05), (1, 0.4), (32, 0.05), (32, 0.4), (8, 0.0)]:
            x = spikes(4, batch, 200, rate=rate, seed=batch)
            y = m(x)
            assert torch.allclose(y, F.linear(x, m.weight, m.bias), atol=1e-5)
    assert len(m.calibration) == 5
    for key, times in m.calibration.items():
        assert set(times) == set(LINEAR_MODES) and all(t > 0 for t in times.values())
        assert times[m.choice[key]] == min(times.values())
    report = event_report(nn.Sequential(m))
    assert report[0]["layer"] == "0" and len(report[0]["calibration"]) == 5


def test_auto_calibrates_once_per_key(monkeypatch):
    m = sparse_linear(50, 40, 0.2, mode="auto", repeats=1)
    x = spikes(4, 2, 50, rate=0.2)
    with torch.no_grad():
        m(x)
        monkeypatch.setattr(m, "calibrate", lambda *a, **k: pytest.fail("calibrated twice"))
        for _ in range(3):
            m(x)
        assert m.last_mode == m.choice[next(iter(m.choice))]


# ------------------------------------------------------------------------------------------ EventConv2d
@pytest.mark.parametrize("k, stride, padding, dilation", [(3, 1, 1, 1), (3, 2, 1, 1), (3, 1, 0, 2), (5, 2, 2, 1),
                                                          (1, 1, 0, 1), (2, 2, 0, 1)])
@pytest.mark.parametrize("batch", [1, 32])
def test_event_conv_equals_dense(k, stride, padding, dilation, batch):
    torch.manual_seed(k * 10 + stride)
    conv = EventConv2d(4, 6, k, stride, padding, dilation, bias=True, mode="event")
    with torch.no_grad():
        conv.weight.mul_(random_mask(conv.weight.shape, 0.4, torch.Generator().manual_seed(k)))
    x = spikes(2, batch, 4, 9, 7, rate=0.2)
    want = F.conv2d(x.flatten(0, 1), conv.weight, conv.bias, stride, padding, dilation).unflatten(0, (2, batch))
    with torch.no_grad():
        got = conv(x)
        assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()
        conv.mode = "auto"
        assert torch.allclose(conv(x), want, atol=1e-5)
    times = conv.calibration[next(iter(conv.calibration))]
    assert set(times) == set(CONV_MODES)


# --------------------------------------------------------------------------------------- model swap
def masked_fc3() -> nn.Module:
    """A small fc3 (float64, so no membrane sits within rounding of the threshold) at 20% connectivity with a
    few dead units."""
    torch.manual_seed(0)
    model = create_model("fc3", T=4, image_size=8, hidden=(48, 32),
                         neuron={"type": "lif", "tau": 2.0, "v_threshold": 0.3}).double()
    x = model.example_input(2).double()
    engine = MaskEngine(model, example_input=x)
    g = torch.Generator().manual_seed(0)
    for name, layer in engine.layers.items():
        engine.set_mask(name, random_mask(layer.weight.shape, 0.2, g))
        with torch.no_grad():  # keep activity up despite the pruning
            layer.weight.mul_(2.5)
    neurons = engine.enable_units()
    um = torch.ones_like(engine.unit_mask(neurons[0]))
    um[:5] = False
    engine.set_unit_mask(neurons[0], um)
    return model




@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("rows", [1, 4, 37])
def test_sparse_paths_equal_dense_on_both_backends(backend, dtype, rows):
    # spikes and analog values, with bias; the float32 sums differ from BLAS only in their order
    torch.manual_seed(rows)
    layer = EventLinear(50, 30, bias=True, mode="dense").to(dtype)
    with torch.no_grad():
        layer.weight.mul_(torch.rand(30, 50) < 0.2)
    x = torch.rand(rows, 50, dtype=dtype)
    for inp in ((x < 0.3).to(dtype), x * (x < 0.5)):
        with torch.no_grad():
            want = layer._dense(inp)
            for mode in ("csr", "gather", "event"):
                got = layer._run(inp, mode)
                tol = 1e-5 if dtype == torch.float32 else 1e-12
                assert torch.allclose(got, want, rtol=0, atol=tol), (mode, (got - want).abs().max())


def test_to_event_driven_keeps_fc3_outputs():
    model = masked_fc3().eval()
    x = torch.rand(16, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    for mode in ("event", "gather", "csr", "auto"):
        fast = to_event_driven(model, mode=mode, example_input=x[:2])
        ev = event_layers(fast)
        if mode in ("event", "gather"):  # the analog-input first layer (body.1) has no input events: dense
            assert list(ev) == ["body.4", "body.6"] and type(fast.body[1]) is not EventLinear
        else:  # it may still use its sparse weights
            assert list(ev) == ["body.1", "body.4", "body.6"] and ev["body.1"].paths == ("dense", "csr")
        assert not fast.training
        with torch.no_grad():
            got = fast(x)
        assert torch.allclose(got, want, rtol=0, atol=1e-10), (mode, (got - want).abs().max())
    assert 0 < float(want.abs().sum())
    # a drop-in: measurement sees the same layers and counts
    m0 = measure(model, [(x, torch.zeros(16, dtype=torch.long))])
    m1 = measure(fast, [(x, torch.zeros(16, dtype=torch.long))])
    assert m1.sops == pytest.approx(m0.sops) and m1.nonzero == m0.nonzero


def test_to_event_driven_convnet_and_explicit_layers():
    torch.manual_seed(0)
    model = create_model("convnet", T=2, image_size=8, channels=(4, 6), hidden=16,
                         neuron={"type": "lif", "v_threshold": 0.3}).double().eval()
    x = model.example_input(3).double()
    with torch.no_grad():
        want = model(x)
    fast = to_event_driven(model, mode="event", example_input=x)
    ev = event_layers(fast)
    assert [type(m) for m in ev.values()] == [EventConv2d, EventLinear, EventLinear]
    assert type(fast.body[0]) is not EventConv2d
    with torch.no_grad():
        assert torch.allclose(fast(x), want, atol=1e-10)
    only = to_event_driven(model, example_input=x, layers=["body.10"])
    assert list(event_layers(only)) == ["body.10"]
    with pytest.raises(ValueError, match="not swappable"):
        to_event_driven(model, example_input=x, layers=["body.1"])


# ----------------------------------------------------------------------------------- benchmark scripts
def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_inference_speed_quick(tmp_path):
    load_script("inference_speed").main(["--quick", "--out", str(tmp_path)])
    md = (tmp_path / "inference_speed.md").read_text()
    assert "# Inference speed" in md and "Command" in md
    rows = read_csv(tmp_path / "inference_speed.csv")
    assert {r["part"] for r in rows} == {"structured", "unstructured"}


def test_sparse_training_cost_quick(tmp_path):
    load_script("sparse_training_cost").main(["--quick", "--models", "convnet", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "sparse_training_cost.csv")
    assert {r["method"] for r in rows} >= {"dense", "pq_rewire", "sca", "dynsnn"}
    assert all(float(r["ratio_vs_dense"]) > 0 for r in rows)
    # every trained net, masks folded into a plain model, computed what it did (the probe checks) and was timed
    assert all(float(r["plain_ms_per_step"]) > 0 for r in rows)
    assert next(float(r["plain_ratio_vs_dense"]) for r in rows if r["method"] == "dense") == 1.0
    for r in rows:
        dens, changing = (list(map(float, r[k].split())) for k in ("input_density", "changing_input_density"))
        assert len(dens) == len(changing) == 4 and dens[0] == changing[0] > 0.5  # first layer: the static image


def test_sparse_training_cost_dense_variant(tmp_path):
    script = load_script("sparse_training_cost")
    script.main(["--quick", "--models", "fc3", "--methods", "pq_rewire", "pq_rewire@dense", "--probe-rounds", "0",
                 "--out", str(tmp_path)])
    rows = {r["method"]: r for r in read_csv(tmp_path / "sparse_training_cost.csv")}
    assert set(rows) == {"dense", "pq_rewire", "pq_rewire@dense"}
    # the same method, seed and data: the same masks whichever way the products are computed
    assert rows["pq_rewire"]["final_density"] == rows["pq_rewire@dense"]["final_density"] != "1.0"
    with pytest.raises(SystemExit):
        script.main(["--quick", "--methods", "pq_rewire@fast", "--out", str(tmp_path)])


def test_sparse_training_cost_changing_inputs():
    changing = load_script("sparse_training_cost").changing
    x = torch.tensor([[[1., 0.], [1., 1.]], [[1., 1.], [0., 1.]], [[0., 1.], [0., 1.]]])  # [T=3, batch=2, 2]
    want = torch.tensor([[[1., 0.], [1., 1.]], [[0., 1.], [-1., 0.]], [[-1., 0.], [0., 0.]]])
    assert torch.equal(changing(x, 3, 2), want)
    assert torch.equal(changing(x.reshape(6, 2), 3, 2), want)  # flattened [T * batch, ...]
    assert torch.equal(changing(x[0], 3, 2), x[0])  # static [batch, ...]: computed once, as it is


def test_throughput_quick(tmp_path):
    pytest.importorskip("spikingjelly.activation_based")
    pytest.importorskip("snntorch")
    load_script("throughput").main(["--quick", "--configs", "fc3:4", "convnet:4", "--out", str(tmp_path)])
    rows = read_csv(tmp_path / "throughput.csv")
    frameworks = {(r["model"], r["framework"]) for r in rows}
    base = {"spikeprune", "spikeprune-eager", "spikeprune-identity", "spikeprune-dense-linear", "spikingjelly",
            "snntorch"}
    assert frameworks == {("fc3", f) for f in base} | {("convnet", f) for f in base | {
        "spikingjelly-nhwc", "snntorch-nhwc"}}  # channels-last variants only where there are 4-D activations
    assert all(float(r["samples_per_s"]) > 0 for r in rows)
    md = (tmp_path / "throughput.md").read_text()
    assert "Static first layer" in md and "## Parity" in md and "compiled / eager kernels" in md
    assert "neuron overhead, dense Linear" in md
    # identical architectures: spikeprune's weights in the other frameworks give spikeprune's outputs
    parity = [line for line in md.splitlines() if line.startswith("| fc3 |") or line.startswith("| convnet |")]
    assert any("| 0 |" in line for line in parity)


def test_copies_and_pickles_drop_the_index_structures(tmp_path):
    m = sparse_linear(20, 10, 0.3, mode="event")
    x = spikes(3, 20, rate=0.3)
    with torch.no_grad():
        y = m(x)
    assert m._struct is not None
    torch.save(m, tmp_path / "m.pt")
    for other in (copy.deepcopy(m), torch.load(tmp_path / "m.pt", weights_only=False)):
        assert other._struct is None and other.mode == "event"
        with torch.no_grad():
            assert torch.equal(other(x), y)


def test_explicit_calibration_on_layer_inputs():
    lin = sparse_linear(30, 20, 0.2, mode="auto", repeats=1)
    x = spikes(4, 3, 30, rate=0.2)
    y = lin.calibrate(x, modes=["dense", "gather"])
    assert y.shape == (4, 3, 20) and torch.allclose(y, F.linear(x, lin.weight, lin.bias), atol=1e-5)
    (key,) = lin.calibration
    assert key[0] == (12, 30) and set(lin.calibration[key]) == {"dense", "gather"}
    conv = EventConv2d(3, 4, 3, padding=1, mode="auto", repeats=1)
    xc = spikes(2, 2, 3, 6, 6, rate=0.3)
    yc = conv.calibrate(xc)
    assert yc.shape == (2, 2, 4, 6, 6)
    assert torch.allclose(yc, F.conv2d(xc.flatten(0, 1), conv.weight, conv.bias, padding=1).unflatten(0, (2, 2)),
                          atol=1e-5)


@pytest.mark.parametrize("slow", ["event", "dense"])
def test_check_network_keeps_the_faster_of_auto_and_dense(slow):
    # a path made slow on purpose: the network check must end with the fast one for the keys it saw
    import time as _time

    torch.manual_seed(0)
    model = nn.Sequential(EventLinear(20, 10, bias=False, mode="auto"))
    layer = model[0]
    x0 = (torch.rand(3, 20) < 0.3).float()
    x = [x0, x0.flip(0)]  # one key (shape, rate bucket): the choice is set before the check
    with torch.no_grad():
        model(x[0])
    keys = list(layer.choice)
    for k in keys:
        layer.choice[k] = "event"
    real = getattr(layer, f"_{slow}")

    def slowed(*a):
        _time.sleep(0.003)
        return real(*a)

    setattr(layer, f"_{slow}", slowed)
    out = check_network(model, x, rounds=3)
    if slow == "event":  # the network lost to dense: the layer got its own duel in the network, and lost it
        its, dense = out["layers"]["0"]
        assert dense < its
    else:  # the network won: no layer needed a duel of its own
        assert out["kept"] == "auto" and out["layers"] == {}
    assert all(layer.choice[k] == ("dense" if slow == "event" else "event") for k in layer.choice)
    assert layer.mode == "auto"
    # dense kept: that input shape now goes dense at once, whatever the rate of a later batch
    assert (x0.shape in layer.dense_shapes) == (slow == "event")


def test_check_network_sends_only_the_losing_layer_dense():
    # two layers whose event paths are chosen; the first one's is slowed on purpose, more than the second one's
    # dense path: the network loses to dense, the first layer alone goes dense and the second keeps its event path
    # (an all-or-nothing check would have lost it too)
    import time as _time

    torch.manual_seed(0)
    model = nn.Sequential(EventLinear(20, 16, bias=False, mode="auto"), EventLinear(16, 8, bias=False, mode="auto"))
    x0 = (torch.rand(3, 20) < 0.3).float()
    with torch.no_grad():  # (the second layer sees the first one's analog outputs: every path takes them)
        model(x0)
    for m in model:
        for k in m.choice:
            m.choice[k] = "event"
    real_event, real_dense = model[0]._event, model[1]._dense

    def slow_event(*a):
        _time.sleep(0.010)
        return real_event(*a)

    def slow_dense(*a):
        _time.sleep(0.004)
        return real_dense(*a)

    model[0]._event, model[1]._dense = slow_event, slow_dense
    out = check_network(model, [x0, x0.flip(0)], rounds=3)
    assert set(out["layers"]) == {"0", "1"}
    assert all(c == "dense" for c in model[0].choice.values()) and x0.shape in model[0].dense_shapes
    assert all(c == "event" for c in model[1].choice.values()) and not model[1].dense_shapes
    assert out["kept"] == "auto"


def test_event_layers_and_chain_rebuild_after_a_fused_step_and_a_mode_switch():
    # PyTorch's fused Adam leaves the weights' version counters unchanged, so the weight-keyed structures are
    # dropped on every train()/eval() switch as well
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    chain = compile_chain(to_event_driven(masked_fc3().eval(), mode="auto", example_input=x[:2]), [x[:3], x[3:]])
    layers = to_event_driven(masked_fc3().eval(), mode="csr", example_input=x[:2])
    for net in (chain, layers):
        with torch.no_grad():
            before = net(x)
        opt = torch.optim.Adam(net.parameters(), lr=0.05, fused=True)
        net.train()
        net(x).square().sum().backward()
        versions = [p._version for p in net.parameters()]
        opt.step()
        assert [p._version for p in net.parameters()] == versions  # what the caches alone would not notice
        net.eval()
        fresh = copy.deepcopy(net)  # new storage: its structures are built from the stepped weights
        with torch.no_grad():
            assert not torch.allclose(net(x), before)
            assert torch.allclose(net(x), fresh(x), rtol=0, atol=1e-10)


def test_compile_chain_gives_the_dense_outputs_and_falls_back_for_training():
    model = masked_fc3().eval()
    x = torch.rand(6, 1, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        want = model(x)
    fast = compile_chain(to_event_driven(model, mode="auto", example_input=x[:2]), [x[:3], x[3:]])
    assert isinstance(fast.body, EventChain) and set(fast.body.paths) == {"1", "4", "6"}
    with torch.no_grad():
        assert torch.allclose(fast(x), want, rtol=0, atol=1e-10)
    for path in ("csr", "event", "dense"):  # every path of the chain, forced
        fast.body.paths = {"4": path, "6": path}
        fast.body._ops = None
        with torch.no_grad():
            assert torch.allclose(fast(x), want, rtol=0, atol=1e-10), path
    twin = copy.deepcopy(fast)  # a copy registers its own ops on the C++ side
    with torch.no_grad():
        assert torch.allclose(twin(x), want, rtol=0, atol=1e-10)
    out = fast(x)  # grad enabled and parameters requiring grad: the layers run as usual
    assert out.grad_fn is not None and torch.allclose(out.detach(), want, atol=1e-10)
    with pytest.raises(ValueError, match="cannot run in the compiled chain"):
        EventChain(nn.Sequential(nn.ReLU()), {})
    with pytest.raises(ValueError, match="must be an nn.Sequential"):
        compile_chain(nn.Linear(2, 2), [torch.rand(1, 2)], attr="weight")
