// spikeprune's compiled CPU kernels, built on first use by spikeprune._ext (torch.utils.cpp_extension.load).
//
// * lif_forward / lif_backward: the multi-step LIF/IF neuron (charge H = a V + b X + c, or V + k (X - V) + c with
//   decay_input; fire S = [H >= V_th]; hard or soft reset) over all T steps in one call, and its BPTT backward for a
//   detached reset and a constant decay. Each block of BLOCK neurons runs its T steps while its membrane stays in
//   L1; eager PyTorch needs three to five kernel launches per step and neuron layer for the same work.
// * event_linear: y[n] = bias + sum over the inputs i with x[n, i] != 0 of x[n, i] * W[:, i], touching only the
//   non-zero weights of column i (CSC by input), i.e. exactly the layer's synaptic operations.
// * csr_linear: y[n, o] = bias[o] + sum_j W[o, col_j] x[n, col_j] over the non-zero weights of row o (CSR), for
//   inputs that are not spikes (the analog first layer of a direct-encoded SNN).
//
// All tensors are "T-major dense": x.stride(0) == x[0].numel() and x[0] is dense in memory (contiguous or
// channels-last); outputs are made with empty_like and so share the input's layout. The Python side checks this.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <mutex>
#include <unordered_map>

namespace {

constexpr int64_t BLOCK = 2048;  // neurons per block: their membranes stay in L1 across the T steps

enum SurrogateKind { ATAN = 0, SIGMOID = 1, TRIANGLE = 2 };

template <typename T, int SG>
inline T surrogate_grad(T x, T alpha) {
  if constexpr (SG == ATAN) {
    const T y = T(M_PI / 2) * alpha * x;
    return (alpha / 2) / (T(1) + y * y);
  } else if constexpr (SG == SIGMOID) {
    const T s = T(1) / (T(1) + std::exp(-alpha * x));
    return alpha * s * (T(1) - s);
  } else {
    const T y = T(1) - alpha * std::abs(x);
    return y > T(0) ? alpha * y : T(0);
  }
}

// The stride between time steps: N (T-major dense) or 0 (one step broadcast over T, e.g. a repeated static input).
int64_t check_t_major(const at::Tensor& x, const char* name, bool allow_broadcast = false) {
  TORCH_CHECK(x.device().is_cpu(), name, " must be a CPU tensor");
  TORCH_CHECK(x.dim() >= 2, name, " must be [T, B, ...]");
  TORCH_CHECK(x[0].is_non_overlapping_and_dense(), name, "[0] must be dense in memory");
  const int64_t N = x[0].numel();
  const int64_t stride = x.size(0) <= 1 ? N : x.stride(0);
  TORCH_CHECK(stride == N || (allow_broadcast && stride == 0), name, " must have T as its outermost dim");
  return stride;
}

// A [T, ...] tensor laid out like x[0] at every step (T-major), whatever x's own step stride is.
at::Tensor empty_steps(const at::Tensor& x) {
  std::vector<int64_t> strides{x[0].numel()};
  for (auto st : x[0].strides()) strides.push_back(st);
  return at::empty_strided(x.sizes(), strides, x.options());
}

void check_like(const at::Tensor& t, const at::Tensor& ref, const char* name) {
  TORCH_CHECK(t.sizes() == ref.sizes() && t.strides() == ref.strides() && t.scalar_type() == ref.scalar_type(),
              name, " must have the shape, strides and dtype of its reference");
}

// How H is charged from V: a V + b X + c, or torch.lerp's two roundings of V + k (X - V) (then + c).
enum Charge { AFFINE = 0, LERP_SMALL = 1, LERP_LARGE = 2 };

// One block of n neurons through all T steps. Every flag is a template parameter and every pointer restrict, so
// the step loops are branch-free and vectorise (a data-dependent branch on the spike would mispredict).
template <typename T, int CH, bool HARD, bool KEEP>
void forward_block(const T* X, int64_t xs, const T* V0, T* __restrict V, T* S, T* H, int64_t T_, int64_t N, int64_t n,
                   T a, T b, T c, T k, T th, T vr) {
  T* __restrict v = V;
  for (int64_t t = 0; t < T_; ++t) {
    const T* __restrict x = X + t * xs;
    T* __restrict s = S + t * N;
    T* __restrict h = KEEP ? H + t * N : nullptr;
    const bool rest = t == 0 && V0 == nullptr;  // at rest at 0: H = b X + c, as the eager loop computes it
    if (t == 0 && V0 != nullptr) std::copy(V0, V0 + n, v);
    for (int64_t i = 0; i < n; ++i) {
      T hv;
      if (rest) hv = b * x[i] + c;
      else if (CH == LERP_SMALL) hv = v[i] + k * (x[i] - v[i]) + c;
      else if (CH == LERP_LARGE) hv = x[i] - (x[i] - v[i]) * (T(1) - k) + c;
      else hv = a * v[i] + b * x[i] + c;
      const bool fire = hv >= th;
      if (KEEP) h[i] = hv;
      s[i] = fire ? T(1) : T(0);
      v[i] = HARD ? (fire ? vr : hv) : (fire ? hv - th : hv);
    }
  }
}

template <typename T, int CH, bool HARD, bool KEEP>
void forward_all(const T* X, int64_t xs, const T* V0, T* V, T* S, T* H, int64_t T_, int64_t N, T a, T b, T c, T k,
                 T th, T vr) {
  at::parallel_for(0, N, BLOCK, [&](int64_t begin, int64_t end) {
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
      const int64_t n = std::min(end, i0 + BLOCK) - i0;
      forward_block<T, CH, HARD, KEEP>(X + i0, xs, V0 ? V0 + i0 : nullptr, V + i0, S + i0, KEEP ? H + i0 : nullptr,
                                       T_, N, n, a, b, c, k, th, vr);
    }
  });
}

