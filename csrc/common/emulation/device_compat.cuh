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
//   ATTNFREE_LAUNCH_CLUSTER(kernel, cluster, grid, block[, smem[, stream]])(args...)
//                              launch with thread-block clusters of `cluster` CTAs (dim3; the grid a multiple of it
//                              per dimension; sm_90): cudaLaunchKernelEx with cudaLaunchAttributeClusterDimension
//                              under nvcc. The dynamic shared memory opt-in stays the launcher's job; errors
//                              through cudaGetLastError(). `kernel` names one function (parenthesise a template-id).
//   attnfree::cluster_ctarank(), cluster_num_ctas()
//                              rank of this CTA in its cluster (x + y*cx + z*cx*cy), CTAs per cluster
//   attnfree::cluster_sync()   every thread of every CTA of the cluster arrives and waits (release / acquire:
//                              shared-memory writes before it are visible to reads after it, across the cluster)
//   attnfree::cluster_map_shared(p, rank)
//                              p points into this CTA's dynamic shared memory: the address of the same offset in
//                              CTA `rank`'s (distributed shared memory; plain loads / stores through it)
//                              Below sm_90 the four __trap() (launchers never select a cluster kernel there);
//                              outside a cluster launch a CTA is a cluster of one (rank 0, 1 CTA, a block barrier).
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

inline unsigned cluster_ctarank() { return ::attnfree_emu::rt::cluster_ctarank(); }
inline unsigned cluster_num_ctas() { return ::attnfree_emu::rt::cluster_num_ctas(); }
inline void cluster_sync(const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  ::attnfree_emu::rt::cluster_sync(file, line);
}
template <class T>
inline T* cluster_map_shared(T* p, unsigned rank, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  return static_cast<T*>(::attnfree_emu::rt::cluster_map_shared(p, rank, file, line));
}
}  // namespace attnfree

#define ATTNFREE_LAUNCH(kernel, ...) \
  ::attnfree_emu::launch_at(ATTNFREE_EMU_KERNEL(kernel), #kernel, __FILE__, __LINE__, __PRETTY_FUNCTION__, __VA_ARGS__)
#define ATTNFREE_DYNAMIC_SHARED(T, name, align) T* const name = ::attnfree_emu::dynamic_smem<T>()
#define ATTNFREE_LAUNCH_CLUSTER(kernel, ...)                                                                    \
  ::attnfree_emu::launch_cluster_at(kernel, #kernel, __FILE__, __LINE__, __PRETTY_FUNCTION__, __VA_ARGS__)
#define ATTNFREE_STATIC_SHARED(T, name, dims)                                                                   \
  static T name dims;                                                                                         \
  [[maybe_unused]] static const bool attnfree_emu_sh_##name =                                                 \
      (::attnfree_emu::static_smem(&name, sizeof(name)), true);                                               \
  [[maybe_unused]] const bool attnfree_emu_use_##name = ::attnfree_emu::static_smem_use(#name, __FILE__, __LINE__)

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

__device__ __forceinline__ unsigned cluster_ctarank() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
#else
  __trap();
  return 0;
#endif
}
__device__ __forceinline__ unsigned cluster_num_ctas() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned n;
  asm volatile("mov.u32 %0, %%cluster_nctarank;\n" : "=r"(n));
  return n;
#else
  __trap();
  return 1;
#endif
}
__device__ __forceinline__ void cluster_sync() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("barrier.cluster.arrive.release;\n" ::: "memory");
  asm volatile("barrier.cluster.wait.acquire;\n" ::: "memory");
#else
  __trap();
#endif
}
// mapa on a generic address gives a generic address: plain C++ loads / stores reach the other CTA's memory.
template <class T>
__device__ __forceinline__ T* cluster_map_shared(T* p, unsigned rank) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  unsigned long long out;
  asm volatile("mapa.u64 %0, %1, %2;\n" : "=l"(out) : "l"(reinterpret_cast<unsigned long long>(p)), "r"(rank));
  return reinterpret_cast<T*>(out);
#else
  (void)rank;
  __trap();
  return p;
#endif
}

namespace detail {
// The cluster launch: the arguments converted to the kernel's parameter types, as cudaLaunchKernelEx does.
template <class... P>
class ClusterLaunch {
 public:
  ClusterLaunch(void (*kernel)(P...), dim3 cluster, dim3 grid, dim3 block, size_t smem, cudaStream_t stream)
      : kernel_(kernel), cluster_(cluster), grid_(grid), block_(block), smem_(smem), stream_(stream) {}
  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with a wrong number of arguments");
    cudaLaunchAttribute attr[1];
    attr[0].id = cudaLaunchAttributeClusterDimension;
    attr[0].val.clusterDim.x = cluster_.x;
    attr[0].val.clusterDim.y = cluster_.y;
    attr[0].val.clusterDim.z = cluster_.z;
    cudaLaunchConfig_t cfg = {};
    cfg.gridDim = grid_;
    cfg.blockDim = block_;
    cfg.dynamicSmemBytes = smem_;
    cfg.stream = stream_;
    cfg.attrs = attr;
    cfg.numAttrs = 1;
    (void)cudaLaunchKernelEx(&cfg, kernel_, static_cast<A&&>(a)...);  // the error stays for cudaGetLastError()
  }

 private:
  void (*kernel_)(P...);
  dim3 cluster_, grid_, block_;
  size_t smem_;
  cudaStream_t stream_;
};
template <class... P>
ClusterLaunch<P...> launch_cluster(void (*kernel)(P...), dim3 cluster, dim3 grid, dim3 block, size_t smem = 0,
                                   cudaStream_t stream = 0) {
  return ClusterLaunch<P...>(kernel, cluster, grid, block, smem, stream);
}
}  // namespace detail
}  // namespace attnfree

#define ATTNFREE_LAUNCH(kernel, ...) kernel<<<__VA_ARGS__>>>
#define ATTNFREE_LAUNCH_CLUSTER(kernel, ...) ::attnfree::detail::launch_cluster(kernel, __VA_ARGS__)
#define ATTNFREE_DYNAMIC_SHARED(T, name, align) extern __shared__ __align__(align) T name[]
#define ATTNFREE_STATIC_SHARED(T, name, dims) __shared__ T name dims

#endif
