"""NIR round trips with snnTorch and SpikingJelly on pruned zoo nets: outputs and spike counts equal in float64
(within 1e-6), or a one-line refusal; snnTorch's and SpikingJelly's own exports read by spikeprune."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import liven, mask_randomly
from torch import nn

from spikeprune.models import create_model
from spikeprune.neurons import BaseNeuron

nir = pytest.importorskip("nir")
pytest.importorskip("nirtorch")

T = 4
TOL = 1e-6


def _spike_pool_net():
    """The zoo convnet's layers with max pooling of *spikes* (conv+BN -> LIF -> maxpool): the form NIR expresses."""
    from spikeprune.layers import Flatten, Linear, MaxPool2d
    from spikeprune.models.cnn import SequentialSNN, conv_bn
    from spikeprune.neurons import LIF

    make = lambda: LIF(v_threshold=0.5)  # noqa: E731
    layers = [*conv_bn(1, 6, make), MaxPool2d(2), *conv_bn(6, 8, make), MaxPool2d(2), Flatten(3),
              Linear(8 * 2 * 2, 16, bias=False), make(), Linear(16, 10, bias=False)]
    return SequentialSNN("convnet_spike_pool", layers, (1, 8, 8), 10, T, "direct")


def pruned(name: str, seed: int = 0) -> nn.Module:
    """A pruned zoo net (random 50% connection masks, every third unit dead) that spikes in every layer."""
    torch.manual_seed(seed)
    neuron = {"type": "lif", "v_threshold": 0.5}
    if name == "fc3":
        model = create_model("fc3", hidden=(32, 24), image_size=8, T=T, neuron=neuron)
    elif name == "convnet_avg":  # the zoo convnet with average pooling (the zoo default max-pools analog values)
        model = create_model("convnet", channels=(6, 8), hidden=16, image_size=8, T=T, pool="avg", neuron=neuron)
    else:
        model = _spike_pool_net()
    liven(model, gain=5.0, seed=seed, shift_running_mean=True)
    mask_randomly(model, model.example_input(2), seed)
    return model.eval()


def inputs(seed: int = 1) -> torch.Tensor:
    return torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _is_spiking(name: str, m: nn.Module) -> bool:
    """Neuron layers of any of the three frameworks, without the firing nodes of max pooling's NIR forms."""
    if any(part.endswith(("_fire", "_threshold")) for part in name.split(".")) or getattr(m, "pool_fire", False):
        return False
    return isinstance(m, BaseNeuron) or type(m).__name__ in ("KeepDtype", "_NIRStatefulModule", "Leaky", "LIFNode",
                                                             "IFNode")


