// CUDA registration of aft_local_fwd / aft_local_bwd (schemas defined in csrc/ops.cpp).
// Thin glue: checks (same messages and error types as attnfree_ext/_checks.py), .contiguous() once (w is also
// converted to q's dtype; dw is returned in w's dtype and shape), outputs, workspace, current stream, launcher
// from csrc/cuda/aft_local.cu.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <tuple>

#include "../cuda/launchers.h"

namespace {

attnfree_cuda::DType to_af_dtype(const at::Tensor& t, const char* name) {
    switch (t.scalar_type()) {
        case at::kFloat: return attnfree_cuda::DType::Float32;
        case at::kHalf: return attnfree_cuda::DType::Float16;
        case at::kBFloat16: return attnfree_cuda::DType::BFloat16;
        case at::kDouble: return attnfree_cuda::DType::Float64;
        default: break;
    }
    TORCH_CHECK_TYPE(false, name, " must be float16, bfloat16, float32 or float64, got ", t.scalar_type());
}

at::ScalarType acc_type(at::ScalarType s) { return s == at::kDouble ? at::kDouble : at::kFloat; }

void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
    const char* names[3] = {"q", "k", "v"};
    const at::Tensor* ts[3] = {&q, &k, &v};
    for (int i = 0; i < 3; ++i) {
        to_af_dtype(*ts[i], names[i]);
        TORCH_CHECK_VALUE(ts[i]->dim() == 3, names[i], " must have 3 dimensions, got shape ", ts[i]->sizes());
    }
    TORCH_CHECK_VALUE(k.device() == q.device(), "k is on ", k.device(), " but q is on ", q.device(),
                      "; all inputs must be on the same device");
    TORCH_CHECK_VALUE(v.device() == q.device(), "v is on ", v.device(), " but q is on ", q.device(),
                      "; all inputs must be on the same device");
    TORCH_CHECK_VALUE(q.is_cuda(), "q must be a CUDA tensor for the CUDA kernel, got ", q.device());
    TORCH_CHECK_VALUE(k.sizes() == q.sizes(), "k must have the shape of q ", q.sizes(), ", got ", k.sizes());
    TORCH_CHECK_VALUE(v.sizes() == q.sizes(), "v must have the shape of q ", q.sizes(), ", got ", v.sizes());
    TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                     "q, k and v must share one dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
                     v.scalar_type());
}

// Bring an auxiliary tensor (dy, y, lse) to q's device, the wanted dtype, q's shape and contiguity.
at::Tensor aux(const at::Tensor& t, const at::Tensor& q, at::ScalarType dt, const char* name) {
    TORCH_CHECK_VALUE(t.device() == q.device(), name, " is on ", t.device(), " but q is on ", q.device(),
                      "; all inputs must be on the same device");
    TORCH_CHECK_VALUE(t.sizes() == q.sizes(), name, " must have the shape of q ", q.sizes(), ", got ", t.sizes());
    return t.to(dt).contiguous();
}

void check_launch(cudaError_t err, const char* op) {
    TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

int64_t check_bias(const at::Tensor& w, const at::Tensor& q) {
    to_af_dtype(w, "w");
    TORCH_CHECK_VALUE(w.device() == q.device(), "w is on ", w.device(), " but q is on ", q.device(),
                      "; all inputs must be on the same device");
    const int64_t T = q.size(1), D = q.size(2);
    if (w.dim() == 2 && w.size(0) == T && w.size(1) == T) return 1;
    if (w.dim() == 3 && w.size(1) == T && w.size(2) == T) {
        const int64_t heads = w.size(0);
        TORCH_CHECK_VALUE(heads >= 1 && D % heads == 0, "w has ", heads, " heads but D=", D,
                          " is not divisible by it (D % heads must be 0)");
        return heads;
    }
    TORCH_CHECK_VALUE(false, "w must have shape (T, T) or (heads, T, T) with T=", T, ", got ", w.sizes());
}

void check_window(int64_t window) { TORCH_CHECK_VALUE(window >= 1, "window must be >= 1, got ", window); }

std::tuple<at::Tensor, at::Tensor> aft_local_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                      const at::Tensor& v, const at::Tensor& w, int64_t window,
                                                      bool causal) {
    check_qkv(q, k, v);
    const int64_t heads = check_bias(w, q);
    check_window(window);
    const c10::cuda::CUDAGuard guard(q.device());
    const auto dt = to_af_dtype(q, "q");
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor wc = w.to(q.scalar_type()).contiguous();
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
    at::Tensor y = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor lse = at::empty(qc.sizes(), qc.options().dtype(acc_type(q.scalar_type())));
    const size_t bytes = attnfree_cuda::aft_local_fwd_workspace_bytes(dt, B, T, D, window, causal);
    at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, qc.options().dtype(at::kByte));
    check_launch(attnfree_cuda::aft_local_fwd(dt, qc.data_ptr(), kc.data_ptr(), vc.data_ptr(), wc.data_ptr(), heads,
                                              y.data_ptr(), lse.data_ptr(), B, T, D, window, causal, ws.data_ptr(),
                                              c10::cuda::getCurrentCUDAStream()),
                 "aft_local_fwd");
    return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_local_bwd_cuda(
    const at::Tensor& dy, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& w,
    const at::Tensor& y, const at::Tensor& lse, int64_t window, bool causal) {
    check_qkv(q, k, v);
    const int64_t heads = check_bias(w, q);
    check_window(window);
    const c10::cuda::CUDAGuard guard(q.device());
    const auto dt = to_af_dtype(q, "q");
    const at::Tensor qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
    const at::Tensor wc = w.to(q.scalar_type()).contiguous();
    const at::Tensor dyc = aux(dy, q, q.scalar_type(), "dy");
    const at::Tensor yc = aux(y, q, q.scalar_type(), "y");
    const at::Tensor lc = aux(lse, q, acc_type(q.scalar_type()), "lse");
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
    at::Tensor dq = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor dk = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor dv = at::empty_like(qc, at::MemoryFormat::Contiguous);
    at::Tensor dw = at::zeros({heads, T, T}, qc.options());  // entries outside the band stay 0
    const size_t bytes = attnfree_cuda::aft_local_bwd_workspace_bytes(dt, B, T, D, window, causal);
    at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, qc.options().dtype(at::kByte));
    check_launch(attnfree_cuda::aft_local_bwd(dt, dyc.data_ptr(), qc.data_ptr(), kc.data_ptr(), vc.data_ptr(),
                                              wc.data_ptr(), heads, yc.data_ptr(), lc.data_ptr(), dq.data_ptr(),
                                              dk.data_ptr(), dv.data_ptr(), dw.data_ptr(), B, T, D, window, causal,
                                              ws.data_ptr(), c10::cuda::getCurrentCUDAStream()),
                 "aft_local_bwd");
    return {dq, dk, dv, dw.view(w.sizes()).to(w.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(attnfree, CUDA, m) {
    m.impl("aft_local_fwd", &aft_local_fwd_cuda);
    m.impl("aft_local_bwd", &aft_local_bwd_cuda);
}
