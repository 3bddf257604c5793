// spikeprune compiled CPU kernels: the multi-step LIF/IF neuron (forward over all T steps, BPTT backward) and per-unit sums and gates.
// Shared includes, helpers and the declarations of every family: spikeprune_cpu.h.

#include "spikeprune_cpu.h"

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
