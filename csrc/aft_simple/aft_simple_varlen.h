// Packed variable-length sequences of AFT-simple on the torch side (flash-attention's varlen convention,
// docs/design.md §9.3), shared by the CPU ops (aft_simple_cpu.cpp) and the CUDA binding (aft_simple_cuda.cpp):
// the checks of cu_seqlens / max_seqlen and the per-sequence forms of the small state pieces of aft_simple_state.h
// that the CUDA binding runs with ATen (segment reductions over a token -> sequence index: no host sync).
//
// q, k, v are (1, total_T, D); sequence n is rows cu_seqlens[n] .. cu_seqlens[n + 1] and sees no other one; a state
// is (N, 3, D), one per sequence.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <algorithm>
#include <limits>
#include <tuple>
#include <vector>

#include "aft_simple/aft_simple_state.h"
#include "common/checks.h"

namespace attnfree {
namespace varlen {

using at::Tensor;

struct Packed {
  Tensor cu;      // int64, contiguous, on q's device; undefined when not packed
  int64_t n = 0;  // number of sequences
  int64_t t = 0;  // a bound on the longest sequence: max_seqlen when given, else total_T
  bool on() const { return cu.defined(); }
};

// cu_seqlens: int32 / int64 (N + 1,) on q's device with q (1, total_T, D); on the CPU also its values (from 0,
// non-decreasing, ending at total_T) and max_seqlen >= the longest sequence. On CUDA the values are trusted
// (reading them would be a host sync). max_seqlen only with cu_seqlens, >= 0.
inline Packed check(const c10::optional<Tensor>& cu_opt, c10::optional<int64_t> max_seqlen, const Tensor& q) {
  Packed p;
  const Tensor* cu = state::opt_ptr(cu_opt);
  if (!cu) {
    TORCH_CHECK_VALUE(!max_seqlen.has_value(), "max_seqlen needs cu_seqlens (it bounds the packed sequences)");
    return p;
  }
  TORCH_CHECK_TYPE(cu->scalar_type() == at::kInt || cu->scalar_type() == at::kLong,
                   "cu_seqlens must be int32 or int64, got ", py_dtype(cu->scalar_type()));
  TORCH_CHECK_VALUE(cu->dim() == 1 && cu->numel() >= 1, "cu_seqlens must have shape (N + 1,) with N >= 0, got ",
                    py_shape(cu->sizes()));
  check_same_device("q", q, "cu_seqlens", *cu);
  TORCH_CHECK_VALUE(q.size(0) == 1, "with cu_seqlens, q, k and v must be packed as (1, total_T, D), got ",
                    py_shape(q.sizes()));
  const int64_t total = q.size(1);
  if (max_seqlen.has_value()) TORCH_CHECK_VALUE(*max_seqlen >= 0, "max_seqlen must be >= 0, got ", *max_seqlen);
  p.cu = cu->to(at::kLong).contiguous();
  p.n = cu->numel() - 1;
  p.t = max_seqlen.has_value() ? *max_seqlen : total;
  if (cu->is_cpu()) {
    const int64_t* c = p.cu.data_ptr<int64_t>();
    TORCH_CHECK_VALUE(c[0] == 0, "cu_seqlens must start at 0, got ", c[0]);
    int64_t longest = 0;
    for (int64_t i = 0; i < p.n; ++i) {
      TORCH_CHECK_VALUE(c[i + 1] >= c[i], "cu_seqlens must be non-decreasing, got ", c[i], " then ", c[i + 1]);
      longest = std::max(longest, c[i + 1] - c[i]);
    }
    TORCH_CHECK_VALUE(c[p.n] == total, "cu_seqlens must end at total_T = q.shape[1] = ", total, ", got ", c[p.n]);
    if (max_seqlen.has_value())
      TORCH_CHECK_VALUE(*max_seqlen >= longest, "max_seqlen = ", *max_seqlen,
                        " is smaller than the longest sequence of cu_seqlens (", longest, ")");
  }
  return p;
}

// A state with one row per sequence: (N, 3, D).
inline void check_states(const char* name, const Tensor& s, const Packed& p, const Tensor& q) {
  const std::vector<int64_t> want{p.n, 3, q.size(2)};
  TORCH_CHECK_VALUE(s.sizes() == at::IntArrayRef(want), name, " must have the shape (N, 3, D) = ", py_shape(want),
                    " with cu_seqlens (one state per sequence), got ", py_shape(s.sizes()));
  check_same_device("q", q, name, s);
}

// initial_state of a packed (or plain) call: causal only; (N, 3, D) when packed, else state::check_initial_state.
inline void check_initial_state(const Tensor* s0, const Tensor& q, bool causal, const Packed& p) {
  if (!p.on()) return state::check_initial_state(s0, q, causal);
  if (!s0) return;
  TORCH_CHECK_VALUE(causal, "initial_state needs causal=True (a non-causal row sees every key: no state to continue)");
  check_states("initial_state", *s0, p, q);
}

// A final state or its gradient: (N, 3, D) when packed, else (B, 3, D).
inline void check_final_state(const char* name, const Tensor& s, const Tensor& q, const Packed& p) {
  if (p.on())
    check_states(name, s, p, q);
  else
    state::check_final_state(name, s, q);
}

// The sequence of every packed token, (total_T,) int64 (an empty sequence owns no token).
inline Tensor token_sequence(const Packed& p, int64_t total) {
  const Tensor tok = at::arange(total, p.cu.options());
  return at::searchsorted(p.cu.slice(0, 1), tok, /*out_int32=*/false, /*right=*/true);
}

// Non-causal: the state of every sequence, (N, 3, D) (ka, va (1, total_T, D) accumulate type).
inline Tensor global_final_state(const Tensor& ka, const Tensor& va, const Tensor& seq, int64_t n) {
  const int64_t D = ka.size(2);
  const Tensor k2 = ka.select(0, 0), v2 = va.select(0, 0);
  const Tensor idx = seq.unsqueeze(1).expand_as(k2);
  const Tensor m =
      at::full({n, D}, -std::numeric_limits<double>::infinity(), ka.options()).scatter_reduce(0, idx, k2, "amax");
  const Tensor e = at::exp(k2 - state::safe_off(m).index_select(0, seq));
  const Tensor num = at::zeros({n, D}, ka.options()).index_add(0, seq, e * v2);
  const Tensor den = at::zeros({n, D}, ka.options()).index_add(0, seq, e);
  return at::stack({m, num, den}, 1);
}

// Non-causal: (dk, dv) (1, total_T, D) of the final states' gradient gF (N, 3, D).
inline std::tuple<Tensor, Tensor> global_final_state_grad(const Tensor& ka, const Tensor& va, const Tensor& sF,
                                                          const Tensor& gF, const Tensor& seq) {
  const Tensor P = at::exp(ka.select(0, 0) - state::safe_off(sF.select(1, 0)).index_select(0, seq));
  const Tensor gn = gF.select(1, 1).index_select(0, seq), gd = gF.select(1, 2).index_select(0, seq);
  return {(P * (va.select(0, 0) * gn + gd)).unsqueeze(0), (P * gn).unsqueeze(0)};
}

// state::route_max_residual per sequence: the residual of sequence n goes to its initial state (g0 row 0) or to
// its first key with k = mF[n].
inline Tensor route_max_residual(const Tensor& dk, const Tensor& ka, const Tensor& sF, const Tensor& gF,
                                 const Tensor* s0, Tensor* g0, const Tensor& seq) {
  const Tensor mF = sF.select(1, 0);
  const Tensor r = gF.select(1, 0) - sF.select(1, 1) * gF.select(1, 1) - sF.select(1, 2) * gF.select(1, 2);
  const Tensor live = at::isfinite(mF);
  Tensor to_state = at::zeros_like(live);
  if (s0) to_state = live & (s0->select(1, 0) == mF);
  if (g0 && s0) g0->select(1, 0).add_(at::where(to_state, r, at::zeros_like(r)));
  const int64_t total = ka.size(1);
  if (total == 0) return dk;
  const Tensor k2 = ka.select(0, 0);
  const Tensor idx = seq.unsqueeze(1).expand_as(k2);
  const Tensor tok = at::arange(total, seq.options()).unsqueeze(1).expand_as(k2);
  const Tensor hit = at::where(k2 == mF.index_select(0, seq), tok, at::full_like(tok, total));
  const Tensor first = at::full(mF.sizes(), total, seq.options()).scatter_reduce(0, idx, hit, "amin");
  const Tensor add = at::where(live & ~to_state & (first < total), r, at::zeros_like(r));
  Tensor dka = dk.to(ka.scalar_type());
  dka.select(0, 0).scatter_add_(0, first.clamp_max(total - 1), add);
  return dka.to(dk.scalar_type());
}

}  // namespace varlen
}  // namespace attnfree
