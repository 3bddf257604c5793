"""The baselines, mechanism by mechanism (hand-computed schedules, selections and updates on hand-set weights and
gradients, driven by a minimal fake trainer), then one short ``Trainer`` run per baseline on synthetic data that must
land within 2 points of the requested connectivity, measured from the weights."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from spikeprune.callbacks import Callback
from spikeprune.config import ConfigError, load_config
from spikeprune.models import create_model
from spikeprune.sparsity.loop import LoopState
from spikeprune.sparsity.masks import erk_densities
from spikeprune.sparsity.methods import create_method, method_config
from spikeprune.sparsity.methods._common import cubic_sparsity
from spikeprune.sparsity.methods.admm import project
from spikeprune.sparsity.methods.grad_r import prior_center
from spikeprune.sparsity.methods.lth import lth_rounds
from spikeprune.sparsity.methods.stds import sine_inc
from spikeprune.sparsity.methods.upr import upr_temperature
from spikeprune.train import Trainer


# --------------------------------------------------------------------------------------------- helpers
def fc() -> nn.Module:
    torch.manual_seed(0)
    return create_model("fc3", hidden=(32, 24), image_size=8)


def one_layer() -> nn.Module:
    """A single 2x8 linear layer (16 weights) for hand-checked selections."""
    return nn.Sequential(nn.Linear(8, 2, bias=False))


def fake_trainer(model: nn.Module, epochs: int = 4, steps: int = 10, lr: float = 0.1):
    """The loop state a method is driven by, filled by hand (plain SGD for the run and for hidden weights)."""
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    return LoopState(model=model, example_input=torch.rand(2, 1, 8, 8), optimizer=opt, epochs=epochs,
                     steps_per_epoch=steps, seed=0)


def setup(name: str, model: nn.Module, epochs: int = 4, steps: int = 10, **options):
    m = create_method(name, **options)
    tr = fake_trainer(model, epochs, steps)
    m.setup(tr)
    return m, tr


def hand_layer(m) -> tuple[nn.Module, torch.Tensor]:
    """Give the single layer 5 positive and 5 negative active weights and 6 inactive places."""
    layer = m.engine.layers["0"]
    w = torch.tensor([[0.5, 0.1, 0.3, 0.2, 0.9, 0.0, 0.0, 0.0],
                      [-0.05, -0.6, -0.2, -0.4, -0.01, 0.0, 0.0, 0.0]])
    mask = w != 0
    with torch.no_grad():
        layer.weight.copy_(w)
    m.engine.set_mask("0", mask)
    return layer, mask


def dense_step(m, grads: dict[str, torch.Tensor]) -> None:
    """Present dense gradients to the engine as the optimizer's pre-step hook does."""
    for n, layer in m.engine.layers.items():
        layer.weight.grad = grads.get(n, torch.zeros_like(layer.weight)).clone()
    m.engine.before_step()


# ========================================================================================= magnitude
def test_cubic_schedule_hand_values():
    assert cubic_sparsity(0, 0.0, 0.9, 0, 100) == 0.0
    assert cubic_sparsity(25, 0.0, 0.9, 0, 100) == pytest.approx(0.9 - 0.9 * 0.75 ** 3)  # 0.5203125
    assert cubic_sparsity(50, 0.0, 0.9, 0, 100) == pytest.approx(0.7875)
    assert cubic_sparsity(100, 0.0, 0.9, 0, 100) == pytest.approx(0.9)
    assert cubic_sparsity(150, 0.0, 0.9, 0, 100) == pytest.approx(0.9)
    assert cubic_sparsity(30, 0.2, 0.9, 10, 40) == pytest.approx(0.9 - 0.7 * 0.125)  # 0.8125
    assert cubic_sparsity(5, 0.2, 0.9, 10, 40) == 0.2


