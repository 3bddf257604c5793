"""SpikingJelly and snnTorch models pruned with `spikeprune.prune` in the user's own training loop."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spikeprune
from spikeprune.adapters import framework_of, neuron_spikes, reset_states, single_step, unit_axis, with_spikes
from spikeprune.measure import measure

T, B = 4, 8


def _loop(model, pruner, opt, epochs=2, steps=4, make_x=None, after_step=None, seed=0):
    """The user's own loop: forward, loss on the time-mean, step, pruner.step(), pruner.epoch_end()."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(epochs):
        for _ in range(steps):
            x, y = make_x(g), torch.randint(0, 4, (B,), generator=g)
            loss = F.cross_entropy(model(x).mean(0), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()
            if after_step is not None:
                after_step()
        out.append(pruner.epoch_end({"val_acc": 0.5}))
    return out


def _check_connection_masks(engine):
    for name, layer in engine.layers.items():
        assert layer.weight_mask.dtype == torch.bool
        assert bool((layer.weight[~layer.weight_mask] == 0).all()), name


def _silenced(model, engine, x, reset=lambda: None):
    """Every dead unit's output is exactly 0 in a forward (read by a hook registered after the mask hook)."""
    modules = dict(model.named_modules())
    seen = {}
    hooks = [modules[n].register_forward_hook(
        lambda m, i, o, n=n: seen.setdefault(n, []).append(neuron_spikes(o).detach()))
        for n in engine.unit_masks()]
    reset()
    with torch.no_grad():
        model(x)
    reset()
    for h in hooks:
        h.remove()
    dead_any = False
    for n, um in engine.unit_masks().items():
        for s in seen[n]:
            ax = unit_axis(modules[n], s)
            dead = ~um
            dead_any |= bool(dead.any())
            assert float(s.transpose(0, ax)[dead].abs().sum()) == 0.0, n
    return dead_any


# ------------------------------------------------------------------------------------------ helpers
def test_output_forms_and_layouts():
    s = torch.ones(2, 3)
    assert neuron_spikes((s, s * 2)) is s and neuron_spikes(s) is s
    out = with_spikes((s, s * 2), s * 0)
    assert isinstance(out, tuple) and float(out[0].sum()) == 0 and float(out[1].sum()) == 12
    assert with_spikes(s, s * 0).sum() == 0
    from spikeprune.neurons import LIF

    lif = LIF()
    assert framework_of(lif) is None and not single_step(lif)
    assert unit_axis(lif, torch.zeros(T, B, 5)) == 2 and unit_axis(lif, torch.zeros(B, 5)) == 1
    reset_states(nn.Sequential(nn.Linear(2, 2), lif))  # nothing foreign: a no-op


# ----------------------------------------------------------------------------------------- SpikingJelly
@pytest.fixture(scope="module")
def sj():
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional, layer, neuron

    return functional, layer, neuron


def _sj_net(sj, seed=0):
    functional, layer, neuron = sj
    torch.manual_seed(seed)
    net = nn.Sequential(layer.Conv2d(1, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8),
                        neuron.LIFNode(step_mode="m"), layer.MaxPool2d(2), layer.Flatten(),
                        layer.Linear(8 * 4 * 4, 24, bias=False), neuron.IFNode(step_mode="m"),
                        layer.Linear(24, 4, bias=False))
    functional.set_step_mode(net, "m")
    return net


def _sj_x(g):
    return torch.rand(T, B, 1, 8, 8, generator=g) * 3


def test_spikingjelly_graph_analysis(sj):
    from spikeprune.graph import analyze

    net = _sj_net(sj)
    groups = {g.neuron: g for g in analyze(net, torch.rand(T, 2, 1, 8, 8))}
    assert groups["2"].producers == ["0"] and groups["2"].norms == ["1"] and groups["2"].consumers == [("5", 16)]
    assert groups["6"].producers == ["5"] and groups["6"].consumers == [("7", 1)] and groups["6"].prunable
    assert not torch.is_tensor(net[2].v)  # the analysis reset the state it left behind (v is a float again)


def test_spikingjelly_dynsnn_own_loop(sj):
    functional = sj[0]
    net = _sj_net(sj)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    pruner = spikeprune.prune(net, "dynsnn", example_input=torch.rand(T, 2, 1, 8, 8), optimizer=opt, epochs=3,
                              warmup_epochs=0, update_every=2, kappa=0.8)
    stats = _loop(net, pruner, opt, make_x=_sj_x, after_step=lambda: functional.reset_net(net))
    assert stats[-1]["density"] < 1.0 and stats[-1]["units_alive"] < stats[-1]["units"]
    eng = pruner.engine
    _check_connection_masks(eng)
    assert set(eng.unit_masks()) == {"2", "6"}
    x = _sj_x(torch.Generator().manual_seed(5))
    assert _silenced(net, eng, x, reset=lambda: functional.reset_net(net))
    loader = [(_sj_x(torch.Generator().manual_seed(i)), torch.randint(0, 4, (B,))) for i in range(2)]
    m = measure(net, loader)  # measure resets the SJ state itself, per batch
    alive = {s.name: s.alive for s in m.spiking}
    assert alive == {n: int(um.sum()) for n, um in eng.unit_masks().items()}
    assert m.connectivity == pytest.approx(eng.density()) and m.sops <= m.dense_sops
    net.eval()
    functional.reset_net(net)
    before = net(x)
    pruner.remove()  # permanent: no buffers, no hooks, same outputs; SJ reset cache invalidated
    assert not any(hasattr(mod, "unit_mask") or hasattr(mod, "weight_mask") for mod in net.modules())
    functional.reset_net(net)
    torch.testing.assert_close(net(x), before)
    functional.reset_net(net)
    assert net(torch.rand(T, 3, 1, 8, 8)).shape == (T, 3, 4)  # runs in its own framework, any batch size


def test_spikingjelly_pq_rewire_and_sca(sj):
    functional = sj[0]
    net = _sj_net(sj, seed=1)
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    pruner = spikeprune.prune(net, "pq_rewire", optimizer=opt, epochs=4, epochs_per_iteration=1, init_density=0.5)
    _loop(net, pruner, opt, epochs=2, steps=2, make_x=_sj_x, after_step=lambda: functional.reset_net(net))
    _check_connection_masks(pruner.engine)
    assert pruner.density() < 0.5
    pruner.remove()
    functional.reset_net(net)
    assert net(torch.rand(T, 2, 1, 8, 8)).shape == (T, 2, 4)

    net = _sj_net(sj, seed=2)  # SCA scores s + |u|: the adapter makes the monitored LIF keep v_seq
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    pruner = spikeprune.prune(net, "sca", example_input=torch.rand(T, 2, 1, 8, 8), optimizer=opt, epochs=3,
                              start_epoch=0, keep=0.5, regrow=0.0)
    assert net[2].store_v_seq and not net[6].store_v_seq
    _loop(net, pruner, opt, epochs=1, steps=2, make_x=_sj_x, after_step=lambda: functional.reset_net(net))
    assert int(pruner.engine.unit_mask("2").sum()) == 4


# -------------------------------------------------------------------------------------------- snnTorch
@pytest.fixture(scope="module")
def snn():
    return pytest.importorskip("snntorch")


def _snn_model(snn, conv=False, seed=0):
    from spikeprune.adapters.snntorch import SnnTorchSequence

    torch.manual_seed(seed)
    if conv:
        net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), snn.Leaky(0.9, init_hidden=True), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(6 * 4 * 4, 16), snn.Leaky(0.9, init_hidden=True),
                            nn.Linear(16, 4), snn.Leaky(0.9, init_hidden=True, output=True))
    else:
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 24), snn.Leaky(0.9, init_hidden=True),
                            nn.Linear(24, 4), snn.Leaky(0.9, init_hidden=True, output=True))
    return SnnTorchSequence(net, T=T, in_shape=(1, 8, 8))


