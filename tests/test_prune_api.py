"""The method contract through ``spikeprune.prune()``: every registered method in the user's own loop on a zoo
model, a SpikingJelly net and an snnTorch net (masked weights exactly 0.0 after every step, density at the
method's target, the same masks as ``Trainer``); pruned models that save and load like any PyTorch model; measure
on ``[T, B, ...]`` against ``[B, ...]`` input; ``compile_chain`` on a plain model."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import spikeprune
from spikeprune.config import load_config
from spikeprune.measure import measure
from spikeprune.models import create_model
from spikeprune.sparsity.loop import LoopStateError
from spikeprune.sparsity.masks import ForeignPruningError
from spikeprune.sparsity.methods import list_methods
from spikeprune.train import Trainer, make_optimizer, spike_loss

T, B, K = 4, 8, 4
EPOCHS, STEPS = 2, 3

# options for a run of EPOCHS x STEPS steps (every method's schedule fits in it)
OPTIONS = {
    "dynsnn": {"warmup_epochs": 0, "update_every": 2, "kappa": 0.8},
    "pq_rewire": {"epochs_per_iteration": 1, "init_density": 0.5},
    "sca": {"start_epoch": 0, "keep": 0.5, "regrow": 0.1, "min_channels": 1},
    "magnitude": {"target_density": 0.5, "update_every": 1, "end": 0.5},
    "lth": {"target_density": 0.75, "rewind_epoch": 0},
    "set": {"target_density": 0.5, "update_every": 2},
    "rigl": {"target_density": 0.5, "update_every": 2},
    "eslsnn": {"target_density": 0.5, "update_every": 2},
    "deep_r": {"target_density": 0.5},
    "grad_r": {"target_density": 0.5, "control_end": 0.5},
    "stds": {"target_density": 0.5},
    "admm": {"target_density": 0.5, "prune_epoch": 1},
    "upr": {"target_density": 0.5, "search_epochs": 1},
    "lamp": {"target_density": 0.5, "update_every": 1, "end": 0.5},
    "l1_filter": {"keep": 0.5, "prune_epoch": 1},
    "slimming": {"keep": 0.5, "prune_epoch": 1, "l1": 1e-3},
    "random_channels": {"keep": 0.5, "prune_epoch": 1},
}
# connection density each method holds at the end of the run (None: no fixed target; checked otherwise below)
TARGET = {"magnitude": 0.5, "lth": 0.75, "set": 0.5, "rigl": 0.5, "eslsnn": 0.5, "deep_r": 0.5, "stds": 0.5,
          "admm": 0.5, "upr": 0.5, "lamp": 0.5}
CHANNEL_BASELINES = {"l1_filter", "slimming", "random_channels"}  # one prune to a kept fraction of conv channels
UNIT_METHODS = {"dynsnn", "sca", *CHANNEL_BASELINES}  # structured: masks on neurons / conv channels
CONV_ONLY = {"sca", *CHANNEL_BASELINES}  # channel pruning: needs conv -> [BN] -> neuron groups


def test_every_registered_method_is_in_the_matrix():
    assert set(list_methods()) == set(OPTIONS)


# -------------------------------------------------------------------------------------------------- nets
def zoo_net(conv: bool, seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    neuron = {"type": "lif", "v_threshold": 0.3}
    if conv:
        return create_model("convnet", channels=(4, 6), hidden=16, image_size=8, T=T, num_classes=K, neuron=neuron)
    return create_model("fc3", hidden=(32, 24), image_size=8, T=T, num_classes=K, neuron=neuron)


def sj_net(conv: bool, seed: int = 0) -> nn.Module:
    from spikingjelly.activation_based import functional, layer, neuron

    torch.manual_seed(seed)
    if conv:
        net = nn.Sequential(layer.Conv2d(1, 8, 3, padding=1, bias=False), layer.BatchNorm2d(8),
                            neuron.LIFNode(step_mode="m"), layer.MaxPool2d(2), layer.Flatten(),
                            layer.Linear(8 * 4 * 4, 24, bias=False), neuron.IFNode(step_mode="m"),
                            layer.Linear(24, K, bias=False))
    else:
        net = nn.Sequential(layer.Flatten(), layer.Linear(64, 32), neuron.LIFNode(step_mode="m", v_threshold=0.5),
                            layer.Linear(32, 24), neuron.IFNode(step_mode="m", v_threshold=0.5), layer.Linear(24, K))
    functional.set_step_mode(net, "m")
    return net


def snn_net(conv: bool, seed: int = 0, T_: int | None = T) -> nn.Module:
    import snntorch as snn

    from spikeprune.adapters.snntorch import SnnTorchSequence

    torch.manual_seed(seed)
    if conv:
        net = nn.Sequential(nn.Conv2d(1, 6, 3, padding=1), snn.Leaky(0.9, init_hidden=True), nn.MaxPool2d(2),
                            nn.Flatten(), nn.Linear(6 * 4 * 4, 16), snn.Leaky(0.9, init_hidden=True),
                            nn.Linear(16, K), snn.Leaky(0.9, init_hidden=True, output=True))
    else:
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), snn.Leaky(0.9, init_hidden=True, threshold=0.5),
                            nn.Linear(32, 24), snn.Leaky(0.9, init_hidden=True, threshold=0.5),
                            nn.Linear(24, K), snn.Leaky(0.9, init_hidden=True, output=True))
    return SnnTorchSequence(net, T=T_, in_shape=(1, 8, 8))


def _sj_reset(net):
    from spikingjelly.activation_based import functional

    functional.reset_net(net)


FRAMEWORKS = {
    # name: (build(conv), batch maker, reset after a step, example input)
    "zoo": (zoo_net, lambda g: torch.rand(B, 1, 8, 8, generator=g) * 2, lambda net: None, None),
    "spikingjelly": (sj_net, lambda g: torch.rand(T, B, 1, 8, 8, generator=g) * 3, _sj_reset,
                     torch.rand(T, 2, 1, 8, 8)),
    "snntorch": (snn_net, lambda g: torch.rand(B, 1, 8, 8, generator=g) * 2, lambda net: None, None),
}


def _framework(name):
    if name == "spikingjelly":
        pytest.importorskip("spikingjelly.activation_based")
    if name == "snntorch":
        pytest.importorskip("snntorch")
    return FRAMEWORKS[name]


# ------------------------------------------------------------------------------------------------ checks
def assert_masked_zero(engine, where: str) -> None:
    """Every weight a connection mask removes is exactly 0.0."""
    for name, layer in engine.layers.items():
        w = layer.weight.detach()
        assert layer.weight_mask.dtype == torch.bool
        assert bool((w[~layer.weight_mask] == 0.0).all()), f"{name} {where}"


def assert_dead_units_silent(model, engine, x, reset) -> None:
    """Every unit a unit mask removes emits no spike (read after the mask, by a hook registered after it)."""
    from spikeprune.adapters import neuron_spikes, unit_axis

    modules = dict(model.named_modules())
    seen: dict[str, torch.Tensor] = {}
    hooks = [modules[n].register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, neuron_spikes(o).detach()))
             for n in engine.unit_masks()]
    reset(model)
    with torch.no_grad():
        model(x)
    reset(model)
    for h in hooks:
        h.remove()
    for n, um in engine.unit_masks().items():
        s = seen[n]
        assert float(s.transpose(0, unit_axis(modules[n], s))[~um].abs().sum()) == 0.0, n


def mask_density(engine) -> float:
    masks = engine.masks()
    return sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def user_loop(model, pruner, opt, make_x, reset, epochs=EPOCHS, steps=STEPS, seed=0):
    """The user's own loop: forward, loss on the time-mean, step, pruner.step(), pruner.epoch_end()."""
    g = torch.Generator().manual_seed(seed)
    for e in range(epochs):
        for s in range(steps):
            x, y = make_x(g), torch.randint(0, K, (B,), generator=g)
            loss = F.cross_entropy(model(x).mean(0), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()
            reset(model)
            assert_masked_zero(pruner.engine, f"after step {s + 1} of epoch {e + 1}")
        pruner.epoch_end({"val_acc": 0.5})
        assert_masked_zero(pruner.engine, f"after epoch {e + 1}")
    pruner.finish()
    assert_masked_zero(pruner.engine, "at the end")


# ------------------------------------------------------------------------------------------ the matrix
@pytest.mark.parametrize("framework", list(FRAMEWORKS))
@pytest.mark.parametrize("method", list(OPTIONS))
def test_method_in_the_users_loop(method, framework):
    build, make_x, reset, example = _framework(framework)
    conv = method in CONV_ONLY
    model = build(conv)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    if method == "slimming" and framework == "snntorch":  # its conv net has no BatchNorm: no scales to slim
        with pytest.raises(ValueError, match=r"^slimming needs a BatchNorm .* use l1_filter or random_channels"):
            spikeprune.prune(model, method, example_input=example, optimizer=opt, epochs=EPOCHS,
                             steps_per_epoch=STEPS, seed=0, **OPTIONS[method])
        return
    pruner = spikeprune.prune(model, method, example_input=example, optimizer=opt, epochs=EPOCHS,
                              steps_per_epoch=STEPS, seed=0, **OPTIONS[method])
    assert pruner.engine.layers, "the method masks some layer"
    user_loop(model, pruner, opt, make_x, reset)
    assert (pruner.state.epoch, pruner.state.step) == (EPOCHS, EPOCHS * STEPS)
    if method == "upr":  # weights and units: the target holds with dead units folded in
        assert pruner.density() == pytest.approx(TARGET[method], abs=0.02)
    elif method in TARGET:
        assert mask_density(pruner.engine) == pytest.approx(TARGET[method], abs=0.02), method
    elif method == "grad_r":  # a controller: at the target within a few points, never denser than half
        assert mask_density(pruner.engine) <= 0.6
    elif method == "pq_rewire":  # from its initial density, net pruned at each iteration's end
        assert mask_density(pruner.engine) < 0.5
    elif method == "sca":  # a kept fraction of the channels (keep + up to regrow), min_channels per layer
        assert 0 < pruner.channel_fraction() <= 0.6 + 1e-9
        assert pruner.density() < 1.0
    elif method == "dynsnn":
        assert pruner.density() < 1.0 and any(not bool(um.all()) for um in pruner.engine.unit_masks().values())
    elif method in CHANNEL_BASELINES:  # round(keep * C) channels of every conv layer (slimming: over all of them)
        assert pruner.channel_fraction() == pytest.approx(0.5, abs=0.2) and pruner.density() < 1.0
    x = make_x(torch.Generator().manual_seed(9))
    if method in UNIT_METHODS:
        assert pruner.engine.unit_masks()
    if pruner.engine.unit_masks():  # dynsnn, sca, upr
        assert_dead_units_silent(model, pruner.engine, x, reset)
    model.eval()
    with torch.no_grad():
        before = model(x)
    reset(model)
    pruner.remove()  # masks permanent: the same outputs without buffers or hooks
    assert not any(k.endswith(("weight_mask", "unit_mask")) for k in model.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
def test_channel_pruning_refuses_a_net_without_conv_channels(framework):
    build, _, _, example = _framework(framework)
    model = build(False)
    with pytest.raises(ValueError, match=r"^sca found no prunable conv channel group") as e:
        spikeprune.prune(model, "sca", example_input=example, optimizer=torch.optim.SGD(model.parameters(), 0.1),
                         epochs=2)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method, missing", [
    ("rigl", "epochs"), ("set", "epochs"), ("eslsnn", "epochs"), ("magnitude", "epochs"), ("upr", "epochs"),
    ("grad_r", "epochs"), ("stds", "epochs"), ("lth", "epochs"), ("admm", "epochs"),
    ("rigl", "steps_per_epoch"), ("magnitude", "steps_per_epoch"), ("upr", "steps_per_epoch"),
    ("grad_r", "steps_per_epoch"), ("stds", "steps_per_epoch"),
])
def test_a_method_says_in_one_line_what_the_loop_must_give(method, missing):
    model = zoo_net(False)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    given = {"epochs": 2, "steps_per_epoch": 3}
    given.pop(missing)
    with pytest.raises(LoopStateError) as e:
        spikeprune.prune(model, method, optimizer=opt, **given)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{method} needs {missing.replace('_', ' ')} to ")
    assert f"pass {missing}=" in msg
    assert not any(hasattr(m, "weight_mask") for m in model.modules()), "nothing attached before the check"


