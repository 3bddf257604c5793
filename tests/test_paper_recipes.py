"""The paper recipes (``configs/paper/`` and the ANN-to-SNN row in ``configs/convert/``) and ``spikeprune reproduce``.

* Every recipe trains for 2 steps on generated data of the real format and shape, written into a temporary folder
  that ``data.root`` points at: MNIST IDX files (gzip), CIFAR-10/100 pickle batches, and CIFAR10-DVS event files
  read through ``spikeprune.data.events`` (with a small stand-in for the optional ``tonic`` package: events in
  tonic's structured ``x, y, t, p`` form on the 128x128 sensor, binned by a ``ToFrame`` into ``[T, 2, H, W]``).
  The recipe's own augmentation is on and is checked to run on every training batch.
* Every recipe's header has a ``# sources:`` block naming each setting (the convention below) with a provenance tag.
* ``spikeprune reproduce`` lists every row, every ``configs/paper`` recipe is some row's, and one row runs end to end
  through the command line and prints the paper's number beside ours.

Header convention: after the free text, a line ``# sources:`` opens a block of lines ``#   KEYS: text`` (continuation
lines start with ``#     ``). ``KEYS`` is a comma-separated list of dotted keys of the recipe; the text carries a tag
``[V]``, ``[S]``, ``[R]`` or ``[R+]`` (combined forms such as ``[S/R]`` count). Every leaf setting of the recipe other
than ``name`` (and ``method: null``, a dense baseline) must be named by a key equal to it or above it
(``model.neuron`` covers ``model.neuron.tau``), and every named key must exist in the recipe.
"""

from __future__ import annotations

import gzip
import json
import pickle
import re
import struct
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch

from spikeprune import reproduce
from spikeprune.config import load_config
from spikeprune.schema import read_yaml

ROOT = Path(__file__).resolve().parents[1]
PAPER = sorted((ROOT / "configs" / "paper").glob("*.yaml"))
CONVERT = [ROOT / r.recipe for r in reproduce.ROWS if r.kind == "convert"]
TAG = re.compile(r"\[(V|S|R\+?)(/[VSR]\+?)*( [^\]]*)?\]")

N_TRAIN, N_TEST = 8, 4  # per static dataset; DVS: 2 files per class (1 train + 1 test after the 90% split)


# ------------------------------------------------------------------------------------------- generated data
def _idx(path: Path, arr: np.ndarray) -> None:
    type_byte = {np.dtype(np.uint8): 0x08}[arr.dtype]
    head = bytes([0, 0, type_byte, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    path.write_bytes(gzip.compress(head + arr.tobytes()))


def _write_mnist(root: Path, rng: np.random.Generator) -> None:
    for split, n in (("train", N_TRAIN), ("t10k", N_TEST)):
        _idx(root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28), dtype=np.uint8))
        _idx(root / f"{split}-labels-idx1-ubyte.gz", (np.arange(n) % 10).astype(np.uint8))


def _batch(path: Path, n: int, label_key: bytes, classes: int, rng: np.random.Generator) -> None:
    entry = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
             label_key: [int(v) for v in np.arange(n) % classes], b"batch_label": b"generated"}
    path.write_bytes(pickle.dumps(entry, protocol=2))


