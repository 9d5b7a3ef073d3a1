// Schemas of the ea_double_norm ops (torch.ops.attnfree.*) and their CPU kernels (ea_double_norm_cpu.cpp).
// The CUDA kernels register themselves in ea_double_norm_cuda.cpp; the library is declared in common/module.cpp.
#include <torch/library.h>

#include "ea_double_norm/ea_double_norm_cpu.h"

TORCH_LIBRARY_FRAGMENT(attnfree, m) {
  m.def("ea_double_norm_fwd(Tensor logits, float eps) -> (Tensor out, Tensor lse, Tensor rowsum)");
  m.def(
      "ea_double_norm_bwd(Tensor dout, Tensor logits, Tensor out, Tensor lse, Tensor rowsum)"
      " -> Tensor dlogits");
}

TORCH_LIBRARY_IMPL(attnfree, CPU, m) {
  m.impl("ea_double_norm_fwd", &attnfree::cpu::ea_double_norm_fwd);
  m.impl("ea_double_norm_bwd", &attnfree::cpu::ea_double_norm_bwd);
}