// Runtime flags to one of the template instances.
template <typename T, int CH>
void forward_dispatch(bool hard, bool keep, const T* X, int64_t xs, const T* V0, T* V, T* S, T* H, int64_t T_,
                      int64_t N, T a, T b, T c, T k, T th, T vr) {
  if (hard && keep) forward_all<T, CH, true, true>(X, xs, V0, V, S, H, T_, N, a, b, c, k, th, vr);
  else if (hard) forward_all<T, CH, true, false>(X, xs, V0, V, S, H, T_, N, a, b, c, k, th, vr);
  else if (keep) forward_all<T, CH, false, true>(X, xs, V0, V, S, H, T_, N, a, b, c, k, th, vr);
  else forward_all<T, CH, false, false>(X, xs, V0, V, S, H, T_, N, a, b, c, k, th, vr);
}

}  // namespace

// Returns {spikes [T, ...], pre-spike membrane H [T, ...] (empty when keep_membrane is false), last V [...]}.
std::vector<at::Tensor> lif_forward(const at::Tensor& x, const c10::optional<at::Tensor>& v0, double a, double b,
                                    double c, bool lerp, double k, double v_th, double v_reset, bool hard,
                                    bool keep_membrane) {
  const int64_t xs = check_t_major(x, "x", true);
  const int64_t T = x.size(0);
  const int64_t N = x[0].numel();
  at::Tensor s = empty_steps(x);
  at::Tensor h = keep_membrane ? empty_steps(x) : at::empty({0}, x.options());
  at::Tensor v = at::empty_like(x[0]);
  const bool has_v0 = v0.has_value() && v0->defined();
  if (has_v0) check_like(*v0, v, "v0");
  const int ch = !lerp ? AFFINE : (std::abs(k) < 0.5 ? LERP_SMALL : LERP_LARGE);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lif_forward", [&] {
    using T_ = scalar_t;
    const T_* X = x.data_ptr<T_>();
    const T_* V0 = has_v0 ? v0->data_ptr<T_>() : nullptr;
    T_* H = keep_membrane ? h.data_ptr<T_>() : nullptr;
    auto run = [&](auto tag) {
      forward_dispatch<T_, decltype(tag)::value>(hard, keep_membrane, X, xs, V0, v.data_ptr<T_>(), s.data_ptr<T_>(),
                                                 H, T, N, a, b, c, k, v_th, v_reset);
    };
    if (ch == AFFINE) run(std::integral_constant<int, AFFINE>{});
    else if (ch == LERP_SMALL) run(std::integral_constant<int, LERP_SMALL>{});
    else run(std::integral_constant<int, LERP_LARGE>{});
  });
  return {s, h, v};
}

