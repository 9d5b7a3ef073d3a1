// CUDA launchers of AFT-full, dense bias and low-rank (factorised) bias (convention: csrc/common/launch.h).
//   q, k, v, y, dy, dq, dk, dv : (B, T, D)        in `dtype`;  lse : (B, T, D) accumulate type
//   w, dw                      : (heads, T, T)    in `w_dtype`
//   u, vb, du, dvb             : (heads, T, rank) in `w_dtype`  (low-rank bias w[h] = u[h] @ vb[h]^T)
// `w_dtype` is `dtype` or acc_dtype(dtype); any other pair returns cudaErrorInvalidValue. Channel c uses head
// c / (D / heads); causal: key t' is visible to query t iff t' <= t.
// `exact` selects the per-element kernels instead of the tensor-core ones (float64 always takes them): the
// reference on the GPU, selected by ATTNFREE_AFT_FULL_KERNEL=exact (docs/design.md §6.2).
// `tf32x3` (forward, float32 inputs only): true -> 3xTF32 tensor-core products (~fp32 accuracy), false -> plain
// TF32 (~1e-3 relative, a third of the MMAs); the torch binding passes
// torch.get_float32_matmul_precision() == "highest". fp16 inputs always take 3xTF32, bf16 inputs bf16 operands.
#pragma once

#include "common/launch.h"

namespace attnfree {
namespace cuda {

// Forward: y = sigmoid(q) * softmax-weighted sum of v, lse = log-sum-exp of (k + w) over the visible keys.
size_t aft_full_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, bool causal,
                                    bool exact);
cudaError_t aft_full_fwd(DType dtype, DType w_dtype, const void* q, const void* k, const void* v, const void* w,
                         void* y, void* lse, int64_t B, int64_t T, int64_t D, int64_t heads, bool causal, bool exact,
                         bool tf32x3, void* workspace, cudaStream_t stream);

// Backward from the inputs, y and lse; every entry of dw is written.
size_t aft_full_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, bool causal,
                                    bool exact);
cudaError_t aft_full_bwd(DType dtype, DType w_dtype, const void* dy, const void* q, const void* k, const void* v,
                         const void* w, const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw,
                         int64_t B, int64_t T, int64_t D, int64_t heads, bool causal, bool exact, void* workspace,
                         cudaStream_t stream);

size_t aft_full_lowrank_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank,
                                            bool causal, bool exact);
cudaError_t aft_full_lowrank_fwd(DType dtype, DType w_dtype, const void* q, const void* k, const void* v, const void* u,
                                 const void* vb, void* y, void* lse, int64_t B, int64_t T, int64_t D, int64_t heads,
                                 int64_t rank, bool causal, bool exact, bool tf32x3, void* workspace,
                                 cudaStream_t stream);

size_t aft_full_lowrank_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank,
                                            bool causal, bool exact);
cudaError_t aft_full_lowrank_bwd(DType dtype, DType w_dtype, const void* dy, const void* q, const void* k,
                                 const void* v, const void* u, const void* vb, const void* y, const void* lse, void* dq,
                                 void* dk, void* dv, void* du, void* dvb, int64_t B, int64_t T, int64_t D,
                                 int64_t heads, int64_t rank, bool causal, bool exact, void* workspace,
                                 cudaStream_t stream);

}  // namespace cuda
}  // namespace attnfree
