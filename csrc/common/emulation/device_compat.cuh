// Kernel-side spellings that mean the same under nvcc and under the CPU emulation harness (README.md beside this
// file). Include it from the kernels' common header (e.g. csrc/common/cuda_common.cuh):
//     #include "common/emulation/device_compat.cuh"      (with -I csrc)
//
//   attnfree::gptr<T>          global-memory pointer: T* under nvcc, a bounds-checked, counted pointer under the
//                              harness (kernel parameters and device helpers that take global pointers use it)
//   attnfree::gptr_cast<U>(p)  reinterpret a global pointer (vector loads: gptr_cast<const float4>(p))
//   ATTNFREE_LAUNCH(kernel, grid, block[, smem[, stream]])(args...)
//                              kernel<<<grid, block, smem, stream>>>(args...) (only needed where a file must compile
//                              with plain g++, without the cu2cpp rewrite; the build of the harness rewrites <<<>>>)
//   ATTNFREE_DYNAMIC_SHARED(T, name, align)
//                              extern __shared__ __align__(align) T name[];
//   ATTNFREE_STATIC_SHARED(T, name, dims)
//                              __shared__ T name dims;  (dims e.g. [16][33]; under the harness a static object
//                              registered for NaN poisoning before every block)
// The project's kernels use these three macros and therefore compile unchanged under g++ without the cu2cpp
// rewrite (tests/emulation builds them with rewrite=False).
#pragma once

#if defined(ATTNFREE_EMULATION)

#include <attnfree_emu/gptr.h>
#include <attnfree_emu/launch.h>

namespace attnfree {
using ::attnfree_emu::gptr;
using ::attnfree_emu::gptr_cast;
}  // namespace attnfree

#define ATTNFREE_LAUNCH(kernel, ...) \
  ::attnfree_emu::launch_at(ATTNFREE_EMU_KERNEL(kernel), #kernel, __FILE__, __LINE__, __PRETTY_FUNCTION__, __VA_ARGS__)
#define ATTNFREE_DYNAMIC_SHARED(T, name, align) T* const name = ::attnfree_emu::dynamic_smem<T>()
#define ATTNFREE_STATIC_SHARED(T, name, dims)                     \
  static T name dims;                                             \
  [[maybe_unused]] static const bool attnfree_emu_sh_##name =     \
      (::attnfree_emu::static_smem(&name, sizeof(name)), true)

#else  // nvcc

namespace attnfree {
template <class T>
using gptr = T*;
template <class U, class T>
__host__ __device__ __forceinline__ U* gptr_cast(T* p) {
  return reinterpret_cast<U*>(p);
}
}  // namespace attnfree

#define ATTNFREE_LAUNCH(kernel, ...) kernel<<<__VA_ARGS__>>>
#define ATTNFREE_DYNAMIC_SHARED(T, name, align) extern __shared__ __align__(align) T name[]
#define ATTNFREE_STATIC_SHARED(T, name, dims) __shared__ T name dims

#endif
