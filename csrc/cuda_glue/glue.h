// Helpers shared by the CUDA glue files (csrc/cuda_glue/*.cpp): dtype mapping for the launchers, saved-tensor
// preparation and launch-error reporting. Input checks come from attnfree/checks.h, so the CUDA ops raise the
// same errors, with the same messages, as the CPU ops and the Python path.
#pragma once

#include <ATen/ATen.h>
#include <cuda_runtime_api.h>

#include "attnfree/checks.h"
#include "../cuda/launchers.h"

namespace attnfree {
namespace glue {

// The launchers' dtype tag of an already checked tensor (attnfree::check_tensor accepts only these four).
inline attnfree_cuda::DType launcher_dtype(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kHalf: return attnfree_cuda::DType::Float16;
    case at::kBFloat16: return attnfree_cuda::DType::BFloat16;
    case at::kDouble: return attnfree_cuda::DType::Float64;
    default: return attnfree_cuda::DType::Float32;
  }
}

inline void check_cuda(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

// A saved or gradient tensor (dy, y, lse, ...) checked against ref, in the dtype the kernel reads, contiguous
// (no copy when it already is).
inline at::Tensor saved(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref,
                        at::ScalarType dtype) {
  check_like(name, t, ref_name, ref);
  return t.to(dtype).contiguous();
}

// A workspace of `bytes` bytes from the caching allocator on ref's device.
inline at::Tensor workspace(size_t bytes, const at::Tensor& ref) {
  return at::empty({static_cast<int64_t>(bytes)}, ref.options().dtype(at::kByte));
}

inline void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace glue
}  // namespace attnfree
