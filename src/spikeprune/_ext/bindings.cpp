// spikeprune compiled CPU kernels: the Python module of the compiled kernels.
// Shared includes, helpers and the declarations of every family: spikeprune_cpu.h.

#include "spikeprune_cpu.h"

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
