"""``measure``: SOPs, MACs, connectivity, params, energy and firing rates against brute-force counts.

The reference counts below never use ``spikeprune.measure``, ``spikeprune.graph`` or ``fold_units``: effective
weights are built by hand from ``weight_mask`` and the hand-written wiring of each tiny net, and SOPs are counted
by explicit Python loops over (frame, input element, output element).
"""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from spikeprune.layers import BatchNorm2d, Conv2d, Flatten, Linear, Repeat
from spikeprune.measure import count_weights, measure
from spikeprune.models import create_model
from spikeprune.neurons import LIF, is_neuron
from spikeprune.sparsity.masks import MaskEngine

SYN = (nn.Linear, nn.Conv2d)


# ----------------------------------------------------------------------------------------- tiny nets
def fc_net(T: int = 3) -> nn.Module:
    """[B, 6] -> Linear(6,5) -> Repeat -> LIF -> Linear(5,4) -> LIF -> Linear(4,3)."""
    return nn.Sequential(Linear(6, 5, bias=False), Repeat(T), LIF(v_threshold=0.3), Linear(5, 4, bias=False),
                         LIF(v_threshold=0.3), Linear(4, 3, bias=False))


FC_WIRING = {"2": ("0", [("3", 1)]), "4": ("3", [("5", 1)])}


def conv_net(T: int = 2) -> nn.Module:
    """[B,1,8,8] -> conv3x3 p1 (3ch) + BN -> Repeat -> LIF -> conv3x3 s2 p1 (4ch, 4x4) -> LIF
    -> conv3x3 s2 p1 (5ch, 2x2) -> LIF -> Flatten -> Linear(20, 3)."""
    return nn.Sequential(Conv2d(1, 3, 3, padding=1, bias=False), BatchNorm2d(3), Repeat(T), LIF(v_threshold=0.3),
                         Conv2d(3, 4, 3, stride=2, padding=1, bias=False), LIF(v_threshold=0.3),
                         Conv2d(4, 5, 3, stride=2, padding=1, bias=False), LIF(v_threshold=0.3),
                         Flatten(3), Linear(20, 3, bias=False))


CONV_WIRING = {"3": ("0", [("4", 1)]), "5": ("4", [("6", 1)]), "7": ("6", [("9", 4)])}


def zoo_convnet() -> nn.Module:
    return create_model("convnet", channels=(4, 6), hidden=16, image_size=8, T=2,
                        neuron={"type": "lif", "v_threshold": 0.3})


ZOO_WIRING = {"body.4": ("body.0", [("body.5", 1)]), "body.8": ("body.5", [("body.10", 4)]),
              "body.11": ("body.10", [("body.12", 1)])}


def boost(model: nn.Module, factor: float = 3.0) -> nn.Module:
    """Scale every weight so that all spiking layers fire."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, SYN):
                m.weight.mul_(factor)
    return model


def batches(x: torch.Tensor, size: int, classes: int = 3):
    return [(x[i:i + size], torch.arange(i, i + len(x[i:i + size])) % classes) for i in range(0, len(x), size)]


def prune(model: nn.Module, example: torch.Tensor, density: float, dead: dict[str, list[int]], seed: int = 0):
    """Random connection masks on every layer, then switch the listed units off."""
    g = torch.Generator().manual_seed(seed)
    engine = MaskEngine(model, example_input=example)
    for name, layer in engine.layers.items():
        engine.set_mask(name, torch.rand(layer.weight.shape, generator=g) < density)
    engine.enable_units(list(dead))
    for neuron, units in dead.items():
        um = torch.ones_like(engine.unit_mask(neuron))
        um[units] = False
        engine.set_unit_mask(neuron, um)
    return engine


# ------------------------------------------------------------------------------------- brute force
def hand_effective(model: nn.Module, wiring: dict) -> dict[str, torch.Tensor]:
    """weight * weight_mask, with each dead unit's producer row and consumer columns zeroed."""
    modules = dict(model.named_modules())
    eff = {}
    for n, m in modules.items():
        if isinstance(m, SYN):
            w = m.weight.detach().clone()
            mask = getattr(m, "weight_mask", None)
            eff[n] = w * mask if mask is not None else w
    for neuron, (producer, consumers) in wiring.items():
        um = getattr(modules[neuron], "unit_mask", None)
        if um is None:
            continue
        for u in (~um).nonzero().flatten().tolist():
            eff[producer][u] = 0
            for consumer, span in consumers:
                eff[consumer][:, u * span:(u + 1) * span] = 0
    return eff