namespace {

// out[t] = b dL/dH[t] backwards from T-1: out[t] = scale keep[t] next + b dL/dH[t] (direct) + b σ'(H[t] - V_th)
// dL/dS[t], next = out[t + 1] (scale a) or dL/dV[T-1] (scale b), keep = [H < V_th] for a hard reset, else 1.
// Absent gradients (no dL/dS, no dL/dV[T-1]) read a block of zeros, so the loop has no branches.
template <typename T, int SG, bool HARD>
void backward_all(const T* H, const T* GS, const T* GH, const T* GV, T* OUT, int64_t T_, int64_t N, T a, T b, T th,
                  T alpha) {
  at::parallel_for(0, N, BLOCK, [&](int64_t begin, int64_t end) {
    std::vector<T> zeros((GS && GV) ? 0 : BLOCK, T(0));
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
      const int64_t n = std::min(end, i0 + BLOCK) - i0;
      for (int64_t t = T_ - 1; t >= 0; --t) {
        const T* __restrict ht = H + t * N + i0;
        const T* __restrict gs = GS ? GS + t * N + i0 : zeros.data();
        const T* __restrict nxt = t < T_ - 1 ? OUT + (t + 1) * N + i0 : (GV ? GV + i0 : zeros.data());
        const T scale = t < T_ - 1 ? a : b;
        T* __restrict ot = OUT + t * N + i0;
        for (int64_t i = 0; i < n; ++i) {
          const T carry = nxt[i] * scale;
          const T g = HARD ? (ht[i] < th ? carry : T(0)) : carry;
          ot[i] = g + b * surrogate_grad<T, SG>(ht[i] - th, alpha) * gs[i];
        }
        if (GH) {
          const T* __restrict gh = GH + t * N + i0;
          for (int64_t i = 0; i < n; ++i) ot[i] += b * gh[i];
        }
      }
    }
  });
}

template <typename T, int SG>
void backward_dispatch(bool hard, const T* H, const T* GS, const T* GH, const T* GV, T* OUT, int64_t T_, int64_t N,
                       T a, T b, T th, T alpha) {
  if (hard) backward_all<T, SG, true>(H, GS, GH, GV, OUT, T_, N, a, b, th, alpha);
  else backward_all<T, SG, false>(H, GS, GH, GV, OUT, T_, N, a, b, th, alpha);
}

}  // namespace

// BPTT of lif_forward for a detached reset and a constant decay: returns dL/dX (dL/dV0 = dL/dX[0] a / b).
at::Tensor lif_backward(const at::Tensor& h, const c10::optional<at::Tensor>& g_s, const c10::optional<at::Tensor>& g_h,
                        const c10::optional<at::Tensor>& g_v_last, double a, double b, double v_th, bool hard,
                        int64_t surrogate, double alpha) {
  check_t_major(h, "h");
  const int64_t T = h.size(0);
  const int64_t N = h[0].numel();
  const bool has_s = g_s.has_value() && g_s->defined(), has_h = g_h.has_value() && g_h->defined();
  const bool has_v = g_v_last.has_value() && g_v_last->defined();
  if (has_s) check_like(*g_s, h, "g_s");
  if (has_h) check_like(*g_h, h, "g_h");
  at::Tensor out = at::empty_like(h);
  if (has_v) check_like(*g_v_last, out[0], "g_v_last");
  TORCH_CHECK(surrogate >= 0 && surrogate <= 2, "unknown surrogate code ", surrogate);
  AT_DISPATCH_FLOATING_TYPES(h.scalar_type(), "lif_backward", [&] {
    using T_ = scalar_t;
    const T_* H = h.data_ptr<T_>();
    const T_* GS = has_s ? g_s->data_ptr<T_>() : nullptr;
    const T_* GH = has_h ? g_h->data_ptr<T_>() : nullptr;
    const T_* GV = has_v ? g_v_last->data_ptr<T_>() : nullptr;
    T_* OUT = out.data_ptr<T_>();
    if (surrogate == ATAN) backward_dispatch<T_, ATAN>(hard, H, GS, GH, GV, OUT, T, N, a, b, v_th, alpha);
    else if (surrogate == SIGMOID) backward_dispatch<T_, SIGMOID>(hard, H, GS, GH, GV, OUT, T, N, a, b, v_th, alpha);
    else backward_dispatch<T_, TRIANGLE>(hard, H, GS, GH, GV, OUT, T, N, a, b, v_th, alpha);
  });
  return out;
}

