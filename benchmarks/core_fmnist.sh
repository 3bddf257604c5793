#!/usr/bin/env bash
# The three core methods against the project's own dense runs on Fashion-MNIST, T=4.
# Usage: bash benchmarks/core_fmnist.sh [--reuse]
#   --reuse skips every cell whose run directory already holds results of the same config, so the tables can be
#   rebuilt from finished runs. The committed results were trained as separate single-thread processes
#   (OMP_NUM_THREADS=1, `spikeprune train -c <recipe> --set out_dir=runs/fmnist`), several at once on 2 cores;
#   this script trains the missing cells one after the other (about 3 h on 2 cores).
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
f=configs/fmnist
spikeprune compare $f/fc3_dense.yaml $f/fc3_dynsnn_58.yaml $f/fc3_dynsnn_60.yaml $f/fc3_dynsnn_72.yaml \
  $f/fc3_dynsnn_57_ft.yaml $f/fc3_dynsnn_58_ft.yaml $f/fc3_dynsnn_70_ft.yaml \
  $f/fc3_pq_layer.yaml $f/fc3_pq_neuron.yaml --set out_dir=runs/fmnist --out $out/core_fmnist_fc3 "$@"
spikeprune compare $f/convnet_dense.yaml $f/convnet_sca.yaml $f/convnet_pq_layer.yaml $f/convnet_pq_neuron.yaml \
  --set out_dir=runs/fmnist --out $out/core_fmnist_convnet "$@"
spikeprune compare $f/convnet_dense_wide.yaml $f/convnet_wide_pq_layer.yaml $f/convnet_wide_pq_neuron.yaml \
  --set out_dir=runs/fmnist --out $out/core_fmnist_convnet_wide "$@"
# seed 1 of the wide convnet trio (each recipe with --set seed=1 --set name=<recipe>_s1)
for r in convnet_dense_wide convnet_wide_pq_layer convnet_wide_pq_neuron; do
  [ -f runs/fmnist/${r}_s1/results.json ] || \
    spikeprune train -c $f/$r.yaml --set seed=1 --set name=${r}_s1 --set out_dir=runs/fmnist
done
spikeprune compare runs/fmnist/convnet_dense_wide_s1/config.json runs/fmnist/convnet_wide_pq_layer_s1/config.json \
  runs/fmnist/convnet_wide_pq_neuron_s1/config.json --out $out/core_fmnist_convnet_wide_s1 "$@"
spikeprune compare $f/convnet_dense_wide_e12.yaml $f/convnet_wide_pq_layer_e12.yaml \
  --set out_dir=runs/fmnist --out $out/core_fmnist_convnet_wide_e12 "$@"
spikeprune compact runs/fmnist/convnet_sca > $out/core_fmnist_sca_compact.md
