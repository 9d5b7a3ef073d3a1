// Checks of AFT-local's w in either layout (attnfree_ext/ops/aft_local/layout.py), for the CPU kernels and the
// CUDA binding: full (T, T) / (heads, T, T), or banded (T, 2W - 1) / (heads, T, 2W - 1) with W = min(window, T),
// where w[h, t, j] is the bias of key t + j - (W - 1).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "common/checks.h"

namespace attnfree {

// 2W - 1, W = min(window, T) (1 for T = 0): the last dimension of a banded w.
inline int64_t local_band_width(int64_t T, int64_t window) { return 2 * std::min(window, std::max<int64_t>(T, 1)) - 1; }

// Returns heads; same messages as the public aft_local (Python path).
inline int64_t check_w_local_layout(const at::Tensor& w, const at::Tensor& q, int64_t window, bool banded) {
  if (!banded) return check_w_local(w, q, window);
  check_window(window);
  check_tensor("w", w);
  TORCH_CHECK_TYPE(w.scalar_type() == q.scalar_type(), "w must have q's dtype ", py_dtype(q.scalar_type()), ", got ",
                   py_dtype(w.scalar_type()));
  check_same_device("q", q, "w", w);
  const int64_t T = q.size(1), D = q.size(2), L = local_band_width(T, window);
  TORCH_CHECK_VALUE((w.dim() == 2 || w.dim() == 3) && w.size(-2) == T && w.size(-1) == L,
                    "w with w_layout='band' must have shape (T, 2W-1) or (heads, T, 2W-1) with T=", T, ", 2W-1=", L,
                    ", got ", py_shape(w.sizes()));
  if (w.dim() == 2) return 1;
  const int64_t heads = w.size(0);
  TORCH_CHECK_VALUE(heads >= 1 && D % heads == 0, "w has ", heads, " heads but D=", D,
                    " is not divisible by it (D % heads must be 0)");
  return heads;
}

}  // namespace attnfree
