"""What the bench needs from the methods: PQ rewiring that lands on its target (the last net prune capped) and
reaches it within the budget (step iterations, ``rate: budget``, ``regrow: false``), DynSNN with κ solved for the
ramped target, and LAMP (scores by hand, global ranking, every layer keeps its largest weight)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import spikeprune
from spikeprune.models import create_model
from spikeprune.sparsity.loop import LoopState
from spikeprune.sparsity.methods import create_method, method_config
from spikeprune.sparsity.methods.lamp import lamp_scores
from spikeprune.sparsity.methods.pq_rewire import allocate


def fc(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("fc3", hidden=(32, 24), image_size=8, T=2, num_classes=4,
                        neuron={"type": "lif", "v_threshold": 0.3})


def mask_density(engine) -> float:
    masks = engine.masks().values()
    return sum(int(m.sum()) for m in masks) / sum(m.numel() for m in masks)


def loop(model, pruner, opt, epochs: int, steps: int, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        for _ in range(steps):
            x, y = torch.rand(8, 1, 8, 8, generator=g) * 2, torch.randint(0, 4, (8,), generator=g)
            loss = F.cross_entropy(model(x).mean(0), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            pruner.step()
        pruner.epoch_end({"test_acc": 0.5})
    pruner.finish()


# ----------------------------------------------------------------------------------------------- PQ
def test_allocate_shares_in_proportion_under_caps():
    a = allocate(torch.tensor([1.0, 1.0, 2.0]), torch.tensor([10, 10, 10]), 8)
    assert a.tolist() == [2, 2, 4]
    a = allocate(torch.tensor([1.0, 1.0, 8.0]), torch.tensor([10, 10, 3]), 9)
    assert a.tolist() == [3, 3, 3] and int(a.sum()) == 9
    assert allocate(torch.tensor([0.0, 0.0]), torch.tensor([5, 5]), 4).tolist() == [2, 2]
    assert int(allocate(torch.tensor([1.0, 3.0]), torch.tensor([1, 1]), 9).sum()) == 2  # no more than the caps
    a = allocate(torch.tensor([1.0, 1.0, 1.0]), torch.tensor([5, 5, 5]), 7)
    assert int(a.sum()) == 7 and (a <= 5).all() and a.max() - a.min() <= 1


@pytest.mark.parametrize("scope", ["layer", "neuron"])
def test_pq_last_net_prune_lands_on_the_target_and_then_stops(scope):
    model = fc()
    m = create_method("pq_rewire", scope=scope, target_density=0.45, epochs_per_iteration=1)
    st = LoopState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=10, seed=0)
    m.setup(st)
    m.on_train_start(st)
    with torch.no_grad():  # heavy-tailed weights: the bound alone would cut ~30%, far below 45%
        for layer in m.engine.layers.values():
            layer.weight.copy_(torch.randn(layer.weight.shape) ** 3 * layer.weight_mask)
    total = sum(mk.numel() for mk in m.engine.masks().values())
    sap = sum(int(m._counts(layer.weight, m.engine.mask(n)).sum()) for n, layer in m.engine.layers.items())
    active = sum(int(mk.sum()) for mk in m.engine.masks().values())
    assert active - sap < round(0.45 * total)  # uncapped it would overshoot
    st.epoch = 0
    m.on_epoch_end(st, {})
    assert sum(int(mk.sum()) for mk in m.engine.masks().values()) == round(0.45 * total)
    assert m.history[-1]["net_pruned"] == active - round(0.45 * total)
    before = {n: mk.clone() for n, mk in m.engine.masks().items()}
    st.epoch = 1
    m.on_epoch_end(st, {})  # reached: no further net prune
    assert all(torch.equal(before[n], mk) for n, mk in m.engine.masks().items())
    assert "net_pruned" not in m.history[-1]


@pytest.mark.parametrize("target", [0.05, 0.02])
def test_pq_step_iterations_with_budget_reach_the_target_in_the_run(target):
    model = fc()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    pruner = spikeprune.prune(model, "pq_rewire", optimizer=opt, epochs=3, steps_per_epoch=8, seed=0,
                              iterations=6, end=0.75, rate="budget", target_density=target)
    m = pruner.method if hasattr(pruner, "method") else pruner
    assert m.prune_steps == [3, 6, 9, 12, 15, 18] and m.rewire_steps == {2, 5, 8, 11, 14, 17}
    loop(model, pruner, opt, 3, 8)
    assert mask_density(pruner.engine) == pytest.approx(target, abs=1 / 3000)
    assert len(m.history) == 6 and all("net_pruned" in h for h in m.history)
    assert all(h["net_pruned"] >= h["sap_count"] for h in m.history[:-1])  # budget: never less than the bound
    dens = [h["density"] for h in m.history]
    assert all(b < a for a, b in zip(dens, dens[1:]))


def test_pq_budget_is_never_below_the_bound_and_regrow_false_only_net_prunes(monkeypatch):
    model = fc()
    m = create_method("pq_rewire", iterations=4, end=1.0, rate="budget", target_density=0.45, regrow=False)
    st = LoopState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=2,
                   steps_per_epoch=4, seed=0)
    m.setup(st)
    m.on_train_start(st)
    calls = []
    real = m.rewire
    monkeypatch.setattr(m, "rewire", lambda regrow, counts=None: calls.append(regrow) or real(regrow, counts))
    for t in range(1, 9):
        st.step, st.epoch = t, (t - 1) // 4
        m.on_step_end(st)
    assert calls and not any(calls)  # net prunes only
    # the budget count is at least the SAP count
    with torch.no_grad():
        for layer in m.engine.layers.values():
            layer.weight.copy_(torch.randn(layer.weight.shape) ** 3 * layer.weight_mask)
    sap = sum(int(v.sum()) for v in {n: m._counts(layer.weight, m.engine.mask(n))
                                     for n, layer in m.engine.layers.items()}.values())
    assert sum(int(v.sum()) for v in m.net_counts(left=3).values()) >= min(sap, m._active()[0] - m.target_count())


def test_pq_new_options_validate():
    assert method_config({"name": "pq_rewire", "iterations": 20, "rate": "budget", "target_density": 0.02}).end == 0.75
    for bad in ({"iterations": 0}, {"end": 0.0}, {"rewires_per_iteration": -1}, {"rate": "budget"},
                {"iterations": 3, "select": "val_acc"}):
        with pytest.raises(Exception, match="method"):
            method_config({"name": "pq_rewire", **bad})


# ------------------------------------------------------------------------------------------- DynSNN
def set_activity(method, acts: dict[str, torch.Tensor]) -> None:
    for n, a in acts.items():
        method.monitor.sum[n] = a.clone()
        method.monitor.count[n] = 1


@pytest.mark.parametrize("target", [0.5, 0.9, 0.95])
def test_dynsnn_solved_kappa_meets_the_target_with_the_fewest_units(target):
    model = fc()
    m = create_method("dynsnn", kappa_rule="solved", target_compression=target, warmup_epochs=0, min_alive=0.0)
    st = LoopState(model=model, example_input=torch.rand(2, 1, 8, 8),
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=4, steps_per_epoch=10, seed=0)
    m.setup(st)
    g = torch.Generator().manual_seed(1)
    acts = {n: torch.rand(m.engine.unit_mask(n).numel(), generator=g) for n in m.neurons}
    set_activity(m, acts)
    m.update()
    comp = 1 - m.engine.density()
    assert comp >= target - 1e-9
    # a slightly smaller kappa misses the target: the masks are the least that meet it
    inputs = {n: (acts[n], acts[n]) for n in m.neurons}
    m._apply(inputs, m.kappa * (1 - 1e-6))
    assert 1 - m.engine.density() < target + 0.05


def test_dynsnn_solved_follows_the_ramp_and_needs_a_target():
    model = fc()
    m = create_method("dynsnn", kappa_rule="solved", target_compression=0.9, ramp_epochs=4, warmup_epochs=1,
                      min_alive=0.0, update_every=1)
    st = LoopState(model=model, example_input=torch.rand(2, 1, 8, 8),
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=6, steps_per_epoch=10, seed=0)
    m.setup(st)
    g = torch.Generator().manual_seed(2)
    set_activity(m, {n: torch.rand(m.engine.unit_mask(n).numel(), generator=g) for n in m.neurons})
    comps = []
    for epoch in (1, 2, 3, 5):
        m.progress = float(epoch)
        m.update()
        comps.append(1 - m.engine.density())
        assert comps[-1] >= m.current_target() - 1e-9
    assert comps[0] == pytest.approx(0.0, abs=0.02) and comps[-1] >= 0.9 and comps == sorted(comps)
    with pytest.raises(Exception, match="kappa_rule"):
        method_config({"name": "dynsnn", "kappa_rule": "solved"})


# --------------------------------------------------------------------------------------------- LAMP
def test_lamp_scores_by_hand():
    w = torch.tensor([[0.1, -0.5], [0.3, 2.0]])
    s = lamp_scores(w)
    # squares 0.01 0.09 0.25 4: each over the sum of itself and the larger ones
    want = torch.tensor([[0.01 / 4.35, 0.25 / 4.25], [0.09 / 4.34, 1.0]])
    assert torch.allclose(s, want, atol=1e-6)
    mask = torch.tensor([[False, True], [True, True]])
    s2 = lamp_scores(w, mask)
    assert s2[0, 0] == 0 and torch.allclose(s2[mask], torch.tensor([0.25 / 4.25, 0.09 / 4.34, 1.0]), atol=1e-6)


def test_lamp_prunes_globally_and_keeps_every_layer():
    model = fc()
    m = create_method("lamp", schedule="oneshot", prune_epoch=0, target_density=0.01)
    st = LoopState(model=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=2, seed=0)
    m.setup(st)
    with torch.no_grad():  # one layer of tiny weights: magnitude would empty it, LAMP keeps its largest
        m.engine.layers["body.6"].weight.mul_(1e-4)
    m.on_train_start(st)
    assert mask_density(m.engine) == pytest.approx(0.01, abs=1 / 3000)
    per_layer = {n: int(mk.sum()) for n, mk in m.engine.masks().items()}
    assert all(v >= 1 for v in per_layer.values())
    assert len(set(per_layer.values())) > 1  # layer-adaptive, not uniform


def test_lamp_gradual_schedule_reaches_the_target():
    model = fc()
    opt = torch.optim.Adam(model.parameters(), 1e-2)
    pruner = spikeprune.prune(model, "lamp", optimizer=opt, epochs=2, steps_per_epoch=6, seed=0,
                              target_density=0.05, update_every=2, end=0.75)
    loop(model, pruner, opt, 2, 6)
    assert mask_density(pruner.engine) == pytest.approx(0.05, abs=1 / 3000)


# ------------------------------------------------------------------------------- structured baselines
def convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model("convnet", channels=(4, 6), hidden=16, image_size=8, T=2, num_classes=4,
                        neuron={"type": "lif", "v_threshold": 0.3})


def channel_method(name: str, model: nn.Module, **options):
    m = create_method(name, **options)
    st = LoopState(model=model, example_input=torch.rand(2, 1, 8, 8),
                   optimizer=torch.optim.SGD(model.parameters(), lr=0.1), epochs=4, steps_per_epoch=3, seed=0)
    m.setup(st)
    return m, st


def test_l1_filter_keeps_the_filters_with_the_largest_l1_per_layer():
    model = convnet()
    m, st = channel_method("l1_filter", model, keep=0.5, prune_epoch=2)
    modules = dict(model.named_modules())
    want = {}
    for g in m.groups:
        (p,) = g.producers
        with torch.no_grad():
            modules[p].weight.copy_(torch.arange(g.units, dtype=torch.float32).flip(0).view(-1, 1, 1, 1)
                                    * torch.ones_like(modules[p].weight))  # filter c has L1 ∝ (C - 1 - c)
        want[g.neuron] = torch.arange(g.units) < round(0.5 * g.units)
    st.epoch = 0
    m.on_epoch_end(st, {})
    assert not m.pruned  # prunes after epoch 2, not before
    st.epoch = 1
    m.on_epoch_end(st, {})
    assert m.pruned and m.history[-1]["channels"] == 10
    for n, w in want.items():
        assert torch.equal(m.engine.unit_mask(n).cpu(), w), n
    assert m.channel_fraction() == pytest.approx(0.5)
    assert m.summary()["channel_fraction"] == pytest.approx(0.5)


def test_slimming_penalises_bn_scales_until_the_prune_then_ranks_them_globally():
    model = convnet()
    m, st = channel_method("slimming", model, keep=0.3, prune_epoch=1, l1=0.5)
    bns = list(m.norms.values())
    for bn in bns:
        bn.weight.grad = torch.zeros_like(bn.weight)
        with torch.no_grad():
            bn.weight.copy_(torch.linspace(-1, 1, bn.weight.numel()))
    st.optimizer.zero_grad(set_to_none=False)
    st.optimizer.step()  # the pre-hook adds l1 * sign(gamma) to the scale gradients
    for bn in bns:
        assert torch.equal(bn.weight.grad, 0.5 * torch.sign(bn.weight.detach()))
    with torch.no_grad():
        bns[0].weight.copy_(torch.tensor([0.9, 0.01, 0.02, 0.8]))
        bns[1].weight.copy_(torch.tensor([0.03, -0.7, 0.04, 0.05, 0.06, 0.6]))
    st.epoch = 0
    m.on_epoch_end(st, {})
    kept = torch.cat([m.engine.unit_mask(n).cpu() for n in m.neurons])
    # floor(0.3 * 10) = 3 over both layers: |gamma| 0.9, 0.8, 0.7 (global, not per layer)
    assert kept.tolist() == [True, False, False, True, False, True, False, False, False, False]
    for bn in bns:
        bn.weight.grad = torch.zeros_like(bn.weight)
    st.optimizer.step()  # no penalty after the prune
    assert all(float(bn.weight.grad.abs().sum()) == 0 for bn in bns)


def test_random_channels_are_seeded_and_compact_to_a_smaller_net():
    from spikeprune.compact import compact

    masks = []
    for _ in range(2):
        model = convnet()
        m, st = channel_method("random_channels", model, keep=0.5, prune_epoch=0)
        m.on_train_start(st)
        masks.append(torch.cat([m.engine.unit_mask(n).cpu() for n in m.neurons]))
    assert torch.equal(masks[0], masks[1]) and m.channel_fraction() == pytest.approx(0.5)
    x = torch.rand(3, 1, 8, 8)
    model.eval()
    with torch.no_grad():
        before = model(x)
    small = compact(model, x[:2])
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        torch.testing.assert_close(small(x), before)


def test_bench_compacts_structured_cells(tmp_path):
    import json

    from test_bench import TINY

    from spikeprune import bench as B
    from spikeprune.config import from_dict

    recipe = {**TINY, "model": {"name": "convnet", "T": 2, "options": {"channels": [4, 6], "hidden": 16,
                                                                        "image_size": 8},
                                "neuron": {"type": "lif", "v_threshold": 0.2}},
              "train": {**TINY["train"], "epochs": 2}}
    bench = from_dict(B.BenchConfig, {
        "name": "ch", "recipe": recipe, "out_dir": str(tmp_path / "out"), "densities": [0.5], "seeds": [0, 1],
        "dense": False, "methods": [{"name": "l1", "method": {"name": "l1_filter", "prune_epoch": 1},
                                     "target": "method.keep", "measure": "channels", "compact": True}]})
    B.run_bench(bench, tmp_path, log=lambda *a: None, header="")
    comp = json.loads((tmp_path / "out" / "runs" / "l1_d50_s0" / "compact.json").read_text())
    assert comp["dense_macs_after"] < comp["dense_macs_before"] and comp["params_after"] < comp["params_before"]
    assert comp["time_compact_s"] > 0 and comp["time_folded_s"] > 0
    md = (tmp_path / "out" / "results.md").read_text()
    assert "MACs after compact" in md and "| l1 | 50 | 2 |" in md and "✓ +0.00" in md
