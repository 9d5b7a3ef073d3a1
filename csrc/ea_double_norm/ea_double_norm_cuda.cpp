// CUDA implementations of ea_double_norm_fwd / ea_double_norm_bwd (schemas: ea_double_norm_ops.cpp).
// logits (..., N, S) are viewed as (M, N, S) (made contiguous once). Outputs: out (logits' dtype and shape),
// lse (..., 1, S) and rowsum (..., N, 1), both float32 (float64 for float64 logits). The forward takes the cluster
// kernel (one read of the logits) with ATTNFREE_CLUSTERS=1 on sm_90 (common/env.h, common/cluster.h).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "common/cuda_binding.h"
#include "common/env.h"
#include "ea_double_norm/ea_double_norm.h"

namespace {

using namespace attnfree::binding;

std::vector<int64_t> with_dim(at::IntArrayRef sizes, int64_t dim_from_end, int64_t value) {
  std::vector<int64_t> s(sizes.begin(), sizes.end());
  s[s.size() - dim_from_end] = value;
  return s;
}

// Checked logits made contiguous, with their (M, N, S) view and dtypes.
struct Logits {
  at::Tensor l;
  int64_t M, N, S;
  attnfree::DType dtype;
  at::ScalarType acc_type;
};

Logits contiguous_logits(const at::Tensor& logits) {
  const at::Tensor lc = logits.contiguous();
  const int64_t S = lc.size(-1), N = lc.size(-2);
  const int64_t M = (N * S) > 0 ? lc.numel() / (N * S) : 0;
  return {lc, M, N, S, dtype_of(lc), attnfree::acc_dtype(lc.scalar_type())};
}

void check_logits_cuda(const at::Tensor& logits) {
  attnfree::check_logits(logits);
  check_cuda("logits", logits);
}

at::Tensor aux_like(const at::Tensor& t, const at::Tensor& ref, at::IntArrayRef shape, at::ScalarType dt,
                    const char* name) {
  attnfree::check_tensor(name, t);
  attnfree::check_same_device("logits", ref, name, t);
  TORCH_CHECK_VALUE(t.sizes() == shape, name, " must have shape ", attnfree::py_shape(shape), ", got ",
                    attnfree::py_shape(t.sizes()));
  return t.to(dt).contiguous();
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> ea_double_norm_fwd_cuda(const at::Tensor& logits, double eps) {
  check_logits_cuda(logits);
  attnfree::clusters_requested();  // ATTNFREE_CLUSTERS validated here; the launcher picks the cluster kernel
  const c10::cuda::CUDAGuard guard(logits.device());
  const Logits in = contiguous_logits(logits);
  at::Tensor out = empty_like_contiguous(in.l);
  at::Tensor lse = at::empty(with_dim(in.l.sizes(), 2, 1), in.l.options().dtype(in.acc_type));
  at::Tensor rowsum = at::empty(with_dim(in.l.sizes(), 1, 1), in.l.options().dtype(in.acc_type));
  if (in.l.numel() == 0) {  // same as the python path: zeros everywhere (lse of an empty N would be -inf)
    lse.zero_();
    rowsum.zero_();
    return {out, lse, rowsum};
  }
  run_launcher("ea_double_norm_fwd", attnfree::cuda::ea_double_norm_fwd_workspace_bytes(in.dtype, in.M, in.N, in.S),
               in.l, [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::ea_double_norm_fwd(in.dtype, in.l.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                                           rowsum.data_ptr(), in.M, in.N, in.S, eps, ws, stream);
               });
  return {out, lse, rowsum};
}

at::Tensor ea_double_norm_bwd_cuda(const at::Tensor& dout, const at::Tensor& logits, const at::Tensor& out,
                                   const at::Tensor& lse, const at::Tensor& rowsum) {
  check_logits_cuda(logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  const Logits in = contiguous_logits(logits);
  const at::Tensor dc = aux_like(dout, in.l, in.l.sizes(), in.l.scalar_type(), "dout");
  const at::Tensor oc = aux_like(out, in.l, in.l.sizes(), in.l.scalar_type(), "out");
  const at::Tensor lsec = aux_like(lse, in.l, with_dim(in.l.sizes(), 2, 1), in.acc_type, "lse");
  const at::Tensor rc = aux_like(rowsum, in.l, with_dim(in.l.sizes(), 1, 1), in.acc_type, "rowsum");
  at::Tensor dl = empty_like_contiguous(in.l);
  run_launcher("ea_double_norm_bwd", attnfree::cuda::ea_double_norm_bwd_workspace_bytes(in.dtype, in.M, in.N, in.S),
               in.l, [&](void* ws, cudaStream_t stream) {
                 return attnfree::cuda::ea_double_norm_bwd(in.dtype, dc.data_ptr(), in.l.data_ptr(), oc.data_ptr(),
                                                           lsec.data_ptr(), rc.data_ptr(), dl.data_ptr(), in.M, in.N,
                                                           in.S, ws, stream);
               });
  return dl;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
  m.impl("ea_double_norm_fwd", &ea_double_norm_fwd_cuda);
  m.impl("ea_double_norm_bwd", &ea_double_norm_bwd_cuda);
}
