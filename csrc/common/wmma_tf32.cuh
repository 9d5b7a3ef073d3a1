// 3xTF32 on wmma fragments, shared by the tensor-core kernels (AFT-full, AFT-local): an fp32 operand x is split
// into x = big + small with both parts tf32, and big*big + big*small + small*big keeps ~fp32 accuracy (small*small
// is below fp32 rounding). Plain CUDA C++ (no torch headers); compiles unchanged under the emulation harness.
#pragma once

#include <mma.h>

namespace attnfree {
namespace cuda {

// tf32 wmma exists from sm_80 on (and in the host pass, which the emulation harness runs).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800

// big <- tf32(x), small <- tf32(x - big), element by element (a fragment's elements are the same positions in
// both fragments of one type).
template <typename F>
__device__ __forceinline__ void split_tf32(F& big, F& small) {
#pragma unroll
  for (int i = 0; i < big.num_elements; ++i) {
    const float x = big.x[i];
    const float hi = nvcuda::wmma::__float_to_tf32(x);
    big.x[i] = hi;
    small.x[i] = nvcuda::wmma::__float_to_tf32(x - hi);
  }
}

// c += (ab + as)(bb + bs) without the small*small term; the small products first, so they are not absorbed by
// the rounding of the large one.
template <typename Acc, typename FA, typename FB>
__device__ __forceinline__ void mma_3xtf32(Acc& c, const FA& ab, const FA& as, const FB& bb, const FB& bs) {
  nvcuda::wmma::mma_sync(c, as, bb, c);
  nvcuda::wmma::mma_sync(c, ab, bs, c);
  nvcuda::wmma::mma_sync(c, ab, bb, c);
}

#endif

}  // namespace cuda
}  // namespace attnfree
