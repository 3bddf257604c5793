"""Scores: weight scores, gradient momentum, the PQ index and SAP counts against hand numbers, and the
activity monitor against neurons whose spikes are known."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spikeprune.neurons import IF
from spikeprune.sparsity.masks import MaskEngine
from spikeprune.sparsity.scores import (
    SCORES,
    ActivityMonitor,
    GradientMomentum,
    gaussian_pq_index,
    gradient,
    magnitude,
    momentum,
    pq_index,
    sap_prune_count,
    sap_retained,
)


# ------------------------------------------------------------------------------------- weight scores
def test_weight_scores():
    layer = nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1., -2., 0.], [-0.5, 3., 4.]]))
    assert torch.equal(magnitude(layer), torch.tensor([[1., 2., 0.], [0.5, 3., 4.]]))
    with pytest.raises(ValueError, match="backward"):
        gradient(layer)
    layer.weight.grad = torch.tensor([[-1., 0., 2.], [0., 0., -3.]])
    assert torch.equal(gradient(layer), torch.tensor([[1., 0., 2.], [0., 0., 3.]]))
    assert torch.equal(gradient(layer, grad=-torch.ones(2, 3)), torch.ones(2, 3))
    with pytest.raises(ValueError, match="GradientMomentum"):
        momentum(layer)
    assert torch.equal(momentum(layer, momentum=torch.tensor([-2., 1.])), torch.tensor([2., 1.]))
    assert {"magnitude", "gradient", "momentum"} <= set(SCORES.names())


def test_gradient_momentum_ema():
    gm = GradientMomentum(beta=0.9)
    layer = nn.Linear(2, 1)
    gm("a", layer, torch.tensor([1.0, -2.0]))
    # first call: (1 - 0.9) * g = [0.1, -0.2]
    torch.testing.assert_close(gm.buf["a"], torch.tensor([0.1, -0.2]))
    gm("a", layer, torch.tensor([3.0, 0.0]))
    # 0.9 * [0.1, -0.2] + 0.1 * [3, 0] = [0.39, -0.18]
    torch.testing.assert_close(gm.buf["a"], torch.tensor([0.39, -0.18]))
    g2 = GradientMomentum(0.9)
    g2.load_state_dict(gm.state_dict())
    torch.testing.assert_close(g2.buf["a"], gm.buf["a"])
    g2.buf["a"].zero_()
    assert gm.buf["a"].abs().sum() > 0  # a copy, not shared


# ------------------------------------------------------------------------------------------ PQ index
def test_pq_index_hand_values():
    # flat vector: (mean|w|^p)^(1/p) = (mean|w|^q)^(1/q) = 1 -> I = 0
    assert pq_index(torch.tensor([1., 1., 1., 1.])).item() == pytest.approx(0.0, abs=1e-7)
    # [1,0,0,0], p=.5, q=1: mean sqrt|w| = 0.25 -> ^2 = 0.0625; mean|w| = 0.25; I = 1 - 0.0625/0.25 = 0.75
    assert pq_index(torch.tensor([1., 0., 0., 0.]), 0.5, 1.0).item() == pytest.approx(0.75)
    # [4,1]: mean sqrt = (2+1)/2 = 1.5 -> ^2 = 2.25; mean = 2.5; I = 1 - 2.25/2.5 = 0.1
    assert pq_index(torch.tensor([4., -1.])).item() == pytest.approx(0.1)
    # p=1, q=2 on [1,0,0,0]: mean|w| = 0.25; sqrt(mean w^2) = 0.5; I = 1 - 0.25/0.5 = 0.5
    assert pq_index(torch.tensor([1., 0., 0., 0.]), 1.0, 2.0).item() == pytest.approx(0.5)
    # scale invariant, sign blind
    w = torch.randn(50, generator=torch.Generator().manual_seed(0))
    assert pq_index(-7 * w).item() == pytest.approx(pq_index(w).item(), rel=1e-6)
    # empty / all-zero scopes give 0
    assert pq_index(torch.zeros(5)).item() == 0.0
    assert pq_index(torch.ones(3), mask=torch.zeros(3, dtype=torch.bool)).item() == 0.0
    assert pq_index(torch.tensor([1., 0.])).dtype == torch.float32
    assert pq_index(torch.tensor([1., 0.], dtype=torch.float64)).dtype == torch.float64


def test_pq_index_masked_and_per_row():
    w = torch.tensor([1., 0., 0., 0., 9., 9.])
    m = torch.tensor([True, True, True, True, False, False])
    # only the active entries count: [1,0,0,0] -> 0.75
    assert pq_index(w, mask=m).item() == pytest.approx(0.75)
    # masked entries do not count even if non-zero: [9, 9] is flat
    assert pq_index(w, mask=~m).item() == pytest.approx(0.0, abs=1e-7)
    rows = torch.tensor([[1., 1., 1., 1.], [1., 0., 0., 0.], [4., 1., 7., 7.], [3., 3., 3., 3.]])
    rm = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 1], [1, 1, 0, 0], [0, 0, 0, 0]], dtype=torch.bool)
    per_row = pq_index(rows, mask=rm, dim=1)
    assert per_row.shape == (4,)
    torch.testing.assert_close(per_row, torch.tensor([0.0, 0.75, 0.1, 0.0]))
    # per-row equals the 1-D index of each row's active entries
    g = torch.Generator().manual_seed(1)
    W = torch.randn(5, 12, generator=g)
    M = torch.rand(5, 12, generator=g) > 0.4
    got = pq_index(W, mask=M, dim=1)
    for i in range(5):
        assert got[i].item() == pytest.approx(pq_index(W[i][M[i]]).item(), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("p,q", [(1.0, 1.0), (1.0, 0.5), (0.0, 1.0), (-0.5, 1.0)])
def test_pq_index_needs_p_below_q(p, q):
    with pytest.raises(ValueError, match="0 < p < q"):
        pq_index(torch.ones(3), p, q)


def test_pq_index_of_gaussian():
    # E|X|^r = 2^(r/2) Γ((r+1)/2) / sqrt(pi): E|X|^.5 = 0.82218, E|X| = 0.79788 -> 1 - 0.82218^2/0.79788 = 0.1528
    ref = gaussian_pq_index()
    assert ref == pytest.approx(0.15277, abs=1e-4)
    w = torch.randn(1_000_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert abs(pq_index(w).item() - ref) < 2e-3
    # p=1, q=2: 1 - E|X| / sqrt(E X^2) = 1 - sqrt(2/pi)
    assert gaussian_pq_index(1.0, 2.0) == pytest.approx(1 - math.sqrt(2 / math.pi))


# ---------------------------------------------------------------------------------------------- SAP
def test_sap_retained_and_prune_count_by_hand():
    # p=.5, q=1: r = d (1+η)^-2 (1-I)^1 = 1000 * 0.8472 / 1.002001 = 845.508... -> ceil 846
    r = sap_retained(1000, 0.1528, eta=0.001)
    assert r.item() == 846
    # n_prune = floor(d * clamp(γ (1 - r/d), 0, β)) = floor(1000 * 0.154) = 154
    assert sap_prune_count(1000, 0.1528, eta=0.001, gamma=1.0, beta=0.9).item() == 154
    # γ = 1.2: 1.2 * 0.154 = 0.1848 -> 184
    assert sap_prune_count(1000, 0.1528, eta=0.001, gamma=1.2, beta=0.9).item() == 184
    # I = 0.99: r = ceil(1000 * 0.01 / 1.002001) = ceil(9.98) = 10; 1 - r/d = 0.99 -> clamped at β = 0.9 -> 900
    assert sap_retained(1000, 0.99, eta=0.001).item() == 10
    assert sap_prune_count(1000, 0.99, eta=0.001, gamma=1.0, beta=0.9).item() == 900
    assert sap_prune_count(1000, 0.99, eta=0.001, gamma=1.0, beta=0.5).item() == 500
    # a flat scope and no η: keep everything
    assert sap_retained(10, 0.0).item() == 10
    assert sap_prune_count(10, 0.0, eta=0.0, gamma=1.0, beta=0.9).item() == 0
    # η alone prunes: r = ceil(1000 / 1.002001) = ceil(998.003) = 999 -> 1
    assert sap_prune_count(1000, 0.0, eta=0.001, gamma=1.0, beta=0.9).item() == 1
    # d = 10, I = 0.25, η = 0: r = ceil(7.5) = 8 -> prune 2
    assert sap_prune_count(10, 0.25, eta=0.0, gamma=1.0, beta=0.9).item() == 2
    # p=1, q=2: exponents q/(q-p) = 2 and qp/(q-p) = 2: r = 100 * (1-0.5)^2 = 25
    assert sap_retained(100, 0.5, eta=0.0, p=1.0, q=2.0).item() == 25
    # empty scope
    assert sap_prune_count(0, 0.5, eta=0.001, gamma=1.0, beta=0.9).item() == 0


def test_sap_per_scope_tensors():
    d = torch.tensor([1000, 10, 0, 100])
    idx = torch.tensor([0.1528, 0.25, 0.0, 0.99])
    k = sap_prune_count(d, idx, eta=0.0, gamma=1.0, beta=0.9)
    # 1000: r = ceil(847.2) = 848 -> 152; 10: 2; 0: 0; 100: r = ceil(1) = 1 -> 0.99 -> β: 90
    assert k.tolist() == [152, 2, 0, 90]
    assert k.dtype == torch.long
    r = sap_retained(d, idx)
    assert torch.all(r <= d.double())


# -------------------------------------------------------------------------------------- activity
T = 4
# IF neuron, V_th = 1, hard reset to 0, constant input c per step:
#   c=1   -> H = 1,1,1,1          spikes 1,1,1,1  rate 1     mean|H| 1
#   c=0.5 -> H = .5,1,.5,1        spikes 0,1,0,1  rate 0.5   mean|H| 0.75
#   c=0.3 -> H = .3,.6,.9,1.2     spikes 0,0,0,1  rate 0.25  mean|H| 0.75
#   c=0   -> H = 0                rate 0          mean|H| 0
RATE = {1.0: 1.0, 0.5: 0.5, 0.3: 0.25, 0.0: 0.0}
MEMB = {1.0: 1.0, 0.5: 0.75, 0.3: 0.75, 0.0: 0.0}


def const_input(rows: list[list[float]]) -> torch.Tensor:
    """[T, B, N] input: sample b feeds unit i the constant rows[b][i] at every step."""
    return torch.tensor(rows).unsqueeze(0).expand(T, -1, -1).contiguous()


def expected(rows: list[list[float]], table: dict) -> torch.Tensor:
    return torch.tensor([[table[c] for c in r] for r in rows]).mean(0)


B1 = [[1.0, 0.5, 0.3, 0.0], [1.0, 0.5, 0.3, 0.0]]
B2 = [[0.0, 1.0, 0.5, 0.3], [0.0, 1.0, 0.0, 0.3]]


def test_activity_ema_and_running_mean():
    net = nn.Sequential(IF())
    ema = ActivityMonitor(net, ["0"], "spikes", ema=0.9)
    mean = ActivityMonitor(net, ["0"], "spikes", ema=None)
    a1, a2 = expected(B1, RATE), expected(B2, RATE)
    torch.testing.assert_close(a1, torch.tensor([1.0, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(a2, torch.tensor([0.0, 1.0, 0.25, 0.25]))
    net(const_input(B1))
    torch.testing.assert_close(ema.values()["0"], a1)  # the first batch initialises the EMA
    net(const_input(B2))
    # 0.9 * [1, .5, .25, 0] + 0.1 * [0, 1, .25, .25] = [0.9, 0.55, 0.25, 0.025]
    torch.testing.assert_close(ema.values()["0"], torch.tensor([0.9, 0.55, 0.25, 0.025]))
    # running mean: ([1, .5, .25, 0] + [0, 1, .25, .25]) / 2
    torch.testing.assert_close(mean.values()["0"], torch.tensor([0.5, 0.75, 0.25, 0.125]))
    assert mean.count["0"] == 2
    # eval-mode forwards are not counted
    net.eval()
    net(const_input(B2))
    torch.testing.assert_close(mean.values()["0"], torch.tensor([0.5, 0.75, 0.25, 0.125]))
    net.train()
    # state round trip, reset, close
    other = ActivityMonitor(nn.Sequential(IF()), ["0"], "spikes", ema=None)
    other.load_state_dict(mean.state_dict())
    torch.testing.assert_close(other.values()["0"], mean.values()["0"])
    mean.reset()
    assert mean.values() == {}
    mean.close()
    ema.close()
    assert net[0].observers == []
    net(const_input(B1))
    assert mean.values() == {}


def test_activity_membrane_variants():
    net = nn.Sequential(IF())
    memb = ActivityMonitor(net, ["0"], "membrane", ema=None)
    both = ActivityMonitor(net, ["0"], "spikes+membrane", ema=None)
    net(const_input(B1))
    torch.testing.assert_close(memb.values()["0"], torch.tensor([1.0, 0.75, 0.75, 0.0]))
    torch.testing.assert_close(both.values()["0"], torch.tensor([2.0, 1.25, 1.0, 0.0]))
    net(const_input(B2))
    # B2 membrane: [0, 1, (.75+0)/2, .75] -> running mean with B1
    m2 = expected(B2, MEMB)
    torch.testing.assert_close(m2, torch.tensor([0.0, 1.0, 0.375, 0.75]))
    torch.testing.assert_close(memb.values()["0"], (torch.tensor([1.0, 0.75, 0.75, 0.0]) + m2) / 2)
    with pytest.raises(ValueError, match="activity must be one of"):
        ActivityMonitor(net, ["0"], "voltage")


def test_activity_per_channel_for_conv_shapes():
    net = nn.Sequential(IF())
    mon = ActivityMonitor(net, ["0"], "spikes", ema=None)
    x = torch.zeros(T, 2, 3, 2, 2)
    x[:, :, 0] = 1.0  # channel 0 always fires
    x[:, :, 1, 0, 0] = 0.5  # channel 1: one of 4 positions at rate .5 -> .125
    x[:, 0, 2] = 0.3  # channel 2: sample 0 only, rate .25 -> .125
    net(x)
    torch.testing.assert_close(mon.values()["0"], torch.tensor([1.0, 0.125, 0.125]))


def test_activity_is_seen_before_the_unit_mask():
    # Linear(identity) -> IF -> Linear: the monitor sees what masked units would do
    net = nn.Sequential(nn.Linear(4, 4, bias=False), IF(), nn.Linear(4, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
    x = const_input(B1)
    eng = MaskEngine(net, example_input=x)
    eng.enable_units(["1"])
    eng.set_unit_mask("1", torch.tensor([False, True, False, True]))
    mon = ActivityMonitor(net, ["1"], "spikes", ema=0.9)
    seen = []
    net[2].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    net(x)
    torch.testing.assert_close(mon.values()["1"], torch.tensor([1.0, 0.5, 0.25, 0.0]))
    assert torch.all(seen[0][..., [0, 2]] == 0) and seen[0][..., 1].sum() > 0


def _foreign_neuron_class():
    """A minimal neuron that the adapters take for SpikingJelly's (identified by its class path)."""

    class IFNode(nn.Module):
        def forward(self, x):
            return (x >= 1.0).float()

    IFNode.__module__ = "spikingjelly.activation_based.neuron"
    return IFNode


