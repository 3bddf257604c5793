"""``data.augment``: each transform's exact effect, determinism per (seed, epoch, batch), frames moving together,
bad specs refused, and a resumed run seeing the same augmented batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from spikeprune.config import ConfigError, RunConfig, from_dict
from spikeprune.data.augment import Augment, AugmentSpec, make_augment


def batch(b=6, c=2, h=8, w=8, seed=0) -> torch.Tensor:
    return torch.rand((b, c, h, w), generator=torch.Generator().manual_seed(seed))


def test_crop_output_is_a_window_of_the_padded_input():
    x = batch()
    y = Augment(AugmentSpec(crop=2), seed=3)(x)
    padded = F.pad(x, (2, 2, 2, 2))
    offsets = []
    for i in range(len(x)):
        hits = [(a, b) for a in range(5) for b in range(5) if torch.equal(padded[i, :, a:a + 8, b:b + 8], y[i])]
        assert hits, f"sample {i} is no window of its padded input"
        offsets.append(hits[0])
    assert len(set(offsets)) > 1  # drawn per sample


def test_flip_mirrors_about_half_the_samples_exactly():
    x = batch(b=400, c=1, h=4, w=4)
    y = Augment(AugmentSpec(flip=True), seed=1)(x)
    flipped = [torch.equal(y[i], x[i].flip(-1)) for i in range(len(x))]
    kept = [torch.equal(y[i], x[i]) for i in range(len(x))]
    assert all(f or k for f, k in zip(flipped, kept))
    assert 150 < sum(flipped) < 250


def test_roll_is_a_circular_shift_within_the_bound():
    x = batch()
    y = Augment(AugmentSpec(roll=2), seed=5)(x)
    for i in range(len(x)):
        assert any(torch.equal(torch.roll(x[i], (dy, dx), (-2, -1)), y[i]) for dy in range(-2, 3)
                   for dx in range(-2, 3))


def test_cutout_zeroes_one_square_and_keeps_the_rest():
    x = batch(c=1) + 1.0  # no zeros of its own
    y = Augment(AugmentSpec(cutout=4), seed=2)(x)
    for i in range(len(x)):
        zero = y[i, 0] == 0
        assert 1 <= int(zero.sum()) <= 16
        rows, cols = zero.nonzero(as_tuple=True)
        assert rows.max() - rows.min() < 4 and cols.max() - cols.min() < 4
        assert torch.equal(y[i, 0][~zero], x[i, 0][~zero])


def test_rotate_zero_degrees_is_identity_and_keeps_event_counts_integral():
    frames = torch.randint(0, 3, (4, 3, 2, 8, 8)).float()
    y = Augment(AugmentSpec(rotate=30), seed=0)(frames)
    assert torch.equal(y, y.round()) and y.max() <= frames.max()
    assert torch.equal(Augment(AugmentSpec(flip=False), seed=0)(frames), frames)


def test_frames_of_one_sample_move_together():
    frame = batch(b=5, c=1)
    frames = frame.unsqueeze(1).repeat(1, 4, 1, 1, 1)  # [B, T=4, C, H, W], every step the same
    y = Augment(AugmentSpec(crop=2, flip=True, roll=1, cutout=3), seed=7)(frames)
    assert all(torch.equal(y[:, t], y[:, 0]) for t in range(4))


def test_draws_depend_on_seed_epoch_batch_and_rank_only():
    x = batch()
    a = Augment(AugmentSpec(crop=2, flip=True), seed=1)
    assert torch.equal(a.at(3, 7)(x), a.at(3, 7)(x))
    assert not torch.equal(a.at(3, 7)(x), a.at(3, 8)(x))
    assert not torch.equal(a.at(3, 7)(x), a.at(4, 7)(x))
    assert not torch.equal(a.at(3, 7, rank=0)(x), a.at(3, 7, rank=1)(x))


@pytest.mark.parametrize("spec, key", [({"crop": -1}, "crop"), ({"crop": 1.5}, "crop"), ({"flip": 1}, "flip"),
                                       ({"rotate": 400}, "rotate"), ({"rotate": float("nan")}, "rotate"),
                                       ({"jitter": 1}, "jitter"), ({"cutout": True}, "cutout")])
def test_bad_spec_names_the_key(spec, key):
    with pytest.raises(ConfigError, match=f"data.augment.{key}"):
        from_dict(RunConfig, {"data": {"augment": spec}})


def test_empty_spec_is_no_augmentation():
    assert make_augment({}) is None and make_augment(None) is None


def test_training_with_augmentation_resumes_bit_identically(tmp_path):
    from spikeprune.train import Trainer

    def cfg(name, **train):
        return from_dict(RunConfig, {
            "name": name, "seed": 2, "out_dir": str(tmp_path),
            "model": {"name": "fc3", "T": 2, "neuron": {"type": "lif", "tau": 2.0, "v_threshold": 0.25},
                      "options": {"hidden": [16, 12], "image_size": 8}},
            "data": {"name": "synthetic", "batch_size": 16, "augment": {"crop": 1, "flip": True},
                     "options": {"n": 48, "in_shape": [1, 8, 8], "num_classes": 4}},
            "train": {"epochs": 2, "lr": 0.01, "progress": False, "device": "cpu", **train}})

    ref = Trainer(cfg("ref"), log=lambda *a: None)
    ref.fit()
    c = cfg("cut", checkpoint_every=2)
    t = Trainer(c, log=lambda *a: None)

    class Stop(Exception):
        pass

    def stop_after_save(step=[0]):  # noqa: B006 -- a counter
        raise Stop

    t.save, real_save = (lambda: (real_save(), stop_after_save()) if t.global_step == 4 else real_save()), t.save
    with pytest.raises(Stop):
        t.fit()
    Trainer(c, log=lambda *a: None).fit(resume=True)
    a = torch.load(ref.run_dir / "model.pt", weights_only=True)
    b = torch.load(c.run_dir / "model.pt", weights_only=True)
    assert all(torch.equal(a[k], b[k]) for k in a)
