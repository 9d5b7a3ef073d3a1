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
//   attnfree::async_copy16(dst, src, valid), async_commit(), async_wait<N>()
//                              16 bytes global -> shared without a register round trip (cp.async.cg on sm_80+,
//                              zero fill where !valid; src must be 16-byte aligned), close the group of copies
//                              issued so far, wait until at most N groups are in flight. Under the harness the copy
//                              happens at once (its reads counted through gptr) and commit / wait do nothing: a
//                              kernel that overwrites a buffer still being read shows wrong results there too.
// The project's kernels use these three macros and therefore compile unchanged under g++ without the cu2cpp
// rewrite (tests/emulation builds them with rewrite=False).
#pragma once

#if defined(ATTNFREE_EMULATION)

#include <attnfree_emu/gptr.h>
#include <attnfree_emu/launch.h>

#include <cstring>

namespace attnfree {
using ::attnfree_emu::gptr;
using ::attnfree_emu::gptr_cast;

template <class T>
inline void async_copy16(void* dst, gptr<const T> src, bool valid) {
  static_assert(16 % sizeof(T) == 0, "async_copy16: element size must divide 16");
  T* d = static_cast<T*>(dst);
  if (!valid) {
    std::memset(dst, 0, 16);
    return;
  }
  for (int i = 0; i < int(16 / sizeof(T)); ++i) d[i] = src[i];
}
inline void async_commit() {}
template <int N>
inline void async_wait() {}
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

template <class T>
__device__ __forceinline__ void async_copy16(void* dst, const T* src, bool valid) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(dst));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(src), "r"(valid ? 16 : 0) : "memory");
#else
  const uint4 z = make_uint4(0u, 0u, 0u, 0u);
  *static_cast<uint4*>(dst) = valid ? *reinterpret_cast<const uint4*>(src) : z;
#endif
}
__device__ __forceinline__ void async_commit() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}
template <int N>
__device__ __forceinline__ void async_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}
}  // namespace attnfree

#define ATTNFREE_LAUNCH(kernel, ...) kernel<<<__VA_ARGS__>>>
#define ATTNFREE_DYNAMIC_SHARED(T, name, align) extern __shared__ __align__(align) T name[]
#define ATTNFREE_STATIC_SHARED(T, name, dims) __shared__ T name dims

#endif
