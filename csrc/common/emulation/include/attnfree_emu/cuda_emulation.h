// attnfree_emu: the CPU emulation of the CUDA device environment. Force-included into every translation unit of
// an emulation build (g++ -include attnfree_emu/cuda_emulation.h), as nvcc implicitly includes cuda_runtime.h;
// also reached through the shims cuda_runtime.h / mma.h / device_launch_parameters.h. See ../../README.md.
#pragma once
#ifndef ATTNFREE_EMULATION
#define ATTNFREE_EMULATION 1
#endif
#define ATTNFREE_EMU_ARCH 900  // the modelled device: sm_90 (H200); __CUDA_ARCH__ stays undefined (host compile)

// 1. Standard headers first: the CUDA keyword macros below (__noinline__, __restrict__, __shared__) must not be
//    seen by them (libstdc++ spells __attribute__((__noinline__))).
#include <algorithm>
#include <array>
#include <atomic>
#include <cassert>
#include <cfloat>
#include <climits>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <ctime>
#include <functional>
#include <initializer_list>
#include <limits>
#include <math.h>
#include <memory>
#include <new>
#include <numeric>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

// 2. The CUDA toolkit's host-side headers: types (dim3, float4, cudaError_t, ...), the runtime API declarations,
//    the fp16/bf16 host types and conversions. (crt/host_defines.h defines __host__/__device__/... as nothing
//    when __CUDACC__ is not defined.)
#include <vector_types.h>
#include <vector_functions.h>
#include <driver_types.h>
#include <cuda_runtime_api.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <math_constants.h>

// 3. CUDA keywords.
#undef __host__
#undef __device__
#undef __global__
#undef __shared__
#undef __constant__
#undef __managed__
#undef __forceinline__
#undef __noinline__
#undef __launch_bounds__
#undef __grid_constant__
#undef __restrict__
#define __host__
#define __device__
#define __global__
#define __constant__
#define __managed__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __grid_constant__
#define __restrict__
// Static shared memory: one static object per declaration (blocks run one at a time), all of them in one ELF
// section so that the runtime can poison the whole section with NaN (0xFF bytes) before every block.
// `extern __shared__ T name[];` (dynamic shared memory) is rewritten by tools/cu2cpp.py.
#define __shared__ __attribute__((section("attnfree_emu_shared"))) static

#ifndef __align__
#define __align__(n) __attribute__((aligned(n)))
#endif

// 4. The device environment and launches.
#include <attnfree_emu/runtime.h>
#include <attnfree_emu/gptr.h>
#include <attnfree_emu/device.h>
#include <attnfree_emu/launch.h>

// 5. The C++ layer of the runtime API (templates of the real cuda_runtime.h) over the C functions.
template <class T>
inline cudaError_t cudaFuncSetAttribute(T* entry, cudaFuncAttribute attr, int value) {
  return ::cudaFuncSetAttribute(reinterpret_cast<const void*>(entry), attr, value);
}
template <class T>
inline cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attr, T* entry) {
  return ::cudaFuncGetAttributes(attr, reinterpret_cast<const void*>(entry));
}
template <class T>
inline cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* numBlocks, T func, int blockSize,
                                                                 size_t dynamicSMemSize) {
  return ::cudaOccupancyMaxActiveBlocksPerMultiprocessor(numBlocks, reinterpret_cast<const void*>(func), blockSize,
                                                         dynamicSMemSize);
}
template <class T>
inline cudaError_t cudaMalloc(T** devPtr, size_t size) {
  return ::cudaMalloc(reinterpret_cast<void**>(devPtr), size);
}
template <class T>
inline cudaError_t cudaMemcpyToSymbol(const T& symbol, const void* src, size_t count, size_t offset = 0,
                                      cudaMemcpyKind kind = cudaMemcpyHostToDevice) {
  (void)kind;
  std::memcpy(reinterpret_cast<char*>(const_cast<T*>(&symbol)) + offset, src, count);
  return cudaSuccess;
}
template <class T>
inline cudaError_t cudaMemcpyToSymbolAsync(const T& symbol, const void* src, size_t count, size_t offset = 0,
                                           cudaMemcpyKind kind = cudaMemcpyHostToDevice, cudaStream_t = 0) {
  return cudaMemcpyToSymbol(symbol, src, count, offset, kind);
}
template <class T>
inline cudaError_t cudaMemcpyFromSymbol(void* dst, const T& symbol, size_t count, size_t offset = 0,
                                        cudaMemcpyKind kind = cudaMemcpyDeviceToHost) {
  (void)kind;
  std::memcpy(dst, reinterpret_cast<const char*>(&symbol) + offset, count);
  return cudaSuccess;
}
