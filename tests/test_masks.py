"""The mask engine: masked weights stay exactly zero under every optimizer, regrowth starts clean, masks travel
in ``state_dict``, unit masks fold into effective weights, initial masks and per-row selection are exact."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import conv, x8
from helpers import liven as _liven
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

from spikeprune.graph import SYNAPTIC
from spikeprune.models import create_model
from spikeprune.sparsity.masks import (
    PARKED_STATE,
    MaskEngine,
    any_true,
    count,
    erk_densities,
    fill_,
    flat_true,
    fused_adam,
    init_masks,
    random_mask,
    scope_view,
    select_per_row,
)

# --------------------------------------------------------------------------------------------- helpers
OPTIMIZERS = {
    "sgd_momentum": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "sgd_nesterov_wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, nesterov=True, weight_decay=0.1),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01),
    "adam_wd_amsgrad": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, amsgrad=True),
    "adamw_wd": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
    "adam_decoupled_maximize": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, decoupled_weight_decay=True,
                                                          maximize=True),
    "rmsprop_centered_momentum_wd": lambda p: torch.optim.RMSprop(p, lr=0.01, momentum=0.9, centered=True,
                                                                  weight_decay=0.1),
    # PyTorch's fused kernels (the trainer's default): dead second moments parked at +inf, gradients left dense
    "adam_fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
    "adam_fused_wd_amsgrad_maximize": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=0.1, amsgrad=True,
                                                                 maximize=True, fused=True),
    "adamw_fused_wd": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1, fused=True),
}


class NoisySGD(torch.optim.SGD):
    """An optimizer the engine does not know: its step moves every weight, masked or not."""

    @torch.no_grad()
    def step(self, closure=None):
        super().step(closure)
        for group in self.param_groups:
            for p in group["params"]:
                p.add_(torch.randn_like(p))
STATE_KEYS = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq")


def fc(**kw) -> nn.Module:
    return create_model("fc3", hidden=(32, 24), image_size=8, **kw)


def liven(model: nn.Module, gain: float = 5.0, seed: int = 0) -> nn.Module:
    return _liven(model, gain, seed, shift_running_mean=True)


def random_grads(model: nn.Module, g: torch.Generator) -> None:
    """Dense, non-zero gradients on every parameter (no spike dynamics involved)."""
    for p in model.parameters():
        p.grad = torch.randn(p.shape, generator=g) + 0.1


def state_tensors(opt: torch.optim.Optimizer, p: torch.Tensor) -> dict[str, torch.Tensor]:
    st_ = opt.state.get(p, {})
    return {k: v for k, v in st_.items() if k in STATE_KEYS and torch.is_tensor(v)}


def assert_masked_zero(eng: MaskEngine, opt: torch.optim.Optimizer | None = None) -> None:
    for name, layer in eng.layers.items():
        dead = ~layer.weight_mask
        assert torch.all(layer.weight[dead] == 0.0), f"{name}: masked weight is not 0.0"
        if opt is not None:
            for k, v in state_tensors(opt, layer.weight).items():
                if k in PARKED_STATE and fused_adam(opt):  # +inf: the update m / sqrt(v) is 0 whatever m holds
                    assert torch.all(v[dead] == math.inf), f"{name}: {k} of a masked weight not parked at +inf"
                elif k in PARKED_STATE:  # parked at 1.0 (decaying): never 0, never above 1
                    assert torch.all((v[dead] > 0) & (v[dead] <= 1)), f"{name}: {k} of a masked weight not parked"
                elif fused_adam(opt):  # dense gradients reach the first moments of dead weights: finite
                    assert torch.isfinite(v[dead]).all(), f"{name}: optimizer state {k} of a masked weight"
                else:
                    assert torch.all(v[dead] == 0), f"{name}: optimizer state {k} of a masked weight is not 0"


# ----------------------------------------------------------------------------- optimizers and masks
@pytest.mark.parametrize("opt_name", list(OPTIMIZERS))
def test_masked_weights_stay_zero_under_optimizer(opt_name):
    torch.manual_seed(0)
    model = fc()
    eng = MaskEngine(model)
    opt = OPTIMIZERS[opt_name](model.parameters())
    eng.attach(opt)
    gen = torch.Generator().manual_seed(1)
    init_masks(eng, "uniform", 0.4, gen)
    checked = []

    def check_grads(optimizer, args, kwargs):  # runs after the engine's pre-hook (registered later)
        for layer in eng.layers.values():
            dead = layer.weight.grad[~layer.weight_mask]
            # fused Adam/AdamW: no pass over the gradients once the dead weights are parked at +inf (from the
            # second step on: the first step has no optimizer state to park)
            assert torch.all(dead != 0) if fused_adam(opt) and checked else torch.all(dead == 0)
            assert layer.weight.grad[layer.weight_mask].abs().min() > 0  # live grads untouched
        checked.append(True)

    opt.register_step_pre_hook(check_grads)
    for step in range(6):
        random_grads(model, gen)
        opt.step()
        assert_masked_zero(eng, opt)
        for layer in eng.layers.values():  # live weights did move (non-zero grads): they are not all zero
            assert (layer.weight[layer.weight_mask] != 0).all()
        if step % 2 == 1:  # new random masks between steps: prune some, regrow others
            for n, layer in eng.layers.items():
                eng.set_mask(n, random_mask(layer.weight.shape, 0.5, gen))
            assert_masked_zero(eng, opt)
    assert len(checked) == 6
    assert state_tensors(opt, eng.layers["body.1"].weight)  # state exists, so the checks above meant something


@pytest.mark.parametrize("opt_name", ["adam", "noisy"])
def test_post_step_rezero_runs_only_for_optimizers_that_need_it(opt_name, monkeypatch):
    # the stock optimizers keep masked weights at 0.0 by their own arithmetic (the test above), so the engine skips
    # its pass over the weights; an optimizer it does not know gets it after every step
    torch.manual_seed(0)
    model = fc()
    eng = MaskEngine(model)
    opt = OPTIMIZERS["adam"](model.parameters()) if opt_name == "adam" else NoisySGD(model.parameters(), lr=0.1)
    eng.attach(opt)
    gen = torch.Generator().manual_seed(1)
    init_masks(eng, "uniform", 0.4, gen)
    calls = []
    monkeypatch.setattr(eng, "apply", lambda: (calls.append(1), MaskEngine.apply(eng)))
    for _ in range(3):
        random_grads(model, gen)
        opt.step()
        assert_masked_zero(eng)
    # (a subclass's step runs the step hooks twice: its own and the parent's)
    assert len(calls) == 0 if opt_name == "adam" else len(calls) >= 3


def test_fused_adam_parks_a_loaded_state_before_skipping_the_gradient_mask():
    # optimizer state the engine did not park itself (new tensors from a loaded state dict, dead second moments at
    # 1.0 as an unfused run leaves them) is parked at +inf before a step leaves the gradients dense
    torch.manual_seed(0)
    model = fc()
    eng = MaskEngine(model)
    gen = torch.Generator().manual_seed(1)
    opt = torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    eng.attach(opt)
    init_masks(eng, "uniform", 0.4, gen)
    for _ in range(2):
        random_grads(model, gen)
        opt.step()
    state = opt.state_dict()
    for layer in eng.layers.values():
        i = next(k for k, p in enumerate(p for g in opt.param_groups for p in g["params"]) if p is layer.weight)
        v = state["state"][i]["exp_avg_sq"].clone()
        v[~layer.weight_mask] = 1.0
        state["state"][i]["exp_avg_sq"] = v
        state["state"][i]["exp_avg"] = state["state"][i]["exp_avg"].clone().fill_(0.5)  # dead ones too
    opt.load_state_dict(state)
    assert fused_adam(opt)
    for _ in range(3):
        random_grads(model, gen)
        opt.step()
        assert_masked_zero(eng, opt)
        for layer in eng.layers.values():  # the gradients were left dense (no pass over them)
            assert torch.all(layer.weight.grad[~layer.weight_mask] != 0)


def test_masked_weights_zero_with_real_backward():
    torch.manual_seed(0)
    model = liven(conv())
    eng = MaskEngine(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=0.01)
    eng.attach(opt)
    init_masks(eng, "erk", 0.5, torch.Generator().manual_seed(0))
    for s in range(3):
        out = model(x8(seed=s))
        opt.zero_grad()
        (out - 1).square().mean().backward()
        assert all(m.weight.grad[m.weight_mask].abs().sum() > 0 for m in eng.layers.values())
        opt.step()
        assert_masked_zero(eng, opt)


def test_dense_grad_hooks_see_unmasked_gradients():
    model = fc()
    eng = MaskEngine(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    eng.attach(opt)
    init_masks(eng, "uniform", 0.5, torch.Generator().manual_seed(0))
    seen = {}
    eng.dense_grad_hooks.append(lambda name, layer, grad: seen.__setitem__(name, grad.clone()))
    gen = torch.Generator().manual_seed(3)
    random_grads(model, gen)
    dense = {n: m.weight.grad.clone() for n, m in eng.layers.items()}
    opt.step()
    assert set(seen) == set(eng.layers)
    for n in eng.layers:
        assert torch.equal(seen[n], dense[n])  # hooks get the dense gradient ...
        assert torch.all(eng.layers[n].weight.grad[~eng.mask(n)] == 0)  # ... and it is masked afterwards


def test_attach_clears_state_from_before_the_masks():
    model = fc()
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    gen = torch.Generator().manual_seed(0)
    for _ in range(2):
        random_grads(model, gen)
        opt.step()
    eng = MaskEngine(model)
    init_masks(eng, "uniform", 0.5, gen)  # no optimizer yet: state untouched
    w = eng.layers["body.1"].weight
    assert (opt.state[w]["exp_avg"][~eng.mask("body.1")] != 0).all()
    eng.attach(opt)
    assert_masked_zero(eng, opt)


@pytest.mark.parametrize("opt_name", ["sgd_momentum", "adam", "adamw_wd", "adam_fused"])
def test_regrown_weight_starts_at_zero_with_clean_state(opt_name):
    torch.manual_seed(0)
    model = fc()
    eng = MaskEngine(model)
    opt = OPTIMIZERS[opt_name](model.parameters())
    eng.attach(opt)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        random_grads(model, gen)
        opt.step()
    name = "body.4"
    w = eng.layers[name].weight
    pos = (3, 5)
    assert w[pos] != 0 and all(v[pos] != 0 for v in state_tensors(opt, w).values())
    # prune it: weight and first moments zero, second moments parked (> 0, so CPU sqrt stays fast)
    m = eng.mask(name).clone()
    m[pos] = False
    eng.set_mask(name, m)

    parked = math.inf if fused_adam(opt) else 1.0

    def dead_state_ok() -> bool:
        return all((v[pos] == parked if k in PARKED_STATE else v[pos] == 0) for k, v in state_tensors(opt, w).items())

    assert w[pos] == 0.0 and dead_state_ok()
    other = w.detach().clone()
    # a step later it is still exactly zero (its second moment decays from 1.0 but its update is exactly 0)
    random_grads(model, gen)
    opt.step()
    assert w[pos] == 0.0 and all((0 < v[pos] <= parked if k in PARKED_STATE else v[pos] == 0 or fused_adam(opt))
                                 for k, v in state_tensors(opt, w).items())
    # regrow: starts at exactly 0.0 with zero state; untouched weights are not reset
    before = w.detach().clone()
    m[pos] = True
    eng.set_mask(name, m)
    assert w[pos] == 0.0 and all(v[pos] == 0 for v in state_tensors(opt, w).values())
    keep = torch.ones_like(m)
    keep[pos] = False
    assert torch.equal(w.detach()[keep], before[keep])
    assert not torch.equal(other, before)
    # a step with a non-zero gradient moves it
    random_grads(model, gen)
    opt.step()
    assert w[pos] != 0.0


def test_set_mask_keeps_unchanged_weights_and_state():
    model = fc()
    eng = MaskEngine(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    eng.attach(opt)
    gen = torch.Generator().manual_seed(0)
    random_grads(model, gen)
    opt.step()
    w = eng.layers["body.6"].weight
    buf = opt.state[w]["momentum_buffer"].clone()
    w0 = w.detach().clone()
    m = torch.ones_like(w, dtype=torch.bool)
    m[0, :3] = False
    eng.set_mask("body.6", m)
    assert torch.equal(w.detach()[m], w0[m])
    assert torch.equal(opt.state[w]["momentum_buffer"][m], buf[m])
    assert torch.all(w[~m] == 0)


# ------------------------------------------------------------------------------------ state_dict
def test_masks_survive_save_and_load(tmp_path):
    torch.manual_seed(0)
    model = fc()
    eng = MaskEngine(model)
    init_masks(eng, "erk", 0.5, torch.Generator().manual_seed(0))
    names = eng.enable_units()
    assert names == ["body.3", "body.5"]
    um = torch.ones(32, dtype=torch.bool)
    um[[1, 4, 9]] = False
    eng.set_unit_mask("body.3", um)
    sd = model.state_dict()
    assert "body.1.weight_mask" in sd and "body.3.unit_mask" in sd and sd["body.1.weight_mask"].dtype == torch.bool
    torch.save(sd, tmp_path / "m.pt")
    x = x8()
    ref = model.eval()(x)

    fresh = fc()
    eng2 = MaskEngine(fresh)
    eng2.enable_units()
    fresh.load_state_dict(torch.load(tmp_path / "m.pt"))
    for n in eng.layers:
        assert torch.equal(eng2.mask(n), eng.mask(n))
    assert torch.equal(eng2.unit_mask("body.3"), um)
    assert torch.equal(eng2.unit_mask("body.5"), torch.ones(24, dtype=torch.bool))
    assert torch.equal(fresh.eval()(x), ref)
    assert eng2.density() == pytest.approx(eng.density(), abs=0)


def test_reattach_hooks_existing_unit_mask_buffers():
    model = fc()
    x = x8()
    eng = MaskEngine(model)
    eng.enable_units(["body.3"])
    um = torch.zeros(32, dtype=torch.bool)
    um[:4] = True
    eng.set_unit_mask("body.3", um)
    sd = model.state_dict()
    fresh = fc()
    fresh.body[3].register_buffer("unit_mask", torch.ones(32, dtype=torch.bool))
    eng2 = MaskEngine(fresh)
    fresh.load_state_dict(sd)
    assert eng2.unit_masks() == {}
    eng2.reattach()
    assert list(eng2.unit_masks()) == ["body.3"]
    assert not fresh.body[3]._forward_hooks  # a spikeprune neuron: the gate is folded into it, no hook
    seen = []
    fresh.body[4].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    fresh(x)
    assert torch.all(seen[0][..., 4:] == 0)


def test_remove_makes_masks_permanent():
    torch.manual_seed(0)
    model = liven(conv())
    g = torch.Generator().manual_seed(0)
    eng = MaskEngine(model)
    init_masks(eng, "uniform", 0.7, g)
    eng.enable_units()
    eng.set_unit_mask("body.4", torch.tensor([True, False, True, True]))
    eng.set_unit_mask("body.8", torch.tensor([False, True, True, False, True, True]))
    u = torch.ones(16, dtype=torch.bool)
    u[[0, 5, 11]] = False
    eng.set_unit_mask("body.11", u)
    model.eval()
    x = x8(8)
    spikes = []
    model.body[5].register_forward_pre_hook(lambda m, i: spikes.append(i[0]))
    ref = model(x)
    eff = eng.effective_weights()
    layers = list(eng.layers)
    eng.remove()
    assert spikes[-1][:, :, [0, 2, 3]].sum() > 0 and ref.abs().sum() > 0  # a live, spiking network
    out = model(x)
    assert torch.equal(out, ref)
    assert torch.all(spikes[-1][:, :, 1] == 0)  # the dead channel still makes no spike without the hook
    sd = model.state_dict()
    assert not any(k.endswith(("weight_mask", "unit_mask")) for k in sd)
    for n in layers:
        mod = dict(model.named_modules())[n]
        assert getattr(mod, "weight_mask", None) is None
        assert torch.equal(mod.weight.detach(), eff[n])
    assert model.body[1].weight[1] == 0 and model.body[1].bias[1] == 0
    assert eng.layers == {} and eng.optimizer is None
    from spikeprune.neurons import unit_gate

    assert all(unit_gate(m) is None for m in model.modules())  # the folded gates are gone with the buffers


def test_remove_without_example_input_or_units():
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    eng = MaskEngine(model)
    init_masks(eng, "uniform", 0.5, torch.Generator().manual_seed(0))
    x = torch.randn(4, 6)
    ref = model(x)
    eng.remove()
    assert torch.equal(model(x), ref)
    assert (model[0].weight == 0).sum() == 15


# ------------------------------------------------------------------------------- effective weights
def test_effective_weights_fold_unit_masks_by_hand():
    torch.manual_seed(0)
    model = conv()
    eng = MaskEngine(model)
    cm = random_mask(eng.layers["body.5"].weight.shape, 0.6, torch.Generator().manual_seed(1))
    eng.set_mask("body.5", cm)
    eng.enable_units()
    d3, d7, d11 = [1, 3], [0, 4], [2, 7, 15]
    for n, units, dead in (("body.4", 4, d3), ("body.8", 6, d7), ("body.11", 16, d11)):
        m = torch.ones(units, dtype=torch.bool)
        m[dead] = False
        eng.set_unit_mask(n, m)
    W = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, SYNAPTIC)}
    W["body.5"] *= cm
    W["body.0"][d3] = 0  # producer rows (filters) of dead conv1 channels
    W["body.5"][:, d3] = 0  # consumer input channels
    W["body.5"][d7] = 0
    for c in d7:  # conv2 (6 ch, 2x2 after pooling) flattened into FC: 4 columns per channel
        W["body.10"][:, 4 * c:4 * c + 4] = 0
    W["body.10"][d11] = 0
    W["body.12"][:, d11] = 0
    eff = eng.effective_weights()
    assert set(eff) == set(W)
    for n in W:
        assert torch.equal(eff[n], W[n]), n
    nz = sum(int((W[n] != 0).sum()) for n in eng.layers)
    assert eng.density() == nz / sum(W[n].numel() for n in eng.layers)
    # the raw weights themselves are untouched
    assert (model.body[0].weight[1] != 0).any()


def test_density_counts_from_tensors():
    model = fc()
    eng = MaskEngine(model)
    with torch.no_grad():
        for layer in eng.layers.values():
            layer.weight.fill_(1.0)
    total = 32 * 64 + 24 * 32 + 10 * 24
    assert eng.density() == 1.0
    m = torch.ones(32, 64, dtype=torch.bool)
    m[0, :10] = False
    eng.set_mask("body.1", m)
    assert eng.density() == (total - 10) / total
    eng.enable_units(["body.3"])
    um = torch.ones(32, dtype=torch.bool)
    um[[0, 1, 2]] = False  # rows 0..2 of body.1 (row 0 already lost 10) and columns 0..2 of body.4
    eng.set_unit_mask("body.3", um)
    nz = (29 * 64) + 24 * 29 + 10 * 24
    assert eng.density() == nz / total
    with torch.no_grad():
        eng.layers["body.6"].weight[0, 0] = 0.0  # a live weight that is exactly zero counts as pruned
    assert eng.density() == (nz - 1) / total


def test_ignored_and_first_last_layers():
    model = fc()
    assert list(MaskEngine(model, prune_first=False, prune_last=False).layers) == ["body.4"]
    model = fc()
    assert list(MaskEngine(model, ignored_layers=[model.body[4]]).layers) == ["body.1", "body.6"]
    model = fc()
    assert list(MaskEngine(model, ignored_layers=["body.6"]).layers) == ["body.1", "body.4"]


# ------------------------------------------------------------------------------------- unit masks
def test_unit_mask_silences_output_and_blocks_fan_in_gradient():
    torch.manual_seed(0)
    model = fc()
    with torch.no_grad():
        model.body[1].weight.mul_(8)
    eng = MaskEngine(model)
    eng.enable_units(["body.3"])
    um = torch.ones(32, dtype=torch.bool)
    um[::2] = False
    eng.set_unit_mask("body.3", um)
    seen = []
    model.body[4].register_forward_pre_hook(lambda m, i: seen.append(i[0]))
    out = model(x8())
    assert torch.all(seen[0][..., ~um] == 0) and seen[0][..., um].sum() > 0
    (out - 1).square().mean().backward()
    g = model.body[1].weight.grad
    assert torch.all(g[~um] == 0) and g[um].abs().sum() > 0


def test_unit_gradient_matches_an_explicit_gate():
    """``track_unit_grad`` accumulates |dL/dg| of a gate on each unit's spikes, as if the gate were open."""
    torch.manual_seed(0)
    model = fc()
    with torch.no_grad():
        model.body[1].weight.mul_(6)
    x = x8(6)
    um = torch.ones(32, dtype=torch.bool)
    um[[0, 3, 17]] = False

    # explicit: y = s * m + s.detach() * (g - 1) at g = 1 (value unchanged, dL/dg = sum gy * s)
    gate = torch.ones(32, requires_grad=True)
    h = model.body[3].register_forward_hook(lambda mod, i, o: o * um.float() + o.detach() * (gate - 1))
    model(x).sum().backward()
    h.remove()
    want = gate.grad.abs()
    model.zero_grad()

    eng = MaskEngine(model)
    eng.enable_units(["body.3"])
    eng.set_unit_mask("body.3", um)
    eng.track_unit_grad = True
    model(x).sum().backward()
    got = eng.pop_unit_grad()
    assert set(got) == {"body.3"}
    torch.testing.assert_close(got["body.3"], want)
    assert got["body.3"][~um].sum() > 0  # masked units still get the dense signal
    model(x).sum().backward()
    model(x).sum().backward()  # accumulates across backwards until popped
    torch.testing.assert_close(eng.pop_unit_grad()["body.3"], 2 * want)
    assert eng.pop_unit_grad() == {}


