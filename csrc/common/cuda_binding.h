// Torch-side helpers of the CUDA bindings (csrc/<op>/<op>_cuda.cpp): the launcher dtype of a tensor, checked and
// contiguous inputs, outputs, workspaces from the caching allocator and launch-error reporting. The input checks
// themselves come from common/checks.h, so the CUDA ops raise the errors of the CPU ops and the Python path.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <utility>

#include "common/checks.h"
#include "common/dtype.h"

namespace attnfree {
namespace binding {

// The launcher tag of a float tensor (common/checks.h admits only these four dtypes).
inline DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::Float32;
    case at::kHalf:
      return DType::Float16;
    case at::kBFloat16:
      return DType::BFloat16;
    case at::kDouble:
      return DType::Float64;
    default:
      break;
  }
  TORCH_CHECK_TYPE(false, "expected float16, bfloat16, float32 or float64, got ", py_dtype(t.scalar_type()));
  return DType::Float32;
}

inline void check_cuda(const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

// q, k, v of an AFT op as the kernels read them: checked (common/checks.h, then "on CUDA"), contiguous.
struct Qkv {
  at::Tensor q, k, v;
  int64_t B, T, D;
  DType dtype;
  at::ScalarType scalar_type, acc_type;  // the outputs' dtype; lse's dtype
};

inline void check_qkv_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_qkv(q, k, v);
  check_cuda("q", q);
}

// Call after the op's own checks and under the device guard.
inline Qkv contiguous_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  return {q.contiguous(), k.contiguous(),  v.contiguous(),
          q.size(0),      q.size(1),       q.size(2),
          dtype_of(q),    q.scalar_type(), acc_dtype(q.scalar_type())};
}

// A saved or gradient tensor (dy, y, lse, ...) checked against ref, in the dtype the kernel reads, contiguous
// (no copy when it already is).
inline at::Tensor saved(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref,
                        at::ScalarType dtype) {
  check_like(name, t, ref_name, ref);
  return t.to(dtype).contiguous();
}

// The saved tensors of an AFT backward: dy and y in q's dtype, lse in the accumulate type.
struct SavedOutputs {
  at::Tensor dy, y, lse;
};
inline SavedOutputs saved_outputs(const at::Tensor& dy, const at::Tensor& y, const at::Tensor& lse,
                                  const at::Tensor& q) {
  return {saved("dy", dy, "q", q, q.scalar_type()), saved("y", y, "q", q, q.scalar_type()),
          saved("lse", lse, "q", q, acc_dtype(q.scalar_type()))};
}

// An uninitialised contiguous tensor shaped and typed like t (on t's device).
inline at::Tensor empty_like_contiguous(const at::Tensor& t) { return at::empty_like(t, at::MemoryFormat::Contiguous); }

// Runs one launcher of the common/launch.h convention: `bytes` of workspace from the caching allocator on ref's
// device, the current stream, and a launch error turned into a RuntimeError naming the op.
// launch(void* workspace, cudaStream_t stream) -> cudaError_t.
template <typename Launch>
void run_launcher(const char* op, size_t bytes, const at::Tensor& ref, Launch&& launch) {
  const at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, ref.options().dtype(at::kByte));
  const cudaError_t err =
      std::forward<Launch>(launch)(bytes ? ws.data_ptr() : nullptr, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

}  // namespace binding
}  // namespace attnfree
