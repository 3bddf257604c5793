"""Adversarial tests: what a careless or hostile user can feed the command line and the Python API.

Every case must end in one of: success, or one error line (``spikeprune CMD: error: ...``, exit code 2, no
traceback). None may run code from a file, delete or change a file that is not the run's own, or report a result
that is silently wrong. The table in ``docs/reliability.md`` lists the cases (``python tests/test_reliability.py``
prints it from the same tables as the tests use).

Marker files: every malicious payload, if it ran, would create ``PWNED`` in the test's folder; each such test checks
that it does not exist afterwards.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import pickle
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from spikeprune import checkpoint as ckpt
from spikeprune.cli import main

TINY_MODEL = {"name": "fc3", "T": 2, "neuron": {"type": "lif", "tau": 2.0, "v_threshold": 0.25},
              "options": {"hidden": [16, 12], "image_size": 8}}
TINY_DATA = {"name": "synthetic", "batch_size": 16, "eval_batch_size": 32,
             "options": {"n": 48, "in_shape": [1, 8, 8], "num_classes": 4}}
MAGNITUDE = {"name": "magnitude", "target_density": 0.5, "schedule": "oneshot", "prune_epoch": 0}


def recipe(tmp: Path, name: str = "run", **over) -> dict:
    r = {"name": name, "seed": 1, "out_dir": str(tmp / "runs"), "model": json.loads(json.dumps(TINY_MODEL)),
         "data": json.loads(json.dumps(TINY_DATA)),
         "train": {"epochs": 1, "lr": 0.01, "progress": False, "device": "cpu"}, "method": dict(MAGNITUDE)}
    for k, v in over.items():
        node, parts = r, k.split("__")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return r


def write_recipe(tmp: Path, rec: dict | str, name: str = "recipe.yaml") -> Path:
    p = tmp / name
    p.write_text(rec if isinstance(rec, str) else yaml.safe_dump(rec))
    return p


def cli(*argv: str) -> tuple[int, str, str]:
    """Run the command line in this process; returns (exit code, stdout, stderr). An exception escaping ``main``
    fails the test (that would be a traceback for the user)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main([str(a) for a in argv])
        except SystemExit as e:  # argparse's own usage errors
            code = e.code
    return code, out.getvalue(), err.getvalue()


def refused(result: tuple[int, str, str], *needles: str) -> str:
    """Assert one clean error (exit 2, no traceback, the needles in the error) and return it."""
    code, _, err = result
    assert "Traceback" not in err, err
    assert code == 2, f"exit {code}: {err}"
    line = next((ln for ln in err.splitlines() if "error:" in ln), "")
    assert line, err
    text = err[err.index(line):]
    for n in needles:
        assert n in text, f"{n!r} not in {text!r}"
    return text


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


class Evil:
    """Unpickling this creates the marker file: the shape of every code-execution payload."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def evil_torch_bytes(marker: Path, state: dict | None = None) -> bytes:
    buf = io.BytesIO()
    torch.save({**(state or {}), "payload": Evil(marker)}, buf)
    return buf.getvalue()


def sign_model(path: Path) -> None:
    """What a forger does: a matching ``.sha256`` beside a forged ``model.pt`` (the checksum is no defence)."""
    path.with_name(path.name + ".sha256").write_text(f"{hashlib.sha256(path.read_bytes()).hexdigest()}  {path.name}\n")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished magnitude-pruned run (1 epoch on synthetic 8x8 data): copied by ``run_copy`` for each test."""
    tmp = tmp_path_factory.mktemp("finished")
    assert cli("train", "-c", write_recipe(tmp, recipe(tmp)))[0] == 0
    return tmp / "runs" / "run"