# ------------------------------------------------------------------------------------ initial masks
ERK_SHAPES = {"conv1": (16, 3, 3, 3), "conv2": (32, 16, 3, 3), "fc1": (128, 512), "fc2": (10, 128)}


@pytest.mark.parametrize("kernel", [True, False])
@pytest.mark.parametrize("density", [0.05, 0.2, 0.5, 0.8, 1.0])
def test_erk_densities(kernel, density):
    d = erk_densities(ERK_SHAPES, density, kernel=kernel)
    assert set(d) == set(ERK_SHAPES)
    n = {k: math.prod(s) for k, s in ERK_SHAPES.items()}
    overall = sum(d[k] * n[k] for k in d) / sum(n.values())
    assert abs(overall - density) < 1e-9
    assert all(0 < v <= 1 for v in d.values())

    def raw(s):
        return sum(s) / math.prod(s) if kernel else (s[0] + s[1]) / (s[0] * s[1])

    free = [k for k in d if d[k] < 1]
    for a in free:
        for b in free:
            assert d[a] / d[b] == pytest.approx(raw(ERK_SHAPES[a]) / raw(ERK_SHAPES[b]), rel=1e-9)
    capped = [k for k in d if d[k] == 1]
    if free and capped:  # a capped layer would have exceeded 1 at the free layers' scale
        eps = d[free[0]] / raw(ERK_SHAPES[free[0]])
        assert all(eps * raw(ERK_SHAPES[k]) >= 1 for k in capped)


