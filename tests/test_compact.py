"""Compaction: the physically smaller model computes what the masked model computes."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from spikeprune.compact import compact, compact_report, timed_inference
from spikeprune.graph import SYNAPTIC
from spikeprune.measure import measure
from spikeprune.models import create_model
from spikeprune.neurons import is_neuron
from spikeprune.sparsity.masks import MaskEngine

TOL = 1e-5


def liven(model: nn.Module, gain: float = 6.0, seed: int = 0) -> nn.Module:
    """Re-draw weights large enough that every layer spikes, and give BatchNorms non-trivial statistics
    (so a wrong slice of them shows in the outputs)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SYNAPTIC):
                m.weight.copy_(torch.randn(m.weight.shape, generator=g) * gain / math.sqrt(m.weight[0].numel()))
                if m.bias is not None:
                    m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            elif isinstance(m, nn.modules.batchnorm._BatchNorm):
                for t, lo, hi in ((m.weight, .5, 1.5), (m.bias, 0, .5), (m.running_mean, -.2, .2),
                                  (m.running_var, .5, 1.5)):
                    t.copy_(lo + (hi - lo) * torch.rand(t.shape, generator=g))
    return model.eval()


def mask_model(model: nn.Module, x: torch.Tensor, dead: dict[str, list[int]] | None = None, frac: float = 0.5,
               density: float = 0.8, seed: int = 0) -> MaskEngine:
    """Unit masks (``dead`` units per layer, or a random ``frac`` of every prunable layer) + connection masks."""
    g = torch.Generator().manual_seed(seed)
    eng = MaskEngine(model, example_input=x[:2])
    names = eng.enable_units(list(dead) if dead is not None else None)
    for n in names:
        alive = torch.ones(eng.group(n).units, dtype=torch.bool)
        if dead is not None:
            alive[dead[n]] = False
        else:
            alive = torch.rand(alive.shape, generator=g) >= frac
            alive[0] = True
        eng.set_unit_mask(n, alive)
    for n, layer in eng.layers.items():
        if density < 1:
            eng.set_mask(n, torch.rand(layer.weight.shape, generator=g) < density)
    return eng


def spiking_rates(model: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """Mean (masked) output of every spiking layer on ``x``."""
    rates: dict[str, float] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: rates.__setitem__(n, float(o.mean())))
             for n, m in model.named_modules() if is_neuron(m)]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return rates


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def assert_clean(model: nn.Module) -> None:
    for n, m in model.named_modules():
        assert "weight_mask" not in m._buffers and "unit_mask" not in m._buffers, n
        assert not m._forward_hooks and not m._forward_pre_hooks, n


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_fc3_matches_masked_model_and_shrinks():
    torch.manual_seed(0)
    model = liven(create_model("fc3", image_size=8, hidden=(20, 16), T=2))
    x = torch.rand(4, *model.in_shape) * 4
    dead = {"body.3": [0, 3, 4, 9, 19], "body.5": [1, 2, 15]}
    mask_model(model, x, dead)
    ref = outputs(model, x)
    assert ref.abs().sum() > 0
    before = snapshot(model)

    small = compact(model, x[:2])
    assert (outputs(small, x) - ref).abs().max() <= TOL
    mods = dict(small.named_modules())
    assert mods["body.1"].weight.shape == (15, 64) and mods["body.1"].out_features == 15
    assert mods["body.4"].weight.shape == (13, 15)
    assert (mods["body.4"].in_features, mods["body.4"].out_features) == (15, 13)
    assert mods["body.6"].weight.shape == (10, 13) and mods["body.6"].in_features == 13
    assert_clean(small)
    # the input model is untouched: same tensors, masks and hooks still in force
    after = snapshot(model)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert torch.equal(outputs(model, x), ref)


def test_all_dead_layer_keeps_one_silent_unit():
    torch.manual_seed(0)
    model = liven(create_model("fc3", image_size=8, hidden=(20, 16), T=2))
    x = torch.rand(4, *model.in_shape) * 4
    mask_model(model, x, {"body.3": list(range(20))})
    small = compact(model, x[:2])
    mods = dict(small.named_modules())
    assert mods["body.1"].out_features == 1 and mods["body.4"].in_features == 1
    assert (mods["body.4"].weight == 0).all()
    assert (outputs(small, x) - outputs(model, x)).abs().max() <= TOL


