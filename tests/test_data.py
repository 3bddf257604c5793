"""Tests of spikeprune.data: file formats read exactly, search paths and errors, loaders and splits."""

from __future__ import annotations

import gzip
import pickle
import struct
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spikeprune.data import (
    DatasetInfo,
    DatasetNotFoundError,
    EventLoader,
    FastLoader,
    InMemoryDataset,
    build_loaders,
    create_dataset,
    dataset_info,
    list_datasets,
    read_idx,
    split_indices,
)
from spikeprune.data import idx as idx_module

FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
DEBIAN_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def _no_env(monkeypatch):
    monkeypatch.delenv("SPIKEPRUNE_DATA", raising=False)


def idx_bytes(arr: np.ndarray, type_code: int = 0x08) -> bytes:
    return bytes([0, 0, type_code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_idx(path: Path, arr: np.ndarray, gz: bool = True) -> None:
    data = idx_bytes(arr.astype(np.uint8))
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        Path(str(path) + ".gz").write_bytes(gzip.compress(data))
    else:
        path.write_bytes(data)


def write_mnist(folder: Path, gz: bool = True, sizes=(("train", 5), ("test", 3))) -> dict:
    rng = np.random.default_rng(1)
    out = {}
    for split, n in sizes:
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, n, dtype=np.uint8)
        write_idx(folder / FILES[split][0], images, gz)
        write_idx(folder / FILES[split][1], labels, gz)
        out[split] = (images, labels)
    return out


# ---------------------------------------------------------------- IDX / MNIST / Fashion-MNIST


def test_read_idx_exact_and_big_endian(tmp_path):
    a = np.array([[1, -2, 300], [70000, 5, -6]], dtype=">i4")
    (tmp_path / "a.idx").write_bytes(idx_bytes(a, 0x0C))
    got = read_idx(tmp_path / "a.idx")
    assert got.dtype == np.int32 and got.shape == (2, 3)
    assert got.tolist() == [[1, -2, 300], [70000, 5, -6]]


@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_reads_files_exactly(tmp_path, gz):
    written = write_mnist(tmp_path / "FashionMNIST" / "raw", gz=gz)
    for split, (images, labels) in written.items():
        ds = create_dataset("fashion_mnist", split, root=tmp_path)
        assert isinstance(ds, InMemoryDataset)
        assert ds.x.dtype == torch.uint8 and ds.x.shape == (len(labels), 1, 28, 28)
        assert np.array_equal(ds.x[:, 0].numpy(), images)
        assert ds.y.tolist() == labels.tolist() and ds.y.dtype == torch.int64
        assert ds.info == DatasetInfo("fashion_mnist", (1, 28, 28), 10, "static")
    x0, y0 = ds[0]
    assert x0.dtype == torch.float32 and x0.shape == (1, 28, 28) and y0 == int(labels[0])
    want = (images[0, 3, 4] / 255 - 0.2860) / 0.3530
    assert x0[0, 3, 4].item() == pytest.approx(want, abs=1e-6)


def test_fashion_mnist_found_via_env_var(tmp_path, monkeypatch):
    written = write_mnist(tmp_path / "fashion-mnist", sizes=(("test", 4),))
    monkeypatch.setenv("SPIKEPRUNE_DATA", str(tmp_path))
    ds = create_dataset("fashion_mnist", "test")
    assert np.array_equal(ds.x[:, 0].numpy(), written["test"][0])


def test_mnist_torchvision_and_plain_layouts(tmp_path):
    tv = write_mnist(tmp_path / "tv" / "MNIST" / "raw")
    plain = write_mnist(tmp_path / "plain", sizes=(("train", 2), ("test", 7)))
    assert create_dataset("mnist", "train", root=tmp_path / "tv").y.tolist() == tv["train"][1].tolist()
    ds = create_dataset("mnist", "test", root=str(tmp_path / "plain"))
    assert len(ds) == 7 and np.array_equal(ds.x[:, 0].numpy(), plain["test"][0])


def test_corrupt_idx_files_raise_clear_errors(tmp_path):
    good = idx_bytes(np.zeros((2, 28, 28), np.uint8))
    cases = {"magic": b"\x08\x03" + good[2:], "short": good[:-5], "gzip": gzip.compress(good)[:-9]}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "magic")
    with pytest.raises(ValueError, match="corrupt IDX file"):
        read_idx(tmp_path / "short")
    with pytest.raises(ValueError, match="corrupt gzip"):
        read_idx(tmp_path / "gzip")
    # a labels file where images belong is rejected with the file's path
    write_mnist(tmp_path / "swap", sizes=(("test", 3),))
    lbl = tmp_path / "swap" / (FILES["test"][1] + ".gz")
    (tmp_path / "swap" / (FILES["test"][0] + ".gz")).write_bytes(lbl.read_bytes())
    with pytest.raises(ValueError, match="t10k-images-idx3-ubyte.gz: expected uint8 images"):
        create_dataset("mnist", "test", root=tmp_path / "swap")