namespace {

void check_linear(const at::Tensor& x, const at::Tensor& ptr, const at::Tensor& idx, const at::Tensor& val,
                  const c10::optional<at::Tensor>& bias, int64_t n_out) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous CPU [N, in] tensor");
  TORCH_CHECK(ptr.scalar_type() == at::kLong && idx.scalar_type() == at::kLong, "index tensors must be int64");
  TORCH_CHECK(ptr.is_contiguous() && idx.is_contiguous() && val.is_contiguous(), "index tensors must be contiguous");
  TORCH_CHECK(val.scalar_type() == x.scalar_type(), "weights and input must have one dtype");
  TORCH_CHECK(idx.numel() == val.numel(), "one index per weight");
  if (bias.has_value() && bias->defined())
    TORCH_CHECK(bias->numel() == n_out && bias->is_contiguous() && bias->scalar_type() == x.scalar_type(),
                "bias must be a contiguous [out] tensor of the input's dtype");
}

inline int64_t rows_grain(int64_t work_per_row) {  // about 8k operations per thread at least: a fork costs microseconds
  return std::max<int64_t>(1, (1 << 13) / std::max<int64_t>(1, work_per_row));
}

// Rows [begin, end) of y = W x for one sample. Four partial sums, since one accumulator would chain every
// multiply-add on the previous one's latency; not auto-vectorised, since AVX2 gathers are slower than scalar loads
// here (measured 2.5x on AMD EPYC).
template <typename T>
#if defined(__GNUC__) && !defined(__clang__)
__attribute__((optimize("no-tree-vectorize")))
#endif
void csr_rows(const T* xn, const int64_t* P, const int64_t* Cc, const T* W, const T* Bs, T* yn, int64_t begin,
              int64_t end) {
  for (int64_t o = begin; o < end; ++o) {
    T acc[4] = {T(0), T(0), T(0), T(0)};
    const int64_t j1 = P[o + 1];
    int64_t j = P[o];
    for (; j + 4 <= j1; j += 4)
      for (int q = 0; q < 4; ++q) acc[q] += W[j + q] * xn[Cc[j + q]];
    for (; j < j1; ++j) acc[0] += W[j] * xn[Cc[j]];
    yn[o] = (Bs ? Bs[o] : T(0)) + ((acc[0] + acc[1]) + (acc[2] + acc[3]));
  }
}

}  // namespace