def test_convnet_slices_channels_norms_flatten_and_macs():
    torch.manual_seed(0)
    model = liven(create_model("convnet", image_size=8, channels=(4, 6), hidden=10, T=2))
    x = torch.rand(4, *model.in_shape) * 4
    dead = {"body.4": [1], "body.8": [0, 4], "body.11": [2, 3, 7]}
    mask_model(model, x, dead)
    rates = spiking_rates(model, x)
    assert all(rates[n] > 0 for n in dead)
    ref = outputs(model, x)
    orig = {n: m for n, m in model.named_modules()}

    small = compact(model, x[:2])
    assert (outputs(small, x) - ref).abs().max() <= TOL
    assert_clean(small)
    mods = dict(small.named_modules())
    assert mods["body.0"].weight.shape == (3, 1, 3, 3) and mods["body.0"].out_channels == 3
    assert mods["body.5"].weight.shape == (4, 3, 3, 3)
    assert (mods["body.5"].in_channels, mods["body.5"].out_channels) == (3, 4)
    span = 2 * 2  # 8x8 image after two 2x2 pools
    assert mods["body.10"].weight.shape == (7, 6 * span - 2 * span) and mods["body.10"].in_features == 16
    assert mods["body.12"].weight.shape == (10, 7)
    # BatchNorm entries and running statistics are the alive channels'
    for bn, keep in (("body.1", [0, 2, 3]), ("body.6", [1, 2, 3, 5])):
        assert mods[bn].num_features == len(keep)
        for attr in ("weight", "bias", "running_mean", "running_var"):
            assert torch.equal(getattr(mods[bn], attr), getattr(orig[bn], attr)[keep])
    # the Linear after Flatten keeps exactly the columns of alive channels (channel-major, span each)
    cols = [c * span + j for c in [1, 2, 3, 5] for j in range(span)]
    keep_rows = [i for i in range(10) if i not in dead["body.11"]]
    w = orig["body.10"].weight * orig["body.10"].weight_mask
    assert torch.equal(mods["body.10"].weight, w[keep_rows][:, cols])

    # dense MACs per sample, by hand: conv1 runs once (static stem), the rest T=2 times
    def macs(c1: int, c2: int, h: int) -> int:
        return c1 * 64 * 9 + 2 * (c2 * 16 * c1 * 9 + c2 * span * h + h * 10)

    y = torch.zeros(4, dtype=torch.long)
    assert measure(model, [(x, y)]).dense_macs == macs(4, 6, 10)
    assert measure(small, [(x, y)]).dense_macs == macs(3, 4, 7)


def test_resnet19_compacts_block_internal_groups():
    torch.manual_seed(0)
    model = liven(create_model("resnet19", image_size=8, T=1))
    x = torch.rand(2, *model.in_shape) * 4
    widths = {"body.4.0.residual.2": 128, "body.5.1.residual.2": 256, "body.6.0.residual.2": 512, "body.10": 256}
    dead = {n: list(range(0, w, 3)) for n, w in widths.items()}
    eng = mask_model(model, x, dead, density=1.0)
    assert eng.group("body.4.0.residual.2").prunable and not eng.group("body.4.0.sn").prunable
    picked = list(widths)
    rates = spiking_rates(model, x)
    assert all(rates[n] > 0 for n in picked)
    ref = outputs(model, x)

    small = compact(model, x)
    assert (outputs(small, x) - ref).abs().max() <= TOL
    assert_clean(small)
    mods = dict(small.named_modules())
    assert mods["body.4.0.residual.0"].out_channels == 128 - len(dead["body.4.0.residual.2"])
    assert mods["body.4.0.residual.3"].in_channels == 128 - len(dead["body.4.0.residual.2"])
    assert mods["body.4.0.residual.3"].out_channels == 128  # the coupled (residual) side keeps its width
    assert mods["body.11"].in_features == 256 - len(dead["body.10"])


@pytest.mark.parametrize("name,kw", [("lenet5", dict(image_size=12, T=2)), ("cifarnet", dict(image_size=4, T=2))])
def test_random_masks_on_every_group(name, kw):
    torch.manual_seed(0)
    model = liven(create_model(name, **kw))
    x = torch.rand(2, *model.in_shape) * 4
    eng = mask_model(model, x, frac=0.3, density=0.9)
    rates = spiking_rates(model, x)
    assert all(rates[g.neuron] > 0 for g in eng.unit_groups())
    ref = outputs(model, x)
    assert ref.abs().sum() > 0
    small = compact(model, x)
    assert (outputs(small, x) - ref).abs().max() <= TOL
    mods = dict(small.named_modules())
    for g in eng.unit_groups():
        alive = int(eng.unit_mask(g.neuron).sum())
        assert all(mods[p].weight.shape[0] == alive for p in g.producers)
        assert all(mods[c].weight.shape[1] == alive * span for c, span in g.consumers)


def test_without_unit_masks_shapes_and_outputs_are_kept():
    torch.manual_seed(0)
    model = liven(create_model("convnet", image_size=8, channels=(4, 6), hidden=10, T=2))
    x = torch.rand(4, *model.in_shape) * 4
    small = compact(model)
    assert small is not model
    assert {k: v.shape for k, v in small.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    assert torch.equal(outputs(small, x), outputs(model, x))


def test_report_saves_a_loadable_model(tmp_path):
    torch.manual_seed(0)
    model = liven(create_model("fc3", image_size=8, hidden=(20, 16), T=2))
    x = torch.rand(8, *model.in_shape) * 4
    mask_model(model, x)
    loader = [(x[:4], torch.zeros(4, dtype=torch.long)), (x[4:], torch.ones(4, dtype=torch.long))]
    path = tmp_path / "c.pt"
    table = compact_report(model, loader, out=str(path), repeats=1)
    for row in ("parameters (stored)", "dense MACs / sample", "accuracy", "max abs output difference", "s / batch"):
        assert row in table
    loaded = torch.load(path, weights_only=False)
    assert (outputs(loaded, x) - outputs(model, x)).abs().max() <= TOL
    assert timed_inference(loaded, [x[:4]], repeats=1) > 0


def test_dead_units_outside_a_prunable_group_are_refused():
    model = create_model("fc3", image_size=8, hidden=(20, 16), T=2, spiking_readout=True)
    readout = dict(model.named_modules())["body.7"]
    readout.register_buffer("unit_mask", torch.arange(10) > 0)  # enable_units would refuse the output layer
    with pytest.raises(ValueError, match="not a prunable group"):
        compact(model)
