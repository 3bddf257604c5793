"""Data-parallel training (DDP, gloo on CPU) keeps every rank's masks and weights identical.

One ``torchrun --nproc_per_node=2`` launch (gloo, 127.0.0.1, a free port) runs this file as its worker script; the
workers run every scenario in a row on tiny models and the ``synthetic`` dataset (starting processes is the slow
part here) and write, per rank, a record taken after *every* optimizer step and every epoch end, i.e. after every
mask update (mask checksum, weight checksum, engine version, metrics); the tests compare the ranks' records. Also
checked: a deliberately diverged mask stops the run with ``MaskDivergenceError``, resume under DDP (Ctrl-C seen by
one rank), synchronised BatchNorm against a full-batch BatchNorm, 2 processes x batch 6 against 1 process x batch
12, and the ``python -m spikeprune train`` entry point under torchrun.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import runpy
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from spikeprune.callbacks import Callback
from spikeprune.config import RunConfig, from_dict

WORLD = 2
SCENARIOS = ["syncbn", "pq_rewire", "sca", "dynsnn", "equiv", "equiv_sca", "resume", "cli", "diverge"]
FC3 = {"name": "fc3", "T": 2, "options": {"hidden": [32, 16], "image_size": 8}}
CONVNET = {"name": "convnet", "T": 2, "options": {"channels": [4, 8], "hidden": 16, "image_size": 8}}


def _cfg(out: Path, name: str, model: dict, method: dict | None, epochs: int, batch: int = 6, n: int = 72,
         **train) -> RunConfig:
    """A tiny run: ``n`` synthetic 8x8 samples (72: 36 per rank, 6 steps of 6 per epoch on 2 ranks)."""
    val = train.pop("val_split", 0.0)
    return from_dict(RunConfig, {
        "name": name, "seed": 0, "out_dir": str(out), "model": model,
        "data": {"name": "synthetic", "batch_size": batch, "eval_batch_size": 16, "val_split": val,
                 "options": {"n": n, "in_shape": [1, 8, 8]}},
        "train": {"epochs": epochs, "lr": 0.01, "device": "cpu", "progress": False, **train},
        "measure": {"max_batches": 1}, "method": method})


def _sha(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Recorder(Callback):
    """Runs after the method (put last): one row after every step and epoch end, i.e. after every mask update."""

    def __init__(self):
        self.rows: list[dict] = []

    def _row(self, trainer, phase: str, metrics: dict | None = None) -> None:
        e = trainer.method.engine
        masks = {**e.masks(), **e.unit_masks()}
        row = {"phase": phase, "epoch": trainer.epoch, "step": trainer.global_step, "version": e.version,
               "masks": _sha(masks[k] for k in sorted(masks)), "weights": _sha(trainer.model.parameters()),
               "density": e.density()}
        if metrics is not None:  # epoch end: evaluation done, BN running statistics synchronised
            row.update(test_acc=metrics.get("test_acc"), val_acc=metrics.get("val_acc"),
                       train_acc=metrics.get("train_acc"), buffers=_sha(trainer.model.buffers()))
        self.rows.append(row)

    def on_step_end(self, trainer) -> None:
        self._row(trainer, "step")

    def on_epoch_end(self, trainer, metrics) -> None:
        self._row(trainer, "epoch", metrics)

    def on_train_end(self, trainer) -> None:
        self._row(trainer, "end")


def _train(cfg: RunConfig, extra: list | None = None, resume: bool = False, prep=None):
    """Build a trainer whose callbacks run in the order [method, *extra, recorder]; train; return both."""
    from spikeprune.train import Trainer

    rec = Recorder()
    trainer = Trainer(cfg, callbacks=[*(extra or []), rec], log=lambda *a: None)
    trainer.callbacks = [trainer.method, *(extra or []), rec]
    if prep is not None:
        prep(trainer)
    trainer.fit(resume=resume)
    return trainer, rec


def _sca_equiv_cfg(out: Path, name: str, batch: int) -> RunConfig:
    return _cfg(out, name, CONVNET, {"name": "sca", "keep": 0.5, "regrow": 0.25, "start_epoch": 1,
                                     "min_channels": 1}, epochs=2, batch=batch, scheduler="none", sync_bn=True)


def _keep_gate_grads(store: list):
    """``prep`` for :func:`_train`: remember every non-empty gate-gradient sum SCA pops (its regrowth signal)."""
    def prep(trainer):
        engine = trainer.method.engine
        pop = engine.pop_unit_grad

        def recorded():
            g = pop()
            if g:
                store.append({k: v.detach().cpu().clone() for k, v in g.items()})
            return g

        engine.pop_unit_grad = recorded
    return prep


# ------------------------------------------------------------------------------------------- worker
def _scenario(name: str, out: Path, rank: int) -> dict:
    from spikeprune import dist
    from spikeprune.train import MaskDivergenceError

    if name == "syncbn":  # SyncBatchNorm2d on half the batch each == BatchNorm2d on the whole batch
        from spikeprune.layers import BatchNorm2d

        g = torch.Generator().manual_seed(0)
        x = torch.randn(2, 8, 3, 4, 4, generator=g) * 3 + 1  # [T, B, C, H, W]
        w_out = torch.randn(2, 8, 3, 4, 4, generator=g)
        ref = BatchNorm2d(3)
        xr = x.clone().requires_grad_()
        y_full = ref(xr)
        (y_full * w_out).sum().backward()
        bn = BatchNorm2d(3)
        assert dist.convert_sync_batchnorm(torch.nn.Sequential(bn)) == 1
        part = slice(4 * rank, 4 * rank + 4)
        xs = x[:, part].clone().requires_grad_()
        y = bn(xs)
        (y * w_out[:, part]).sum().backward()
        wg = dist.all_sum(bn.weight.grad.clone())  # the loss is a sum over ranks here: grads add up
        return {"y": float((y - y_full[:, part]).detach().abs().max()),
                "x_grad": float((xs.grad - xr.grad[:, part]).abs().max()),
                "w_grad": float((wg - ref.weight.grad).abs().max()),
                "running_mean": float((bn.running_mean - ref.running_mean).abs().max()),
                "running_var": float((bn.running_var - ref.running_var).abs().max()),
                "cls": type(bn).__name__}
    if name == "pq_rewire":
        cfg = _cfg(out, name, FC3, {"name": "pq_rewire", "init": "erk", "init_density": 0.5,
                                    "epochs_per_iteration": 2, "select": "val_acc"}, epochs=4, n=96, val_split=0.25)
        t, rec = _train(cfg)
        return {"rows": rec.rows, "history": t.method.history}
    if name == "sca":
        cfg = _cfg(out, name, CONVNET, {"name": "sca", "keep": 0.5, "regrow": 0.25, "start_epoch": 1,
                                        "min_channels": 1}, epochs=3, sync_bn=True)
        t, rec = _train(cfg)
        bns = [type(m).__name__ for m in t.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        return {"rows": rec.rows, "history": t.method.history, "bn_classes": bns}
    if name == "dynsnn":
        cfg = _cfg(out, name, FC3, {"name": "dynsnn", "update_every": 2, "warmup_epochs": 0,
                                    "target_compression": 0.3}, epochs=2)
        t, rec = _train(cfg)
        return {"rows": rec.rows}
    if name == "equiv":  # the same global batch: 2 x 6 here, 1 x 12 in the test process
        cfg = _cfg(out, name, FC3, {"name": "pq_rewire", "init": "erk", "init_density": 0.5,
                                    "epochs_per_iteration": 2}, epochs=1, batch=6, scheduler="none")
        t, rec = _train(cfg)
        if rank == 0:
            torch.save({k: v.clone() for k, v in t.model.state_dict().items()}, out / "equiv_ddp.pt")
        return {"rows": rec.rows, "test_acc": t.history[-1]["test_acc"], "train_loss": t.history[-1]["train_loss"]}
    if name == "equiv_sca":  # the same with SCA on a convnet: sync_bn, activities and gate gradients
        grads: list = []
        t, rec = _train(_sca_equiv_cfg(out, name, 6), prep=_keep_gate_grads(grads))
        if rank == 0:
            torch.save({"state": {k: v.clone() for k, v in t.model.state_dict().items()}, "grads": grads},
                       out / "equiv_sca_ddp.pt")
        return {"rows": rec.rows, "test_acc": t.history[-1]["test_acc"], "history": t.method.history}
    if name == "resume":  # uninterrupted vs stopped mid-epoch (Ctrl-C seen by rank 0 only) and resumed
        method = {"name": "dynsnn", "update_every": 2, "warmup_epochs": 0, "target_compression": 0.3}
        a, _ = _train(_cfg(out, "resume_a", FC3, method, epochs=3))

        class StopOnRank0(Callback):
            def on_step_end(self, trainer):
                if trainer.global_step == 8 and rank == 0:
                    trainer._stop = True  # what the SIGINT handler does

        cfg_b = _cfg(out, "resume_b", FC3, method, epochs=3)
        stopped_at = None
        try:
            _train(cfg_b, [StopOnRank0()])
        except KeyboardInterrupt:
            stopped_at = "interrupted"
        b, rec = _train(cfg_b, resume=True)
        return {"stopped": stopped_at, "a": _sha(a.model.state_dict().values()),
                "b": _sha(b.model.state_dict().values()), "b_steps": b.global_step, "rows": rec.rows,
                "b_first_row_step": rec.rows[0]["step"] if rec.rows else None}
    if name == "diverge":  # a method whose statistic is rank-local on rank 1
        cfg = _cfg(out, name, FC3, {"name": "dynsnn", "update_every": 2, "warmup_epochs": 0}, epochs=2)
        from spikeprune.train import Trainer

        t = Trainer(cfg, log=lambda *a: None)
        values = t.method.monitor.values

        def skewed():
            v = values()
            for a in v.values():  # rank 0: unit 0 looks most active; rank 1: silent
                a[0] = -1.0 if rank == 1 else float(a.max())
            return v

        t.method.monitor.values = skewed
        try:
            t.fit()
        except MaskDivergenceError as e:
            return {"error": type(e).__name__, "message": str(e), "step": t.global_step}
        return {"error": None, "step": t.global_step}
    if name == "cli":  # what `torchrun -m spikeprune train --config tiny.yaml` runs in each process
        cfg = out / "tiny.yaml"
        if rank == 0:
            cfg.write_text(
                "name: tiny\nseed: 0\n"
                "model: {name: fc3, T: 2, options: {hidden: [32, 16], image_size: 8}}\n"
                "data: {name: synthetic, batch_size: 8, eval_batch_size: 16, options: {n: 64, in_shape: [1, 8, 8]}}\n"
                "train: {epochs: 1, lr: 0.01, device: cpu, progress: false}\n"
                "measure: {max_batches: 1}\n"
                "method: {name: dynsnn, update_every: 2, warmup_epochs: 0}\n")
        dist.barrier()
        argv, sys.argv = sys.argv, ["spikeprune", "train", "--config", str(cfg), "--set",
                                    f"out_dir={json.dumps(str(out / 'runs'))}"]
        buf, code = io.StringIO(), None
        try:
            with contextlib.redirect_stdout(buf):
                runpy.run_module("spikeprune", run_name="__main__", alter_sys=True)
        except SystemExit as e:
            code = e.code
        finally:
            sys.argv = argv
        return {"code": code, "stdout": buf.getvalue()}
    raise ValueError(name)


def _worker(out: str, names: str) -> None:
    from spikeprune import dist

    torch.set_num_threads(1)
    assert dist.init_from_env() and dist.world_size() == WORLD
    out_p, rank = Path(out), dist.rank()
    for name in names.split(","):
        try:
            res = _scenario(name, out_p, rank)
        except Exception as e:  # record, keep the ranks in step for the next scenario when possible
            import traceback

            res = {"crash": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}
        (out_p / f"{name}_rank{rank}.json").write_text(json.dumps(res))


# --------------------------------------------------------------------------------------------- tests
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ddp_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", __file__, str(out), ",".join(SCENARIOS)]
    try:
        p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the DDP workers did not finish in 240 s (a hang in a collective?)")
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]

    def load(name):
        res = [json.loads((out / f"{name}_rank{r}.json").read_text()) for r in range(WORLD)]
        for r in res:
            assert "crash" not in r, r.get("traceback", r)
        return res

    return load, out


def _assert_same_records(r0: dict, r1: dict, min_mask_changes: int) -> None:
    rows0, rows1 = r0["rows"], r1["rows"]
    assert rows0, "nothing recorded"
    assert len(rows0) == len(rows1)
    for a, b in zip(rows0, rows1):  # after every step and epoch end, so after every mask update
        assert a == b, f"ranks differ at {a['phase']} (epoch {a['epoch']}, step {a['step']}): {a} vs {b}"
    changes = sum(1 for x, y in zip(rows0, rows0[1:]) if y["masks"] != x["masks"])
    assert changes >= min_mask_changes, f"only {changes} mask changes: the scenario does not exercise updates"


def test_pq_rewire_masks_and_weights_identical_on_both_ranks(ddp_results):
    r0, r1 = ddp_results[0]("pq_rewire")
    _assert_same_records(r0, r1, min_mask_changes=3)  # ERK init, rewire, SAP prune, rewire, (val_acc restore)
    assert r0["history"] == r1["history"] and len(r0["history"]) == 2
    dens = [h["density"] for h in r0["history"]]
    assert dens[1] < dens[0] <= 0.51


def test_sca_masks_and_weights_identical_with_sync_bn(ddp_results):
    r0, r1 = ddp_results[0]("sca")
    _assert_same_records(r0, r1, min_mask_changes=1)
    assert r0["history"] == r1["history"] and len(r0["history"]) == 2
    assert r0["bn_classes"] == ["SyncBatchNorm2d", "SyncBatchNorm2d"]
    assert all("buffers" in x for x in r0["rows"] if x["phase"] == "epoch")


def test_dynsnn_masks_and_weights_identical_on_both_ranks(ddp_results):
    r0, r1 = ddp_results[0]("dynsnn")
    _assert_same_records(r0, r1, min_mask_changes=2)
    versions = [x["version"] for x in r0["rows"]]
    assert versions[-1] > versions[0], "no unit-mask update happened"


def test_diverged_mask_stops_the_run_with_a_clear_error(ddp_results):
    r0, r1 = ddp_results[0]("diverge")
    for r in (r0, r1):
        assert r["error"] == "MaskDivergenceError", r
        assert r["step"] == 2, "the run must stop at the first diverging update"
        msg = r["message"]
        assert "masks differ across the 2 DDP ranks" in msg and "global step 2" in msg
        assert "body." in msg and "rank-local" in msg


def test_resume_under_ddp_matches_uninterrupted_run(ddp_results):
    r0, r1 = ddp_results[0]("resume")
    for r in (r0, r1):
        assert r["stopped"] == "interrupted", "Ctrl-C on rank 0 must stop every rank at the same step"
        assert r["b_first_row_step"] == 9, "the resumed run continues after step 8"
        assert r["b_steps"] == 18
        assert r["a"] == r["b"], "resumed run ends elsewhere than the uninterrupted one"
    assert r0["rows"] == r1["rows"]


def test_sync_batchnorm_equals_full_batch_batchnorm(ddp_results):
    for r in ddp_results[0]("syncbn"):
        assert r["cls"] == "SyncBatchNorm2d"
        for k in ("y", "x_grad", "w_grad", "running_mean", "running_var"):
            assert r[k] < 1e-4, (k, r[k])


def test_two_processes_match_one_with_the_same_global_batch(ddp_results, tmp_path):
    load, out = ddp_results
    r0, r1 = load("equiv")
    _assert_same_records(r0, r1, min_mask_changes=0)
    from spikeprune.train import Trainer

    cfg = _cfg(tmp_path, "equiv_single", FC3, {"name": "pq_rewire", "init": "erk", "init_density": 0.5,
                                               "epochs_per_iteration": 2}, epochs=1, batch=12, scheduler="none")
    t = Trainer(cfg, log=lambda *a: None)
    t.fit()
    ddp = torch.load(out / "equiv_ddp.pt", weights_only=True)
    single = t.model.state_dict()
    for k, v in single.items():
        if v.dtype == torch.bool:
            assert torch.equal(v, ddp[k]), f"mask {k} differs between 1 and 2 processes"
        else:
            assert torch.allclose(v, ddp[k], atol=1e-5), f"{k}: max diff {(v - ddp[k]).abs().max()}"
    assert t.history[-1]["test_acc"] == pytest.approx(r0["test_acc"])
    assert t.history[-1]["train_loss"] == pytest.approx(r0["train_loss"], rel=1e-4)


def test_sca_two_processes_match_one_with_sync_bn(ddp_results, tmp_path):
    """SyncBN statistics, activities and the gate gradients SCA regrows by are those of the global batch."""
    load, out = ddp_results
    r0, r1 = load("equiv_sca")
    _assert_same_records(r0, r1, min_mask_changes=1)
    grads: list = []
    t, _ = _train(_sca_equiv_cfg(tmp_path, "equiv_sca_single", 12), prep=_keep_gate_grads(grads))
    ddp = torch.load(out / "equiv_sca_ddp.pt", weights_only=False)
    assert len(grads) == len(ddp["grads"]) >= 1
    for g1, g2 in zip(grads, ddp["grads"]):
        assert g1.keys() == g2.keys()
        for k in g1:
            assert torch.allclose(g1[k], g2[k], rtol=1e-4, atol=1e-7), f"gate gradients of {k} differ"
    for k, v in t.model.state_dict().items():
        if v.dtype == torch.bool:
            assert torch.equal(v, ddp["state"][k]), f"mask {k} differs between 1 and 2 processes"
        elif v.is_floating_point():
            assert torch.allclose(v, ddp["state"][k], atol=1e-5), f"{k}: max diff {(v - ddp['state'][k]).abs().max()}"
    assert t.method.history == r0["history"]
    assert t.history[-1]["test_acc"] == pytest.approx(r0["test_acc"])


def test_torchrun_module_entry_point(ddp_results):
    load, out = ddp_results
    r0, r1 = load("cli")
    assert r0["code"] in (0, None) and r1["code"] in (0, None), (r0, r1)
    assert "run directory:" in r0["stdout"] and r1["stdout"] == "", "only rank 0 prints"
    assert "DDP: 2 processes (gloo), batch 8 per process = 16 global" in r0["stdout"]
    run = out / "runs" / "tiny"
    assert (run / "results.json").is_file() and (run / "model.pt").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1, "metrics are written once (rank 0)"


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2])