def test_a_loader_gives_the_loop_length_and_the_methods_that_need_nothing_run_without_it():
    model = zoo_net(False)
    data = [(torch.rand(B, 1, 8, 8), torch.randint(0, K, (B,))) for _ in range(STEPS)]
    opt = torch.optim.SGD(model.parameters(), 0.1)
    pruner = spikeprune.prune(model, "rigl", optimizer=opt, epochs=2, data=data, target_density=0.5)
    assert pruner.state.steps_per_epoch == STEPS and pruner.state.total_steps() == 2 * STEPS
    x, y = pruner.state.next_batch()
    assert x.shape == (B, 1, 8, 8) and y.shape == (B,)
    for name in ("dynsnn", "pq_rewire", "deep_r"):  # no schedule in steps: a loop of unknown length will do
        m = zoo_net(False)
        spikeprune.prune(m, name, optimizer=torch.optim.SGD(m.parameters(), 0.1))
    with pytest.raises(LoopStateError, match="pass data=loader"):
        spikeprune.prune(zoo_net(False), "dynsnn", optimizer=torch.optim.SGD(model.parameters(), 0.1)
                         ).state.next_batch()


def test_pq_rewire_selecting_on_validation_needs_it():
    model = zoo_net(False)
    opt = torch.optim.SGD(model.parameters(), 0.1)
    with pytest.raises(Exception, match="validation=True"):
        spikeprune.prune(model, "pq_rewire", optimizer=opt, epochs=3, select="val_acc")
    pruner = spikeprune.prune(model, "pq_rewire", optimizer=opt, epochs=3, validation=True, select="val_acc",
                              epochs_per_iteration=1)
    with pytest.raises(ValueError, match=r"pass \{'val_acc': \.\.\.\} to pruner.epoch_end\(\)"):
        pruner.epoch_end({})