def test_erk_caps_small_layers_and_er_ignores_kernel():
    d = erk_densities(ERK_SHAPES, 0.3)
    assert d["conv1"] == 1.0 and d["fc2"] == 1.0 and d["fc1"] < 0.3
    er = erk_densities({"c": (8, 8, 3, 3), "l": (8, 8)}, 0.5, kernel=False)
    assert er["c"] == pytest.approx(er["l"])  # ER: (n_in + n_out) / (n_in n_out), the same for both
    erk = erk_densities({"c": (8, 8, 3, 3), "l": (8, 8)}, 0.5, kernel=True)
    assert erk["c"] < erk["l"]
    with pytest.raises(ValueError):
        erk_densities(ERK_SHAPES, 0.0)
    with pytest.raises(ValueError):
        erk_densities(ERK_SHAPES, 1.5)


@pytest.mark.parametrize("density", [0.0, 0.013, 0.25, 0.5, 0.777, 1.0])
@pytest.mark.parametrize("shape", [(7,), (5, 9), (4, 3, 3, 3)])
def test_random_mask_exact_count(shape, density):
    m = random_mask(shape, density, torch.Generator().manual_seed(0))
    assert m.dtype == torch.bool and m.shape == shape
    assert int(m.sum()) == round(density * math.prod(shape))
    m2 = random_mask(shape, density, torch.Generator().manual_seed(0))
    assert torch.equal(m, m2)


