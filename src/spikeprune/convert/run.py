"""The ``spikeprune convert`` recipe (dataclasses) and pipeline: ANN, conversion, accuracy vs T, DynSNN."""

from __future__ import annotations

import copy
import csv
import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from ..config import DataConfig, RunBase
from .ann import evaluate_ann, fold_bn, make_ann, train_ann
from .dynsnn import ann_units, dynsnn_convert, mask_converted, train_ann_fading
from .snn import accuracy_vs_T, calibrate, to_snn


# ========================================================================================= the run (CLI)
@dataclass
class ConvModelConfig:
    name: str = "lenet5"
    options: dict = field(default_factory=dict)  # model factory options (e.g. bn: true)


@dataclass
class ANNTrainConfig:
    epochs: int = 10
    optimizer: Literal["adam", "sgd"] = "adam"
    lr: float = 1e-3
    weight_decay: float = 0.0
    momentum: float = 0.9
    scheduler: Literal["cosine", "none"] = "cosine"
    activity_l1: float = 0.0  # firing-rate (activation) L1 penalty on the hidden ReLUs, see train_ann
    unit_hoyer: float = 0.0  # unit-level Hoyer sparsity penalty on the hidden ReLUs (fading units), see train_ann
    penalty_layers: list[int] | None = None  # ReLU ordinals the penalties apply to (None: all)
    max_steps_per_epoch: int | None = None
    checkpoint: str | None = None  # load this ANN state dict instead of training (else RUN_DIR/ann.pt is written)
    reuse: bool = True  # load RUN_DIR/ann.pt when it exists and was trained with the same settings

    def validate(self, key: str) -> None:
        from ..config import _check

        _check(self.epochs >= 0, f"{key}.epochs", f"must be >= 0, got {self.epochs}")
        _check(self.lr > 0, f"{key}.lr", f"must be > 0, got {self.lr}")
        _check(self.weight_decay >= 0, f"{key}.weight_decay", "must be >= 0")
        _check(self.activity_l1 >= 0, f"{key}.activity_l1", "must be >= 0")
        _check(self.unit_hoyer >= 0, f"{key}.unit_hoyer", "must be >= 0")


@dataclass
class ConversionConfig:
    method: Literal["max", "percentile"] = "percentile"
    percentile: float = 99.9
    calib_samples: int = 5000  # first N training samples (seeded order) calibrate λ and DynSNN's rates
    v_init: float = 0.5
    Ts: list[int] = field(default_factory=lambda: [8, 16, 32, 64, 128, 256])
    chunk: int = 32  # time steps per forward during evaluation (memory)

    def validate(self, key: str) -> None:
        from ..config import _check

        _check(0 < self.percentile <= 100, f"{key}.percentile", f"must be in (0, 100], got {self.percentile}")
        _check(self.calib_samples >= 1, f"{key}.calib_samples", "must be >= 1")
        _check(0 <= self.v_init < 1, f"{key}.v_init", f"must be in [0, 1), got {self.v_init}")
        _check(bool(self.Ts) and all(t >= 1 for t in self.Ts), f"{key}.Ts", "must be a non-empty list of T >= 1")
        _check(self.chunk >= 1, f"{key}.chunk", "must be >= 1")


