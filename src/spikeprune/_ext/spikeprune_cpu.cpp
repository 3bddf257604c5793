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
// * sparse_rows / pack_weight / sparse_input_linear / sparse_input_weight_grad: a *dense* Linear trained on a
//   mostly-zero input (spikes): forward and weight gradient over the non-zero inputs only.
//
// All tensors are "T-major dense": x.stride(0) == x[0].numel() and x[0] is dense in memory (contiguous or
// channels-last); outputs are made with empty_like and so share the input's layout. The Python side checks this.

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
// With GATE, each output spike is multiplied by its unit's gate G[i] (the unit mask, folded in: no pass of its own);
// with STATS 1 (2), each neuron's pre-gate spikes (and |H|) are summed over the T steps into CNT (and ABS).
template <typename T, int CH, bool HARD, bool KEEP, bool GATE, int STATS>
void forward_block(const T* X, int64_t xs, const T* V0, T* __restrict V, T* S, T* H, int64_t T_, int64_t N, int64_t n,
                   T a, T b, T c, T k, T th, T vr, const T* __restrict G, T* __restrict CNT, T* __restrict ABS) {
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
      s[i] = fire ? (GATE ? G[i] : T(1)) : T(0);
      v[i] = HARD ? (fire ? vr : hv) : (fire ? hv - th : hv);
      if constexpr (STATS >= 1) CNT[i] += fire ? T(1) : T(0);
      if constexpr (STATS == 2) ABS[i] += std::abs(hv);
    }
  }
}

// Per-unit work of a neuron layer whose units are dim 1 of each step (a step's element j is unit (j / sc) % C):
// the gate values [C] (or null) and per-thread sums (or null). With sc == 1 (fully connected, channels-last) the
// units repeat every C elements: gtile is the gate repeated to C + BLOCK values, so a block's gate is a view, and
// the sums are accumulated position by position in rows of W = C + BLOCK, folded by unit at the end; otherwise
// (contiguous conv) each unit is a run of sc elements: gate filled and sums taken run by run, W = C. No division
// per element: a 64-bit one per element made the gate cost as much as the neuron.
template <typename T>
struct Units {
  const T* gate = nullptr;
  const T* gtile = nullptr;
  double* sums = nullptr;  // [threads, rows, W]
  int64_t C = 1, sc = 1, W = 1;

  const T* block_gate(int64_t i0, int64_t n, T* buf) const {
    if (sc == 1) return gtile + i0 % C;
    int64_t c = (i0 / sc) % C, r = i0 % sc;
    for (int64_t i = 0; i < n; r = 0, c = c + 1 == C ? 0 : c + 1) {
      const int64_t len = std::min(sc - r, n - i);
      std::fill(buf + i, buf + i + len, gate[c]);
      i += len;
    }
    return buf;
  }

  void add(int64_t i0, int64_t n, const T* __restrict vals, double* __restrict acc) const {
    if (sc == 1) {
      double* __restrict a = acc + i0 % C;
      for (int64_t i = 0; i < n; ++i) a[i] += vals[i];
      return;
    }
    int64_t c = (i0 / sc) % C, r = i0 % sc;
    for (int64_t i = 0; i < n; r = 0, c = c + 1 == C ? 0 : c + 1) {
      const int64_t len = std::min(sc - r, n - i);
      T sum = T(0);
      for (int64_t k = 0; k < len; ++k) sum += vals[i + k];
      acc[c] += sum;
      i += len;
    }
  }
};

// C and sc of a [T, B, C, ...] tensor's steps (contiguous or channels-last): element j of a step is unit
// (j / sc) % C.
std::pair<int64_t, int64_t> unit_layout(const at::Tensor& x) {
  const at::Tensor step = x[0];
  TORCH_CHECK(step.dim() >= 2, "per-unit work needs [T, B, C, ...]");
  TORCH_CHECK(step.is_contiguous() || (step.dim() == 4 && step.is_contiguous(at::MemoryFormat::ChannelsLast)),
              "each step must be contiguous or channels-last");
  return {step.size(1), step.stride(1)};
}

// A per-unit vector (gate, mask): contiguous [C] of the tensor's dtype.
void check_unit_vector(const at::Tensor& m, int64_t C, const at::Tensor& like, const char* name) {
  TORCH_CHECK(m.numel() == C && m.is_contiguous() && m.scalar_type() == like.scalar_type(), name,
              " must be a contiguous [C] tensor of the neuron's dtype");
}

// Units for x's steps with an optional gate and rows of per-thread sums; tile and part hold what it points to.
template <typename T>
Units<T> make_units(const at::Tensor& x, const c10::optional<at::Tensor>& gate, int64_t rows, std::vector<T>& tile,
                    std::vector<double>& part) {
  Units<T> un;
  const bool gated = gate.has_value() && gate->defined();
  if (!gated && rows == 0) return un;
  std::tie(un.C, un.sc) = unit_layout(x);
  if (gated) {
    check_unit_vector(*gate, un.C, x, "gate");
    un.gate = gate->data_ptr<T>();
    if (un.sc == 1) {
      tile.resize(un.C + BLOCK);
      for (size_t j = 0; j < tile.size(); ++j) tile[j] = un.gate[j % un.C];
      un.gtile = tile.data();
    }
  }
  un.W = un.sc == 1 ? un.C + BLOCK : un.C;
  if (rows > 0) {
    part.assign(static_cast<size_t>(at::get_num_threads()) * rows * un.W, 0.0);
    un.sums = part.data();
  }
  return un;
}

// Fold the per-thread accumulators of Units::sums into [rows, C] of dtype.
template <typename T>
at::Tensor unit_totals(const Units<T>& un, const std::vector<double>& part, int64_t rows, at::ScalarType dtype) {
  at::Tensor out = at::zeros({rows, un.C}, at::TensorOptions().dtype(at::kDouble));
  double* o = out.data_ptr<double>();
  const int64_t threads = static_cast<int64_t>(part.size()) / (rows * un.W);
  for (int64_t t = 0; t < threads; ++t)
    for (int64_t r = 0; r < rows; ++r) {
      const double* p = part.data() + (t * rows + r) * un.W;
      double* out_row = o + r * un.C;
      for (int64_t j0 = 0; j0 < un.W; j0 += un.C)  // W is C, or C + BLOCK folded in strides of C
        for (int64_t j = j0; j < std::min(un.W, j0 + un.C); ++j) out_row[j - j0] += p[j];
    }
  return out.to(dtype);
}

template <typename T, int CH, bool HARD, bool KEEP, bool GATE, int STATS>
void forward_all(const T* X, int64_t xs, const T* V0, T* V, T* S, T* H, int64_t T_, int64_t N, T a, T b, T c, T k,
                 T th, T vr, const Units<T>& un) {
  constexpr bool stats = STATS > 0;
  at::parallel_for(0, N, BLOCK, [&](int64_t begin, int64_t end) {
    std::vector<T> g(GATE && un.sc != 1 ? BLOCK : 0), cnt(stats ? BLOCK : 0), ab(STATS == 2 ? BLOCK : 0);
    double* acc = stats ? un.sums + STATS * un.W * at::get_thread_num() : nullptr;
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
      const int64_t n = std::min(end, i0 + BLOCK) - i0;
      const T* G = GATE ? un.block_gate(i0, n, g.data()) : nullptr;
      if (stats) {
        std::fill(cnt.begin(), cnt.end(), T(0));
        std::fill(ab.begin(), ab.end(), T(0));
      }
      forward_block<T, CH, HARD, KEEP, GATE, STATS>(X + i0, xs, V0 ? V0 + i0 : nullptr, V + i0, S + i0,
                                             KEEP ? H + i0 : nullptr, T_, N, n, a, b, c, k, th, vr, G,
                                             cnt.data(), ab.data());
      if (stats) un.add(i0, n, cnt.data(), acc);
      if (STATS == 2) un.add(i0, n, ab.data(), acc + un.W);
    }
  });
}