@pytest.mark.parametrize("kind", ["dense", "uniform", "er", "erk"])
def test_init_masks(kind):
    model = conv()
    eng = MaskEngine(model)
    init_masks(eng, kind, 0.5, torch.Generator().manual_seed(0))
    shapes = {n: tuple(m.weight.shape) for n, m in eng.layers.items()}
    if kind == "dense":
        dens = {n: 1.0 for n in shapes}
    elif kind == "uniform":
        dens = {n: 0.5 for n in shapes}
    else:
        dens = erk_densities(shapes, 0.5, kernel=kind == "erk")
    for n, s in shapes.items():
        assert int(eng.mask(n).sum()) == round(dens[n] * math.prod(s)), n
        assert torch.all(eng.layers[n].weight[~eng.mask(n)] == 0)
    if kind != "dense":
        total = sum(math.prod(s) for s in shapes.values())
        ones = sum(int(eng.mask(n).sum()) for n in shapes)
        assert abs(ones - 0.5 * total) <= len(shapes)
    with pytest.raises(ValueError, match="init must be one of"):
        init_masks(eng, "gaussian", 0.5)
    with pytest.raises(ValueError, match="density"):
        init_masks(eng, "uniform", 0.0)


# --------------------------------------------------------------------------------- whole-mask primitives
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.float16, torch.int64])
@pytest.mark.parametrize("value", [0.0, -0.0, math.inf, 1.0, -2.5])
def test_fill_is_masked_fill_bit_for_bit(dtype, value):
    g = torch.Generator().manual_seed(1)
    t = (torch.randn(37, 29, generator=g) * 3).to(dtype)
    if dtype.is_floating_point:
        t[0, :3] = torch.tensor([math.inf, -math.inf, math.nan], dtype=dtype)
        t[1, 0] = -0.0
    where = torch.rand(37, 29, generator=g) < 0.4
    for a, w in [(t.clone(), where), (t.clone().t(), where.t()), (t.clone(), torch.zeros_like(where)),
                 (t.clone(), torch.ones_like(where))]:  # contiguous, transposed, none, all
        value_ = value if dtype.is_floating_point else int(value) if math.isfinite(value) else 7
        want = a.clone().masked_fill_(w, value_)
        got = fill_(a, w, value_)
        assert got is a
        if dtype.is_floating_point:  # same bits: -0.0, inf and NaN included
            bits = {torch.float32: torch.int32, torch.float64: torch.int64, torch.float16: torch.int16}[dtype]
            assert torch.equal(got.view(bits), want.view(bits))
        else:
            assert torch.equal(got, want)