def test_magnitude_cubic_prunes_smallest_on_schedule():
    # 4 epochs x 10 steps, end 0.5 -> t0 = 0, nΔt = 20, Δt = 5
    m, tr = setup("magnitude", fc(), target_density=0.2, update_every=5, end=0.5)
    assert (m.t0, m.span) == (0, 20)
    for t in range(1, 41):
        before = {n: (layer.weight.detach().abs().clone(), m.engine.mask(n).clone())
                  for n, layer in m.engine.layers.items()}
        tr.global_step = t
        m.on_step_end(tr)
        for n, (a, old) in before.items():
            new = m.engine.mask(n)
            if t % 5 and t != 20 or t > 20:
                assert torch.equal(new, old), f"step {t} changed {n}"
                continue
            dens = 1 - cubic_sparsity(t, 0.0, 0.8, 0, 20)  # t = 5: 1 - (0.8 - 0.8 * 0.75**3) = 0.5375
            assert int(new.sum()) == round(dens * new.numel())
            assert not (new & ~old).any()  # pruned weights never come back
            assert a[new].min() >= a[old & ~new].max()  # the smallest |w| go
    assert m.engine.density() == pytest.approx(0.2, abs=1e-3)
    assert [h["step"] for h in m.history] == [5, 10, 15, 20]


def test_magnitude_oneshot_global():
    m, tr = setup("magnitude", fc(), target_density=0.3, schedule="oneshot", scope="global", prune_epoch=2)
    ws = {n: layer.weight.detach().abs().clone() for n, layer in m.engine.layers.items()}
    m.on_epoch_end(tr, {})  # after epoch 1: nothing
    assert all(mk.all() for mk in m.engine.masks().values())
    tr.epoch = 1
    m.on_epoch_end(tr, {})
    masks = m.engine.masks()
    total = sum(w.numel() for w in ws.values())
    assert sum(int(mk.sum()) for mk in masks.values()) == round(0.3 * total)
    kept = torch.cat([ws[n][masks[n]] for n in ws])
    cut = torch.cat([ws[n][~masks[n]] for n in ws])
    assert kept.min() >= cut.max()  # one threshold over all layers
    assert len({round(float(mk.float().mean()), 3) for mk in masks.values()}) > 1  # so layers differ
    with pytest.raises(ConfigError, match="method.prune_epoch"):
        setup("magnitude", fc(), schedule="oneshot", prune_epoch=5, epochs=4)


# =============================================================================================== LTH
def test_lth_rounds():
    assert lth_rounds(0.5, 0.25) == 3  # 0.75, 0.5625, then 0.5
    assert lth_rounds(0.25, 0.25) == 5  # 0.75**5 = 0.237
    assert lth_rounds(0.1, 0.25) == 8  # 0.75**8 = 0.1001
    with pytest.raises(ConfigError, match="method.epochs_per_round"):
        setup("lth", fc(), target_density=0.1, epochs=8)  # 8 rounds + a final one need 9 epochs
    with pytest.raises(ConfigError, match="method.rewind_epoch"):
        setup("lth", fc(), target_density=0.5, epochs=4, rewind_epoch=1)  # 1 epoch per round


def test_lth_prunes_globally_and_rewinds_survivors_to_stored_values():
    m, tr = setup("lth", fc(), target_density=0.5, epochs_per_round=2, rewind_epoch=1, epochs=7)
    layers = m.engine.layers
    g = torch.Generator().manual_seed(1)

    def train_to_new_values():
        with torch.no_grad():
            for n, layer in layers.items():
                layer.weight.copy_(torch.randn(layer.weight.shape, generator=g) * m.engine.mask(n))

    tr.optimizer.state[layers["body.1"].weight]["momentum_buffer"] = torch.ones(1)
    train_to_new_values()
    stored = {n: layer.weight.detach().clone() for n, layer in layers.items()}
    m.on_epoch_end(tr, {})  # epoch 1 ends: the copy is taken, no prune (rounds of 2 epochs)
    assert m.done == 0 and all(mk.all() for mk in m.engine.masks().values())
    densities = []
    for e in range(1, 7):
        train_to_new_values()
        trained = {n: layer.weight.detach().abs().clone() for n, layer in layers.items()}
        old = {n: mk.clone() for n, mk in m.engine.masks().items()}
        tr.epoch = e
        m.on_epoch_end(tr, {"test_acc": 0.5})
        if (e + 1) % 2:
            continue
        masks = m.engine.masks()
        densities.append(m.engine.density())
        kept = torch.cat([trained[n][masks[n]] for n in masks])
        cut = torch.cat([trained[n][old[n] & ~masks[n]] for n in masks])
        assert kept.min() >= cut.max()  # global magnitude of the trained weights
        for n, layer in layers.items():  # survivors rewound to the stored copy, the rest 0
            assert torch.equal(layer.weight.detach(), stored[n] * masks[n])
        assert not tr.optimizer.state
    assert densities == pytest.approx([0.75, 0.5625, 0.5], abs=1e-3)
    assert [h["round"] for h in m.history] == [1, 2, 3]


