// The float32 GEMMs of the tiled CPU kernels (aft_local_tiled_cpu.cpp, aft_full_tiled_vec_cpu.cpp), with a per-column
// scale:
//   C[i, j] = (accumulate ? C[i, j] : 0) + scale[j] * sum_k A[i * rsa + k * csa] * kscale[k] * B[k * ldb + j]
// for i < M, j < N, k < K (K <= 64: one key tile); scale or kscale null: 1. A is addressed through both strides, so A
// and its transpose are both plain operands. AVX-512 where the CPU has it (twice the lanes of the AVX2 GEMM the BLAS
// runs on such CPUs); returns false, doing nothing, where it does not (the caller then uses at::mm). Every element of C
// is computed by one sequence of FMAs (k ascending) fixed by the shapes (and the band), never by the thread count:
// bit-identical results across thread counts.
#pragma once

#include <cstdint>

namespace attnfree {
namespace cpu {

bool tile_gemm_scaled(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* B,
                      int64_t ldb, const float* kscale, const float* scale, float* C, int64_t ldc, bool accumulate);

// The same product where row i of A equals eL[i] at every k < kb[i] and eR[i] at every k >= ke[i] (a band:
// keys outside a row's band all carry one weight): those keys are summed once per column (prefix / suffix sums of
// B) instead of through the FMAs.
struct TileBand {
  const int64_t* kb;
  const int64_t* ke;
  const float* eL;
  const float* eR;
};
bool tile_gemm_banded(int64_t M, int64_t N, int64_t K, const float* A, int64_t rsa, int64_t csa, const float* B,
                      int64_t ldb, const float* scale, float* C, int64_t ldc, bool accumulate, const TileBand& band);

// C = A B for any K (A: M x K, rows lda apart; B: K x N, rows ldb apart), as tile_gemm_scaled over 64-key slices
// accumulated into C in k order: the same fixed sequence of FMAs per element whatever the thread count. Returns
// false, doing nothing, where the tile GEMM does not run (the caller then uses at::mm).
bool tile_gemm(int64_t M, int64_t N, int64_t K, const float* A, int64_t lda, const float* B, int64_t ldb, float* C,
               int64_t ldc);

// Whether tile_gemm_scaled, tile_gemm_banded and tile_gemm run: the CPU has AVX-512 and cpu_avx512_allowed()
// (common/env.h; otherwise the tiles take at::mm). Read on every call; callers ask once per op.
bool tile_gemm_available();

}  // namespace cpu
}  // namespace attnfree