def test_fill_by_flat_indices_matches_the_mask_fill():
    from spikeprune.sparsity.masks import _fill_at
    g = torch.Generator().manual_seed(2)
    where = torch.rand(6, 5, 3, 3, generator=g) < 0.1
    for t in (torch.randn(6, 5, 3, 3, generator=g),
              torch.randn(6, 5, 3, 3, generator=g).to(memory_format=torch.channels_last)):  # not contiguous
        want = t.clone().masked_fill_(where, math.inf)
        _fill_at(t, None, flat_true(where), math.inf)
        assert torch.equal(t, want)


def test_count_any_and_flat_true():
    m = torch.zeros(3, 4, 5, dtype=torch.bool)
    assert count(m) == 0 and not any_true(m) and flat_true(m).tolist() == []
    m[0, 1, 2] = m[2, 3, 4] = m[1, 0, 0] = True
    assert count(m) == 3 and any_true(m)
    assert flat_true(m).tolist() == [0 * 20 + 1 * 5 + 2, 1 * 20, 59]  # row-major, ascending
    assert flat_true(m).dtype == torch.int64
    assert flat_true(m.transpose(0, 2)).tolist() == m.transpose(0, 2).reshape(-1).nonzero().squeeze(1).tolist()
    assert not any_true(torch.zeros(0, dtype=torch.bool))
    assert count(torch.tensor([0.0, -0.0, 2.0, math.nan])) == 2  # what != 0 counts


