// CUDA implementations of the aft_simple ops (schemas: aft_simple_ops.cpp), packed sequences included. Thin binding:
// the checks of common/checks.h, contiguous inputs, outputs, workspace, current stream, launchers of aft_simple.h.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <limits>
#include <tuple>

#include "aft_simple/aft_simple.h"
#include "aft_simple/aft_simple_state.h"
#include "aft_simple/aft_simple_varlen.h"
#include "common/cuda_binding.h"

namespace {

using namespace attnfree::binding;
namespace st = attnfree::state;
namespace vl = attnfree::varlen;
using OptT = c10::optional<at::Tensor>;
using OptI = c10::optional<int64_t>;

// The launchers' (B, T) and offsets: the dense (B, T), or with packed sequences (N, a bound on the longest
// sequence) and the device offsets (aft_simple.h). Nothing is read back from the device.
struct Grid {
  int64_t B, T;
  const int64_t* cu;
};
inline Grid grid_of(const Qkv& in, const vl::Packed& p) {
  if (!p.on()) return {in.B, in.T, nullptr};
  return {p.n, p.t, p.cu.data_ptr<int64_t>()};
}

std::tuple<at::Tensor, at::Tensor> aft_simple_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                       bool causal, const OptT& cu_seqlens, OptI max_seqlen) {
  check_qkv_cuda(q, k, v);
  const vl::Packed p = vl::check(cu_seqlens, max_seqlen, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const Qkv in = contiguous_qkv(q, k, v);
  const Grid g = grid_of(in, p);
  at::Tensor y = empty_like_contiguous(in.q);
  at::Tensor lse = at::empty(in.q.sizes(), in.q.options().dtype(in.acc_type));
  if (in.q.numel() == 0) return {y, lse};
  run_launcher("aft_simple_fwd", attnfree::cuda::aft_simple_fwd_workspace_bytes(in.dtype, g.B, g.T, in.D, causal), in.q,
               [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::aft_simple_fwd(in.dtype, in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(),
                                                       y.data_ptr(), lse.data_ptr(), g.B, g.T, in.D, causal, ws, stream,
                                                       g.cu);
               });
  return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aft_simple_bwd_cuda(const at::Tensor& dy, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& v,
                                                                   const at::Tensor& y, const at::Tensor& lse,
                                                                   bool causal, const OptT& cu_seqlens,
                                                                   OptI max_seqlen) {
  check_qkv_cuda(q, k, v);
  const vl::Packed p = vl::check(cu_seqlens, max_seqlen, q);
  const c10::cuda::CUDAGuard guard(q.device());
  const Qkv in = contiguous_qkv(q, k, v);
  const Grid g = grid_of(in, p);
  const SavedOutputs sv = saved_outputs(dy, y, lse, q);
  at::Tensor dq = empty_like_contiguous(in.q), dk = empty_like_contiguous(in.q), dv = empty_like_contiguous(in.q);
  if (in.q.numel() == 0) return {dq, dk, dv};
  run_launcher("aft_simple_bwd", attnfree::cuda::aft_simple_bwd_workspace_bytes(in.dtype, g.B, g.T, in.D, causal), in.q,
               [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::aft_simple_bwd(in.dtype, sv.dy.data_ptr(), in.q.data_ptr(), in.k.data_ptr(),
                                                       in.v.data_ptr(), sv.y.data_ptr(), sv.lse.data_ptr(),
                                                       dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), g.B, g.T, in.D,
                                                       causal, ws, stream, g.cu);
               });
  return {dq, dk, dv};
}

// The number of states: B, or one per packed sequence.
inline int64_t n_states(const at::Tensor& q, const vl::Packed& p) { return p.on() ? p.n : q.size(0); }

// With a recurrent state (format and backward: aft_simple_state.h). Causal: the state launchers; non-causal: the
// plain kernels plus the state of all keys (ATen, per (b, c), or per sequence when packed).
std::tuple<at::Tensor, at::Tensor, at::Tensor> aft_simple_state_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                                         const at::Tensor& v, bool causal,
                                                                         const OptT& s0_opt, const OptT& cu_seqlens,
                                                                         OptI max_seqlen) {
  check_qkv_cuda(q, k, v);
  const vl::Packed p = vl::check(cu_seqlens, max_seqlen, q);
  const at::Tensor* s0 = st::opt_ptr(s0_opt);
  vl::check_initial_state(s0, q, causal, p);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = attnfree::acc_dtype(q.scalar_type());
  if (!causal) {
    auto [y, lse] = aft_simple_fwd_cuda(q, k, v, false, cu_seqlens, max_seqlen);
    if (p.on()) return {y, lse, vl::global_final_state(k.to(acc), v.to(acc), vl::token_sequence(p, q.size(1)), p.n)};
    return {y, lse, st::global_final_state(k.to(acc), v.to(acc))};
  }
  const Qkv in = contiguous_qkv(q, k, v);
  const Grid g = grid_of(in, p);
  const int64_t ns = n_states(q, p);
  at::Tensor y = empty_like_contiguous(in.q);
  at::Tensor lse = at::empty(in.q.sizes(), in.q.options().dtype(in.acc_type));
  const at::Tensor s0c = s0 ? s0->contiguous() : at::Tensor();
  at::Tensor sF;
  if (g.T == 0 || in.T == 0 || ns * in.D == 0) {
    sF = s0 ? s0c.clone() : at::zeros({ns, 3, in.D}, lse.options());
    if (!s0) sF.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
    return {y, lse, sF};
  }
  sF = at::empty({ns, 3, in.D}, lse.options());
  run_launcher("aft_simple_state_fwd", attnfree::cuda::aft_simple_state_fwd_workspace_bytes(in.dtype, g.B, g.T, in.D),
               in.q, [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::aft_simple_state_fwd(
                     in.dtype, in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(), s0 ? s0c.data_ptr() : nullptr,
                     y.data_ptr(), lse.data_ptr(), sF.data_ptr(), g.B, g.T, in.D, ws, stream, g.cu);
               });
  return {y, lse, sF};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_simple_state_bwd_cuda(
    const at::Tensor& dy, const OptT& gF_opt, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const OptT& s0_opt, const at::Tensor& y, const at::Tensor& lse, const at::Tensor& final_state, bool causal,
    const OptT& cu_seqlens, OptI max_seqlen) {
  check_qkv_cuda(q, k, v);
  const vl::Packed p = vl::check(cu_seqlens, max_seqlen, q);
  const at::Tensor* s0 = st::opt_ptr(s0_opt);
  vl::check_initial_state(s0, q, causal, p);
  vl::check_final_state("final_state", final_state, q, p);
  const at::Tensor* gFp = st::opt_ptr(gF_opt);
  if (gFp) vl::check_final_state("dfinal_state", *gFp, q, p);
  const c10::cuda::CUDAGuard guard(q.device());
  const auto acc = attnfree::acc_dtype(q.scalar_type());
  const int64_t T = q.size(1), D = q.size(2), ns = n_states(q, p);
  const at::Tensor sF = final_state.to(acc).contiguous();
  const at::Tensor gF = gFp ? gFp->to(acc).contiguous() : at::Tensor();
  const at::Tensor seq = p.on() ? vl::token_sequence(p, T) : at::Tensor();
  at::Tensor dq, dk, dv;
  at::Tensor g0 = at::zeros({ns, 3, D}, q.options().dtype(acc));
  if (!causal) {
    std::tie(dq, dk, dv) = aft_simple_bwd_cuda(dy, q, k, v, y, lse, false, cu_seqlens, max_seqlen);
    if (gFp && T > 0) {
      auto [dk2, dv2] = p.on() ? vl::global_final_state_grad(k.to(acc), v.to(acc), sF, gF, seq)
                               : st::global_final_state_grad(k.to(acc), v.to(acc), sF, gF);
      dk = (dk.to(acc) + dk2).to(q.scalar_type());
      dv = (dv.to(acc) + dv2).to(q.scalar_type());
    }
  } else {
    const Qkv in = contiguous_qkv(q, k, v);
    const Grid g = grid_of(in, p);
    const SavedOutputs sv = saved_outputs(dy, y, lse, q);
    dq = empty_like_contiguous(in.q);
    dk = empty_like_contiguous(in.q);
    dv = empty_like_contiguous(in.q);
    const at::Tensor ps = gFp ? st::pseudo_row(sF, gF) : at::Tensor();
    const at::Tensor s0c = s0 ? s0->contiguous() : at::Tensor();
    at::Tensor ks = at::zeros({ns, 2, D}, q.options().dtype(acc));
    if (T > 0 && g.T > 0 && ns * D > 0) {
      run_launcher("aft_simple_state_bwd", attnfree::cuda::aft_simple_state_bwd_workspace_bytes(in.dtype, g.B, g.T, D),
                   in.q, [&](void* ws, cudaStream_t stream) {
                     return attnfree::cuda::aft_simple_state_bwd(
                         in.dtype, sv.dy.data_ptr(), in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(), sv.y.data_ptr(),
                         sv.lse.data_ptr(), gFp ? ps.data_ptr() : nullptr, s0 ? s0c.data_ptr() : nullptr, dq.data_ptr(),
                         dk.data_ptr(), dv.data_ptr(), ks.data_ptr(), g.B, g.T, D, ws, stream, g.cu);
                   });
    }
    if (s0) g0 = T > 0 ? st::initial_state_grad(ks, s0c) : (gFp ? gF.clone() : g0);
  }
  if (gFp && T > 0)
    dk = p.on() ? vl::route_max_residual(dk, k.to(acc), sF, gF, s0, &g0, seq)
                : st::route_max_residual(dk, k.to(acc), sF, gF, s0, &g0);
  if (p.on() && s0 && T > 0) {  // an empty sequence passes its state through: d initial_state = d final_state
    const at::Tensor empty = (p.cu.slice(0, 1) == p.cu.slice(0, 0, -1)).view({ns, 1, 1});
    g0 = at::where(empty, gFp ? gF : at::zeros_like(g0), g0);
  }
  return {dq, dk, dv, g0};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
  m.impl("aft_simple_fwd", &aft_simple_fwd_cuda);
  m.impl("aft_simple_bwd", &aft_simple_bwd_cuda);
  m.impl("aft_simple_state_fwd", &aft_simple_state_fwd_cuda);
  m.impl("aft_simple_state_bwd", &aft_simple_state_bwd_cuda);
}
