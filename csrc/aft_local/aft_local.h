// CUDA launchers of AFT-local (convention: csrc/common/launch.h).
//   q, k, v, y, dy, dq, dk, dv : (B, T, D) in `dtype`;  lse : (B, T, D) accumulate type
//   w, dw                      : (heads, T, T) in `dtype` (heads = 1 for a 2-D w); channel c uses head c / (D / heads)
//                                banded: (heads, T, 2W - 1), W = min(window, T), w[h, t, j] the bias of key
//                                t' = t + j - (W - 1) (entries with t' outside [0, T) are never read)
// The bias applies inside the band |t - t'| < window; causal: key t' is visible to query t iff t' <= t.
// dw entries outside the band (and above the diagonal when causal) are not written: the caller zero-fills dw.
// The workspace does not depend on the layout: O(B*T*D), nothing of size T x T.
#pragma once

#include "common/launch.h"

namespace attnfree {
namespace cuda {

size_t aft_local_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t window,
                                     bool causal);
cudaError_t aft_local_fwd(DType dtype, const void* q, const void* k, const void* v, const void* w, void* y, void* lse,
                          int64_t B, int64_t T, int64_t D, int64_t heads, int64_t window, bool causal, bool banded,
                          void* workspace, cudaStream_t stream);

size_t aft_local_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t window,
                                     bool causal);
cudaError_t aft_local_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v, const void* w,
                          const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw, int64_t B, int64_t T,
                          int64_t D, int64_t heads, int64_t window, bool causal, bool banded, void* workspace,
                          cudaStream_t stream);

}  // namespace cuda
}  // namespace attnfree