@pytest.fixture
def run_copy(finished, tmp_path) -> Path:
    dst = tmp_path / "runs" / "run"
    shutil.copytree(finished, dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["out_dir"] = str(tmp_path / "runs")
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


# ============================================================================================== config
# (case id, recipe change, words the error must contain)
BAD_VALUES = [
    ("lr-inf", {"train__lr": float("inf")}, "train.lr", "finite"),
    ("lr-nan", {"train__lr": float("nan")}, "train.lr", "finite"),
    ("lr-negative", {"train__lr": -0.1}, "train.lr", "> 0"),
    ("lr-zero", {"train__lr": 0.0}, "train.lr"),
    ("lr-text", {"train__lr": "fast"}, "train.lr", "number"),
    ("lr-huge-exponent", {"train__lr": "1e999"}, "train.lr", "finite"),
    ("epochs-negative", {"train__epochs": -1}, "train.epochs"),
    ("epochs-float", {"train__epochs": 1.5}, "train.epochs", "integer"),
    ("epochs-bool", {"train__epochs": True}, "train.epochs", "integer"),
    ("epochs-2^70", {"train__epochs": 2 ** 70}, "train.epochs", "out of range"),
    ("T-zero", {"model__T": 0}, "model.T"),
    ("T-5-million", {"model__T": 5_000_000}, "model.T", "10000"),
    ("T-negative", {"model__T": -3}, "model.T"),
    ("T-float", {"model__T": 2.5}, "model.T", "integer"),
    ("options-repeat-T", {"model__options__T": 4}, "model.options.T", "model.T"),
    ("options-repeat-num_classes", {"model__options__num_classes": 10}, "model.options.num_classes"),
    ("options-repeat-in_channels", {"model__options__in_channels": 3}, "model.options.in_channels"),
    ("options-repeat-neuron", {"model__options__neuron": {}}, "model.options.neuron"),
    ("options-repeat-encoding", {"model__options__encoding": "rate"}, "model.options.encoding"),
    ("options-inf", {"model__options__dropout": float("inf")}, "model.options.dropout", "finite"),
    ("v_threshold-inf", {"model__neuron__v_threshold": float("inf")}, "model.neuron.v_threshold", "finite"),
    ("tau-nan", {"model__neuron__tau": float("nan")}, "model.neuron.tau", "finite"),
    ("neuron-type", {"model__neuron__type": "hodgkin"}, "model.neuron"),
    ("neuron-not-mapping", {"model__neuron": "lif"}, "model.neuron", "mapping"),
    ("encoding", {"model__encoding": "morse"}, "model.encoding"),
    ("model-name", {"model__name": "nope"}, "nope"),
    ("device-cpu-abc", {"train__device": "cpu:abc"}, "train.device"),
    ("device-tpu", {"train__device": "tpu"}, "train.device"),
    ("device-cuda-negative", {"train__device": "cuda:-1"}, "train.device"),
    ("device-empty", {"train__device": ""}, "train.device"),
    ("pj_per_ac-inf", {"measure__pj_per_ac": float("inf")}, "measure.pj_per_ac", "finite"),
    ("pj_per_ac-negative", {"measure__pj_per_ac": -1}, "measure.pj_per_ac"),
    ("pj_per_mac-nan", {"measure__pj_per_mac": float("nan")}, "measure.pj_per_mac", "finite"),
    ("max_batches-zero", {"measure__max_batches": 0}, "measure.max_batches"),
    ("name-empty", {"name": ""}, "'name'"),
    ("name-dotdot", {"name": ".."}, "'name'"),
    ("name-dot", {"name": "."}, "'name'"),
    ("name-slash", {"name": "a/b"}, "'name'"),
    ("name-absolute", {"name": "/etc"}, "'name'"),
    ("name-parent", {"name": "../x"}, "'name'"),
    ("name-nul", {"name": "a\0b"}, "'name'"),
    ("name-space", {"name": "my run"}, "'name'"),
    ("name-dash-first", {"name": "-rf"}, "'name'"),
    ("name-not-string", {"name": 5}, "'name'", "string"),
    ("out_dir-empty", {"out_dir": ""}, "out_dir"),
    ("batch-zero", {"data__batch_size": 0}, "data.batch_size"),
    ("batch-negative", {"data__batch_size": -8}, "data.batch_size"),
    ("eval-batch-zero", {"data__eval_batch_size": 0}, "data.eval_batch_size"),
    ("val_split-one", {"data__val_split": 1.0}, "data.val_split"),
    ("val_split-negative", {"data__val_split": -0.1}, "data.val_split"),
    ("subset-zero", {"data__subset": 0}, "data.subset"),
    ("data-options-nan", {"data__options__noise": float("nan")}, "data.options.noise", "finite"),
    ("dataset-unknown", {"data__name": "imagenet22k"}, "imagenet22k"),
    ("label_smoothing", {"train__label_smoothing": 1.5}, "train.label_smoothing"),
    ("momentum-one", {"train__momentum": 1.0}, "train.momentum"),
    ("grad_clip-zero", {"train__grad_clip": 0.0}, "train.grad_clip"),
    ("keep_checkpoints-zero", {"train__keep_checkpoints": 0}, "train.keep_checkpoints"),
    ("tet_lambda", {"train__tet_lambda": 2}, "train.tet_lambda"),
    ("loss", {"train__loss": "hinge"}, "train.loss"),
    ("optimizer", {"train__optimizer": "lbfgs"}, "train.optimizer"),
    ("scheduler", {"train__scheduler": "linear"}, "train.scheduler"),
    ("seed-2^70", {"seed": 2 ** 70}, "seed", "out of range"),
    ("seed-text", {"seed": "one"}, "seed", "integer"),
    ("unknown-top-key", {"lerning_rate": 0.1}, "lerning_rate", "allowed"),
    ("unknown-train-key", {"train__lerning_rate": 0.1}, "train.lerning_rate"),
    ("method-unknown", {"method": {"name": "nope"}}, "nope"),
    ("method-no-name", {"method": {"target_density": 0.5}}, "method.name"),
    ("method-option-unknown", {"method__densty": 0.5}, "method.densty"),
    ("method-option-inf", {"method__target_density": float("inf")}, "method.target_density", "finite"),
    ("method-option-range", {"method__target_density": 1.5}, "method.target_density"),
    ("train-not-mapping", {"train": 5}, "'train'", "mapping"),
]


@pytest.mark.parametrize("case, change, needles", [(c[0], c[1], c[2:]) for c in BAD_VALUES],
                         ids=[c[0] for c in BAD_VALUES])
def test_bad_value_is_one_line_before_any_training(tmp_path, case, change, needles):
    path = write_recipe(tmp_path, recipe(tmp_path, **change))
    refused(cli("train", "-c", path), *needles)
    assert not (tmp_path / "runs").exists()  # nothing written before the refusal


NESTED = "a: " + "[" * 2000 + "]" * 2000 + "\n"
BAD_FILES = [
    ("binary-file", b"\x00\x01\x02PK\x03\x04" + bytes(range(256)), "binary"),
    ("utf16-file", "train: {epochs: 1}\n".encode("utf-16"), "UTF-16"),
    ("latin1-file", "name: caf\xe9\n".encode("latin-1"), "UTF-8"),
    ("yaml-syntax", b"train: {epochs: 1\n", "not valid YAML", "line"),
    ("yaml-tabs", b"train:\n\tepochs: 1\n", "not valid YAML"),
    ("list-root", b"- 1\n- 2\n", "mapping"),
    ("scalar-root", b"42\n", "mapping"),
    ("deeply-nested-list", NESTED.encode(), "nested too deeply"),
    ("python-tag", b"name: !!python/object/apply:os.system ['touch PWNED']\n", "not valid YAML"),
    ("too-large", b"# " + b"x" * (2 << 20) + b"\n", "at most"),
]


@pytest.mark.parametrize("case, data, needles", [(c[0], c[1], c[2:]) for c in BAD_FILES],
                         ids=[c[0] for c in BAD_FILES])
def test_bad_config_file_names_the_file(tmp_path, case, data, needles):
    monkey_cwd = os.getcwd()
    os.chdir(tmp_path)
    try:
        path = tmp_path / "recipe.yaml"
        path.write_bytes(data)
        refused(cli("train", "-c", path), str(path), *needles)
        assert not (tmp_path / "PWNED").exists()
    finally:
        os.chdir(monkey_cwd)


def test_missing_config_file_and_directory_as_config(tmp_path):
    refused(cli("train", "-c", tmp_path / "nope.yaml"), "not found", "nope.yaml")
    refused(cli("train", "-c", tmp_path), "not found")


BAD_OVERRIDES = [
    ("set-unclosed-list", "train.lr=[", "train.lr=[", "not valid YAML"),
    ("set-no-equals", "train.lr", "key.sub=value"),
    ("set-empty-key", "=5", "empty key"),
    ("set-double-dot", "train..lr=1", "empty key"),
    ("set-into-scalar", "train.lr.x=1", "not a section"),
    ("set-inf", "train.lr=.inf", "train.lr", "finite"),
    ("set-unknown", "train.lrr=0.1", "train.lrr"),
    ("set-name-escape", "name=../../etc", "'name'"),
]


@pytest.mark.parametrize("case, item, needles", [(c[0], c[1], c[2:]) for c in BAD_OVERRIDES],
                         ids=[c[0] for c in BAD_OVERRIDES])
def test_bad_override_is_one_line(tmp_path, case, item, needles):
    path = write_recipe(tmp_path, recipe(tmp_path))
    refused(cli("train", "-c", path, "--set", item), *needles)
    assert not (tmp_path / "runs").exists()


# ================================================================================================ data
def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.astype(">u1").tobytes()


def write_fmnist(folder: Path, n_train: int = 32, n_test: int = 16, skip: tuple[str, ...] = (),
                 corrupt: dict[str, bytes] | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    files = {"train-images-idx3-ubyte": g.integers(0, 255, (n_train, 28, 28)),
             "train-labels-idx1-ubyte": np.arange(n_train) % 10,
             "t10k-images-idx3-ubyte": g.integers(0, 255, (n_test, 28, 28)),
             "t10k-labels-idx1-ubyte": np.arange(n_test) % 10}
    for stem, arr in files.items():
        if stem in skip:
            continue
        data = (corrupt or {}).get(stem) or idx_bytes(np.asarray(arr))
        (folder / (stem + ".gz")).write_bytes(gzip.compress(data))
    return folder


def fmnist_recipe(tmp: Path, root: Path | None) -> Path:
    rec = recipe(tmp, model={"name": "fc3", "T": 2, "options": {"hidden": [8, 8]}})
    rec["data"] = {"name": "fashion_mnist", "batch_size": 16, "eval_batch_size": 16}
    if root is not None:
        rec["data"]["root"] = str(root)
    return write_recipe(tmp, rec)


DATA_CASES = [
    ("root-missing", lambda t: t / "nowhere", "not found", "nowhere"),
    ("root-empty-dir", lambda t: (t / "empty").mkdir() or t / "empty", "not found", "empty"),
    ("root-incomplete", lambda t: write_fmnist(t / "part", skip=("t10k-labels-idx1-ubyte",)), "not found", "t10k"),
    ("idx-bad-magic", lambda t: write_fmnist(t / "m", corrupt={"train-images-idx3-ubyte": b"\x01\x02\x03\x04"}),
     "not an IDX file"),
    ("idx-truncated", lambda t: write_fmnist(t / "tr", corrupt={
        "train-images-idx3-ubyte": idx_bytes(np.zeros((32, 28, 28)))[:500]}), "corrupt IDX"),
    ("idx-huge-header", lambda t: write_fmnist(t / "h", corrupt={
        "train-images-idx3-ubyte": bytes([0, 0, 8, 3]) + struct.pack(">3I", 2 ** 31, 28, 28)}), "corrupt IDX"),
    ("idx-label-count", lambda t: write_fmnist(t / "lc", corrupt={
        "train-labels-idx1-ubyte": idx_bytes(np.arange(5) % 10)}), "labels"),
    ("idx-label-range", lambda t: write_fmnist(t / "lr", corrupt={
        "train-labels-idx1-ubyte": idx_bytes(np.full(32, 200))}), "out of range"),
    ("idx-wrong-shape", lambda t: write_fmnist(t / "ws", corrupt={
        "train-images-idx3-ubyte": idx_bytes(np.zeros((32, 14, 14)))}), "28, 28"),
    ("idx-zero-train", lambda t: write_fmnist(t / "z", n_train=0), "no samples"),
    ("idx-zero-test", lambda t: write_fmnist(t / "zt", n_test=0), "no samples"),
]


@pytest.mark.parametrize("case, make_root, needles", [(c[0], c[1], c[2:]) for c in DATA_CASES],
                         ids=[c[0] for c in DATA_CASES])
def test_bad_data_root_never_falls_back(tmp_path, case, make_root, needles):
    """An explicit root is the only place looked at, even though Debian's Fashion-MNIST may be installed."""
    root = make_root(tmp_path)
    refused(cli("train", "-c", fmnist_recipe(tmp_path, root)), *needles)
    assert not list((tmp_path / "runs").rglob("model.pt"))


def test_data_root_given_is_the_data_used(tmp_path):
    root = write_fmnist(tmp_path / "mine", n_train=32, n_test=16)
    assert cli("train", "-c", fmnist_recipe(tmp_path, root))[0] == 0
    res = json.loads((tmp_path / "runs" / "run" / "results.json").read_text())
    assert res["samples"] == 16  # the 16 test images written here, not Debian's 10,000
    assert json.loads((tmp_path / "runs" / "run" / "config.json").read_text())["data"]["root"] == str(root)


def test_zero_training_samples_refused(tmp_path):
    rec = recipe(tmp_path)
    rec["data"]["options"]["n"] = 0
    refused(cli("train", "-c", write_recipe(tmp_path, rec)), "no samples")


# ---------------------------------------------------------------------------------------------- CIFAR
def cifar_batch(n: int = 4, labels=None, data=None) -> bytes:
    data = np.zeros((n, 3072), np.uint8) if data is None else data
    return pickle.dumps({b"data": data, b"labels": list(range(n)) if labels is None else labels}, protocol=2)


def write_cifar(root: Path, train: bytes | None = None, test: bytes | None = None) -> Path:
    d = root / "cifar-10-batches-py"
    d.mkdir(parents=True, exist_ok=True)
    for i in range(1, 6):
        (d / f"data_batch_{i}").write_bytes(train if (train is not None and i == 1) else cifar_batch())
    (d / "test_batch").write_bytes(test if test is not None else cifar_batch())
    return root


def cifar_recipe(tmp: Path, root: Path) -> Path:
    rec = recipe(tmp, model={"name": "fc3", "T": 2, "options": {"hidden": [8, 8], "image_size": 32}})
    rec["data"] = {"name": "cifar10", "batch_size": 4, "eval_batch_size": 4, "root": str(root)}
    return write_recipe(tmp, rec)


def test_cifar_batches_of_the_real_format_load(tmp_path):
    """The restricted unpickler still reads real CIFAR batches (the control for the refusals below)."""
    from spikeprune.data import create_dataset

    ds = create_dataset("cifar10", "test", root=write_cifar(tmp_path))
    assert len(ds) == 4 and ds.x.shape == (4, 3, 32, 32)


CIFAR_CASES = [
    ("cifar-malicious-reduce", lambda m: pickle.dumps({b"data": Evil(m), b"labels": [0]}), "refused to load",
     "open"),
    ("cifar-malicious-os-system", lambda m: b"cos\nsystem\n(S'touch " + str(m).encode() + b"'\ntR.", "refused",
     "refused to load os.system"),
    ("cifar-garbage", lambda m: np.random.default_rng(1).bytes(64), "CIFAR batch"),
    ("cifar-empty", lambda m: b"", "CIFAR batch"),
    ("cifar-not-dict", lambda m: pickle.dumps([1, 2, 3]), "not a dict"),
    ("cifar-missing-key", lambda m: pickle.dumps({b"data": np.zeros((2, 3072), np.uint8)}), "labels"),
    ("cifar-wrong-shape", lambda m: cifar_batch(data=np.zeros((4, 100), np.uint8)), "3072"),
    ("cifar-label-range", lambda m: cifar_batch(labels=[0, 1, 99, 2]), "out of range"),
    ("cifar-label-negative", lambda m: cifar_batch(labels=[0, 1, -1, 2]), "out of range"),
]


@pytest.mark.parametrize("case, payload, needles", [(c[0], c[1], c[2:]) for c in CIFAR_CASES],
                         ids=[c[0] for c in CIFAR_CASES])
def test_cifar_batch_cannot_run_code(tmp_path, case, payload, needles):
    marker = tmp_path / "PWNED"
    root = write_cifar(tmp_path / "data", test=payload(marker))
    refused(cli("train", "-c", cifar_recipe(tmp_path, root)), "test_batch", *needles)
    assert not marker.exists()


def test_run_config_pointing_at_a_malicious_cifar_batch(run_copy, tmp_path):
    """A downloaded run whose config.json points data.root at files inside the run: `measure` must not run them."""
    marker = tmp_path / "PWNED"
    write_cifar(run_copy / "data", test=pickle.dumps({b"data": Evil(marker), b"labels": [0]}))
    cfg = json.loads((run_copy / "config.json").read_text())
    cfg["data"] = {**cfg["data"], "name": "cifar10", "root": str(run_copy / "data"), "options": {}}
    (run_copy / "config.json").write_text(json.dumps(cfg))
    for cmd in ("measure", "eval", "compact"):
        refused(cli(cmd, run_copy), "refused")
    assert not marker.exists()


# ======================================================================================== checkpoints
def forge_checkpoint(run_dir: Path, marker: Path, step: int = 999) -> Path:
    payload = evil_torch_bytes(marker)
    path = run_dir / f"ckpt-{step:09d}.pt"
    path.write_bytes(ckpt.MAGIC + hashlib.sha256(payload).digest() + payload)  # a valid checksum
    return path


def test_forged_checkpoint_with_valid_checksum_is_refused_by_resume(run_copy, tmp_path):
    marker = tmp_path / "PWNED"
    for p in ckpt.list_checkpoints(run_copy):
        p.unlink()
    for f in ("results.json", "model.pt", "model.pt.sha256"):
        (run_copy / f).unlink()
    path = forge_checkpoint(run_copy, marker)
    cfg_path = write_recipe(tmp_path, recipe(tmp_path))
    refused(cli("train", "-c", cfg_path, "--resume"), path.name, "refused")
    assert not marker.exists()


def test_forged_checkpoint_beside_good_ones_is_skipped_with_a_warning(run_copy, tmp_path):
    """The forged file is the newest; resume reports it and falls back to the previous good checkpoint."""
    marker = tmp_path / "PWNED"
    (run_copy / "results.json").unlink()
    forge_checkpoint(run_copy, marker)
    code, out, err = cli("train", "-c", write_recipe(tmp_path, recipe(tmp_path)), "--resume")
    assert code == 0 and "Traceback" not in err
    assert "refused" in out and "ckpt-000000999.pt" in out
    assert not marker.exists()


def test_forged_checkpoint_is_refused_by_bench(tmp_path):
    marker = tmp_path / "PWNED"
    bench = {"name": "b", "recipe": recipe(tmp_path), "out_dir": str(tmp_path / "bench"), "densities": [0.5],
             "seeds": [0], "dense": False, "methods": [{"name": "mag", "method": dict(MAGNITUDE)}]}
    cell = tmp_path / "bench" / "runs" / "mag_d50_s0"
    cell.mkdir(parents=True)
    path = forge_checkpoint(cell, marker, step=3)
    refused(cli("bench", "-c", write_recipe(tmp_path, bench, "bench.yaml")), path.name, "refused")
    assert not marker.exists()


@pytest.mark.parametrize("obj", [[1, 2], "text", {"a": 1}, None], ids=["list", "str", "dict", "none"])
def test_checkpoint_roundtrip_of_plain_data(tmp_path, obj):
    ckpt.save({"x": obj}, tmp_path / "c.pt")
    assert ckpt.load(tmp_path / "c.pt") == {"x": obj}


def test_checkpoint_plain_converts_numpy_and_refuses_objects(tmp_path):
    st = {"a": np.arange(3), "b": np.float32(1.5), "c": Path("/x"), "d": (1, [np.int64(2)])}
    ckpt.save(st, tmp_path / "c.pt")
    back = ckpt.load(tmp_path / "c.pt")
    assert torch.equal(back["a"], torch.arange(3)) and back["b"] == 1.5 and back["c"] == "/x"
    assert back["d"] == (1, [2])
    with pytest.raises(TypeError, match="cannot checkpoint a Evil"):
        ckpt.save({"x": Evil(tmp_path / "m")}, tmp_path / "d.pt")


# ========================================================================================= model.pt
READERS = [("measure",), ("eval",), ("compact",), ("export", "--format", "nir"),
           ("export", "--format", "safetensors"), ("export", "--format", "torch-prune")]


def _reader_ok(cmd: tuple[str, ...]) -> bool:
    if cmd[-1] == "nir":
        return _has("nir")
    if cmd[-1] == "safetensors":
        return _has("safetensors")
    return True


def _has(mod: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(mod) is not None


MODEL_CASES = [
    ("malicious-signed", lambda p, m: (p.write_bytes(evil_torch_bytes(m, torch.load(p, weights_only=True))),
                                       sign_model(p)), "refused"),
    ("malicious-unsigned", lambda p, m: (p.write_bytes(evil_torch_bytes(m)), p.with_name("model.pt.sha256").unlink()),
     "refused"),
    ("flipped-bit", lambda p, m: p.write_bytes(_flip(p.read_bytes())), "checksum"),
    ("truncated-signed", lambda p, m: (p.write_bytes(p.read_bytes()[:100]), sign_model(p)), "not a readable"),
    ("empty-signed", lambda p, m: (p.write_bytes(b""), sign_model(p)), "not a readable"),
    ("garbage-signed", lambda p, m: (p.write_bytes(np.random.default_rng(0).bytes(2048)), sign_model(p)),
     "not a readable"),
    ("not-a-state-dict", lambda p, m: (torch.save([torch.zeros(2)], p), sign_model(p)), "state_dict"),
    ("wrong-architecture", lambda p, m: (torch.save({"w": torch.zeros(3)}, p), sign_model(p)), "does not fit"),
    ("model-missing", lambda p, m: p.unlink(), "not a finished run"),
]


def _flip(data: bytes) -> bytes:
    b = bytearray(data)
    b[len(b) // 2] ^= 0x10
    return bytes(b)


@pytest.mark.parametrize("cmd", READERS, ids=["-".join(c) for c in READERS])
@pytest.mark.parametrize("case, tamper, needle", MODEL_CASES, ids=[c[0] for c in MODEL_CASES])
def test_bad_model_file_is_refused_by_every_reader(run_copy, tmp_path, cmd, case, tamper, needle):
    if not _reader_ok(cmd):
        pytest.skip(f"{cmd[-1]} not installed")
    marker = tmp_path / "PWNED"
    tamper(run_copy / "model.pt", marker)
    before = snapshot(run_copy)
    refused(cli(*cmd[:1], run_copy, *cmd[1:]), needle)
    assert not marker.exists()
    assert {k: v for k, v in snapshot(run_copy).items() if k in before} == before  # nothing changed


CONFIG_JSON_CASES = [
    ("config-json-garbage", b"\x00\xff\xfe garbage", "config.json"),
    ("config-json-not-json", b"{name: run", "config.json"),
    ("config-json-unknown-key", b'{"nme": "x"}', "nme"),
    ("config-json-list", b"[1, 2]", "JSON object"),
    ("config-json-missing", None, "not a finished run"),
]


@pytest.mark.parametrize("case, data, needle", CONFIG_JSON_CASES, ids=[c[0] for c in CONFIG_JSON_CASES])
@pytest.mark.parametrize("cmd", ["measure", "compact", "eval"])
def test_bad_run_config_is_one_line(run_copy, cmd, case, data, needle):
    if data is None:
        (run_copy / "config.json").unlink()
    else:
        (run_copy / "config.json").write_bytes(data)
    refused(cli(cmd, run_copy), needle)


@pytest.mark.parametrize("data", [b"", b"{not json", b"\x00\x01", b"[]"], ids=["empty", "bad", "binary", "list"])
def test_bad_results_json_in_report_is_one_line(run_copy, data):
    (run_copy / "results.json").write_bytes(data)
    refused(cli("report", run_copy), "results.json")


def test_not_a_run_directory(tmp_path):
    for cmd in ("measure", "eval", "compact", "export", "report"):
        refused(cli(cmd, tmp_path / "nothing"))


@pytest.mark.parametrize("n", ["0", "-3", "two"])
def test_max_batches_must_be_positive(run_copy, n):
    code, _, err = cli("measure", run_copy, "--max-batches", n)
    assert code == 2 and "--max-batches" in err and "Traceback" not in err


def test_model_file_checksum_is_sha256sum_format(run_copy):
    line = (run_copy / "model.pt.sha256").read_text()
    assert line == f"{hashlib.sha256((run_copy / 'model.pt').read_bytes()).hexdigest()}  model.pt\n"
    out = subprocess.run(["sha256sum", "-c", "model.pt.sha256"], cwd=run_copy, capture_output=True, text=True)
    assert out.returncode == 0 and "OK" in out.stdout


def test_unsigned_model_loads_with_a_warning(run_copy):
    (run_copy / "model.pt.sha256").unlink()
    code, out, err = cli("eval", run_copy)
    assert code == 0 and "integrity is not checked" in err


# ==================================================================================== run directories
def test_fresh_run_into_a_finished_run_is_refused(run_copy, tmp_path):
    """Refused with a pointer to --resume and --overwrite; every byte of the finished run unchanged."""
    before = snapshot(run_copy)
    refused(cli("train", "-c", write_recipe(tmp_path, recipe(tmp_path))), "already holds a run", "--overwrite")
    assert snapshot(run_copy) == before


def test_overwrite_deletes_only_the_run_files(run_copy, tmp_path):
    """--overwrite removes the run's own files; the user's notes and folders in the directory stay."""
    (run_copy / "my_notes.txt").write_text("keep me")
    (run_copy / "plots").mkdir()
    (run_copy / "plots" / "fig.png").write_bytes(b"png")
    assert cli("train", "-c", write_recipe(tmp_path, recipe(tmp_path)), "--overwrite")[0] == 0
    assert (run_copy / "my_notes.txt").read_text() == "keep me" and (run_copy / "plots" / "fig.png").exists()


def test_resume_and_overwrite_together_refused(run_copy, tmp_path):
    refused(cli("train", "-c", write_recipe(tmp_path, recipe(tmp_path)), "--resume", "--overwrite"), "choose one")


def test_resume_without_any_run_is_an_error(tmp_path):
    refused(cli("train", "-c", write_recipe(tmp_path, recipe(tmp_path)), "--resume"), "nothing to resume",
            "drop --resume")
    assert not list((tmp_path / "runs").rglob("model.pt"))


def test_resume_of_a_run_killed_before_its_first_checkpoint(run_copy, tmp_path):
    for p in run_files_of(run_copy):
        if p.name != "config.json":
            p.unlink()
    before = snapshot(run_copy)
    refused(cli("train", "-c", write_recipe(tmp_path, recipe(tmp_path)), "--resume"), "no checkpoint",
            "--overwrite")
    assert snapshot(run_copy) == before


def run_files_of(d: Path) -> list[Path]:
    from spikeprune.runs import run_files

    return run_files(d)


def test_resume_of_a_finished_run_without_checkpoints_rewrites_nothing(run_copy, tmp_path):
    """Once, this silently trained from scratch over the finished model (83.8% became 10.1%)."""
    for p in ckpt.list_checkpoints(run_copy):
        p.unlink()
    before = snapshot(run_copy)
    code, out, err = cli("train", "-c", write_recipe(tmp_path, recipe(tmp_path)), "--resume")
    assert code == 0 and "nothing rewritten" in out
    assert snapshot(run_copy) == before


@pytest.mark.parametrize("change", ["train.lr=0.02", "seed=7", "model.T=3", "method.target_density=0.3",
                                    "train.epochs=2", "data.batch_size=8"])
def test_resume_with_changed_settings_is_refused(run_copy, tmp_path, change):
    """Six settings that change results: each refused, naming the key with its old and new value."""
    (run_copy / "results.json").unlink()
    before = snapshot(run_copy)
    refused(cli("train", "-c", write_recipe(tmp_path, recipe(tmp_path)), "--resume", "--set", change),
            "changed settings", change.split("=")[0])
    assert snapshot(run_copy) == before


def test_resume_may_change_what_cannot_change_results(run_copy, tmp_path):
    (run_copy / "results.json").unlink()
    code, out, err = cli("train", "-c", write_recipe(tmp_path, recipe(tmp_path)), "--resume", "--set",
                         "train.checkpoint_every=5", "--set", "train.keep_checkpoints=3")
    assert code == 0, err
    assert json.loads((run_copy / "config.json").read_text())["train"]["keep_checkpoints"] == 3


def test_compare_validates_every_recipe_before_training(tmp_path):
    """`compare good.yaml bad.yaml` used to train good.yaml fully before rejecting bad.yaml."""
    good = write_recipe(tmp_path, recipe(tmp_path, name="good"), "good.yaml")
    bad = write_recipe(tmp_path, recipe(tmp_path, name="bad", train__lr=-1), "bad.yaml")
    refused(cli("compare", good, bad), "train.lr")
    assert not (tmp_path / "runs").exists()


def test_compare_refuses_two_recipes_writing_one_directory(tmp_path):
    a = write_recipe(tmp_path, recipe(tmp_path, name="same"), "a.yaml")
    b = write_recipe(tmp_path, recipe(tmp_path, name="same", seed=2), "b.yaml")
    refused(cli("compare", a, b), "both write to")
    assert not (tmp_path / "runs").exists()


def test_compare_refuses_used_directories_before_training(run_copy, tmp_path):
    fresh = write_recipe(tmp_path, recipe(tmp_path, name="fresh"), "fresh.yaml")
    used = write_recipe(tmp_path, recipe(tmp_path, seed=9), "used.yaml")  # name 'run': the finished run
    before = snapshot(run_copy)
    refused(cli("compare", fresh, used), "already hold runs", "--reuse")
    assert snapshot(run_copy) == before and not (tmp_path / "runs" / "fresh").exists()


def test_bench_validates_every_cell_before_training(tmp_path):
    bench = {"name": "b", "recipe": recipe(tmp_path), "out_dir": str(tmp_path / "bench"), "densities": [0.5],
             "seeds": [0], "dense": True,
             "methods": [{"name": "bad", "method": {"name": "magnitude", "target_density": 0.5, "nope": 1}}]}
    refused(cli("bench", "-c", write_recipe(tmp_path, bench, "bench.yaml")), "nope")
    assert not (tmp_path / "bench").exists()


def test_convert_refuses_a_finished_conversion(tmp_path):
    d = tmp_path / "runs" / "conv"
    d.mkdir(parents=True)
    (d / "results.json").write_text("{}")
    p = write_recipe(tmp_path, {"name": "conv", "out_dir": str(tmp_path / "runs")}, "c.yaml")
    refused(cli("convert", "-c", p), "finished conversion", "--overwrite")
    assert (d / "results.json").read_text() == "{}"


@pytest.mark.parametrize("name", ["..", "/tmp/x", "a/../../b", ""])
def test_convert_name_is_one_component(tmp_path, name):
    p = write_recipe(tmp_path, {"name": name, "out_dir": str(tmp_path / "runs")}, "c.yaml")
    refused(cli("convert", "-c", p), "'name'")


# ============================================================================= read-only and full disks
@pytest.fixture
def mount(tmp_path):
    """A small tmpfs: ``mount(size_kb, ro=False)`` -> its path. Root ignores file permissions, so a read-only
    mount is the only honest read-only target; skipped where mounting is not permitted."""
    points: list[Path] = []

    def make(size_kb: int = 1024, ro: bool = False, fill_from: Path | None = None) -> Path:
        mp = tmp_path / f"mnt{len(points)}"
        mp.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k", "tmpfs", str(mp)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.decode().strip()}")
        points.append(mp)
        if fill_from is not None:
            shutil.copytree(fill_from, mp / fill_from.name)
        if ro:
            subprocess.run(["mount", "-o", "remount,ro", str(mp)], check=True)
        return mp

    yield make
    for mp in reversed(points):
        subprocess.run(["umount", "-l", str(mp)], capture_output=True)


def test_train_into_read_only_directory_refused_before_training(tmp_path, mount):
    """A read-only tmpfs mount (root ignores file modes): one line before any training."""
    mp = mount(ro=True)
    rec = recipe(tmp_path)
    rec["out_dir"] = str(mp / "runs")
    refused(cli("train", "-c", write_recipe(tmp_path, rec)), "Read-only file system")


def test_train_into_existing_read_only_run_dir(tmp_path, mount):
    mp = mount(size_kb=2048)
    rec = recipe(tmp_path)
    rec["out_dir"] = str(mp)
    (mp / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(mp)], check=True)
    refused(cli("train", "-c", write_recipe(tmp_path, rec)), "cannot write to the run directory", str(mp / "run"))


@pytest.mark.parametrize("cmd", [("compact",), ("export", "--format", "torch-prune"), ("report",),
                                 ("export", "--format", "safetensors"), ("export", "--format", "nir")],
                         ids=["compact", "export-torch-prune", "report", "export-safetensors", "export-nir"])
def test_commands_on_a_read_only_run(finished, mount, cmd):
    """compact, export (3 formats) and report on a run in a read-only mount: one line each."""
    if not _reader_ok(cmd):
        pytest.skip(f"{cmd[-1]} not installed")
    mp = mount(size_kb=4096, ro=True, fill_from=finished)
    run = mp / finished.name
    refused(cli(*cmd[:1], run, *cmd[1:]), "Read-only file system")


def test_resume_on_a_read_only_run(finished, mount, tmp_path):
    mp = mount(size_kb=4096, ro=True, fill_from=finished)
    rec = recipe(tmp_path)
    rec["out_dir"] = str(mp)
    code, out, err = cli("train", "-c", write_recipe(tmp_path, rec), "--resume")
    assert code == 0 and "nothing rewritten" in out  # finished: reading is all it needs
    (tmp_path / "x").mkdir()
    rec["train"]["epochs"] = 1
    refused(cli("train", "-c", write_recipe(tmp_path, rec), "--overwrite"), "Read-only file system")


class FillDisk:
    """A callback that fills the run's filesystem after ``at`` steps (a real ENOSPC for the next write)."""

    def __init__(self, at: int):
        self.at, self.path = at, None

    def __getattr__(self, name):
        if name.startswith("on_") or name in ("setup",):
            return lambda *a, **k: None
        if name in ("state_dict",):
            return dict
        if name in ("load_state_dict",):
            return lambda *a: None
        if name == "epoch_metrics":
            return lambda *a: {}
        raise AttributeError(name)

    def on_step_end(self, trainer):
        if trainer.global_step == self.at:
            self.path = trainer.run_dir / "filler"
            with open(self.path, "wb") as f:
                with contextlib.suppress(OSError):
                    while True:
                        f.write(b"\0" * 65536)
                        f.flush()
                        os.fsync(f.fileno())


def test_full_disk_stops_the_run_naming_the_newest_good_checkpoint_then_resumes_identically(tmp_path, mount):
    from spikeprune.callbacks import Callback
    from spikeprune.config import RunConfig, from_dict
    from spikeprune.train import Trainer, TrainingError

    class Fill(FillDisk, Callback):
        pass

    mp = mount(size_kb=1024)
    rec = recipe(tmp_path, train__epochs=3)
    ref = from_dict(RunConfig, {**rec, "name": "ref"})
    Trainer(ref, log=lambda *a: None).fit()
    cfg = from_dict(RunConfig, {**rec, "out_dir": str(mp)})
    fill = Fill(at=5)  # in epoch 2: epoch 1's checkpoint is on disk, epoch 2's cannot be written
    with pytest.raises(TrainingError) as e:
        Trainer(cfg, callbacks=[fill], log=lambda *a: None).fit()
    msg = str(e.value)
    assert "No space left on device" in msg and "ckpt-000000003.pt" in msg and "--resume" in msg
    assert not (cfg.run_dir / "model.pt").exists()
    fill.path.unlink()
    Trainer(cfg, log=lambda *a: None).fit(resume=True)
    a = torch.load(ref.run_dir / "model.pt", weights_only=True)
    b = torch.load(cfg.run_dir / "model.pt", weights_only=True)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_file_size_limit_is_one_line(tmp_path):
    """RLIMIT_FSIZE makes every write past 64 KiB fail with EFBIG: a kernel-enforced limit that needs no mount."""
    rec = recipe(tmp_path, model__options__hidden=[256, 256])
    path = write_recipe(tmp_path, rec)
    code = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536)); from spikeprune.cli import main; "
            f"sys.exit(main(['train', '-c', {str(path)!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert "File too large" in r.stderr and "--resume" in r.stderr


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path, monkeypatch):
    target = tmp_path / "results.json"
    target.write_text("old")
    real = os.replace

    def fail(*a):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError):
        ckpt.atomic_write(target, b"new")
    monkeypatch.setattr(os, "replace", real)
    assert target.read_text() == "old" and not list(tmp_path.glob("*.tmp"))


