// AFT-local as block-banded tensor-core tiles (aft_local_tc.cu, aft_local_tc_bwd.cu): the launchers aft_local.cu
// dispatches to for 16/32-bit inputs on sm_80+, and the w index both kernel files share. Plain C++ (no torch headers).
// Buffers and sizes as in aft_local.h; W is the window already clipped to T.
#pragma once

#include "common/launch.h"

namespace attnfree {
namespace cuda {

// Offset of w[h, t, t'] (t' inside the band |t - t'| < W) in either layout of aft_local.h.
struct WLayout {
  int64_t T, ld, W;
  bool banded;
  WLayout(int64_t T_, int64_t W_, bool banded_) : T(T_), ld(banded_ ? 2 * W_ - 1 : T_), W(W_), banded(banded_) {}
  __host__ __device__ __forceinline__ int64_t at(int64_t h, int64_t t, int64_t tp) const {
    return (h * T + t) * ld + (banded ? tp - t + (W - 1) : tp);
  }
};

// Whether the tensor-core forward serves this problem (dtype float32/float16/bfloat16, an sm_80+ device, a grid
// within the launch limits); otherwise the per-element band kernels of aft_local.cu run.
bool aft_local_tc_fwd_takes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t W);
size_t aft_local_tc_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t W);
cudaError_t aft_local_tc_fwd(DType dtype, const void* q, const void* k, const void* v, const void* w, void* y,
                             void* lse, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t W, bool causal,
                             bool banded, void* workspace, cudaStream_t stream);

// The tensor-core backward (aft_local_tc_bwd.cu): the same dtypes and devices with W <= 64 (its dw tile covers the
// query chunks of one key tile's band) and enough shared memory per block; otherwise the per-element kernels run.
bool aft_local_tc_bwd_takes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t W);
size_t aft_local_tc_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t W);
cudaError_t aft_local_tc_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v, const void* w,
                             const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw, int64_t B,
                             int64_t T, int64_t D, int64_t heads, int64_t W, bool causal, bool banded, void* workspace,
                             cudaStream_t stream);

}  // namespace cuda
}  // namespace attnfree
