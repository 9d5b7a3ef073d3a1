// CUDA launchers of AFT-simple (convention: csrc/common/launch.h).
//   q, k, v, y, dy, dq, dk, dv : (B, T, D) in `dtype`;  lse : (B, T, D) accumulate type.
// causal: key t' is visible to query t iff t' <= t.
//
// Packed sequences (cu_seqlens non-null, device int64 (B + 1,) offsets, flash-attention's varlen convention): the
// buffers are (1, total_T, D) holding B sequences back to back, sequence b at rows cu_seqlens[b] .. cu_seqlens[b + 1],
// each scanned (or reduced) alone; T is any bound on the longest sequence (max_seqlen, or total_T when unknown): the
// vector kernels read each length on the device and ignore T, the fallback scans run over a (B, T) grid of which
// the positions past a sequence's end do nothing. A state is (B, 3, D): one per sequence. The workspace sizes take
// the same (B, T, D). Offsets are trusted (the binding checks them where that is free).
#pragma once

#include "common/launch.h"

namespace attnfree {
namespace cuda {

size_t aft_simple_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, bool causal);
cudaError_t aft_simple_fwd(DType dtype, const void* q, const void* k, const void* v, void* y, void* lse, int64_t B,
                           int64_t T, int64_t D, bool causal, void* workspace, cudaStream_t stream,
                           const int64_t* cu_seqlens = nullptr);

size_t aft_simple_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, bool causal);
cudaError_t aft_simple_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v, const void* y,
                           const void* lse, void* dq, void* dk, void* dv, int64_t B, int64_t T, int64_t D, bool causal,
                           void* workspace, cudaStream_t stream, const int64_t* cu_seqlens = nullptr);

// Causal, with a recurrent state (format: aft_simple_state.h; accumulate type, (B, 3, D)).
//   forward:  initial_state may be null (empty state); final_state receives the state after the last key.
//   backward: final_query (B, 3, D) = (mF, g_numF, -g_denF), the final state's gradient as one more query after
//             the last row, or null; initial_state or null; key_sums (B, 2, D) receives the initial state's
//             (sum exp(m0 - lse) G, sum exp(m0 - lse) H) (zeros without an initial state).
//   T = 0 enqueues nothing (the binding handles it: the final state is the initial state).
size_t aft_simple_state_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D);
cudaError_t aft_simple_state_fwd(DType dtype, const void* q, const void* k, const void* v, const void* initial_state,
                                 void* y, void* lse, void* final_state, int64_t B, int64_t T, int64_t D,
                                 void* workspace, cudaStream_t stream, const int64_t* cu_seqlens = nullptr);
size_t aft_simple_state_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D);
cudaError_t aft_simple_state_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v,
                                 const void* y, const void* lse, const void* final_query, const void* initial_state,
                                 void* dq, void* dk, void* dv, void* key_sums, int64_t B, int64_t T, int64_t D,
                                 void* workspace, cudaStream_t stream, const int64_t* cu_seqlens = nullptr);

}  // namespace cuda
}  // namespace attnfree