@torch.no_grad()
def run(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
    """Output ``[T, B, K]`` and the total spike count of each neuron layer, in order."""
    counts: list[tuple[int, float]] = []
    hooks = []
    seen = set()
    for name, m in model.named_modules():
        if _is_spiking(name, m) and not any(name.startswith(s + ".") for s in seen):
            seen.add(name)
            idx = len(hooks)
            hooks.append(m.register_forward_hook(lambda mod, i, o, idx=idx: counts.append(
                (idx, float((o[0] if isinstance(o, tuple) else o).sum())))))
    try:
        out = model(x)
    finally:
        for h in hooks:
            h.remove()
    per = [0.0] * len(hooks)
    for idx, c in counts:
        per[idx] += c
    return out, per


def assert_same(ref, got):
    (out_r, spk_r), (out_g, spk_g) = ref, got
    assert out_g.shape == out_r.shape
    err = float((out_g.double() - out_r.double()).abs().max())
    assert err <= TOL, f"max |diff| {err}"
    assert spk_g == spk_r, (spk_r, spk_g)
    assert sum(spk_r) > 0 and out_r.abs().sum() > 0  # the comparison is not between silent nets
    return err


NETS = ["fc3", "convnet_avg", "spike_pool"]


@pytest.fixture(scope="module", params=NETS)
def net(request):
    model = pruned(request.param)
    from spikeprune.export.nir import to_nir

    graphs = {t: to_nir(model, target=t) for t in ("generic", "snntorch", "spikingjelly")}
    ref64 = run(model.double(), inputs())
    return request.param, model, graphs, ref64


# ----------------------------------------------------------------------------------------- spikeprune
def test_graph_profiles(net):
    name, model, graphs, _ = net
    assert graphs["generic"].metadata["dt"] == 1.0
    for t in ("snntorch", "spikingjelly"):
        g = graphs[t]
        assert g.metadata["dt"] == 1e-4 and g.metadata["target"] == t
        lif = [n for n in g.nodes.values() if type(n).__name__ == "LIF" and "spikeprune_module" not in n.metadata]
        assert lif and all(np.allclose(n.tau, 2e-4) and n.tau.dtype == np.float64 for n in lif)
        flat = [n for n in g.nodes.values() if type(n).__name__ == "Flatten"]
        assert all(n.start_dim < 0 for n in flat)  # the same per sample and after a batch axis
        kinds = {type(n).__name__ for n in g.nodes.values()}
        assert not kinds & {"SumPool2d", "Threshold"}  # neither importer maps them


def test_spikeprune_round_trip(net, tmp_path):
    from spikeprune.export.nir import from_nir

    name, model, graphs, ref = net
    for t, g in graphs.items():
        nir.write(str(tmp_path / f"{t}.nir"), g)
        back = from_nir(str(tmp_path / f"{t}.nir")).double()
        assert_same(ref, run(back, inputs()))
        if name == "spike_pool":
            assert sum(type(m).__name__ == "MaxPool2d" for m in back.modules()) == 2


# ------------------------------------------------------------------------------------------- snnTorch
@pytest.fixture(scope="module")
def snn():
    return pytest.importorskip("snntorch")


def _unwrap_snntorch(runner) -> nn.Sequential:
    """The imported net's modules in graph order, as the plain single-step snnTorch net a user would write."""
    from spikeprune.export.interop import KeepDtype

    mods = []
    for key, m in runner.gm.named_children():
        m = m.module if isinstance(m, KeepDtype) else m
        m.pool_fire = key.endswith("_fire")
        mods.append(m)
    return nn.Sequential(*mods)


def test_snntorch_round_trip(net, snn, capsys):
    """spikeprune -> NIR -> snnTorch (import_from_nir as released on the snntorch profile; to_snntorch on any
    graph) -> snnTorch's export_to_nir -> spikeprune: same outputs and spike counts."""
    from snntorch.import_nir import import_from_nir

    from spikeprune.adapters.snntorch import SnnTorchSequence
    from spikeprune.export.interop import KeepDtype, StepRunner, from_snntorch, to_snntorch

    name, model, graphs, ref = net
    released = import_from_nir(graphs["snntorch"])
    for key, m in list(released.named_children()):  # snnTorch 1.0.0 spikes are float32 whatever the input
        if type(m).__name__ == "Leaky":
            setattr(released, key, KeepDtype(m))
    assert_same(ref, run(StepRunner(released.double(), T), inputs()))
    for t in ("generic", "snntorch"):
        imported = to_snntorch(graphs[t], dtype=torch.float64)
        assert_same(ref, run(imported, inputs()))
    plain = _unwrap_snntorch(to_snntorch(graphs["snntorch"], dtype=torch.float64))
    wrapped = nn.Sequential(*[KeepDtype(m) if type(m).__name__ == "Leaky" else m for m in plain])
    for w, m in zip(wrapped, plain):
        w.pool_fire = getattr(m, "pool_fire", False)
    assert_same(ref, run(SnnTorchSequence(wrapped, T), inputs()))
    back = from_snntorch(plain, inputs()[:2]).double()
    assert_same(ref, run(back, inputs()))
    capsys.readouterr()


def test_snntorch_refusals(snn):
    from spikeprune.export.interop import to_snntorch
    from spikeprune.export.nir import to_nir

    soft = create_model("fc3", hidden=(8,), image_size=8, neuron={"type": "lif", "v_reset": None})
    with pytest.raises(ValueError, match="reset by subtraction"):
        to_nir(soft, target="snntorch")
    with pytest.raises(ValueError, match="subtraction"):
        to_snntorch(to_nir(soft))
    with pytest.raises(ValueError, match="IF"):
        to_nir(create_model("fc3", hidden=(8,), image_size=8, neuron="if"), target="snntorch")
    with pytest.raises(ValueError, match="dt=1e-4"):
        to_nir(soft, target="snntorch", dt=1.0)


def _snntorch_net(snn, conv: bool, reset: str = "zero"):
    torch.manual_seed(3)
    lif = lambda **kw: snn.Leaky(beta=0.8, threshold=0.5, init_hidden=True, reset_mechanism=reset, **kw)  # noqa
    if conv:
        net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), lif(), nn.AvgPool2d(2), nn.Conv2d(6, 8, 3, padding=1),
                            lif(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 10), lif(output=True))
    else:
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), lif(), nn.Linear(32, 10), lif(output=True))
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(3.0)
    return net


