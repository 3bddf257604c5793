"""measure.pooled_spikes: average-pooled spikes into a layer counted as MACs (NeuroBench) or SOPs (UPR), checked
against counts worked out by hand on a tiny net."""

import pytest
import torch
from torch import nn

from spikeprune.config import MeasureConfig
from spikeprune.layers import AvgPool2d, Flatten, Linear
from spikeprune.measure import measure
from spikeprune.schema import from_dict


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(AvgPool2d(2), Flatten(3), Linear(4, 3, bias=False))
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0],
                      [0.0, 0.0, 3.0, 1.0],
                      [4.0, 0.0, 5.0, 0.0]])  # column fan-outs: 2, 0, 3, 1; 6 non-zero weights
    with torch.no_grad():
        net[2].weight.copy_(w)
    return net


def _data():
    # T=2, B=1, one 4x4 channel of spikes; the 2x2 average pool gives per step the quadrant rates
    x = torch.zeros(2, 1, 1, 4, 4)
    x[0, 0, 0, 0, 0] = 1  # t=0: quadrant 0 (top-left) one spike   -> 0.25
    x[0, 0, 0, 2, 2] = x[0, 0, 0, 3, 3] = 1  # quadrant 3 two spikes -> 0.5
    x[1, 0, 0, 0, 2] = x[1, 0, 0, 0, 3] = x[1, 0, 0, 1, 2] = x[1, 0, 0, 1, 3] = 1  # t=1: quadrant 1 full -> 1.0
    x[1, 0, 0, 2, 0] = 1  # quadrant 2 -> 0.25
    return [(x, torch.tensor([0]))]


def test_pooled_spikes_by_hand():
    net = _net()
    mac = measure(net, _data(), layout="TB")
    sop = measure(net, _data(), layout="TB", pooled_spikes="sop")
    # MAC rule: 6 non-zero weights x 2 frames, per sample (B=1); no SOPs
    assert mac.layers[0].input == sop.layers[0].input == "pooled spikes"
    assert mac.macs == 12.0 and mac.sops == 0.0
    # SOP rule, sum of x * fan-out: t=0: 0.25*2 + 0.5*1 = 1.0; t=1: 1.0*0 + 0.25*3 = 0.75  -> 1.75
    assert sop.sops == pytest.approx(1.75) and sop.macs == 0.0
    # dense: fan-out 3 for every input: (0.25+0.5)*3 + (1.0+0.25)*3 = 6.0
    assert sop.dense_sops == pytest.approx(6.0)
    # both figures are kept, each under the other rule
    o = mac.other_rule
    assert o["pooled_spikes"] == "sop" and o["macs"] == 0.0
    assert (o["sops"], o["dense_sops"], o["energy_uj"]) == pytest.approx((1.75, 6.0, 0.9 * 1.75e-6))
    assert sop.other_rule["pooled_spikes"] == "mac" and sop.other_rule["macs"] == 12.0
    assert sop.energy_uj == pytest.approx(0.9 * 1.75e-6) and mac.energy_uj == pytest.approx(4.6 * 12e-6)
    assert mac.table().startswith("measure: pooled_spikes=mac") and "pooled_spikes=sop: eff. SOPs 2" in mac.table()
    assert sop.summary()["pooled_spikes"] == "sop" and sop.summary()["other_rule"]["macs"] == 12.0


def test_no_pooled_layer_no_second_figure():
    net = nn.Sequential(Flatten(3), Linear(16, 3, bias=False))
    r = measure(net, _data(), layout="TB", pooled_spikes="sop")
    assert r.layers[0].input == "spikes" and r.other_rule is None
    assert r.table().splitlines()[0].startswith("measure: pooled_spikes=sop")


def test_pooled_membrane_is_analog():
    # an average pool of analog values (the membrane pooled before a neuron) stays analog under both rules
    net = nn.Sequential(AvgPool2d(2), Flatten(3), Linear(4, 3, bias=False))
    x = [(torch.rand(2, 1, 1, 4, 4) + 0.1, torch.tensor([0]))]
    r = measure(net, x, layout="TB", pooled_spikes="sop")
    assert r.layers[0].input == "analog" and r.macs == 24.0 and r.other_rule is None


def test_config_field():
    assert MeasureConfig().pooled_spikes == "mac"
    assert from_dict(MeasureConfig, {"pooled_spikes": "sop"}).pooled_spikes == "sop"
    with pytest.raises(ValueError, match="pooled_spikes"):
        from_dict(MeasureConfig, {"pooled_spikes": "ops"})
    with pytest.raises(ValueError, match="pooled_spikes"):
        measure(_net(), _data(), layout="TB", pooled_spikes="ops")


def test_pooled_spikes_survive_a_copying_flatten():
    """LeNet's second pool runs channels-last, so the flatten before FC1 copies: its input is still pooled spikes."""
    from spikeprune.convert import calibrate, make_ann, to_snn

    torch.manual_seed(0)
    ann = make_ann("lenet5", image_size=16)
    x = torch.rand(8, 1, 16, 16)
    data = [(x, torch.zeros(8, dtype=torch.long))]
    snn = to_snn(ann, calibrate(ann, data, "max"), T=4)
    r = measure(snn, data, pooled_spikes="sop")
    assert [(l.name, l.input) for l in r.layers] == [
        ("body.0", "analog"), ("body.4", "pooled spikes"), ("body.8", "pooled spikes"), ("body.10", "spikes"),
        ("body.12", "spikes")]
    assert r.macs == r.layers[0].macs and r.other_rule["macs"] > r.macs


def test_results_tables_name_the_rule_and_give_both_figures():
    """Every results table (train/compare, bench, HTML report) carries the rule line; rows whose figures the other
    rule changes get those figures beside (here the hand-counted 1.75 SOPs of the test above)."""
    from spikeprune.measure import rule_note
    from spikeprune.train import summary_table

    mac = measure(_net(), _data(), layout="TB")
    plain = measure(nn.Sequential(Flatten(3), Linear(16, 3, bias=False)), _data(), layout="TB")
    rows = [dict(mac.summary(), name="pooled"), dict(plain.summary(), name="plain")]
    note = rule_note(rows)
    assert note.startswith("measure: pooled_spikes=mac (average-pooled spikes into a layer count as MACs")
    assert note.endswith("Under the other rule: pooled (pooled_spikes=sop): eff. SOPs 2, dense SOPs 6, "
                         "energy 1.575e-06 µJ")
    assert "plain" not in note
    assert rule_note([rows[1]]).endswith("so the other rule gives the same figures")
    # rows measured before the option existed carry no rule: they were counted under mac
    assert rule_note([{"name": "old"}]).startswith("measure: pooled_spikes=mac (")
    # two rules in one table are both named
    sop = dict(measure(_net(), _data(), layout="TB", pooled_spikes="sop").summary(), name="s")
    assert rule_note([rows[0], sop]).startswith("measure: pooled_spikes=mac (") and "; pooled_spikes=sop (" in \
        rule_note([rows[0], sop])
    assert "s (pooled_spikes=mac): eff. SOPs 0" in rule_note([rows[0], sop])
    table = summary_table(rows).splitlines()
    assert table[0] == note and table[1] == "" and table[2].startswith("| run | method |")
