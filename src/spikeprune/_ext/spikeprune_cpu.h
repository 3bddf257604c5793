// spikeprune's compiled CPU kernels: what every kernel family shares (includes, helpers) and the functions each
// family exports, so the chain (chain.cpp) and the Python bindings (bindings.cpp) can call across files.
//
// One source file per kernel family:
// * neuron.cpp        lif_forward / lif_backward (the multi-step LIF/IF neuron and its BPTT), unit_reduce /
//                     unit_scale (per-unit sums and gates of [T, B, C, ...] tensors, for other frameworks' neurons)
// * event_linear.cpp  event_linear / csr_linear: inference over the non-zero weights (CSC by input, CSR by output)
// * spike_linear.cpp  sparse_rows / pack_weight / sparse_input_linear / sparse_input_weight_grad: a dense Linear
//                     trained on a mostly-zero input (spikes), forward and weight gradient over its non-zeros
// * masked_matmul.cpp masked_index / masked_matmul: products over a masked weight's kept entries
// * chain.cpp         chain_forward / chain_register / chain_run / chain_release: several layers in one call
// * bindings.cpp      the Python module
//
// * lif_forward / lif_backward: the multi-step LIF/IF neuron (charge H = a V + b X + c, or V + k (X - V) + c with
//   decay_input; fire S = [H >= V_th]; hard or soft reset) over all T steps in one call, and its BPTT backward for a
//   detached reset and a constant decay. Each block of BLOCK neurons runs its T steps while its membrane stays in
//   L1; eager PyTorch needs three to five kernel launches per step and neuron layer for the same work.
// * event_linear: y[n] = bias + sum over the inputs i with x[n, i] != 0 of x[n, i] * W[:, i], touching only the
//   non-zero weights of column i (CSC by input), i.e. exactly the layer's synaptic operations.
// * csr_linear: y[n, o] = bias[o] + sum_j W[o, col_j] x[n, col_j] over the non-zero weights of row o (CSR), for
//   inputs that are not spikes (the analog first layer of a direct-encoded SNN).
// * sparse_rows / pack_weight / sparse_input_linear / sparse_input_weight_grad: a *dense* Linear trained on a
//   mostly-zero input (spikes): forward and weight gradient over the non-zero inputs only.
//
// All tensors are "T-major dense": x.stride(0) == x[0].numel() and x[0] is dense in memory (contiguous or
// channels-last); outputs are made with empty_like and so share the input's layout. The Python side checks this.

#pragma once

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <type_traits>
#if defined(__AVX__)
#include <immintrin.h>
#endif
#include <cstring>
#include <cmath>
#include <mutex>
#include <unordered_map>

namespace {

inline int64_t rows_grain(int64_t work_per_row) {  // about 8k operations per thread at least: a fork costs microseconds
  return std::max<int64_t>(1, (1 << 13) / std::max<int64_t>(1, work_per_row));
}
// 32-byte vectors (GCC/Clang vector extensions): explicit, since GCC vectorises these loops across the non-zero
// inputs with gathers otherwise, 10x slower on AMD EPYC (measured).
template <typename T>
struct Vec {
  typedef T type __attribute__((vector_size(32)));
  static constexpr int64_t lanes = 32 / sizeof(T);
  static type load(const T* p) { type v; std::memcpy(&v, p, sizeof(v)); return v; }
  static void store(T* p, type v) { std::memcpy(p, &v, sizeof(v)); }
};
constexpr int64_t NV = 8;  // vectors per block (8 accumulators in registers): 64 floats, 32 doubles

}  // namespace

// ----------------------------------------------------------------------------------------- exported functions
std::vector<at::Tensor> lif_forward(const at::Tensor& x, const c10::optional<at::Tensor>& v0, double a, double b,
                                    double c, bool lerp, double k, double v_th, double v_reset, bool hard,
                                    bool keep_membrane, const c10::optional<at::Tensor>& gate, int64_t stats);
std::vector<at::Tensor> lif_backward(const at::Tensor& h, const c10::optional<at::Tensor>& g_s,
                                     const c10::optional<at::Tensor>& g_h, const c10::optional<at::Tensor>& g_v_last,
                                     double a, double b, double v_th, bool hard, int64_t surrogate, double alpha,
                                     const c10::optional<at::Tensor>& gate, bool gate_grad);
at::Tensor unit_reduce(const at::Tensor& a, const c10::optional<at::Tensor>& b, int64_t op);
std::vector<at::Tensor> unit_scale(const at::Tensor& x, const at::Tensor& m, const c10::optional<at::Tensor>& s);

at::Tensor event_linear(const at::Tensor& x, const at::Tensor& colptr, const at::Tensor& rows, const at::Tensor& vals,
                        const c10::optional<at::Tensor>& bias, int64_t n_out, int64_t steps);
at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& cols, const at::Tensor& vals,
                      const c10::optional<at::Tensor>& bias, int64_t n_out);

std::tuple<std::vector<at::Tensor>, int64_t> sparse_rows(const at::Tensor& x, double max_density, int64_t n_out,
                                                         int64_t steps, double delta_gain);
at::Tensor pack_weight(const at::Tensor& w);
at::Tensor sparse_input_linear(const at::Tensor& ptr, const at::Tensor& cols, const at::Tensor& vals,
                               const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t n_out);
at::Tensor sparse_input_weight_grad(const at::Tensor& ptr, const at::Tensor& cols, const at::Tensor& vals,
                                    const at::Tensor& g, int64_t n_in);

std::vector<at::Tensor> masked_index(const at::Tensor& mask, bool by_cols);
at::Tensor masked_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ptr, const at::Tensor& loc,
                         const at::Tensor& off, int64_t R);

at::Tensor chain_forward(const at::Tensor& x, const std::vector<int64_t>& kinds,
                         const std::vector<std::vector<at::Tensor>>& tensors, const std::vector<std::vector<double>>& s);
int64_t chain_register(const std::vector<int64_t>& kinds, const std::vector<std::vector<at::Tensor>>& tensors,
                       const std::vector<std::vector<double>>& scalars);
at::Tensor chain_run(int64_t id, const at::Tensor& x);
void chain_release(int64_t id);
