// spikeprune compiled CPU kernels: inference over the non-zero weights: event-driven (CSC by input) and CSR linear layers.
// Shared includes, helpers and the declarations of every family: spikeprune_cpu.h.

#include "spikeprune_cpu.h"

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
