// CUDA registration of aft_full_fwd / aft_full_bwd / aft_full_lowrank_fwd / aft_full_lowrank_bwd
// (schemas defined in csrc/ops.cpp). Thin glue: checks (attnfree/checks.h: the messages and error types of the
// Python path), .contiguous() once, outputs, workspace from the caching allocator, current stream, launchers
// from csrc/cuda/aft_full.cu.
//
// dtypes: q, k, v and w share one dtype (as in the Python path). The factors u, vb of the low-rank bias may be
// q's dtype or its accumulate type (float32; float64 for float64 q) and are used as is; any other float dtype is
// converted once to the accumulate type. dw (du, dvb) come back with w's (u's, vb's) dtype and shape. lse is
// float32 (float64 for float64 inputs).
// Environment: ATTNFREE_AFT_FULL_EXACT=1 forces the per-element (non-tensor-core) kernels, forward and backward.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>

#include "../cuda/aft_full.h"
#include "glue.h"

namespace {

using attnfree::acc_dtype;
using attnfree::cuda::AftDType;
using attnfree::glue::check_launch;
using attnfree::glue::saved;
using attnfree::glue::workspace;

AftDType aft_dtype(const at::Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::kFloat: return AftDType::F32;
        case at::kHalf: return AftDType::F16;
        case at::kBFloat16: return AftDType::BF16;
        case at::kDouble: return AftDType::F64;
        default: break;
    }
    TORCH_CHECK_TYPE(false, name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

bool force_exact() {
    const char* e = std::getenv("ATTNFREE_AFT_FULL_EXACT");
    return e != nullptr && std::strcmp(e, "") != 0 && std::strcmp(e, "0") != 0;
}

// u, vb: (T, rank) or (heads, T, rank), one shape and dtype, D % heads == 0. Returns heads.
int64_t check_factors(const at::Tensor& u, const at::Tensor& vb, const at::Tensor& q) {
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
    if (s == qdt || s == acc_dtype(qdt)) return w.contiguous();
    return w.to(acc_dtype(qdt)).contiguous();
}

std::tuple<at::Tensor, at::Tensor> aft_full_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& w, bool causal) {
    attnfree::check_qkv(q, k, v);
    attnfree::glue::check_cuda("q", q);
    const int64_t heads = attnfree::check_w_full(w, q);
    const c10::cuda::CUDAGuard guard(q.device());
    const at::ScalarType qdt = q.scalar_type();
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor wc = bias_for_kernel(w, qdt);
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
    at::Tensor y = at::empty(qc.sizes(), qc.options());
    at::Tensor lse = at::empty(qc.sizes(), qc.options().dtype(acc_dtype(qdt)));
    check_launch(attnfree::cuda::aft_full_fwd_launch(aft_dtype(qc, "q"), aft_dtype(wc, "w"), qc.data_ptr(),
                                                     kc.data_ptr(), vc.data_ptr(), wc.data_ptr(), y.data_ptr(),
                                                     lse.data_ptr(), B, T, D, heads, causal, force_exact(),
                                                     c10::cuda::getCurrentCUDAStream()),
                 "aft_full_fwd");
    return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_full_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& y, const at::Tensor& lse, bool causal) {
    attnfree::check_qkv(q, k, v);
    attnfree::glue::check_cuda("q", q);
    const int64_t heads = attnfree::check_w_full(w, q);
    const c10::cuda::CUDAGuard guard(q.device());
    const at::ScalarType qdt = q.scalar_type();
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor wc = bias_for_kernel(w, qdt);
    const at::Tensor dyc = saved("dy", dy, "q", q, qdt), yc = saved("y", y, "q", q, qdt);
    const at::Tensor lc = saved("lse", lse, "q", q, acc_dtype(qdt));
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
    at::Tensor dq = at::empty(qc.sizes(), qc.options());
    at::Tensor dk = at::empty(qc.sizes(), qc.options());
    at::Tensor dv = at::empty(qc.sizes(), qc.options());
    at::Tensor dw = at::empty(wc.sizes(), wc.options());
    check_launch(attnfree::cuda::aft_full_bwd_launch(
                     aft_dtype(qc, "q"), aft_dtype(wc, "w"), dyc.data_ptr(), qc.data_ptr(), kc.data_ptr(),
                     vc.data_ptr(), wc.data_ptr(), yc.data_ptr(), lc.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                     dv.data_ptr(), dw.data_ptr(), B, T, D, heads, causal, force_exact(),
                     c10::cuda::getCurrentCUDAStream()),
                 "aft_full_bwd");
    if (dw.scalar_type() != w.scalar_type()) dw = dw.to(w.scalar_type());
    return {dq, dk, dv, dw};
}

std::tuple<at::Tensor, at::Tensor> aft_full_lowrank_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& u,
                                                             const at::Tensor& vb, bool causal) {
    attnfree::check_qkv(q, k, v);
    attnfree::glue::check_cuda("q", q);
    const int64_t heads = check_factors(u, vb, q);
    const c10::cuda::CUDAGuard guard(q.device());
    const at::ScalarType qdt = q.scalar_type();
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor uc = bias_for_kernel(u, qdt), vbc = bias_for_kernel(vb, qdt);
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2), rank = u.size(-1);
    const bool exact = force_exact();
    const AftDType dt = aft_dtype(qc, "q");
    at::Tensor y = at::empty(qc.sizes(), qc.options());
    at::Tensor lse = at::empty(qc.sizes(), qc.options().dtype(acc_dtype(qdt)));
    const size_t bytes = attnfree::cuda::aft_full_lowrank_fwd_workspace_bytes(dt, T, heads, rank, exact);
    at::Tensor ws = workspace(bytes, qc);
    check_launch(attnfree::cuda::aft_full_lowrank_fwd_launch(
                     dt, aft_dtype(uc, "u"), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), uc.data_ptr(),
                     vbc.data_ptr(), y.data_ptr(), lse.data_ptr(), bytes ? ws.data_ptr() : nullptr, B, T, D, heads,
                     rank, causal, exact, c10::cuda::getCurrentCUDAStream()),
                 "aft_full_lowrank_fwd");
    return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_full_lowrank_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& u,
    const at::Tensor& vb, const at::Tensor& y, const at::Tensor& lse, bool causal) {
    attnfree::check_qkv(q, k, v);
    attnfree::glue::check_cuda("q", q);
    const int64_t heads = check_factors(u, vb, q);
    const c10::cuda::CUDAGuard guard(q.device());
    const at::ScalarType qdt = q.scalar_type();
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor uc = bias_for_kernel(u, qdt), vbc = bias_for_kernel(vb, qdt);
    const at::Tensor dyc = saved("dy", dy, "q", q, qdt), yc = saved("y", y, "q", q, qdt);
    const at::Tensor lc = saved("lse", lse, "q", q, acc_dtype(qdt));
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2), rank = u.size(-1);
    const AftDType dt = aft_dtype(qc, "q");
    at::Tensor dq = at::empty(qc.sizes(), qc.options());
    at::Tensor dk = at::empty(qc.sizes(), qc.options());
    at::Tensor dv = at::empty(qc.sizes(), qc.options());
    at::Tensor du = at::empty(uc.sizes(), uc.options());
    at::Tensor dvb = at::empty(vbc.sizes(), vbc.options());
    const size_t bytes = attnfree::cuda::aft_full_lowrank_bwd_workspace_bytes(dt, T, heads);
    at::Tensor ws = workspace(bytes, qc);
    check_launch(attnfree::cuda::aft_full_lowrank_bwd_launch(
                     dt, aft_dtype(uc, "u"), dyc.data_ptr(), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                     uc.data_ptr(), vbc.data_ptr(), yc.data_ptr(), lc.data_ptr(), dq.data_ptr(), dk.data_ptr(),
                     dv.data_ptr(), du.data_ptr(), dvb.data_ptr(), bytes ? ws.data_ptr() : nullptr, B, T, D, heads,
                     rank, causal, force_exact(), c10::cuda::getCurrentCUDAStream()),
                 "aft_full_lowrank_bwd");
    if (du.scalar_type() != u.scalar_type()) du = du.to(u.scalar_type());
    if (dvb.scalar_type() != vb.scalar_type()) dvb = dvb.to(vb.scalar_type());
    return {dq, dk, dv, du, dvb};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
    m.impl("aft_full_fwd", &aft_full_fwd_cuda);
    m.impl("aft_full_bwd", &aft_full_bwd_cuda);
    m.impl("aft_full_lowrank_fwd", &aft_full_lowrank_fwd_cuda);
    m.impl("aft_full_lowrank_bwd", &aft_full_lowrank_bwd_cuda);
}
