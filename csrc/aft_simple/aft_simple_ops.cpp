// Schemas of the aft_simple ops (torch.ops.attnfree.*) and their CPU kernels (aft_simple_cpu.cpp).
// The CUDA kernels register themselves in aft_simple_cuda.cpp; the library is declared in common/module.cpp.
#include <torch/library.h>

#include "aft_simple/aft_simple_cpu.h"

TORCH_LIBRARY_FRAGMENT(attnfree, m) {
  m.def(
      "aft_simple_fwd(Tensor q, Tensor k, Tensor v, bool causal, Tensor? cu_seqlens=None, int? max_seqlen=None) -> "
      "(Tensor y, Tensor lse)");
  m.def(
      "aft_simple_bwd(Tensor dy, Tensor q, Tensor k, Tensor v, Tensor y, Tensor lse, bool causal"
      ", Tensor? cu_seqlens=None, int? max_seqlen=None) -> (Tensor dq, Tensor dk, Tensor dv)");
  // cu_seqlens / max_seqlen: packed sequences (aft_simple_varlen.h), states (N, 3, D) then.
  // with a recurrent state (B, 3, D) = (running max, numerator, denominator), csrc/aft_simple/aft_simple_state.h
  m.def(
      "aft_simple_state_fwd(Tensor q, Tensor k, Tensor v, bool causal, Tensor? initial_state, Tensor? cu_seqlens=None, "
      "int? max_seqlen=None)"
      " -> (Tensor y, Tensor lse, Tensor final_state)");
  m.def(
      "aft_simple_state_bwd(Tensor dy, Tensor? dfinal_state, Tensor q, Tensor k, Tensor v, Tensor? initial_state,"
      " Tensor y, Tensor lse, Tensor final_state, bool causal, Tensor? cu_seqlens=None, int? max_seqlen=None)"
      " -> (Tensor dq, Tensor dk, Tensor dv, Tensor dinitial_state)");
}

TORCH_LIBRARY_IMPL(attnfree, CPU, m) {
  m.impl("aft_simple_fwd", &attnfree::cpu::aft_simple_fwd);
  m.impl("aft_simple_bwd", &attnfree::cpu::aft_simple_bwd);
  m.impl("aft_simple_state_fwd", &attnfree::cpu::aft_simple_state_fwd);
  m.impl("aft_simple_state_bwd", &attnfree::cpu::aft_simple_state_bwd);
}