# --------------------------------------------------------------------------------- select_per_row
def test_select_per_row_hand_examples():
    score = torch.tensor([[5., 1., 3., 2.], [0., 4., 4., 1.]])
    allc = torch.ones(2, 4, dtype=torch.bool)
    t = torch.tensor
    assert select_per_row(score, 2, allc).int().tolist() == [[1, 0, 1, 0], [0, 1, 1, 0]]
    assert select_per_row(score, 1, allc).int().tolist() == [[1, 0, 0, 0], [0, 1, 0, 0]]  # tie: first position
    assert select_per_row(score, 1, allc, largest=False).int().tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert select_per_row(score, 2, allc, largest=False).int().tolist() == [[0, 1, 0, 1], [1, 0, 0, 1]]
    # per-row k
    assert select_per_row(score, t([1, 3]), allc).int().tolist() == [[1, 0, 0, 0], [0, 1, 1, 1]]
    assert select_per_row(score, t([0, 2]), allc, largest=False).int().tolist() == [[0, 0, 0, 0], [1, 0, 0, 1]]
    # candidates: best among them only; a row with fewer candidates than k takes them all
    cand = t([[False, True, True, True], [True, False, False, False]])
    assert select_per_row(score, 2, cand).int().tolist() == [[0, 0, 1, 1], [1, 0, 0, 0]]
    assert select_per_row(score, 1, cand, largest=False).int().tolist() == [[0, 1, 0, 0], [1, 0, 0, 0]]
    assert not select_per_row(score, 3, torch.zeros(2, 4, dtype=torch.bool)).any()
    # k larger than the row
    assert select_per_row(score, 10, allc).all()


def test_select_per_row_on_conv_shapes():
    score = torch.arange(2 * 2 * 3, dtype=torch.float).reshape(2, 2, 3)  # 2 rows of 6
    cand = torch.ones(2, 2, 3, dtype=torch.bool)
    sel = select_per_row(score, torch.tensor([1, 2]), cand)
    assert sel.shape == (2, 2, 3)
    assert sel.reshape(2, -1).int().tolist() == [[0, 0, 0, 0, 0, 1], [0, 0, 0, 0, 1, 1]]
    sel = select_per_row(score.reshape(1, -1), 3, cand.reshape(1, -1), largest=False)
    assert sel.nonzero()[:, 1].tolist() == [0, 1, 2]


