// AFT-simple on CPU. Causal: the band kernel (common/cpu_band.h, window = 1, no bias). Non-causal (AFT paper
// eq. 2 with w = 0 and every key visible), the kernel of this file:
//
// The weights exp(k[t', c]) do not depend on the query, so per (b, c) the whole layer is one softmax over T:
//   m = max_t' k,  S = sum_t' exp(k - m),  A = sum_t' exp(k - m) v,  ybar = A / S,  lse = m + log S,
//   y[t] = sigmoid(q[t]) * ybar                                         (two passes over k, v; one over q)
// Backward (saves only inputs, y, lse), with P[t'] = exp(k[t'] - lse) <= 1 and G = sum_t dy[t] sigmoid(q[t]):
//   dq[t] = dy[t] * ybar * sigmoid'(q[t]),  dv[t'] = P[t'] G,  dk[t'] = P[t'] (v[t'] - ybar) G.
// The band kernel computes the same numbers with prefix and suffix running-max scans; this is the short form
// for the global case: one exponential per key instead of four.
// Tasks are (b, chunk of channels); inner loops run over contiguous channels.
// Non-finite contract (docs/design.md §7): the max and the lse enter the exponentials through a safe offset (0
// where every key of the column is -inf), so -inf keys add exactly 0 and a column with no finite key gives y = 0,
// lse = -inf and zero gradients.
#include "aft_simple/aft_simple_cpu.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>

#include "aft_simple/aft_simple_global_vec.h"
#include "aft_simple/aft_simple_state.h"
#include "aft_simple/aft_simple_varlen.h"
#include "common/cpu_band.h"

