"""Export: NIR graphs (round trip), torch.nn.utils.prune masks, safetensors checkpoints, `spikeprune export`."""

import json

import numpy as np
import pytest
import torch
from helpers import mask_randomly
from torch import nn

from spikeprune.models import create_model

T = 4


def _spike_pool_convnet(channels=(6, 8), hidden=16, **_):
    """convnet's layers with max pooling of *spikes* (conv+BN -> LIF -> maxpool), which NIR can express; the zoo
    convnet pools the membrane input before the neuron (refused, see below)."""
    from spikeprune.layers import Flatten, Linear, MaxPool2d
    from spikeprune.models.cnn import SequentialSNN, conv_bn
    from spikeprune.neurons import LIF

    make = lambda: LIF(v_threshold=0.5)  # noqa: E731
    c1, c2 = channels
    layers = [*conv_bn(1, c1, make), MaxPool2d(2), *conv_bn(c1, c2, make), MaxPool2d(2), Flatten(3),
              Linear(c2 * 2 * 2, hidden, bias=False), make(), Linear(hidden, 10, bias=False)]
    return SequentialSNN("convnet_spike_pool", layers, (1, 8, 8), 10, T, "direct")


def _masked(name, seed=0, **kw):
    """A model with random connection masks (50%), every third unit dead and non-trivial BN statistics."""
    torch.manual_seed(seed)
    if name == "convnet_spike_pool":
        model = _spike_pool_convnet(**kw)
    else:
        model = create_model(name, neuron={"type": "lif", "v_threshold": 0.5}, **{"image_size": 8, **kw})
    x = model.example_input(2)
    eng = mask_randomly(model, x, seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.2, 0.2)
                m.running_var.uniform_(0.5, 1.5)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    return model.eval(), eng


def _order(g):
    from spikeprune.export.nir import _order as order

    return order(g)


MODELS = [("fc3", {"hidden": (32, 24)}), ("convnet_spike_pool", {"channels": (6, 8), "hidden": 16}),
          ("convnet", {"channels": (6, 8), "hidden": 16, "pool": "avg"}),
          ("lenet5", {"bn": True, "image_size": 16})]


# ------------------------------------------------------------------------------------------------ NIR
@pytest.fixture(scope="module")
def nir():
    return pytest.importorskip("nir")


def _folded(model):
    """Expected exported weights: permanent copy (compacted), each BN folded into the layer before it."""
    from spikeprune.export.nir import _bn_fold, permanent_copy

    small = permanent_copy(model).eval()
    mods = list(small.body)
    out = []
    for i, m in enumerate(mods):
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nxt = mods[i + 1] if i + 1 < len(mods) else None
            w = _bn_fold(m, nxt)[0] if isinstance(nxt, nn.BatchNorm2d) else m.weight.detach()
            out.append(w.numpy())
    return small, out