def test_scope_view():
    t = torch.zeros(4, 3, 2, 2)
    assert scope_view(t, "neuron").shape == (4, 12)
    assert scope_view(t, "layer").shape == (1, 48)
    with pytest.raises(ValueError, match="scope"):
        scope_view(t, "global")


# ------------------------------------------------------------------------------------------ errors
def test_errors():
    model = fc(spiking_readout=True)
    eng = MaskEngine(model)
    with pytest.raises(ValueError, match="shape"):
        eng.set_mask("body.1", torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match="ignored_layers"):
        MaskEngine(fc(), ignored_layers=["body.99"])
    with pytest.raises(ValueError, match="not a submodule"):
        MaskEngine(fc(), ignored_layers=[nn.Linear(2, 2)])
    with pytest.raises(ValueError, match="no Conv/Linear"):
        MaskEngine(nn.Sequential(nn.ReLU()))
    assert [g.neuron for g in eng.unit_groups()] == ["body.3", "body.5"]
    with pytest.raises(ValueError, match="output layer"):
        eng.enable_units(["body.7"])  # the spiking readout
    with pytest.raises(ValueError, match="not a spiking layer"):
        eng.enable_units(["body.1"])
    eng.enable_units(["body.3"])
    with pytest.raises(ValueError, match="shape"):
        eng.set_unit_mask("body.3", torch.ones(5, dtype=torch.bool))
    with pytest.raises(ValueError, match="example_input"):
        MaskEngine(nn.Sequential(nn.Linear(3, 3))).groups  # noqa: B018


# ---------------------------------------------------------------------------------------- property
class Net(nn.Module):
    """Synaptic layers only (gradients are set by hand; no forward needed)."""

    def __init__(self, specs):
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Linear(i, o, bias=False) if k == "fc" else nn.Conv2d(i, o, ks, bias=False) for k, o, i, ks in specs)


layer_spec = st.tuples(st.sampled_from(["fc", "conv"]), st.integers(1, 6), st.integers(1, 6), st.integers(1, 3))
op = st.one_of(st.tuples(st.just("step"), st.just(0), st.just(0.0)),
               st.tuples(st.sampled_from(["prune", "regrow"]), st.integers(0, 3), st.floats(0.05, 0.9)))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(specs=st.lists(layer_spec, min_size=1, max_size=3), density=st.floats(0.05, 1.0),
       scope=st.sampled_from(["layer", "neuron"]), opt_name=st.sampled_from(sorted(OPTIMIZERS)),
       ops=st.lists(op, min_size=1, max_size=8), seed=st.integers(0, 2**16))
def test_property_masks_hold_under_prune_regrow_and_steps(specs, density, scope, opt_name, ops, seed):
    import io

    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = Net(specs)
    eng = MaskEngine(net)
    opt = OPTIMIZERS[opt_name](net.parameters())
    eng.attach(opt)
    init_masks(eng, "uniform", density, gen)
    names = list(eng.layers)
    for kind, li, frac in ops:
        if kind == "step":
            random_grads(net, gen)
            opt.step()
        else:
            name = names[li % len(names)]
            m = scope_view(eng.mask(name).clone(), scope)
            cand = m if kind == "prune" else ~m
            k = torch.floor(cand.sum(1) * frac).long()
            sel = select_per_row(torch.rand(m.shape, generator=gen), k, cand)
            new = (m & ~sel) if kind == "prune" else (m | sel)
            before = int(m.sum())
            eng.set_mask(name, new.reshape(eng.mask(name).shape))
            after = int(eng.mask(name).sum())
            assert (after <= before) if kind == "prune" else (after >= before)
        assert_masked_zero(eng, opt)
    total = sum(layer.weight.numel() for layer in eng.layers.values())
    mask_ones = sum(int(layer.weight_mask.sum()) for layer in eng.layers.values())
    nonzero = sum(int((layer.weight != 0).sum()) for layer in eng.layers.values())
    # zeros at masked places account for every masked entry; live weights may be 0 by chance (just regrown)
    zeros_masked = sum(int(((layer.weight == 0) & ~layer.weight_mask).sum()) for layer in eng.layers.values())
    assert zeros_masked == total - mask_ones
    assert nonzero <= mask_ones
    assert eng.density() == nonzero / total
    # masks (and weights) unchanged by a state_dict round trip
    buf = io.BytesIO()
    torch.save(net.state_dict(), buf)
    buf.seek(0)
    fresh = Net(specs)
    eng2 = MaskEngine(fresh)
    fresh.load_state_dict(torch.load(buf))
    for n in names:
        assert torch.equal(eng2.mask(n), eng.mask(n))
        assert torch.equal(eng2.layers[n].weight, eng.layers[n].weight)
    assert eng2.density() == eng.density()


