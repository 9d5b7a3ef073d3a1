// attnfree_ext._C: operator schemas (TORCH_LIBRARY(attnfree, m)) and the CPU implementations.
// Every m.def lives here; CUDA implementations register themselves from csrc/cuda_glue/*.cpp with their
// own TORCH_LIBRARY_IMPL(attnfree, CUDA, m). aft_full_lowrank_* are CUDA-only (no CPU impl).
#include <torch/library.h>

#include "attnfree/ops.h"

TORCH_LIBRARY(attnfree, m) {
  m.def("aft_full_fwd(Tensor q, Tensor k, Tensor v, Tensor w, bool causal) -> (Tensor y, Tensor lse)");
  m.def(
      "aft_full_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor w, Tensor y, Tensor lse, bool causal)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dw)");
  m.def(
      "aft_local_fwd(Tensor q, Tensor k, Tensor v, Tensor w, int window, bool causal)"
      " -> (Tensor y, Tensor lse)");
  m.def(
      "aft_local_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor w, Tensor y, Tensor lse, int window,"
      " bool causal) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dw)");
  m.def("aft_simple_fwd(Tensor q, Tensor k, Tensor v, bool causal) -> (Tensor y, Tensor lse)");
  m.def(
      "aft_simple_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor y, Tensor lse, bool causal)"
      " -> (Tensor dq, Tensor dk, Tensor dv)");
  m.def("ea_double_norm_fwd(Tensor logits, float eps) -> (Tensor out, Tensor lse, Tensor rowsum)");
  m.def(
      "ea_double_norm_bwd(Tensor dout, Tensor logits, Tensor out, Tensor lse, Tensor rowsum)"
      " -> Tensor dlogits");
  m.def(
      "aft_full_lowrank_fwd(Tensor q, Tensor k, Tensor v, Tensor u, Tensor vb, bool causal)"
      " -> (Tensor y, Tensor lse)");
  m.def(
      "aft_full_lowrank_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor u, Tensor vb, Tensor y,"
      " Tensor lse, bool causal) -> (Tensor dq, Tensor dk, Tensor dv, Tensor du, Tensor dvb)");
}

TORCH_LIBRARY_IMPL(attnfree, CPU, m) {
  m.impl("aft_full_fwd", &attnfree::cpu::aft_full_fwd);
  m.impl("aft_full_bwd", &attnfree::cpu::aft_full_bwd);
  m.impl("aft_local_fwd", &attnfree::cpu::aft_local_fwd);
  m.impl("aft_local_bwd", &attnfree::cpu::aft_local_bwd);
  m.impl("aft_simple_fwd", &attnfree::cpu::aft_simple_fwd);
  m.impl("aft_simple_bwd", &attnfree::cpu::aft_simple_bwd);
  m.impl("ea_double_norm_fwd", &attnfree::cpu::ea_double_norm_fwd);
  m.impl("ea_double_norm_bwd", &attnfree::cpu::ea_double_norm_bwd);
}

#ifdef ATTNFREE_WITH_PYTHON
#include <torch/extension.h>

// Importing attnfree_ext._C loads the registrations above; the module itself exposes nothing else.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "attnfree_ext compiled ops: use torch.ops.attnfree.*";
  m.attr("cuda_compiled") = py::bool_(
#ifdef ATTNFREE_WITH_CUDA
      true
#else
      false
#endif
  );
}
#endif