@pytest.mark.parametrize("name,kw", MODELS)
def test_nir_round_trip(nir, tmp_path, name, kw):
    from spikeprune.export.nir import export_nir, from_nir

    model, eng = _masked(name, **kw)
    summary = export_nir(model, tmp_path / "m.nir")
    g = nir.read(str(tmp_path / "m.nir"))
    small, expected = _folded(model)
    nodes = [g.nodes[k] for k in _order(g)]  # the file lists nodes by name; the edges give the order
    weights = [n.weight for n in nodes if hasattr(n, "weight")]
    assert len(weights) == len(expected)
    for w, e in zip(weights, expected):
        assert w.shape == e.shape and np.array_equal(w, e)  # same values, zeros included
    assert sum(int(np.count_nonzero(w)) for w in weights) == summary["nonzero"]
    assert summary["nonzero"] == sum(int((w != 0).sum()) for w in eng.effective_weights().values())
    assert summary["weights_exported"] < summary["weights_before_compaction"]  # dead units sliced out
    side = json.loads((tmp_path / "m.sparsity.json").read_text())
    assert side["file"] == "m.nir" and [l["nonzero"] for l in side["layers"]] == [int(np.count_nonzero(w))
                                                                                 for w in weights]
    assert all(u["alive"] < u["units"] for u in side["units"])
    lifs = [n for n in g.nodes.values() if type(n).__name__ == "LIF"]
    assert lifs and all(np.allclose(n.tau, 2.0) and np.allclose(n.r, 1.0) and np.allclose(n.v_leak, 0.0)
                        and np.allclose(n.v_threshold, 0.5) and np.allclose(n.v_reset, 0.0) for n in lifs)
    assert g.metadata["T"] == T and g.metadata["dt"] == 1.0
    if name == "convnet_spike_pool":  # max pooling of spikes = sum pooling + threshold 0.5; BN folded into conv
        kinds = [type(n).__name__ for n in nodes]
        assert kinds.index("SumPool2d") + 1 == kinds.index("Threshold") and "BatchNorm" not in "".join(kinds)
    back = from_nir(g)
    x = torch.rand(6, *model.in_shape) * 2
    with torch.no_grad():
        ref, out = model(x), back(x)
    assert out.shape == ref.shape
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    imported = [m.weight.detach().numpy() for m in back.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    assert all(np.array_equal(a, b) for a, b in zip(imported, weights))


def test_nir_time_step_and_options(nir):
    from spikeprune.export.nir import from_nir, to_nir

    model, _ = _masked("fc3", hidden=(16, 12))
    g = to_nir(model, dt=1e-3, compact_units=False)
    lif = next(n for n in g.nodes.values() if type(n).__name__ == "LIF")
    assert np.allclose(lif.tau, 2e-3) and lif.tau.shape == (16,)  # not compacted: all 16 units, dead ones zeroed
    w = g.nodes["body.1"].weight
    assert np.all(w[::3] == 0)
    back = from_nir(g)  # dt comes back from the metadata
    assert next(m for m in back.modules() if type(m).__name__ == "LIF").tau == pytest.approx(2.0)
    model_if = create_model("fc3", hidden=(8,), image_size=8, neuron={"type": "if", "v_reset": None})
    g = to_nir(model_if)
    node = next(n for n in g.nodes.values() if type(n).__name__ == "IF")
    assert np.allclose(node.r, 1.0) and node.metadata["reset"] == "subtract"
    assert from_nir(g).body[3].v_reset is None


def test_nir_refuses_what_it_cannot_express(nir):
    from spikeprune.export.nir import to_nir

    with pytest.raises(ValueError, match="sequential"):
        to_nir(create_model("sew_resnet18", image_size=8, num_classes=4))
    with pytest.raises(ValueError, match="max-pools analog values"):  # the zoo convnet pools membrane input
        to_nir(create_model("convnet", image_size=8, channels=(2, 2), hidden=4))
    net = nn.Sequential(nn.Flatten(), nn.MaxPool1d(2))
    with pytest.raises(ValueError):
        to_nir(net, input_shape=(4,))


def test_nir_export_of_spikingjelly_net(nir):
    pytest.importorskip("spikingjelly.activation_based")
    from spikingjelly.activation_based import functional, layer, neuron

    from spikeprune.export.nir import from_nir, to_nir

    net = nn.Sequential(layer.Conv2d(1, 4, 3, padding=1), neuron.LIFNode(tau=3.0, step_mode="m"),
                        layer.MaxPool2d(2), layer.Flatten(), layer.Linear(4 * 4 * 4, 5),
                        neuron.IFNode(v_reset=None, step_mode="m"), layer.Linear(5, 3))
    functional.set_step_mode(net, "m")
    g = to_nir(net, torch.rand(T, 2, 1, 8, 8))
    kinds = [type(g.nodes[k]).__name__ for k in _order(g)]
    assert kinds == ["Input", "Conv2d", "LIF", "SumPool2d", "Threshold", "Flatten", "Affine", "IF", "Affine",
                     "Output"]
    lif = g.nodes["1"]
    assert np.allclose(lif.tau, 3.0) and lif.tau.shape == (4, 8, 8)
    back = from_nir(g, T=T)
    x = torch.rand(2, 1, 8, 8)
    functional.reset_net(net)
    with torch.no_grad():
        torch.testing.assert_close(back(x), net(x.unsqueeze(0).expand(T, *x.shape)), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------------- torch.nn.utils.prune
def test_torch_prune_round_trip():
    from torch.nn.utils import prune as tprune

    from spikeprune.export.torch_prune import from_torch_prune, to_torch_prune, torch_prune_masks
    from spikeprune.sparsity.masks import fold_units

    model, eng = _masked("convnet_spike_pool", channels=(6, 8), hidden=16)
    eff = eng.effective_weights()
    allowed = {n: eng.mask(n).float() for n in eng.layers}
    fold_units(allowed, eng.groups, dict(model.named_modules()))
    tp = to_torch_prune(model)
    modules = dict(tp.named_modules())
    for n in eng.layers:
        m = modules[n]
        assert tprune.is_pruned(m) and hasattr(m, "weight_orig") and m.weight_mask.dtype == torch.float32
        torch.testing.assert_close(m.weight, eff[n])  # weight = orig * mask = the effective weight
        assert torch.equal(m.weight_mask, allowed[n])  # connection mask with dead units' rows/columns folded in
    assert not any(hasattr(m, "unit_mask") for m in tp.modules())
    x = torch.rand(4, 1, 8, 8) * 2
    with torch.no_grad():
        torch.testing.assert_close(tp(x), model(x))
    masks = torch_prune_masks(tp)
    assert set(masks) == set(eng.layers)
    back = from_torch_prune(tp)  # in place: torch reparametrisation removed, engine masks installed
    assert not any(tprune.is_pruned(m) for m in tp.modules())
    for n, mask in masks.items():
        assert torch.equal(back.mask(n), mask)
        assert torch.equal(dict(tp.named_modules())[n].weight, eff[n])
    with torch.no_grad():
        torch.testing.assert_close(tp(x), model(x))


# -------------------------------------------------------------------------------------------- safetensors
def test_safetensors_round_trip(tmp_path):
    pytest.importorskip("safetensors")
    from spikeprune.export.safetensors import load_safetensors, save_safetensors

    model, eng = _masked("fc3", hidden=(32, 24))
    path = save_safetensors(model, tmp_path / "ck.safetensors", config={"model": {"name": "fc3"}},
                            metrics={"accuracy": 0.5, "density": torch.tensor(0.25)})
    meta = json.loads((tmp_path / "ck.json").read_text())
    assert meta["config"]["model"]["name"] == "fc3" and meta["metrics"]["density"] == 0.25
    assert "body.3.unit_mask" in meta["masks"] and "body.1.weight_mask" in meta["masks"]
    fresh = create_model("fc3", image_size=8, hidden=(32, 24), neuron={"type": "lif", "v_threshold": 0.5}).eval()
    state, meta2 = load_safetensors(path, fresh)
    assert meta2 == meta and state["body.1.weight_mask"].dtype == torch.bool
    assert torch.equal(fresh.body[3].unit_mask, model.body[3].unit_mask)
    x = torch.rand(3, 1, 8, 8) * 2
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), model(x))  # unit-mask hooks re-created
    (tmp_path / "ck.json").unlink()  # the JSON also lives in the file's header
    assert load_safetensors(path)[1] == meta


