// CUDA registration of ea_double_norm_fwd / ea_double_norm_bwd (schemas defined in csrc/ops.cpp).
// logits (..., N, S) are viewed as (M, N, S) (made contiguous once). Outputs: out (logits' dtype and shape),
// lse (..., 1, S) and rowsum (..., N, 1), both float32 (float64 for float64 logits).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>
#include <vector>

#include "glue.h"

namespace {

using namespace attnfree::glue;
using attnfree::acc_dtype;

void check_logits_cuda(const at::Tensor& logits) {
    attnfree::check_logits(logits);
    check_cuda("logits", logits);
}

std::vector<int64_t> with_dim(at::IntArrayRef sizes, int64_t dim_from_end, int64_t value) {
    std::vector<int64_t> s(sizes.begin(), sizes.end());
    s[s.size() - dim_from_end] = value;
    return s;
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
    const c10::cuda::CUDAGuard guard(logits.device());
    const auto dt = launcher_dtype(logits);
    const at::Tensor lc = logits.contiguous();
    const int64_t S = lc.size(-1), N = lc.size(-2);
    const int64_t M = (N * S) > 0 ? lc.numel() / (N * S) : 0;
    const auto acc = acc_dtype(lc.scalar_type());
    at::Tensor out = at::empty_like(lc, at::MemoryFormat::Contiguous);
    at::Tensor lse = at::empty(with_dim(lc.sizes(), 2, 1), lc.options().dtype(acc));
    at::Tensor rowsum = at::empty(with_dim(lc.sizes(), 1, 1), lc.options().dtype(acc));
    if (lc.numel() == 0) {  // same as the python path: zeros everywhere (lse of an empty N would be -inf)
        lse.zero_();
        rowsum.zero_();
        return {out, lse, rowsum};
    }
    const size_t bytes = attnfree_cuda::ea_double_norm_fwd_workspace_bytes(dt, M, N, S);
    at::Tensor ws = workspace(bytes, lc);
    check_launch(attnfree_cuda::ea_double_norm_fwd(dt, lc.data_ptr(), out.data_ptr(), lse.data_ptr(),
                                                   rowsum.data_ptr(), eps, M, N, S, ws.data_ptr(),
                                                   c10::cuda::getCurrentCUDAStream()),
                 "ea_double_norm_fwd");
    return {out, lse, rowsum};
}

at::Tensor ea_double_norm_bwd_cuda(const at::Tensor& dout, const at::Tensor& logits, const at::Tensor& out,
                                   const at::Tensor& lse, const at::Tensor& rowsum) {
    check_logits_cuda(logits);
    const c10::cuda::CUDAGuard guard(logits.device());
    const auto dt = launcher_dtype(logits);
    const at::Tensor lc = logits.contiguous();
    const int64_t S = lc.size(-1), N = lc.size(-2);
    const int64_t M = (N * S) > 0 ? lc.numel() / (N * S) : 0;
    const auto acc = acc_dtype(lc.scalar_type());
    const at::Tensor dc = aux_like(dout, lc, lc.sizes(), lc.scalar_type(), "dout");
    const at::Tensor oc = aux_like(out, lc, lc.sizes(), lc.scalar_type(), "out");
    const at::Tensor lsec = aux_like(lse, lc, with_dim(lc.sizes(), 2, 1), acc, "lse");
    const at::Tensor rc = aux_like(rowsum, lc, with_dim(lc.sizes(), 1, 1), acc, "rowsum");
    at::Tensor dl = at::empty_like(lc, at::MemoryFormat::Contiguous);
    const size_t bytes = attnfree_cuda::ea_double_norm_bwd_workspace_bytes(dt, M, N, S);
    at::Tensor ws = workspace(bytes, lc);
    check_launch(attnfree_cuda::ea_double_norm_bwd(dt, dc.data_ptr(), lc.data_ptr(), oc.data_ptr(), lsec.data_ptr(),
                                                   rc.data_ptr(), dl.data_ptr(), M, N, S, ws.data_ptr(),
                                                   c10::cuda::getCurrentCUDAStream()),
                 "ea_double_norm_bwd");
    return dl;
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
    m.impl("ea_double_norm_fwd", &ea_double_norm_fwd_cuda);
    m.impl("ea_double_norm_bwd", &ea_double_norm_bwd_cuda);
}