def _static_x(g):
    return torch.rand(B, 1, 8, 8, generator=g) * 2


def _snn_loop(net, x, steps=T):
    """snnTorch's own way: one step per call, every neuron instance reset first."""
    for m in net.modules():
        if hasattr(m, "reset_mem"):
            m.reset_mem()
    return torch.stack([net(x)[0] for _ in range(steps)])


def test_snntorch_sequence_wrapper(snn):
    from spikeprune.adapters.snntorch import SnnTorchSequence
    from spikeprune.graph import analyze

    model = _snn_model(snn, conv=True)
    x = torch.rand(3, 1, 8, 8) * 2
    with torch.no_grad():
        a, b = model(x), model(x)
    assert a.shape == (T, 3, 4) and torch.equal(a, b)  # each call starts from reset state
    with torch.no_grad():
        torch.testing.assert_close(_snn_loop(model.net, x), a)
        seq = SnnTorchSequence(model.net)  # time-major input [T, B, ...]
        torch.testing.assert_close(seq(x.expand(T, *x.shape)), a)
        mem = SnnTorchSequence(model.net, T=T, readout="membrane")(x)
    assert mem.shape == a.shape and not torch.equal(mem, a)
    groups = {g.neuron: g for g in analyze(model, x[:2])}  # one step traced: conv channels on axis 1
    assert groups["net.1"].units == 6 and groups["net.1"].consumers == [("net.4", 16)]
    assert groups["net.5"].prunable and groups["net.7"].is_output
    assert all(single_step(m) for m in model.modules() if framework_of(m) == "snntorch")