// Runtime flags to one of the template instances.
template <typename T, int CH>
void forward_dispatch(bool hard, bool keep, int stats, const T* X, int64_t xs, const T* V0, T* V, T* S, T* H, int64_t T_,
                      int64_t N, T a, T b, T c, T k, T th, T vr, const Units<T>& un) {
  auto go = [&](auto hard_, auto keep_, auto stats_) {
    constexpr bool HD = decltype(hard_)::value, KP = decltype(keep_)::value;
    constexpr int ST = decltype(stats_)::value;
    if (un.gate) forward_all<T, CH, HD, KP, true, ST>(X, xs, V0, V, S, H, T_, N, a, b, c, k, th, vr, un);
    else forward_all<T, CH, HD, KP, false, ST>(X, xs, V0, V, S, H, T_, N, a, b, c, k, th, vr, un);
  };
  using yes = std::true_type;
  using no = std::false_type;
  using none = std::integral_constant<int, 0>;
  using spikes = std::integral_constant<int, 1>;
  using both = std::integral_constant<int, 2>;
  // lif_forward allows stats only with keep
  if (hard && stats == 2) go(yes{}, yes{}, both{});
  else if (hard && stats == 1) go(yes{}, yes{}, spikes{});
  else if (hard && keep) go(yes{}, yes{}, none{});
  else if (hard) go(yes{}, no{}, none{});
  else if (stats == 2) go(no{}, yes{}, both{});
  else if (stats == 1) go(no{}, yes{}, spikes{});
  else if (keep) go(no{}, yes{}, none{});
  else go(no{}, no{}, none{});
}

}  // namespace

// Returns {spikes [T, ...], pre-spike membrane H [T, ...] (empty when keep_membrane is false), last V [...],
// per-unit sums [stats, C] of the pre-gate spikes (stats 1) and of |H| (stats 2; needs keep_membrane; else empty)}.
// gate [C] (x's dtype): each unit's output spikes are multiplied by it (units: dim 2 of x, see unit_layout).
std::vector<at::Tensor> lif_forward(const at::Tensor& x, const c10::optional<at::Tensor>& v0, double a, double b,
                                    double c, bool lerp, double k, double v_th, double v_reset, bool hard,
                                    bool keep_membrane, const c10::optional<at::Tensor>& gate, int64_t stats) {
  const int64_t xs = check_t_major(x, "x", true);
  const int64_t T = x.size(0);
  const int64_t N = x[0].numel();
  TORCH_CHECK(stats >= 0 && stats <= 2 && (stats == 0 || keep_membrane), "stats is 0, 1 or 2 and needs keep_membrane");
  at::Tensor s = empty_steps(x);
  at::Tensor st = at::empty({0}, x.options());
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
    std::vector<T_> tile;
    std::vector<double> part;
    const Units<T_> un = make_units<T_>(x, gate, stats, tile, part);
    auto run = [&](auto tag) {
      forward_dispatch<T_, decltype(tag)::value>(hard, keep_membrane, static_cast<int>(stats), X, xs, V0, v.data_ptr<T_>(), s.data_ptr<T_>(),
                                                 H, T, N, a, b, c, k, v_th, v_reset, un);
    };
    if (ch == AFFINE) run(std::integral_constant<int, AFFINE>{});
    else if (ch == LERP_SMALL) run(std::integral_constant<int, LERP_SMALL>{});
    else run(std::integral_constant<int, LERP_LARGE>{});
    if (stats) st = unit_totals(un, part, stats, at::kDouble);
  });
  return {s, h, v, st};
}

namespace {

// out[t] = b dL/dH[t] backwards from T-1: out[t] = scale keep[t] next + b dL/dH[t] (direct) + b σ'(H[t] - V_th)
// dL/dS[t], next = out[t + 1] (scale a) or dL/dV[T-1] (scale b), keep = [H < V_th] for a hard reset, else 1.
// Absent gradients (no dL/dS, no dL/dV[T-1]) read a block of zeros, so the loop has no branches.
// With GATE, dL/dS arrives for the gated spikes: each neuron's is multiplied by its unit's gate, and with un.sums the
// gate gradient sum dL/dS * [H >= V_th] (the pre-gate spikes) is summed per unit, per thread.
template <typename T, int SG, bool HARD, bool GATE>
void backward_all(const T* H, const T* GS, const T* GH, const T* GV, T* OUT, int64_t T_, int64_t N, T a, T b, T th,
                  T alpha, const Units<T>& un) {
  const bool dot = GATE && un.sums != nullptr && GS != nullptr;
  at::parallel_for(0, N, BLOCK, [&](int64_t begin, int64_t end) {
    std::vector<T> zeros((GS && GV) ? 0 : BLOCK, T(0));
    std::vector<T> gbuf(GATE && un.sc != 1 ? BLOCK : 0), acc(dot ? BLOCK : 0);
    double* part = dot ? un.sums + un.W * at::get_thread_num() : nullptr;
    for (int64_t i0 = begin; i0 < end; i0 += BLOCK) {
      const int64_t n = std::min(end, i0 + BLOCK) - i0;
      const T* __restrict gm = GATE ? un.block_gate(i0, n, gbuf.data()) : nullptr;
      if (dot) std::fill(acc.begin(), acc.end(), T(0));
      for (int64_t t = T_ - 1; t >= 0; --t) {
        const T* __restrict ht = H + t * N + i0;
        const T* __restrict gs = GS ? GS + t * N + i0 : zeros.data();
        const T* __restrict nxt = t < T_ - 1 ? OUT + (t + 1) * N + i0 : (GV ? GV + i0 : zeros.data());
        const T scale = t < T_ - 1 ? a : b;
        T* __restrict ot = OUT + t * N + i0;
        for (int64_t i = 0; i < n; ++i) {
          const T carry = nxt[i] * scale;
          const T g = HARD ? (ht[i] < th ? carry : T(0)) : carry;
          ot[i] = g + b * surrogate_grad<T, SG>(ht[i] - th, alpha) * (GATE ? gs[i] * gm[i] : gs[i]);
        }
        if (dot)
          for (int64_t i = 0; i < n; ++i) acc[i] += ht[i] >= th ? gs[i] : T(0);
        if (GH) {
          const T* __restrict gh = GH + t * N + i0;
          for (int64_t i = 0; i < n; ++i) ot[i] += b * gh[i];
        }
      }
      if (dot) un.add(i0, n, acc.data(), part);
    }
  });
}

template <typename T, int SG>
void backward_dispatch(bool hard, const T* H, const T* GS, const T* GH, const T* GV, T* OUT, int64_t T_, int64_t N,
                       T a, T b, T th, T alpha, const Units<T>& un) {
  if (hard && un.gate) backward_all<T, SG, true, true>(H, GS, GH, GV, OUT, T_, N, a, b, th, alpha, un);
  else if (hard) backward_all<T, SG, true, false>(H, GS, GH, GV, OUT, T_, N, a, b, th, alpha, un);
  else if (un.gate) backward_all<T, SG, false, true>(H, GS, GH, GV, OUT, T_, N, a, b, th, alpha, un);
  else backward_all<T, SG, false, false>(H, GS, GH, GV, OUT, T_, N, a, b, th, alpha, un);
}

}  // namespace

