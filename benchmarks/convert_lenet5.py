"""ANN->SNN conversion of LeNet-5 on Fashion-MNIST and DynSNN on the converted SNN (issue: "ANN-to-SNN conversion,
and DynSNN on converted networks"; docs/methods.md §3 item 5).

Usage (from the repository root; about 30-40 min on a shared 2-core CPU, one thread):

    OMP_NUM_THREADS=1 nohup python benchmarks/convert_lenet5.py > runs/convert_lenet5.log 2>&1 &

Options: ``--config`` (default configs/convert/fmnist_lenet5.yaml), ``--set key=value`` (config overrides),
``--out`` (result prefix, default benchmarks/results/convert_lenet5_fmnist). Runs the ``spikeprune convert`` pipeline
(train or reuse the ANN in runs/convert/fmnist_lenet5, calibrate, convert, accuracy vs T, DynSNN) and writes
``PREFIX.md`` (header, setup, tables, criteria), ``PREFIX.csv`` (accuracy vs T; ``#`` header lines) and
``PREFIX.png`` (the curve).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import shlex
import sys
import time
from pathlib import Path

import torch

from spikeprune.convert import load_convert_config, plot_accuracy_vs_T, run_convert, write_table

ROOT = Path(__file__).resolve().parents[1]


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default=str(ROOT / "configs/convert/fmnist_lenet5.yaml"))
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--out", default=str(ROOT / "benchmarks/results/convert_lenet5_fmnist"))
    p.add_argument("--control", default=str(ROOT / "benchmarks/results/convert_lenet5_fmnist_plain.json"),
                   help="results JSON of a control run to summarise at the end (skipped when missing)")
    args = p.parse_args(argv)
    os.chdir(ROOT)
    command = "OMP_NUM_THREADS=" + os.environ.get("OMP_NUM_THREADS", "?") + " python " + \
        " ".join(shlex.quote(a) for a in [os.path.relpath(__file__, ROOT), *sys.argv[1:]])
    started = _dt.datetime.now().astimezone()
    t0 = time.time()
    cfg = load_convert_config(args.config, args.set)
    res = run_convert(cfg)
    wall = time.time() - t0
    machine = (f"{os.cpu_count()}-core CPU ({cpu_name()}), shared with other jobs; torch {torch.__version__}, "
               f"{torch.get_num_threads()} thread(s); Python {platform.python_version()}")
    header = [f"# command: {command}", f"# machine: {machine}",
              f"# date: {started:%Y-%m-%d %H:%M %Z} (wall time {wall / 60:.1f} min)",
              f"# config: {os.path.relpath(args.config, ROOT)} {' '.join(args.set)}".rstrip()]
    rows = res["rows"]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    table = write_table(out, rows, header)
    Ts = [r["T"] for r in rows]
    curves = {"converted SNN": [r["snn_acc"] for r in rows]}
    dyn = res.get("dynsnn")
    if dyn:
        curves[f"DynSNN on converted ({100 * dyn['compression']:.1f}% compression)"] = [r["dynsnn_acc"] for r in rows]
    plot_accuracy_vs_T(out.with_suffix(".png"), Ts, curves, res["ann_accuracy"],
                       f"LeNet-5, Fashion-MNIST: ANN->SNN ({res['calibration']['method']} "
                       f"{res['calibration']['percentile']}), {started:%Y-%m-%d}, {os.cpu_count()}-core CPU")

    ann = res["ann_accuracy"]
    a = cfg.ann
    pens = ([f"activation-L1 {a.activity_l1}"] if a.activity_l1 else []) + \
        ([f"unit-level Hoyer sparsity penalty {a.unit_hoyer}"] if a.unit_hoyer else [])
    penalty = (" and ".join(pens) + " on hidden ReLUs " + (str(a.penalty_layers) if a.penalty_layers is not None
                                                           else "(all)") + " (ordinals); ") if pens else \
        "no activity penalty; "
    best = [(r["T"], r["snn_acc"]) for r in rows if r["T"] <= 128 and ann - r["snn_acc"] <= 0.01]
    lines = [*header, "", "# ANN→SNN conversion of LeNet-5 on Fashion-MNIST, and DynSNN on the converted SNN", "",
             "Setup (see the config for every [R] choice): ANN twin of `lenet5` (6C5-AP2-16C5-AP2-FC120-FC84-FC10, "
             "ReLU, biases, no BN) trained with "
             f"{cfg.ann.optimizer} lr {cfg.ann.lr}, {cfg.ann.epochs} epochs, batch {cfg.data.batch_size}, "
             f"{100 * cfg.data.val_split:.0f}% of the training set held out, " + penalty +
             f"thresholds from the {cfg.conversion.percentile}th percentile ({cfg.conversion.method}) of positive "
             f"activations on {cfg.conversion.calib_samples} training images (threshold balancing "
             "V_th = λ_l/λ_(l-1), weights unchanged); IF neurons with reset by subtraction, initial membrane "
             f"{cfg.conversion.v_init}·V_th; direct analog input; read-out = mean input current of the last layer. "
             f"λ = {[round(v, 4) for v in res['lambdas']]}. Test set: 10,000 images.", "",
             f"**ANN test accuracy: {100 * ann:.2f}%**", "", table, ""]
    if best:
        t, a = best[0]
        lines.append(f"Criterion 1 (converted SNN within 1.0 point of the ANN at some T ≤ 128): **met** at T={t} "
                     f"({100 * a:.2f}% vs {100 * ann:.2f}%, {100 * (a - ann):+.2f}).")
    else:
        lines.append("Criterion 1 (converted SNN within 1.0 point of the ANN at some T ≤ 128): **not met**.")
    if dyn:
        T = dyn["T"]
        snn_T = res["snn_accuracy"][str(T)]
        pr_T = dyn["accuracy"][str(T)]
        loss = snn_T - pr_T
        ok = dyn["compression"] >= 0.6 and loss <= 0.005
        alive = ", ".join(f"{n}: {dyn['alive'][n]}/{dyn['units'][n]}" for n in dyn["units"])
        md = dyn["measure"]
        mdd = dyn["measure_dense"]
        lines += ["", "## DynSNN on the converted SNN", "",
                  f"Fading units: per-unit firing rate (channel mean in conv layers) at T={T} on "
                  f"{dyn['calib_samples']} training images; units with rate < κ·mean(layer) masked with the mask "
                  f"engine's unit masks, κ bisected to the target compression {dyn['target_compression']}; "
                  f"thresholds re-balanced on the masked network: {dyn['rebalance']}. No retraining.", "",
                  (f"- κ → 0⁺ ({dyn['kappa']:.2g}): the target is reached by masking only the units that never "
                   f"fired on the calibration set (silent units per layer: {dyn.get('silent')}); they alone remove "
                   f"{100 * dyn['compression']:.2f}% of the weights" if dyn["kappa"] < 1e-6 else
                   f"- κ = {dyn['kappa']:.4f}") + f"; alive units per IF layer: {alive}",
                  f"- compression (1 − density of effective weights): **{100 * dyn['compression']:.2f}%** "
                  f"(measure(): {100 * dyn['measure_compression']:.2f}%); units removed "
                  f"{100 * dyn['units_removed']:.1f}%, neurons removed (conv channels × positions) "
                  f"{100 * dyn['neurons_removed']:.1f}%",
                  f"- λ before → after re-balancing: {[round(v, 3) for v in dyn['lambdas_before']]} → "
                  f"{[round(v, 3) for v in dyn['lambdas_after']]}",
                  f"- accuracy at T={T}: converted SNN {100 * snn_T:.2f}% → DynSNN {100 * pr_T:.2f}% "
                  f"(loss {100 * loss:.2f} points)",
                  f"- measure() at T={T} on the first {cfg.measure_batches or 'all'} test batches: firing rate "
                  f"{mdd['firing_rate']:.4f} → {md['firing_rate']:.4f}, effective SOPs/sample "
                  f"{mdd['sops']:,.0f} → {md['sops']:,.0f}, MACs/sample {mdd['macs']:,.0f} → {md['macs']:,.0f}, "
                  f"energy {mdd['energy_uj']:.3f} → {md['energy_uj']:.3f} µJ",
                  "- layers behind an average pool receive pooled spikes (multiples of 1/4), which measure() counts "
                  "as analog MACs, not SOPs; the SOP and energy figures are therefore conservative",
                  "",
                  f"Criterion 2 (≥ 60% compression with ≤ 0.5 points loss against the converted SNN at T={T}): "
                  f"**{'met' if ok else 'not met'}** ({100 * dyn['compression']:.2f}% compression, "
                  f"{100 * loss:.2f} points loss).", ""]
        others = [r for r in rows if r["T"] != T]
        if others:
            lines.append("Loss at the other T: " + ", ".join(f"T={r['T']}: {-100 * r['dynsnn_minus_snn'] + 0.0:.2f}"
                                                            for r in others) + " points (negative: DynSNN better).")
        dm = cfg.run_dir / "dynsnn_measure.md"
        if dm.is_file():
            lines += ["", "<details><summary>measure() tables</summary>", "", dm.read_text().replace("## ", "### "),
                      "</details>"]
    control = Path(args.control) if args.control else None
    if control is not None and control.is_file() and control.resolve() != out.with_suffix(".json").resolve():
        c = json.loads(control.read_text())
        cd = c.get("dynsnn") or {}
        T = str(cd.get("T", 128))
        lines += ["", "## Control: the same pipeline on an ANN trained without the sparsity penalty", "",
                  f"From `{os.path.relpath(control, ROOT)}` ({c['header'][2].lstrip('# ')}): ANN "
                  f"{100 * c['ann_accuracy']:.2f}% (the ANN above differs by {100 * (ann - c['ann_accuracy']):+.2f} "
                  f"points); λ = {[round(v, 2) for v in c['lambdas']]}; converted SNN "
                  + ", ".join(f"T={t}: {100 * a:.2f}%" for t, a in c["snn_accuracy"].items()) + "."]
        if cd:
            closs = c["snn_accuracy"][T] - cd["accuracy"][T]
            lines.append(f"DynSNN at T={T}: {100 * cd['compression']:.2f}% compression, accuracy "
                         f"{100 * c['snn_accuracy'][T]:.2f}% → {100 * cd['accuracy'][T]:.2f}% (loss "
                         f"{100 * closs:.2f} points)" + (": without the penalty, the units that must go to reach the "
                                                          "target still carry information." if closs > 0.005 else "."))
    tr = res.get("ann_train_seconds")
    lines += ["", (f"ANN training: {tr / 60:.1f} min on this machine (1 thread); " if tr else "") +
              f"whole run {wall / 60:.1f} min. Raw results: {cfg.run_dir}/results.json."]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    (out.parent / (out.name + ".json")).write_text(json.dumps({"header": header, **res}, indent=2, default=float))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