# --------------------------------------------------------------------------------- the same as Trainer
@pytest.mark.parametrize("method", list(OPTIONS))
def test_prune_gives_the_masks_trainer_gives(method, tmp_path):
    conv = method in CONV_ONLY
    g = torch.Generator().manual_seed(0)
    xs, ys = torch.rand(B * STEPS, 1, 8, 8, generator=g) * 2, torch.randint(0, K, (B * STEPS,), generator=g)
    loader = DataLoader(TensorDataset(xs, ys), batch_size=B, shuffle=False)
    from spikeprune.data._core import DatasetInfo

    info = DatasetInfo("synthetic", (1, 8, 8), K)
    spec = "{" + ", ".join(f"{k}: {v}" for k, v in {"name": method, **OPTIONS[method]}.items()) + "}"
    cfg = load_config(None, [f"train.epochs={EPOCHS}", "train.lr=0.01", "train.progress=false", "train.device=cpu",
                             "train.scheduler=none", "measure.max_batches=1", f"out_dir={tmp_path}", "seed=3",
                             f"method={spec}"])
    trainer = Trainer(cfg, model=zoo_net(conv), loaders=(loader, None, loader, info), log=lambda *a, **k: None)
    trainer.fit()

    model = zoo_net(conv)
    opt = make_optimizer(model.parameters(), cfg.train)
    pruner = spikeprune.prune(model, method, optimizer=opt, epochs=EPOCHS, data=loader, seed=3, **OPTIONS[method])
    for _ in range(EPOCHS):
        for x, y in loader:
            loss = spike_loss(model(x).float(), y, cfg.train.loss, K)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            pruner.step()
        pruner.epoch_end({"test_acc": 0.0})
    pruner.finish()

    a, b = trainer.method.engine, pruner.engine
    assert a.masks().keys() == b.masks().keys() and a.unit_masks().keys() == b.unit_masks().keys()
    assert any(not bool(m.all()) for m in [*a.masks().values(), *a.unit_masks().values()]), "something is masked"
    for n in a.masks():
        assert torch.equal(a.mask(n), b.mask(n)), n
    for n in a.unit_masks():
        assert torch.equal(a.unit_mask(n), b.unit_mask(n)), n