// BPTT of lif_forward for a detached reset and a constant decay: returns {dL/dX (dL/dV0 = dL/dX[0] a / b), the gate
// gradient [C] (with gate and gate_grad; else empty)}. With gate, g_s is the gradient of the gated spikes.
std::vector<at::Tensor> lif_backward(const at::Tensor& h, const c10::optional<at::Tensor>& g_s,
                                     const c10::optional<at::Tensor>& g_h, const c10::optional<at::Tensor>& g_v_last,
                                     double a, double b, double v_th, bool hard, int64_t surrogate, double alpha,
                                     const c10::optional<at::Tensor>& gate, bool gate_grad) {
  check_t_major(h, "h");
  TORCH_CHECK(!gate_grad || (gate.has_value() && gate->defined()), "gate_grad needs a gate");
  at::Tensor dot = at::empty({0}, h.options());
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
    std::vector<T_> tile;
    std::vector<double> part;
    const Units<T_> un = make_units<T_>(h, gate, gate_grad ? 1 : 0, tile, part);
    if (surrogate == ATAN) backward_dispatch<T_, ATAN>(hard, H, GS, GH, GV, OUT, T, N, a, b, v_th, alpha, un);
    else if (surrogate == SIGMOID)
      backward_dispatch<T_, SIGMOID>(hard, H, GS, GH, GV, OUT, T, N, a, b, v_th, alpha, un);
    else backward_dispatch<T_, TRIANGLE>(hard, H, GS, GH, GV, OUT, T, N, a, b, v_th, alpha, un);
    if (gate_grad) dot = unit_totals(un, part, 1, h.scalar_type()).view({-1});
  });
  return {out, dot};
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
// steps > 1 (x is [steps, N / steps, in] flattened): when fewer inputs change from one step to the next than are
// non-zero (spikes of units that keep firing), row n of a step t >= 1 starts from the output of the same sample at
// t - 1 and adds (x[n, i] - x[n - N / steps, i]) W[:, i] over the inputs that changed only.
at::Tensor event_linear(const at::Tensor& x, const at::Tensor& colptr, const at::Tensor& rows, const at::Tensor& vals,
                        const c10::optional<at::Tensor>& bias, int64_t n_out, int64_t steps) {
  check_linear(x, colptr, rows, vals, bias, n_out);
  const int64_t N = x.size(0), n_in = x.size(1);
  TORCH_CHECK(colptr.numel() == n_in + 1, "colptr must have in + 1 entries");
  TORCH_CHECK(steps >= 1 && N % steps == 0, "steps must divide the rows of x");
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
    const int64_t S = N / steps;
    // adds d * W[:, i] into yn for every input i with d = xn[i] - (xp ? xp[i] : 0) != 0
    auto add_inputs = [&](const T_* xn, const T_* xp, T_* yn) {
      for (int64_t i = 0; i < n_in; ++i) {
        const T_ d = xp ? xn[i] - xp[i] : xn[i];
        if (d == T_(0)) continue;
        const int64_t j1 = P[i + 1];
        if (d == T_(1)) {  // a spike: additions only
          for (int64_t j = P[i]; j < j1; ++j) yn[R[j]] += W[j];
        } else if (d == T_(-1)) {  // a unit that stopped firing
          for (int64_t j = P[i]; j < j1; ++j) yn[R[j]] -= W[j];
        } else {
          for (int64_t j = P[i]; j < j1; ++j) yn[R[j]] += d * W[j];
        }
      }
    };
    bool delta = false;
    if (steps > 1) {  // a scan of the input against the work it saves (each input's column of weights)
      auto count = [&](int64_t begin, int64_t end, int64_t lag) {  // entries k with X[k] != (lag ? X[k - lag] : 0)
        return at::parallel_reduce(begin, end, int64_t(1) << 14, int64_t(0), [&](int64_t b, int64_t e, int64_t acc) {
          for (int64_t k = b; k < e; ++k) acc += X[k] != (lag ? X[k - lag] : T_(0));
          return acc;
        }, std::plus<int64_t>());
      };
      const int64_t first = count(0, S * n_in, 0);  // step 0's rows are summed whole either way
      const int64_t later = count(S * n_in, N * n_in, 0), changed = count(S * n_in, N * n_in, S * n_in);
      // 10% margin for the copies of the previous outputs
      delta = static_cast<double>(first + changed) < 0.9 * static_cast<double>(first + later);
    }
    const int64_t per_row = n_in + vals.numel() / 8;  // rough: a scan of the input and a fraction of the weights
    if (delta) {  // parallel over samples, each running its steps in order
      at::parallel_for(0, S, rows_grain(per_row * steps), [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          for (int64_t t = 0; t < steps; ++t) {
            const int64_t n = t * S + b;
            T_* yn = Y + n * n_out;
            if (t == 0) {
              if (Bs) std::copy(Bs, Bs + n_out, yn); else std::fill(yn, yn + n_out, T_(0));
            } else {
              std::copy(yn - S * n_out, yn - S * n_out + n_out, yn);
            }
            add_inputs(X + n * n_in, t == 0 ? nullptr : X + (n - S) * n_in, yn);
          }
        }
      });
      return;
    }
    at::parallel_for(0, N, rows_grain(per_row), [&](int64_t begin, int64_t end) {
      for (int64_t n = begin; n < end; ++n) {
        T_* yn = Y + n * n_out;
        if (Bs) std::copy(Bs, Bs + n_out, yn); else std::fill(yn, yn + n_out, T_(0));
        add_inputs(X + n * n_in, nullptr, yn);
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

// ------------------------------------------------------------------- sparse-input (spike) linear layers, training
// A dense Linear whose input is mostly zeros (spikes): y = x W^T + b and dW = g^T x only touch the inputs that are
// non-zero. x is first listed row by row (CSR of the *input*: rowptr, cols, and vals unless every non-zero is 1),
// which is also all the backward needs to keep of it. W is packed as [out blocks][in][block] (W^T cut into column
// blocks of 64 floats, each block contiguous, the last one zero-padded): a block is 200 KB for 800 inputs, so it
// stays in L2 (and in the TLB) while every row's non-zero inputs add their 256-byte slices into 8 vector registers.

namespace {

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
template <typename T>
constexpr int64_t block_width() { return NV * Vec<T>::lanes; }

// Run f(block, chunk) over every (output block, row chunk) pair, in parallel.
template <typename F>
void over_blocks(int64_t nb, int64_t chunks, const F& f) {
  at::parallel_for(0, nb * chunks, 1, [&](int64_t b, int64_t e) {
    for (int64_t t = b; t < e; ++t) f(t % nb, t / nb);
  });
}

void check_sparse_rows(const at::Tensor& ptr, const at::Tensor& cols, const at::Tensor& vals, const at::Tensor& ref) {
  TORCH_CHECK(ptr.scalar_type() == at::kLong && cols.scalar_type() == at::kInt && ptr.is_contiguous() &&
              cols.is_contiguous() && vals.is_contiguous(), "rowptr (int64) and cols (int32) must be contiguous");
  TORCH_CHECK(vals.numel() == 0 || (vals.numel() == cols.numel() && vals.scalar_type() == ref.scalar_type()),
              "vals must be empty (binary input) or one per column index, in the weights' dtype");
  TORCH_CHECK(ref.device().is_cpu() && ref.is_contiguous(), "weights and gradients must be contiguous CPU tensors");
}

}  // namespace

// x [N, in] contiguous -> ([rowptr [N + 1] int64, cols [nnz] int32, vals [nnz] or an empty tensor when every
// non-zero is 1], steps). steps > 1 (x is [steps, N / steps, in] flattened) also counts the non-zeros of the
// *temporal differences* d (d[0] = x[0], d[t] = x[t] - x[t - 1]) in the same pass, and returns d's rows (and
// steps) instead when they cost less: their non-zeros divided by delta_gain (a +-1 value costs a multiply where a
// spike is only an add) below x's own. An empty list when the cheaper of the two holds more than max_density *
// x.numel() non-zeros (the dense kernels are then faster). n_out > 0 (the layer's outputs) scales max_density by
// the share of useful lanes: the sparse kernels sum whole blocks of block_width() outputs, so a layer of 10
// outputs pays for 64 and breaks even at a lower density.
std::tuple<std::vector<at::Tensor>, int64_t> sparse_rows(const at::Tensor& x, double max_density, int64_t n_out,
                                                         int64_t steps, double delta_gain) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous CPU [N, in] tensor");
  const int64_t N = x.size(0), n_in = x.size(1);
  TORCH_CHECK(n_in < (int64_t(1) << 31), "too many inputs for int32 indices");
  TORCH_CHECK(steps >= 1 && N % steps == 0, "steps must divide the rows of x");
  const bool try_diff = steps > 1 && delta_gain > 0;
  const int64_t S = N / steps;  // rows per step
  at::Tensor ptr = at::empty({N + 1}, x.options().dtype(at::kLong));
  std::vector<int64_t> dcount(try_diff ? N : 0);
  std::vector<at::Tensor> out;
  int64_t used_steps = 1;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "sparse_rows", [&] {
    using T_ = scalar_t;
    const T_* X = x.data_ptr<T_>();
    int64_t* P = ptr.data_ptr<int64_t>();
    P[0] = 0;
    std::atomic<bool> binary{true};
    at::parallel_for(0, N, rows_grain(n_in), [&](int64_t b, int64_t e) {
      int64_t other = 0;  // non-zeros other than 1
      for (int64_t r = b; r < e; ++r) {
        const T_* xr = X + r * n_in;
        int32_t c = 0, o = 0;
        for (int64_t i = 0; i < n_in; ++i) {
          c += xr[i] != T_(0);
          o += (xr[i] != T_(0)) & (xr[i] != T_(1));
        }
        P[r + 1] = c;
        other += o;
        if (try_diff) {
          if (r < S) {
            dcount[r] = c;
          } else {
            const T_* xp = xr - S * n_in;
            int32_t dc = 0;
            for (int64_t i = 0; i < n_in; ++i) dc += xr[i] != xp[i];
            dcount[r] = dc;
          }
        }
      }
      if (other) binary = false;
    });
    int64_t nnz_x = 0, nnz_d = 0;
    for (int64_t r = 0; r < N; ++r) nnz_x += P[r + 1];
    for (int64_t r = 0; r < static_cast<int64_t>(dcount.size()); ++r) nnz_d += dcount[r];
    const bool diff = try_diff && static_cast<double>(nnz_d) < delta_gain * static_cast<double>(nnz_x);
    const double cost = diff ? static_cast<double>(nnz_d) / delta_gain : static_cast<double>(nnz_x);
    const int64_t B = block_width<T_>();
    const double useful = n_out > 0 ? static_cast<double>(n_out) / static_cast<double>((n_out + B - 1) / B * B) : 1.0;
    if (cost > max_density * useful * static_cast<double>(x.numel())) return;
    if (diff)
      for (int64_t r = 0; r < N; ++r) P[r + 1] = dcount[r];
    for (int64_t r = 0; r < N; ++r) P[r + 1] += P[r];
    const int64_t nnz = P[N];
    const bool bin = !diff && binary.load();
    // one slot of slack: a branch-free row may write one entry past its last non-zero (when every later row is
    // empty); the chunk's last row writes only its own entries (the next ones are another thread's)
    at::Tensor cols = at::empty({nnz + 1}, x.options().dtype(at::kInt));
    at::Tensor vals = bin ? at::empty({0}, x.options()) : at::empty({nnz + 1}, x.options());
    int32_t* Cc = cols.data_ptr<int32_t>();
    T_* Vv = bin ? nullptr : vals.data_ptr<T_>();
    at::parallel_for(0, N, rows_grain(n_in), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        const T_* xr = X + r * n_in;
        const T_* xp = diff && r >= S ? xr - S * n_in : nullptr;  // the previous step's row
        int64_t k = P[r];
        if (r + 1 == e) {
          for (int64_t i = 0; i < n_in; ++i) {
            const T_ v = xp ? xr[i] - xp[i] : xr[i];
            if (v != T_(0)) {
              Cc[k] = static_cast<int32_t>(i);
              if (Vv) Vv[k] = v;
              ++k;
            }
          }
        } else if (xp) {  // branch-free: write every entry, advance past the non-zeros (the next overwrite the rest)
          for (int64_t i = 0; i < n_in; ++i) {
            const T_ v = xr[i] - xp[i];
            Cc[k] = static_cast<int32_t>(i);
            Vv[k] = v;
            k += v != T_(0);
          }
        } else if (Vv) {
          for (int64_t i = 0; i < n_in; ++i) {
            Cc[k] = static_cast<int32_t>(i);
            Vv[k] = xr[i];
            k += xr[i] != T_(0);
          }
        } else {
          for (int64_t i = 0; i < n_in; ++i) {
            Cc[k] = static_cast<int32_t>(i);
            k += xr[i] != T_(0);
          }
        }
      }
    });
    out = {ptr, cols.narrow(0, 0, nnz), bin ? vals : vals.narrow(0, 0, nnz)};
    used_steps = diff ? steps : 1;
  });
  return {out, used_steps};
}

