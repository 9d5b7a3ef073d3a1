// attnfree_ext CUDA launchers: plain C++ entry points (raw pointers, sizes, a stream).
// Includable from torch glue code: depends only on <cuda_runtime_api.h>.
//
// Conventions
//  * All tensors are dense, contiguous, row-major:
//      q, k, v, y, dy, dq, dk, dv : (B, T, D) in `dtype`
//      lse                        : (B, T, D) in the accumulation type (float for fp16/bf16/fp32, double for fp64)
//      w, dw (aft_local)          : (heads, T, T) in `dtype` (heads = 1 for a 2-D w); channel c uses head c/(D/heads)
//      ea logits/out/dout/dlogits : (M, N, S) in `dtype`; lse (M, S) acc type; rowsum (M, N) acc type
//  * Math is done in float (fp16/bf16/fp32) or double (fp64).
//  * `workspace` must point to at least <op>_workspace_bytes(...) bytes of device memory (256-byte aligned);
//    its content on entry does not matter.
//  * dw (aft_local_bwd) entries outside the band (and above the diagonal when causal) are NOT written:
//    the caller zero-fills dw.
//  * Every launcher returns cudaGetLastError() after enqueueing its kernels (cudaSuccess for empty inputs).
#pragma once
#include <cstddef>
#include <cstdint>
#include <cuda_runtime_api.h>

namespace attnfree_cuda {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// ---------------------------------------------------------------- AFT-simple
size_t aft_simple_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, bool causal);
cudaError_t aft_simple_fwd(DType dtype, const void* q, const void* k, const void* v, void* y, void* lse,
                           int64_t B, int64_t T, int64_t D, bool causal, void* workspace, cudaStream_t stream);

size_t aft_simple_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, bool causal);
cudaError_t aft_simple_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v,
                           const void* y, const void* lse, void* dq, void* dk, void* dv,
                           int64_t B, int64_t T, int64_t D, bool causal, void* workspace, cudaStream_t stream);

// ---------------------------------------------------------------- AFT-local
size_t aft_local_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t window, bool causal);
cudaError_t aft_local_fwd(DType dtype, const void* q, const void* k, const void* v, const void* w, int64_t heads,
                          void* y, void* lse, int64_t B, int64_t T, int64_t D, int64_t window, bool causal,
                          void* workspace, cudaStream_t stream);

size_t aft_local_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t window, bool causal);
cudaError_t aft_local_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v, const void* w,
                          int64_t heads, const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw,
                          int64_t B, int64_t T, int64_t D, int64_t window, bool causal, void* workspace,
                          cudaStream_t stream);

// ---------------------------------------------------------------- external-attention double normalisation
size_t ea_double_norm_fwd_workspace_bytes(DType dtype, int64_t M, int64_t N, int64_t S);
cudaError_t ea_double_norm_fwd(DType dtype, const void* logits, void* out, void* lse, void* rowsum, double eps,
                               int64_t M, int64_t N, int64_t S, void* workspace, cudaStream_t stream);

size_t ea_double_norm_bwd_workspace_bytes(DType dtype, int64_t M, int64_t N, int64_t S);
cudaError_t ea_double_norm_bwd(DType dtype, const void* dout, const void* logits, const void* out,
                               const void* lse, const void* rowsum, void* dlogits, int64_t M, int64_t N, int64_t S,
                               void* workspace, cudaStream_t stream);

}  // namespace attnfree_cuda