@pytest.mark.parametrize("conv", [False, True], ids=["mlp", "conv"])
def test_snntorch_export_to_spikeprune(snn, conv, capsys):
    """snnTorch's own export_to_nir (with its 1.0.0 quirks repaired) -> spikeprune: same outputs."""
    from spikeprune.adapters.snntorch import SnnTorchSequence
    from spikeprune.export.interop import KeepDtype, from_snntorch

    net = _snntorch_net(snn, conv)
    back = from_snntorch(net, inputs()[:2].float(), T=T).double()
    for i, m in enumerate(net):
        if type(m).__name__ == "Leaky":
            net[i] = KeepDtype(m)
    ref = run(SnnTorchSequence(net.double(), T), inputs())
    assert_same(ref, run(back, inputs()))
    capsys.readouterr()


def test_snntorch_default_subtract_reset_refused(snn):
    from spikeprune.export.interop import from_snntorch

    with pytest.raises(ValueError, match="reset_mechanism='subtract'"):
        from_snntorch(_snntorch_net(snn, False, reset="subtract"), inputs()[:2].float())


# ---------------------------------------------------------------------------------------- SpikingJelly
@pytest.fixture(scope="module")
def sj():
    return pytest.importorskip("spikingjelly.activation_based")


def _sj_plain(runner, step_mode: str = "m") -> nn.Sequential:
    from spikingjelly.activation_based import functional

    mods = []
    for key, m in runner.gm.named_children():
        m = getattr(m, "module", m)
        m.pool_fire = key.endswith("_fire")
        mods.append(m)
    seq = nn.Sequential(*mods)
    functional.set_step_mode(seq, step_mode)
    return seq


def test_spikingjelly_round_trip(net, sj):
    """spikeprune -> NIR -> SpikingJelly (import_from_nir as released on the spikingjelly profile;
    to_spikingjelly on any graph) -> SpikingJelly's export_to_nir -> spikeprune."""
    from spikingjelly.activation_based import functional
    from spikingjelly.activation_based.nir_exchange import import_from_nir

    from spikeprune.export.interop import StepRunner, from_spikingjelly, to_spikingjelly

    name, model, graphs, ref = net
    released = import_from_nir(graphs["spikingjelly"], dt=1e-4, dtype=torch.float64)
    assert_same(ref, run(StepRunner(released, T), inputs()))
    for t in ("generic", "spikingjelly"):
        assert_same(ref, run(to_spikingjelly(graphs[t], dtype=torch.float64), inputs()))
    plain = _sj_plain(to_spikingjelly(graphs["spikingjelly"], dtype=torch.float64))
    x = inputs()
    functional.reset_net(plain)
    xs = x.unsqueeze(0).expand(T, *x.shape)
    assert_same(ref, run(plain, xs))
    functional.reset_net(plain)
    back = from_spikingjelly(plain, xs[:, :2]).double()
    assert_same(ref, run(back, x))


def test_spikingjelly_soft_reset(sj):
    """Soft reset: refused by the spikingjelly profile (its importer would make it hard), exact via
    to_spikingjelly."""
    from spikeprune.export.interop import to_spikingjelly
    from spikeprune.export.nir import to_nir

    model = liven(create_model("fc3", hidden=(16,), image_size=8, T=T, neuron={"type": "lif", "v_reset": None,
                                                                              "v_threshold": 0.5}), 3.0)
    with pytest.raises(ValueError, match="soft reset"):
        to_nir(model, target="spikingjelly")
    g = to_nir(model)
    ref = run(model.double().eval(), inputs())
    assert_same(ref, run(to_spikingjelly(g, dtype=torch.float64), inputs()))


