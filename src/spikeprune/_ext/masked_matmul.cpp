// spikeprune compiled CPU kernels: products over the kept entries of a masked weight (forward and input gradient of a pruned Linear).
// Shared includes, helpers and the declarations of every family: spikeprune_cpu.h.

#include "spikeprune_cpu.h"

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
