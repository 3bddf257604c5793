#!/usr/bin/env bash
# DDP equivalence on Fashion-MNIST fc3 (issue: scale out with DDP): PQ rewiring (layer scope) for 4 epochs, one
# epoch per iteration, trained by 1 process (batch 128) and by 2 processes under torchrun (gloo, 64 per process =
# the same global batch of 128), one thread each. Writes benchmarks/results/ddp_fmnist.md (accuracy, density per
# iteration, wall time) and ddp_fmnist.log. Usage: bash benchmarks/ddp_fmnist.sh [--set KEY=VALUE ...]
# (extra overrides go to both runs; CPU: about 15-25 min on 2 shared cores). DDP_OUT/DDP_RUNS move the outputs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${DDP_OUT:-benchmarks/results}
runs=${DDP_RUNS:-runs/ddp}
log=$out/ddp_fmnist.log
mkdir -p "$out" "$runs"
export OMP_NUM_THREADS=1
recipe=configs/fmnist/fc3_pq_layer.yaml
common=(--set train.epochs=4 --set method.epochs_per_iteration=1 --set train.progress=false --set out_dir=$runs)
cmd1=(python -m spikeprune train --config $recipe "${common[@]}" --set name=fc3_pq_1proc --set data.batch_size=128 "$@")
cmd2=(torchrun --nproc_per_node=2 --master_addr=127.0.0.1 --master_port=29533 -m spikeprune train --config $recipe
      "${common[@]}" --set name=fc3_pq_2proc --set data.batch_size=64 "$@")
: > "$log"
echo "load before: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
t0=$(date +%s); echo "\$ ${cmd1[*]}" | tee -a "$log"; "${cmd1[@]}" 2>&1 | tee -a "$log"; t1=$(date +%s)
echo "load between: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
echo "\$ ${cmd2[*]}" | tee -a "$log"; "${cmd2[@]}" 2>&1 | tee -a "$log"; t2=$(date +%s)
echo "load after: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$log"
LOG="$log" WALL1=$((t1 - t0)) WALL2=$((t2 - t1)) CMD1="${cmd1[*]}" CMD2="${cmd2[*]}" python - "$runs" "$out/ddp_fmnist.md" <<'PY'
import json, os, platform, subprocess, sys, time
from pathlib import Path

import torch

runs, md = Path(sys.argv[1]), Path(sys.argv[2])
r = {k: json.loads((runs / f"fc3_pq_{k}" / "results.json").read_text()) for k in ("1proc", "2proc")}
h = {k: [json.loads(x) for x in (runs / f"fc3_pq_{k}" / "metrics.jsonl").read_text().splitlines()] for k in r}
it = {k: r[k]["method_summary"]["iterations"] for k in r}
m = {k: torch.load(runs / f"fc3_pq_{k}" / "model.pt", weights_only=True) for k in r}
masks = [n for n in m["1proc"] if n.endswith(".weight_mask")]
same = sum(int((m["1proc"][n] == m["2proc"][n]).sum()) for n in masks)
total = sum(m["1proc"][n].numel() for n in masks)
both = sum(int((m["1proc"][n] & m["2proc"][n]).sum()) for n in masks)
act = sum(int(m["1proc"][n].sum()) for n in masks)
cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
acc1, acc2 = 100 * r["1proc"]["accuracy"], 100 * r["2proc"]["accuracy"]
lines = [
    "# DDP on Fashion-MNIST fc3: 1 process vs 2 processes with the same global batch", "",
    f"- date: {time.strftime('%Y-%m-%d %H:%M %Z')}",
    f"- machine: {platform.node()}, {os.cpu_count()} CPU cores ({cpu}), {platform.platform()}, "
    f"Python {platform.python_version()}, torch {torch.__version__}; CPU only, OMP_NUM_THREADS=1 per process; "
    "the machine was shared with other long benchmarks, so wall times are contended (load averages in "
    "ddp_fmnist.log)",
    "- recipe: `configs/fmnist/fc3_pq_layer.yaml` (PQ rewiring, layer scope, ERK 50% start, target 30%) with "
    f"{r['1proc']['epochs']} epochs, `method.epochs_per_iteration=1` (SAP net prune after every epoch but the last), "
    "cosine LR over the epochs; Adam, lr 0.001, T=4",
    f"- 1 process: `{os.environ['CMD1']}`",
    f"- 2 processes: `{os.environ['CMD2']}` (gloo; 64 per process = global batch 128; each rank takes every "
    "2nd sample of the same shuffled order, so the global batches are the same samples as with 1 process)",
    "- script: `bash benchmarks/ddp_fmnist.sh`", "",
    "| | 1 process, batch 128 | 2 processes, 2 × 64 | Δ (2 − 1) |", "|---|---:|---:|---:|",
    f"| final test accuracy % (measure) | {acc1:.2f} | {acc2:.2f} | {acc2 - acc1:+.2f} |",
]
for i, (a, b) in enumerate(zip(it["1proc"], it["2proc"])):
    lines.append(f"| iteration {i + 1}: density % / test acc % | {100 * a['density']:.2f} / {100 * a['test_acc']:.2f}"
                 f" | {100 * b['density']:.2f} / {100 * b['test_acc']:.2f} | "
                 f"{100 * (b['density'] - a['density']):+.3f} / {100 * (b['test_acc'] - a['test_acc']):+.2f} |")
lines += [
    f"| final connectivity % | {100 * r['1proc']['connectivity']:.2f} | {100 * r['2proc']['connectivity']:.2f} | "
    f"{100 * (r['2proc']['connectivity'] - r['1proc']['connectivity']):+.3f} |",
    f"| last-epoch train loss | {h['1proc'][-1]['train_loss']:.4f} | {h['2proc'][-1]['train_loss']:.4f} | "
    f"{h['2proc'][-1]['train_loss'] - h['1proc'][-1]['train_loss']:+.4f} |",
    f"| training time s (sum of epochs) | {r['1proc']['train_time_s']:.0f} | {r['2proc']['train_time_s']:.0f} | |",
    f"| wall time s (whole command) | {os.environ['WALL1']} | {os.environ['WALL2']} | |", "",
    "Load average (1/5/15 min) " + "; ".join(l.strip() for l in open(os.environ["LOG"]) if l.startswith("load "))
    + f". With {os.cpu_count()} cores already busy with other jobs, a second process adds no throughput here; "
    "the wall times show the cost of the run on this machine, not the DDP speed-up.", "",
    f"Final connection masks: {100 * same / total:.2f}% of the {total:,} mask entries agree between the two runs; "
    f"{100 * both / max(act, 1):.2f}% of the 1-process run's active weights are also active in the 2-process run. "
    "(The runs are the same computation up to floating-point summation order: DDP averages two half-batch gradients "
    "where one process sums the whole batch, and spike thresholds amplify such differences over epochs.)", "",
]
md.write_text("\n".join(lines))
print("\n".join(lines))
PY