namespace attnfree {
namespace cpu {
namespace {

template <typename acc_t>
void simple_global_fwd_kernel(const acc_t* __restrict__ q, const acc_t* __restrict__ k, const acc_t* __restrict__ v,
                              acc_t* __restrict__ y, acc_t* __restrict__ lse, int64_t B, int64_t T, int64_t D) {
  const int64_t ncc = (D + kChannelChunk - 1) / kChannelChunk;
  at::parallel_for(0, B * ncc, 1, [&](int64_t begin, int64_t end) {
    acc_t m[kChannelChunk], S[kChannelChunk], A[kChannelChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ncc, c0 = (task % ncc) * kChannelChunk;
      const int64_t nc = std::min(kChannelChunk, D - c0);
      const int64_t base = b * T * D + c0;
      for (int64_t c = 0; c < nc; ++c) {
        m[c] = -std::numeric_limits<acc_t>::infinity();
        S[c] = 0;
        A[c] = 0;
      }
      for (int64_t t = 0; t < T; ++t) {
        const acc_t* kr = k + base + t * D;
        for (int64_t c = 0; c < nc; ++c) m[c] = kr[c] > m[c] ? kr[c] : m[c];
      }
      // safe offset: 0 where every key is -inf (masked), so no (-inf) - (-inf) is formed (docs/design.md §7)
      for (int64_t c = 0; c < nc; ++c) m[c] = m[c] == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : m[c];
      for (int64_t t = 0; t < T; ++t) {
        const acc_t* kr = k + base + t * D;
        const acc_t* vr = v + base + t * D;
        for (int64_t c = 0; c < nc; ++c) {
          const acc_t e = std::exp(kr[c] - m[c]);  // <= 1, and the max key contributes exactly 1
          S[c] += e;
          A[c] += e * vr[c];
        }
      }
      for (int64_t c = 0; c < nc; ++c) {
        A[c] = S[c] == acc_t(0) ? acc_t(0) : A[c] / S[c];  // ybar; 0 for a column with no finite key
        m[c] += std::log(S[c]);                            // lse; -inf for that column
      }
      for (int64_t t = 0; t < T; ++t) {
        const acc_t* qr = q + base + t * D;
        acc_t* yr = y + base + t * D;
        acc_t* lr = lse + base + t * D;
        for (int64_t c = 0; c < nc; ++c) {
          yr[c] = sigmoid(qr[c]) * A[c];
          lr[c] = m[c];
        }
      }
    }
  });
}

template <typename acc_t>
void simple_global_bwd_kernel(const acc_t* __restrict__ dy, const acc_t* __restrict__ q, const acc_t* __restrict__ k,
                              const acc_t* __restrict__ v, const acc_t* __restrict__ lse, acc_t* __restrict__ dq,
                              acc_t* __restrict__ dk, acc_t* __restrict__ dv, int64_t B, int64_t T, int64_t D) {
  const int64_t ncc = (D + kChannelChunk - 1) / kChannelChunk;
  at::parallel_for(0, B * ncc, 1, [&](int64_t begin, int64_t end) {
    acc_t G[kChannelChunk], ybar[kChannelChunk];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ncc, c0 = (task % ncc) * kChannelChunk;
      const int64_t nc = std::min(kChannelChunk, D - c0);
      const int64_t base = b * T * D + c0;
      // the same for every t in the global case: row 0 holds it; a column with no finite key (lse = -inf) has
      // only -inf keys, so the offset 0 gives P = exp(-inf) = 0 there
      acc_t L[kChannelChunk];
      for (int64_t c = 0; c < nc; ++c) {
        const acc_t l = lse[base + c];
        L[c] = l == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : l;
        G[c] = 0;
        ybar[c] = 0;
      }
      for (int64_t t = 0; t < T; ++t) {
        const acc_t* dyr = dy + base + t * D;
        const acc_t* qr = q + base + t * D;
        const acc_t* kr = k + base + t * D;
        const acc_t* vr = v + base + t * D;
        for (int64_t c = 0; c < nc; ++c) {
          G[c] += dyr[c] * sigmoid(qr[c]);
          ybar[c] += std::exp(kr[c] - L[c]) * vr[c];
        }
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t o = base + t * D;
        for (int64_t c = 0; c < nc; ++c) {
          const acc_t s = sigmoid(q[o + c]);
          const acc_t P = std::exp(k[o + c] - L[c]);
          dq[o + c] = dy[o + c] * ybar[c] * s * (acc_t(1) - s);
          dv[o + c] = P * G[c];
          dk[o + c] = P * (v[o + c] - ybar[c]) * G[c];
        }
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> global_fwd(const at::Tensor& qa, const at::Tensor& ka, const at::Tensor& va) {
  const int64_t B = qa.size(0), T = qa.size(1), D = qa.size(2);
  at::Tensor y = at::empty({B, T, D}, qa.options());
  at::Tensor lse = at::empty({B, T, D}, qa.options());
  if (y.numel() == 0) return {y, lse};
  if (qa.scalar_type() == at::kFloat &&
      simple_global_fwd_avx2(qa.data_ptr<float>(), ka.data_ptr<float>(), va.data_ptr<float>(), y.data_ptr<float>(),
                             lse.data_ptr<float>(), B, T, D))
    return {y, lse};
  AT_DISPATCH_FLOATING_TYPES(qa.scalar_type(), "attnfree_simple_global_fwd", [&] {
    simple_global_fwd_kernel<scalar_t>(qa.data_ptr<scalar_t>(), ka.data_ptr<scalar_t>(), va.data_ptr<scalar_t>(),
                                       y.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(), B, T, D);
  });
  return {y, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> global_bwd(const at::Tensor& dya, const at::Tensor& qa,
                                                          const at::Tensor& ka, const at::Tensor& va,
                                                          const at::Tensor& lsea) {
  const int64_t B = qa.size(0), T = qa.size(1), D = qa.size(2);
  at::Tensor dq = at::empty({B, T, D}, qa.options());
  at::Tensor dk = at::empty({B, T, D}, qa.options());
  at::Tensor dv = at::empty({B, T, D}, qa.options());
  if (dq.numel() == 0) return {dq, dk, dv};
  if (qa.scalar_type() == at::kFloat &&
      simple_global_bwd_avx2(dya.data_ptr<float>(), qa.data_ptr<float>(), ka.data_ptr<float>(), va.data_ptr<float>(),
                             lsea.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(),
                             B, T, D))
    return {dq, dk, dv};
  AT_DISPATCH_FLOATING_TYPES(qa.scalar_type(), "attnfree_simple_global_bwd", [&] {
    simple_global_bwd_kernel<scalar_t>(dya.data_ptr<scalar_t>(), qa.data_ptr<scalar_t>(), ka.data_ptr<scalar_t>(),
                                       va.data_ptr<scalar_t>(), lsea.data_ptr<scalar_t>(), dq.data_ptr<scalar_t>(),
                                       dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), B, T, D);
  });
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor> dense_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal) {
  check_qkv(q, k, v);
  if (!causal) {
    auto r = global_fwd(acc_contiguous(q, q), acc_contiguous(k, q), acc_contiguous(v, q));
    return {std::get<0>(r).to(q.scalar_type()), std::get<1>(r)};
  }
  return band_fwd(q, k, v, nullptr, 1, 1, causal);
}

std::tuple<Tensor, Tensor, Tensor> dense_bwd(const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v,
                                             const Tensor& y, const Tensor& lse, bool causal) {
  check_qkv(q, k, v);
  check_saved(dy, q, y, lse);
  if (!causal) {
    auto r = global_bwd(acc_contiguous(dy, q), acc_contiguous(q, q), acc_contiguous(k, q), acc_contiguous(v, q),
                        acc_contiguous(lse, q));
    const auto dt = q.scalar_type();
    return {std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt)};
  }
  auto r = band_bwd(dy, q, k, v, nullptr, y, lse, 1, 1, causal);
  return {std::get<0>(r), std::get<1>(r), std::get<2>(r)};
}

std::tuple<Tensor, Tensor, Tensor> dense_state_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                   const c10::optional<Tensor>& initial_state) {
  check_qkv(q, k, v);
  const Tensor* s0 = state::opt_ptr(initial_state);
  state::check_initial_state(s0, q, causal);
  if (!causal) {
    const Tensor ka = acc_contiguous(k, q), va = acc_contiguous(v, q);
    auto r = global_fwd(acc_contiguous(q, q), ka, va);
    return {std::get<0>(r).to(q.scalar_type()), std::get<1>(r), state::global_final_state(ka, va)};
  }
  Tensor sF;
  auto r = band_fwd(q, k, v, nullptr, 1, 1, true, s0, &sF);
  return {std::get<0>(r), std::get<1>(r), sF};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> dense_state_bwd(const Tensor& dy, const c10::optional<Tensor>& dfinal_state,
                                                           const Tensor& q, const Tensor& k, const Tensor& v,
                                                           const c10::optional<Tensor>& initial_state, const Tensor& y,
                                                           const Tensor& lse, const Tensor& final_state, bool causal) {
  check_qkv(q, k, v);
  check_saved(dy, q, y, lse);
  const Tensor* s0 = state::opt_ptr(initial_state);
  state::check_initial_state(s0, q, causal);
  state::check_final_state("final_state", final_state, q);
  const Tensor* gFp = state::opt_ptr(dfinal_state);
  if (gFp) state::check_final_state("dfinal_state", *gFp, q);
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
  const Tensor sF = final_state.to(acc).contiguous();
  Tensor gF;
  if (gFp) gF = gFp->to(acc).contiguous();
  const auto dt = q.scalar_type();
  Tensor dq, dk, dv;
  Tensor g0 = at::zeros({B, 3, D}, q.options().dtype(acc));
  if (!causal) {
    std::tie(dq, dk, dv) = dense_bwd(dy, q, k, v, y, lse, false);
    if (gFp && T > 0) {
      const Tensor ka = acc_contiguous(k, q), va = acc_contiguous(v, q);
      auto [dk2, dv2] = state::global_final_state_grad(ka, va, sF, gF);
      dk = (dk.to(acc) + dk2).to(dt);
      dv = (dv.to(acc) + dv2).to(dt);
    }
  } else {
    const Tensor ps = gFp ? state::pseudo_row(sF, gF) : Tensor();
    Tensor ks;
    auto r = band_bwd(dy, q, k, v, nullptr, y, lse, 1, 1, true, gFp ? &ps : nullptr, s0, s0 ? &ks : nullptr);
    dq = std::get<0>(r);
    dk = std::get<1>(r);
    dv = std::get<2>(r);
    if (s0) g0 = T > 0 ? state::initial_state_grad(ks, s0->to(acc)) : (gFp ? gF.clone() : g0);
  }
  if (gFp && T > 0) {
    const Tensor s0a = s0 ? s0->to(acc) : Tensor();
    dk = state::route_max_residual(dk, acc_contiguous(k, q), sF, gF, s0 ? &s0a : nullptr, &g0);
  }
  return {dq, dk, dv, g0};
}

// Packed sequences: each sequence runs alone on its rows (views of the packed tensors, no padding), the kernels
// parallel over its channels; results are written into the packed outputs and the per-sequence states.
template <class F>
void for_each_sequence(const varlen::Packed& p, F f) {
  const int64_t* c = p.cu.data_ptr<int64_t>();
  for (int64_t n = 0; n < p.n; ++n) f(n, c[n], c[n + 1] - c[n]);
}

Tensor rows(const Tensor& x, int64_t start, int64_t len) { return x.narrow(1, start, len); }
c10::optional<Tensor> state_row(const Tensor* s, int64_t n) {
  return s ? c10::optional<Tensor>(s->narrow(0, n, 1)) : c10::nullopt;
}

}  // namespace

std::tuple<Tensor, Tensor> aft_simple_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                          const c10::optional<Tensor>& cu_seqlens, c10::optional<int64_t> max_seqlen) {
  check_qkv(q, k, v);
  const varlen::Packed p = varlen::check(cu_seqlens, max_seqlen, q);
  if (!p.on()) return dense_fwd(q, k, v, causal);
  Tensor y = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty(q.sizes(), q.options().dtype(acc_dtype(q.scalar_type())));
  for_each_sequence(p, [&](int64_t, int64_t s, int64_t len) {
    if (len == 0) return;
    auto [yi, li] = dense_fwd(rows(q, s, len), rows(k, s, len), rows(v, s, len), causal);
    rows(y, s, len).copy_(yi);
    rows(lse, s, len).copy_(li);
  });
  return {y, lse};
}

std::tuple<Tensor, Tensor, Tensor> aft_simple_bwd(const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const Tensor& y, const Tensor& lse, bool causal,
                                                  const c10::optional<Tensor>& cu_seqlens,
                                                  c10::optional<int64_t> max_seqlen) {
  check_qkv(q, k, v);
  const varlen::Packed p = varlen::check(cu_seqlens, max_seqlen, q);
  if (!p.on()) return dense_bwd(dy, q, k, v, y, lse, causal);
  check_saved(dy, q, y, lse);
  Tensor dq = at::zeros(q.sizes(), q.options()), dk = at::zeros(q.sizes(), q.options());
  Tensor dv = at::zeros(q.sizes(), q.options());
  for_each_sequence(p, [&](int64_t, int64_t s, int64_t len) {
    if (len == 0) return;
    auto r = dense_bwd(rows(dy, s, len), rows(q, s, len), rows(k, s, len), rows(v, s, len), rows(y, s, len),
                       rows(lse, s, len), causal);
    rows(dq, s, len).copy_(std::get<0>(r));
    rows(dk, s, len).copy_(std::get<1>(r));
    rows(dv, s, len).copy_(std::get<2>(r));
  });
  return {dq, dk, dv};
}

std::tuple<Tensor, Tensor, Tensor> aft_simple_state_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal,
                                                        const c10::optional<Tensor>& initial_state,
                                                        const c10::optional<Tensor>& cu_seqlens,
                                                        c10::optional<int64_t> max_seqlen) {
  check_qkv(q, k, v);
  const varlen::Packed p = varlen::check(cu_seqlens, max_seqlen, q);
  if (!p.on()) return dense_state_fwd(q, k, v, causal, initial_state);
  const Tensor* s0 = state::opt_ptr(initial_state);
  varlen::check_initial_state(s0, q, causal, p);
  const auto acc = acc_dtype(q.scalar_type());
  Tensor y = at::empty(q.sizes(), q.options());
  Tensor lse = at::empty(q.sizes(), q.options().dtype(acc));
  Tensor sF = at::empty({p.n, 3, q.size(2)}, q.options().dtype(acc));
  for_each_sequence(p, [&](int64_t n, int64_t s, int64_t len) {
    auto [yi, li, si] = dense_state_fwd(rows(q, s, len), rows(k, s, len), rows(v, s, len), causal, state_row(s0, n));
    rows(y, s, len).copy_(yi);
    rows(lse, s, len).copy_(li);
    sF.narrow(0, n, 1).copy_(si);
  });
  return {y, lse, sF};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> aft_simple_state_bwd(
    const Tensor& dy, const c10::optional<Tensor>& dfinal_state, const Tensor& q, const Tensor& k, const Tensor& v,
    const c10::optional<Tensor>& initial_state, const Tensor& y, const Tensor& lse, const Tensor& final_state,
    bool causal, const c10::optional<Tensor>& cu_seqlens, c10::optional<int64_t> max_seqlen) {
  check_qkv(q, k, v);
  const varlen::Packed p = varlen::check(cu_seqlens, max_seqlen, q);
  if (!p.on()) return dense_state_bwd(dy, dfinal_state, q, k, v, initial_state, y, lse, final_state, causal);
  check_saved(dy, q, y, lse);
  const Tensor* s0 = state::opt_ptr(initial_state);
  varlen::check_initial_state(s0, q, causal, p);
  varlen::check_states("final_state", final_state, p, q);
  const Tensor* gF = state::opt_ptr(dfinal_state);
  if (gF) varlen::check_states("dfinal_state", *gF, p, q);
  Tensor dq = at::empty(q.sizes(), q.options()), dk = at::empty(q.sizes(), q.options());
  Tensor dv = at::empty(q.sizes(), q.options());
  Tensor g0 = at::zeros({p.n, 3, q.size(2)}, q.options().dtype(acc_dtype(q.scalar_type())));
  for_each_sequence(p, [&](int64_t n, int64_t s, int64_t len) {
    auto r = dense_state_bwd(rows(dy, s, len), state_row(gF, n), rows(q, s, len), rows(k, s, len), rows(v, s, len),
                             state_row(s0, n), rows(y, s, len), rows(lse, s, len), final_state.narrow(0, n, 1), causal);
    rows(dq, s, len).copy_(std::get<0>(r));
    rows(dk, s, len).copy_(std::get<1>(r));
    rows(dv, s, len).copy_(std::get<2>(r));
    g0.narrow(0, n, 1).copy_(std::get<3>(r));
  });
  return {dq, dk, dv, g0};
}

}  // namespace cpu
}  // namespace attnfree