# =============================================================================================== SET
def test_set_removes_smallest_positive_and_largest_negative():
    m, tr = setup("set", one_layer(), fraction=0.4)
    layer, old = hand_layer(m)
    m.update(tr.global_step)
    new = m.engine.mask("0").clone()
    # ⌊0.4·5⌋ = 2 of each sign: 0.1 and 0.2, -0.01 and -0.05
    gone = old & ~new
    assert gone.nonzero().tolist() == [[0, 1], [0, 3], [1, 0], [1, 4]]
    grown = new & ~old
    assert int(grown.sum()) == 4 and int(new.sum()) == 10 and not (grown & old).any()
    w = layer.weight.detach()
    assert (w[grown] != 0).all() and (w[grown].abs() <= 1 / math.sqrt(8)).all()  # new random weights
    assert not w[~new].any()


def test_set_updates_after_every_epoch_but_the_last():
    m, tr = setup("set", fc(), target_density=0.3, epochs=3)
    m.on_train_start(tr)
    for e, moves in ((0, True), (1, True), (2, False)):
        before = {n: mk.clone() for n, mk in m.engine.masks().items()}
        tr.epoch = e
        m.on_epoch_end(tr, {})
        changed = any(not torch.equal(before[n], mk) for n, mk in m.engine.masks().items())
        assert changed == moves
    assert m.engine.density() == pytest.approx(0.3, abs=1e-3)


# ============================================================================================== RigL
def test_rigl_cosine_drop_fraction():
    m, _ = setup("rigl", fc())  # 40 steps, T_end = 30
    assert m.t_end == 30
    assert m.drop_fraction(0) == pytest.approx(0.3)
    assert m.drop_fraction(15) == pytest.approx(0.15)
    assert m.drop_fraction(7.5) == pytest.approx(0.15 * (1 + math.cos(math.pi / 4)))
    assert m.drop_fraction(30) == 0.0 and m.drop_fraction(35) == 0.0


def test_rigl_drops_smallest_and_grows_top_dense_gradient_inactive():
    m, tr = setup("rigl", one_layer(), update_every=5)
    layer, old = hand_layer(m)
    grad = torch.tensor([[9.0, 9.0, 9.0, 9.0, 9.0, 0.5, -3.0, 0.1],
                         [9.0, 9.0, 9.0, 9.0, 9.0, -2.0, 0.2, 1.0]])
    tr.global_step = 4  # the step being taken is the 5th: an update step, so the dense gradient is kept
    dense_step(m, {"0": grad})
    assert torch.equal(m.grads["0"], grad.abs()) and not layer.weight.grad[~old].any()  # engine masked the copy
    tr.global_step = 5
    m.on_step_end(tr)
    new = m.engine.mask("0").clone()
    f = 0.15 * (1 + math.cos(math.pi * 5 / 30))  # drop ⌊f·10⌋ = 2 (f = 0.2799)
    assert int(f * 10) == 2
    assert (old & ~new).nonzero().tolist() == [[1, 0], [1, 4]]  # |w| = 0.05, 0.01
    assert (new & ~old).nonzero().tolist() == [[0, 6], [1, 5]]  # |g| = 3.0, 2.0 among the inactive
    assert not layer.weight.detach()[new & ~old].any()  # grown at 0
    tr.global_step = 6
    m.on_step_end(tr)  # not an update step
    assert torch.equal(m.engine.mask("0"), new)
    # only one inactive place has a gradient: one connection moves, the other dropped one stays
    grad = torch.zeros(2, 8)
    grad[0, 7] = 1.0
    tr.global_step = 9
    dense_step(m, {"0": grad})
    tr.global_step = 10
    m.on_step_end(tr)
    assert int(m.engine.mask("0").sum()) == 10 and (m.engine.mask("0") & ~new).nonzero().tolist() == [[0, 7]]