// x [N, in]; colptr [in + 1], rows [nnz], vals [nnz]: the non-zero weights of each input column (CSC).
at::Tensor event_linear(const at::Tensor& x, const at::Tensor& colptr, const at::Tensor& rows, const at::Tensor& vals,
                        const c10::optional<at::Tensor>& bias, int64_t n_out) {
  check_linear(x, colptr, rows, vals, bias, n_out);
  const int64_t N = x.size(0), n_in = x.size(1);
  TORCH_CHECK(colptr.numel() == n_in + 1, "colptr must have in + 1 entries");
  at::Tensor y = at::empty({N, n_out}, x.options());
  const bool has_b = bias.has_value() && bias->defined();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "event_linear", [&] {
    using T_ = scalar_t;
    const T_* X = x.data_ptr<T_>();
    const int64_t* P = colptr.data_ptr<int64_t>();
    const int64_t* R = rows.data_ptr<int64_t>();
    const T_* W = vals.data_ptr<T_>();
    const T_* Bs = has_b ? bias->data_ptr<T_>() : nullptr;
    T_* Y = y.data_ptr<T_>();
    const int64_t per_row = n_in + vals.numel() / 8;  // rough: a scan of the input and a fraction of the weights
    at::parallel_for(0, N, rows_grain(per_row), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        const T_* xn = X + n * n_in;
        T_* yn = Y + n * n_out;
        if (Bs) std::copy(Bs, Bs + n_out, yn); else std::fill(yn, yn + n_out, T_(0));
        for (int64_t i = 0; i < n_in; ++i) {
          const T_ xv = xn[i];
          if (xv == T_(0)) continue;
          const int64_t j1 = P[i + 1];
          if (xv == T_(1)) {  // a spike: additions only
            for (int64_t j = P[i]; j < j1; ++j) yn[R[j]] += W[j];
          } else {
            for (int64_t j = P[i]; j < j1; ++j) yn[R[j]] += xv * W[j];
          }
        }
      }
    });
  });
  return y;
}

// x [N, in]; rowptr [out + 1], cols [nnz], vals [nnz]: the non-zero weights of each output row (CSR).
at::Tensor csr_linear(const at::Tensor& x, const at::Tensor& rowptr, const at::Tensor& cols, const at::Tensor& vals,
                      const c10::optional<at::Tensor>& bias, int64_t n_out) {
  check_linear(x, rowptr, cols, vals, bias, n_out);
  TORCH_CHECK(rowptr.numel() == n_out + 1, "rowptr must have out + 1 entries");
  const int64_t N = x.size(0), n_in = x.size(1);
  at::Tensor y = at::empty({N, n_out}, x.options());
  const bool has_b = bias.has_value() && bias->defined();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "csr_linear", [&] {
    using T_ = scalar_t;
    const T_* X = x.data_ptr<T_>();
    const int64_t* P = rowptr.data_ptr<int64_t>();
    const int64_t* Cc = cols.data_ptr<int64_t>();
    const T_* W = vals.data_ptr<T_>();
    const T_* Bs = has_b ? bias->data_ptr<T_>() : nullptr;
    T_* Y = y.data_ptr<T_>();
    // parallel over output rows: each thread reads its rows' weights once for the whole batch
    at::parallel_for(0, n_out, rows_grain(N * std::max<int64_t>(1, vals.numel() / std::max<int64_t>(1, n_out))),
                     [&](int64_t begin, int64_t end) {
      for (int64_t n = 0; n < N; ++n) {
        const T_* xn = X + n * n_in;
        T_* yn = Y + n * n_out;
        csr_rows(xn, P, Cc, W, Bs, yn, begin, end);
      }
    });
  });
  return y;
}

