"""Trainer reliability on synthetic data: learning, run files, checkpoint rotation, exact resume after SIGKILL and
Ctrl-C, corrupt-checkpoint fallback, the NaN guard, determinism and the command line."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from spikeprune import checkpoint as ckpt
from spikeprune.callbacks import Callback
from spikeprune.cli import main
from spikeprune.config import load_config, to_dict
from spikeprune.layers import Linear
from spikeprune.train import Trainer, TrainingError

# 64 samples of 8x8, batch 16: 4 steps per epoch
SYNTH = {"n": 64, "in_shape": [1, 8, 8], "num_classes": 4}
# a low threshold so the tiny fc3 (64 inputs) spikes from the start
FC3 = {"name": "fc3", "T": 2, "neuron": {"type": "lif", "tau": 2.0, "v_threshold": 0.25},
       "options": {"hidden": [32, 24], "image_size": 8}}
CONVNET = {"name": "convnet", "T": 2, "options": {"channels": [4, 8], "hidden": 16, "image_size": 8}}
PQ = {"name": "pq_rewire", "epochs_per_iteration": 1, "init_density": 0.5}
SCA = {"name": "sca", "keep": 0.5, "regrow": 0.2, "start_epoch": 1, "l1": 1e-4}
TIME_KEYS = ("epoch_time_s", "train_time_s")


def recipe(tmp_path: Path, name: str = "run", model: dict = FC3, method: dict | None = None, **train) -> dict:
    return {"name": name, "seed": 3, "out_dir": str(tmp_path), "model": model,
            "data": {"name": "synthetic", "batch_size": 16, "eval_batch_size": 32, "options": SYNTH},
            "train": {"epochs": 3, "optimizer": "adam", "lr": 0.01, "progress": False, "device": "cpu", **train},
            "method": method}


def write(tmp_path: Path, rec: dict) -> Path:
    path = tmp_path / f"{rec['name']}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(rec))
    return path


def make(tmp_path: Path, overrides: tuple[str, ...] = (), **kw):
    return load_config(write(tmp_path, recipe(tmp_path, **kw)), list(overrides))


def run(cfg, resume: bool = False, callbacks=None) -> tuple[Trainer, list[str]]:
    lines: list[str] = []
    trainer = Trainer(cfg, callbacks=callbacks, log=lines.append)
    trainer.fit(resume=resume)
    return trainer, lines


def metrics(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in TIME_KEYS} for r in rows]


def results(run_dir: Path) -> dict:
    res = json.loads((run_dir / "results.json").read_text())
    return {k: v for k, v in res.items() if k not in TIME_KEYS + ("name",)}


def final_state(run_dir: Path) -> dict[str, torch.Tensor]:
    return torch.load(run_dir / "model.pt", weights_only=True)


def assert_same_run(a: Path, b: Path) -> None:
    """Bitwise the same final weights and masks, the same per-epoch metrics and the same final results."""
    sa, sb = final_state(a), final_state(b)
    assert sa.keys() == sb.keys()
    masks = [k for k in sa if k.endswith((".weight_mask", ".unit_mask"))]
    assert masks, "the method installed masks"
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k
    assert metrics(a) == metrics(b)
    assert results(a) == results(b)


# ------------------------------------------------------------------------------------------------ training, files
def test_dense_training_learns_and_writes_run_files(tmp_path):
    cfg = make(tmp_path, ("train.epochs=4", "train.keep_checkpoints=2"))
    trainer, lines = run(cfg)
    rd = cfg.run_dir
    losses = [h["train_loss"] for h in trainer.history]
    assert losses[-1] < 0.5 * losses[0], losses
    assert trainer.history[-1]["test_acc"] > 0.9  # synthetic classes are easy
    assert sum(line.startswith("epoch ") for line in lines) == 4

    rows = metrics(rd)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    assert [r["train_loss"] for r in rows] == losses
    with open(rd / "metrics.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in table] == [1, 2, 3, 4] and "test_acc" in table[0]
    res = json.loads((rd / "results.json").read_text())
    assert res["method"] == "dense" and res["epochs"] == 4 and 0.9 < res["accuracy"] <= 1
    assert json.loads((rd / "config.json").read_text()) == json.loads(json.dumps(to_dict(cfg)))
    assert not [k for k in final_state(rd) if k.endswith("_mask")]

    # one checkpoint per epoch (4 steps each), rotated down to the 2 newest
    found = ckpt.list_checkpoints(rd)
    assert [p.name for p in found] == ["ckpt-000000016.pt", "ckpt-000000012.pt"]
    assert [ckpt.load(p)["epoch"] for p in found] == [4, 3]
    assert not list(rd.glob("*.tmp"))


def test_fresh_run_in_a_used_run_dir_needs_overwrite_then_starts_clean(tmp_path):
    from spikeprune.runs import RunError

    run(make(tmp_path, ("train.epochs=2",)))
    cfg = make(tmp_path, ("train.epochs=1",))
    before = {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()}
    with pytest.raises(RunError, match="already holds a run .*--overwrite"):
        run(cfg)
    assert {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()} == before  # nothing touched
    (cfg.run_dir / "notes.txt").write_text("mine")
    lines: list[str] = []
    Trainer(cfg, log=lines.append).fit(overwrite=True)
    # the old ckpt-8 would outrank the new run's ckpt-4 in rotation and in --resume
    assert [p.name for p in ckpt.list_checkpoints(cfg.run_dir)] == ["ckpt-000000004.pt"]
    assert [r["epoch"] for r in metrics(cfg.run_dir)] == [1]
    assert any("--overwrite: removing" in line for line in lines)
    assert (cfg.run_dir / "notes.txt").read_text() == "mine"  # not a run file: kept


# ------------------------------------------------------------------------------------------------------ resume
def test_resume_after_sigkill_matches_uninterrupted_run(tmp_path):
    """`spikeprune train` is killed with SIGKILL after a mid-epoch checkpoint, then continued with --resume."""
    method = PQ  # one SAP iteration per epoch: masks change at the end of epochs 1 and 2
    ref_cfg = make(tmp_path / "ref", method=method)
    run(ref_cfg)

    rec = recipe(tmp_path, name="killed", method=method, checkpoint_every=3, keep_checkpoints=2)
    path = write(tmp_path, rec)
    rd = tmp_path / "killed"
    rd.mkdir()
    # Saves happen at steps 3 (epoch 1, step 3), 4 (end of epoch 1), 6 (epoch 2, step 2), 8 (end of epoch 2), ...
    # A FIFO in place of ckpt-8's temp file blocks the run inside that save, so it is surely killed between the
    # mid-epoch checkpoint of step 6 and the end of epoch 2, whatever the timing.
    os.mkfifo(rd / "ckpt-000000008.pt.tmp")
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([sys.executable, "-m", "spikeprune", "train", "--config", str(path)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 300  # generous: a loaded 2-core machine
        while not (rd / "ckpt-000000006.pt").exists():
            assert proc.poll() is None, proc.communicate()[0].decode()
            assert time.monotonic() < deadline, "no mid-epoch checkpoint appeared"
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (rd / "results.json").exists()
    (rd / "ckpt-000000008.pt.tmp").unlink()  # what a crash inside a save leaves behind
    assert ckpt.load_latest(rd)[0]["step_in_epoch"] == 2
    assert main(["train", "--config", str(path), "--resume"]) == 0
    assert_same_run(ref_cfg.run_dir, rd)


class CtrlC(Callback):
    """Sends this process SIGINT after step ``at`` (as a user pressing Ctrl-C)."""

    def __init__(self, at: int):
        self.at = at

    def on_step_end(self, trainer) -> None:
        if trainer.global_step == self.at:
            os.kill(os.getpid(), signal.SIGINT)


def test_ctrl_c_saves_at_the_step_and_resume_matches_sca_on_convnet(tmp_path):
    ref_cfg = make(tmp_path / "ref", model=CONVNET, method=SCA)
    ref, _ = run(ref_cfg)
    assert ref.method.history, "sca updated its channel masks"

    cfg = make(tmp_path, name="stopped", model=CONVNET, method=SCA)
    trainer = Trainer(cfg, callbacks=[CtrlC(at=6)], log=(lines := []).append)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit()
    assert trainer.global_step == 6 and any("state saved" in line for line in lines)
    st = ckpt.load_latest(cfg.run_dir)[0]
    assert (st["epoch"], st["step_in_epoch"], st["global_step"]) == (1, 2, 6)
    # resume without the callback: states are matched to callbacks by type, not by position
    run(cfg, resume=True)
    assert_same_run(ref_cfg.run_dir, cfg.run_dir)


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    cfg = make(tmp_path, ("train.epochs=2",), method=PQ)
    run(cfg)
    before = metrics(cfg.run_dir)
    newest, previous = ckpt.list_checkpoints(cfg.run_dir)
    data = newest.read_bytes()
    newest.write_bytes(data[: len(data) // 2])
    with pytest.raises(ckpt.CheckpointError, match="checksum"):
        ckpt.load(newest)
    for f in ("results.json", "model.pt", "model.pt.sha256"):  # as if killed before the end: resumable
        (cfg.run_dir / f).unlink()

    trainer, lines = run(cfg, resume=True)
    assert any(line.startswith("warning:") and "fails its checksum" in line for line in lines)
    assert any(f"resumed from {previous}" in line and "epoch 1" in line for line in lines)
    assert metrics(cfg.run_dir) == before  # epoch 2 redone, the same numbers, logged once
    assert [h["epoch"] for h in trainer.history] == [1, 2]

    for p in ckpt.list_checkpoints(cfg.run_dir):
        p.write_bytes(b"SPKP1")
    (cfg.run_dir / "results.json").unlink()
    with pytest.raises(ckpt.CheckpointError, match="no readable checkpoint"):
        Trainer(cfg, log=lambda *a: None).fit(resume=True)


def test_rotation_never_deletes_the_checkpoint_just_written(tmp_path):
    # resumed from ckpt-4 because ckpt-8 is corrupt: with keep=1, saving step 5 used to delete ckpt-5 and keep
    # only the corrupt ckpt-8 (nothing left to resume from)
    ckpt.save({"step": 4}, tmp_path / "ckpt-000000004.pt")
    (tmp_path / "ckpt-000000008.pt").write_bytes(b"SPKP1 truncated")
    ckpt.save_rotating({"step": 5}, tmp_path, 5, keep=1)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-000000005.pt"]
    ckpt.save_rotating({"step": 6}, tmp_path, 6, keep=2)
    assert [ckpt.load(p)["step"] for p in ckpt.list_checkpoints(tmp_path)] == [6, 5]


def test_resume_refuses_changed_settings_and_lists_them(tmp_path):
    cfg = make(tmp_path, ("train.epochs=2",), method=PQ)
    run(cfg)
    (cfg.run_dir / "results.json").unlink()  # unfinished: a checkpoint to resume from
    before = {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()}
    with pytest.raises(TrainingError, match=r"changed settings: seed \(3 -> 5\); train.lr \(0.01 -> 0.02\)"):
        run(make(tmp_path, ("train.epochs=2", "seed=5", "train.lr=0.02"), method=PQ), resume=True)
    assert {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()} == before
    # settings that cannot change results may differ, and config.json records them
    run(make(tmp_path, ("train.epochs=2", "train.checkpoint_every=3"), method=PQ), resume=True)
    assert json.loads((cfg.run_dir / "config.json").read_text())["train"]["checkpoint_every"] == 3


def test_resume_on_a_finished_run_rewrites_nothing(tmp_path):
    from spikeprune.runs import RunError

    cfg = make(tmp_path, ("train.epochs=1",))
    run(cfg)
    for p in ckpt.list_checkpoints(cfg.run_dir):
        p.unlink()  # checkpoints removed: once, --resume started over and overwrote the model
    before = {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()}
    trainer, lines = run(cfg, resume=True)
    assert any("is finished" in line and "nothing rewritten" in line for line in lines)
    assert {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()} == before
    with pytest.raises(RunError, match=r"finished run with other settings \(train.epochs \(1 -> 3\)\)"):
        run(make(tmp_path, ("train.epochs=3",)), resume=True)
    assert {p.name: p.read_bytes() for p in cfg.run_dir.iterdir()} == before


# --------------------------------------------------------------------------------------------------- NaN guard
class Poison(Callback):
    """Sets one weight of the first or the last layer to NaN after step ``at``."""

    def __init__(self, at: int, layer: int):
        self.at, self.layer = at, layer

    def on_step_end(self, trainer) -> None:
        if trainer.global_step == self.at:
            with torch.no_grad():
                list(trainer.model.parameters())[self.layer].view(-1)[0] = float("nan")


@pytest.mark.parametrize("at, layer, where", [
    (6, -1, "loss became nan at epoch 2, step 3"),  # NaN readout weight: the next loss is NaN
    (8, -1, "non-finite values in body.6.weight at epoch 2, step 4"),  # last step of the epoch: no loss sees it
    (6, 0, "non-finite values in body.1.weight at epoch 2, step 4"),  # hidden: spikes (NaN >= 1 is False) hide it
])
def test_nan_weight_raises_and_keeps_the_last_good_checkpoint(tmp_path, at, layer, where, monkeypatch):
    # weights are checked after each training epoch, before evaluation, mask updates and checkpoints see them.
    # Dense Linear layers here: the spike-sparse path skips silent inputs, so a NaN weight behind an input that does
    # not spike never reaches the loss (NaN * 0 is not computed); the epoch-end weight check catches it instead
    monkeypatch.setattr(Linear, "max_input_density", 0.0)
    cfg = make(tmp_path, method=PQ)
    with pytest.raises(TrainingError, match=where) as err:
        run(cfg, callbacks=[Poison(at, layer)])
    assert "the last good checkpoint is" in str(err.value) and "ckpt-000000004.pt" in str(err.value)
    st, path = ckpt.load_latest(cfg.run_dir)
    assert path.name == "ckpt-000000004.pt" and st["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in st["model"].values() if v.is_floating_point())


def test_huge_learning_rate_raises_training_error(tmp_path):
    cfg = make(tmp_path, ("train.optimizer=sgd", "train.lr=1e38", "train.momentum=0.0", "train.checkpoint_every=1"))
    with pytest.raises(TrainingError, match=r"epoch 1, step \d") as err:
        run(cfg)
    assert "lower train.lr" in str(err.value)
    st, _ = ckpt.load_latest(cfg.run_dir)
    assert st["global_step"] >= 1 and all(torch.isfinite(v).all() for v in st["model"].values())


# ------------------------------------------------------------------------------------------------- determinism
def test_same_seed_same_masks_and_metrics(tmp_path):
    a = make(tmp_path / "a", ("train.epochs=2",), method=PQ)
    b = make(tmp_path / "b", ("train.epochs=2",), method=PQ)
    run(a)
    run(b)
    assert_same_run(a.run_dir, b.run_dir)
    c = make(tmp_path / "c", ("train.epochs=2", "seed=4"), method=PQ)
    run(c)
    mask = "body.1.weight_mask"
    assert not torch.equal(final_state(a.run_dir)[mask], final_state(c.run_dir)[mask])


# ----------------------------------------------------------------------------------------------------------- CLI
def test_cli_train_measure_eval(tmp_path, capsys):
    path = write(tmp_path, recipe(tmp_path / "runs", name="cli", method=PQ))
    assert main(["train", "--config", str(path), "--set", "train.epochs=2", "--set", "method.init_density=0.6"]) == 0
    out = capsys.readouterr().out
    rd = tmp_path / "runs" / "cli"
    assert "| run | method | acc. %" in out and "| cli | pq_rewire |" in out and f"run directory: {rd}" in out
    res = json.loads((rd / "results.json").read_text())
    assert res["epochs"] == 2 and json.loads((rd / "config.json").read_text())["method"]["init_density"] == 0.6

    assert main(["measure", str(rd), "--json"]) == 0
    measured = json.loads(capsys.readouterr().out)
    for k in ("accuracy", "connectivity", "params", "sops"):  # rebuilt model + masks reproduce the results
        assert measured[k] == pytest.approx(res[k]), k
    assert main(["measure", str(rd)]) == 0
    assert "connectivity" in capsys.readouterr().out
    assert main(["eval", str(rd)]) == 0
    assert f"test accuracy: {100 * res['accuracy']:.2f}% (64 samples)" in capsys.readouterr().out

    assert main(["train", "--config", str(path), "--set", "train.lr=-1"]) == 2
    assert "train.lr" in capsys.readouterr().err
    assert main(["eval", str(tmp_path)]) == 2


def test_disk_full_stops_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    import errno

    cfg = make(tmp_path, ("train.epochs=2",), method=PQ)
    trainer = Trainer(cfg, log=lambda *a: None)
    trainer.fit()
    good = ckpt.list_checkpoints(cfg.run_dir)
    good_bytes = {p: p.read_bytes() for p in good}

    real_open = open

    def full_disk(path, mode="r", *a, **k):  # every write of a checkpoint's temp file fails as on a full disk
        if "w" in mode and str(path).endswith(".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_open(path, mode, *a, **k)

    monkeypatch.setattr("builtins.open", full_disk)
    lines = []
    trainer.log = lines.append
    trainer.global_step += 1
    with pytest.raises(TrainingError, match=f"No space left on device.*last good checkpoint is {good[0]}"):
        trainer.save()  # stops the run, and does not touch the good files
    monkeypatch.undo()
    assert ckpt.list_checkpoints(cfg.run_dir) == good
    assert all(p.read_bytes() == b for p, b in good_bytes.items())
    assert not list(Path(cfg.run_dir).glob("*.tmp"))
    ckpt.load(good[0])  # still readable


def test_cli_compact_times_a_folded_full_width_reference(tmp_path, capsys):
    from spikeprune.runs import load_run as _load_run
    from spikeprune.runs import run_model

    path = write(tmp_path, recipe(tmp_path / "runs", name="sca", model=CONVNET, method=SCA))
    assert main(["train", "--config", str(path), "--set", "train.epochs=2"]) == 0
    rd = tmp_path / "runs" / "sca"
    cfg, model, test = _load_run(str(rd), None)
    full = run_model(rd, cfg, fold=True)
    assert not any(k.endswith(("weight_mask", "unit_mask")) for k in full.state_dict())
    assert not any(m._forward_hooks for m in full.modules())
    dead = [int((~v).sum()) for k, v in model.state_dict().items() if k.endswith("unit_mask")]
    assert dead and sum(dead) > 0  # the original keeps its masks, and some channels are dead
    x = next(iter(test))[0]
    with torch.no_grad():
        assert torch.equal(full.eval()(x), model.eval()(x))  # same network, masks folded into the weights
    capsys.readouterr()
    assert main(["compact", str(rd), "--out", str(tmp_path / "c.pt")]) == 0
    assert "masks folded at full width" in capsys.readouterr().out


def test_keep_freed_memory_applies_once_on_glibc():
    import platform

    from spikeprune.perf import keep_freed_memory

    first = keep_freed_memory()
    assert first is keep_freed_memory()  # idempotent: applied once per process
    if platform.libc_ver()[0] == "glibc":
        assert first is True  # elsewhere a no-op that returns False
