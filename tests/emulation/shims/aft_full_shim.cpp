// C ABI over csrc/cuda/aft_full.h for the emulation runner (ctypes). dt / w_dt: AftDType (0 f16, 1 bf16, 2 f32,
// 3 f64); flags as int.
#include <cstdint>

#include "aft_full.h"

using attnfree::cuda::AftDType;

extern "C" {

int emu_aft_full_fwd(int dt, int w_dt, const void* q, const void* k, const void* v, const void* w, void* y, void* lse,
                     int64_t B, int64_t T, int64_t D, int64_t heads, int causal, int exact) {
  return attnfree::cuda::aft_full_fwd_launch(static_cast<AftDType>(dt), static_cast<AftDType>(w_dt), q, k, v, w, y,
                                             lse, B, T, D, heads, causal != 0, exact != 0, nullptr);
}
int emu_aft_full_bwd(int dt, int w_dt, const void* dy, const void* q, const void* k, const void* v, const void* w,
                     const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw, int64_t B, int64_t T,
                     int64_t D, int64_t heads, int causal, int exact) {
  return attnfree::cuda::aft_full_bwd_launch(static_cast<AftDType>(dt), static_cast<AftDType>(w_dt), dy, q, k, v, w,
                                             y, lse, dq, dk, dv, dw, B, T, D, heads, causal != 0, exact != 0, nullptr);
}

}  // extern "C"