def record(model: nn.Module, loader):
    """Per-batch inputs of every synaptic layer and outputs of every neuron (after unit masks), in eval mode."""
    ins: dict[str, list[torch.Tensor]] = {}
    outs: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for n, m in model.named_modules():
        if isinstance(m, SYN):
            hooks.append(m.register_forward_pre_hook(lambda mod, i, n=n: ins.setdefault(n, []).append(i[0].clone())))
        elif is_neuron(m):
            hooks.append(m.register_forward_hook(lambda mod, i, o, n=n: outs.setdefault(n, []).append(o.clone())))
    model.eval()
    logits = []
    with torch.no_grad():
        for x, _ in loader:
            logits.append(model(x).mean(0))
    for h in hooks:
        h.remove()
    return ins, outs, torch.cat(logits)


def connections(mod: nn.Module, w: list, in_shape: tuple[int, ...]):
    """For an input element index (flat, one frame), the flat output indices of its synapses and the weights."""
    if isinstance(mod, nn.Linear):
        def linear(i):
            for o in range(mod.out_features):
                yield o, w[o][i]
        return linear, mod.out_features
    C, H, W = in_shape
    k, s, p = mod.kernel_size[0], mod.stride[0], mod.padding[0]
    Ho, Wo = (H + 2 * p - k) // s + 1, (W + 2 * p - k) // s + 1

    def conv(idx):
        c, i, j = idx // (H * W), (idx // W) % H, idx % W
        for o, y, x in itertools.product(range(mod.out_channels), range(Ho), range(Wo)):
            ki, kj = i + p - y * s, j + p - x * s
            if 0 <= ki < k and 0 <= kj < k:
                yield (o * Ho + y) * Wo + x, w[o][c][ki][kj]
    return conv, mod.out_channels * Ho * Wo


def brute_force(model: nn.Module, loader, eff: dict[str, torch.Tensor]) -> dict:
    """SOPs (effective and dense) of spike-fed layers and MACs of analog-fed ones, per sample, by loops."""
    modules = dict(model.named_modules())
    ins, outs, logits = record(model, loader)
    samples = sum(len(y) for _, y in loader)
    sops = dense_sops = macs = 0
    per_layer = {}
    for name, xs in ins.items():
        mod = modules[name]
        w = eff[name].tolist()
        layer_sops = layer_dense = layer_macs = 0
        for x in xs:
            feat = x.shape[-1:] if isinstance(mod, nn.Linear) else x.shape[-3:]
            conn, _ = connections(mod, w, tuple(feat))
            frames = x.reshape(-1, feat.numel()).tolist()  # (t, b) pairs
            binary = all(v in (0.0, 1.0) for f in frames for v in f)
            for frame in frames:
                for i, v in enumerate(frame):
                    if binary and v == 0.0:
                        continue  # no spike, no synaptic operation
                    for _o, wo in conn(i):
                        if binary:
                            layer_dense += 1
                            layer_sops += wo != 0.0
                        else:
                            layer_macs += wo != 0.0
        per_layer[name] = (layer_sops / samples, layer_dense / samples, layer_macs / samples)
        sops += layer_sops
        dense_sops += layer_dense
        macs += layer_macs
    return {"sops": sops / samples, "dense_sops": dense_sops / samples, "macs": macs / samples,
            "layers": per_layer, "outs": outs, "logits": logits, "samples": samples}


def labels_of(loader):
    return torch.cat([y for _, y in loader])