# ========================================================================================== Python API
def test_python_api_fit_refuses_a_used_directory(run_copy, tmp_path):
    from spikeprune.config import RunConfig, from_dict
    from spikeprune.runs import RunError
    from spikeprune.train import Trainer

    cfg = from_dict(RunConfig, recipe(tmp_path))
    with pytest.raises(RunError, match="already holds a run"):
        Trainer(cfg, log=lambda *a: None).fit()


def test_python_api_load_model_refuses_pickled_code(tmp_path):
    marker = tmp_path / "PWNED"
    p = tmp_path / "model.pt"
    p.write_bytes(evil_torch_bytes(marker))
    with pytest.raises(ckpt.CheckpointError, match="refused"):
        ckpt.load_model(p)
    assert not marker.exists()


# ========================================================================================== the table
def table() -> str:
    """The case list of docs/reliability.md, from the tables above."""
    rows = [("config value", c[0], " ".join(f"{k.replace('__', '.')}={v!r}" for k, v in c[1].items()),
             "one line naming " + ", ".join(c[2:])) for c in BAD_VALUES]
    rows += [("config file", c[0], "a recipe file that is " + c[0].replace("-", " "), "one line naming the file: "
              + ", ".join(c[2:])) for c in BAD_FILES]
    rows += [("override", c[0], f"--set {c[1]!r}", "one line: " + ", ".join(c[2:])) for c in BAD_OVERRIDES]
    rows += [("data", c[0], "data.root: " + c[0].replace("-", " "), "one line: " + ", ".join(c[1 + 1:]) +
              "; never another copy") for c in DATA_CASES]
    rows += [("security", c[0], "CIFAR test_batch: " + c[0].replace("cifar-", "").replace("-", " "),
              "refused, naming the file; marker absent") for c in CIFAR_CASES]
    rows += [("model.pt", f"{c[0]} × {' '.join(r)}", f"model.pt {c[0].replace('-', ' ')}, then `{' '.join(r)}`",
              "one line: " + c[2] + "; marker absent; run unchanged") for c in MODEL_CASES for r in READERS]
    rows += [("run config", f"{c[0]} × {cmd}", f"config.json {c[0].replace('config-json-', '')}, then `{cmd}`",
              "one line: " + c[2]) for c in CONFIG_JSON_CASES for cmd in ("measure", "compact", "eval")]
    table_driven = {"test_bad_value_is_one_line_before_any_training", "test_bad_config_file_names_the_file",
                    "test_bad_override_is_one_line", "test_bad_data_root_never_falls_back",
                    "test_cifar_batch_cannot_run_code", "test_bad_model_file_is_refused_by_every_reader",
                    "test_bad_run_config_is_one_line"}
    for name, fn in globals().items():
        if name.startswith("test_") and name not in table_driven:
            doc = (fn.__doc__ or "").strip().split("\n")[0]
            rows.append(("scenario", name[5:], name[5:].replace("_", " "), doc or "as the test name says"))
    lines = ["| area | case | input | expected (and measured by the test) |", "|---|---|---|---|"]
    lines += [f"| {a} | {c} | {i.replace('|', '/')} | {e.replace('|', '/')} |" for a, c, i, e in rows]
    return "\n".join(lines)



def test_docs_table_is_current():
    """docs/reliability.md lists exactly the cases this file runs."""
    doc = (Path(__file__).resolve().parents[1] / "docs" / "reliability.md").read_text()
    assert table() in doc, "regenerate the table: python tests/test_reliability.py"


if __name__ == "__main__":
    print(table())