# ============================================================================================ ESL-SNN
def test_eslsnn_er_init_and_momentum_growth():
    m, tr = setup("eslsnn", fc(), target_density=0.2, update_every=1, momentum=0.5)
    m.on_train_start(tr)
    shapes = {n: tuple(layer.weight.shape) for n, layer in m.engine.layers.items()}
    want = erk_densities(shapes, 0.2, kernel=False)
    for n, mk in m.engine.masks().items():
        assert int(mk.sum()) == round(want[n] * mk.numel())
    g1 = {n: torch.randn(s) for n, s in shapes.items()}
    g2 = {n: torch.randn(s) for n, s in shapes.items()}
    dense_step(m, g1)
    dense_step(m, g2)
    old = {n: mk.clone() for n, mk in m.engine.masks().items()}
    m.update(0)
    for n, mk in m.engine.masks().items():
        mom = (0.5 * 0.5 * g1[n] + 0.5 * g2[n]).abs()  # EMA(0.5) of the dense gradients
        grown = mk & ~old[n]
        k = int(grown.sum())
        assert k == int(0.3 * int(old[n].sum())) and int(mk.sum()) == int(old[n].sum())
        assert torch.allclose(m.momentum.buf[n].abs(), mom)
        assert mom[grown].min() >= mom[~old[n] & ~grown].max()


# ============================================================================================= Deep R
def test_deep_r_draws_distinct_dormant_connections_uniformly():
    m, _ = setup("deep_r", fc(), target_density=0.25)
    counts = torch.zeros(40)
    for _ in range(2000):
        idx = m._draw(40, 3)  # rejection sampling (3 of 40)
        assert idx.numel() == 3 and idx.unique().numel() == 3 and 0 <= int(idx.min()) and int(idx.max()) < 40
        counts[idx] += 1
    assert counts.sum() == 6000 and (counts - 150).abs().max() < 60  # 150 expected each; binomial sd ~12
    full = m._draw(10, 6)  # permutation path
    assert full.unique().numel() == 6 and int(full.max()) < 10


def test_deep_r_keeps_the_budget_and_rewires_sign_flips():
    m, tr = setup("deep_r", fc(), target_density=0.25, l1=0.0, eps=1e-3)
    m.on_train_start(tr)
    layer = m.engine.layers["body.1"]
    active = m.engine.mask("body.1").nonzero()[:5]
    with torch.no_grad():
        for i, j in active.tolist():
            layer.weight[i, j] *= -1  # the step crossed zero
    before = m.engine.mask("body.1").clone()
    assert m.rewire(0.1) == 5
    for n, mk in m.engine.masks().items():
        assert int(mk.sum()) == m.budget[n]  # exactly the budget
        w, s = m.engine.layers[n].weight.detach(), m.signs[n].float()
        assert (w[mk] * s[mk] > 0).all() and not w[~mk].any()
    mk, w, s = m.engine.mask("body.1"), layer.weight.detach(), m.signs["body.1"].float()
    grown = mk & ~before
    flipped_back = torch.zeros_like(mk)
    flipped_back[active[:, 0], active[:, 1]] = True
    grown |= flipped_back & mk  # a flipped connection may itself be drawn again (re-activated at eps)
    assert int(grown.sum()) == 5 and torch.allclose(w[grown], 1e-3 * s[grown])
    # L1: θ ← θ − η·l1 on active connections
    m.cfg.l1 = 0.01
    w0 = layer.weight.detach().clone()
    m.rewire(0.1)
    alive = m.engine.mask("body.1") & (w0 * s > 1e-3)
    assert torch.allclose(layer.weight.detach()[alive], (w0 - 1e-3 * s)[alive])