@dataclass
class DynSNNConvertConfig:
    enabled: bool = True
    T: int = 128  # time steps of the rate estimate and of the reported comparison
    target_compression: float | None = 0.6
    kappa: float = 0.2  # used as is without target_compression (else the bisection's start)
    calib_samples: int = 2000
    rebalance: bool = True
    compensate: bool = False  # fold the dead units' mean input into their consumers' biases [R]
    min_alive: float = 0.02
    exclude: list[str] = field(default_factory=list)  # IF layers (e.g. body.2) kept whole
    # post: mask the converted SNN by its firing rates (no retraining); train: DynSNN on the ANN's ReLUs during a
    # short fine-tune of the trained ANN (threshold found while training, masks frozen after ``ramp``), then convert
    when: Literal["post", "train"] = "post"
    finetune_epochs: int = 10
    finetune_lr: float = 1e-3
    ramp: float = 0.3  # fraction of the fine-tune over which the target compression rises (cubic), then frozen
    beta: float = 0.9  # EMA factor of the unit activity
    update_every: int = 20  # fine-tune steps between mask updates during the ramp

    def validate(self, key: str) -> None:
        from ..config import _check

        _check(self.T >= 1, f"{key}.T", "must be >= 1")
        _check(self.when == "post" or self.target_compression is not None, f"{key}.target_compression",
               "is needed with when: train")
        _check(self.finetune_epochs >= 1, f"{key}.finetune_epochs", "must be >= 1")
        _check(self.finetune_lr > 0, f"{key}.finetune_lr", "must be > 0")
        _check(0 < self.ramp <= 1, f"{key}.ramp", f"must be in (0, 1], got {self.ramp}")
        _check(0 <= self.beta < 1, f"{key}.beta", f"must be in [0, 1), got {self.beta}")
        _check(self.update_every >= 1, f"{key}.update_every", "must be >= 1")
        _check(self.target_compression is None or 0 <= self.target_compression < 1, f"{key}.target_compression",
               "must be in [0, 1) or null")
        _check(self.kappa > 0, f"{key}.kappa", "must be > 0")
        _check(self.calib_samples >= 1, f"{key}.calib_samples", "must be >= 1")
        _check(0 <= self.min_alive <= 1, f"{key}.min_alive", "must be in [0, 1]")


