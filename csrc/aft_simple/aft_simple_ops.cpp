// Schemas of the aft_simple ops (torch.ops.attnfree.*) and their CPU kernels (aft_simple_cpu.cpp).
// The CUDA kernels register themselves in aft_simple_cuda.cpp; the library is declared in common/module.cpp.
#include <torch/library.h>

#include "aft_simple/aft_simple_cpu.h"

TORCH_LIBRARY_FRAGMENT(attnfree, m) {
  m.def("aft_simple_fwd(Tensor q, Tensor k, Tensor v, bool causal) -> (Tensor y, Tensor lse)");
  m.def(
      "aft_simple_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor y, Tensor lse, bool causal)"
      " -> (Tensor dq, Tensor dk, Tensor dv)");
}

TORCH_LIBRARY_IMPL(attnfree, CPU, m) {
  m.impl("aft_simple_fwd", &attnfree::cpu::aft_simple_fwd);
  m.impl("aft_simple_bwd", &attnfree::cpu::aft_simple_bwd);
}