def test_missing_dataset_message_lists_every_path(tmp_path, monkeypatch):
    monkeypatch.setenv("SPIKEPRUNE_DATA", str(tmp_path / "env"))
    with pytest.raises(DatasetNotFoundError) as e:
        create_dataset("mnist", "test", root=tmp_path / "r")
    assert isinstance(e.value, FileNotFoundError)
    msg = str(e.value)
    # an explicit root is the only place searched: no fallback to $SPIKEPRUNE_DATA or a system copy
    tried = [tmp_path / "r", tmp_path / "r" / "mnist", tmp_path / "r" / "MNIST" / "raw"]
    assert [line.strip() for line in msg.splitlines()[1:4]] == [str(p) for p in tried]
    assert str(tmp_path / "env") not in msg
    assert "'mnist' (test split)" in msg and "download=True" in msg and "SPIKEPRUNE_DATA" in msg
    with pytest.raises(DatasetNotFoundError) as e:  # without a root: $SPIKEPRUNE_DATA, then the system folders
        create_dataset("mnist", "test")
    tried = [tmp_path / "env", tmp_path / "env" / "mnist", tmp_path / "env" / "MNIST" / "raw"]
    assert [line.strip() for line in str(e.value).splitlines()[1:4]] == [str(p) for p in tried]


