// CUDA launchers of the external-attention double normalisation (convention: csrc/common/launch.h).
//   logits, out, dout, dlogits : (M, N, S) in `dtype` (the leading dims of (..., N, S) flattened into M)
//   lse (M, S), rowsum (M, N)  : accumulate type
// p = softmax over N, rowsum = sum_S p + eps, out = p / rowsum (docs/design.md §1.3).
#pragma once

#include "common/launch.h"

namespace attnfree {
namespace cuda {

size_t ea_double_norm_fwd_workspace_bytes(DType dtype, int64_t M, int64_t N, int64_t S);
cudaError_t ea_double_norm_fwd(DType dtype, const void* logits, void* out, void* lse, void* rowsum, int64_t M,
                               int64_t N, int64_t S, double eps, void* workspace, cudaStream_t stream);

size_t ea_double_norm_bwd_workspace_bytes(DType dtype, int64_t M, int64_t N, int64_t S);
cudaError_t ea_double_norm_bwd(DType dtype, const void* dout, const void* logits, const void* out, const void* lse,
                               const void* rowsum, void* dlogits, int64_t M, int64_t N, int64_t S, void* workspace,
                               cudaStream_t stream);

}  // namespace cuda
}  // namespace attnfree
