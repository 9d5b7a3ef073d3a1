// CUDA implementations of aft_local_fwd / aft_local_bwd (schemas: aft_local_ops.cpp). Thin binding: the checks
// of common/checks.h, contiguous inputs, outputs (dw in w's shape), workspace, current stream, launchers of
// aft_local.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "aft_local/aft_local.h"
#include "aft_local/aft_local_checks.h"
#include "common/cuda_binding.h"

namespace {

using namespace attnfree::binding;

std::tuple<at::Tensor, at::Tensor> aft_local_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                      const at::Tensor& w, int64_t window, bool causal, bool banded) {
  check_qkv_cuda(q, k, v);
  const int64_t heads = attnfree::check_w_local_layout(w, q, window, banded);
  const c10::cuda::CUDAGuard guard(q.device());
  const Qkv in = contiguous_qkv(q, k, v);
  const at::Tensor wc = w.contiguous();
  const int64_t W = std::min(window, in.T);  // window >= T is the full band (no overflow of window-based sizes)
  at::Tensor y = empty_like_contiguous(in.q);
  at::Tensor lse = at::empty(in.q.sizes(), in.q.options().dtype(in.acc_type));
  run_launcher("aft_local_fwd",
               attnfree::cuda::aft_local_fwd_workspace_bytes(in.dtype, in.B, in.T, in.D, heads, W, causal), in.q,
               [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::aft_local_fwd(in.dtype, in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(),
                                                      wc.data_ptr(), y.data_ptr(), lse.data_ptr(), in.B, in.T, in.D,
                                                      heads, W, causal, banded, ws, stream);
               });
  return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_local_bwd_cuda(const at::Tensor& dy, const at::Tensor& q,
                                                                              const at::Tensor& k, const at::Tensor& v,
                                                                              const at::Tensor& w, const at::Tensor& y,
                                                                              const at::Tensor& lse, int64_t window,
                                                                              bool causal, bool banded) {
  check_qkv_cuda(q, k, v);
  const int64_t heads = attnfree::check_w_local_layout(w, q, window, banded);
  const c10::cuda::CUDAGuard guard(q.device());
  const Qkv in = contiguous_qkv(q, k, v);
  const at::Tensor wc = w.contiguous();
  const int64_t W = std::min(window, in.T);  // window >= T is the full band (no overflow of window-based sizes)
  const SavedOutputs sv = saved_outputs(dy, y, lse, q);
  at::Tensor dq = empty_like_contiguous(in.q), dk = empty_like_contiguous(in.q), dv = empty_like_contiguous(in.q);
  // in w's layout (banded: (heads, T, 2W-1), no T x T tensor); entries outside the band stay 0
  at::Tensor dw = at::zeros({heads, in.T, banded ? attnfree::local_band_width(in.T, window) : in.T}, in.q.options());
  run_launcher("aft_local_bwd",
               attnfree::cuda::aft_local_bwd_workspace_bytes(in.dtype, in.B, in.T, in.D, heads, W, causal), in.q,
               [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::aft_local_bwd(
                     in.dtype, sv.dy.data_ptr(), in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(), wc.data_ptr(),
                     sv.y.data_ptr(), sv.lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), dw.data_ptr(),
                     in.B, in.T, in.D, heads, W, causal, banded, ws, stream);
               });
  return {dq, dk, dv, dw.view(w.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
  m.impl("aft_local_fwd", &aft_local_fwd_cuda);
  m.impl("aft_local_bwd", &aft_local_bwd_cuda);
}