# ---------------------------------------------------------------------------------------------- SOPs
CASES = {
    "fc": (fc_net, FC_WIRING, (6,), {"2": [1], "4": [0, 3]}),
    "conv": (conv_net, CONV_WIRING, (1, 8, 8), {"3": [1], "5": [2], "7": [0]}),
    "zoo_convnet": (zoo_convnet, ZOO_WIRING, (1, 8, 8), {"body.4": [2], "body.8": [1, 4], "body.11": [5]}),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("pruned", [False, True])
def test_sops_match_brute_force(case, pruned):
    make, wiring, in_shape, dead = CASES[case]
    torch.manual_seed(1)
    model = boost(make())
    x = torch.rand(5, *in_shape) * 2
    loader = batches(x, 3)  # batches of 3 and 2
    if pruned:
        prune(model, x[:2], 0.6, dead)
    eff = hand_effective(model, wiring)
    ref = brute_force(model, loader, eff)
    r = measure(model, loader)

    assert r.samples == 5
    assert ref["sops"] > 0 and ref["macs"] > 0
    assert r.sops == pytest.approx(ref["sops"], rel=1e-6)
    assert r.dense_sops == pytest.approx(ref["dense_sops"], rel=1e-6)
    assert r.macs == pytest.approx(ref["macs"], rel=1e-6)
    for ls in r.layers:
        s, d, m = ref["layers"][ls.name]
        assert (ls.sops, ls.dense_sops, ls.macs) == pytest.approx((s, d, m), rel=1e-6), ls.name
        assert ls.input == ("analog" if m else "spikes")
    if pruned:
        assert r.sops < r.dense_sops
    else:
        assert r.sops == pytest.approx(r.dense_sops, rel=1e-9)
    # every spiking layer fires, and dead units are silent
    modules = dict(model.named_modules())
    for neuron, spikes in ref["outs"].items():
        s = torch.cat(spikes, 1)
        assert s.sum() > 0, neuron
        if pruned and neuron in dead:
            assert modules[neuron].unit_mask.sum() == modules[neuron].unit_mask.numel() - len(dead[neuron])
            assert s[:, :, dead[neuron]].sum() == 0
    # accuracy from the same logits
    acc = (ref["logits"].argmax(-1) == labels_of(loader)).float().mean().item()
    assert r.accuracy == pytest.approx(acc)
    # the hand-made effective weights are what measure counted as non-zero
    for ls in r.layers:
        assert ls.nonzero == int((eff[ls.name] != 0).sum())
        assert ls.weights == eff[ls.name].numel()


def test_firing_rates_against_hand_count():
    torch.manual_seed(2)
    model = boost(conv_net())
    x = torch.rand(5, 1, 8, 8) * 2
    loader = batches(x, 2)
    prune(model, x[:2], 0.7, {"5": [1, 3]})
    ins, outs, _ = record(model, loader)
    r = measure(model, loader, unit_rates=True)
    total_spikes = total_steps = 0
    by_name = {s.name: s for s in r.spiking}
    assert list(by_name) == ["3", "5", "7"]
    for name, chunks in outs.items():
        s = torch.cat(chunks, 1)  # [T, samples, C, H, W]
        T, n, C = s.shape[:3]
        neurons = s[0, 0].numel()  # C*H*W neurons per frame
        spikes = int(s.sum())
        total_spikes += spikes
        total_steps += T * n * neurons
        st = by_name[name]
        assert st.units == C
        assert st.firing_rate == pytest.approx(spikes / (T * neurons * n), rel=1e-6)
        per_channel = s.sum((0, 1, 3, 4)) / (T * n * s.shape[3] * s.shape[4])
        assert st.unit_rates == pytest.approx(per_channel.tolist(), rel=1e-6)
    assert by_name["5"].alive == 2 and by_name["5"].unit_rates[1] == 0 and by_name["5"].unit_rates[3] == 0
    assert r.neurons == 3 + 4 + 5 and r.neurons_alive == 3 + 2 + 5
    # overall: all spikes / (T x all neurons x samples), not a per-channel average
    assert r.firing_rate == pytest.approx(total_spikes / total_steps, rel=1e-6)


def test_firing_rate_of_an_fc_net_by_hand():
    # one LIF layer fed a constant 1.5 (H = V/2 + X/2): spikes at t=1, 3 of T=4 -> rate 1/2 for every unit
    model = nn.Sequential(Linear(2, 3, bias=False), Repeat(4), LIF(), Linear(3, 2, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.5)  # two inputs of 0.5 -> X = 1.5
    r = measure(model, [(torch.full((4, 2), 0.5), torch.zeros(4, dtype=torch.long))])
    assert r.firing_rate == 0.5
    assert r.spiking[0].firing_rate == 0.5 and r.spiking[0].units == 3 and r.spiking[0].alive == 3
    # layer "3" sees 2 spikes x 3 units per sample, each with 2 outgoing synapses: 12 SOPs per sample
    assert r.layers[1].sops == 12.0 and r.layers[1].in_rate == 0.5
    # layer "0" is analog: 2x3 MACs per sample, computed once (static stem before Repeat)
    assert r.layers[0].macs == 6.0 and r.layers[0].input == "analog"
    assert r.macs == 6.0 and r.sops == 12.0


# ------------------------------------------------------------------------------------ dense identities
def test_dense_sops_equal_dense_macs_times_rate_for_linear():
    torch.manual_seed(3)
    model = boost(fc_net())
    x = torch.rand(7, 6) * 2
    r = measure(model, batches(x, 4))
    spike_layers = [ls for ls in r.layers if ls.input == "spikes"]
    assert [ls.name for ls in spike_layers] == ["3", "5"]
    for ls in spike_layers:
        assert 0 < ls.in_rate < 1
        assert ls.dense_sops == pytest.approx(ls.dense_macs * ls.in_rate, rel=1e-6)
        assert ls.sops == pytest.approx(ls.dense_sops, rel=1e-9)  # unpruned
    # conventional dense MACs: in*out per frame, T frames per sample for spike-fed layers, once for the stem
    assert [ls.dense_macs for ls in r.layers] == [6 * 5, 3 * 5 * 4, 3 * 4 * 3]


def test_conv_dense_sops_equal_dense_macs_on_all_ones_input():
    # padding=0, stride=1: every (input element, tap) pair is one MAC, and every input element spikes
    T, B = 2, 3
    model = nn.Sequential(Repeat(T), Conv2d(2, 3, 3, padding=0, bias=False), Flatten(3), Linear(27, 4, bias=False))
    r = measure(model, [(torch.ones(B, 2, 5, 5), torch.zeros(B, dtype=torch.long))])
    conv = r.layers[0]
    assert conv.input == "spikes" and conv.in_rate == 1.0
    assert conv.dense_macs == 3 * 3 * 3 * 2 * 3 * 3 * T  # Cout*Ho*Wo * Cin*k*k per frame, T frames per sample
    assert conv.dense_sops == conv.dense_macs == conv.sops
    # with padding the border inputs have fewer taps than the MAC count assumes... and the identity breaks
    padded = nn.Sequential(Repeat(T), Conv2d(2, 3, 3, padding=1, bias=False), Flatten(3), Linear(75, 4, bias=False))
    rp = measure(padded, [(torch.ones(B, 2, 5, 5), torch.zeros(B, dtype=torch.long))])
    # dense MACs count zero-padding taps: Cout*5*5*Cin*9*T; SOPs only real inputs: each input element has
    # (number of output positions it reaches) taps = sum over rows/cols of the reach (2,3,3,3,2 per axis)
    reach = sum(a * b for a in (2, 3, 3, 3, 2) for b in (2, 3, 3, 3, 2))
    assert rp.layers[0].dense_macs == 3 * 25 * 2 * 9 * T
    assert rp.layers[0].dense_sops == 3 * 2 * reach * T


# ---------------------------------------------------------------------------- connectivity and params
def test_connectivity_and_params_from_tensors():
    torch.manual_seed(4)
    model = nn.Sequential(Linear(6, 10, bias=True), Repeat(2), LIF(), Linear(10, 4, bias=True))
    w = model[0].weight
    with torch.no_grad():
        model[3].bias.zero_()
        model[3].bias[1] = 0.5
        idx = torch.randperm(w.numel())[:18]  # 30% of 60
        w.view(-1)[idx] = 0
    assert int((w != 0).sum()) == 42
    r = measure(model, [(torch.rand(3, 6), torch.zeros(3, dtype=torch.long))])
    assert r.layers[0].nonzero == 42 and r.layers[0].weights == 60
    assert r.layers[0].connectivity == 42 / 60
    assert r.layers[1].nonzero == 40 and r.layers[1].connectivity == 1.0
    assert (r.nonzero, r.weights) == (82, 100) and r.connectivity == 82 / 100
    assert r.weights == count_weights(model)
    # params: non-zero weights + non-zero biases (10 in layer 0, only 1 in layer 3)
    assert r.params == 42 + 40 + int((model[0].bias != 0).sum()) + 1
    # connectivity restricted to some layers
    r2 = measure(model, [(torch.rand(3, 6), torch.zeros(3, dtype=torch.long))], prunable=["0"])
    assert (r2.nonzero, r2.weights) == (42, 60)


def test_weight_mask_counts_even_if_weights_were_not_zeroed():
    model = nn.Sequential(Linear(4, 5, bias=False), Repeat(2), LIF(), Linear(5, 3, bias=False))
    mask = torch.ones(5, 4, dtype=torch.bool)
    mask[0, :3] = False
    model[0].register_buffer("weight_mask", mask)  # weights themselves stay non-zero
    r = measure(model, [(torch.rand(2, 4), torch.zeros(2, dtype=torch.long))])
    assert r.layers[0].nonzero == 17 and r.nonzero == 17 + 15


def test_dead_units_fold_into_connectivity():
    torch.manual_seed(5)
    model = fc_net()
    x = torch.rand(2, 6)
    prune(model, x, 1.0, {"2": [1], "4": [0, 3]})
    r = measure(model, [(x, torch.zeros(2, dtype=torch.long))])
    # layer 0 (6->5) loses row 1; layer 3 (5->4) loses column 1 and rows 0, 3; layer 5 (4->3) loses columns 0, 3
    assert [ls.nonzero for ls in r.layers] == [30 - 6, 20 - 4 - 2 * 5 + 2, 12 - 6]
    assert r.neurons == 9 and r.neurons_alive == 9 - 3


# -------------------------------------------------------------------------------------------- energy
def test_energy_is_ac_and_mac_weighted():
    torch.manual_seed(6)
    model = boost(conv_net())
    x = torch.rand(3, 1, 8, 8) * 2
    loader = batches(x, 3)
    ref = brute_force(model, loader, hand_effective(model, CONV_WIRING))
    r = measure(model, loader)
    assert r.energy_uj == pytest.approx((0.9 * ref["sops"] + 4.6 * ref["macs"]) * 1e-6, rel=1e-9)
    assert (r.pj_per_ac, r.pj_per_mac) == (0.9, 4.6)
    r2 = measure(model, loader, pj_per_ac=0.03, pj_per_mac=0.5)
    assert r2.energy_uj == pytest.approx((0.03 * ref["sops"] + 0.5 * ref["macs"]) * 1e-6, rel=1e-9)
    d = r2.to_dict()
    assert d["energy_uj"] == r2.energy_uj and d["pj_per_ac"] == 0.03 and d["samples"] == 3
    assert "| **total** |" in r2.table()


# ---------------------------------------------------------------------------------------------- misc
def test_bad_arguments():
    model = fc_net()
    with pytest.raises(ValueError, match="pj_per_ac"):
        measure(model, [(torch.rand(2, 6), torch.zeros(2, dtype=torch.long))], pj_per_ac=-1)
    with pytest.raises(ValueError, match="empty loader"):
        measure(model, [])


def test_max_batches_and_training_mode_restored():
    model = fc_net()
    model.train()
    loader = batches(torch.rand(6, 6), 2)
    r = measure(model, loader, max_batches=2)
    assert r.samples == 4
    assert model.training
    assert all(not m._forward_pre_hooks for m in model.modules() if isinstance(m, SYN))