@dataclass
class ConvertRunConfig(RunBase):
    name: str = "convert"
    model: ConvModelConfig = field(default_factory=ConvModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    ann: ANNTrainConfig = field(default_factory=ANNTrainConfig)
    conversion: ConversionConfig = field(default_factory=ConversionConfig)
    dynsnn: DynSNNConvertConfig = field(default_factory=DynSNNConvertConfig)
    measure_batches: int | None = None  # measure() on the first N test batches (None: all)
    measure_pooled_spikes: Literal["mac", "sop"] = "mac"  # measure(pooled_spikes=...): pooled spikes as MACs or SOPs

    def validate(self, key: str = "") -> None:
        from ..config import _check

        super().validate(key)
        _check(self.measure_batches is None or self.measure_batches >= 1, "measure_batches", "must be >= 1 or null")


def load_convert_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> ConvertRunConfig:
    """Read a ``convert`` recipe (strict keys and types, like :func:`spikeprune.config.load_config`)."""
    from ..config import load_config

    return load_config(path, overrides, schema=ConvertRunConfig)


def _write_atomic(path: Path, write: Callable[[str], None]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def plot_accuracy_vs_T(path: str | os.PathLike, Ts: Sequence[int], curves: dict[str, Sequence[float]],
                       ann_acc: float | None = None, title: str = "") -> None:
    """Accuracy (%) against T (log2 axis) for each curve, with the ANN as a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4), dpi=120)
    for label, acc in curves.items():
        ax.plot(Ts, [100 * a for a in acc], marker="o", label=label)
    if ann_acc is not None:
        ax.axhline(100 * ann_acc, color="k", ls="--", lw=1, label=f"ANN {100 * ann_acc:.2f}%")
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(Ts))
    ax.set_xticklabels([str(t) for t in Ts])
    ax.set_xlabel("time steps T")
    ax.set_ylabel("test accuracy (%)")
    if title:
        ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    _write_atomic(Path(path), lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def _ann_fingerprint(cfg: ConvertRunConfig) -> dict:
    d = cfg.data
    return {"model": asdict(cfg.model), "seed": cfg.seed, "data": {"name": d.name, "subset": d.subset,
            "batch_size": d.batch_size, "val_split": d.val_split, "options": d.options},
            "train": {k: v for k, v in asdict(cfg.ann).items() if k not in ("checkpoint", "reuse")}}


def _subset_loader(loader, n: int, batch_size: int):
    """The first ``n`` samples of a training loader's dataset, unshuffled, as a new loader."""
    from ..data import FastLoader

    ds = loader.dataset
    if hasattr(ds, "subset"):
        return FastLoader(ds.subset(torch.arange(min(n, len(ds)))), batch_size)
    from torch.utils.data import DataLoader, Subset

    return DataLoader(Subset(ds, list(range(min(n, len(ds))))), batch_size=batch_size)


def run_convert(cfg: ConvertRunConfig, log: Callable[[str], None] | None = None, overwrite: bool = False) -> dict:
    """The ``spikeprune convert`` pipeline: train (or load) the ANN, convert, accuracy vs T (Markdown, CSV and PNG
    in the run directory), DynSNN on the converted SNN, and ``results.json``. A directory holding a finished
    conversion (``results.json``) is refused unless ``overwrite`` (its ANN is still reused when ``ann.reuse`` and
    its settings match)."""
    from ..checkpoint import atomic_write
    from ..config import to_dict
    from ..data import build_loaders
    from ..measure import measure
    from ..runs import RunError, check_writable
    from ..train import seed_everything

    log = log or (lambda s: print(s, flush=True))
    rd = cfg.run_dir
    if (rd / "results.json").exists() and not overwrite:
        raise RunError(f"{rd} already holds a finished conversion (results.json); use --overwrite to run it again "
                       "(a matching ANN is reused), or another name")
    check_writable(rd)
    atomic_write(rd / "config.json", json.dumps(to_dict(cfg), indent=2, default=str).encode())
    seed_everything(cfg.seed)
    d = cfg.data
    train, _, test, info = build_loaders(d.name, root=d.root, batch_size=d.batch_size,
                                         eval_batch_size=d.eval_batch_size, val_split=d.val_split, seed=cfg.seed,
                                         download=d.download, subset=d.subset, **d.options)
    if info.kind != "static":
        raise ValueError(f"convert needs a static image dataset, {d.name!r} is {info.kind}")
    ann = make_ann(cfg.model.name, num_classes=info.num_classes, in_channels=info.in_shape[0],
                   image_size=info.in_shape[-1], **cfg.model.options)
    t0 = time.time()
    ann_time = None
    ann_path, fp_path = rd / "ann.pt", rd / "ann.json"
    fp = _ann_fingerprint(cfg)
    if cfg.ann.checkpoint:
        ann.load_state_dict(torch.load(cfg.ann.checkpoint, map_location="cpu", weights_only=True))
        log(f"loaded ANN from {cfg.ann.checkpoint}")
    elif cfg.ann.reuse and ann_path.is_file() and fp_path.is_file() and \
            json.loads(fp_path.read_text()).get("settings") == fp:
        ann.load_state_dict(torch.load(ann_path, map_location="cpu", weights_only=True))
        ann_time = json.loads(fp_path.read_text()).get("train_seconds")
        log(f"reusing the ANN trained before ({ann_path}, trained in {ann_time or 0:.0f} s)")
    else:
        a = cfg.ann
        log(f"training the ANN twin of {cfg.model.name} for {a.epochs} epochs ({a.optimizer}, lr {a.lr})")
        train_ann(ann, train, None, a.epochs, a.lr, a.optimizer, a.weight_decay, a.momentum, a.scheduler,
                  a.max_steps_per_epoch, log, a.activity_l1, a.unit_hoyer, a.penalty_layers)
        ann_time = time.time() - t0
        _write_atomic(ann_path, lambda p: torch.save(ann.state_dict(), p))
        fp_path.write_text(json.dumps({"settings": fp, "train_seconds": ann_time}, indent=2))
    ann.eval()
    ann_acc = evaluate_ann(ann, test)
    log(f"ANN test accuracy {100 * ann_acc:.2f}%")

    c = cfg.conversion
    calib = _subset_loader(train, c.calib_samples, d.eval_batch_size)
    folded = fold_bn(ann)
    lam = calibrate(folded, calib, c.method, c.percentile)
    cal = {"method": c.method, "percentile": c.percentile, "calib_samples": c.calib_samples}
    snn = to_snn(folded, lam, T=cfg.dynsnn.T, v_init=c.v_init, calibration=cal)
    log(f"converted: λ = {[round(v, 4) for v in lam.values()]}; evaluating T = {sorted(c.Ts)}")
    t1 = time.time()
    snn_acc = accuracy_vs_T(snn, test, c.Ts, chunk=c.chunk)
    log("converted SNN: " + ", ".join(f"T={t}: {100 * a:.2f}%" for t, a in snn_acc.items())
        + f" ({time.time() - t1:.0f} s)")
    Ts = sorted(snn_acc)
    results: dict[str, Any] = {"name": cfg.name, "model": cfg.model.name, "dataset": d.name,
                               "ann_accuracy": ann_acc, "ann_train_seconds": ann_time, "lambdas": list(lam.values()),
                               "calibration": cal, "v_init": c.v_init,
                               "snn_accuracy": {str(t): a for t, a in snn_acc.items()}}
    curves = {"converted SNN": [snn_acc[t] for t in Ts]}
    rows = [{"T": t, "ann_acc": ann_acc, "snn_acc": snn_acc[t], "snn_minus_ann": snn_acc[t] - ann_acc} for t in Ts]

    dyn = cfg.dynsnn
    mkw = dict(max_batches=cfg.measure_batches, pooled_spikes=cfg.measure_pooled_spikes)
    if dyn.enabled:
        dense_m = measure(snn, test, **mkw)
        t2 = time.time()
        if dyn.when == "train":
            names = snn.if_neurons()
            unknown = set(dyn.exclude) - set(names)
            if unknown:
                raise ValueError(f"dynsnn.exclude names no IF layer: {sorted(unknown)}; IF layers are {names}")
            ft = copy.deepcopy(ann)
            groups = ann_units(ft)
            excl = [g.relu for g, n in zip(groups, names) if n in dyn.exclude]
            log(f"DynSNN while the ANN trains: {dyn.finetune_epochs} fine-tune epochs (lr {dyn.finetune_lr}), "
                f"target {dyn.target_compression} ramped over {dyn.ramp:.0%} of them")
            fres = train_ann_fading(ft, train, dyn.finetune_epochs, dyn.target_compression, lr=dyn.finetune_lr,
                                    optimizer=cfg.ann.optimizer, ramp=dyn.ramp, beta=dyn.beta,
                                    update_every=dyn.update_every, min_alive=dyn.min_alive, exclude=excl,
                                    weight_decay=cfg.ann.weight_decay, momentum=cfg.ann.momentum,
                                    max_steps_per_epoch=cfg.ann.max_steps_per_epoch, log=log)
            ft_acc = evaluate_ann(ft, test)
            log(f"fine-tuned masked ANN test accuracy {100 * ft_acc:.2f}% (dense ANN {100 * ann_acc:.2f}%)")
            ffolded = fold_bn(ft)
            flam = calibrate(ffolded, calib, c.method, c.percentile)
            psnn = to_snn(ffolded, flam, T=dyn.T, v_init=c.v_init, calibration=cal)
            engine, comp = mask_converted(psnn, [fres.masks.get(g.relu) for g in groups])
            alive = {n: int(engine.unit_mask(n).sum()) for n in engine.unit_masks()}
            units = {n: engine.unit_mask(n).numel() for n in engine.unit_masks()}
            summary = {"when": "train", "kappa": fres.kappa, "compression": comp, "ann_compression": fres.compression,
                       "units_removed": sum(units[n] - alive[n] for n in units) / max(1, sum(
                           engine.group(n).units for n in names)),
                       "alive": alive, "units": units, "finetuned_ann_accuracy": ft_acc,
                       "finetune_epochs": dyn.finetune_epochs, "finetune_lr": dyn.finetune_lr, "ramp": dyn.ramp,
                       "beta": dyn.beta, "update_every": dyn.update_every, "lambdas": list(flam.values()),
                       "history": fres.history}
            res_kappa, res_comp = fres.kappa, comp
        else:
            dcalib = _subset_loader(train, dyn.calib_samples, d.eval_batch_size)
            res = dynsnn_convert(snn, dcalib, dyn.target_compression, dyn.kappa, T=dyn.T, rebalance=dyn.rebalance,
                                 min_alive=dyn.min_alive, exclude=dyn.exclude, chunk=c.chunk,
                                 compensate=dyn.compensate)
            psnn, alive = snn, res.alive
            summary = {"when": "post", **res.summary(), "rebalance": dyn.rebalance, "compensate": dyn.compensate,
                       "calib_samples": dyn.calib_samples}
            res_kappa, res_comp = res.kappa, res.compression
        log(f"DynSNN: κ={res_kappa:.4g}, compression {100 * res_comp:.2f}%, alive {alive} "
            f"({time.time() - t2:.0f} s)")
        pr_acc = accuracy_vs_T(psnn, test, c.Ts, chunk=c.chunk)
        log("DynSNN SNN: " + ", ".join(f"T={t}: {100 * a:.2f}%" for t, a in pr_acc.items()))
        pr_m = measure(psnn, test, **mkw)
        curves[f"DynSNN ({100 * res_comp:.1f}% compression)"] = [pr_acc[t] for t in Ts]
        for r in rows:
            r["dynsnn_acc"] = pr_acc[r["T"]]
            r["dynsnn_minus_snn"] = pr_acc[r["T"]] - snn_acc[r["T"]]
        results["dynsnn"] = {**summary, "T": dyn.T, "target_compression": dyn.target_compression,
                             "exclude": list(dyn.exclude),
                             "accuracy": {str(t): a for t, a in pr_acc.items()},
                             "measure_compression": 1 - pr_m.connectivity,
                             "measure_dense": dense_m.summary(), "measure": pr_m.summary()}
        (rd / "dynsnn_measure.md").write_text(f"## converted SNN, T={dyn.T}\n\n{dense_m.table()}\n\n"
                                              f"## DynSNN on the converted SNN, T={dyn.T}\n\n{pr_m.table()}\n")
        torch.save(psnn.state_dict(), rd / "snn_dynsnn.pt")
    results["rows"] = rows
    title = f"{cfg.model.name} on {d.name}: ANN→SNN ({c.method}" + \
        (f" {c.percentile}" if c.method == "percentile" else "") + ")"
    plot_accuracy_vs_T(rd / "accuracy_vs_T.png", Ts, curves, ann_acc, title)
    write_table(rd / "accuracy_vs_T", rows)
    atomic_write(rd / "results.json", json.dumps(results, indent=2, default=float).encode())
    log(f"run directory: {rd}")
    return results


def write_table(prefix: str | os.PathLike, rows: list[dict], header: Sequence[str] = ()) -> str:
    """Write ``rows`` as ``PREFIX.md`` (a Markdown table after ``header`` lines) and ``PREFIX.csv`` (``header``
    as ``#`` comment lines); returns the Markdown table."""
    prefix = str(prefix)
    keys = list(rows[0])
    pct = {k for k in keys if k != "T"}
    lines = ["| " + " | ".join(k if k == "T" else k + " (%)" for k in keys) + " |",
             "|" + "|".join("---:" for _ in keys) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(str(r[k]) if k not in pct else
                                        (f"{100 * r[k]:+.2f}" if "minus" in k else f"{100 * r[k]:.2f}")
                                        for k in keys) + " |")
    table = "\n".join(lines)
    Path(prefix + ".md").write_text(("\n".join(header) + "\n\n" if header else "") + table + "\n")
    with open(prefix + ".csv", "w", newline="") as f:
        for h in header:
            f.write(f"# {h.lstrip('# ')}\n")
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows([{k: (f"{v:.6f}" if isinstance(v, float) else v) for k, v in r.items()} for r in rows])
    return table


def main(argv: list[str] | None = None) -> int:  # pragma: no cover - thin wrapper, the CLI calls run_convert
    import argparse

    p = argparse.ArgumentParser(prog="spikeprune convert")
    p.add_argument("--config", "-c")
    p.add_argument("--set", "-s", action="append", default=[])
    a = p.parse_args(argv)
    run_convert(load_convert_config(a.config, a.set))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