namespace {

// dst[c * ds + r] = src[r * ss + c] for r < R, c < C: 8x8 tiles in AVX registers (floats), the rest scalar.
template <typename T>
void transpose(const T* src, int64_t ss, T* dst, int64_t ds, int64_t R, int64_t C) {
  int64_t r0 = 0, c0 = 0;
#if defined(__AVX__)
  if constexpr (std::is_same_v<T, float>) {
    for (; r0 + 8 <= R; r0 += 8) {
      for (c0 = 0; c0 + 8 <= C; c0 += 8) {
        const float* s = src + r0 * ss + c0;
        __m256 r[8], t[8];
        for (int i = 0; i < 8; ++i) r[i] = _mm256_loadu_ps(s + i * ss);
        for (int i = 0; i < 4; ++i) {
          t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
          t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
        }
        for (int h = 0; h < 2; ++h) {  // rows 0-3 (h = 0) and 4-7 (h = 1)
          const __m256 a0 = t[4 * h], a1 = t[4 * h + 1], b0 = t[4 * h + 2], b1 = t[4 * h + 3];
          r[4 * h] = _mm256_shuffle_ps(a0, b0, _MM_SHUFFLE(1, 0, 1, 0));
          r[4 * h + 1] = _mm256_shuffle_ps(a0, b0, _MM_SHUFFLE(3, 2, 3, 2));
          r[4 * h + 2] = _mm256_shuffle_ps(a1, b1, _MM_SHUFFLE(1, 0, 1, 0));
          r[4 * h + 3] = _mm256_shuffle_ps(a1, b1, _MM_SHUFFLE(3, 2, 3, 2));
        }
        float* d = dst + c0 * ds + r0;
        for (int i = 0; i < 4; ++i) {
          _mm256_storeu_ps(d + i * ds, _mm256_permute2f128_ps(r[i], r[4 + i], 0x20));
          _mm256_storeu_ps(d + (i + 4) * ds, _mm256_permute2f128_ps(r[i], r[4 + i], 0x31));
        }
      }
      for (int64_t r = r0; r < r0 + 8; ++r)
        for (int64_t c = c0; c < C; ++c) dst[c * ds + r] = src[r * ss + c];
    }
  }
#endif
  for (int64_t j0 = 0; j0 < C; j0 += 16)  // what is left (all of it without AVX): 16 columns at a time
    for (int64_t r = r0; r < R; ++r)
      for (int64_t c = j0; c < std::min(C, j0 + 16); ++c) dst[c * ds + r] = src[r * ss + c];
}

}  // namespace