# -------------------------------------------------------------------------------------------- save / load
def _pruned(framework: str, method: str = "dynsnn"):
    build, make_x, reset, example = _framework(framework)
    conv = method in CONV_ONLY
    model = build(conv)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    pruner = spikeprune.prune(model, method, example_input=example, optimizer=opt, epochs=EPOCHS,
                              steps_per_epoch=STEPS, **OPTIONS[method])
    user_loop(model, pruner, opt, make_x, reset)
    return model, pruner, (lambda: build(conv)), make_x, reset, example


def _outputs(model, x, reset):
    model.eval()
    reset(model)
    with torch.no_grad():
        out = model(x)
    reset(model)
    return out


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
@pytest.mark.parametrize("method", ["dynsnn", "sca", "upr", "admm", "rigl"])
def test_whole_model_torch_save_with_a_pruner_attached(method, framework):
    model, pruner, fresh, make_x, reset, _ = _pruned(framework, method)
    x = make_x(torch.Generator().manual_seed(5))
    buf = io.BytesIO()
    if framework == "snntorch":  # snnTorch's surrogate gradients are closures: its nets never pickle, pruned or not
        with pytest.raises(AttributeError, match="Can't pickle local object"):
            torch.save(fresh(), buf)
        return
    torch.save(model, buf)  # the pruner stays attached: its hooks are saved in their standalone form
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    torch.testing.assert_close(_outputs(loaded, x, reset), _outputs(model, x, reset), rtol=0, atol=0)
    assert pruner.engine.masks() and bool(pruner.step() is None)  # the live pruner goes on