def test_grad_clip_sees_masked_gradients_and_hooks_see_each_gradient_once(tmp_path):
    from spikeprune.config import load_config
    from spikeprune.train import Trainer

    cfg = load_config(None, [
        f"out_dir={tmp_path}", "model.options={hidden: [24, 16], image_size: 8}", "model.T=2",
        "model.neuron={type: lif, v_threshold: 0.2}", "data.name=synthetic",
        "data.options={n: 32, in_shape: [1, 8, 8]}", "data.batch_size=8", "train.epochs=1",
        "train.max_steps_per_epoch=2", "train.progress=false", "train.grad_clip=1e-6", "measure.max_batches=1",
        "method={name: pq_rewire, init_density: 0.5}"])
    tr = Trainer(cfg, log=lambda *a, **k: None)
    eng = tr.method.engine
    calls, norms = [], []
    eng.dense_grad_hooks.append(lambda name, layer, g: calls.append(name))
    real = torch.nn.utils.clip_grad_norm_

    def spy(params, max_norm, *a, **k):
        params = list(params)
        for m in eng.layers.values():  # what the clip sees: dead weights' gradients already zero
            assert m.weight.grad is None or bool((m.weight.grad[~m.weight_mask] == 0).all())
        norms.append(max_norm)
        return real(params, max_norm, *a, **k)

    torch.nn.utils.clip_grad_norm_ = spy
    try:
        tr.fit()
    finally:
        torch.nn.utils.clip_grad_norm_ = real
    assert len(norms) == 2
    assert len(calls) == 2 * len(eng.layers)  # once per layer per step, not twice
    for m in eng.layers.values():
        assert bool((m.weight[~m.weight_mask] == 0).all())


def test_dead_second_moments_are_parked_and_reparked():
    # Adam's exp_avg_sq of dead weights: 1.0 after the first step (PyTorch's CPU sqrt is slow on exact zeros), decays
    # like any unused second moment, and is set back to 1.0 every 4096 steps; live entries are never touched
    torch.manual_seed(0)
    model = fc()
    eng = MaskEngine(model)
    gen = torch.Generator().manual_seed(0)
    init_masks(eng, "uniform", 0.5, gen)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    eng.attach(opt)
    w = eng.layers["body.4"].weight
    dead = ~eng.mask("body.4")
    random_grads(model, gen)
    opt.step()
    v = opt.state[w]["exp_avg_sq"]
    assert torch.all(v[dead] == 1.0) and torch.all(v[~dead] != 1.0)
    random_grads(model, gen)
    opt.step()
    assert torch.allclose(v[dead], torch.full_like(v[dead], 0.999))  # beta2 decay, zero gradient
    live = v[~dead].clone()
    eng._steps = 4096
    random_grads(model, gen)
    opt.step()
    assert torch.all(v[dead] == 1.0) and not torch.equal(v[~dead], live)
    assert torch.all(w[dead] == 0.0)


def test_unit_gate_compiled_equals_eager_on_conv_channels(backend):
    # the conv channel gate (channels-last [T, B, C, H, W] spikes): same outputs, weight gradients and gate
    # gradients on the compiled path (one pass each way) as on the eager product + hook
    torch.manual_seed(0)
    model = create_model("convnet", T=2, channels=(4, 6), hidden=8, image_size=8)
    liven(model)
    x = torch.rand(3, 1, 8, 8) * 4
    eng = MaskEngine(model, example_input=x[:1])
    convs = [g.neuron for g in eng.unit_groups() if g.units in (4, 6)]
    eng.enable_units(convs)
    for n in convs:
        um = torch.ones(eng.unit_mask(n).numel(), dtype=torch.bool)
        um[1] = False
        eng.set_unit_mask(n, um)
    eng.track_unit_grad = True
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    got = {"out": out.detach(), "grads": {n: p.grad.clone() for n, p in model.named_parameters()},
           "gate": eng.pop_unit_grad()}
    ref_path = "eager" if backend == "cpp" else "cpp"
    from spikeprune._ext import use_cpp

    model.zero_grad()
    use_cpp(ref_path == "cpp")
    try:
        out2 = model(x)
        (out2 * torch.linspace(-1, 1, out2.shape[-1])).sum().backward()
    finally:
        use_cpp(backend == "cpp")
    torch.testing.assert_close(got["out"], out2.detach(), rtol=0, atol=1e-5)
    for n, p in model.named_parameters():
        torch.testing.assert_close(got["grads"][n], p.grad, rtol=1e-5, atol=1e-5)
    gate = eng.pop_unit_grad()
    assert set(gate) == set(convs)
    for n in convs:
        torch.testing.assert_close(got["gate"][n], gate[n], rtol=1e-5, atol=1e-5)
        assert got["gate"][n][1] > 0  # the masked channel still gets the dense signal


@pytest.mark.parametrize("largest", [True, False])
@pytest.mark.parametrize("rows", [1, 3])
def test_select_per_row_selection_equals_the_stable_sort(largest, rows):
    # the one-k fast path (kthvalue) picks exactly what the stable sort picks, ties broken by position
    g = torch.Generator().manual_seed(0)
    score = torch.randint(0, 5, (rows, 200), generator=g).float()  # many ties
    score[:, ::7] = 0.0
    cand = torch.rand(rows, 200, generator=g) < 0.6
    for k in (0, 1, 17, 60, 119, 200, 500):
        got = select_per_row(score, k, cand, largest=largest)
        s = score.masked_fill(~cand, float("-inf") if largest else float("inf"))
        order = torch.argsort(s, dim=1, descending=largest, stable=True)
        want = torch.zeros_like(cand)
        for r in range(rows):
            want[r, order[r, :k]] = True
        assert torch.equal(got, want & cand), k
        assert torch.equal(select_per_row(score, torch.full((rows,), k), cand, largest=largest), got)
