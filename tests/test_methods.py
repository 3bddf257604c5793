"""The three core methods, mechanism by mechanism: DynSNN (fading-unit masks), PQ-index rewiring and SCA
(channel activity with gate-gradient regrowth), plus their config validation. Most tests drive a method with a
minimal fake trainer and hand-set statistics; one short ``Trainer`` run on synthetic data per method checks
the wiring."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import conv, liven, x8
from torch import nn

from spikeprune.config import ConfigError, load_config
from spikeprune.models import create_model
from spikeprune.sparsity.loop import LoopState
from spikeprune.sparsity.masks import erk_densities, init_masks, scope_view
from spikeprune.sparsity.methods import create_method, list_methods, method_config
from spikeprune.sparsity.scores import pq_index, sap_prune_count
from spikeprune.train import Trainer


# --------------------------------------------------------------------------------------------- helpers
def fc(**kw) -> nn.Module:
    return create_model("fc3", hidden=(32, 24), image_size=8, **kw)




def fake_trainer(model: nn.Module, epochs: int = 10, example: bool = True, val: bool = False, opt=None):
    """The loop state a method is driven by, filled by hand (``tr.logs`` collects its messages)."""
    opt = opt if opt is not None else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    logs: list[str] = []
    st = LoopState(model=model, example_input=x8(2) if example else None, optimizer=opt, epochs=epochs, seed=0,
                   validation=val, log=lambda *a, **k: logs.append(" ".join(map(str, a))))
    st.logs = logs
    return st


def setup(name: str, model: nn.Module, **options):
    method = create_method(name, **options)
    tr = fake_trainer(model)
    method.setup(tr)
    return method, tr


def set_activity(method, acts: dict[str, list[float]], count: int = 1) -> None:
    """Hand-set the monitor: ``values()`` then returns ``acts`` (EMA or running mean alike)."""
    for n, a in acts.items():
        t = torch.tensor(a, dtype=torch.float32)
        method.monitor.sum[n] = t * (count if method.monitor.ema is None else 1)
        method.monitor.count[n] = count


def trainer_cfg(tmp_path, method: str, epochs: int, model: str = "fc3", extra=()) -> object:
    opts = "{hidden: [32, 24], image_size: 8}" if model == "fc3" else "{channels: [4, 6], hidden: 16, image_size: 8}"
    return load_config(None, [
        "data.name=synthetic", "data.options={n: 32, in_shape: [1, 8, 8]}", "data.batch_size=16",
        f"model.name={model}", f"model.options={opts}", "model.neuron={type: lif, v_threshold: 0.2}",
        f"train.epochs={epochs}", "train.lr=0.01", "train.progress=false", "train.device=cpu",
        "measure.max_batches=1", f"out_dir={tmp_path}", f"method={method}", *extra])


def hand_compression(alive3: int, alive5: int) -> float:
    """fc3 (64-32-24-10): a dead unit removes its fan-in row and fan-out column."""
    nz = alive3 * 64 + alive5 * alive3 + 10 * alive5
    return 1 - nz / (32 * 64 + 24 * 32 + 10 * 24)


# ============================================================================================ DynSNN
A3 = [(i + 1) / 100 for i in range(32)]  # mean 0.165
A5 = [0.0] * 4 + [1.0] * 20  # mean 20/24


def test_dynsnn_masks_units_below_kappa_mean():
    m, tr = setup("dynsnn", fc(), kappa=0.5, warmup_epochs=0, update_every=1, min_alive=0.0)
    assert m.neurons == ["body.3", "body.5"]
    set_activity(m, {"body.3": A3, "body.5": A5})
    m.update()
    # θ = 0.5 * 0.165 = 0.0825: units with activity 0.01..0.08 (8 of them) are masked
    want3 = torch.tensor(A3) >= 0.0825
    assert torch.equal(m.engine.unit_mask("body.3"), want3) and int(want3.sum()) == 24
    # θ = 0.5 * 20/24 = 0.4167: the four silent units are masked
    assert m.engine.unit_mask("body.5").tolist() == [False] * 4 + [True] * 20
    assert m.compression == pytest.approx(hand_compression(24, 20), abs=1e-12)


def test_dynsnn_revives_a_unit_whose_activity_rises():
    m, tr = setup("dynsnn", fc(), kappa=0.5, warmup_epochs=0, update_every=1, min_alive=0.0)
    set_activity(m, {"body.3": A3, "body.5": A5})
    m.update()
    assert not m.engine.unit_mask("body.3")[0]
    a = torch.tensor(A3)
    a[0] = 0.5  # the masked unit kept integrating behind its mask and now fires a lot
    set_activity(m, {"body.3": a.tolist()})
    m.update()
    # θ = 0.5 * mean(alive: units 8..31, 0.09..0.32) = 0.5 * 0.205 = 0.1025
    want = a >= 0.1025
    assert torch.equal(m.engine.unit_mask("body.3"), want)
    assert want[0] and not want[8] and not want[9] and want[10]


def test_dynsnn_percentile_threshold_and_min_alive():
    m, _ = setup("dynsnn", fc(), threshold="percentile", percentile=25.0, warmup_epochs=0, min_alive=0.0)
    set_activity(m, {"body.3": A3})
    m.update()
    # torch.quantile at 0.25 of 0.01..0.32: position 7.75 -> 0.0875; units 0.01..0.08 are below
    assert int((~m.engine.unit_mask("body.3")).sum()) == 8
    m, _ = setup("dynsnn", fc(), kappa=0.5, warmup_epochs=0, min_alive=0.5)
    a = [100.0] + [i / 1000 for i in range(31)]
    set_activity(m, {"body.3": a})
    m.update()
    # θ ≈ 1.57 leaves one unit; the floor ceil(0.5 * 32) = 16 keeps the 16 most active instead
    mask = m.engine.unit_mask("body.3")
    assert int(mask.sum()) == 16 and mask[0] and mask[17:].all() and not mask[1:17].any()


def test_dynsnn_schedule_warmup_update_every_and_freeze():
    m, tr = setup("dynsnn", fc(), kappa=0.5, warmup_epochs=1, update_every=2, freeze_epoch=2, min_alive=0.0)
    set_activity(m, {"body.3": A3, "body.5": A5})
    tr.epoch, tr.global_step = 0, 2  # warm-up: no update
    m.on_step_end(tr)
    assert m.engine.unit_mask("body.3").all()
    tr.epoch, tr.global_step = 1, 3  # not a multiple of update_every
    m.on_step_end(tr)
    assert m.engine.unit_mask("body.3").all()
    tr.global_step = 4
    m.on_step_end(tr)
    frozen3 = m.engine.unit_mask("body.3").clone()
    assert int(frozen3.sum()) == 24
    # from freeze_epoch on the masks do not change, whatever the activity
    set_activity(m, {"body.3": [1.0] * 32, "body.5": [1.0] + [0.0] * 23})
    for step in (6, 8, 10):
        tr.epoch, tr.global_step = 2 + step // 8, step
        m.on_step_end(tr)
        assert torch.equal(m.engine.unit_mask("body.3"), frozen3)
    tr.epoch = 1  # (before the freeze it would have changed)
    m.on_step_end(tr)
    assert m.engine.unit_mask("body.3").all()


@pytest.mark.parametrize("target", [0.9, 0.0])
def test_dynsnn_kappa_moves_towards_target(target):
    m, _ = setup("dynsnn", fc(), kappa=0.5, kappa_lr=2.0, target_compression=target, warmup_epochs=0,
                 min_alive=0.0)
    set_activity(m, {"body.3": A3, "body.5": A5})
    m.update()
    c = hand_compression(24, 20)  # ≈ 0.36
    assert m.compression == pytest.approx(c, abs=1e-12)
    assert m.kappa == pytest.approx(0.5 * math.exp(2.0 * (target - c)))
    assert (m.kappa > 0.5) if target > c else (m.kappa < 0.5)


def test_dynsnn_controller_reaches_target_compression():
    m, _ = setup("dynsnn", fc(), kappa=0.2, kappa_lr=1.0, target_compression=0.5, warmup_epochs=0,
                 min_alive=0.0)
    g = torch.Generator().manual_seed(0)
    set_activity(m, {"body.3": torch.rand(32, generator=g).tolist(), "body.5": torch.rand(24, generator=g).tolist()})
    comps = []
    for _ in range(40):
        m.update()
        comps.append(m.compression)
    assert comps[0] < 0.3
    assert abs(comps[-1] - 0.5) < 0.1


def test_dynsnn_reported_compression_is_one_minus_effective_density():
    m, tr = setup("dynsnn", fc(), kappa=0.5, warmup_epochs=0, min_alive=0.0)
    set_activity(m, {"body.3": A3, "body.5": A5})
    m.update()
    met = m.epoch_metrics(tr)
    eff = m.engine.effective_weights()
    nz = sum(int((eff[n] != 0).sum()) for n in m.engine.layers)
    total = sum(eff[n].numel() for n in m.engine.layers)
    assert met["compression"] == pytest.approx(1 - nz / total, abs=1e-12)
    assert met["compression"] == pytest.approx(hand_compression(24, 20), abs=1e-12)
    assert met["units_alive"] == 44 and met["units"] == 56
    st = m.state_dict()
    m2, _ = setup("dynsnn", fc())
    m2.load_state_dict(st)
    assert m2.kappa == m.kappa
    torch.testing.assert_close(m2.monitor.values()["body.3"], torch.tensor(A3))


def test_dynsnn_trainer_run(tmp_path):
    cfg = trainer_cfg(tmp_path, "{name: dynsnn, kappa: 0.8, update_every: 1, warmup_epochs: 0, min_alive: 0.0}", 2)
    tr = Trainer(cfg, log=lambda *a, **k: None)
    tr.fit()
    m = tr.method
    assert len(tr.history) == 2
    acts = m.monitor.values()
    assert set(acts) == {"body.3", "body.5"}  # gathered from real forwards
    for h in tr.history:
        assert h["compression"] == pytest.approx(1 - h["density"], abs=1e-12)
    eff = m.engine.effective_weights()
    nz = sum(int((eff[n] != 0).sum()) for n in m.engine.layers)
    assert tr.history[-1]["density"] == pytest.approx(nz / sum(eff[n].numel() for n in m.engine.layers))
    assert tr.history[-1]["units_alive"] < tr.history[-1]["units"]


# ========================================================================================= pq_rewire
def small_layer_method(scope: str):
    """One Linear(8 -> 2): row 0 active at columns 0..5, row 1 at 0..3; hand weights and momentum."""
    model = nn.Sequential(nn.Linear(8, 2, bias=False))
    m = create_method("pq_rewire", scope=scope, eta=0.0)
    tr = fake_trainer(model, example=False)
    m.setup(tr)
    w = torch.zeros(2, 8)
    w[0, :6] = torch.tensor([0.1, 5.0, -4.0, 0.2, 3.0, 6.0])
    w[1, :4] = torch.tensor([7.0, -0.3, 8.0, 9.0])
    with torch.no_grad():
        model[0].weight.copy_(w)
    mask = w != 0
    m.engine.set_mask("0", mask)
    mom = torch.full((2, 8), 50.0)  # large momentum at active places must not matter
    mom[0, 6:] = torch.tensor([0.5, -0.9])
    mom[1, 4:] = torch.tensor([0.1, -2.0, 0.05, 1.5])
    m.momentum.buf["0"] = mom
    return m, model[0], mask


def test_pq_rewire_regrow_layer_scope_exact_indices():
    m, layer, mask = small_layer_method("layer")
    # PQ index of the 10 active magnitudes is 0.222 -> r = ceil(10 * 0.778) = 8 -> k = 2
    assert m._counts(layer.weight, m.engine.mask("0")).tolist() == [2]
    w0 = layer.weight.detach().clone()
    out = m.rewire(regrow=True)
    assert out == {"pruned": 2, "regrown": 2}
    new = m.engine.mask("0")
    assert int(new.sum()) == int(mask.sum())
    dropped = (mask & ~new).nonzero().tolist()
    grown = (new & ~mask).nonzero().tolist()
    assert dropped == [[0, 0], [0, 3]]  # |w| = 0.1 and 0.2, the smallest active ones
    assert grown == [[1, 5], [1, 7]]  # |momentum| = 2.0 and 1.5, the largest inactive ones
    assert torch.all(layer.weight[~new] == 0) and torch.all(layer.weight[new & ~mask] == 0)
    keep = mask & new
    assert torch.equal(layer.weight.detach()[keep], w0[keep])


def test_pq_rewire_regrow_neuron_scope_exact_indices():
    m, layer, mask = small_layer_method("neuron")
    # row 0: I = 0.232 -> r = ceil(6 * 0.768) = 5 -> k = 1; row 1: I = 0.163 -> r = ceil(3.35) = 4 -> k = 0
    assert m._counts(layer.weight, m.engine.mask("0")).tolist() == [1, 0]
    m.rewire(regrow=True)
    new = m.engine.mask("0")
    assert (mask & ~new).nonzero().tolist() == [[0, 0]]
    assert (new & ~mask).nonzero().tolist() == [[0, 7]]  # the larger |momentum| of row 0's inactive places
    assert new.sum(1).tolist() == mask.sum(1).tolist()


def test_pq_rewire_regrow_keeps_counts_in_dense_and_nearly_dense_layers():
    model = fc()
    m, tr = setup("pq_rewire", model)
    g = torch.Generator().manual_seed(0)
    init_masks(m.engine, "uniform", 0.95, g)  # fewer inactive places than the rewiring count
    full = torch.ones_like(m.engine.mask("body.6"))
    m.engine.set_mask("body.6", full)  # dense, as ERK leaves small layers
    for n, layer in m.engine.layers.items():
        m.momentum.buf[n] = torch.randn(layer.weight.shape, generator=g)
    before = {n: int(m.engine.mask(n).sum()) for n in m.engine.layers}
    ks = {n: int(m._counts(layer.weight, m.engine.mask(n)).sum()) for n, layer in m.engine.layers.items()}
    inactive = {n: layer.weight.numel() - before[n] for n, layer in m.engine.layers.items()}
    assert any(ks[n] > inactive[n] for n in ks)  # the case that needs the fallback
    m.rewire(regrow=True)
    assert {n: int(m.engine.mask(n).sum()) for n in m.engine.layers} == before
    assert m.engine.mask("body.6").all()


@pytest.mark.parametrize("scope", ["layer", "neuron"])
def test_pq_rewire_net_prune_counts(scope):
    torch.manual_seed(0)
    model = fc()
    m, tr = setup("pq_rewire", model, scope=scope)
    m.on_train_start(tr)
    with torch.no_grad():  # heavy-tailed weights: sizeable PQ indices
        for layer in m.engine.layers.values():
            layer.weight.copy_(torch.randn(layer.weight.shape) ** 3 * layer.weight_mask)
    want, before = {}, {}
    for n, layer in m.engine.layers.items():
        mv = scope_view(m.engine.mask(n), scope)
        idx = pq_index(scope_view(layer.weight, scope), mask=mv, dim=1)
        want[n] = sap_prune_count(mv.sum(1), idx, 0.001, 1.0, 0.9)
        before[n] = (mv.clone(), scope_view(layer.weight.detach().abs().clone(), scope))
    out = m.rewire(regrow=False)
    assert out["regrown"] == 0 and out["pruned"] == sum(int(k.sum()) for k in want.values()) > 0
    for n in m.engine.layers:
        mv0, a = before[n]
        mv1 = scope_view(m.engine.mask(n), scope)
        assert not (mv1 & ~mv0).any()
        assert torch.equal(mv0.sum(1) - mv1.sum(1), want[n])
        dropped = mv0 & ~mv1
        for r in range(mv0.shape[0]):  # the dropped ones are the smallest active magnitudes of the scope
            if dropped[r].any() and mv1[r].any():
                assert a[r][dropped[r]].max() <= a[r][mv1[r]].min()


def test_pq_rewire_erk_init_at_half_density():
    m, tr = setup("pq_rewire", conv())
    m.on_train_start(tr)
    shapes = {n: tuple(layer.weight.shape) for n, layer in m.engine.layers.items()}
    dens = erk_densities(shapes, 0.5)
    for n, s in shapes.items():
        assert int(m.engine.mask(n).sum()) == round(dens[n] * math.prod(s))
    total = sum(math.prod(s) for s in shapes.values())
    ones = sum(int(m.engine.mask(n).sum()) for n in shapes)
    assert abs(ones / total - 0.5) <= len(shapes) / total
    assert m.engine.density() == pytest.approx(ones / total)  # live weights are non-zero
    assert max(dens.values()) == 1.0  # the small first conv is kept dense


def test_pq_rewire_schedule(monkeypatch):
    m, tr = setup("pq_rewire", fc(), epochs_per_iteration=3, epoch_frequency=1)
    m.on_train_start(tr)
    calls = []
    monkeypatch.setattr(m, "rewire", lambda regrow: calls.append((tr.epoch, regrow)) or {})
    tr.epochs = 7
    for e in range(7):
        tr.epoch = e
        m.on_epoch_end(tr, {"test_acc": 0.1 * e})
    # epochs 1, 2 of each iteration rewire; the 3rd records and net-prunes; the last epoch changes nothing
    assert calls == [(0, True), (1, True), (2, False), (3, True), (4, True), (5, False)]
    assert [h["epoch"] for h in m.history] == [3, 6] and [h["iteration"] for h in m.history] == [1, 2]
    assert m.history[1]["test_acc"] == pytest.approx(0.5)


def test_pq_rewire_select_val_acc_restores_best_iteration():
    model = fc()
    m = create_method("pq_rewire", epochs_per_iteration=1, select="val_acc")
    with pytest.raises(ConfigError, match="method.select"):
        m.setup(fake_trainer(model))
    tr = fake_trainer(model, epochs=4, val=True)
    m.setup(tr)
    m.on_train_start(tr)
    snaps = []
    for e, acc in enumerate([0.5, 0.9, 0.7, 0.6]):
        tr.epoch = e
        snaps.append({n: mk.clone() for n, mk in m.engine.masks().items()})
        m.on_epoch_end(tr, {"val_acc": acc, "test_acc": acc})
    assert [h.get("best", False) for h in m.history] == [True, True, False, False]
    assert sum(int(mk.sum()) for mk in m.engine.masks().values()) < sum(int(mk.sum()) for mk in snaps[1].values())
    m.on_train_end(tr)
    for n, mk in m.engine.masks().items():
        assert torch.equal(mk, snaps[1][n])
    assert any("restored iteration 2" in line for line in tr.logs)


def test_pq_rewire_trainer_run(tmp_path):
    method = "{name: pq_rewire, epochs_per_iteration: 2, target_density: 0.4}"
    tr = Trainer(trainer_cfg(tmp_path, method, 8), log=lambda *a, **k: None)
    tr.fit()
    hist = tr.method.history
    assert len(hist) == 4 and [h["iteration"] for h in hist] == [1, 2, 3, 4]
    assert [h["epoch"] for h in hist] == [2, 4, 6, 8]
    dens = [h["density"] for h in hist]
    assert dens[0] == pytest.approx(0.5, abs=0.01)
    reached = next(i for i, d in enumerate(dens) if d <= 0.4)
    assert all(dens[i + 1] < dens[i] for i in range(reached))  # net pruning every iteration ...
    assert 0 < reached < len(dens) - 1
    masks = sum(int(mk.sum()) for mk in tr.method.engine.masks().values())
    total = sum(mk.numel() for mk in tr.method.engine.masks().values())
    for d in dens[reached + 1:]:  # ... and none once the target is reached (rewiring keeps the count)
        assert d == pytest.approx(dens[reached], abs=0.01)
    assert masks / total == pytest.approx(dens[reached], abs=0.01)
    assert tr.method.trajectory().count("->") == 3


# =============================================================================================== SCA
ACT3 = [0.9, 0.1, 0.5, 0.05]
ACT7 = [0.3, 0.8, 0.02, 0.6, 0.01, 0.2]


def sca(model=None, **options):
    options = {"min_channels": 1, "l1": 0.0, **options}
    return setup("sca", model if model is not None else liven(conv()), **options)


def test_sca_keep_and_regrow_by_gate_gradient():
    m, tr = sca(keep=0.4, regrow=0.2)
    assert m.neurons == ["body.4", "body.8"]  # conv channels only (body.11 follows a Linear)
    set_activity(m, {"body.4": ACT3, "body.8": ACT7}, count=3)
    m.engine.unit_grad = {"body.4": torch.tensor([5.0, 0.0, 9.0, 0.4]),
                          "body.8": torch.tensor([0.1, 100.0, 0.7, 3.0, 0.0, 0.2])}
    rec = m.update()
    # global ranking by activity, keep ⌊0.4 * 10⌋ = 4: 3:0 (.9), 7:1 (.8), 7:3 (.6), 3:2 (.5)
    # regrow ⌊0.2 * 10⌋ = 2 among the rest by |dL/dg|: 7:2 (.7), 3:3 (.4)
    assert m.engine.unit_mask("body.4").tolist() == [True, False, True, True]
    assert m.engine.unit_mask("body.8").tolist() == [False, True, True, True, False, False]
    assert rec == {"channels_kept": 6, "channels": 10} and m.history == [rec]
    assert m.monitor.values() == {} and m.engine.unit_grad == {}  # statistics restart after an update
    assert m.channel_fraction() == pytest.approx(0.6)


def test_sca_regrows_only_channels_with_gradient():
    m, _ = sca(keep=0.4, regrow=0.2)
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.engine.unit_grad = {"body.4": torch.tensor([1.0, 0.0, 1.0, 0.0]),
                          "body.8": torch.tensor([0.0, 1.0, 0.0, 1.0, 0.0, 0.3])}
    m.update()
    assert m.engine.unit_mask("body.4").tolist() == [True, False, True, False]
    assert m.engine.unit_mask("body.8").tolist() == [False, True, False, True, False, True]  # only 7:5 regrown


def test_sca_masks_are_recomputed_so_channels_return():
    m, _ = sca(keep=0.4, regrow=0.0)
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.update()
    assert not m.engine.unit_mask("body.8")[0]
    set_activity(m, {"body.4": ACT3, "body.8": [2.0] + ACT7[1:]})
    m.update()
    assert m.engine.unit_mask("body.8")[0]  # back
    assert m.engine.unit_mask("body.4").tolist() == [True, False, False, False]


def test_sca_masked_channels_emit_no_spikes():
    m, tr = sca(keep=0.4, regrow=0.0)
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.update()
    seen = {}
    model = tr.model
    model.body[5].register_forward_pre_hook(lambda mod, i: seen.__setitem__("body.4", i[0]))  # conv2 reads LIF1
    model.body[9].register_forward_pre_hook(lambda mod, i: seen.__setitem__("body.8", i[0]))  # flatten reads LIF2
    model.train()
    model(x8(8))
    for n in m.neurons:
        um = m.engine.unit_mask(n)
        s = seen[n]
        assert torch.all(s[:, :, ~um] == 0)
        assert s[:, :, um].sum() > 0
    # the monitor still saw the masked channels' would-be activity
    acts = m.monitor.values()
    assert acts["body.4"][1] > 0 or acts["body.4"][3] > 0


def test_sca_min_channels():
    m, _ = sca(keep=0.1, regrow=0.0, min_channels=2)
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.update()
    # only 3:0 survives the global ranking; each layer is topped up with its 2 most active channels
    assert m.engine.unit_mask("body.4").tolist() == [True, False, True, False]
    assert m.engine.unit_mask("body.8").tolist() == [False, True, False, True, False, False]
    m, _ = sca(keep=0.1, regrow=0.0, min_channels=5)
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.update()
    assert m.engine.unit_mask("body.4").all() and int(m.engine.unit_mask("body.8").sum()) == 5


def test_sca_counts_are_exact_floors():
    m, _ = sca(conv((40, 60)), keep=0.29, regrow=0.57)
    g = torch.Generator().manual_seed(0)
    a = torch.randperm(100, generator=g).float() / 100
    set_activity(m, {"body.4": a[:40].tolist(), "body.8": a[40:].tolist()})
    m.engine.unit_grad = {"body.4": torch.rand(40, generator=g) + 0.1, "body.8": torch.rand(60, generator=g) + 0.1}
    rec = m.update()
    assert rec["channels_kept"] == 29 + 57  # ⌊0.29 * 100⌋ + ⌊0.57 * 100⌋ (floats give 28.99.. and 56.99..)
    kept = torch.cat([m.engine.unit_mask("body.4"), m.engine.unit_mask("body.8")])
    assert kept[a >= 0.71].all()  # the 29 most active


def test_sca_schedule_start_and_freeze():
    m, tr = sca(start_epoch=2, freeze_epoch=4)
    tr.epochs = 6
    updated = []
    for e in range(6):
        tr.epoch = e
        m.on_epoch_start(tr)
        set_activity(m, {"body.4": ACT3, "body.8": ACT7})
        n = len(m.history)
        m.on_epoch_end(tr, {})
        updated.append(len(m.history) > n)
    # 1-based start_epoch 2 -> from index 1; frozen from 1-based epoch 4 (index 3) on
    assert updated == [False, True, True, False, False, False]


def test_sca_l1_on_conv_gradients_only():
    m, tr = sca(l1=0.01)
    for p in tr.model.parameters():
        p.grad = torch.zeros_like(p)
    m.engine.before_step()
    for n, layer in m.engine.layers.items():
        if n in ("body.0", "body.5"):
            torch.testing.assert_close(layer.weight.grad, 0.01 * torch.sign(layer.weight.detach()))
        else:
            assert torch.all(layer.weight.grad == 0)


def test_sca_needs_conv_channels():
    with pytest.raises(ValueError, match="no prunable conv"):
        setup("sca", fc())


def test_sca_trainer_run(tmp_path):
    cfg = trainer_cfg(tmp_path, "{name: sca, keep: 0.4, regrow: 0.1, min_channels: 1}", 3, model="convnet")
    tr = Trainer(cfg, log=lambda *a, **k: None)
    tr.fit()
    m = tr.method
    assert len(m.history) == 2  # after epochs 1 and 2, not after the last
    assert all(h["channels"] == 10 and 4 <= h["channels_kept"] <= 5 for h in m.history)
    assert tr.history[-1]["channels_kept"] == pytest.approx(m.channel_fraction())


# ========================================================================================== configs
BAD = [
    ("dynsnn", "beta", 1.0), ("dynsnn", "beta", -0.1), ("dynsnn", "beta", "high"), ("dynsnn", "kappa", 0.0),
    ("dynsnn", "kappa", -1), ("dynsnn", "threshold", "median"), ("dynsnn", "percentile", 0),
    ("dynsnn", "percentile", 100.0), ("dynsnn", "target_compression", 1.0), ("dynsnn", "target_compression", -0.1),
    ("dynsnn", "target_compression", "a"), ("dynsnn", "kappa_lr", -1.0), ("dynsnn", "update_every", 0),
    ("dynsnn", "update_every", 1.5), ("dynsnn", "warmup_epochs", -1), ("dynsnn", "freeze_epoch", -1),
    ("dynsnn", "freeze_epoch", "3"), ("dynsnn", "min_alive", 1.5), ("dynsnn", "min_alive", -0.1),
    ("dynsnn", "kapa", 0.2), ("dynsnn", "ignored_layers", "body.1"), ("dynsnn", "prune_first", "yes"),
    ("pq_rewire", "scope", "global"), ("pq_rewire", "p", 0.0), ("pq_rewire", "p", -1.0), ("pq_rewire", "q", 0.5),
    ("pq_rewire", "q", 0.3), ("pq_rewire", "q", "one"), ("pq_rewire", "eta", -0.1), ("pq_rewire", "gamma", 0.0),
    ("pq_rewire", "beta", 0.0), ("pq_rewire", "beta", 1.0), ("pq_rewire", "init", "random"),
    ("pq_rewire", "init_density", 0.0), ("pq_rewire", "init_density", 1.5),
    ("pq_rewire", "epochs_per_iteration", 0), ("pq_rewire", "epoch_frequency", 0), ("pq_rewire", "momentum", 1.0),
    ("pq_rewire", "momentum", -0.1), ("pq_rewire", "target_density", 0.0), ("pq_rewire", "target_density", 1.0),
    ("pq_rewire", "select", "best"), ("pq_rewire", "alpha", 1.0), ("pq_rewire", "prune_last", 1),
    ("sca", "activity", "spikes"), ("sca", "keep", 0.0), ("sca", "keep", 1.1), ("sca", "regrow", -0.1),
    ("sca", "regrow", 0.7), ("sca", "start_epoch", -1), ("sca", "freeze_epoch", -2), ("sca", "l1", -1e-5),
    ("sca", "min_channels", 0), ("sca", "min_channels", 2.0), ("sca", "gamma", 1.0),
    ("sca", "ignored_layers", [1]),
]


@pytest.mark.parametrize("name,field,value", BAD)
def test_invalid_method_config_names_the_field(name, field, value):
    with pytest.raises(ConfigError) as e:
        method_config({"name": name, field: value})
    key = f"method.{field}"
    assert f"'{key}'" in str(e.value) or f"'{key}[0]'" in str(e.value), str(e.value)


def test_method_config_names_and_valid_edges():
    assert set(list_methods()) >= {"dynsnn", "pq_rewire", "sca"}
    for spec in ({"name": "nope"}, {}):
        with pytest.raises(ConfigError, match="'method.name'"):
            method_config(spec)
    assert method_config({"name": "sca", "keep": 0.9, "regrow": 0.1}).regrow == 0.1  # 1 - 0.9 < 0.1 in floats
    assert method_config({"name": "pq_rewire", "p": 1, "q": 2}).q == 2.0
    assert method_config({"name": "dynsnn", "freeze_epoch": 0, "kappa_lr": 0}).freeze_epoch == 0
    assert create_method("dynsnn", kappa=0.3).cfg.kappa == 0.3
    assert create_method({"name": "sca", "keep": 0.5}).cfg.keep == 0.5


def test_dynsnn_target_ramps_cubically_after_warmup():
    m, _ = setup("dynsnn", fc(), target_compression=0.6, ramp_epochs=4, warmup_epochs=1)
    # target(p) = 0.6 * (1 - (1 - p)^3), p = (progress - warmup) / ramp
    for progress, want in [(0.5, 0.0), (1.0, 0.0), (2.0, 0.6 * (1 - 0.75 ** 3)), (3.0, 0.6 * (1 - 0.5 ** 3)),
                           (5.0, 0.6), (9.0, 0.6)]:
        m.progress = progress
        assert m.current_target() == pytest.approx(want, abs=1e-12)
    m2, _ = setup("dynsnn", fc(), target_compression=0.6)  # no ramp: the final target at once
    assert m2.current_target() == 0.6


def test_dynsnn_reference_all_ignores_which_units_are_alive():
    m, _ = setup("dynsnn", fc(), kappa=1.0, reference="all", warmup_epochs=0, min_alive=0.0)
    a3 = [float(i) for i in range(32)]  # mean 15.5 -> units 16..31 stay
    set_activity(m, {"body.3": a3, "body.5": [1.0] * 24})
    m.update()
    assert m.engine.unit_mask("body.3").tolist() == [i >= 15.5 for i in range(32)]
    m.update()  # with reference "alive" the mean would now be 23.5 and more units would go; with "all" nothing moves
    assert int(m.engine.unit_mask("body.3").sum()) == 16


def test_pq_rewire_momentum_runs_over_the_window_before_each_regrowth():
    # β = 0.5: a window of 25 steps (0.5^25 < 2^-24); 40 steps per epoch, 3 epochs per iteration: epochs 0 and 1 end
    # with a regrowth, epoch 2 with the net prune (no momentum read). At each regrowth the windowed average equals
    # the average over every step within float32 rounding, and no step outside a window pays for it.
    from spikeprune.sparsity.scores import GradientMomentum

    class Recording(GradientMomentum):
        def __call__(self, name, layer, grad):
            steps.add((tr.epoch, tr.step_in_epoch))
            super().__call__(name, layer, grad)

    model = conv()
    m, tr = setup("pq_rewire", model, momentum=0.5)
    assert m.window == 25
    steps: set = set()
    m.momentum = Recording(0.5)
    full = GradientMomentum(0.5)
    m.engine.dense_grad_hooks.append(full)
    tr.steps_per_epoch = 40
    g = torch.Generator().manual_seed(0)
    for epoch in range(3):
        tr.epoch = epoch
        for i in range(40):
            tr.step_in_epoch = i
            for layer in m.engine.layers.values():
                layer.weight.grad = torch.randn(layer.weight.shape, generator=g) * (1 + 0.1 * i)
            m.engine.before_step()
        if epoch < 2:
            assert {s for s in steps if s[0] == epoch} == {(epoch, i) for i in range(15, 40)}
            for n in m.engine.layers:
                torch.testing.assert_close(m.momentum.buf[n], full.buf[n], rtol=1e-6, atol=1e-6)
    assert not any(s[0] == 2 for s in steps)
    # a loop that does not tell its epoch length: every step
    tr.steps_per_epoch = None
    tr.epoch, tr.step_in_epoch = 2, 0
    m.engine.before_step()
    assert (2, 0) in steps