@pytest.mark.parametrize("framework", list(FRAMEWORKS))
@pytest.mark.parametrize("method", ["dynsnn", "sca", "pq_rewire"])
def test_state_dict_and_safetensors_into_a_fresh_net(method, framework, tmp_path):
    model, pruner, fresh, make_x, reset, example = _pruned(framework, method)
    if method in UNIT_METHODS:
        assert any(not bool(um.all()) for um in pruner.engine.unit_masks().values()), "some unit is masked"
    x = make_x(torch.Generator().manual_seed(5))
    want = _outputs(model, x, reset)
    state = model.state_dict()

    net = fresh()
    with pytest.raises(RuntimeError, match="Unexpected key"):  # plain PyTorch: the mask buffers are unknown
        net.load_state_dict(state)
    unit = any(k.endswith(".unit_mask") for k in state)
    if unit and example is not None:  # a foreign net cannot make its own example input: it must be given
        with pytest.raises(ValueError, match="pass example_input="):
            spikeprune.load_pruned(fresh(), state)
    net = spikeprune.load_pruned(fresh(), state, example_input=example)
    torch.testing.assert_close(_outputs(net, x, reset), want, rtol=0, atol=0)

    path = tmp_path / "pruned.pt"
    torch.save(state, path)
    net = spikeprune.load_pruned(fresh(), path, example_input=example)
    torch.testing.assert_close(_outputs(net, x, reset), want, rtol=0, atol=0)

    pytest.importorskip("safetensors")
    from spikeprune.export.safetensors import load_safetensors, save_safetensors

    st_path = save_safetensors(model, tmp_path / "pruned.safetensors")
    net = spikeprune.load_pruned(fresh(), st_path, example_input=example)
    torch.testing.assert_close(_outputs(net, x, reset), want, rtol=0, atol=0)
    net = fresh()
    load_safetensors(st_path, model=net, example_input=example)
    torch.testing.assert_close(_outputs(net, x, reset), want, rtol=0, atol=0)