# ============================================================================================= Grad R
def test_grad_r_prior_center_and_gradient_regrowth():
    assert prior_center(0.9, 2.0) == pytest.approx(math.log(0.2) / 2)
    assert prior_center(0.5, 3.0) == 0.0
    m, tr = setup("grad_r", fc(), target_density=0.1, control=False, alpha=0.5)
    theta, s = m.hidden.theta["body.1"].data, m.signs["body.1"]
    theta[0, 0], theta[0, 1], theta[0, 2] = -0.01, 0.03, 0.5
    m.write()
    layer = m.engine.layers["body.1"]
    weight = layer.weight.data
    assert not m.engine.mask("body.1")[0, 0] and weight[0, 0] == 0
    assert float(weight[0, 1]) == pytest.approx(0.03 * float(s[0, 1]))
    g = torch.zeros_like(weight)
    g[0, 0] = -1.0 * s[0, 0]  # ∂L/∂θ = s·∂L/∂w = -1: descent raises θ by lr = 0.1, although the weight is pruned
    dense_step(m, {"body.1": g})
    tr.global_step = 1
    m.on_step_end(tr)
    mu = prior_center(0.9, 0.5)
    assert mu < -3
    # θ = -0.01 + 0.1 (gradient) - 0.1·0.5·sign(θ - μ) = 0.04 > 0: the connection grows back as w = s·θ
    assert float(theta[0, 0]) == pytest.approx(0.04)
    assert m.engine.mask("body.1")[0, 0] and float(weight[0, 0]) == pytest.approx(0.04 * float(s[0, 0]))
    # no gradient: the prior alone pulls θ = 0.03 to -0.02: dormant
    assert float(theta[0, 1]) == pytest.approx(-0.02) and not m.engine.mask("body.1")[0, 1]
    assert float(theta[0, 2]) == pytest.approx(0.45)


def test_grad_r_controller_sets_alpha_for_the_reference():
    m, tr = setup("grad_r", fc(), target_density=0.25, control_horizon=0.1)  # 40 steps: K = 4, end 30
    assert m.reference(0) == 1.0 and m.reference(30) == pytest.approx(0.25)
    assert m.reference(15) == pytest.approx(1 - cubic_sparsity(15, 0, 0.75, 0, 30))
    theta = torch.cat([t.detach().flatten() for t in m.hidden.theta.values()])
    keep = round(m.reference(14) * theta.numel())
    v = float(theta.kthvalue(theta.numel() - keep).values)
    # the prior alone moves θ by η·α per step: α = v/(K·η) leaves the reference's count above 0 after K steps
    assert m.control(10, 0.01) == pytest.approx(v / (4 * 0.01))
    assert abs(int((theta - 4 * 0.01 * m.control(10, 0.01) > 0).sum()) - keep) <= 1  # (rounding at the boundary)
    with torch.no_grad():
        for t in m.hidden.theta.values():
            t.sub_(1.0)  # everything dormant: below the reference, only the gradient acts
    assert m.control(10, 0.01) == m.cfg.alpha_min


# =============================================================================================== STDS
def test_stds_sine_inc_and_straight_through_gradient():
    assert sine_inc(0) == pytest.approx(0) and sine_inc(1) == pytest.approx(1) and sine_inc(0.5) == pytest.approx(0.5)
    assert sine_inc(0.25) == pytest.approx((1 - math.sqrt(0.5)) / 2)
    assert sine_inc(0.75) == pytest.approx((1 + math.sqrt(0.5)) / 2)
    m, tr = setup("stds", fc(), target_density=None, flat_width=0.2, epochs=1, steps=10)  # N = 10
    theta = m.hidden.theta["body.1"]
    with torch.no_grad():
        theta[0, :4] = torch.tensor([0.05, 0.5, -0.5, 0.02])
    before = theta.detach().clone()
    layer = m.engine.layers["body.1"]
    g = torch.zeros_like(layer.weight)
    g[0, 0], g[0, 3] = -1.0, -0.3
    dense_step(m, {"body.1": g})
    tr.global_step = 5
    m.on_step_end(tr)
    assert m.threshold == pytest.approx(0.1)  # d = 0.2 · sineInc(5/10)
    # straight-through: every θ moved by -lr·∂L/∂w, masked or not
    assert torch.allclose(theta.detach(), before - 0.1 * g)
    w, mk = layer.weight.detach(), m.engine.mask("body.1")
    assert w[0, :4].tolist() == pytest.approx([0.05, 0.4, -0.4, 0.0])  # sign(θ)·max(|θ| - d, 0)
    assert mk[0, :4].tolist() == [True, True, True, False]  # θ = 0.15, 0.5, -0.5, 0.05 against d = 0.1
    assert torch.equal(mk, theta.detach().abs() > 0.1)