@pytest.mark.parametrize("conv", [False, True])
def test_snntorch_dynsnn_own_loop(snn, conv):
    model = _snn_model(snn, conv=conv)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    pruner = spikeprune.prune(model, "dynsnn", optimizer=opt, epochs=3, warmup_epochs=0, update_every=2,
                              kappa=0.8)
    stats = _loop(model, pruner, opt, make_x=_static_x)
    eng = pruner.engine
    assert stats[-1]["units_alive"] < stats[-1]["units"] and stats[-1]["density"] < 1
    _check_connection_masks(eng)
    x = _static_x(torch.Generator().manual_seed(3))
    assert _silenced(model, eng, x)
    loader = [(_static_x(torch.Generator().manual_seed(i)), torch.randint(0, 4, (B,))) for i in range(2)]
    m = measure(model, loader)
    assert {s.name: s.alive for s in m.spiking if s.name in eng.unit_masks()} == \
        {n: int(um.sum()) for n, um in eng.unit_masks().items()}
    assert m.connectivity == pytest.approx(eng.density())
    model.eval()
    with torch.no_grad():
        before = model(x)
    pruner.remove()
    with torch.no_grad():
        torch.testing.assert_close(_snn_loop(model.net, x), before)  # snnTorch's own loop, masks permanent


def test_snntorch_pq_rewire_own_loop(snn):
    model = _snn_model(snn)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    pruner = spikeprune.prune(model, "pq_rewire", optimizer=opt, epochs=4, epochs_per_iteration=1)
    _loop(model, pruner, opt, epochs=2, steps=2, make_x=_static_x)
    _check_connection_masks(pruner.engine)
    assert pruner.density() < 0.5
    loader = [(_static_x(torch.Generator().manual_seed(0)), torch.randint(0, 4, (B,)))]
    assert measure(model, loader).connectivity == pytest.approx(pruner.density())
    pruner.remove()
    with torch.no_grad():
        assert _snn_loop(model.net, torch.rand(2, 1, 8, 8)).shape == (T, 2, 4)


def test_snntorch_explicit_state_net(snn):
    """A net with its own time loop and explicit state: connection masks work; unit masks are refused loudly."""

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc1, self.lif1 = nn.Linear(16, 12), snn.Leaky(beta=0.9)
            self.fc2, self.lif2 = nn.Linear(12, 4), snn.Leaky(beta=0.9)

        def forward(self, x):
            mem1, mem2 = self.lif1.reset_mem(), self.lif2.reset_mem()
            out = []
            for _ in range(T):
                spk1, mem1 = self.lif1(self.fc1(x), mem1)
                spk2, mem2 = self.lif2(self.fc2(spk1), mem2)
                out.append(spk2)
            return torch.stack(out)

    net = Net()
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    pruner = spikeprune.prune(net, "pq_rewire", optimizer=opt, epochs=3, epochs_per_iteration=1)
    _loop(net, pruner, opt, epochs=1, steps=2, make_x=lambda g: torch.rand(B, 16, generator=g))
    _check_connection_masks(pruner.engine)
    assert pruner.density() < 0.5
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        spikeprune.prune(Net(), "dynsnn", example_input=torch.rand(2, 16),
                         optimizer=torch.optim.SGD(net.parameters(), 0.1))
    assert any("nothing will be pruned" in str(x.message) for x in w)


# ------------------------------------------------------------------------------------------------ API
def test_prune_api_on_zoo_model_and_state():
    from spikeprune.models import create_model

    model = create_model("fc3", hidden=(32, 24), image_size=8, neuron={"type": "lif", "v_threshold": 0.3})
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    with pytest.raises(ValueError, match="optimizer"):
        spikeprune.prune(model, "dynsnn")
    pruner = spikeprune.prune(model, "dynsnn", optimizer=opt, warmup_epochs=0, update_every=1, kappa=0.9)
    assert isinstance(pruner, spikeprune.Pruner) and pruner.kappa == 0.9  # method attributes pass through
    _loop(model, pruner, opt, epochs=1, steps=2, make_x=lambda g: torch.rand(B, 1, 8, 8, generator=g))
    st = pruner.state_dict()
    assert st["epoch"] == 1 and st["global_step"] == 2
    assert "fc3" not in repr(pruner) and "DynSNN" in repr(pruner)