def test_spikingjelly_export_to_spikeprune(sj):
    from spikingjelly.activation_based import functional, layer, neuron

    from spikeprune.export.interop import from_spikingjelly

    torch.manual_seed(4)
    net = nn.Sequential(layer.Conv2d(1, 6, 3, padding=1), neuron.LIFNode(tau=2.0, v_threshold=0.5),
                        layer.AvgPool2d(2), layer.Flatten(), layer.Linear(6 * 4 * 4, 10),
                        neuron.LIFNode(tau=3.0, v_threshold=0.5, decay_input=False))
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(3.0)
    net = net.double()
    x = inputs()
    xs = x.unsqueeze(0).expand(T, *x.shape)
    back = from_spikingjelly(net, xs[:, :2]).double()
    functional.reset_net(net)
    assert_same(run(net, xs), run(back, x))


def test_spikingjelly_max_pool_tutorial_net(sj):
    """SpikingJelly's conv tutorials max-pool spikes; its own exporter fails on them (2.0.0), from_spikingjelly
    falls back to spikeprune's exporter: same outputs, max pooling kept."""
    from spikingjelly.activation_based import functional, layer, neuron

    from spikeprune.export.interop import from_spikingjelly

    torch.manual_seed(5)
    net = nn.Sequential(layer.Conv2d(1, 6, 3, padding=1), neuron.IFNode(v_threshold=0.5), layer.MaxPool2d(2),
                        layer.Conv2d(6, 8, 3, padding=1), neuron.IFNode(v_threshold=0.5), layer.MaxPool2d(2),
                        layer.Flatten(), layer.Linear(8 * 2 * 2, 10))
    functional.set_step_mode(net, "m")
    with torch.no_grad():
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(3.0)
    net = net.double()
    x = inputs()
    xs = x.unsqueeze(0).expand(T, *x.shape)
    back = from_spikingjelly(net, xs[:, :2]).double()
    assert sum(type(m).__name__ == "MaxPool2d" for m in back.modules()) == 2
    functional.reset_net(net)
    assert_same(run(net, xs), run(back, x))


# ------------------------------------------------------------------------------ constructs and refusals
def test_zoo_max_pool_of_analog_values_refused():
    from spikeprune.export.nir import to_nir

    for t in ("generic", "snntorch", "spikingjelly"):
        with pytest.raises(ValueError, match="max-pools analog values") as e:
            to_nir(create_model("convnet", image_size=8, channels=(2, 2), hidden=4), target=t)
        assert "\n" not in str(e.value)


def test_voting_layer_and_normalisation(sj, snn, capsys):
    """VotingLayer as a fixed nir.Linear (cifarnet exports), input normalisation as a diagonal 1x1 conv: the
    graph takes raw inputs."""
    from spikeprune.export.interop import to_snntorch, to_spikingjelly
    from spikeprune.export.nir import from_nir, to_nir
    from spikeprune.layers import Flatten, Linear, VotingLayer
    from spikeprune.models.cnn import SequentialSNN, conv_bn
    from spikeprune.neurons import LIF

    g = to_nir(create_model("cifarnet", image_size=8, T=2))
    assert any(n.metadata.get("spikeprune_module") == "VotingLayer" for n in g.nodes.values())
    make = lambda: LIF(v_threshold=0.5)  # noqa: E731
    model = SequentialSNN("voting", [*conv_bn(1, 4, make), Flatten(3), Linear(4 * 64, 30, bias=False), make(),
                                     VotingLayer(3)], (1, 8, 8), 10, T, "direct")
    liven(model, 3.0, shift_running_mean=True).eval()
    mean, std = (0.2860,), (0.3530,)
    x = inputs()
    ref = run(model.double(), (x - mean[0]) / std[0])
    for t in ("generic", "snntorch", "spikingjelly"):
        g = to_nir(model.float(), target=t, normalize=(mean, std))
        assert "input_normalization" in g.metadata and type(g.nodes["normalize"]).__name__ == "Conv2d"
        back = from_nir(g).double()
        assert_same(ref, run(back, x))
        assert any(isinstance(m, VotingLayer) for m in back.modules())
        if t != "snntorch":
            assert_same(ref, run(to_spikingjelly(g, dtype=torch.float64), x))
        if t != "spikingjelly":
            assert_same(ref, run(to_snntorch(g, dtype=torch.float64), x))
    capsys.readouterr()


def test_missing_dt_is_named():
    from spikeprune.export.nir import from_nir, to_nir

    g = to_nir(pruned("fc3"), target="spikingjelly")
    del g.metadata["dt"]  # as SpikingJelly's exporter writes it
    with pytest.raises(ValueError, match="dt"):
        from_nir(g)