// W [out, in] -> [ceil(out / block), in, block]: packed[b, j, q] = W[b * block + q, j], zero past out.
at::Tensor pack_weight(const at::Tensor& w) {
  TORCH_CHECK(w.device().is_cpu() && w.dim() == 2, "w must be a 2-D CPU tensor");
  at::Tensor packed;
  AT_DISPATCH_FLOATING_TYPES(w.scalar_type(), "pack_weight", [&] {
    using T_ = scalar_t;
    const at::Tensor wc = w.contiguous();
    const int64_t n_out = w.size(0), n_in = w.size(1), B = block_width<T_>(), nb = (n_out + B - 1) / B;
    packed = at::empty({nb, n_in, B}, w.options());
    const T_* W = wc.data_ptr<T_>();
    T_* Pk = packed.data_ptr<T_>();
    over_blocks(nb, 1, [&](int64_t b, int64_t) {
      T_* dst = Pk + b * n_in * B;
      const int64_t w_ = std::min(B, n_out - b * B);
      if (w_ < B) std::fill(dst, dst + n_in * B, T_(0));
      transpose(W + b * B * n_in, n_in, dst, B, w_, n_in);
    });
  });
  return packed;
}

namespace {

// Tiles that keep the gathered rows in L1 (about 24 KB of a 32 KB L1d): a spike-sparse sum loads one block row
// (256 bytes) per non-zero input, which runs about 1.5x faster from L1 than from L2 (measured on AMD EPYC).
template <typename T>
constexpr int64_t l1_rows() { return 24576 / (block_width<T>() * int64_t(sizeof(T))); }
constexpr int64_t SUB_ROWS = 32;  // rows whose partial sums stay in L1 while a weight tile is gathered

// Add the block rows src[idx[k] * B] (times vals[k] unless binary) for k in [k0, k1) to the NV vectors at acc.
template <typename T>
inline void gather_add(typename Vec<T>::type* acc, const T* src, const int32_t* idx, const T* vals, int64_t k0,
                       int64_t k1) {
  using VT = Vec<T>;
  constexpr int64_t L = VT::lanes, B = NV * L;
  for (int64_t k = k0; k < k1; ++k) {
    const T* row = src + static_cast<int64_t>(idx[k]) * B;
    if (vals) {
      const T v = vals[k];
      for (int64_t q = 0; q < NV; ++q) acc[q] += v * VT::load(row + q * L);
    } else {
      for (int64_t q = 0; q < NV; ++q) acc[q] += VT::load(row + q * L);
    }
  }
}
}  // namespace

// y [N, out] = x W^T + b from x's sparse rows and W packed by pack_weight. Each (output block, row chunk) task
// walks the inputs in tiles of l1_rows(), so that the tile of packed weights it gathers from stays in L1, adding
// into the partial sums of SUB_ROWS rows at a time (the tile bounds of each row are found once per call).
at::Tensor sparse_input_linear(const at::Tensor& ptr, const at::Tensor& cols, const at::Tensor& vals,
                               const at::Tensor& packed, const c10::optional<at::Tensor>& bias, int64_t n_out) {
  check_sparse_rows(ptr, cols, vals, packed);
  TORCH_CHECK(packed.dim() == 3, "packed must come from pack_weight");
  const int64_t N = ptr.numel() - 1, n_in = packed.size(1), B = packed.size(2), nb = packed.size(0);
  TORCH_CHECK(nb == (n_out + B - 1) / B, "packed does not match n_out");
  const bool has_b = bias.has_value() && bias->defined();
  if (has_b) TORCH_CHECK(bias->numel() == n_out && bias->is_contiguous() && bias->scalar_type() == packed.scalar_type(),
                         "bias must be a contiguous [out] tensor of the weights' dtype");
  at::Tensor y = at::empty({N, n_out}, packed.options());
  const bool bin = vals.numel() == 0;
  AT_DISPATCH_FLOATING_TYPES(packed.scalar_type(), "sparse_input_linear", [&] {
    using T_ = scalar_t;
    using VT = Vec<T_>;
    using V_ = typename VT::type;
    constexpr int64_t L = VT::lanes, J = l1_rows<T_>();
    TORCH_CHECK(B == NV * L, "packed was made for another block width");
    const int64_t* P = ptr.data_ptr<int64_t>();
    const int32_t* Cc = cols.data_ptr<int32_t>();
    const T_* V = bin ? nullptr : vals.data_ptr<T_>();
    const T_* Bs = has_b ? bias->data_ptr<T_>() : nullptr;
    T_* Y = y.data_ptr<T_>();
    // tb[r * (nt + 1) + t]: the first of row r's non-zeros at an input >= t * J (its columns are sorted). Each
    // (row, tile) pair costs a load and store of its partial sums, worth it from about 16 non-zeros per pair on;
    // sparser inputs take fewer, wider tiles (one: every input at once).
    const int64_t nnz_row = N ? P[N] / N : 0;
    const int64_t nt = std::clamp<int64_t>(nnz_row / 16, 1, std::max<int64_t>(1, (n_in + J - 1) / J));
    const int64_t tw = (n_in + nt - 1) / nt;  // tile width, J or more
    std::vector<int64_t> tb(N * (nt + 1));
    at::parallel_for(0, N, rows_grain(nt + 8), [&](int64_t b, int64_t e) {
      for (int64_t r = b; r < e; ++r) {
        int64_t k = P[r];
        for (int64_t t = 0; t < nt; ++t) {
          tb[r * (nt + 1) + t] = k;
          while (k < P[r + 1] && Cc[k] < (t + 1) * tw) ++k;
        }
        tb[r * (nt + 1) + nt] = P[r + 1];
      }
    });
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(N, 2 * at::get_num_threads()));
    const int64_t rows_per = (N + chunks - 1) / chunks;
    over_blocks(nb, chunks, [&](int64_t b, int64_t c) {
      const T_* Wb = packed.data_ptr<T_>() + b * n_in * B;
      const int64_t o0 = b * B, w = std::min(B, n_out - o0);
      T_ bias_b[NV * L] = {};
      if (Bs) std::copy(Bs + o0, Bs + o0 + w, bias_b);
      alignas(64) T_ part[SUB_ROWS * NV * L];  // partial sums of SUB_ROWS rows
      for (int64_t r0 = c * rows_per; r0 < std::min(N, (c + 1) * rows_per); r0 += SUB_ROWS) {
        const int64_t nr = std::min({SUB_ROWS, N - r0, (c + 1) * rows_per - r0});
        for (int64_t i = 0; i < nr; ++i) std::copy(bias_b, bias_b + B, part + i * B);
        for (int64_t t = 0; t < nt; ++t) {
          for (int64_t i = 0; i < nr; ++i) {
            const int64_t* bounds = tb.data() + (r0 + i) * (nt + 1) + t;
            if (bounds[0] == bounds[1]) continue;
            V_ acc[NV];
            for (int64_t q = 0; q < NV; ++q) acc[q] = VT::load(part + i * B + q * L);
            gather_add<T_>(acc, Wb, Cc, V, bounds[0], bounds[1]);
            for (int64_t q = 0; q < NV; ++q) VT::store(part + i * B + q * L, acc[q]);
          }
        }
        for (int64_t i = 0; i < nr; ++i) std::copy(part + i * B, part + i * B + w, Y + (r0 + i) * n_out + o0);
      }
    });
  });
  return y;
}

