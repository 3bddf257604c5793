"""ANN->SNN conversion and DynSNN on converted networks (spikeprune.convert): BN folding, hand-computed calibration,
rates approaching normalised activations, conversion accuracy, chunked evaluation, fading-unit masks and the
reported compression, max-pool refusal, the `convert` command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from spikeprune.compact import compact
from spikeprune.convert import (
    ConversionIF,
    ConvertedSNN,
    _fading_masks,
    accuracy_vs_T,
    calibrate,
    dynsnn_convert,
    evaluate_ann,
    firing_rates,
    fold_bn,
    load_convert_config,
    make_ann,
    snn_to_ann,
    to_snn,
    train_ann,
)
from spikeprune.data import FastLoader, build_loaders
from spikeprune.measure import measure


def batches(x: torch.Tensor, y: torch.Tensor | None = None, size: int = 16):
    y = torch.zeros(len(x), dtype=torch.long) if y is None else y
    return [(x[i:i + size], y[i:i + size]) for i in range(0, len(x), size)]


def tiny_mlp(seed: int = 0, hidden=(32, 24)) -> nn.Sequential:
    torch.manual_seed(seed)
    ann = make_ann("fc3", hidden=hidden, image_size=8)
    for m in ann.modules():  # fc3 has no biases: give it some (conversion must handle them)
        if isinstance(m, nn.Linear):
            m.bias = nn.Parameter(torch.empty(m.out_features).uniform_(-0.05, 0.15))
    return ann.eval()


@pytest.fixture(scope="module")
def trained():
    """A tiny MLP trained on the synthetic set (8x8), its loaders and its accuracy."""
    torch.manual_seed(0)
    tr, _, te, _ = build_loaders("synthetic", batch_size=32, eval_batch_size=128, in_shape=(1, 8, 8), n=512,
                                 seed=0)
    ann = make_ann("fc3", hidden=(48, 32), image_size=8)
    acc = train_ann(ann, tr, te, epochs=4, lr=3e-3, log=None)
    return ann, tr, te, acc


# ------------------------------------------------------------------------------------------------- the ANN
def test_make_ann_mirrors_lenet5():
    ann = make_ann("lenet5")
    kinds = [type(m).__name__ for m in ann]
    assert kinds == ["Conv2d", "ReLU", "AvgPool2d", "Conv2d", "ReLU", "AvgPool2d", "Flatten", "Linear", "ReLU",
                     "Linear", "ReLU", "Linear"]
    assert all(type(m).__module__.startswith("torch.nn") for m in ann)
    assert ann(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_maxpool_is_refused_with_the_layer_named():
    with pytest.raises(ValueError, match=r"convnet: layer body\.\d+ \(MaxPool2d\) is a max-pool"):
        make_ann("convnet", channels=(4, 6), hidden=16, image_size=8)
    ann = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(2 * 3 * 3, 2))
    ann.in_shape = (1, 8, 8)
    with pytest.raises(ValueError, match="max-pool"):
        to_snn(ann, [1.0], T=4)


def test_spiking_readout_is_refused():
    with pytest.raises(ValueError, match="non-spiking read-out"):
        make_ann("fc2")


@pytest.mark.parametrize("conv", [True, False])
def test_fold_bn_keeps_outputs(conv):
    torch.manual_seed(1)
    if conv:
        ann = make_ann("lenet5", bn=True, image_size=28)
        x = torch.randn(8, 1, 28, 28)
    else:
        ann = nn.Sequential(nn.Linear(10, 16, bias=False), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4),
                            nn.BatchNorm1d(4, affine=False))
        x = torch.randn(8, 10)
    with torch.no_grad():
        for m in ann.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                m.running_mean.uniform_(-1, 1)
                m.running_var.uniform_(0.2, 3)
                if m.affine:
                    m.weight.uniform_(0.5, 2)
                    m.bias.uniform_(-0.5, 0.5)
    ann.eval()
    folded = fold_bn(ann)
    assert not any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)) for m in folded.modules())
    with torch.no_grad():
        torch.testing.assert_close(folded(x), ann(x), atol=1e-5, rtol=0)


def test_fold_bn_needs_a_preceding_layer():
    with pytest.raises(ValueError, match="does not follow"):
        fold_bn(nn.Sequential(nn.BatchNorm1d(3), nn.Linear(3, 2)))


# --------------------------------------------------------------------------------------------- calibration
def hand_net() -> nn.Sequential:
    """x -> [x0, 2·x1 - 1] -> ReLU -> [a0 + a1, a0 - a1] -> ReLU -> read-out."""
    ann = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2, bias=False), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        ann[0].weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        ann[0].bias.copy_(torch.tensor([0.0, -1.0]))
        ann[2].weight.copy_(torch.tensor([[1.0, 1.0], [1.0, -1.0]]))
    ann.in_shape = (2,)
    return ann


HAND_X = torch.tensor([[1.0, 0.5], [0.2, 3.0], [-1.0, 1.0]])
# layer 1: ReLU([x0, 2x1-1]) = [[1, 0], [0.2, 5], [0, 1]]      -> max 5,   positives {0.2, 1, 1, 5}
# layer 2: ReLU([a0+a1, a0-a1]) = [[1, 1], [5.2, 0], [1, 0]]   -> max 5.2, positives {1, 1, 1, 5.2}


@pytest.mark.parametrize("method,pct,expected", [("max", 99.9, [5.0, 5.2]), ("percentile", 50, [1.0, 1.0]),
                                                 ("percentile", 75, [2.0, 2.05]), ("percentile", 100, [5.0, 5.2])])
def test_calibration_hand_computed(method, pct, expected):
    lam = calibrate(hand_net(), batches(HAND_X, size=2), method, pct)  # two batches: the max spans both
    assert list(lam) == ["1", "3"]
    assert list(lam.values()) == pytest.approx(expected)


def test_calibration_dead_layer_and_errors():
    ann = hand_net()
    with torch.no_grad():
        ann[2].weight.fill_(-1.0)  # layer 2 never activates on positive layer-1 outputs
    assert calibrate(ann, batches(HAND_X), "max")["3"] == 1.0
    with pytest.raises(ValueError, match="method"):
        calibrate(ann, batches(HAND_X), "mean")
    with pytest.raises(ValueError, match="empty"):
        calibrate(ann, [], "max")


def test_threshold_balancing_of_the_hand_net():
    snn = to_snn(hand_net(), {"1": 5.0, "3": 5.2}, T=4)
    ifs = [m for m in snn.modules() if isinstance(m, ConversionIF)]
    assert [m.v_threshold for m in ifs] == pytest.approx([5.0, 5.2 / 5.0])
    assert snn.body[0].bias.tolist() == pytest.approx([0.0, -1.0])  # λ_0 = 1
    torch.testing.assert_close(snn.body[0].weight, hand_net()[0].weight)  # weights untouched
    assert float(snn.output_scale) == pytest.approx(5.2)
    assert snn(HAND_X).shape == (4, 3, 2)


# --------------------------------------------------------------------------------------- the converted SNN
def spike_rates_per_sample(snn: ConvertedSNN, x: torch.Tensor, T: int) -> list[torch.Tensor]:
    """Per-sample, per-neuron firing rates ``[B, N]`` of every IF layer at ``T`` steps."""
    out = []
    ifs = [m for m in snn.modules() if isinstance(m, ConversionIF)]
    obs = [lambda mod, s, v: out.append(s.mean(0).flatten(1))]
    for m in ifs:
        m.observers += obs
    snn.set_T(T)
    with torch.no_grad():
        snn(x)
    for m in ifs:
        m.observers.remove(obs[0])
    return out


def test_rates_approach_normalised_activations():
    ann = tiny_mlp()
    x = torch.rand(64, 1, 8, 8)
    lam = calibrate(ann, batches(x), "percentile", 99.0)  # some activations exceed λ: rates clip at 1
    acts = []
    hooks = [m.register_forward_hook(lambda mod, i, o: acts.append(o.flatten(1))) for m in ann if
             isinstance(m, nn.ReLU)]
    with torch.no_grad():
        ann(x)
    for h in hooks:
        h.remove()
    target = [(a / v).clamp(0, 1) for a, v in zip(acts, lam.values())]
    snn = to_snn(ann, lam, T=16)
    err = {T: [float((r - t).abs().mean()) for r, t in zip(spike_rates_per_sample(snn, x, T), target)]
           for T in (16, 256)}
    for layer in range(len(target)):
        assert err[256][layer] < err[16][layer]
        assert err[256][layer] < 0.01
    assert err[256][0] <= 0.5 / 256 + 1e-6  # constant input: |rate - a/λ| <= 0.5/T with v_init = 0.5


def test_accuracy_vs_T_matches_separate_runs():
    ann = tiny_mlp(seed=3)
    x = torch.rand(40, 1, 8, 8)
    lam = calibrate(ann, batches(x), "max")
    snn = to_snn(ann, lam, T=8)
    with torch.no_grad():
        y = ann(x).argmax(-1)
        y[::3] = (y[::3] + 1) % 10  # not all correct
        loader = batches(x, y, size=16)
        got = accuracy_vs_T(snn, loader, Ts=(3, 8, 13), chunk=5)  # chunk boundaries inside the checkpoints
        for T in (3, 8, 13):
            snn.set_T(T)
            pred = torch.cat([snn(xb).sum(0).argmax(-1) for xb, _ in loader])
            assert got[T] == pytest.approx(float((pred == y).float().mean()))
    assert snn.T == 13 and all(m.v is None for m in snn.modules() if isinstance(m, ConversionIF))


def test_converted_mlp_reaches_ann_accuracy(trained):
    ann, tr, te, ann_acc = trained
    assert ann_acc > 0.8
    calib = FastLoader(tr.dataset.subset(torch.arange(256)), 128)
    snn = to_snn(ann, calibrate(ann, calib, "percentile", 99.9), T=32)
    acc = accuracy_vs_T(snn, te, Ts=(8, 128))
    assert acc[128] >= ann_acc - 0.02
    # and the SNN agrees with the ANN sample by sample
    x = torch.cat([b[0] for b in te])
    with torch.no_grad():
        snn.set_T(128)
        agree = float((snn(x).mean(0).argmax(-1) == ann(x).argmax(-1)).float().mean())
    assert agree >= 0.97


def test_converted_snn_works_with_measure_and_compaction(trained):
    ann, tr, te, _ = trained
    snn = to_snn(ann, calibrate(ann, tr, "max", max_batches=2), T=16)
    m = measure(snn, te, max_batches=1)
    assert m.connectivity == 1.0 and [s.name for s in m.spiking] == snn.if_neurons()
    assert 0 < m.firing_rate < 1
    assert [layer.input for layer in m.layers] == ["analog", "spikes", "spikes"]


# ------------------------------------------------------------------------------------------------- DynSNN
def test_dynsnn_masks_lowest_rate_units_and_reports_compression(trained):
    ann, tr, te, _ = trained
    calib = FastLoader(tr.dataset.subset(torch.arange(128)), 64)
    snn = to_snn(ann, calibrate(ann, calib, "max"), T=32)
    rates = firing_rates(snn, calib, T=32)
    res = dynsnn_convert(snn, calib, kappa=0.5, T=32, rebalance=False)
    dead_any = False
    for n, r in rates.items():
        alive = res.engine.unit_mask(n)
        torch.testing.assert_close(alive, r >= 0.5 * r.mean())  # exactly the fading units
        if (~alive).any():
            dead_any = True
            assert r[~alive].max() < r[alive].min()
    assert dead_any
    # compression = 1 - density of the effective weights = 1 - measure's connectivity = hand count
    a1, a2 = (int(res.engine.unit_mask(n).sum()) for n in snn.if_neurons())
    kept = a1 * 64 + a2 * a1 + 10 * a2
    total = 48 * 64 + 32 * 48 + 10 * 32
    assert res.compression == pytest.approx(1 - kept / total)
    assert res.compression == pytest.approx(1 - res.engine.density())
    assert res.compression == pytest.approx(1 - measure(snn, te, max_batches=1).connectivity)
    assert res.units_removed == pytest.approx(1 - (a1 + a2) / (48 + 32))
    assert res.silent == {n: int((r == 0).sum()) for n, r in rates.items()}
    # masked spikes are silenced; the compacted network gives the same outputs
    x = next(iter(te))[0][:8]
    small = compact(snn, x[:2])
    with torch.no_grad():
        torch.testing.assert_close(small(x), snn(x), atol=1e-5, rtol=1e-5)
    assert small.body[-3].out_features == a2


def test_dynsnn_target_compression_and_rebalance(trained):
    ann, tr, te, _ = trained
    calib = FastLoader(tr.dataset.subset(torch.arange(128)), 64)
    snn = to_snn(ann, calibrate(ann, calib, "percentile", 99.9), T=32, calibration={"method": "percentile",
                                                                                    "percentile": 99.9})
    rates = firing_rates(snn, calib, T=32)
    res = dynsnn_convert(snn, calib, target_compression=0.5, T=32)
    assert res.compression >= 0.5
    # κ is (nearly) the smallest that reaches the target
    lower = _fading_masks(rates, res.kappa * 0.999, 0.02)
    kept = {n: int(m.sum()) for n, m in lower.items()}
    a1, a2 = kept.values()
    assert 1 - (a1 * 64 + a2 * a1 + 10 * a2) / (48 * 64 + 32 * 48 + 10 * 32) < 0.5
    # thresholds re-balanced from the masked network
    expected = calibrate(snn_to_ann(snn), calib, "percentile", 99.9)
    assert res.lambdas_after == pytest.approx(list(expected.values()))
    ifs = [m for m in snn.modules() if isinstance(m, ConversionIF)]
    assert ifs[1].v_threshold == pytest.approx(res.lambdas_after[1] / res.lambdas_after[0])
    # the re-balanced SNN still approximates the masked ANN
    masked_ann = snn_to_ann(snn)
    acc = accuracy_vs_T(snn, te, Ts=(128,))[128]
    assert acc >= evaluate_ann(masked_ann, te) - 0.05


def test_snn_to_ann_roundtrip(trained):
    ann, tr, _, _ = trained
    lam = calibrate(ann, tr, "max", max_batches=2)
    back = snn_to_ann(to_snn(ann, lam, T=4))
    x = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(back(x), ann(x), atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------------------------------- the command
def test_convert_command_writes_the_table_and_plot(tmp_path, capsys):
    from spikeprune.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "name: tiny\nout_dir: " + json.dumps(str(tmp_path)) + "\n"
        "model: {name: fc3, options: {hidden: [32, 16]}}\n"
        "data: {name: synthetic, batch_size: 32, eval_batch_size: 128, options: {n: 256, in_shape: [1, 8, 8]}}\n"
        "ann: {epochs: 2, lr: 0.003}\n"
        "conversion: {calib_samples: 128, Ts: [4, 16]}\n"
        "dynsnn: {T: 16, target_compression: 0.3, calib_samples: 64}\n")
    assert main(["convert", "--config", str(cfg)]) == 0
    rd = tmp_path / "tiny"
    for f in ("accuracy_vs_T.md", "accuracy_vs_T.csv", "accuracy_vs_T.png", "results.json", "ann.pt"):
        assert (rd / f).is_file(), f
    res = json.loads((rd / "results.json").read_text())
    assert set(res["snn_accuracy"]) == {"4", "16"}
    assert res["dynsnn"]["compression"] >= 0.3
    assert res["dynsnn"]["measure_compression"] == pytest.approx(res["dynsnn"]["compression"])
    assert "reusing" not in capsys.readouterr().out
    assert main(["convert", "--config", str(cfg), "--set", "dynsnn.enabled=false", "--overwrite"]) == 0
    assert "reusing the ANN" in capsys.readouterr().out  # same ANN settings: not trained again
    csv_rows = (rd / "accuracy_vs_T.csv").read_text().splitlines()
    assert csv_rows[0].startswith("T,ann_acc,snn_acc") and len(csv_rows) == 3


def test_convert_config_is_strict(tmp_path):
    from spikeprune.config import ConfigError

    cfg = load_convert_config(Path(__file__).parents[1] / "configs" / "convert" / "fmnist_lenet5.yaml")
    assert cfg.model.name == "lenet5" and cfg.conversion.percentile == pytest.approx(99.9)
    with pytest.raises(ConfigError, match="conversion.percentile"):
        load_convert_config(None, ["conversion.percentile=120"])
    with pytest.raises(ConfigError, match="unknown config key 'dynsnn.kapa'"):
        load_convert_config(None, ["dynsnn.kapa=0.1"])


def test_percentile_matches_numpy_definition():
    x = torch.rand(50, 2) * 3 - 1
    ann = nn.Sequential(nn.Linear(2, 2), nn.ReLU(), nn.Linear(2, 2))
    with torch.no_grad():
        ann[0].weight.copy_(torch.eye(2))
        ann[0].bias.zero_()
    lam = calibrate(ann, batches(x, size=7), "percentile", 90)
    pos = x[x > 0].numpy()
    assert lam["1"] == pytest.approx(float(np.percentile(pos, 90)), rel=1e-6)


def test_activity_penalties_make_units_fade():
    tr, _, _, _ = build_loaders("synthetic", batch_size=32, in_shape=(1, 8, 8), n=256, seed=0)
    x = torch.cat([b[0] for b in tr])

    def hidden(**kw):
        torch.manual_seed(0)
        ann = make_ann("fc3", hidden=(32, 16), image_size=8)
        train_ann(ann, tr, None, epochs=3, lr=3e-3, log=None, **kw)
        with torch.no_grad():
            return ann[:3](x)  # first hidden layer (after ReLU)

    def hoyer(a):
        r = a.square().mean(0).sqrt()
        return float(r.sum() / (r.numel() ** 0.5 * r.norm()))

    plain = hidden()
    assert float(hidden(activity_l1=0.5).mean()) < 0.5 * float(plain.mean())
    concentrated = hidden(unit_hoyer=1.0, penalty_layers=[0])
    assert hoyer(concentrated) < 0.8 * hoyer(plain)
    assert int((concentrated.amax(0) == 0).sum()) > int((plain.amax(0) == 0).sum())  # more silent units
    with pytest.raises(ValueError, match="activity_l1"):
        train_ann(make_ann("fc3", hidden=(8, 8), image_size=8), tr, epochs=1, activity_l1=-1, log=None)
    with pytest.raises(ValueError, match="penalty_layers"):
        train_ann(make_ann("fc3", hidden=(8, 8), image_size=8), tr, epochs=1, unit_hoyer=1, penalty_layers=[2],
                  log=None)


def test_dynsnn_compensation_moves_the_mean_drive_into_biases(trained):
    ann, tr, te, _ = trained
    calib = FastLoader(tr.dataset.subset(torch.arange(128)), 64)
    snn = to_snn(ann, calibrate(ann, calib, "max"), T=32)
    rates = firing_rates(snn, calib, T=32)
    assert snn.get_submodule("body.4").bias is None  # fc3 has no biases: compensation adds them
    w = {n: snn.get_submodule(n).weight.detach().clone() for n in ("body.4", "body.6")}
    res = dynsnn_convert(snn, calib, kappa=0.5, T=32, rebalance=False, compensate=True)
    # a Linear consumer's input is its producer's spikes: the mean input of a column is that unit's rate
    for neuron, consumer in (("body.3", "body.4"), ("body.5", "body.6")):
        dead = ~res.engine.unit_mask(neuron)
        assert dead.any()
        want = w[consumer][:, dead] @ rates[neuron][dead]
        torch.testing.assert_close(snn.get_submodule(consumer).bias.detach(), want, atol=1e-5, rtol=1e-5)
