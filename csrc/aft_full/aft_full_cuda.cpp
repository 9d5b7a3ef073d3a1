// CUDA implementations of aft_full_fwd / aft_full_bwd / aft_full_lowrank_fwd / aft_full_lowrank_bwd (schemas:
// aft_full_ops.cpp). Thin binding: the checks of common/checks.h, contiguous inputs, outputs, workspace, current
// stream, launchers of aft_full.h.
//
// dtypes: q, k, v and w share one dtype (as in the Python path). The factors u, vb of the low-rank bias may be
// q's dtype or its accumulate type (float32; float64 for float64 q) and are used as is; any other float dtype is
// converted once to the accumulate type. dw (du, dvb) come back with w's (u's, vb's) dtype and shape. lse is
// float32 (float64 for float64 inputs).
// ATTNFREE_AFT_FULL_KERNEL=exact (common/env.h) selects the per-element kernels instead of the tensor-core ones.
// ATTNFREE_CLUSTERS=1 (validated here, read by the launchers: common/cluster.h): the dense bias's tensor-core forward
// and backward take their thread-block cluster kernels on sm_90.
// float32 forward: torch.get_float32_matmul_precision() "highest" -> 3xTF32, "high" / "medium" -> plain TF32.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "aft_full/aft_full.h"
#include "common/cuda_binding.h"
#include "common/env.h"

namespace {

using namespace attnfree::binding;

bool exact_kernels() { return attnfree::aft_full_kernel() == attnfree::AftFullKernel::Exact; }

// float32 inputs: 3xTF32 products unless torch.get_float32_matmul_precision() allows TF32 ("high", "medium").
bool tf32x3() { return at::globalContext().float32MatmulPrecision() == at::Float32MatmulPrecision::HIGHEST; }

// q, k, v and the dense bias w (common/checks.h), on CUDA. Returns heads.
int64_t check_full_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w) {
  check_qkv_cuda(q, k, v);
  return attnfree::check_w_full(w, q);
}

// q, k, v on CUDA and the factors u, vb: (T, rank) or (heads, T, rank), one shape and dtype, D % heads == 0.
// Returns heads.
int64_t check_lowrank_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& u,
                           const at::Tensor& vb) {
  check_qkv_cuda(q, k, v);
  attnfree::check_tensor("u", u);
  attnfree::check_tensor("vb", vb);
  attnfree::check_same_device("q", q, "u", u);
  attnfree::check_same_device("q", q, "vb", vb);
  const int64_t T = q.size(1), D = q.size(2);
  int64_t heads = -1;
  if (u.dim() == 2 && u.size(0) == T) heads = 1;
  if (u.dim() == 3 && u.size(1) == T) heads = u.size(0);
  TORCH_CHECK_VALUE(heads >= 1, "u must have shape (T, rank) or (heads, T, rank) with T=", T, ", got ",
                    attnfree::py_shape(u.sizes()));
  attnfree::check_same_shape("u", u, "vb", vb);
  TORCH_CHECK_TYPE(vb.scalar_type() == u.scalar_type(), "u and vb must share one dtype, got ",
                   attnfree::py_dtype(u.scalar_type()), " and ", attnfree::py_dtype(vb.scalar_type()));
  TORCH_CHECK_VALUE(D % heads == 0, "u has ", heads, " heads, which must divide D=", D);
  return heads;
}

// The bias/factor tensor as the kernel reads it: q's dtype or the accumulate type kept, anything else converted.
at::Tensor bias_for_kernel(const at::Tensor& w, at::ScalarType qdt) {
  const at::ScalarType s = w.scalar_type();
  if (s == qdt || s == attnfree::acc_dtype(qdt)) return w.contiguous();
  return w.to(attnfree::acc_dtype(qdt)).contiguous();
}

// A gradient computed in the kernel's bias dtype, returned in the dtype of the tensor it belongs to.
at::Tensor in_dtype_of(const at::Tensor& grad, const at::Tensor& like) {
  return grad.scalar_type() == like.scalar_type() ? grad : grad.to(like.scalar_type());
}

