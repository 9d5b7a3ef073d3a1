// AVX2/FMA float32 AFT-full kernels: the forward over all heads (aft_full_tiled_vec_cpu.cpp) and the per-head
// backward on the (T, N = B * Dh) column layout of aft_full_tiled_cpu.cpp (aft_full_tiled_vec_bwd_cpu.cpp). Each
// returns false (and does nothing) when the CPU lacks AVX2/FMA.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace attnfree {
namespace cpu {

// The (T, N = B * Dh) column view of one head of a contiguous (B, T, D) tensor: column j = b * Dh + c is channel
// c of the head in batch entry b; base(b, t) is the offset of row t of batch entry b.
struct Cols {
  int64_t B, T, D, Dh;
  int64_t N() const { return B * Dh; }
  int64_t base(int64_t b, int64_t t) const { return (b * T + t) * D; }
};

// qa, ka, va: (B, T, D) float32 contiguous, wa (heads, T, T); sets y = sigmoid(q) * z and lse, both (B, T, D).
bool aft_full_fwd_avx2(const at::Tensor& qa, const at::Tensor& ka, const at::Tensor& va, const at::Tensor& wa,
                       bool causal, at::Tensor& y, at::Tensor& lse);
// dW: the head's (T, T) slice of the zero-filled dw.
bool aft_full_head_bwd_avx2(const float* w, const float* K, const float* V, const float* G, const float* Hm,
                            const float* L, float* dV, float* sPH, float* dW, int64_t T, int64_t N, bool causal,
                            const at::TensorOptions& opts);
// Non-causal backward of head hh with whole-sequence maxima, reading dy, q, k, v, y, lse (B, T, D) and wa
// (heads, T, T), all float32 contiguous, writing that head's channels of dq, dk, dv and its slice of dw (every
// entry). Returns false, having written nothing reliable, when the exactness guard would fire on more than a few
// entries (extreme logits): then the tile-pair kernel is the one to run.
bool aft_full_head_bwd_whole_avx2(int64_t hh, const at::Tensor& dya, const at::Tensor& qa, const at::Tensor& ka,
                                  const at::Tensor& va, const at::Tensor& wa, const at::Tensor& ya,
                                  const at::Tensor& lsea, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                                  at::Tensor& dw);

}  // namespace cpu
}  // namespace attnfree
