// spikeprune compiled CPU kernels: a dense Linear trained on a mostly-zero input (spikes): forward and weight gradient over its non-zeros.
// Shared includes, helpers and the declarations of every family: spikeprune_cpu.h.

#include "spikeprune_cpu.h"

// ------------------------------------------------------------------- sparse-input (spike) linear layers, training
// A dense Linear whose input is mostly zeros (spikes): y = x W^T + b and dW = g^T x only touch the inputs that are
// non-zero. x is first listed row by row (CSR of the *input*: rowptr, cols, and vals unless every non-zero is 1),
// which is also all the backward needs to keep of it. W is packed as [out blocks][in][block] (W^T cut into column
// blocks of 64 floats, each block contiguous, the last one zero-padded): a block is 200 KB for 800 inputs, so it
// stays in L2 (and in the TLB) while every row's non-zero inputs add their 256-byte slices into 8 vector registers.

namespace {

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
