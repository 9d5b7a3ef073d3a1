// CUDA registration of aft_full_fwd / aft_full_bwd / aft_full_lowrank_fwd / aft_full_lowrank_bwd
// (schemas defined in csrc/ops.cpp). Thin glue: checks (messages name the argument, error types as
// attnfree_ext/_checks.py), .contiguous() once, outputs, workspace from the caching allocator, current stream,
// launchers from csrc/cuda/aft_full.cu.
//
// dtypes: q, k, v share one dtype. w (or u, vb) may be q's dtype or its accumulate type (float32; float64 for
// float64 q) and is used as is; any other float dtype is converted once to the accumulate type. dw (du, dvb) come
// back with w's (u's, vb's) dtype and shape. lse is float32 (float64 for float64 inputs).
// Environment: ATTNFREE_AFT_FULL_EXACT=1 forces the per-element (non-tensor-core) kernels, forward and backward.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdlib>
#include <cstring>
#include <tuple>

#include "../cuda/aft_full.h"

namespace {

using attnfree::cuda::AftDType;

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

at::ScalarType acc_scalar(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

bool force_exact() {
    const char* e = std::getenv("ATTNFREE_AFT_FULL_EXACT");
    return e != nullptr && std::strcmp(e, "") != 0 && std::strcmp(e, "0") != 0;
}

void check_launch(cudaError_t err, const char* op) {
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_same_device(const at::Tensor& t, const at::Tensor& q, const char* name) {
    TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device(),
                      "; all inputs must be on the same device");
}

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    const char* names[3] = {"q", "k", "v"};
    const at::Tensor* ts[3] = {&q, &k, &v};
    for (int i = 0; i < 3; ++i) {
        aft_dtype(*ts[i], names[i]);
        TORCH_CHECK_VALUE(ts[i]->dim() == 3, names[i], " must have shape (B, T, D), got ", ts[i]->sizes());
    }
    TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernel, got ", q.device());
    check_same_device(k, q, "k");
    check_same_device(v, q, "v");
    TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ", k.sizes());
    TORCH_CHECK_VALUE(v.sizes() == q.sizes(), "v must have the shape of q ", q.sizes(), ", got ", v.sizes());
    TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                     "q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                     v.scalar_type());
}

// w: (T, T) or (heads, T, T), D % heads == 0. Returns heads.
int64_t check_bias(const at::Tensor& w, const at::Tensor& q, const char* name) {
    aft_dtype(w, name);
    check_same_device(w, q, name);
    const int64_t T = q.size(1), D = q.size(2);
    int64_t heads = -1;
    if (w.dim() == 2 && w.size(0) == T && w.size(1) == T) heads = 1;
    if (w.dim() == 3 && w.size(1) == T && w.size(2) == T) heads = w.size(0);
    TORCH_CHECK_VALUE(heads >= 1, name, " must have shape (T, T) or (heads, T, T) with T=", T, ", got ", w.sizes());
    TORCH_CHECK_VALUE(D % heads == 0, name, " has ", heads, " heads, which must divide D=", D);
    return heads;
}

// u, vb: (T, rank) or (heads, T, rank), one shape and dtype, D % heads == 0. Returns heads.
int64_t check_factors(const at::Tensor& u, const at::Tensor& vb, const at::Tensor& q) {
    aft_dtype(u, "u");
    aft_dtype(vb, "vb");
    check_same_device(u, q, "u");
    check_same_device(vb, q, "vb");
    const int64_t T = q.size(1), D = q.size(2);
    int64_t heads = -1;
    if (u.dim() == 2 && u.size(0) == T) heads = 1;
    if (u.dim() == 3 && u.size(1) == T) heads = u.size(0);
    TORCH_CHECK_VALUE(heads >= 1, "u must have shape (T, rank) or (heads, T, rank) with T=", T, ", got ", u.sizes());
    TORCH_CHECK_VALUE(vb.sizes() == u.sizes(), "vb must have the shape of u ", u.sizes(), ", got ", vb.sizes());
    TORCH_CHECK_TYPE(vb.scalar_type() == u.scalar_type(), "u and vb must share one dtype, got ", u.scalar_type(),
                     " and ", vb.scalar_type());
    TORCH_CHECK_VALUE(D % heads == 0, "u has ", heads, " heads, which must divide D=", D);
    return heads;
}

// The bias/factor tensor as the kernel reads it: q's dtype or the accumulate type kept, anything else converted.
at::Tensor bias_for_kernel(const at::Tensor& w, at::ScalarType qdt) {
    const at::ScalarType s = w.scalar_type();
    if (s == qdt || s == acc_scalar(qdt)) return w.contiguous();
    return w.to(acc_scalar(qdt)).contiguous();
}

// Auxiliary tensor (dy, y, lse) on q's device, the wanted dtype, q's shape, contiguous.
at::Tensor aux(const at::Tensor& t, const at::Tensor& q, at::ScalarType dt, const char* name) {
    check_same_device(t, q, name);
    TORCH_CHECK_VALUE(t.sizes() == q.sizes(), name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
    return t.to(dt).contiguous();
}

std::tuple<at::Tensor, at::Tensor> aft_full_fwd_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                                     const at::Tensor& w, bool causal) {
    check_qkv(q, k, v);
    const int64_t heads = check_bias(w, q, "w");
    const c10::cuda::CUDAGuard guard(q.device());
    const at::ScalarType qdt = q.scalar_type();
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor wc = bias_for_kernel(w, qdt);
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
    at::Tensor y = at::empty(qc.sizes(), qc.options());
    at::Tensor lse = at::empty(qc.sizes(), qc.options().dtype(acc_scalar(qdt)));
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
    check_qkv(q, k, v);
    const int64_t heads = check_bias(w, q, "w");
    const c10::cuda::CUDAGuard guard(q.device());
    const at::ScalarType qdt = q.scalar_type();
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor wc = bias_for_kernel(w, qdt);
    const at::Tensor dyc = aux(dy, q, qdt, "dy"), yc = aux(y, q, qdt, "y");
    const at::Tensor lc = aux(lse, q, acc_scalar(qdt), "lse");
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
    check_qkv(q, k, v);
    const int64_t heads = check_factors(u, vb, q);
    const c10::cuda::CUDAGuard guard(q.device());
    const at::ScalarType qdt = q.scalar_type();
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor uc = bias_for_kernel(u, qdt), vbc = bias_for_kernel(vb, qdt);
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2), rank = u.size(-1);
    const bool exact = force_exact();
    const AftDType dt = aft_dtype(qc, "q");
    at::Tensor y = at::empty(qc.sizes(), qc.options());
    at::Tensor lse = at::empty(qc.sizes(), qc.options().dtype(acc_scalar(qdt)));
    const size_t bytes = attnfree::cuda::aft_full_lowrank_fwd_workspace_bytes(dt, T, heads, rank, exact);
    at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, qc.options().dtype(at::kByte));
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
    check_qkv(q, k, v);
    const int64_t heads = check_factors(u, vb, q);
    const c10::cuda::CUDAGuard guard(q.device());
    const at::ScalarType qdt = q.scalar_type();
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor uc = bias_for_kernel(u, qdt), vbc = bias_for_kernel(vb, qdt);
    const at::Tensor dyc = aux(dy, q, qdt, "dy"), yc = aux(y, q, qdt, "y");
    const at::Tensor lc = aux(lse, q, acc_scalar(qdt), "lse");
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2), rank = u.size(-1);
    const AftDType dt = aft_dtype(qc, "q");
    at::Tensor dq = at::empty(qc.sizes(), qc.options());
    at::Tensor dk = at::empty(qc.sizes(), qc.options());
    at::Tensor dv = at::empty(qc.sizes(), qc.options());
    at::Tensor du = at::empty(uc.sizes(), uc.options());
    at::Tensor dvb = at::empty(vbc.sizes(), vbc.options());
    const size_t bytes = attnfree::cuda::aft_full_lowrank_bwd_workspace_bytes(dt, T, heads);
    at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, qc.options().dtype(at::kByte));
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
