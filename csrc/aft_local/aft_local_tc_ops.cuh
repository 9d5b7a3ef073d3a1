// Operand helpers shared by the tensor-core forward (aft_local_tc.cu) and backward (aft_local_tc_bwd.cu) of
// AFT-local. Plain CUDA C++ (no torch headers).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstddef>

#include "common/emulation/device_compat.cuh"
#include "common/launch.h"

namespace attnfree {
namespace cuda {
namespace {  // internal linkage, as common/cuda_common.cuh

// An operand x into its plane(s): fp32 operands (3xTF32) as they are; bf16 operands as hi + lo pairs, the rounding
// error x - bf16(x) going to the lo plane `lo` elements further on (three products per sum keep ~16 bits).
__device__ __forceinline__ void put_op(float* p, size_t /*lo*/, float x) { *p = x; }
__device__ __forceinline__ void put_op(__nv_bfloat16* p, size_t lo, float x) {
  const __nv_bfloat16 hi = __float2bfloat16_rn(x);
  p[0] = hi;
  p[lo] = __float2bfloat16_rn(x - __bfloat162float(hi));
}
// The value an operand holds back (hi + lo for bf16).
__device__ __forceinline__ float get_op(const float* p, size_t /*lo*/) { return *p; }
__device__ __forceinline__ float get_op(const __nv_bfloat16* p, size_t lo) {
  return __bfloat162float(p[0]) + __bfloat162float(p[lo]);
}

// run(E{}) with E the element type of a float32 / float16 / bfloat16 dtype (the launchers' generic lambda).
template <typename Run>
inline cudaError_t tc_dtype_dispatch(DType dtype, Run&& run) {
  switch (dtype) {
    case DType::Float32:
      return run(float{});
    case DType::Float16:
      return run(__half{});
    case DType::BFloat16:
      return run(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace
}  // namespace cuda
}  // namespace attnfree
