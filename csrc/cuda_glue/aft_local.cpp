// CUDA registration of aft_local_fwd / aft_local_bwd (schemas defined in csrc/ops.cpp).
// Thin glue: checks (attnfree/checks.h: the messages and error types of the Python path), .contiguous() once,
// outputs (dw in w's shape), workspace, current stream, launcher from csrc/cuda/aft_local.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "glue.h"

namespace {

using namespace attnfree::glue;
using attnfree::acc_dtype;

std::tuple<at::Tensor, at::Tensor> aft_local_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const at::Tensor& w, int64_t window,
                                                      bool causal) {
    attnfree::check_qkv(q, k, v);
    check_cuda("q", q);
    const int64_t heads = attnfree::check_w_local(w, q, window);
    const c10::cuda::CUDAGuard guard(q.device());
    const auto dt = launcher_dtype(q);
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor wc = w.contiguous();
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
    at::Tensor y = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor lse = at::empty(qc.sizes(), qc.options().dtype(acc_dtype(q.scalar_type())));
    const size_t bytes = attnfree_cuda::aft_local_fwd_workspace_bytes(dt, B, T, D, window, causal);
    at::Tensor ws = workspace(bytes, qc);
    check_launch(attnfree_cuda::aft_local_fwd(dt, qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), wc.data_ptr(), heads,
                                              y.data_ptr(), lse.data_ptr(), B, T, D, window, causal, ws.data_ptr(),
                                              c10::cuda::getCurrentCUDAStream()),
                 "aft_local_fwd");
    return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_local_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& y, const at::Tensor& lse, int64_t window, bool causal) {
    attnfree::check_qkv(q, k, v);
    check_cuda("q", q);
    const int64_t heads = attnfree::check_w_local(w, q, window);
    const c10::cuda::CUDAGuard guard(q.device());
    const auto dt = launcher_dtype(q);
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor wc = w.contiguous();
    const at::Tensor dyc = saved("dy", dy, "q", q, q.scalar_type());
    const at::Tensor yc = saved("y", y, "q", q, q.scalar_type());
    const at::Tensor lc = saved("lse", lse, "q", q, acc_dtype(q.scalar_type()));
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
    at::Tensor dq = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor dk = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor dv = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor dw = at::zeros({heads, T, T}, qc.options());  // entries outside the band stay 0
    const size_t bytes = attnfree_cuda::aft_local_bwd_workspace_bytes(dt, B, T, D, window, causal);
    at::Tensor ws = workspace(bytes, qc);
    check_launch(attnfree_cuda::aft_local_bwd(dt, dyc.data_ptr(), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                                              wc.data_ptr(), heads, yc.data_ptr(), lc.data_ptr(), dq.data_ptr(),
                                              dk.data_ptr(), dv.data_ptr(), dw.data_ptr(), B, T, D, window, causal,
                                              ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
                 "aft_local_bwd");
    return {dq, dk, dv, dw.view(w.sizes())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
    m.impl("aft_local_fwd", &aft_local_fwd_cuda);
    m.impl("aft_local_bwd", &aft_local_bwd_cuda);
}