// dW [out, in] = g^T x from x's sparse rows and g [N, out] (contiguous); n_in = x.size(1). The non-zeros are first
// regrouped by (tile of l1_rows() rows, input) with a counting sort, so that each output block sums g's row
// slices of one row tile at a time while that tile of g stays in L1; the sums of every input build up in a
// per-block [in, block] buffer that is transposed into dW's rows at the end.
at::Tensor sparse_input_weight_grad(const at::Tensor& ptr, const at::Tensor& cols, const at::Tensor& vals,
                                    const at::Tensor& g, int64_t n_in) {
  check_sparse_rows(ptr, cols, vals, g);
  TORCH_CHECK(g.dim() == 2 && g.size(0) == ptr.numel() - 1, "g must be [N, out] with one row per input row");
  const int64_t N = g.size(0), n_out = g.size(1), nnz = cols.numel();
  at::Tensor dw = at::empty({n_out, n_in}, g.options());
  const bool bin = vals.numel() == 0;
  AT_DISPATCH_FLOATING_TYPES(g.scalar_type(), "sparse_input_weight_grad", [&] {
    using T_ = scalar_t;
    using VT = Vec<T_>;
    using V_ = typename VT::type;
    constexpr int64_t L = VT::lanes, B = NV * L, R = l1_rows<T_>();
    const int64_t nb = (n_out + B - 1) / B, nt = std::max<int64_t>(1, (N + R - 1) / R);
    const int64_t* P = ptr.data_ptr<int64_t>();
    const int32_t* Cc = cols.data_ptr<int32_t>();
    const T_* V = bin ? nullptr : vals.data_ptr<T_>();
    const T_* G = g.data_ptr<T_>();
    T_* DW = dw.data_ptr<T_>();
    // CSC per row tile: cp[t * (n_in + 1) + j] .. [.. + j + 1] index rr (rows) and cv (values unless binary). A
    // tile's non-zeros keep their place in the CSR order (rows P[t R] .. P[(t + 1) R]), so each tile is sorted on
    // its own, in parallel.
    std::vector<int64_t> cp(nt * (n_in + 1));
    std::vector<int32_t> rr(nnz);
    std::vector<T_> cv(bin ? 0 : nnz);
    at::parallel_for(0, nt, 1, [&](int64_t t0, int64_t t1) {
      for (int64_t t = t0; t < t1; ++t) {
        const int64_t r0 = t * R, r1 = std::min(N, r0 + R);
        int64_t* c = cp.data() + t * (n_in + 1);
        std::fill(c, c + n_in + 1, 0);
        for (int64_t k = P[r0]; k < P[r1]; ++k) ++c[Cc[k] + 1];
        c[0] = P[r0];
        for (int64_t j = 0; j < n_in; ++j) c[j + 1] += c[j];
        std::vector<int64_t> at_(c, c + n_in);
        for (int64_t r = r0; r < r1; ++r)
          for (int64_t k = P[r]; k < P[r + 1]; ++k) {
            const int64_t dst = at_[Cc[k]]++;
            rr[dst] = static_cast<int32_t>(r);
            if (!bin) cv[dst] = V[k];
          }
      }
    });
    over_blocks(nb, 1, [&](int64_t b, int64_t) {
      const int64_t o0 = b * B, w = std::min(B, n_out - o0);
      // g's columns o0 .. o0 + B as dense [N, B] rows (a copy: zero-padded for the tail block, and gathered from
      // 256-byte rows instead of strided ones)
      std::vector<T_> gb(N * B, T_(0));
      for (int64_t r = 0; r < N; ++r) std::copy(G + r * n_out + o0, G + r * n_out + o0 + w, gb.data() + r * B);
      std::vector<T_> sums(n_in * B, T_(0));  // [input][output]
      for (int64_t t = 0; t < nt; ++t) {
        const int64_t* cpt = cp.data() + t * (n_in + 1);
        for (int64_t j = 0; j < n_in; ++j) {
          if (cpt[j] == cpt[j + 1]) continue;  // no row of this tile has input j (many, for sparse inputs)
          V_ acc[NV];
          T_* out = sums.data() + j * B;
          for (int64_t q = 0; q < NV; ++q) acc[q] = VT::load(out + q * L);
          gather_add<T_>(acc, gb.data(), rr.data(), bin ? nullptr : cv.data(), cpt[j], cpt[j + 1]);
          for (int64_t q = 0; q < NV; ++q) VT::store(out + q * L, acc[q]);
        }
      }
      transpose(sums.data(), B, DW + o0 * n_in, n_in, n_in, w);
    });
  });
  return dw;
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
  int64_t C, sc;  // (not a structured binding: the dispatch lambda captures them, which C++17 forbids)
  std::tie(C, sc) = unit_layout(a);
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

namespace {

// y = x * m[unit] (and, with G, gate[unit] += sum g * s) over [T, B, C, ...] in memory order: the unit of the
// k-th element is (k / sc) % C (see unit_reduce_kernel).
template <typename T, bool DOT>
void unit_scale_kernel(const T* X, const T* M, T* Y, const T* S, int64_t total, int64_t C, int64_t sc,
                       double* out) {
  const int nt = at::get_num_threads();
  std::vector<double> partial(DOT ? static_cast<size_t>(nt) * C : 0, 0.0);
  const int64_t period = C * sc, periods = total / period;
  at::parallel_for(0, periods, std::max<int64_t>(1, 16384 / period), [&](int64_t begin, int64_t end) {
    double* acc = DOT ? partial.data() + static_cast<size_t>(at::get_thread_num()) * C : nullptr;
    std::vector<T> blk(DOT ? C : 0);
    for (int64_t p0 = begin; p0 < end; p0 += 256) {
      const int64_t p1 = std::min(end, p0 + 256);
      if constexpr (DOT) std::fill(blk.begin(), blk.end(), T(0));
      for (int64_t p = p0; p < p1; ++p) {
        const int64_t base = p * period;
        if (sc == 1) {
          const T* __restrict x = X + base;
          const T* __restrict mv = M;  // restrict: else GCC assumes y may alias the mask and does not vectorise
          T* __restrict y = Y + base;
          for (int64_t c = 0; c < C; ++c) y[c] = x[c] * mv[c];
          if constexpr (DOT) {
            const T* __restrict sv = S + base;
            T* __restrict bk = blk.data();
            for (int64_t c = 0; c < C; ++c) bk[c] += x[c] * sv[c];
          }
        } else {
          for (int64_t c = 0; c < C; ++c) {
            const int64_t k0 = base + c * sc;
            const T mc = M[c];
            T sum = T(0);
            for (int64_t k = k0; k < k0 + sc; ++k) {
              Y[k] = X[k] * mc;
              if constexpr (DOT) sum += X[k] * S[k];
            }
            if constexpr (DOT) blk[c] += sum;
          }
        }
      }
      if constexpr (DOT)
        for (int64_t c = 0; c < C; ++c) acc[c] += blk[c];
    }
  });
  if constexpr (DOT)
    for (int t = 0; t < nt; ++t)
      for (int64_t c = 0; c < C; ++c) out[c] += partial[static_cast<size_t>(t) * C + c];
}

}  // namespace

// x * m per unit (units on dim 2 of a T-major [T, B, C, ...] x, each step contiguous or channels-last; m [C] in x's
// dtype), in x's layout. With s (like x): also returns sum(x * s) per unit, the gate gradient when x is the
// gradient of a gated output and s the ungated spikes; else an empty second tensor.
std::vector<at::Tensor> unit_scale(const at::Tensor& x, const at::Tensor& m, const c10::optional<at::Tensor>& s) {
  check_t_major(x, "x");
  TORCH_CHECK(x.dim() >= 3, "x must be [T, B, C, ...]");
  int64_t C, sc;
  std::tie(C, sc) = unit_layout(x);
  check_unit_vector(m, C, x, "m");
  const bool dot = s.has_value() && s->defined();
  if (dot) check_like(*s, x, "s");
  at::Tensor y = empty_steps(x);
  at::Tensor out = dot ? at::zeros({C}, x.options().dtype(at::kDouble)) : at::empty({0}, x.options());
  if (x.numel() == 0) return {y, dot ? out.to(x.scalar_type()) : out};
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "unit_scale", [&] {
    using T_ = scalar_t;
    if (dot)
      unit_scale_kernel<T_, true>(x.data_ptr<T_>(), m.data_ptr<T_>(), y.data_ptr<T_>(), s->data_ptr<T_>(),
                                  x.numel(), C, sc, out.data_ptr<double>());
    else
      unit_scale_kernel<T_, false>(x.data_ptr<T_>(), m.data_ptr<T_>(), y.data_ptr<T_>(), nullptr, x.numel(), C,
                                   sc, nullptr);
  });
  return {y, dot ? out.to(x.scalar_type()) : out};
}

