// AFT-full CUDA launchers (plain C++: raw pointers, sizes, a stream; no torch headers).
//
// Layouts (all contiguous, row-major):
//   q, k, v, y, dy, dq, dk, dv : (B, T, D)            element type `dt`
//   lse                        : (B, T, D)            float32 (float64 when dt == F64)
//   w, dw                      : (heads, T, T)        element type `w_dt` (dt, or the accumulate type of dt)
//   u, vb, du, dvb             : (heads, T, rank)     element type `w_dt`
// Channel c uses head c / (D / heads). causal: key t' is visible to query t iff t' <= t.
//
// Every launcher returns cudaSuccess or the first CUDA error (launch or attribute error); it never synchronises.
#pragma once

#include <cstddef>
#include <cstdint>
#include <cuda_runtime.h>

namespace attnfree {
namespace cuda {

enum class AftDType : int { F16 = 0, BF16 = 1, F32 = 2, F64 = 3 };

// The accumulate type of a dtype: F32 for F16/BF16/F32, F64 for F64. `w_dt` must be `dt` or acc(dt).
inline AftDType aft_acc_dtype(AftDType dt) { return dt == AftDType::F64 ? AftDType::F64 : AftDType::F32; }

// Forward: y = sigmoid(q) * softmax-weighted sum of v, lse = log-sum-exp of (k + w) over visible keys.
// exact = true forces the per-element (non-tensor-core) path for every dtype (debugging / reference on the GPU);
// float64 always takes it.
cudaError_t aft_full_fwd_launch(AftDType dt, AftDType w_dt, const void* q, const void* k, const void* v,
                                const void* w, void* y, void* lse, int64_t B, int64_t T, int64_t D,
                                int64_t heads, bool causal, bool exact, cudaStream_t stream);

// Backward from inputs + y + lse; dw (type w_dt) is fully written. exact = true forces the SIMT kernels
// (float64 always takes them).
cudaError_t aft_full_bwd_launch(AftDType dt, AftDType w_dt, const void* dy, const void* q, const void* k,
                                const void* v, const void* w, const void* y, const void* lse, void* dq, void* dk,
                                void* dv, void* dw, int64_t B, int64_t T, int64_t D, int64_t heads, bool causal,
                                bool exact, cudaStream_t stream);

// Low-rank bias w[h] = u[h] @ vb[h]^T, u/vb of shape (heads, T, rank).
// Workspace: bytes the caller must provide (may be 0; then `workspace` may be null).
size_t aft_full_lowrank_fwd_workspace_bytes(AftDType dt, int64_t T, int64_t heads, int64_t rank, bool exact);
cudaError_t aft_full_lowrank_fwd_launch(AftDType dt, AftDType w_dt, const void* q, const void* k, const void* v,
                                        const void* u, const void* vb, void* y, void* lse, void* workspace,
                                        int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank,
                                        bool causal, bool exact, cudaStream_t stream);

size_t aft_full_lowrank_bwd_workspace_bytes(AftDType dt, int64_t T, int64_t heads);
cudaError_t aft_full_lowrank_bwd_launch(AftDType dt, AftDType w_dt, const void* dy, const void* q, const void* k,
                                        const void* v, const void* u, const void* vb, const void* y,
                                        const void* lse, void* dq, void* dk, void* dv, void* du, void* dvb,
                                        void* workspace, int64_t B, int64_t T, int64_t D, int64_t heads,
                                        int64_t rank, bool causal, bool exact, cudaStream_t stream);

}  // namespace cuda
}  // namespace attnfree
