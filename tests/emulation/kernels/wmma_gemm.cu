// wmma GEMM self-test kernels for the CPU emulation harness: C (M x N, fp32) = A (M x K) @ B (K x N).
// One warp per 16 x 16 output tile. A is row-major; B row-major (K x N) or column-major (stored as N x K).
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <mma.h>
#include <cstdint>

#include "common/emulation/device_compat.cuh"

using attnfree::gptr;
using namespace nvcuda;

namespace {

template <class Prec> struct Storage { using type = Prec; };
template <> struct Storage<wmma::precision::tf32> { using type = float; };

// fragments loaded straight from global memory (gptr overloads of load/store_matrix_sync)
template <class Prec, int KS, bool CONVERT, class LB>
__global__ void gemm_global_kernel(gptr<const typename Storage<Prec>::type> A,
                                   gptr<const typename Storage<Prec>::type> B, gptr<float> C, int M, int N, int K) {
  const int warp = threadIdx.x / 32;
  const int tile = blockIdx.x * (blockDim.x / 32) + warp;
  const int tn_count = N / 16;
  const int tm = tile / tn_count, tn = tile % tn_count;
  if (tm * 16 >= M) return;  // whole warps only
  wmma::fragment<wmma::accumulator, 16, 16, KS, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k0 = 0; k0 < K; k0 += KS) {
    wmma::fragment<wmma::matrix_a, 16, 16, KS, Prec, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, KS, Prec, LB> b;
    wmma::load_matrix_sync(a, A + int64_t(tm) * 16 * K + k0, K);
    if (std::is_same<LB, wmma::row_major>::value)
      wmma::load_matrix_sync(b, B + int64_t(k0) * N + tn * 16, N);
    else
      wmma::load_matrix_sync(b, B + int64_t(tn) * 16 * K + k0, K);
    if (CONVERT) {
      for (int i = 0; i < a.num_elements; ++i) a.x[i] = wmma::__float_to_tf32(a.x[i]);
      for (int i = 0; i < b.num_elements; ++i) b.x[i] = wmma::__float_to_tf32(b.x[i]);
    }
    wmma::mma_sync(acc, a, b, acc);
  }
  wmma::store_matrix_sync(C + int64_t(tm) * 16 * N + tn * 16, acc, N, wmma::mem_row_major);
}

// bf16 through shared memory: each warp stages its A strip (16 x K) and B strip (K x 16) in dynamic shared memory
__global__ void gemm_smem_bf16_kernel(gptr<const __nv_bfloat16> A, gptr<const __nv_bfloat16> B, gptr<float> C,
                                      int M, int N, int K) {
  extern __shared__ __align__(128) unsigned char smem[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int nwarps = blockDim.x / 32;
  const int tile = blockIdx.x * nwarps + warp;
  const int tn_count = N / 16;
  const int tm = tile / tn_count, tn = tile % tn_count;
  const bool active = tm * 16 < M;
  const int LDA = K + 16, LDB = 16 + 16;  // padded rows (multiples of 16 bytes)
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem) + warp * (16 * LDA + K * LDB);
  __nv_bfloat16* Bs = As + 16 * LDA;
  if (active) {
    for (int e = lane; e < 16 * K; e += 32) As[(e / K) * LDA + e % K] = A[int64_t(tm * 16 + e / K) * K + e % K];
    for (int e = lane; e < K * 16; e += 32) Bs[(e / 16) * LDB + e % 16] = B[int64_t(e / 16) * N + tn * 16 + e % 16];
  }
  __syncthreads();  // (a block barrier on purpose: every thread reaches it, active or not)
  if (!active) return;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  for (int k0 = 0; k0 < K; k0 += 16) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
    wmma::load_matrix_sync(a, As + k0, LDA);
    wmma::load_matrix_sync(b, Bs + k0 * LDB, LDB);
    wmma::mma_sync(acc, a, b, acc);
  }
  wmma::store_matrix_sync(C + int64_t(tm) * 16 * N + tn * 16, acc, N, wmma::mem_row_major);
}

// double 8x8x4, one warp per 8 x 8 tile
__global__ void gemm_f64_kernel(gptr<const double> A, gptr<const double> B, gptr<double> C, int M, int N, int K) {
  const int warp = threadIdx.x / 32;
  const int tile = blockIdx.x * (blockDim.x / 32) + warp;
  const int tn_count = N / 8;
  const int tm = tile / tn_count, tn = tile % tn_count;
  if (tm * 8 >= M) return;
  wmma::fragment<wmma::accumulator, 8, 8, 4, double> acc;
  wmma::fill_fragment(acc, 0.0);
  for (int k0 = 0; k0 < K; k0 += 4) {
    wmma::fragment<wmma::matrix_a, 8, 8, 4, double, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 8, 8, 4, double, wmma::row_major> b;
    wmma::load_matrix_sync(a, A + int64_t(tm) * 8 * K + k0, K);
    wmma::load_matrix_sync(b, B + int64_t(k0) * N + tn * 8, N);
    wmma::mma_sync(acc, a, b, acc);
  }
  wmma::store_matrix_sync(C + int64_t(tm) * 8 * N + tn * 8, acc, N, wmma::mem_row_major);
}