// A chain of layers run in one call (no Python between them): for batch-1 inference, where launching each layer
// from Python costs more than the layer's event-driven work. op kinds and their tensors / scalars:
//   0 flatten the last s[0] dims      1 repeat over T = s[0] (a stride-0 view)
//   2 dense linear {W[, b]}           3 CSR linear {rowptr, cols, vals[, b]}, s = {out}
//   4 event linear {colptr, rows, vals[, b]}, s = {out} (over temporal differences when they are fewer)
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
        const int64_t steps = y.dim() >= 3 ? y.size(0) : 1;  // [T, B, in]: the event path may take differences
        at::Tensor out = kinds[i] == 3 ? csr_linear(y2, ts.at(0), ts.at(1), ts.at(2), bias, n_out)
                                       : event_linear(y2, ts.at(0), ts.at(1), ts.at(2), bias, n_out, steps);
        lead.push_back(n_out);
        y = out.view(lead);
        break;
      }
      case 5:
        y = lif_forward(y, c10::nullopt, sc.at(0), sc.at(1), sc.at(2), sc.at(3) != 0, sc.at(4), sc.at(5), sc.at(6),
                        sc.at(7) != 0, false, c10::nullopt, 0)[0];
        break;
      default: TORCH_CHECK(false, "unknown op kind ", kinds[i]);
    }
  }
  return y;
}

// ------------------------------------------------- masked-weight products (unstructured-pruned weights, dense x)
// A layer whose weight is mostly masked computes its forward y = x W^T ("rows": output i sums over the inputs j
// that row i keeps) and its input gradient dx = g W ("cols": input j sums over the outputs i that column j keeps)
// from the kept weights only. An index lists them per block of MW_BLOCK columns c of x, so that a tile of x's
// columns stays in L1: for block b and output r, entries ptr[b * R + r] .. ptr[b * R + r + 1] hold loc (c - b *
// MW_BLOCK) and off (the weight's flat index in W). A tile of NV vectors' worth of x's rows is transposed, so each
// kept weight costs one broadcast and NV vector multiply-adds, over NV independent accumulators.
constexpr int64_t MW_BLOCK = 64;

template <typename T>
T* aligned64(T* p) {
  return reinterpret_cast<T*>((reinterpret_cast<uintptr_t>(p) + 63) & ~uintptr_t(63));
}

// mask [out, in] (bool, contiguous) -> [ptr int32 [nblk * R + 1], loc uint8 [nnz], off int32 [nnz]], with
// R = out (rows) or in (by_cols) and nblk blocks of the other dimension.
std::vector<at::Tensor> masked_index(const at::Tensor& mask, bool by_cols) {
  TORCH_CHECK(mask.device().is_cpu() && mask.dim() == 2 && mask.scalar_type() == at::kBool && mask.is_contiguous(),
              "mask must be a contiguous 2-D CPU bool tensor");
  const int64_t O = mask.size(0), I = mask.size(1);
  TORCH_CHECK(O * I < (int64_t(1) << 31), "masked_index takes fewer than 2^31 weights");
  const int64_t R = by_cols ? I : O, K = by_cols ? O : I, nblk = (K + MW_BLOCK - 1) / MW_BLOCK;
  const bool* M = mask.data_ptr<bool>();
  at::Tensor ptr = at::empty({nblk * R + 1}, mask.options().dtype(at::kInt));
  int32_t* P = ptr.data_ptr<int32_t>();
  std::vector<int32_t> cur(nblk * R, 0);
  for (int64_t i = 0; i < O; ++i) {  // counts, then their running sums, then each weight at its entry
    const bool* row = M + i * I;
    int32_t* c = cur.data() + (by_cols ? (i / MW_BLOCK) * R : i);
    if (by_cols) {
      for (int64_t j = 0; j < I; ++j) c[j] += row[j];
    } else {
      for (int64_t j = 0; j < I; ++j) c[(j / MW_BLOCK) * R] += row[j];
    }
  }
  P[0] = 0;
  for (int64_t e = 0; e < nblk * R; ++e) {
    P[e + 1] = P[e] + cur[e];
    cur[e] = P[e];
  }
  const int64_t nnz = P[nblk * R];
  at::Tensor loc = at::empty({nnz}, mask.options().dtype(at::kByte));
  at::Tensor off = at::empty({nnz}, mask.options().dtype(at::kInt));
  uint8_t* L = loc.data_ptr<uint8_t>();
  int32_t* F = off.data_ptr<int32_t>();
  for (int64_t i = 0; i < O; ++i) {
    const bool* row = M + i * I;
    for (int64_t j = 0; j < I; ++j) {
      if (!row[j]) continue;
      const int64_t c = by_cols ? i : j, r = by_cols ? j : i;
      const int32_t q = cur[(c / MW_BLOCK) * R + r]++;
      L[q] = static_cast<uint8_t>(c % MW_BLOCK);
      F[q] = static_cast<int32_t>(i * I + j);
    }
  }
  return {ptr, loc, off};
}

