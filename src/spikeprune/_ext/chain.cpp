// spikeprune compiled CPU kernels: several layers in one call, kept on the C++ side by id (batch-1 event-driven inference).
// Shared includes, helpers and the declarations of every family: spikeprune_cpu.h.

#include "spikeprune_cpu.h"

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
