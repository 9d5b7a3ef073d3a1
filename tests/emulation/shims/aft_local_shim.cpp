// C ABI over the aft_local launchers of csrc/cuda/launchers.h for the emulation runner (ctypes).
// dtype: the attnfree_cuda::DType value (0 f32, 1 f16, 2 bf16, 3 f64); flags as int; stream = null.
#include <cstdint>

#include "launchers.h"

using attnfree_cuda::DType;

extern "C" {

uint64_t emu_aft_local_fwd_ws(int dt, int64_t B, int64_t T, int64_t D, int64_t window, int causal) {
  return attnfree_cuda::aft_local_fwd_workspace_bytes(static_cast<DType>(dt), B, T, D, window, causal != 0);
}
int emu_aft_local_fwd(int dt, const void* q, const void* k, const void* v, const void* w, int64_t heads, void* y,
                      void* lse, int64_t B, int64_t T, int64_t D, int64_t window, int causal, void* ws) {
  return attnfree_cuda::aft_local_fwd(static_cast<DType>(dt), q, k, v, w, heads, y, lse, B, T, D, window, causal != 0,
                                      ws, nullptr);
}
uint64_t emu_aft_local_bwd_ws(int dt, int64_t B, int64_t T, int64_t D, int64_t window, int causal) {
  return attnfree_cuda::aft_local_bwd_workspace_bytes(static_cast<DType>(dt), B, T, D, window, causal != 0);
}
int emu_aft_local_bwd(int dt, const void* dy, const void* q, const void* k, const void* v, const void* w,
                      int64_t heads, const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw, int64_t B,
                      int64_t T, int64_t D, int64_t window, int causal, void* ws) {
  return attnfree_cuda::aft_local_bwd(static_cast<DType>(dt), dy, q, k, v, w, heads, y, lse, dq, dk, dv, dw, B, T, D,
                                      window, causal != 0, ws, nullptr);
}

}  // extern "C"
