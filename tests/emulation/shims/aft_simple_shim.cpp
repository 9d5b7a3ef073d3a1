// C ABI over the aft_simple launchers of csrc/cuda/launchers.h for the emulation runner (ctypes).
// dtype: the attnfree_cuda::DType value (0 f32, 1 f16, 2 bf16, 3 f64); flags as int; stream = null.
#include <cstdint>

#include "launchers.h"

using attnfree_cuda::DType;

extern "C" {

uint64_t emu_aft_simple_fwd_ws(int dt, int64_t B, int64_t T, int64_t D, int causal) {
  return attnfree_cuda::aft_simple_fwd_workspace_bytes(static_cast<DType>(dt), B, T, D, causal != 0);
}
int emu_aft_simple_fwd(int dt, const void* q, const void* k, const void* v, void* y, void* lse, int64_t B, int64_t T,
                       int64_t D, int causal, void* ws) {
  return attnfree_cuda::aft_simple_fwd(static_cast<DType>(dt), q, k, v, y, lse, B, T, D, causal != 0, ws, nullptr);
}
uint64_t emu_aft_simple_bwd_ws(int dt, int64_t B, int64_t T, int64_t D, int causal) {
  return attnfree_cuda::aft_simple_bwd_workspace_bytes(static_cast<DType>(dt), B, T, D, causal != 0);
}
int emu_aft_simple_bwd(int dt, const void* dy, const void* q, const void* k, const void* v, const void* y,
                       const void* lse, void* dq, void* dk, void* dv, int64_t B, int64_t T, int64_t D, int causal,
                       void* ws) {
  return attnfree_cuda::aft_simple_bwd(static_cast<DType>(dt), dy, q, k, v, y, lse, dq, dk, dv, B, T, D, causal != 0,
                                       ws, nullptr);
}

}  // extern "C"
