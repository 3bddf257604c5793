"""SCA as the paper runs it (``mode: hard``): pruned filters and BN zeroed and kept at zero, regrowth by the BN
scale gradient taken as if the channel were alive (checked against the real gradient of a live channel that
computes the same), re-initialised regrowth, the ramp to ``target_keep``, residual channel ties (ResNet19) and
VGG-16-BN, and the user's own loop through ``spikeprune.prune``."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import conv, liven, x8
from torch import nn

import spikeprune
from spikeprune.config import ConfigError
from spikeprune.models import create_model
from spikeprune.sparsity.loop import LoopState
from spikeprune.sparsity.methods import create_method

ACT3 = [0.9, 0.1, 0.5, 0.05]
ACT7 = [0.3, 0.8, 0.02, 0.6, 0.01, 0.2]


def hard(model=None, epochs=10, opt=None, **options):
    model = model if model is not None else liven(conv())
    options = {"mode": "hard", "min_channels": 1, "l1": 0.0, **options}
    m = create_method("sca", **options)
    opt = opt if opt is not None else torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    st = LoopState(model=model, example_input=model.example_input(2), optimizer=opt, epochs=epochs, seed=0)
    m.setup(st)
    m.on_train_start(st)
    m.on_epoch_start(st)
    return m, st


def set_activity(method, acts: dict[str, list[float]]) -> None:
    for n, a in acts.items():
        method.monitor.sum[n] = torch.tensor(a)
        method.monitor.count[n] = 1


def step(model, opt, x, st=None, method=None):
    opt.zero_grad()
    loss = F.cross_entropy(model(x).mean(0), torch.arange(x.shape[0]) % model.num_classes)
    loss.backward()
    opt.step()
    if method is not None:
        st.step += 1
        method.on_step_end(st)
    return loss


def bn_of(model, conv_name):
    mods = dict(model.named_modules())
    idx = int(conv_name.split(".")[1])
    return mods[f"body.{idx + 1}"]


def test_hard_prune_zeroes_filters_and_bn_and_they_stay_zero():
    m, st = hard(keep=0.4, regrow=0.0)
    model = st.model
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.update()
    assert m.channel_masks["body.4"].tolist() == [True, False, True, False]  # ⌊0.4·10⌋ = 4 by activity
    assert m.channel_masks["body.8"].tolist() == [False, True, False, True, False, False]
    assert all(bool(um.all()) for um in m.engine.unit_masks().values())  # gates open while training
    for _ in range(3):
        step(model, st.optimizer, x8(4), st, m)
        for t in m.ties:
            dead = ~m.channel_masks[t.name]
            for p in t.producers:
                conv_ = dict(model.named_modules())[p]
                bn = bn_of(model, p)
                assert float(conv_.weight.detach()[dead].abs().sum()) == 0.0
                assert float(bn.weight.detach()[dead].abs().sum()) == 0.0
                assert float(bn.bias.detach()[dead].abs().sum()) == 0.0
    # the pruned channels never fire (their BN output is exactly 0), with the probe on
    seen = {}
    model.body[5].register_forward_pre_hook(lambda mod, i: seen.__setitem__("body.4", i[0]))
    with torch.no_grad():
        model(x8(4))
    assert float(seen["body.4"][:, :, ~m.channel_masks["body.4"]].sum()) == 0.0
    assert float(seen["body.4"][:, :, m.channel_masks["body.4"]].sum()) > 0.0
    assert m.channel_fraction() == pytest.approx(0.4)
    before_close = m.density()
    m.close_gates()
    assert before_close == pytest.approx(m.engine.density())  # what measure will count


def test_probe_leaves_the_forward_unchanged():
    m, st = hard(keep=0.4, regrow=0.2)
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.update()
    model = st.model
    model.train()
    with torch.no_grad():  # no probe without gradients
        a = model(x8(4))
    b = model(x8(4))  # the probe runs
    assert torch.equal(a, b.detach())


def test_probe_gradient_is_the_bn_scale_gradient_of_the_channel_alive():
    """The probe's |dL/dγ_c| of a pruned channel equals the real |dL/dγ_c| of the same channel made alive with
    its probe filter and γ_c = β_c = 0 (which computes exactly the same network)."""
    torch.manual_seed(0)
    m, st = hard(keep=0.4, regrow=0.2)
    model = st.model
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.update()
    m.bn_grad = {}
    model.train()
    x = x8(4)
    y = torch.arange(4) % 10
    model.zero_grad()
    F.cross_entropy(model(x).mean(0), y).backward()
    probe = {n: g.clone() for n, g in m.bn_grad.items()}
    # the reference: a copy with the pruned filters set to the probe filters, no SCA attached
    ref = create_model("convnet", channels=(4, 6), hidden=16, image_size=8)
    state = {k: v for k, v in model.state_dict().items() if not k.endswith(("weight_mask", "unit_mask"))}
    ref.load_state_dict(state)
    dead = {}
    with torch.no_grad():
        for t in m.ties:
            for p in t.producers:
                d = ~m.channel_masks[t.name]
                dict(ref.named_modules())[p].weight[d] = m.candidates[p][d]
                dead[t.name] = d
    ref.train()
    ref.zero_grad()
    out = ref(x)
    F.cross_entropy(out.mean(0), y).backward()
    torch.testing.assert_close(out, model(x).detach())  # the same network
    for t in m.ties:
        for p in t.producers:
            g_ref = bn_of(ref, p).weight.grad.abs()[dead[t.name]]
            torch.testing.assert_close(probe[t.name][dead[t.name]], g_ref, rtol=1e-4, atol=1e-7)
            assert float(g_ref.sum()) > 0


def test_regrowth_by_bn_grad_reinitialises_from_the_probe_filter():
    m, st = hard(keep=0.4, regrow=0.0)
    model = st.model
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.update()
    m.cfg.regrow = 0.1  # one channel of 10 may come back
    assert m.ties[0].producers == ["body.0"] and m.ties[0].norm_of == {"body.0": "body.1"}
    cand = m.candidates["body.0"].clone()
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.bn_grad = {"body.4": torch.tensor([0.0, 0.0, 0.0, 7.0]), "body.8": torch.tensor([0.0, 0.0, 1.0, 0.0, 2.0, 0.0])}
    m.update()
    assert m.channel_masks["body.4"].tolist() == [True, False, True, True]  # 3:3 regrown (largest |dL/dγ|)
    torch.testing.assert_close(model.body[0].weight[3].detach(), cand[3])
    assert float(model.body[1].weight.detach()[3]) == 1.0 and float(model.body[1].bias.detach()[3]) == 0.0
    assert m.engine.mask("body.0")[3].all() and not m.engine.mask("body.0")[1].any()
    m2, _ = hard(keep=0.4, regrow=0.0, regrow_init="zero")
    set_activity(m2, {"body.4": ACT3, "body.8": ACT7})
    m2.update()
    m2.cfg.regrow = 0.1
    set_activity(m2, {"body.4": ACT3, "body.8": ACT7})
    m2.bn_grad = {"body.4": torch.tensor([0.0, 0.0, 0.0, 7.0])}
    m2.update()
    assert float(m2.engine.model.body[0].weight[3].abs().sum()) == 0.0  # grows from zero


def test_target_keep_ramp_reaches_the_paper_fraction():
    m, st = hard(conv((40, 60)), epochs=10, keep=0.4, regrow=0.05, target_keep=0.2, ramp=0.5)
    g = torch.Generator().manual_seed(0)
    fracs = []
    for e in range(9):
        st.epoch = e
        set_activity(m, {"body.4": torch.rand(40, generator=g).tolist(),
                         "body.8": torch.rand(60, generator=g).tolist()})
        m.bn_grad = {"body.4": torch.rand(40, generator=g), "body.8": torch.rand(60, generator=g)}
        m.on_epoch_end(st, {})
        fracs.append(m.channel_fraction())
    expected = [math.floor((0.2 + 0.8 * (1 - min(1, (e + 1) / 5)) ** 3) * 100 + 1e-9) / 100 for e in range(9)]
    assert fracs == pytest.approx(expected)
    assert fracs[4:] == [0.2] * 5 and all(a >= b for a, b in zip(fracs, fracs[1:]))
    assert m.history[-1]["target"] == pytest.approx(0.2)


def test_config_checks():
    with pytest.raises(ConfigError, match="regrow_score"):
        create_method("sca", regrow_score="bn_grad")  # soft
    with pytest.raises(ConfigError, match="regrow_score"):
        create_method("sca", mode="hard", regrow_score="gate")
    with pytest.raises(ConfigError, match="target_keep"):
        create_method("sca", target_keep=1.5)
    with pytest.raises(ConfigError, match="regrow"):
        create_method("sca", target_keep=0.2, regrow=0.3)
    model = create_model("lenet5", image_size=12, T=2)  # no BN: no γ to rank by
    with pytest.raises(ValueError, match="no BatchNorm"):
        hard(model)


def test_resnet19_residual_channels_are_pruned_together():
    torch.manual_seed(0)
    model = create_model("resnet19", image_size=8, T=1)
    m, st = hard(model, keep=0.5, regrow=0.0, min_channels=1)
    tied = [t for t in m.ties if not t.gated]
    assert len([t for t in m.ties if t.gated]) == 8  # the block-internal groups
    assert [len(t.neurons) for t in tied] == [4, 3, 2]  # stem + 3 blocks; 3 blocks; 2 blocks
    assert tied[0].producers[0] == "body.0" and any("shortcut" in p for p in tied[1].producers)
    assert all(t.units == u for t, u in zip(tied, (128, 256, 512)))
    g = torch.Generator().manual_seed(1)
    acts = {n: torch.rand(t.units, generator=g).tolist() for t in m.ties for n in t.neurons}
    set_activity(m, acts)
    m.update()
    x = torch.rand(2, 3, 8, 8)
    seen = {}
    mods = dict(model.named_modules())
    for t in tied:
        for n in t.neurons:
            mods[n].register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o))
    step(model, st.optimizer, x, st, m)
    model(x)
    for t in tied:
        dead = ~m.channel_masks[t.name]
        assert 0 < int(dead.sum()) < t.units
        for p in t.producers:
            assert float(mods[p].weight.detach()[dead].abs().sum()) == 0.0
            assert float(bn_of_name(mods, t, p).weight.detach()[dead].abs().sum()) == 0.0
        for n in t.neurons:  # the whole residual stream of the channel is silent
            assert float(seen[n][:, :, dead].sum()) == 0.0
    m.close_gates()
    for t in tied:  # the consumers' columns of pruned residual channels are masked at the end
        dead = ~m.channel_masks[t.name]
        for layer, span in t.consumers:
            assert not m.engine.mask(layer)[:, dead.repeat_interleave(span)].any()


def bn_of_name(mods, tie, p):
    return mods[tie.norm_of[p]]


def test_vgg16_bn_hard_sca_prunes_all_13_convs():
    model = create_model("vgg16_bn", width=0.125, T=1)
    m, st = hard(model, keep=0.2, regrow=0.05)
    assert len(m.ties) == 13 and all(t.gated for t in m.ties)
    acts = {t.name: torch.rand(t.units).tolist() for t in m.ties}
    set_activity(m, acts)
    m.update()
    assert m.channel_fraction() == pytest.approx(0.2, abs=0.02)  # no gradient seen yet: nothing regrown
    step(model, st.optimizer, model.example_input(2), st, m)


def test_hard_sca_in_the_users_loop_and_remove():
    torch.manual_seed(0)
    model = liven(conv((8, 12)))
    opt = torch.optim.Adam(model.parameters(), 1e-2, weight_decay=1e-4)
    pruner = spikeprune.prune(model, "sca", optimizer=opt, epochs=4, steps_per_epoch=3, seed=0, mode="hard",
                              start_epoch=0, keep=0.5, regrow=0.1, target_keep=0.3, ramp=0.5, min_channels=1)
    g = torch.Generator().manual_seed(0)
    for _ in range(4):
        for _ in range(3):
            x = torch.rand(4, 1, 8, 8, generator=g)
            F.cross_entropy(model(x).mean(0), torch.randint(0, 10, (4,), generator=g)).backward()
            opt.step()
            opt.zero_grad()
            pruner.step()
            for name, t in ((t.name, t) for t in pruner.method.ties):
                dead = ~pruner.method.channel_masks[name]
                for p in t.producers:
                    assert float(dict(model.named_modules())[p].weight.detach()[dead].abs().sum()) == 0.0
        pruner.epoch_end({"val_acc": 0.5})
    pruner.finish()
    assert pruner.method.channel_fraction() == pytest.approx(0.3, abs=0.06)
    for n, um in pruner.engine.unit_masks().items():  # gates closed at the end
        assert torch.equal(um.cpu(), pruner.method.channel_masks[n])
    x = torch.rand(4, 1, 8, 8, generator=g)
    model.eval()
    with torch.no_grad():
        before = model(x)
    small = spikeprune.compact(model)  # the pruned channels are physically removed, same outputs
    kept = sum(int(mm.sum()) for mm in pruner.method.channel_masks.values())
    assert sum(c.out_channels for c in small.modules() if isinstance(c, nn.Conv2d)) == kept < 20
    small.eval()
    with torch.no_grad():
        torch.testing.assert_close(small(x), before)
    pruner.remove()
    with torch.no_grad():
        torch.testing.assert_close(model(x), before)


def test_a_second_method_on_the_pruned_net_starts_from_its_channels():
    m, st = hard(keep=0.4, regrow=0.0)
    set_activity(m, {"body.4": ACT3, "body.8": ACT7})
    m.update()
    again, _ = hard(st.model, keep=0.4, regrow=0.0)
    assert {n: v.tolist() for n, v in again.channel_masks.items()} == \
        {n: v.tolist() for n, v in m.channel_masks.items()}
    assert again.channel_fraction() == pytest.approx(0.4)
