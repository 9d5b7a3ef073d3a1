// CUDA registration of aft_simple_fwd / aft_simple_bwd (schemas defined in csrc/ops.cpp).
// Thin glue: checks (attnfree/checks.h: the messages and error types of the Python path), .contiguous() once, outputs,
// workspace from the caching allocator, current stream, launcher from csrc/cuda/aft_simple.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "glue.h"

namespace {

using namespace attnfree::glue;
using attnfree::acc_dtype;

std::tuple<at::Tensor, at::Tensor> aft_simple_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                       const at::Tensor& v, bool causal) {
    attnfree::check_qkv(q, k, v);
    check_cuda("q", q);
    const c10::cuda::CUDAGuard guard(q.device());
    const auto dt = launcher_dtype(q);
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
    at::Tensor y = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor lse = at::empty(qc.sizes(), qc.options().dtype(acc_dtype(q.scalar_type())));
    const size_t bytes = attnfree_cuda::aft_simple_fwd_workspace_bytes(dt, B, T, D, causal);
    at::Tensor ws = workspace(bytes, qc);
    check_launch(attnfree_cuda::aft_simple_fwd(dt, qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), y.data_ptr(),
                                               lse.data_ptr(), B, T, D, causal, ws.data_ptr(),
                                               c10::cuda::getCurrentCUDAStream()),
                 "aft_simple_fwd");
    return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> aft_simple_bwd_cuda(const at::Tensor& dy, const at::Tensor& q,
                                                                   const at::Tensor& k, const at::Tensor& v,
                                                                   const at::Tensor& y, const at::Tensor& lse,
                                                                   bool causal) {
    attnfree::check_qkv(q, k, v);
    check_cuda("q", q);
    const c10::cuda::CUDAGuard guard(q.device());
    const auto dt = launcher_dtype(q);
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor dyc = saved("dy", dy, "q", q, q.scalar_type());
    const at::Tensor yc = saved("y", y, "q", q, q.scalar_type());
    const at::Tensor lc = saved("lse", lse, "q", q, acc_dtype(q.scalar_type()));
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
    at::Tensor dq = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor dk = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor dv = at::empty_like(qc, at::MemoryFormat::Contiguous);
    const size_t bytes = attnfree_cuda::aft_simple_bwd_workspace_bytes(dt, B, T, D, causal);
    at::Tensor ws = workspace(bytes, qc);
    check_launch(attnfree_cuda::aft_simple_bwd(dt, dyc.data_ptr(), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                                               yc.data_ptr(), lc.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                                               dv.data_ptr(), B, T, D, causal, ws.data_ptr(),
                                               c10::cuda::getCurrentCUDAStream()),
                 "aft_simple_bwd");
    return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
    m.impl("aft_simple_fwd", &aft_simple_fwd_cuda);
    m.impl("aft_simple_bwd", &aft_simple_bwd_cuda);
}