def test_stds_target_density_sets_the_flat_width():
    m, tr = setup("stds", fc(), target_density=0.3, epochs=1, steps=10)
    dense_step(m, {})
    tr.global_step = 10  # t = N: d = D
    m.on_step_end(tr)
    assert m.engine.density() == pytest.approx(0.3, abs=1e-3)


# =============================================================================================== ADMM
def test_admm_projection_dual_update_gradient_and_hard_prune():
    w = torch.tensor([[0.3, -0.9, 0.1], [0.05, -0.2, 0.6]])
    assert torch.equal(project(w, 0.5), torch.tensor([[0.3, -0.9, 0.0], [0.0, 0.0, 0.6]]))
    m, tr = setup("admm", fc(), target_density=0.25, rho=0.1, prune_epoch=3)
    m.on_train_start(tr)
    for n, layer in m.engine.layers.items():
        k = round(0.25 * layer.weight.numel())
        assert int((m.Z[n] != 0).sum()) == k and not m.U[n].any()
        assert torch.equal(m.Z[n], project(layer.weight.detach(), 0.25))
    dense_step(m, {})  # the W-step gradient gets ρ(W - Z + U)
    for n, layer in m.engine.layers.items():
        assert torch.allclose(layer.weight.grad, 0.1 * (layer.weight.detach() - m.Z[n]))
    with torch.no_grad():
        for layer in m.engine.layers.values():
            layer.weight.mul_(1.5).add_(0.01)
    W = {n: layer.weight.detach().clone() for n, layer in m.engine.layers.items()}
    U0 = {n: u.clone() for n, u in m.U.items()}
    m.on_epoch_end(tr, {})  # Z = Proj(W + U), U += W - Z
    for n in W:
        assert torch.equal(m.Z[n], project(W[n] + U0[n], 0.25))
        assert torch.allclose(m.U[n], U0[n] + W[n] - m.Z[n])
        assert int((m.Z[n] != 0).sum()) == round(0.25 * W[n].numel())
    for e in (1, 2):
        tr.epoch = e
        m.on_epoch_end(tr, {})
    assert m.pruned and not m.Z
    for n in m.engine.layers:  # exactly k per layer, the largest |w|
        mk, a = m.engine.mask(n), W[n].abs()
        assert int(mk.sum()) == round(0.25 * a.numel()) and a[mk].min() >= a[~mk].max()
    dense_step(m, {})
    assert all(not layer.weight.grad.any() for layer in m.engine.layers.values())  # no ADMM term after pruning


def test_admm_activity_regulariser_is_lambda_spikes_per_sample():
    x = torch.rand(4, 1, 8, 8)
    lam = 0.01

    def grads(with_method: bool) -> list[torch.Tensor]:
        model = fc()
        model.train()
        spikes: list[torch.Tensor] = []
        if with_method:
            setup("admm", model, activity=lam)
        else:
            from spikeprune.neurons import is_neuron

            for mod in model.modules():
                if is_neuron(mod):
                    mod.register_forward_hook(lambda mod, i, o: spikes.append(o))
        out = model(x)
        loss = out.mean() + (lam * sum(s.sum() for s in spikes) / 4 if spikes else 0)
        loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    for a, b in zip(grads(True), grads(False)):
        assert torch.allclose(a, b, atol=1e-7)