def test_activity_of_foreign_neuron_is_seen_before_the_unit_mask():
    net = nn.Sequential(nn.Linear(3, 3, bias=False), _foreign_neuron_class()(), nn.Linear(3, 2, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(3))
    x = torch.tensor([[[1.0, 2.0, 0.0]]]).expand(T, 2, 3).contiguous()
    eng = MaskEngine(net, example_input=x)
    eng.enable_units(["1"])  # the unit-mask hook exists before the monitor (as in DynSNN and SCA)
    eng.set_unit_mask("1", torch.tensor([False, True, True]))
    mon = ActivityMonitor(net, ["1"], "spikes", ema=None)
    net(x)
    torch.testing.assert_close(mon.values()["1"], torch.tensor([1.0, 1.0, 0.0]))
    net.eval()
    net(torch.zeros_like(x))
    torch.testing.assert_close(mon.values()["1"], torch.tensor([1.0, 1.0, 0.0]))  # training batches only
    mon.close()
    net.train()
    net(torch.zeros_like(x))
    assert mon.count["1"] == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_statistics_loaded_from_cpu_keep_working_on_gpu():
    net = nn.Sequential(nn.Linear(4, 4, bias=False), IF(), nn.Linear(4, 2, bias=False)).cuda()
    with torch.no_grad():
        net[0].weight.copy_(torch.eye(4))
    x = const_input(B1).cuda()
    eng = MaskEngine(net, example_input=x)
    eng.enable_units(["1"])
    eng.track_unit_grad = True
    for ema in (0.9, None):
        mon = ActivityMonitor(net, ["1"], "spikes", ema=ema)
        mon.load_state_dict({"sum": {"1": torch.ones(4)}, "count": {"1": 1}})  # as from a CPU checkpoint
        eng.unit_grad = {"1": torch.ones(4)}
        net(x).sum().backward()
        assert mon.values()["1"].is_cuda and eng.pop_unit_grad()["1"].is_cuda
        mon.close()


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "flat"])
@pytest.mark.parametrize("op", ["sum", "abs", "dot"])
def test_unit_sums_equal_the_plain_reductions(layout, op):
    # the per-unit reductions of the activity monitors and the gate-gradient hook, compiled or eager
    from spikeprune.kernels import unit_sums

    torch.manual_seed(0)
    shape = (3, 4, 5) if layout == "flat" else (3, 4, 5, 6, 7)
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64)
    if layout == "channels_last":
        x, y = (t.flatten(0, 1).contiguous(memory_format=torch.channels_last).unflatten(0, (3, 4)) for t in (x, y))
    dims = [d for d in range(len(shape)) if d != 2]
    want = {"sum": x.sum(dims), "abs": x.abs().sum(dims), "dot": (x * y).sum(dims)}[op]
    got = unit_sums(x, op, y if op == "dot" else None)
    assert got.shape == (5,) and torch.allclose(got, want, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="op must be"):
        unit_sums(x, "max")
    with pytest.raises(ValueError, match="needed by op 'dot'"):
        unit_sums(x, "dot")