# ---------------------------------------------------------------------------------------------------- CLI
def test_cli_export_formats(tmp_path):
    pytest.importorskip("nir")
    pytest.importorskip("safetensors")
    from spikeprune import Trainer, load_config
    from spikeprune.cli import main

    cfg = load_config(None, [
        "name=tiny", f"out_dir={tmp_path}", "data.name=synthetic", "data.options={n: 32, in_shape: [1, 8, 8]}",
        "data.batch_size=16", "model.name=fc3", "model.options={hidden: [16, 12], image_size: 8}",
        "model.neuron={type: lif, v_threshold: 0.2}", "train.epochs=2", "train.lr=0.01", "train.progress=false",
        "train.device=cpu", "method={name: dynsnn, warmup_epochs: 0, update_every: 1, kappa: 0.8}"])
    Trainer(cfg, log=lambda *a, **k: None).fit()
    rd = tmp_path / "tiny"
    assert main(["export", str(rd), "--format", "nir"]) == 0
    assert (rd / "model.nir").is_file() and (rd / "model.sparsity.json").is_file()
    assert main(["export", str(rd), "--format", "safetensors"]) == 0
    assert json.loads((rd / "model.json").read_text())["config"]["name"] == "tiny"
    assert main(["export", str(rd), "-f", "torch-prune", "--out", str(tmp_path / "tp.pt")]) == 0
    state = torch.load(tmp_path / "tp.pt", weights_only=True)
    assert "body.1.weight_orig" in state and "body.1.weight_mask" in state
