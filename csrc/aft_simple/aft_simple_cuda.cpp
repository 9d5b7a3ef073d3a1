// CUDA implementations of aft_simple_fwd / aft_simple_bwd (schemas: aft_simple_ops.cpp). Thin binding: the
// checks of common/checks.h, contiguous inputs, outputs, workspace, current stream, launchers of aft_simple.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "aft_simple/aft_simple.h"
#include "common/cuda_binding.h"

namespace {

using namespace attnfree::binding;

std::tuple<at::Tensor, at::Tensor> aft_simple_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       bool causal) {
  check_qkv_cuda(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const Qkv in = contiguous_qkv(q, k, v);
  at::Tensor y = empty_like_contiguous(in.q);
  at::Tensor lse = at::empty(in.q.sizes(), in.q.options().dtype(in.acc_type));
  run_launcher("aft_simple_fwd", attnfree::cuda::aft_simple_fwd_workspace_bytes(in.dtype, in.B, in.T, in.D, causal),
               in.q, [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::aft_simple_fwd(in.dtype, in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(),
                                                       y.data_ptr(), lse.data_ptr(), in.B, in.T, in.D, causal, ws,
                                                       stream);
               });
  return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aft_simple_bwd_cuda(const at::Tensor& dy, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& v,
                                                                   const at::Tensor& y, const at::Tensor& lse,
                                                                   bool causal) {
  check_qkv_cuda(q, k, v);
  const c10::cuda::CUDAGuard guard(q.device());
  const Qkv in = contiguous_qkv(q, k, v);
  const SavedOutputs sv = saved_outputs(dy, y, lse, q);
  at::Tensor dq = empty_like_contiguous(in.q), dk = empty_like_contiguous(in.q), dv = empty_like_contiguous(in.q);
  run_launcher("aft_simple_bwd", attnfree::cuda::aft_simple_bwd_workspace_bytes(in.dtype, in.B, in.T, in.D, causal),
               in.q, [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::aft_simple_bwd(in.dtype, sv.dy.data_ptr(), in.q.data_ptr(), in.k.data_ptr(),
                                                       in.v.data_ptr(), sv.y.data_ptr(), sv.lse.data_ptr(),
                                                       dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), in.B, in.T, in.D,
                                                       causal, ws, stream);
               });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
  m.impl("aft_simple_fwd", &aft_simple_fwd_cuda);
  m.impl("aft_simple_bwd", &aft_simple_bwd_cuda);
}