# ================================================================================================ UPR
def test_upr_temperature_schedule():
    assert upr_temperature(0, 100) == pytest.approx(5.0)
    assert upr_temperature(100, 100) == pytest.approx(1000.0)
    assert upr_temperature(50, 100) == pytest.approx(math.sqrt(5.0 * 1000.0))
    assert upr_temperature(300, 100) == pytest.approx(1000.0)


def test_upr_soft_masks_in_search_hard_masks_after():
    m, tr = setup("upr", fc(), target_density=None, lmbda=1e-3, epochs=2, search_epochs=1)
    assert m.neurons == ["body.3", "body.5"]
    assert m.cost_w["body.1"] == 1.0 and m.cost_n["body.3"] == 24.0 and m.cost_n["body.5"] == 10.0
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for t in [*m.theta_w.values(), *m.theta_n.values()]:
            t.copy_(torch.randn(t.shape, generator=g) * 0.1)
    m.tau = 7.0
    layer, x = m.engine.layers["body.1"], torch.rand(3, 64)
    w = layer.weight
    soft = F.linear(x, w * torch.sigmoid(7.0 * m.theta_w["body.1"]))
    assert torch.allclose(layer(x), soft)
    assert layer.weight is w and isinstance(layer._parameters["weight"], nn.Parameter)  # put back after the call
    neuron, u = m.modules["body.3"], torch.rand(4, 3, 32) * 3
    neuron.eval()
    plain = neuron.__class__.forward(neuron, u)
    assert torch.allclose(neuron(u), plain * torch.sigmoid(7.0 * m.theta_n["body.3"]))
    tr.epoch = 0
    m.on_epoch_end(tr, {})  # the search ends
    assert not m.searching and m.delta == (0.0, 0.0)
    for n, t in m.theta_w.items():
        assert torch.equal(m.engine.mask(n), t > 0)
    for n, t in m.theta_n.items():
        assert torch.equal(m.engine.unit_mask(n), t > 0)
    assert torch.allclose(layer(x), F.linear(x, w * (m.theta_w["body.1"] > 0)))  # hooks gone: hard masks only
    assert torch.allclose(neuron(u), plain * (m.theta_n["body.3"] > 0))


def test_upr_penalty_gradient_and_target_offset():
    m, tr = setup("upr", fc(), target_density=0.2, lmbda=1e-3, epochs=2, search_epochs=1)
    with torch.no_grad():
        for t in [*m.theta_w.values(), *m.theta_n.values()]:
            t.copy_(torch.randn(t.shape) * 0.1)
    before = {n: t.detach().clone() for n, t in m.theta_w.items()}
    tr.global_step = 1
    m.on_step_end(tr)  # no task gradient: the penalty alone lowers every θ (Adam's first step: -lr)
    for n, t in m.theta_w.items():
        assert torch.allclose(t.detach(), before[n] - 1e-3, atol=1e-6)
    with torch.no_grad():
        m.theta_n["body.3"][:20] = -1.0  # 20 of 32 units off: their rows and columns leave with them
    m.finish_search()  # common offsets put the folded hard masks exactly at the target
    assert m.engine.density() == pytest.approx(0.2, abs=2e-3) and m.delta[0] < 0 < m.delta[1]
    for n, t in m.theta_w.items():
        assert torch.equal(m.engine.mask(n), t > 0)
    for n, t in m.theta_n.items():
        assert torch.equal(m.engine.unit_mask(n), t > 0)


# ============================================================================================ configs
@pytest.mark.parametrize("name,field,value", [
    ("magnitude", "target_density", 0.0), ("magnitude", "schedule", "linear"), ("magnitude", "scope", "neuron"),
    ("magnitude", "end", 1.5), ("magnitude", "update_every", 0), ("lth", "rate", 1.0), ("lth", "rewind_epoch", -1),
    ("set", "fraction", 1.5), ("set", "init", "random"), ("rigl", "end", 0.0), ("rigl", "grow", "best"),
    ("eslsnn", "momentum", 1.0), ("deep_r", "eps", 0.0), ("deep_r", "temperature", -1.0),
    ("grad_r", "target_density", 0.6), ("grad_r", "alpha", 0.0), ("grad_r", "control_horizon", 0.0),
    ("stds", "flat_width", -1.0), ("stds", "schedule", "cosine"), ("admm", "rho", -1.0), ("admm", "activity", -1.0),
    ("upr", "temp_final", 1.0), ("upr", "mask_lr", 0.0), ("upr", "search_epochs", 0)])