def test_missing_fashion_mnist_suggests_apt(tmp_path, monkeypatch):
    monkeypatch.setattr(idx_module, "FASHION_SYSTEM_DIRS", (str(tmp_path / "debian"),))
    monkeypatch.setenv("SPIKEPRUNE_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError) as e:
        create_dataset("fashion_mnist")
    msg = str(e.value)
    assert "apt-get install dataset-fashion-mnist" in msg
    assert f"  {tmp_path / 'FashionMNIST' / 'raw'}\n" in msg and f"  {tmp_path / 'debian'}\n" in msg


def test_download_without_torchvision_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torchvision", None)
    for name in ("mnist", "cifar10"):
        with pytest.raises(ImportError, match="pip install torchvision"):
            create_dataset(name, root=tmp_path, download=True)


@pytest.mark.skipif(not (DEBIAN_FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="Debian dataset-fashion-mnist not installed")
def test_debian_fashion_mnist():
    train, test = create_dataset("fashion_mnist", "train"), create_dataset("fashion_mnist", "test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert torch.bincount(train.y).tolist() == [6000] * 10
    assert torch.bincount(test.y).tolist() == [1000] * 10
    assert train.y[:3].tolist() == [9, 0, 0] and test.y[:3].tolist() == [9, 2, 1]


# ---------------------------------------------------------------- CIFAR


def write_cifar_batch(path: Path, data: np.ndarray, labels: list[int], key: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(pickle.dumps({b"batch_label": b"x", b"data": data, key: labels}))


def test_cifar10_reads_batches_exactly(tmp_path):
    rng = np.random.default_rng(2)
    folder = tmp_path / "cifar-10-batches-py"
    rows, labels = [], []
    for i in range(1, 6):
        d, l = rng.integers(0, 256, (2, 3072), dtype=np.uint8), [i, 9 - i]
        write_cifar_batch(folder / f"data_batch_{i}", d, l, b"labels")
        rows.append(d)
        labels += l
    test_rows = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    write_cifar_batch(folder / "test_batch", test_rows, [7, 8, 0], b"labels")

    train = create_dataset("cifar10", "train", root=tmp_path)
    rows = np.concatenate(rows)
    assert train.x.shape == (10, 3, 32, 32) and train.x.dtype == torch.uint8
    assert train.y.tolist() == labels
    assert np.array_equal(train.x.reshape(10, -1).numpy(), rows)
    # channel-major layout: red plane first, row by row
    assert train.x[4, 1, 0, 0].item() == rows[4, 1024] and train.x[4, 0, 1, 2].item() == rows[4, 34]
    test = create_dataset("cifar10", "test", root=tmp_path)
    assert test.y.tolist() == [7, 8, 0] and np.array_equal(test.x.reshape(3, -1).numpy(), test_rows)
    x, y = test[2]
    assert y == 0
    assert x[2, 0, 0].item() == pytest.approx((test_rows[2, 2048] / 255 - 0.4465) / 0.2616, abs=1e-6)


def test_cifar100_fine_labels(tmp_path):
    folder = tmp_path / "cifar-100-python"
    data = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072).astype(np.uint8)
    write_cifar_batch(folder / "train", data, [99, 42], b"fine_labels")
    ds = create_dataset("cifar100", "train", root=folder)  # the folder itself is also searched
    assert ds.y.tolist() == [99, 42] and ds.info.num_classes == 100
    assert np.array_equal(ds.x.reshape(2, -1).numpy(), data)
    with pytest.raises(FileNotFoundError, match="'cifar100' \\(test split\\)"):
        create_dataset("cifar100", "test", root=tmp_path)


# ---------------------------------------------------------------- digits, synthetic, registry


def test_digits_split():
    datasets = pytest.importorskip("sklearn.datasets")
    train, test = create_dataset("digits", "train"), create_dataset("digits", "test")
    assert len(train) == 1438 and len(test) == 359
    assert train.x.shape[1:] == (1, 8, 8) and train.x.dtype == torch.float32
    assert train.x.min().item() == 0.0 and train.x.max().item() == 1.0
    full = torch.tensor(datasets.load_digits().data, dtype=torch.float32) / 16
    rows = torch.cat([train.x, test.x]).reshape(-1, 64)
    assert sorted(map(tuple, rows.tolist())) == sorted(map(tuple, full.tolist()))  # a partition of all 1797
    assert torch.equal(create_dataset("digits", "test").y, test.y)


def test_digits_without_sklearn(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn", None)
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match="pip install scikit-learn"):
        create_dataset("digits")


def test_synthetic_is_deterministic_and_learnable():
    a = create_dataset("synthetic", n=300, in_shape=(2, 6, 6), num_classes=3, seed=4)
    b = create_dataset("synthetic", n=300, in_shape=[2, 6, 6], num_classes=3, seed=4)
    assert torch.equal(a.x, b.x) and torch.equal(a.y, b.y)
    assert a.x.shape == (300, 2, 6, 6) and a.info.in_shape == (2, 6, 6)
    assert torch.bincount(a.y).tolist() == [100, 100, 100]
    assert not torch.equal(create_dataset("synthetic", n=300, seed=5).x, create_dataset("synthetic", n=300).x)
    test = create_dataset("synthetic", "test", n=300, in_shape=(2, 6, 6), num_classes=3, seed=4)
    assert not torch.equal(test.x, a.x)
    # nearest class mean fitted on train classifies the test split almost perfectly
    means = torch.stack([a.x[a.y == c].float().mean(0) for c in range(3)]).flatten(1)
    pred = torch.cdist(test.x.float().flatten(1), means).argmin(1)
    assert (pred == test.y).float().mean().item() > 0.95


def test_registry_names_info_and_errors():
    assert list_datasets() == ["cifar10", "cifar100", "digits", "dvs_cifar10", "fashion_mnist", "mnist",
                               "synthetic"]
    assert dataset_info("cifar100") == DatasetInfo("cifar100", (3, 32, 32), 100, "static")
    assert dataset_info("dvs_cifar10", T=4) == DatasetInfo("dvs_cifar10", (2, 48, 48), 10, "events", 4)
    assert dataset_info("synthetic", in_shape=(3, 4, 4)).in_shape == (3, 4, 4)
    with pytest.raises(ValueError, match="unknown dataset 'imagenet'; available: cifar10, cifar100"):
        create_dataset("imagenet")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        create_dataset("synthetic", "val")
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['colour'\]"):
        create_dataset("synthetic", colour=True)


def test_dvs_cifar10_without_tonic(monkeypatch):
    monkeypatch.setitem(sys.modules, "tonic", None)
    with pytest.raises(ImportError, match="pip install tonic"):
        create_dataset("dvs_cifar10", T=5)


# ---------------------------------------------------------------- FastLoader and build_loaders


def indexed(n: int) -> InMemoryDataset:
    """Sample i has label i and pixel value i, so batches reveal which samples they hold."""
    x = torch.arange(n, dtype=torch.float32).reshape(n, 1, 1, 1)
    return InMemoryDataset(x, torch.arange(n), DatasetInfo("idx", (1, 1, 1), n))


def epoch_labels(loader, epoch: int) -> list[int]:
    loader.set_epoch(epoch)
    return torch.cat([y for _, y in loader]).tolist()


def test_fastloader_covers_each_sample_once():
    loader = FastLoader(indexed(103), batch_size=10, shuffle=True, seed=3)
    assert len(loader) == 11
    batches = list(loader)
    assert [len(y) for _, y in batches] == [10] * 10 + [3]
    assert all(x.dtype == torch.float32 and x.shape[1:] == (1, 1, 1) for x, _ in batches)
    ys = torch.cat([y for _, y in batches])
    assert sorted(ys.tolist()) == list(range(103)) and ys.tolist() != list(range(103))
    assert torch.equal(torch.cat([x for x, _ in batches]).flatten(), ys.float())  # x and y stay paired
    dropped = FastLoader(indexed(103), batch_size=10, shuffle=True, drop_last=True)
    assert len(dropped) == 10 and sum(len(y) for _, y in dropped) == 100
    assert epoch_labels(FastLoader(indexed(7), 3), 5) == list(range(7))  # no shuffle: in order


def test_fastloader_is_deterministic_per_seed_and_epoch():
    a, b = FastLoader(indexed(50), 8, shuffle=True, seed=1), FastLoader(indexed(50), 8, shuffle=True, seed=1)
    assert epoch_labels(a, 0) == epoch_labels(b, 0) == epoch_labels(a, 0)
    assert epoch_labels(a, 1) == epoch_labels(b, 1) != epoch_labels(a, 0)
    assert epoch_labels(FastLoader(indexed(50), 8, shuffle=True, seed=2), 0) != epoch_labels(a, 0)
    assert epoch_labels(FastLoader(indexed(50), 8, shuffle=True, seed=0), 1) == epoch_labels(a, 0)


@pytest.mark.parametrize("n", [100, 103])
def test_fastloader_splits_across_ranks(n):
    loaders = [FastLoader(indexed(n), 16, shuffle=True, seed=7, rank=r, world_size=2) for r in range(2)]
    parts = [epoch_labels(ld, 2) for ld in loaders]
    assert len(loaders[0]) == len(loaders[1]) == 4
    assert len(parts[0]) == len(parts[1]) == (52 if n == 103 else 50)
    assert set(parts[0]) | set(parts[1]) == set(range(n))
    overlap = set(parts[0]) & set(parts[1])
    assert len(overlap) == (0 if n == 100 else 1)  # padding repeats one sample for 103 = 2 * 52 - 1
    single = epoch_labels(FastLoader(indexed(n), 16, shuffle=True, seed=7), 2)
    assert parts[0] == single[0::2][:52] and parts[1][:len(single[1::2])] == single[1::2]


def test_fastloader_normalises_uint8_per_batch():
    x = torch.tensor([0, 51, 255, 102], dtype=torch.uint8).reshape(2, 2, 1, 1)
    info = DatasetInfo("t", (2, 1, 1), 2)
    ds = InMemoryDataset(x, torch.tensor([0, 1]), info, mean=(0.2, 0.4), std=(0.5, 2.0))
    (xb, yb), = list(FastLoader(ds, 4, augment=lambda t: t * 2))
    expect = torch.tensor([[(0 - 0.2) / 0.5, (0.4 - 0.4) / 2], [(2 - 0.2) / 0.5, (0.8 - 0.4) / 2]])
    assert torch.allclose(xb.reshape(2, 2), expect) and yb.tolist() == [0, 1]
    assert ds.x.dtype == torch.uint8 and ds.x.flatten().tolist() == [0, 51, 255, 102]  # data untouched


def test_build_loaders_val_split_and_subset():
    train, val, test, info = build_loaders("synthetic", batch_size=32, eval_batch_size=64, val_split=0.25,
                                           seed=1, n=200)
    assert info == DatasetInfo("synthetic", (1, 28, 28), 10, "static")
    assert (len(train.dataset), len(val.dataset), len(test.dataset)) == (150, 50, 200)
    assert (len(train), len(val), len(test)) == (5, 1, 4)
    full = create_dataset("synthetic", n=200)
    tr_idx, val_idx = split_indices(200, 0.25, 1)
    assert torch.equal(train.dataset.x, full.x[tr_idx]) and torch.equal(val.dataset.x, full.x[val_idx])
    assert not set(tr_idx.tolist()) & set(val_idx.tolist())
    assert sorted(tr_idx.tolist() + val_idx.tolist()) == list(range(200))
    rows = {bytes(r.numpy()) for r in train.dataset.x}
    assert not rows & {bytes(r.numpy()) for r in val.dataset.x}
    _, val2, _, _ = build_loaders("synthetic", val_split=0.25, seed=1, n=200)
    assert torch.equal(val2.dataset.y, val.dataset.y)

    train, val, test, _ = build_loaders("synthetic", batch_size=8, subset=40, rank=1, world_size=2, n=200)
    assert val is None and len(train.dataset) == 40 and len(test.dataset) == 200
    assert torch.equal(train.dataset.x, full.x[:40])
    assert (train.rank, train.world_size, len(train), test.world_size) == (1, 2, 3, 1)
    with pytest.raises(ValueError, match="val_split"):
        build_loaders("synthetic", val_split=1.0, n=10)


def test_event_loader_epochs_and_ranks():
    ds = torch.utils.data.TensorDataset(torch.zeros(10, 2, 1, 1, 1), torch.arange(10))
    a, b = EventLoader(ds, 4, shuffle=True, seed=3), EventLoader(ds, 4, shuffle=True, seed=3)
    assert len(a) == 3 and sorted(epoch_labels(a, 0)) == list(range(10))
    assert epoch_labels(a, 1) == epoch_labels(b, 1) != epoch_labels(a, 0) == epoch_labels(b, 0)
    ranks = [EventLoader(ds, 4, shuffle=True, seed=3, rank=r, world_size=2, augment=lambda x: x + 1)
             for r in range(2)]
    parts = [epoch_labels(ld, 2) for ld in ranks]
    assert len(parts[0]) == len(parts[1]) == 5 and sorted(parts[0] + parts[1]) == list(range(10))
    assert next(iter(ranks[0]))[0].eq(1).all()
