"""Habits of PyTorch users: `--version`, one list of commands in `--help`, TensorBoard event files, progress
lines when stderr is not a terminal, output file modes, `export --target`."""

from __future__ import annotations

import io
import json
import os
import stat

import pytest
import torch


@pytest.fixture(scope="module")
def tb_run(tmp_path_factory):
    """A short run with TensorBoard logging on (progress on, stderr not a terminal under pytest)."""
    pytest.importorskip("tensorboard")
    from spikeprune import Trainer, load_config

    out = tmp_path_factory.mktemp("runs")
    cfg = load_config(None, [
        "name=tb", f"out_dir={out}", "data.name=synthetic", "data.options={n: 64, in_shape: [1, 8, 8]}",
        "data.batch_size=8", "model.name=fc3", "model.options={hidden: [32, 24], image_size: 8}",
        "model.neuron={type: lif, v_threshold: 0.2}", "train.epochs=2", "train.lr=0.01", "train.progress=true",
        "train.tensorboard=true", "train.device=cpu",
        "method={name: dynsnn, warmup_epochs: 1, update_every: 2, kappa: 0.6}"])
    err = io.StringIO()
    import contextlib

    with contextlib.redirect_stderr(err):
        Trainer(cfg, log=lambda *a, **k: None).fit()
    return out / "tb", err.getvalue()


def test_version(capsys):
    from spikeprune import __version__
    from spikeprune.cli import main

    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"spikeprune {__version__}"


def test_help_lists_each_command_once():
    from spikeprune.cli import build_parser

    text = build_parser().format_help()
    for cmd in ("train", "eval", "measure", "export", "report", "list"):
        assert sum(line.lstrip().startswith(cmd + " ") for line in text.splitlines()) == 1, cmd
    assert "--version" in text


def test_tensorboard_event_file(tb_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir, _ = tb_run
    files = list((run_dir / "tb").glob("events.out.tfevents.*"))
    assert files
    acc = EventAccumulator(str(run_dir / "tb"), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = acc.Tags()
    scalars, hists = set(tags["scalars"]), set(tags["histograms"])
    assert {"metrics/train_loss", "metrics/train_acc", "metrics/test_acc", "metrics/lr"} <= scalars, scalars
    assert [e.step for e in acc.Scalars("metrics/train_loss")] == [1, 2]
    dens = sorted(t for t in scalars if t.startswith("density/"))
    rates = sorted(t for t in scalars if t.startswith("firing_rate/"))
    assert len(dens) == 3 and len(rates) == 2  # 3 Linear layers, 2 LIF layers of fc3
    assert all(0 < acc.Scalars(t)[-1].value <= 1 for t in dens)
    assert any(acc.Scalars(t)[-1].value > 0 for t in rates)
    assert sorted(t for t in hists if t.startswith("firing_rates/")) == ["firing_rates/" + t.split("/", 1)[1]
                                                                         for t in rates]
    h = acc.Histograms(min(t for t in hists if t.startswith("firing_rates/")))[-1].histogram_value  # body.3
    assert h.num == 32 and 0 <= h.min <= h.max <= 1  # one rate per neuron of the first hidden layer


def test_tensorboard_missing_package_is_one_warning(monkeypatch):
    import spikeprune.tensorboard as tb

    monkeypatch.setattr(tb, "available", lambda: False)
    said = []

    class T:
        run_dir = "."

        def log(self, msg):
            said.append(msg)

    cb = tb.TensorBoardLogger()
    cb.setup(T())
    cb.on_epoch_end(T(), {"loss": 1.0})
    assert cb.writer is None and len(said) == 1 and "pip install tensorboard" in said[0]


def test_progress_lines_when_not_a_terminal(tb_run):
    _, err = tb_run
    lines = [line for line in err.splitlines() if line.startswith("epoch ")]
    assert any(line.startswith("epoch 1/2 step 8/8 (100%)") for line in lines), err
    assert any(line.startswith("epoch 2/2 step ") for line in lines)


def test_line_progress_every_n_steps():
    from spikeprune.progress import LineProgress

    out = io.StringIO()
    bar = LineProgress(10, desc="epoch 1/1", every=3, stream=out)
    for _ in range(10):
        bar.update()
    bar.close()
    steps = [line.split()[3] for line in out.getvalue().splitlines()]
    assert steps == ["3/10", "6/10", "9/10", "10/10"]


def test_safetensors_mode_matches_other_outputs(tmp_path):
    pytest.importorskip("safetensors")
    from spikeprune.export.safetensors import save_safetensors

    path = save_safetensors({"w": torch.zeros(3)}, tmp_path / "model.safetensors")
    other = tmp_path / "results.json"
    other.write_text("{}")
    mode = lambda p: stat.S_IMODE(os.stat(p).st_mode)  # noqa: E731
    assert mode(path) == mode(other) == mode(path.with_suffix(".json"))


def test_export_cli_target_and_normalisation(tb_run, tmp_path, capsys):
    pytest.importorskip("nir")
    pytest.importorskip("safetensors")
    import nir

    from spikeprune.cli import main

    run_dir, _ = tb_run
    out = tmp_path / "m.nir"
    assert main(["export", str(run_dir), "--target", "snntorch", "--out", str(out)]) == 0
    g = nir.read(str(out))
    assert float(g.metadata["dt"]) == 1e-4 and str(g.metadata["target"]) == "snntorch"
    side = json.loads((tmp_path / "m.sparsity.json").read_text())
    assert side["target"] == "snntorch"
    assert main(["export", str(run_dir), "--format", "safetensors"]) == 0
    meta = json.loads((run_dir / "model.json").read_text())
    assert "input_normalization" in meta and meta["input_normalization"] is None  # synthetic data: none
    capsys.readouterr()


def test_input_normalization_of_a_loader():
    from spikeprune.data._core import DatasetInfo, InMemoryDataset
    from spikeprune.export import input_normalization

    info = DatasetInfo(name="x", num_classes=2, in_shape=(1, 2, 2))
    ds = InMemoryDataset(torch.zeros(2, 1, 2, 2), torch.zeros(2, dtype=torch.long), info, (0.2860,), (0.3530,))

    class L:
        dataset = ds

    norm = input_normalization(L())
    assert norm["mean"] == pytest.approx([0.2860]) and norm["std"] == pytest.approx([0.3530])


def test_log_every_sets_the_progress_interval(tmp_path):
    import contextlib

    from spikeprune import Trainer, load_config

    cfg = load_config(None, [
        "name=le", f"out_dir={tmp_path}", "data.name=synthetic", "data.options={n: 64, in_shape: [1, 8, 8]}",
        "data.batch_size=8", "model.name=fc3", "model.options={hidden: [16], image_size: 8}", "train.epochs=1",
        "train.progress=true", "train.log_every=3", "train.device=cpu"])
    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        Trainer(cfg, log=lambda *a, **k: None).fit()
    steps = [line.split()[3] for line in err.getvalue().splitlines() if line.startswith("epoch 1/1 step ")]
    assert steps == ["3/8", "6/8", "8/8"], err.getvalue()