// store_matrix_sync to shared memory, then every lane reads a whole row: needs __syncwarp() in between.
__global__ void store_then_read_kernel(gptr<const __half> A, gptr<const __half> B, gptr<float> out, int sync) {
  __shared__ __align__(32) float st[16 * 16];
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::fragment<wmma::matrix_b, 16, 16, 16, __half, wmma::row_major> b;
  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc;
  wmma::fill_fragment(acc, 0.0f);
  wmma::load_matrix_sync(a, A, 16);
  wmma::load_matrix_sync(b, B, 16);
  wmma::mma_sync(acc, a, b, acc);
  wmma::store_matrix_sync(st, acc, 16, wmma::mem_row_major);
  if (sync) __syncwarp();
  const int lane = threadIdx.x;
  for (int j = 0; j < 8; ++j) out[lane * 8 + j] = st[lane * 8 + j];
}

__global__ void misaligned_wmma_kernel(gptr<const __half> A, gptr<float> C) {
  wmma::fragment<wmma::matrix_a, 16, 16, 16, __half, wmma::row_major> a;
  wmma::load_matrix_sync(a, A + 8, 16);  // 16-byte offset: not 32-byte aligned
  C[threadIdx.x] = __half2float(a.x[0]);
}

template <class Prec, int KS, bool CONVERT, class LB>
int launch_global(const void* A, const void* B, float* C, int64_t M, int64_t N, int64_t K) {
  using S = typename Storage<Prec>::type;
  const int64_t tiles = (M / 16) * (N / 16);
  gemm_global_kernel<Prec, KS, CONVERT, LB><<<static_cast<unsigned>((tiles + 3) / 4), 128>>>(
      static_cast<const S*>(A), static_cast<const S*>(B), C, static_cast<int>(M), static_cast<int>(N),
      static_cast<int>(K));
  return cudaGetLastError();
}

}  // namespace

extern "C" {
// kind: 0 fp16, 1 bf16, 2 tf32 with __float_to_tf32, 3 tf32 unconverted; b_col: B column-major (N x K)
int emu_wmma_gemm(int kind, int b_col, const void* A, const void* B, float* C, int64_t M, int64_t N, int64_t K) {
  using RM = wmma::row_major;
  using CM = wmma::col_major;
  switch (kind * 2 + (b_col ? 1 : 0)) {
    case 0: return launch_global<__half, 16, false, RM>(A, B, C, M, N, K);
    case 1: return launch_global<__half, 16, false, CM>(A, B, C, M, N, K);
    case 2: return launch_global<__nv_bfloat16, 16, false, RM>(A, B, C, M, N, K);
    case 3: return launch_global<__nv_bfloat16, 16, false, CM>(A, B, C, M, N, K);
    case 4: return launch_global<wmma::precision::tf32, 8, true, RM>(A, B, C, M, N, K);
    case 5: return launch_global<wmma::precision::tf32, 8, true, CM>(A, B, C, M, N, K);
    case 6: return launch_global<wmma::precision::tf32, 8, false, RM>(A, B, C, M, N, K);
    case 7: return launch_global<wmma::precision::tf32, 8, false, CM>(A, B, C, M, N, K);
  }
  return cudaErrorInvalidValue;
}
int emu_wmma_gemm_smem_bf16(const void* A, const void* B, float* C, int64_t M, int64_t N, int64_t K) {
  const int warps = 4;
  const size_t smem = static_cast<size_t>(warps) * (16 * (K + 16) + K * 32) * sizeof(__nv_bfloat16);
  if (smem > 48 * 1024) {
    cudaError_t e = cudaFuncSetAttribute(gemm_smem_bf16_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                         static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  const int64_t tiles = (M / 16) * (N / 16);
  gemm_smem_bf16_kernel<<<static_cast<unsigned>((tiles + warps - 1) / warps), 32 * warps, smem>>>(
      static_cast<const __nv_bfloat16*>(A), static_cast<const __nv_bfloat16*>(B), C, static_cast<int>(M),
      static_cast<int>(N), static_cast<int>(K));
  return cudaGetLastError();
}
int emu_wmma_gemm_f64(const double* A, const double* B, double* C, int64_t M, int64_t N, int64_t K) {
  const int64_t tiles = (M / 8) * (N / 8);
  gemm_f64_kernel<<<static_cast<unsigned>((tiles + 1) / 2), 64>>>(A, B, C, static_cast<int>(M), static_cast<int>(N),
                                                                 static_cast<int>(K));
  return cudaGetLastError();
}
int emu_wmma_store_then_read(const void* A, const void* B, float* out, int sync) {
  store_then_read_kernel<<<1, 32>>>(static_cast<const __half*>(A), static_cast<const __half*>(B), out, sync);
  return cudaGetLastError();
}
int emu_wmma_misaligned(const void* A, float* C) {
  misaligned_wmma_kernel<<<1, 32>>>(static_cast<const __half*>(A), C);
  return cudaGetLastError();
}
}
