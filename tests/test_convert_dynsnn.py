"""DynSNN on converted networks without an activity penalty (convert ``dynsnn.when: train``): the ANN's units and
the weights tied to them, fading masks found while the ANN fine-tunes (κ bisected to a ramped target), folding
them into the ANN, unit masks on the converted SNN (the compression ``measure`` reports), and the recipe end to end
on synthetic data. Tiny nets only."""

from __future__ import annotations

import json

import pytest
import torch

from spikeprune.convert import calibrate, load_convert_config, make_ann, to_snn
from spikeprune.convert.dynsnn import (
    FadingUnits,
    _fading_masks,
    ann_units,
    fold_fading,
    mask_converted,
    train_ann_fading,
)
from spikeprune.data import build_loaders
from spikeprune.measure import measure
from spikeprune.schema import ConfigError


def lenet(seed=0):
    torch.manual_seed(seed)
    return make_ann("lenet5", image_size=16)  # 6C5(p2)-AP2-16C5-AP2-FC120-FC84-FC10 on 16x16: 16·2·2 features


def test_ann_units_of_lenet5():
    ann = lenet()
    units = ann_units(ann)
    assert [(u.relu, u.units, u.producer, u.consumer, u.span) for u in units] == [
        (1, 6, 0, 3, 1), (4, 16, 3, 7, 4), (8, 120, 7, 9, 1), (10, 84, 9, 11, 1)]


def test_compression_counts_rows_and_columns_by_hand():
    ann = lenet()
    f = FadingUnits(ann)
    masks = {k: torch.ones_like(m) for k, m in f.masks.items()}
    masks[4] = torch.tensor([True] * 8 + [False] * 8)  # half of conv2's channels
    masks[8] = torch.tensor([True] * 60 + [False] * 60)  # half of FC120
    total = 150 + 2400 + 64 * 120 + 120 * 84 + 840
    live = 150 + 1200 + 32 * 60 + 60 * 84 + 840  # conv2 rows, FC1 rows and columns, FC2 columns
    assert f.compression(masks) == pytest.approx(1 - live / total)
    f.remove()


def test_fold_fading_keeps_the_gated_outputs():
    ann = lenet()
    f = FadingUnits(ann)
    f.masks[4][[1, 5, 9]] = False
    f.masks[8][::3] = False
    x = torch.rand(3, 1, 16, 16)
    ann.eval()
    with torch.no_grad():
        gated = ann(x)
    f.remove()
    fold_fading(ann, f.masks)
    with torch.no_grad():
        torch.testing.assert_close(ann(x), gated)
    with torch.no_grad():
        assert float(ann[3].weight[[1, 5, 9]].abs().sum()) == 0 and float(ann[3].bias[[1, 5, 9]].abs().sum()) == 0


def test_update_bisects_kappa_to_the_target():
    ann = lenet()
    f = FadingUnits(ann, exclude=[1])
    g = torch.Generator().manual_seed(0)
    for k in f.ema:
        f.ema[k] = torch.rand(f.ema[k].shape, generator=g)
    comp = f.update(0.5)
    assert comp >= 0.5
    assert f.compression(_fading_masks(f.ema, f.kappa * 0.999, 0.02)) < 0.5  # the smallest such κ
    assert f.masks[1].all() if 1 in f.masks else 1 not in f.masks  # excluded
    f.remove()


def test_train_ann_fading_reaches_the_target_and_freezes():
    torch.manual_seed(0)
    tr, _, te, _ = build_loaders("synthetic", batch_size=32, eval_batch_size=128, in_shape=(1, 16, 16), n=256, seed=0)
    ann = lenet()
    res = train_ann_fading(ann, tr, epochs=2, target_compression=0.6, lr=1e-3, ramp=0.5, update_every=2, log=None)
    assert res.compression >= 0.6
    steps = 2 * len(tr)
    assert res.history[-1]["step"] == -(-steps // 2)  # the last update ends the ramp; then masks are frozen
    assert [h["target"] for h in res.history] == sorted(h["target"] for h in res.history)
    dead = ~res.masks[4]
    assert float(ann[3].weight.detach()[dead].abs().sum()) == 0  # folded
    lam = calibrate(ann, tr, "max", max_batches=2)
    snn = to_snn(ann, lam, T=8)
    engine, comp = mask_converted(snn, [res.masks.get(u.relu) for u in ann_units(ann)])
    assert comp == pytest.approx(res.compression)
    m = measure(snn, te, max_batches=1)
    assert 1 - m.connectivity == pytest.approx(comp)


def test_config_options():
    cfg = load_convert_config(None, ["dynsnn.when=train", "dynsnn.finetune_epochs=3", "measure_pooled_spikes=sop"])
    assert cfg.dynsnn.when == "train" and cfg.dynsnn.finetune_epochs == 3 and cfg.measure_pooled_spikes == "sop"
    with pytest.raises(ConfigError, match="dynsnn.when"):
        load_convert_config(None, ["dynsnn.when=later"])
    with pytest.raises(ConfigError, match="dynsnn.target_compression"):
        load_convert_config(None, ["dynsnn.when=train", "dynsnn.target_compression=null"])
    with pytest.raises(ConfigError, match="dynsnn.ramp"):
        load_convert_config(None, ["dynsnn.ramp=0"])


def test_convert_command_with_dynsnn_while_training(tmp_path):
    from spikeprune.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        "name: tiny\nout_dir: " + json.dumps(str(tmp_path)) + "\n"
        "model: {name: lenet5}\n"
        "data: {name: synthetic, batch_size: 32, eval_batch_size: 128, options: {n: 256, in_shape: [1, 16, 16]}}\n"
        "ann: {epochs: 1, lr: 0.003}\n"
        "conversion: {calib_samples: 128, Ts: [8]}\n"
        "dynsnn: {T: 8, target_compression: 0.5, when: train, finetune_epochs: 1, update_every: 2, exclude: [body.2]}\n"
        "measure_pooled_spikes: sop\n")
    assert main(["convert", "--config", str(cfg)]) == 0
    res = json.loads((tmp_path / "tiny" / "results.json").read_text())
    d = res["dynsnn"]
    assert d["when"] == "train" and d["compression"] >= 0.5
    assert d["measure_compression"] == pytest.approx(d["compression"])
    assert "body.2" not in d["alive"] and set(d["alive"]) == {"body.5", "body.9", "body.11"}  # body.2 excluded
    assert d["measure"]["pooled_spikes"] == "sop" and "other_rule" in d["measure"]  # LeNet pools spikes
    md = (tmp_path / "tiny" / "dynsnn_measure.md").read_text()
    assert "measure: pooled_spikes=sop" in md