def _write_cifar(root: Path, rng: np.random.Generator) -> None:
    c10 = root / "cifar-10-batches-py"
    c10.mkdir()
    for i in range(1, 6):
        _batch(c10 / f"data_batch_{i}", N_TRAIN // 4 or 1, b"labels", 10, rng)
    _batch(c10 / "test_batch", N_TEST, b"labels", 10, rng)
    c100 = root / "cifar-100-python"
    c100.mkdir()
    _batch(c100 / "train", N_TRAIN, b"fine_labels", 100, rng)
    _batch(c100 / "test", N_TEST, b"fine_labels", 100, rng)


EVENT_DTYPE = np.dtype([("x", "<i2"), ("y", "<i2"), ("t", "<i8"), ("p", "<i2")])  # tonic's event layout
DVS_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def _write_dvs(root: Path, rng: np.random.Generator) -> None:
    for c in DVS_CLASSES:
        folder = root / "CIFAR10DVS" / c
        folder.mkdir(parents=True)
        for i in range(2):
            n = 3000
            ev = np.zeros(n, EVENT_DTYPE)
            ev["x"], ev["y"] = rng.integers(0, 128, n), rng.integers(0, 128, n)
            ev["t"], ev["p"] = np.sort(rng.integers(0, 1_000_000, n)), rng.integers(0, 2, n)
            np.save(folder / f"cifar10_{c}_{i}.npy", ev)


def _tonic_stand_in() -> types.ModuleType:
    """Just what ``spikeprune.data.events`` uses of tonic: ``datasets.CIFAR10DVS`` and ``transforms.ToFrame``."""

    class ToFrame:
        def __init__(self, sensor_size, n_time_bins):
            self.sensor_size, self.n = sensor_size, n_time_bins

        def __call__(self, ev):
            W, H, P = self.sensor_size
            t = ev["t"] - ev["t"].min()
            b = np.minimum((t * self.n) // (int(t.max()) + 1), self.n - 1)
            frames = np.zeros((self.n, P, H, W), np.int16)
            np.add.at(frames, (b, ev["p"], ev["y"], ev["x"]), 1)
            return frames

    class CIFAR10DVS:
        sensor_size = (128, 128, 2)

        def __init__(self, save_to, transform=None):
            folder = Path(save_to) / "CIFAR10DVS"
            self.data, self.targets = [], []
            for k, c in enumerate(DVS_CLASSES):
                files = sorted(str(p) for p in (folder / c).glob("*.npy"))
                self.data += files
                self.targets += [k] * len(files)
            self.transform = transform

        def __len__(self):
            return len(self.data)

        def __getitem__(self, i):
            ev = np.load(self.data[i])
            return (self.transform(ev) if self.transform else ev), self.targets[i]

    tonic = types.ModuleType("tonic")
    tonic.datasets = types.SimpleNamespace(CIFAR10DVS=CIFAR10DVS)
    tonic.transforms = types.SimpleNamespace(ToFrame=ToFrame)
    return tonic


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("paper_data")
    rng = np.random.default_rng(0)
    _write_mnist(root, rng)
    _write_cifar(root, rng)
    _write_dvs(root, rng)
    return root


@pytest.fixture
def tonic(monkeypatch):
    monkeypatch.setitem(sys.modules, "tonic", _tonic_stand_in())


def _quiet_checkpoints(monkeypatch) -> None:
    """Skip writing multi-MB checkpoints and model files (run files are tested in test_train.py)."""
    from spikeprune import checkpoint

    monkeypatch.setattr(checkpoint, "save_rotating", lambda obj, *a, **k: None)
    monkeypatch.setattr(checkpoint.os, "fsync", lambda fd: None)
    write = checkpoint.atomic_write
    monkeypatch.setattr(checkpoint, "atomic_write",
                        lambda path, data: None if Path(path).name == "model.pt" else write(path, data))


def _small(tmp_path: Path, data_root: Path, subset: int = 4) -> list[str]:
    return [f"out_dir={json.dumps(str(tmp_path))}", f"data.root={json.dumps(str(data_root))}",
            f"data.subset={subset}", "data.batch_size=2", "data.eval_batch_size=4", "train.epochs=1",
            "train.max_steps_per_epoch=2", "train.checkpoint_every=0", "train.progress=false", "train.device=cpu",
            "measure.max_batches=1"]


# ------------------------------------------------------------------------------------------- 2 steps each
@pytest.mark.parametrize("path", PAPER, ids=lambda p: p.stem)
def test_paper_recipe_trains_two_steps_on_real_format_data(path, data_root, tmp_path, monkeypatch, tonic):
    from spikeprune.data import augment as aug_mod
    from spikeprune.models import list_models
    from spikeprune.train import Trainer

    base = load_config(path)
    if base.model.name not in list_models():
        pytest.skip(f"model {base.model.name!r} is not in the zoo yet (the recipe needs it)")
    assert base.data.augment, "every trained paper recipe augments its training batches"
    subset = 4 if base.data.val_split == 0 else 10  # a validation split keeps at least one sample
    cfg = load_config(path, _small(tmp_path, data_root, subset))
    calls: list[tuple] = []
    real_call = aug_mod.Augment.__call__

    def counted(self, x, generator=None):
        calls.append(tuple(x.shape))
        return real_call(self, x, generator)

    monkeypatch.setattr(aug_mod.Augment, "__call__", counted)
    _quiet_checkpoints(monkeypatch)
    trainer = Trainer(cfg, log=lambda s: None)
    assert trainer.train_loader.augment is not None
    assert trainer.train_loader.augment.spec == aug_mod.AugmentSpec.parse(base.data.augment)
    trainer.fit()

    # both training steps saw augmented batches (a method may draw more through LoopState.next_batch)
    assert trainer.global_step == 2 and len(calls) >= 2, "augmentation ran on every training batch"
    info = trainer.info
    step_shape = (2, *info.in_shape) if info.kind == "static" else (2, info.T, *info.in_shape)
    assert all(c == step_shape for c in calls), f"batches of the real shape {step_shape}, got {calls}"
    res = json.loads((tmp_path / cfg.name / "results.json").read_text())
    assert res["model"] == base.model.name and res["T"] == base.model.T and res["dataset"] == base.data.name
    assert 0.0 <= res["accuracy"] <= 1.0 and 0.0 < res["connectivity"] <= 1.0
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())


def test_trainer_applies_the_recipes_pooled_spike_rule(data_root, tmp_path, monkeypatch):
    from spikeprune.train import Trainer

    path = ROOT / "configs" / "paper" / "cifar10_resnet19_dense.yaml"
    assert load_config(path).measure.pooled_spikes == "sop"
    cfg = load_config(path, _small(tmp_path, data_root) + ["train.max_steps_per_epoch=1"])
    _quiet_checkpoints(monkeypatch)
    Trainer(cfg, log=lambda s: None).fit()
    assert json.loads((tmp_path / cfg.name / "results.json").read_text())["pooled_spikes"] == "sop"


def test_convert_row_runs_on_mnist_idx(data_root, tmp_path, monkeypatch):
    """The ANN-to-SNN LeNet row: ANN for 2 steps, conversion, DynSNN masking, all on the generated MNIST files.
    The convert pipeline applies no ``data.augment`` (its ANN trainer takes none), so the recipe sets none."""
    from spikeprune.convert import load_convert_config, run_convert

    (path,) = CONVERT
    base = load_convert_config(path)
    assert not base.data.augment, "the convert pipeline would ignore data.augment"
    over = [f"out_dir={json.dumps(str(tmp_path))}", f"data.root={json.dumps(str(data_root))}", "data.subset=8",
            "data.val_split=0.0", "data.batch_size=4", "data.eval_batch_size=4", "ann.epochs=1",
            "ann.max_steps_per_epoch=2", "conversion.calib_samples=4", "conversion.Ts=[4]", "conversion.chunk=4",
            "dynsnn.T=4", "dynsnn.calib_samples=4", "measure_batches=1"]
    cfg = load_convert_config(path, over)
    res = run_convert(cfg, log=lambda s: None)
    assert res["dataset"] == "mnist" and res["model"] == "lenet5"
    assert set(res["snn_accuracy"]) == {"4"} and "dynsnn" in res
    ours = reproduce.ours(reproduce.get_row("liu2022/mnist-lenet-ann2snn"), res)
    assert 0.0 <= ours["accuracy"] <= 100.0 and 0.0 <= ours["compression"] <= 100.0


# ------------------------------------------------------------------------------------------- sources in headers
def _leaves(d: dict, prefix: str = "") -> list[str]:
    out = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        out += _leaves(v, key + ".") if isinstance(v, dict) and v else [key]
    return out


def _sources(text: str) -> dict[str, str]:
    """``{key: text}`` of the ``# sources:`` block (continuation lines joined to their entry)."""
    lines = text.splitlines()
    start = lines.index("# sources:")
    entries: list[list[str]] = []
    for line in lines[start + 1:]:
        if not line.startswith("#"):
            break
        if line.startswith("#     "):
            assert entries, f"continuation line before any entry: {line!r}"
            entries[-1][1] += " " + line[6:].strip()
        elif line.startswith("#   ") and ":" in line:
            keys, rest = line[4:].split(":", 1)
            entries.append([keys, rest.strip()])
        else:
            raise AssertionError(f"not a sources entry: {line!r} (want '#   KEYS: text [tag]')")
    out = {}
    for keys, rest in entries:
        for k in keys.split(","):
            out[k.strip()] = rest
    return out


@pytest.mark.parametrize("path", PAPER + CONVERT, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_recipe_header_names_a_source_for_every_setting(path):
    text = path.read_text()
    assert text.startswith("# "), "a paper recipe starts with a comment citing its row"
    assert "\n# sources:\n" in text.split("\nname:")[0] + "\n", "the header has a '# sources:' block"
    src = _sources(text)
    data = read_yaml(path)
    leaves = [k for k in _leaves(data) if k != "name" and not (k == "method" and data[k] is None)]
    for leaf in leaves:
        parts = leaf.split(".")
        named = [".".join(parts[:i]) for i in range(len(parts), 0, -1) if ".".join(parts[:i]) in src]
        assert named, f"{path.name}: setting {leaf!r} has no entry in the sources block"
        assert TAG.search(src[named[0]]), f"{path.name}: the source of {named[0]!r} has no [V]/[S]/[R] tag"
    for key in src:
        node = data
        for p in key.split("."):
            assert isinstance(node, dict) and p in node, f"{path.name}: sources name {key!r}, not in the recipe"
            node = node[p]


# ------------------------------------------------------------------------------------------- reproduce
def test_rows_cover_the_recipes():
    ids = [r.id for r in reproduce.ROWS]
    assert len(ids) == len(set(ids))
    assert all(re.fullmatch(r"[a-z]+20\d\d/[a-z0-9-]+", i) for i in ids)
    recipes = {r.recipe for r in reproduce.ROWS}
    assert {p.relative_to(ROOT).as_posix() for p in PAPER} <= recipes, "every paper recipe is some row's"
    for r in reproduce.ROWS:
        cfg = reproduce.load(r)
        assert cfg.name == Path(r.recipe).stem
        assert r.dense is None or reproduce.get_row(r.dense).dense is None
    # the numbers docs/methods.md §3/§4.2 give
    want = {"liu2022/mnist-3fc-57": (99.23, 57.4), "liu2022/mnist-3fc-70": (98.98, 69.7),
            "liu2022/mnist-lenet-ann2snn": (99.15, 61.5), "shen2025/cifar10-resnet19-t2-headline": (92.48, 40.58),
            "shen2025/cifar10-resnet19-t2-layer": (92.38, 29.72), "shen2025/cifar10-resnet19-t2-neuron": (92.1, 26.63),
            "shen2025/cifar100-resnet19-t2-layer": (70.3, 29.48), "shen2025/dvscifar10-vggsnn-layer": (78.4, 30.0)}
    for i, (acc, sp) in want.items():
        r = reproduce.get_row(i)
        assert (r.accuracy, r.sparsity[1]) == (acc, sp)
    assert reproduce.get_row("shen2025/cifar10-resnet19-t2-gradual").accuracy == 91.99
    # PQ rows aimed at a connectivity land on it: the recipe's target is the row's number
    for r in reproduce.ROWS:
        method = reproduce.load(r).method if r.kind == "train" else None
        if method and method["name"] == "pq_rewire" and method.get("target_density") is not None:
            assert r.sparsity == ("connectivity", pytest.approx(100 * method["target_density"]))
    with pytest.raises(ValueError, match="did you mean"):
        reproduce.get_row("shen2025/cifar10-resnet19-layer")


def test_cli_lists_and_runs_a_row(data_root, tmp_path, monkeypatch, capsys):
    from spikeprune.cli import main

    assert main(["reproduce"]) == 0
    listing = capsys.readouterr().out
    for r in reproduce.ROWS:
        assert r.id in listing and r.recipe in listing
    assert "92.38% at 29.72% connectivity" in listing and "CIFAR-10, a GPU" in listing

    _quiet_checkpoints(monkeypatch)
    args = ["reproduce", "liu2022/mnist-3fc-57", "--data-root", str(data_root)]
    for s in _small(tmp_path, data_root):
        if not s.startswith("data.root="):
            args += ["--set", s]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "paper: 99.23% (Δ -0.02) at 57.4% compression" in out
    assert re.search(r"ours:  \d+\.\d\d% at \d+\.\d% compression", out)
    assert "difference (ours - paper)" in out
    assert main(args) == 2, "a run directory holding a run needs --overwrite"
    capsys.readouterr()
    # on another dataset (the generated IDX files serve as Fashion-MNIST too) no difference to the paper is taken
    assert main(args + ["--overwrite", "--set", "data.name=fashion_mnist"]) == 0
    out = capsys.readouterr().out
    assert "ours is on fashion_mnist, the paper's on mnist" in out and "difference (ours - paper)" not in out
    assert "overrides: " in out and "data.name=fashion_mnist" in out