def test_invalid_baseline_config_names_the_field(name, field, value):
    with pytest.raises(ConfigError, match=f"'method.{field}'"):
        method_config({"name": name, field: value})


# ===================================================================== requested density, end to end
def trainer_cfg(tmp_path, method: str, epochs: int):
    return load_config(None, [
        "data.name=synthetic", "data.options={n: 64, in_shape: [1, 8, 8]}", "data.batch_size=16",
        "model.name=fc3", "model.options={hidden: [32, 24], image_size: 8}",
        "model.neuron={type: lif, v_threshold: 0.2}",
        f"train.epochs={epochs}", "train.lr=0.01", "train.progress=false", "train.device=cpu",
        "measure.max_batches=1", f"out_dir={tmp_path}", f"method={method}"])


TARGETS = {  # id: method spec (4 epochs of 4 steps)
    "magnitude_cubic_25": "{name: magnitude, target_density: 0.25, update_every: 1}",
    "magnitude_oneshot_global_10": "{name: magnitude, target_density: 0.1, schedule: oneshot, scope: global}",
    "lth_50": "{name: lth, target_density: 0.5, rewind_epoch: 0}",
    "set_25": "{name: set, target_density: 0.25}",
    "rigl_25": "{name: rigl, target_density: 0.25, update_every: 2}",
    "eslsnn_10": "{name: eslsnn, target_density: 0.1, update_every: 2}",
    "deep_r_10": "{name: deep_r, target_density: 0.1}",
    "grad_r_25": "{name: grad_r, target_density: 0.25}",
    "stds_10": "{name: stds, target_density: 0.1}",
    "admm_25": "{name: admm, target_density: 0.25}",
    "upr_10": "{name: upr, target_density: 0.1}",
}


@pytest.mark.parametrize("spec", TARGETS.values(), ids=TARGETS.keys())
def test_reaches_requested_density(tmp_path, spec):
    cfg = trainer_cfg(tmp_path, spec, 4)
    tr = Trainer(cfg, log=lambda *a, **k: None)
    tr.fit()
    res = json.loads((tmp_path / cfg.name / "results.json").read_text())
    assert res["method"] == cfg.method["name"]
    assert abs(res["connectivity"] - cfg.method["target_density"]) <= 0.02, res["connectivity"]
    assert all(torch.isfinite(p).all() for p in tr.model.parameters())


class StopAt2(Callback):
    def __init__(self, active: bool):
        self.active = active

    def on_epoch_start(self, trainer):
        if self.active and trainer.epoch == 2:
            raise KeyboardInterrupt


@pytest.mark.parametrize("spec", ["{name: upr, target_density: 0.2, search_epochs: 2}",
                                  "{name: grad_r, target_density: 0.2}",
                                  "{name: lth, target_density: 0.5, rewind_epoch: 0}"], ids=["upr", "grad_r", "lth"])
def test_resume_continues_exactly(tmp_path, spec):
    """A run stopped after epoch 2 and resumed from its checkpoint ends with the same weights and masks."""
    full = Trainer(trainer_cfg(tmp_path / "a", spec, 4), log=lambda *a, **k: None)
    full.fit()
    cfg = trainer_cfg(tmp_path / "b", spec, 4)
    with pytest.raises(KeyboardInterrupt):
        Trainer(cfg, log=lambda *a, **k: None, callbacks=[StopAt2(True)]).fit()
    resumed = Trainer(cfg, log=lambda *a, **k: None, callbacks=[StopAt2(False)])
    resumed.fit(resume=True)
    a, b = full.model.state_dict(), resumed.model.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
