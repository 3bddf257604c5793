#!/usr/bin/env bash
# The three core methods against the project's own dense runs on Fashion-MNIST, T=4 (issue: core methods).
# Usage: bash benchmarks/core_fmnist.sh [--reuse]     (CPU: about 1.5 h on 2 cores)
set -euo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/results
spikeprune compare configs/fmnist/fc3_dense.yaml configs/fmnist/fc3_dynsnn_60.yaml configs/fmnist/fc3_dynsnn_72.yaml \
  configs/fmnist/fc3_pq_layer.yaml configs/fmnist/fc3_pq_neuron.yaml --set out_dir=runs/fmnist --out $out/core_fmnist_fc3 "$@"
spikeprune compare configs/fmnist/convnet_dense.yaml configs/fmnist/convnet_sca.yaml configs/fmnist/convnet_pq_layer.yaml \
  configs/fmnist/convnet_pq_neuron.yaml --set out_dir=runs/fmnist --out $out/core_fmnist_convnet "$@"
spikeprune compact runs/fmnist/convnet_sca > $out/core_fmnist_sca_compact.md