// y [N, R]: y[n, r] = sum of W[off[q]] * x[n, b * MW_BLOCK + loc[q]] over the entries q of (b, r), every block b.
at::Tensor masked_matmul(const at::Tensor& x, const at::Tensor& w, const at::Tensor& ptr, const at::Tensor& loc,
                         const at::Tensor& off, int64_t R) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 2 && x.is_contiguous(), "x must be a contiguous CPU [N, K] tensor");
  TORCH_CHECK(w.device().is_cpu() && w.is_contiguous() && w.scalar_type() == x.scalar_type(),
              "w must be a contiguous CPU tensor of x's dtype");
  TORCH_CHECK(ptr.scalar_type() == at::kInt && loc.scalar_type() == at::kByte && off.scalar_type() == at::kInt &&
              ptr.is_contiguous() && loc.is_contiguous() && off.is_contiguous(), "the index must come from masked_index");
  const int64_t N = x.size(0), K = x.size(1), nblk = (K + MW_BLOCK - 1) / MW_BLOCK;
  TORCH_CHECK(ptr.numel() == nblk * R + 1 && w.numel() == K * R, "the index was made for another shape");
  const int32_t* P = ptr.data_ptr<int32_t>();
  const int64_t nnz = P[nblk * R];
  TORCH_CHECK(loc.numel() == nnz && off.numel() == nnz, "the index was made for another shape");
  at::Tensor y = at::empty({N, R}, x.options());
  if (N == 0 || R == 0) return y;
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "masked_matmul", [&] {
    using T_ = scalar_t;
    using VT = Vec<T_>;
    using V_ = typename VT::type;
    constexpr int64_t L = VT::lanes, TR = NV * L;  // rows of x per tile
    const T_* X = x.data_ptr<T_>();
    const T_* W = w.data_ptr<T_>();
    const uint8_t* Lc = loc.data_ptr<uint8_t>();
    const int32_t* F = off.data_ptr<int32_t>();
    T_* Y = y.data_ptr<T_>();
    std::vector<T_> vals(nnz);  // the kept weights in entry order: read once per tile of rows
    at::parallel_for(0, nnz, 1 << 14, [&](int64_t b, int64_t e) {
      for (int64_t q = b; q < e; ++q) vals[q] = W[F[q]];
    });
    const int64_t ntile = (N + TR - 1) / TR;
    // tasks: (tile, range of outputs), at least two per thread when the tiles alone are fewer
    const int64_t parts = std::min<int64_t>(R, std::max<int64_t>(1, (2 * at::get_num_threads() + ntile - 1) / ntile));
    const int64_t rw = (R + parts - 1) / parts;
    at::parallel_for(0, ntile * parts, 1, [&](int64_t tb, int64_t te) {
      // 64-byte aligned: a vector load that straddles two cache lines costs two (12% of the kernel, measured)
      std::vector<T_> buf(rw * TR + MW_BLOCK * TR + 2 * 64 / sizeof(T_));
      T_* const acc = aligned64(buf.data());
      T_* const xt = aligned64(acc + rw * TR);
      for (int64_t task = tb; task < te; ++task) {
        const int64_t n0 = (task / parts) * TR, nn = std::min(TR, N - n0);
        const int64_t r0 = (task % parts) * rw, r1 = std::min(R, r0 + rw);
        if (r0 >= r1) continue;
        std::fill(acc, acc + rw * TR, T_(0));
        for (int64_t b = 0; b < nblk; ++b) {
          const int64_t c0 = b * MW_BLOCK, cn = std::min(MW_BLOCK, K - c0);
          const int32_t* p = P + b * R;
          if (p[r0] == p[r1]) continue;
          if (nn < TR) std::fill(xt, xt + MW_BLOCK * TR, T_(0));
          for (int64_t n = 0; n < nn; ++n) {
            const T_* xr = X + (n0 + n) * K + c0;
            for (int64_t c = 0; c < cn; ++c) xt[c * TR + n] = xr[c];
          }
          for (int64_t r = r0; r < r1; ++r) {
            const int32_t q0 = p[r], q1 = p[r + 1];
            if (q0 == q1) continue;
            T_* ar = acc + (r - r0) * TR;
            V_ a[NV];
            for (int64_t k = 0; k < NV; ++k) a[k] = VT::load(ar + k * L);
            for (int32_t q = q0; q < q1; ++q) {
              const T_ v = vals[q];
              const T_* xr = xt + Lc[q] * TR;
              for (int64_t k = 0; k < NV; ++k) a[k] += v * VT::load(xr + k * L);
            }
            for (int64_t k = 0; k < NV; ++k) VT::store(ar + k * L, a[k]);
          }
        }
        for (int64_t s0 = r0; s0 < r1; s0 += 8) {  // back to [N, R], 8 outputs at a time
          const int64_t s1 = std::min(r1, s0 + 8);
          for (int64_t n = 0; n < nn; ++n) {
            T_* yr = Y + (n0 + n) * R;
            for (int64_t r = s0; r < s1; ++r) yr[r] = acc[(r - r0) * TR + n];
          }
        }
      }
    });
  });
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
  m.def("unit_scale", &unit_scale, "x * m per unit, optionally with the per-unit dot with s (CPU)");
  m.def("lif_forward", &lif_forward, "multi-step LIF/IF forward (CPU)");
  m.def("lif_backward", &lif_backward, "multi-step LIF/IF BPTT backward, detached reset (CPU)");
  m.def("event_linear", &event_linear, "event-driven linear layer over the non-zero inputs (CPU)", py::arg("x"),
        py::arg("colptr"), py::arg("rows"), py::arg("vals"), py::arg("bias"), py::arg("n_out"), py::arg("steps") = 1);
  m.def("csr_linear", &csr_linear, "CSR sparse-weight linear layer (CPU)");
  m.def("sparse_rows", &sparse_rows, "the non-zero entries of each row of a mostly-zero [N, in] input (CPU)",
        py::arg("x"), py::arg("max_density"), py::arg("n_out") = 0, py::arg("steps") = 1, py::arg("delta_gain") = 0.0);
  m.def("pack_weight", &pack_weight, "W [out, in] packed for sparse_input_linear (CPU)");
  m.def("sparse_input_linear", &sparse_input_linear, "x W^T + b over x's non-zero inputs (CPU)");
  m.def("sparse_input_weight_grad", &sparse_input_weight_grad, "x^T g over x's non-zero inputs (CPU)");
  m.def("masked_index", &masked_index, "the kept weights of a mask, listed for masked_matmul (CPU)");
  m.def("masked_matmul", &masked_matmul, "x times the kept weights only: x W^T or x W by the index (CPU)");
}