namespace {

enum UnitOp { SUM = 0, ABS_SUM = 1, DOT = 2 };

template <typename T, int OP>
inline T unit_term(const T* A, const T* B, int64_t k) {
  if constexpr (OP == SUM) return A[k];
  else if constexpr (OP == ABS_SUM) return std::abs(A[k]);
  else return A[k] * B[k];
}

// Sums per unit (dim 2 of [T, B, C, ...]) in one pass: the unit of the k-th element in memory is (k / sc) % C,
// sc the unit stride of a step (1 for channels-last or [T, B, C], H*W for contiguous [T, B, C, H, W]). Each thread
// adds into its own row of partial sums (float within a block, double across blocks).
template <typename T, int OP>
void unit_reduce_kernel(const T* A, const T* B, int64_t total, int64_t C, int64_t sc, double* out) {
  const int nt = at::get_num_threads();
  std::vector<double> partial(static_cast<size_t>(nt) * C, 0.0);
  const int64_t period = C * sc, periods = total / period;
  at::parallel_for(0, periods, std::max<int64_t>(1, 16384 / period), [&](int64_t begin, int64_t end) {
    double* acc = partial.data() + static_cast<size_t>(at::get_thread_num()) * C;
    std::vector<T> blk(C);
    for (int64_t p0 = begin; p0 < end; p0 += 256) {
      const int64_t p1 = std::min(end, p0 + 256);
      std::fill(blk.begin(), blk.end(), T(0));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t base = p * period;
        if (sc == 1) {
          T* __restrict bk = blk.data();
          for (int64_t c = 0; c < C; ++c) bk[c] += unit_term<T, OP>(A, B, base + c);
        } else {
          for (int64_t c = 0; c < C; ++c) {
            T sum = T(0);
            const int64_t k0 = base + c * sc;
            for (int64_t k = k0; k < k0 + sc; ++k) sum += unit_term<T, OP>(A, B, k);
            blk[c] += sum;
          }
        }
      }
      for (int64_t c = 0; c < C; ++c) acc[c] += blk[c];
    }
  });
  for (int t = 0; t < nt; ++t)
    for (int64_t c = 0; c < C; ++c) out[c] += partial[static_cast<size_t>(t) * C + c];
}

}  // namespace

// Per-unit sums over [T, B, C, ...] (units on dim 2; T-major, each step contiguous or channels-last): op 0 sum(a),
// 1 sum(|a|), 2 sum(a * b). Returns [C] in a's dtype (accumulated in double).
at::Tensor unit_reduce(const at::Tensor& a, const c10::optional<at::Tensor>& b, int64_t op) {
  check_t_major(a, "a");
  TORCH_CHECK(a.dim() >= 3, "a must be [T, B, C, ...]");
  TORCH_CHECK(op >= 0 && op <= 2, "unknown op ", op);
  const bool has_b = b.has_value() && b->defined();
  TORCH_CHECK(has_b == (op == DOT), "b is needed by op 2 (dot) only");
  if (has_b) check_like(*b, a, "b");
  const at::Tensor step = a[0];
  const int64_t C = step.size(1), sc = step.stride(1);
  TORCH_CHECK(step.is_contiguous() || (step.dim() == 4 && step.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "each step must be contiguous or channels-last");
  at::Tensor out = at::zeros({C}, a.options().dtype(at::kDouble));
  if (a.numel() == 0) return out.to(a.scalar_type());
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "unit_reduce", [&] {
    using T_ = scalar_t;
    const T_* A = a.data_ptr<T_>();
    const T_* B = has_b ? b->data_ptr<T_>() : nullptr;
    double* O = out.data_ptr<double>();
    if (op == SUM) unit_reduce_kernel<T_, SUM>(A, B, a.numel(), C, sc, O);
    else if (op == ABS_SUM) unit_reduce_kernel<T_, ABS_SUM>(A, B, a.numel(), C, sc, O);
    else unit_reduce_kernel<T_, DOT>(A, B, a.numel(), C, sc, O);
  });
  return out.to(a.scalar_type());
}

