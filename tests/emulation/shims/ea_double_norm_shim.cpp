// C ABI over the ea_double_norm launchers of csrc/cuda/launchers.h for the emulation runner (ctypes).
// dtype: the attnfree_cuda::DType value (0 f32, 1 f16, 2 bf16, 3 f64); stream = null.
#include <cstdint>

#include "launchers.h"

using attnfree_cuda::DType;

extern "C" {

uint64_t emu_ea_double_norm_fwd_ws(int dt, int64_t M, int64_t N, int64_t S) {
  return attnfree_cuda::ea_double_norm_fwd_workspace_bytes(static_cast<DType>(dt), M, N, S);
}
int emu_ea_double_norm_fwd(int dt, const void* logits, void* out, void* lse, void* rowsum, double eps, int64_t M,
                           int64_t N, int64_t S, void* ws) {
  return attnfree_cuda::ea_double_norm_fwd(static_cast<DType>(dt), logits, out, lse, rowsum, eps, M, N, S, ws,
                                           nullptr);
}
uint64_t emu_ea_double_norm_bwd_ws(int dt, int64_t M, int64_t N, int64_t S) {
  return attnfree_cuda::ea_double_norm_bwd_workspace_bytes(static_cast<DType>(dt), M, N, S);
}
int emu_ea_double_norm_bwd(int dt, const void* dout, const void* logits, const void* out, const void* lse,
                           const void* rowsum, void* dlogits, int64_t M, int64_t N, int64_t S, void* ws) {
  return attnfree_cuda::ea_double_norm_bwd(static_cast<DType>(dt), dout, logits, out, lse, rowsum, dlogits, M, N, S,
                                           ws, nullptr);
}

}  // extern "C"
