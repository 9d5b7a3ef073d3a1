// The recurrent state of AFT-simple on the torch side, shared by the CPU ops (aft_simple_cpu.cpp) and the CUDA
// binding (aft_simple_cuda.cpp): argument checks and the small per-(b, c) pieces of the state's forward and
// backward that are not part of the scan kernels (docs/design.md §2.7).
//
// Format: one (B, 3, D) tensor in the accumulate type (float32 for float16/bfloat16/float32 data, float64 for
// float64), rows (m, num, den): m = running max of the keys seen (-inf when none), num = sum exp(k - m) v,
// den = sum exp(k - m). It stands for the sums num * e^m and den * e^m, so (-inf, 0, 0) is the empty state and
// continuing from a state equals running the concatenated sequence.
//
// Backward. With dN = e^{-mF} g_num and dD = e^{-mF} g_den the gradients of the represented sums, a key gets
// exp(k - mF) * [g_num, g_num v + g_den] from the final state (one more query after the last row, lse = mF), and
// the initial state gets, like a key with logit m0 seen by every row, g_num0 = sum_t exp(m0 - lse_t) G_t,
// g_den0 = -sum_t exp(m0 - lse_t) H_t (plus the final state's part), g_m0 = num0 g_num0 + den0 g_den0. The
// max mF itself is a function of the keys: the part of g_m that the sums do not account for,
// g_mF - numF g_numF - denF g_denF (zero when the state only feeds another call), goes to the first argmax
// (the initial state if it holds the max, else the first key with k = mF).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <limits>
#include <tuple>

#include "common/checks.h"

namespace attnfree {
namespace state {

using at::Tensor;

inline const Tensor* opt_ptr(const c10::optional<Tensor>& t) { return t.has_value() && t->defined() ? &*t : nullptr; }

// initial_state: (B, 3, D) in the accumulate type of q's dtype, on q's device; only with causal = True.
inline void check_initial_state(const Tensor* s, const Tensor& q, bool causal) {
  if (!s) return;
  TORCH_CHECK_VALUE(causal, "initial_state needs causal=True (a non-causal row sees every key: no state to continue)");
  const auto acc = acc_dtype(q.scalar_type());
  TORCH_CHECK_TYPE(s->scalar_type() == acc, "initial_state must be ", py_dtype(acc), " for ", py_dtype(q.scalar_type()),
                   " inputs (the accumulate type), got ", py_dtype(s->scalar_type()));
  const std::vector<int64_t> want{q.size(0), 3, q.size(2)};
  TORCH_CHECK_VALUE(s->sizes() == at::IntArrayRef(want),
                    "initial_state must have the shape (B, 3, D) = ", py_shape(want),
                    " (rows: running max, numerator, denominator), got ", py_shape(s->sizes()));
  check_same_device("q", q, "initial_state", *s);
}

// The saved final state and its incoming gradient (B, 3, D), checked against q.
inline void check_final_state(const char* name, const Tensor& s, const Tensor& q) {
  const std::vector<int64_t> want{q.size(0), 3, q.size(2)};
  TORCH_CHECK_VALUE(s.sizes() == at::IntArrayRef(want), name, " must have the shape (B, 3, D) = ", py_shape(want),
                    ", got ", py_shape(s.sizes()));
  check_same_device("q", q, name, s);
}

// x where x != -inf, else 0 (the safe offset of docs/design.md §7).
inline Tensor safe_off(const Tensor& m) { return at::where(at::isneginf(m), at::zeros_like(m), m); }

// Non-causal: the state of all keys, (B, 3, D) in the accumulate type (ka, va: (B, T, D) accumulate type).
inline Tensor global_final_state(const Tensor& ka, const Tensor& va) {
  if (ka.size(1) == 0) {
    Tensor s = at::zeros({ka.size(0), 3, ka.size(2)}, ka.options());
    s.select(1, 0).fill_(-std::numeric_limits<double>::infinity());
    return s;
  }
  const Tensor m = std::get<0>(ka.max(1));
  const Tensor e = at::exp(ka - safe_off(m).unsqueeze(1));
  return at::stack({m, (e * va).sum(1), e.sum(1)}, 1);
}

// Non-causal: (dk, dv) of the final state's gradient gF (accumulate type).
inline std::tuple<Tensor, Tensor> global_final_state_grad(const Tensor& ka, const Tensor& va, const Tensor& sF,
                                                          const Tensor& gF) {
  const Tensor P = at::exp(ka - safe_off(sF.select(1, 0)).unsqueeze(1));
  const Tensor gn = gF.select(1, 1).unsqueeze(1), gd = gF.select(1, 2).unsqueeze(1);
  return {P * (va * gn + gd), P * gn};
}

// The final state's gradient as one more query row (lse, G, H) = (mF, g_numF, -g_denF) for the scan kernels.
inline Tensor pseudo_row(const Tensor& sF, const Tensor& gF) {
  return at::stack({sF.select(1, 0), gF.select(1, 1), -gF.select(1, 2)}, 1).contiguous();
}

// d initial_state from the scan's key sums ks (B, 2, D) = (sum P G, sum P H) of the state as a key.
inline Tensor initial_state_grad(const Tensor& ks, const Tensor& s0) {
  const Tensor gn = ks.select(1, 0), gd = -ks.select(1, 1);
  return at::stack({s0.select(1, 1) * gn + s0.select(1, 2) * gd, gn, gd}, 1);
}

// Routes the residual g_mF - numF g_numF - denF g_denF to the first argmax of the final max (header comment):
// adds it to dk (B, T, D, any float dtype; returned in its dtype) or to d initial_state row 0 (g0, in place).
inline Tensor route_max_residual(const Tensor& dk, const Tensor& ka, const Tensor& sF, const Tensor& gF,
                                 const Tensor* s0, Tensor* g0) {
  const Tensor mF = sF.select(1, 0);
  const Tensor r = gF.select(1, 0) - sF.select(1, 1) * gF.select(1, 1) - sF.select(1, 2) * gF.select(1, 2);
  Tensor live = at::isfinite(mF);
  Tensor to_state = at::zeros_like(live);
  if (s0) to_state = live & (s0->select(1, 0) == mF);
  if (g0 && s0) g0->select(1, 0).add_(at::where(to_state, r, at::zeros_like(r)));
  if (ka.size(1) == 0) return dk;
  const Tensor to_key = live & ~to_state;
  const Tensor idx = (ka == mF.unsqueeze(1)).to(at::kByte).argmax(1, /*keepdim=*/true);  // first key with k = mF
  Tensor dka = dk.to(ka.scalar_type());
  dka.scatter_add_(1, idx, at::where(to_key, r, at::zeros_like(r)).unsqueeze(1));
  return dka.to(dk.scalar_type());
}

}  // namespace state
}  // namespace attnfree