def test_a_loaded_state_trains_on_with_its_masks():
    model, pruner, fresh, make_x, reset, _ = _pruned("zoo", "rigl")
    net = spikeprune.load_pruned(fresh(), model.state_dict())
    masks = {n: m.weight_mask.clone() for n, m in net.named_modules() if hasattr(m, "weight_mask")}
    opt = torch.optim.Adam(net.parameters(), 1e-2)
    p2 = spikeprune.prune(net, "magnitude", optimizer=opt, schedule="oneshot", prune_epoch=1, target_density=0.5)
    loss = F.cross_entropy(net(make_x(torch.Generator().manual_seed(0))).mean(0), torch.zeros(B, dtype=torch.long))
    opt.zero_grad()
    loss.backward()
    opt.step()
    p2.step()
    for n, m in p2.engine.masks().items():
        assert torch.equal(m, masks[n])  # the loaded masks are the engine's
    assert_masked_zero(p2.engine, "after a step on the loaded masks")


def test_torch_nn_utils_prune_on_a_masked_layer_fails_loudly():
    from torch.nn.utils import prune as tprune

    model = zoo_net(False)
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    pruner = spikeprune.prune(model, "magnitude", optimizer=opt, schedule="oneshot", prune_epoch=0,
                              target_density=0.5)
    layer = pruner.engine.layers["body.4"]
    tprune.l1_unstructured(layer, "weight", amount=0.3)  # takes over the buffer named weight_mask
    loss = model(torch.rand(B, 1, 8, 8)).sum()
    opt.zero_grad()
    loss.backward()
    with pytest.raises(ForeignPruningError, match=r"layer 'body.4' was pruned with torch.nn.utils.prune") as e:
        opt.step()  # refused before the step changes anything
    assert "\n" not in str(e.value)
    with pytest.raises(ForeignPruningError):
        pruner.density()
    # a layer pruned by torch first is refused when spikeprune attaches
    other = zoo_net(False)
    tprune.random_unstructured(other.body[1], "weight", amount=0.2)
    with pytest.raises(ForeignPruningError, match="from_torch_prune"):
        spikeprune.prune(other, "rigl", optimizer=torch.optim.SGD(other.parameters(), 0.1), epochs=2,
                         steps_per_epoch=2)


# ------------------------------------------------------------------------------------------------ measure
def _same_measurement(a, b):
    assert (a.samples, a.accuracy, a.nonzero, a.weights) == (b.samples, b.accuracy, b.nonzero, b.weights)
    for k in ("sops", "dense_sops", "macs", "dense_macs", "energy_uj", "firing_rate"):
        assert getattr(a, k) == pytest.approx(getattr(b, k), rel=1e-6), k
    assert [s.firing_rate for s in a.spiking] == pytest.approx([s.firing_rate for s in b.spiking], rel=1e-6)


def test_measure_tb_input_equals_b_input_snntorch():
    pytest.importorskip("snntorch")
    model, *_ = _pruned("snntorch", "dynsnn")
    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(B * 2, 1, 8, 8, generator=g) * 2 for _ in range(2)]
    ys = [torch.randint(0, K, (B * 2,), generator=g) for _ in range(2)]
    static = [(x, y) for x, y in zip(xs, ys)]
    timed = [(x.unsqueeze(0).expand(T, *x.shape).contiguous(), y) for x, y in zip(xs, ys)]
    a = measure(model, static)  # SnnTorchSequence(T=4): [B, ...]
    from spikeprune.adapters.snntorch import SnnTorchSequence

    seq = SnnTorchSequence(model.net)  # the same net, time-major input
    b = measure(seq, timed)
    assert a.samples == b.samples == 4 * B
    _same_measurement(a, b)


