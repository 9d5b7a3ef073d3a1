// Input checks of the compiled ops (CPU kernels and CUDA bindings alike), with the messages and exception types
// of the Python path's argument checks (attnfree_ext/ops/common/checks.py), so every path fails the same way.
// TORCH_CHECK_TYPE -> TypeError, TORCH_CHECK_VALUE -> ValueError in Python.
#pragma once

#include <ATen/ATen.h>

#include <sstream>
#include <string>

namespace attnfree {

inline std::string py_dtype(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
      return "torch.float16";
    case at::kBFloat16:
      return "torch.bfloat16";
    case at::kFloat:
      return "torch.float32";
    case at::kDouble:
      return "torch.float64";
    case at::kLong:
      return "torch.int64";
    case at::kInt:
      return "torch.int32";
    case at::kShort:
      return "torch.int16";
    case at::kChar:
      return "torch.int8";
    case at::kByte:
      return "torch.uint8";
    case at::kBool:
      return "torch.bool";
    case at::kComplexFloat:
      return "torch.complex64";
    case at::kComplexDouble:
      return "torch.complex128";
    default:
      return std::string("torch.") + c10::toString(t);
  }
}

inline std::string py_shape(at::IntArrayRef s) {
  std::ostringstream o;
  o << "(";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) o << ", ";
    o << s[i];
  }
  if (s.size() == 1) o << ",";
  o << ")";
  return o.str();
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kHalf || t == at::kBFloat16 || t == at::kFloat || t == at::kDouble;
}

inline void check_tensor(const char* name, const at::Tensor& x, int64_t ndim = -1) {
  TORCH_CHECK_TYPE(x.defined(), name, " must be a torch.Tensor, got NoneType");
  TORCH_CHECK_TYPE(is_supported_float(x.scalar_type()), name, " must be float16, bfloat16, float32 or float64, got ",
                   py_dtype(x.scalar_type()));
  if (ndim >= 0) {
    TORCH_CHECK_VALUE(x.dim() == ndim, name, " must have ", ndim, " dimensions, got shape ", py_shape(x.sizes()));
  }
}

inline void check_same_device(const char* first_name, const at::Tensor& first, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.device() == first.device(), name, " is on ", t.device(), " but ", first_name, " is on ",
                    first.device(), "; all inputs must be on the same device");
}

inline void check_same_shape(const char* first_name, const at::Tensor& first, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(t.sizes() == first.sizes(), name, " must have the shape of ", first_name, " ",
                    py_shape(first.sizes()), ", got ", py_shape(t.sizes()));
}

inline void check_qkv(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  check_tensor("q", q, 3);
  check_tensor("k", k, 3);
  check_tensor("v", v, 3);
  check_same_device("q", q, "k", k);
  check_same_device("q", q, "v", v);
  check_same_shape("q", q, "k", k);
  check_same_shape("q", q, "v", v);
  TORCH_CHECK_TYPE(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(),
                   "q, k and v must share one dtype, got ", py_dtype(q.scalar_type()), ", ", py_dtype(k.scalar_type()),
                   ", ", py_dtype(v.scalar_type()));
}

// w: (T, T) or (heads, T, T) with D % heads == 0. Returns heads.
inline int64_t check_bias(const at::Tensor& w, int64_t T, int64_t D, const char* name = "w") {
  check_tensor(name, w);
  if (w.dim() == 2 && w.size(0) == T && w.size(1) == T) return 1;
  if (w.dim() == 3 && w.size(1) == T && w.size(2) == T) {
    const int64_t heads = w.size(0);
    TORCH_CHECK_VALUE(heads >= 1 && D % heads == 0, name, " has ", heads, " heads but D=", D,
                      " is not divisible by it (D % heads must be 0)");
    return heads;
  }
  TORCH_CHECK_VALUE(false, name, " must have shape (T, T) or (heads, T, T) with T=", T, ", got ", py_shape(w.sizes()));
  return 0;
}

inline void check_window(int64_t window) { TORCH_CHECK_VALUE(window >= 1, "window must be >= 1, got ", window); }

// same order and messages as the public aft_full (Python path)
inline int64_t check_w_full(const at::Tensor& w, const at::Tensor& q) {
  check_tensor("w", w);
  TORCH_CHECK_TYPE(w.scalar_type() == q.scalar_type(), "w must have the dtype of q (", py_dtype(q.scalar_type()),
                   "), got ", py_dtype(w.scalar_type()));
  TORCH_CHECK_VALUE(w.device() == q.device(), "w is on ", w.device(), " but q is on ", q.device(),
                    "; all inputs must be on the same device");
  return check_bias(w, q.size(1), q.size(2));
}

// same order and messages as the public aft_local (Python path)
inline int64_t check_w_local(const at::Tensor& w, const at::Tensor& q, int64_t window) {
  const int64_t heads = check_bias(w, q.size(1), q.size(2));
  check_window(window);
  TORCH_CHECK_TYPE(w.scalar_type() == q.scalar_type(), "w must have q's dtype ", py_dtype(q.scalar_type()), ", got ",
                   py_dtype(w.scalar_type()));
  check_same_device("q", q, "w", w);
  return heads;
}

// same messages as the public ea_double_norm (Python path)
inline void check_logits(const at::Tensor& logits) {
  check_tensor("logits", logits);
  TORCH_CHECK_VALUE(logits.dim() >= 2, "logits must have at least 2 dimensions (..., N, S), got shape ",
                    py_shape(logits.sizes()));
}

// Checks for the saved/gradient tensors of a backward op.
inline void check_like(const char* name, const at::Tensor& t, const char* ref_name, const at::Tensor& ref) {
  check_tensor(name, t);
  check_same_device(ref_name, ref, name, t);
  check_same_shape(ref_name, ref, name, t);
}

// The saved tensors of an AFT backward (dy, y, lse), each like q.
inline void check_saved(const at::Tensor& dy, const at::Tensor& q, const at::Tensor& y, const at::Tensor& lse) {
  check_like("dy", dy, "q", q);
  check_like("y", y, "q", q);
  check_like("lse", lse, "q", q);
}

// Computation dtype: float64 stays float64, everything else runs in float32.
inline at::ScalarType acc_dtype(at::ScalarType t) { return t == at::kDouble ? at::kDouble : at::kFloat; }

}  // namespace attnfree
