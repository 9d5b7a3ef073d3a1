// Schemas of the aft_local ops (torch.ops.attnfree.*) and their CPU kernels (aft_local_cpu.cpp).
// The CUDA kernels register themselves in aft_local_cuda.cpp; the library is declared in common/module.cpp.
// banded: w (and dw) in the banded layout (heads?, T, 2W - 1) of attnfree_ext/ops/aft_local/layout.py.
#include <torch/library.h>

#include "aft_local/aft_local_cpu.h"

TORCH_LIBRARY_FRAGMENT(attnfree, m) {
  m.def(
      "aft_local_fwd(Tensor q, Tensor k, Tensor v, Tensor w, int window, bool causal, bool banded=False)"
      " -> (Tensor y, Tensor lse)");
  m.def(
      "aft_local_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor w, Tensor y, Tensor lse, int window,"
      " bool causal, bool banded=False) -> (Tensor dq, Tensor dk, Tensor dv, Tensor dw)");
}

TORCH_LIBRARY_IMPL(attnfree, CPU, m) {
  m.impl("aft_local_fwd", &attnfree::cpu::aft_local_fwd);
  m.impl("aft_local_bwd", &attnfree::cpu::aft_local_bwd);
}