def test_measure_tb_input_equals_b_input_spikingjelly():
    pytest.importorskip("spikingjelly.activation_based")
    model, *_ = _pruned("spikingjelly", "dynsnn")

    class Repeat(nn.Module):  # the user's own direct encoding: [B, ...] -> [T, B, ...]
        input_layout = "B"

        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x.unsqueeze(0).expand(T, -1, -1, -1, -1))

    g = torch.Generator().manual_seed(1)
    xs = [torch.rand(B * 2, 1, 8, 8, generator=g) * 3 for _ in range(2)]
    ys = [torch.randint(0, K, (B * 2,), generator=g) for _ in range(2)]
    timed = [(x.unsqueeze(0).expand(T, *x.shape).contiguous(), y) for x, y in zip(xs, ys)]
    a = measure(model, timed)  # a SpikingJelly multi-step net: [T, B, ...], B counted, not T
    b = measure(Repeat(model), list(zip(xs, ys)))
    assert a.samples == b.samples == 4 * B and a.accuracy <= 1.0
    _same_measurement(a, b)
    # labels that do not fit the layout: one line, not a silent miscount
    with pytest.raises(ValueError, match="pass layout='B'"):
        measure(model, [(xs[0], ys[0])])


def test_measure_tb_input_equals_b_input_zoo():
    model, *_ = _pruned("zoo", "dynsnn")
    g = torch.Generator().manual_seed(1)
    x, y = torch.rand(B, 1, 8, 8, generator=g) * 2, torch.randint(0, K, (B,), generator=g)
    a = measure(model, [(x, y)])
    assert a.samples == B
    with pytest.raises(ValueError, match="pass layout='TB'"):  # a zoo model takes [B, ...]: [T, B, ...] refused
        measure(model, [(x.unsqueeze(0).expand(T, *x.shape), y)])


def test_measure_layout_that_cannot_be_told_is_refused():
    from spikeprune.layers import Linear
    from spikeprune.neurons import LIF

    net = nn.Sequential(Linear(6, 5), LIF(v_threshold=0.3), Linear(5, 3))  # takes [T, B, 6]
    x = torch.rand(4, 4, 6)  # T == B: nothing tells them apart
    with pytest.raises(ValueError, match="cannot tell whether the input"):
        measure(net, [(x, torch.zeros(4, dtype=torch.long))])
    r = measure(net, [(x, torch.zeros(4, dtype=torch.long))], layout="TB")
    assert r.samples == 4
    with pytest.raises(ValueError, match="layout must be one of"):
        measure(net, [(x, torch.zeros(4, dtype=torch.long))], layout="BT")


def test_measure_plain_snntorch_net_says_what_to_wrap_it_in():
    pytest.importorskip("snntorch")
    model = snn_net(False)
    with pytest.raises(ValueError, match=r"wrap it: spikeprune.adapters.snntorch.SnnTorchSequence\(net, T=...\)"):
        measure(model.net, [(torch.rand(B, 1, 8, 8), torch.zeros(B, dtype=torch.long))])


# ---------------------------------------------------------------------------------------------- inference
def test_compile_chain_converts_a_plain_model_itself():
    from spikeprune.inference import compile_chain, event_layers, to_event_driven

    model, *_ = _pruned("zoo", "rigl")
    model.eval()
    x = torch.rand(6, 1, 8, 8) * 2
    with torch.no_grad():
        want = model(x)
    chain = compile_chain(model, [x[:3], x[3:]], rounds=1)
    assert chain is not model and event_layers(chain) and not event_layers(model)
    with torch.no_grad():
        torch.testing.assert_close(chain(x), want)
        ref = compile_chain(to_event_driven(model, example_input=x[:2]), [x[:3], x[3:]], rounds=1)
        torch.testing.assert_close(chain(x), ref(x))


def test_a_unit_method_on_a_foreign_net_takes_its_example_from_data_or_says_what_to_pass():
    pytest.importorskip("spikingjelly.activation_based")
    net = sj_net(True)
    opt = torch.optim.SGD(net.parameters(), 0.1)
    with pytest.raises(LoopStateError, match=r"^sca needs example input to .*: pass example_input=x"):
        spikeprune.prune(net, "sca", optimizer=opt, epochs=2)
    data = [(torch.rand(T, B, 1, 8, 8), torch.randint(0, K, (B,))) for _ in range(2)]
    pruner = spikeprune.prune(net, "sca", optimizer=opt, epochs=2, data=data)
    assert pruner.engine.unit_masks() and pruner.state.steps_per_epoch == 2
