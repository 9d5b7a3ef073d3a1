// CUDA launchers of AFT-simple (convention: csrc/common/launch.h).
//   q, k, v, y, dy, dq, dk, dv : (B, T, D) in `dtype`;  lse : (B, T, D) accumulate type.
// causal: key t' is visible to query t iff t' <= t.
#pragma once

#include "common/launch.h"

namespace attnfree {
namespace cuda {

size_t aft_simple_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, bool causal);
cudaError_t aft_simple_fwd(DType dtype, const void* q, const void* k, const void* v, void* y, void* lse, int64_t B,
                           int64_t T, int64_t D, bool causal, void* workspace, cudaStream_t stream);

size_t aft_simple_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, bool causal);
cudaError_t aft_simple_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v, const void* y,
                           const void* lse, void* dq, void* dk, void* dv, int64_t B, int64_t T, int64_t D, bool causal,
                           void* workspace, cudaStream_t stream);

}  // namespace cuda
}  // namespace attnfree
