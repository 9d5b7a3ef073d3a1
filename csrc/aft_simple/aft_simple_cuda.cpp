// CUDA implementations of aft_simple_fwd / aft_simple_bwd (schemas: aft_simple_ops.cpp). Thin binding: the
// checks of common/checks.h, contiguous inputs, outputs, workspace, current stream, launchers of aft_simple.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "aft_simple/aft_simple.h"
#include "aft_simple/aft_simple_state.h"
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

namespace st = attnfree::state;

// With a recurrent state (format and backward: aft_simple_state.h). Causal: the state launchers; non-causal: the
// plain kernels plus the state of all keys (ATen, per (b, c)).
std::tuple<at::Tensor, at::Tensor, at::Tensor> aft_simple_state_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                         const at::Tensor& v, bool causal,
                                                                         const c10::optional<at::Tensor>& s0_opt) {
  check_qkv_cuda(q, k, v);
  const at::Tensor* s0 = st::opt_ptr(s0_opt);
  st::check_initial_state(s0, q, causal);
  const c10::cuda::CUDAGuard guard(q.device());
  if (!causal) {
    auto [y, lse] = aft_simple_fwd_cuda(q, k, v, false);
    const auto acc = attnfree::acc_dtype(q.scalar_type());
    return {y, lse, st::global_final_state(k.to(acc), v.to(acc))};
  }
  const Qkv in = contiguous_qkv(q, k, v);
  at::Tensor y = empty_like_contiguous(in.q);
  at::Tensor lse = at::empty(in.q.sizes(), in.q.options().dtype(in.acc_type));
  const at::Tensor s0c = s0 ? s0->contiguous() : at::Tensor();
  at::Tensor sF;
  if (in.T == 0 || in.B * in.D == 0) {
    sF = s0 ? s0c.clone() : at::zeros({in.B, 3, in.D}, lse.options());
    if (!s0) sF.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
    return {y, lse, sF};
  }
  sF = at::empty({in.B, 3, in.D}, lse.options());
  run_launcher("aft_simple_state_fwd", attnfree::cuda::aft_simple_state_fwd_workspace_bytes(in.dtype, in.B, in.T, in.D),
               in.q, [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::aft_simple_state_fwd(
                     in.dtype, in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(), s0 ? s0c.data_ptr() : nullptr,
                     y.data_ptr(), lse.data_ptr(), sF.data_ptr(), in.B, in.T, in.D, ws, stream);
               });
  return {y, lse, sF};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_simple_state_bwd_cuda(
    const at::Tensor& dy, const c10::optional<at::Tensor>& gF_opt, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const c10::optional<at::Tensor>& s0_opt, const at::Tensor& y, const at::Tensor& lse,
    const at::Tensor& final_state, bool causal) {
  check_qkv_cuda(q, k, v);
  const at::Tensor* s0 = st::opt_ptr(s0_opt);
  st::check_initial_state(s0, q, causal);
  st::check_final_state("final_state", final_state, q);
  const at::Tensor* gFp = st::opt_ptr(gF_opt);
  if (gFp) st::check_final_state("dfinal_state", *gFp, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = attnfree::acc_dtype(q.scalar_type());
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
  const at::Tensor sF = final_state.to(acc).contiguous();
  const at::Tensor gF = gFp ? gFp->to(acc).contiguous() : at::Tensor();
  at::Tensor dq, dk, dv;
  at::Tensor g0 = at::zeros({B, 3, D}, q.options().dtype(acc));
  if (!causal) {
    std::tie(dq, dk, dv) = aft_simple_bwd_cuda(dy, q, k, v, y, lse, false);
    if (gFp && T > 0) {
      auto [dk2, dv2] = st::global_final_state_grad(k.to(acc), v.to(acc), sF, gF);
      dk = (dk.to(acc) + dk2).to(q.scalar_type());
      dv = (dv.to(acc) + dv2).to(q.scalar_type());
    }
  } else {
    const Qkv in = contiguous_qkv(q, k, v);
    const SavedOutputs sv = saved_outputs(dy, y, lse, q);
    dq = empty_like_contiguous(in.q);
    dk = empty_like_contiguous(in.q);
    dv = empty_like_contiguous(in.q);
    const at::Tensor ps = gFp ? st::pseudo_row(sF, gF) : at::Tensor();
    const at::Tensor s0c = s0 ? s0->contiguous() : at::Tensor();
    at::Tensor ks = at::zeros({B, 2, D}, q.options().dtype(acc));
    if (T > 0 && B * D > 0) {
      run_launcher("aft_simple_state_bwd", attnfree::cuda::aft_simple_state_bwd_workspace_bytes(in.dtype, B, T, D),
                   in.q, [&](void* ws, cudaStream_t stream) {
                     return attnfree::cuda::aft_simple_state_bwd(
                         in.dtype, sv.dy.data_ptr(), in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(), sv.y.data_ptr(),
                         sv.lse.data_ptr(), gFp ? ps.data_ptr() : nullptr, s0 ? s0c.data_ptr() : nullptr, dq.data_ptr(),
                         dk.data_ptr(), dv.data_ptr(), ks.data_ptr(), B, T, D, ws, stream);
                   });
    }
    if (s0) g0 = T > 0 ? st::initial_state_grad(ks, s0c) : (gFp ? gF.clone() : g0);
  }
  if (gFp && T > 0) dk = st::route_max_residual(dk, k.to(acc), sF, gF, s0, &g0);
  return {dq, dk, dv, g0};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
  m.impl("aft_simple_fwd", &aft_simple_fwd_cuda);
  m.impl("aft_simple_bwd", &aft_simple_bwd_cuda);
  m.impl("aft_simple_state_fwd", &aft_simple_state_fwd_cuda);
  m.impl("aft_simple_state_bwd", &aft_simple_state_bwd_cuda);
}