// A chain of layers run in one call (no Python between them): for batch-1 inference, where launching each layer
// from Python costs more than the layer's event-driven work. op kinds and their tensors / scalars:
//   0 flatten the last s[0] dims      1 repeat over T = s[0] (a stride-0 view)
//   2 dense linear {W[, b]}           3 CSR linear {rowptr, cols, vals[, b]}, s = {out}
//   4 event linear {colptr, rows, vals[, b]}, s = {out}
//   5 LIF/IF (at rest at 0 or soft reset), s = {a, b, c, lerp, k, v_th, v_reset, hard}
at::Tensor chain_forward(const at::Tensor& x, const std::vector<int64_t>& kinds,
                         const std::vector<std::vector<at::Tensor>>& tensors, const std::vector<std::vector<double>>& s) {
  TORCH_CHECK(kinds.size() == tensors.size() && kinds.size() == s.size(), "one kind, tensor list and scalar list per op");
  at::Tensor y = x;
  for (size_t i = 0; i < kinds.size(); ++i) {
    const auto& ts = tensors[i];
    const auto& sc = s[i];
    switch (kinds[i]) {
      case 0: y = y.flatten(y.dim() - static_cast<int64_t>(sc.at(0))); break;
      case 1: {
        std::vector<int64_t> sizes{static_cast<int64_t>(sc.at(0))};
        for (auto d : y.sizes()) sizes.push_back(d);
        y = y.unsqueeze(0).expand(sizes);
        break;
      }
      case 2: y = at::linear(y, ts.at(0), ts.size() > 1 ? c10::optional<at::Tensor>(ts[1]) : c10::nullopt); break;
      case 3:
      case 4: {
        std::vector<int64_t> lead = y.sizes().vec();
        lead.pop_back();
        const at::Tensor y2 = y.reshape({-1, y.size(-1)}).contiguous();
        const c10::optional<at::Tensor> bias = ts.size() > 3 ? c10::optional<at::Tensor>(ts[3]) : c10::nullopt;
        const int64_t n_out = static_cast<int64_t>(sc.at(0));
        at::Tensor out = kinds[i] == 3 ? csr_linear(y2, ts.at(0), ts.at(1), ts.at(2), bias, n_out)
                                       : event_linear(y2, ts.at(0), ts.at(1), ts.at(2), bias, n_out);
        lead.push_back(n_out);
        y = out.view(lead);
        break;
      }
      case 5:
        y = lif_forward(y, c10::nullopt, sc.at(0), sc.at(1), sc.at(2), sc.at(3) != 0, sc.at(4), sc.at(5), sc.at(6),
                        sc.at(7) != 0, false)[0];
        break;
      default: TORCH_CHECK(false, "unknown op kind ", kinds[i]);
    }
  }
  return y;
}

// Chains kept on the C++ side, so a call passes one id instead of converting every op's tensor lists again.
namespace {
struct Chain {
  std::vector<int64_t> kinds;
  std::vector<std::vector<at::Tensor>> tensors;
  std::vector<std::vector<double>> scalars;
};
std::mutex chains_mutex;
std::unordered_map<int64_t, Chain> chains;
int64_t next_chain = 0;
}  // namespace

int64_t chain_register(const std::vector<int64_t>& kinds, const std::vector<std::vector<at::Tensor>>& tensors,
                       const std::vector<std::vector<double>>& scalars) {
  std::lock_guard<std::mutex> lock(chains_mutex);
  chains[next_chain] = Chain{kinds, tensors, scalars};
  return next_chain++;
}

at::Tensor chain_run(int64_t id, const at::Tensor& x) {
  const Chain* c;
  {
    std::lock_guard<std::mutex> lock(chains_mutex);
    auto it = chains.find(id);
    TORCH_CHECK(it != chains.end(), "no compiled chain ", id);
    c = &it->second;
  }
  return chain_forward(x, c->kinds, c->tensors, c->scalars);
}

void chain_release(int64_t id) {
  std::lock_guard<std::mutex> lock(chains_mutex);
  chains.erase(id);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("chain_forward", &chain_forward, "a chain of flatten/repeat/linear/LIF layers in one call (CPU)");
  m.def("chain_register", &chain_register, "keep a chain on the C++ side; returns its id");
  m.def("chain_run", &chain_run, "run a registered chain");
  m.def("chain_release", &chain_release, "forget a registered chain");
  m.def("unit_reduce", &unit_reduce, "per-unit sum, |.| sum or dot over [T, B, C, ...] (CPU)");
  m.def("lif_forward", &lif_forward, "multi-step LIF/IF forward (CPU)");
  m.def("lif_backward", &lif_backward, "multi-step LIF/IF BPTT backward, detached reset (CPU)");
  m.def("event_linear", &event_linear, "event-driven linear layer over the non-zero inputs (CPU)");
  m.def("csr_linear", &csr_linear, "CSR sparse-weight linear layer (CPU)");
}
