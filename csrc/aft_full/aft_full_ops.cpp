// Schemas of the aft_full ops (torch.ops.attnfree.*) and their CPU kernels (aft_full_cpu.cpp).
// The CUDA kernels register themselves in aft_full_cuda.cpp; the library is declared in common/module.cpp.
// aft_full_lowrank_* have a CUDA kernel only (aft_full_cuda.cpp), no CPU registration.
#include <torch/library.h>

#include "aft_full/aft_full_cpu.h"

TORCH_LIBRARY_FRAGMENT(attnfree, m) {
  m.def("aft_full_fwd(Tensor q, Tensor k, Tensor v, Tensor w, bool causal) -> (Tensor y, Tensor lse)");
  m.def(
      "aft_full_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor w, Tensor y, Tensor lse, bool causal)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dw)");
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
}