std::tuple<at::Tensor, at::Tensor> aft_full_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& w, bool causal) {
  const int64_t heads = check_full_cuda(q, k, v, w);
  const c10::cuda::CUDAGuard guard(q.device());
  const Qkv in = contiguous_qkv(q, k, v);
  const at::Tensor wc = bias_for_kernel(w, in.scalar_type);
  const bool exact = exact_kernels();
  attnfree::clusters_requested();
  at::Tensor y = at::empty(in.q.sizes(), in.q.options());
  at::Tensor lse = at::empty(in.q.sizes(), in.q.options().dtype(in.acc_type));
  run_launcher("aft_full_fwd",
               attnfree::cuda::aft_full_fwd_workspace_bytes(in.dtype, in.B, in.T, in.D, heads, causal, exact), in.q,
               [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::aft_full_fwd(in.dtype, dtype_of(wc), in.q.data_ptr(), in.k.data_ptr(),
                                                     in.v.data_ptr(), wc.data_ptr(), y.data_ptr(), lse.data_ptr(), in.B,
                                                     in.T, in.D, heads, causal, exact, tf32x3(), ws, stream);
               });
  return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_full_bwd_cuda(const at::Tensor& dy, const at::Tensor& q,
                                                                             const at::Tensor& k, const at::Tensor& v,
                                                                             const at::Tensor& w, const at::Tensor& y,
                                                                             const at::Tensor& lse, bool causal) {
  const int64_t heads = check_full_cuda(q, k, v, w);
  const c10::cuda::CUDAGuard guard(q.device());
  const Qkv in = contiguous_qkv(q, k, v);
  const at::Tensor wc = bias_for_kernel(w, in.scalar_type);
  const SavedOutputs sv = saved_outputs(dy, y, lse, q);
  const bool exact = exact_kernels();
  attnfree::clusters_requested();
  at::Tensor dq = at::empty(in.q.sizes(), in.q.options());
  at::Tensor dk = at::empty(in.q.sizes(), in.q.options());
  at::Tensor dv = at::empty(in.q.sizes(), in.q.options());
  at::Tensor dw = at::empty(wc.sizes(), wc.options());
  run_launcher("aft_full_bwd",
               attnfree::cuda::aft_full_bwd_workspace_bytes(in.dtype, in.B, in.T, in.D, heads, causal, exact), in.q,
               [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::aft_full_bwd(in.dtype, dtype_of(wc), sv.dy.data_ptr(), in.q.data_ptr(),
                                                     in.k.data_ptr(), in.v.data_ptr(), wc.data_ptr(), sv.y.data_ptr(),
                                                     sv.lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
                                                     dw.data_ptr(), in.B, in.T, in.D, heads, causal, exact, ws, stream);
               });
  return {dq, dk, dv, in_dtype_of(dw, w)};
}

std::tuple<at::Tensor, at::Tensor> aft_full_lowrank_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& u,
                                                             const at::Tensor& vb, bool causal) {
  const int64_t heads = check_lowrank_cuda(q, k, v, u, vb);
  const c10::cuda::CUDAGuard guard(q.device());
  const Qkv in = contiguous_qkv(q, k, v);
  const at::Tensor uc = bias_for_kernel(u, in.scalar_type), vbc = bias_for_kernel(vb, in.scalar_type);
  const int64_t rank = u.size(-1);
  const bool exact = exact_kernels();
  at::Tensor y = at::empty(in.q.sizes(), in.q.options());
  at::Tensor lse = at::empty(in.q.sizes(), in.q.options().dtype(in.acc_type));
  run_launcher(
      "aft_full_lowrank_fwd",
      attnfree::cuda::aft_full_lowrank_fwd_workspace_bytes(in.dtype, in.B, in.T, in.D, heads, rank, causal, exact),
      in.q, [&](void* ws, cudaStream_t stream) {
        return attnfree::cuda::aft_full_lowrank_fwd(
            in.dtype, dtype_of(uc), in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(), uc.data_ptr(), vbc.data_ptr(),
            y.data_ptr(), lse.data_ptr(), in.B, in.T, in.D, heads, rank, causal, exact, tf32x3(), ws, stream);
      });
  return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_full_lowrank_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& u,
    const at::Tensor& vb, const at::Tensor& y, const at::Tensor& lse, bool causal) {
  const int64_t heads = check_lowrank_cuda(q, k, v, u, vb);
  const c10::cuda::CUDAGuard guard(q.device());
  const Qkv in = contiguous_qkv(q, k, v);
  const at::Tensor uc = bias_for_kernel(u, in.scalar_type), vbc = bias_for_kernel(vb, in.scalar_type);
  const SavedOutputs sv = saved_outputs(dy, y, lse, q);
  const int64_t rank = u.size(-1);
  const bool exact = exact_kernels();
  at::Tensor dq = at::empty(in.q.sizes(), in.q.options());
  at::Tensor dk = at::empty(in.q.sizes(), in.q.options());
  at::Tensor dv = at::empty(in.q.sizes(), in.q.options());
  at::Tensor du = at::empty(uc.sizes(), uc.options());
  at::Tensor dvb = at::empty(vbc.sizes(), vbc.options());
  run_launcher(
      "aft_full_lowrank_bwd",
      attnfree::cuda::aft_full_lowrank_bwd_workspace_bytes(in.dtype, in.B, in.T, in.D, heads, rank, causal, exact),
      in.q, [&](void* ws, cudaStream_t stream) {
        return attnfree::cuda::aft_full_lowrank_bwd(
            in.dtype, dtype_of(uc), sv.dy.data_ptr(), in.q.data_ptr(), in.k.data_ptr(), in.v.data_ptr(), uc.data_ptr(),
            vbc.data_ptr(), sv.y.data_ptr(), sv.lse.data_ptr(), dq.data_ptr(), dk.data_ptr(), dv.data_ptr(),
            du.data_ptr(), dvb.data_ptr(), in.B, in.T, in.D, heads, rank, causal, exact, ws, stream);
      });
  return {dq, dk, dv, in_dtype_of(du, u), in_dtype_of(dvb, vb)};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
  m.impl("aft_full_fwd", &aft_full_fwd_cuda);
  m.impl("aft_full_bwd", &aft_full_bwd_cuda);
  m.impl("aft_full_lowrank_fwd", &aft_full_lowrank_fwd_cuda);
  m.impl("aft_full_lowrank_bwd", &aft_full_lowrank_bwd_cuda);
}
