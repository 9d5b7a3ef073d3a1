// The "band" CPU kernels shared by aft_full (per-element path), aft_local and causal aft_simple.
//
// All three are one band computation. For query t, channel c (head h = c / (D / heads)) the logits are
//   k[t', c] + w[h, t, t']   for keys in the band  |t - t'| < window   (and t' <= t when causal)
//   k[t', c]                 for every other visible key (bias 0: AFT-local's global term)
// aft_full  = band with window = T (every key is in the band, nothing outside),
// aft_local = band with the user's window,
// aft_simple= band with window = 1 and no bias (w = 0): a pure running-max recurrence (causal; the non-causal
//             form is one softmax over T, aft_simple/aft_simple_cpu.cpp).
//
// Forward, per (b, head, channel-chunk) task, queries in increasing t:
//   * band keys: exact per element (one max pass, one exp pass, vectorised over channels),
//   * keys t' <= t - window: a prefix state (max m, num a, den d) advanced one key per query (RWKV-style
//     running-max recurrence), keys t' >= t + window (non-causal): suffix states from one reverse scan,
//   * all parts merged under one common max, so nothing overflows and no 0/0 can occur:
//     lse = M + log S, y = sigmoid(q) * A / S.
// Backward (saves only inputs, y, lse): P = exp(w' + k - lse) <= 1.
//   dv[t'] = sum_t P G, sumPH[t'] = sum_t P H; band part exact; out-of-band part
//   exp(k[t']) * sum_{t >= t'+window} exp(-lse[t]) G[t] (+ the mirror sum over t <= t'-window, non-causal)
//   kept as (ref = min lse, scaled sums) so exp(k[t'] - ref) <= 1 and nothing overflows.
//   dw[h, t, t'] = sum_{b, c in h} P (G v[t'] - H) is a second pass parallel over rows (h, t).
// Non-finite contract (docs/design.md §7): every running max and every lse enters an exponential through a safe
// offset (0 where the max is -inf; +inf for a query row whose lse is -inf), so a -inf key adds exactly 0, a row
// with no finite logit gives y = 0, lse = -inf and zero gradients, and nothing forms (-inf) - (-inf).
// Causal window 1 without bias (causal aft_simple) in float32 on AVX2 takes the chunked form of cpu_band_vec.cpp
// instead (chunk max first, one exp per element; G, H and dq formed inside the backward kernel).
// Low-precision inputs are converted once to float32 (all math in float32), float64 stays float64.
// Non-contiguous inputs are made contiguous once.
#include "common/cpu_band.h"

#include "common/cpu_band_vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace attnfree {
namespace cpu {
namespace {

// One task of the band kernels: batch b, head h, and the chunk of at most kChannelChunk channels
// [c0, c0 + nc) of that head; base is the offset of (b, t = 0, c0) in a (B, T, D) tensor.
struct BandTask {
  int64_t b, h, c0, nc, base;
  BandTask(int64_t task, int64_t T, int64_t D, int64_t H, int64_t Dh, int64_t CH, int64_t ncc) {
    b = task / (H * ncc);
    h = (task / ncc) % H;
    const int64_t cc = task % ncc;
    c0 = h * Dh + cc * CH;
    nc = std::min(CH, Dh - cc * CH);
    base = b * T * D + c0;
  }
};

// x where x != -inf, else 0: the offset of exp(a - off) when every a may be -inf (a masked key, an empty
// state), so that no (-inf) - (-inf) is formed (docs/design.md §7 rules 3-4).
template <typename acc_t>
inline acc_t safe_off(acc_t x) {
  return x == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : x;
}

// exp(x - lse) for a query row: 0 where lse = -inf (a row with no finite logit contributes nothing).
template <typename acc_t>
inline acc_t safe_lse(acc_t l) {
  return l == -std::numeric_limits<acc_t>::infinity() ? std::numeric_limits<acc_t>::infinity() : l;
}

// Adds key (k, v) to a running-max state (max m, numerator a, denominator d): the RWKV-style recurrence. A -inf
// key adds exactly 0; a NaN key is ignored by the max (std::max keeps m) and propagates through e.
template <typename acc_t>
inline void add_key(acc_t& m, acc_t& a, acc_t& d, acc_t k, acc_t v) {
  const acc_t m2 = std::max(m, k);
  const acc_t off = safe_off(m2);
  const acc_t sc = std::exp(m - off);
  const acc_t e = std::exp(k - off);
  d = d * sc + e;
  a = a * sc + e * v;
  m = m2;
}

template <typename acc_t>
void band_fwd_kernel(const acc_t* __restrict__ q, const acc_t* __restrict__ k, const acc_t* __restrict__ v,
                     const acc_t* __restrict__ w, acc_t* __restrict__ y, acc_t* __restrict__ lse, int64_t B, int64_t T,
                     int64_t D, int64_t H, int64_t window, bool causal, const acc_t* __restrict__ s0,
                     acc_t* __restrict__ sF) {
  const int64_t Dh = D / H;
  const int64_t CH = std::min<int64_t>(Dh, kChannelChunk);
  const int64_t ncc = (Dh + CH - 1) / CH;
  const int64_t ntask = B * H * ncc;
  const bool has_suffix = !causal && window < T;
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mx(CH), S(CH), A(CH), pm(CH), pa(CH), pd(CH);
    std::vector<acc_t> sm, sa, sd;
    if (has_suffix) {
      sm.resize(T * CH);
      sa.resize(T * CH);
      sd.resize(T * CH);
    }
    for (int64_t task = begin; task < end; ++task) {
      const BandTask tk(task, T, D, H, Dh, CH, ncc);
      const int64_t nc = tk.nc, base = tk.base;
      const acc_t* kb = k + base;
      const acc_t* vb = v + base;
      const acc_t* qb = q + base;
      acc_t* yb = y + base;
      acc_t* lb = lse + base;
      const acc_t* wh = w ? w + tk.h * T * T : nullptr;

      if (has_suffix) {
        // suffix state at s covers keys s..T-1 (needed for s = t + window >= window)
        for (int64_t c = 0; c < nc; ++c) {
          pm[c] = ninf;
          pa[c] = 0;
          pd[c] = 0;
        }
        for (int64_t s = T - 1; s >= window; --s) {
          const acc_t* kr = kb + s * D;
          const acc_t* vr = vb + s * D;
          acc_t* m_s = sm.data() + s * CH;
          acc_t* a_s = sa.data() + s * CH;
          acc_t* d_s = sd.data() + s * CH;
          for (int64_t c = 0; c < nc; ++c) {
            add_key(pm[c], pa[c], pd[c], kr[c], vr[c]);
            m_s[c] = pm[c];
            a_s[c] = pa[c];
            d_s[c] = pd[c];
          }
        }
      }

      const int64_t sbase = tk.b * 3 * D + tk.c0;  // (b, row, c0) of a (B, 3, D) state
      for (int64_t c = 0; c < nc; ++c) {
        pm[c] = s0 ? s0[sbase + c] : ninf;  // the initial state: keys before t = 0
        pa[c] = s0 ? s0[sbase + D + c] : acc_t(0);
        pd[c] = s0 ? s0[sbase + 2 * D + c] : acc_t(0);
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t tp_old = t - window;  // newest key that left the band on the left
        if (tp_old >= 0) {
          const acc_t* kr = kb + tp_old * D;
          const acc_t* vr = vb + tp_old * D;
          for (int64_t c = 0; c < nc; ++c) add_key(pm[c], pa[c], pd[c], kr[c], vr[c]);
        }
        const bool hasP = tp_old >= 0 || s0;
        const bool hasS = has_suffix && t + window <= T - 1;
        const int64_t lo = std::max<int64_t>(0, t - window + 1);
        const int64_t hi = causal ? t : std::min<int64_t>(T - 1, t + window - 1);
        const acc_t* wrow = wh ? wh + t * T : nullptr;

        for (int64_t c = 0; c < nc; ++c) mx[c] = ninf;
        for (int64_t tp = lo; tp <= hi; ++tp) {
          const acc_t wv = wrow ? wrow[tp] : acc_t(0);
          const acc_t* kr = kb + tp * D;
          for (int64_t c = 0; c < nc; ++c) {
            const acc_t l = kr[c] + wv;
            mx[c] = l > mx[c] ? l : mx[c];
          }
        }
        const acc_t* m_s = hasS ? sm.data() + (t + window) * CH : nullptr;
        const acc_t* a_s = hasS ? sa.data() + (t + window) * CH : nullptr;
        const acc_t* d_s = hasS ? sd.data() + (t + window) * CH : nullptr;
        for (int64_t c = 0; c < nc; ++c) {
          acc_t M = mx[c];
          if (hasP) M = std::max(M, pm[c]);
          if (hasS) M = std::max(M, m_s[c]);
          M = safe_off(M);
          mx[c] = M;
          acc_t s_ = 0, a_ = 0;
          if (hasP) {
            const acc_t e = std::exp(pm[c] - M);
            s_ += pd[c] * e;
            a_ += pa[c] * e;
          }
          if (hasS) {
            const acc_t e = std::exp(m_s[c] - M);
            s_ += d_s[c] * e;
            a_ += a_s[c] * e;
          }
          S[c] = s_;
          A[c] = a_;
        }
        for (int64_t tp = lo; tp <= hi; ++tp) {
          const acc_t wv = wrow ? wrow[tp] : acc_t(0);
          const acc_t* kr = kb + tp * D;
          const acc_t* vr = vb + tp * D;
          for (int64_t c = 0; c < nc; ++c) {
            const acc_t e = std::exp(kr[c] + wv - mx[c]);
            S[c] += e;
            A[c] += e * vr[c];
          }
        }
        const acc_t* qr = qb + t * D;
        acc_t* yr = yb + t * D;
        acc_t* lr = lb + t * D;
        for (int64_t c = 0; c < nc; ++c) {
          lr[c] = mx[c] + std::log(S[c]);  // -inf where no logit is finite (S = 0, offset 0)
          yr[c] = S[c] == acc_t(0) ? acc_t(0) : sigmoid(qr[c]) * (A[c] / S[c]);
        }
      }
      if (sF) {  // the state after the last key: the prefix plus the keys still in the band of row T - 1
        for (int64_t tp = std::max<int64_t>(0, T - window); tp < T; ++tp) {
          const acc_t* kr = kb + tp * D;
          const acc_t* vr = vb + tp * D;
          for (int64_t c = 0; c < nc; ++c) add_key(pm[c], pa[c], pd[c], kr[c], vr[c]);
        }
        for (int64_t c = 0; c < nc; ++c) {
          sF[sbase + c] = pm[c];
          sF[sbase + D + c] = pa[c];
          sF[sbase + 2 * D + c] = pd[c];
        }
      }
    }
  });
}

// Scaled sum over queries of exp(-lse[t]) * X[t]: value = exp(-ref) * s. l is the query's lse through safe_lse
// (+inf for a row with no finite logit: it adds exactly 0). ref = +inf is the empty sum; the offset is 0 there.
template <typename acc_t>
inline void add_query(acc_t& ref, acc_t& sG, acc_t& sH, acc_t l, acc_t g, acc_t hh) {
  const acc_t r2 = std::min(ref, l);
  const acc_t off = r2 == std::numeric_limits<acc_t>::infinity() ? acc_t(0) : r2;
  const acc_t sc = std::exp(off - ref);  // ref = +inf (empty) -> 0
  const acc_t e = std::exp(off - l);
  sG = sG * sc + e * g;
  sH = sH * sc + e * hh;
  ref = r2;
}

template <typename acc_t>
void band_bwd_kernel(const acc_t* __restrict__ G, const acc_t* __restrict__ Hm, const acc_t* __restrict__ k,
                     const acc_t* __restrict__ v, const acc_t* __restrict__ w, const acc_t* __restrict__ lse,
                     acc_t* __restrict__ dk, acc_t* __restrict__ dv, acc_t* __restrict__ dw, int64_t B, int64_t T,
                     int64_t D, int64_t H, int64_t window, bool causal, const acc_t* __restrict__ ps,
                     const acc_t* __restrict__ m0, acc_t* __restrict__ ks) {
  const int64_t Dh = D / H;
  const int64_t CH = std::min<int64_t>(Dh, kChannelChunk);
  const int64_t ncc = (Dh + CH - 1) / CH;
  const int64_t ntask = B * H * ncc;
  const bool has_mirror = !causal && window < T;
  const acc_t pinf = std::numeric_limits<acc_t>::infinity();

  // pass 1: dv and dk per (b, head, channel chunk)
  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> ref(CH), sG(CH), sH(CH), accv(CH), acch(CH), sph(T * CH);
    for (int64_t task = begin; task < end; ++task) {
      const BandTask tk(task, T, D, H, Dh, CH, ncc);
      const int64_t nc = tk.nc, base = tk.base;
      const acc_t* kb = k + base;
      const acc_t* vb = v + base;
      const acc_t* Gb = G + base;
      const acc_t* Hb = Hm + base;
      const acc_t* lb = lse + base;
      acc_t* dvb = dv + base;
      acc_t* dkb = dk + base;
      const acc_t* wh = w ? w + tk.h * T * T : nullptr;

      for (int64_t c = 0; c < nc; ++c) {
        ref[c] = pinf;
        sG[c] = 0;
        sH[c] = 0;
      }
      bool has = false;
      const int64_t sbase = tk.b * 3 * D + tk.c0;
      if (ps) {  // the final state's gradient: one more query after row T - 1, seeing every key
        has = true;
        for (int64_t c = 0; c < nc; ++c)
          add_query(ref[c], sG[c], sH[c], safe_lse(ps[sbase + c]), ps[sbase + D + c], ps[sbase + 2 * D + c]);
      }
      for (int64_t tp = T - 1; tp >= 0; --tp) {
        const int64_t tq = tp + window;  // queries t >= tp + window see key tp with bias 0
        if (tq <= T - 1) {
          has = true;
          const acc_t* lr = lb + tq * D;
          const acc_t* gr = Gb + tq * D;
          const acc_t* hr = Hb + tq * D;
          for (int64_t c = 0; c < nc; ++c) add_query(ref[c], sG[c], sH[c], safe_lse(lr[c]), gr[c], hr[c]);
        }
        const acc_t* kr = kb + tp * D;
        if (has) {
          for (int64_t c = 0; c < nc; ++c) {
            const acc_t s = std::exp(kr[c] - ref[c]);
            accv[c] = s * sG[c];
            acch[c] = s * sH[c];
          }
        } else {
          for (int64_t c = 0; c < nc; ++c) {
            accv[c] = 0;
            acch[c] = 0;
          }
        }
        const int64_t lo = causal ? tp : std::max<int64_t>(0, tp - window + 1);
        const int64_t hi = std::min<int64_t>(T - 1, tp + window - 1);
        for (int64_t t = lo; t <= hi; ++t) {
          const acc_t wv = wh ? wh[t * T + tp] : acc_t(0);
          const acc_t* lr = lb + t * D;
          const acc_t* gr = Gb + t * D;
          const acc_t* hr = Hb + t * D;
          for (int64_t c = 0; c < nc; ++c) {
            const acc_t P = std::exp(wv + kr[c] - safe_lse(lr[c]));
            accv[c] += P * gr[c];
            acch[c] += P * hr[c];
          }
        }
        acc_t* dvr = dvb + tp * D;
        acc_t* sp = sph.data() + tp * CH;
        for (int64_t c = 0; c < nc; ++c) {
          dvr[c] = accv[c];
          sp[c] = acch[c];
        }
      }
      if (ks) {  // the initial state as a key before t = 0 (window = 1: every row sees it with bias 0)
        const acc_t* lr = lb;
        const acc_t* gr = Gb;
        const acc_t* hr = Hb;
        for (int64_t c = 0; c < nc; ++c) add_query(ref[c], sG[c], sH[c], safe_lse(lr[c]), gr[c], hr[c]);
        const int64_t kbase = tk.b * 2 * D + tk.c0;
        for (int64_t c = 0; c < nc; ++c) {
          const acc_t s = std::exp((m0 ? m0[sbase + c] : -pinf) - ref[c]);
          ks[kbase + c] = s * sG[c];
          ks[kbase + D + c] = s * sH[c];
        }
      }
      if (has_mirror) {  // non-causal: queries t <= tp - window see key tp with bias 0
        for (int64_t c = 0; c < nc; ++c) {
          ref[c] = pinf;
          sG[c] = 0;
          sH[c] = 0;
        }
        for (int64_t tp = window; tp < T; ++tp) {
          const int64_t tq = tp - window;
          const acc_t* lr = lb + tq * D;
          const acc_t* gr = Gb + tq * D;
          const acc_t* hr = Hb + tq * D;
          for (int64_t c = 0; c < nc; ++c) add_query(ref[c], sG[c], sH[c], safe_lse(lr[c]), gr[c], hr[c]);
          const acc_t* kr = kb + tp * D;
          acc_t* dvr = dvb + tp * D;
          acc_t* sp = sph.data() + tp * CH;
          for (int64_t c = 0; c < nc; ++c) {
            const acc_t s = std::exp(kr[c] - ref[c]);
            dvr[c] += s * sG[c];
            sp[c] += s * sH[c];
          }
        }
      }
      for (int64_t tp = 0; tp < T; ++tp) {
        const acc_t* vr = vb + tp * D;
        const acc_t* dvr = dvb + tp * D;
        const acc_t* sp = sph.data() + tp * CH;
        acc_t* dkr = dkb + tp * D;
        for (int64_t c = 0; c < nc; ++c) dkr[c] = vr[c] * dvr[c] - sp[c];
      }
    }
  });

  if (!w) return;
  // pass 2: dw[h, t, t'] = sum_{b, c in h} P (G[t] v[t'] - H[t]) over the band, rows in parallel
  at::parallel_for(0, H * T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row / T;
      const int64_t t = row % T;
      const int64_t lo = std::max<int64_t>(0, t - window + 1);
      const int64_t hi = causal ? t : std::min<int64_t>(T - 1, t + window - 1);
      const acc_t* wrow = w + (h * T + t) * T;
      acc_t* dwrow = dw + (h * T + t) * T;
      for (int64_t tp = lo; tp <= hi; ++tp) {
        const acc_t wv = wrow[tp];
        acc_t acc = 0;
        for (int64_t b = 0; b < B; ++b) {
          const int64_t qo = (b * T + t) * D + h * Dh;
          const int64_t ko = (b * T + tp) * D + h * Dh;
          const acc_t* lr = lse + qo;
          const acc_t* gr = G + qo;
          const acc_t* hr = Hm + qo;
          const acc_t* kr = k + ko;
          const acc_t* vr = v + ko;
          for (int64_t c = 0; c < Dh; ++c) {
            const acc_t P = std::exp(wv + kr[c] - safe_lse(lr[c]));
            acc += P * (gr[c] * vr[c] - hr[c]);
          }
        }
        dwrow[tp] = acc;
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor> band_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor* w, int64_t heads,
                                    int64_t window, bool causal, const Tensor* s0, Tensor* sF) {
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
  TORCH_INTERNAL_ASSERT(!(s0 || sF) || (causal && !w && window == 1), "band_fwd: a state needs causal, no bias");
  Tensor s0a;
  if (s0) s0a = s0->to(acc).contiguous();
  if (sF) {
    *sF = s0 ? s0a.clone() : at::empty({B, 3, D}, q.options().dtype(acc));
    if (!s0) {
      sF->select(1, 0).fill_(-std::numeric_limits<double>::infinity());
      sF->narrow(1, 1, 2).zero_();
    }
  }
  Tensor qa = q.to(acc).contiguous(), ka = k.to(acc).contiguous(), va = v.to(acc).contiguous();
  Tensor wa;
  if (w) wa = w->to(acc).contiguous();
  Tensor y = at::empty({B, T, D}, qa.options());
  Tensor lse = at::empty({B, T, D}, qa.options());
  const bool vec =
      y.numel() > 0 && acc == at::kFloat &&
      band_fwd_avx2(qa.data_ptr<float>(), ka.data_ptr<float>(), va.data_ptr<float>(),
                    w ? wa.data_ptr<float>() : nullptr, y.data_ptr<float>(), lse.data_ptr<float>(), B, T, D, heads,
                    window, causal, s0 ? s0a.data_ptr<float>() : nullptr, sF ? sF->data_ptr<float>() : nullptr);
  if (y.numel() > 0 && !vec) {
    AT_DISPATCH_FLOATING_TYPES(acc, "attnfree_band_fwd", [&] {
      band_fwd_kernel<scalar_t>(qa.data_ptr<scalar_t>(), ka.data_ptr<scalar_t>(), va.data_ptr<scalar_t>(),
                                w ? wa.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                B, T, D, heads, window, causal, s0 ? s0a.data_ptr<scalar_t>() : nullptr,
                                sF ? sF->data_ptr<scalar_t>() : nullptr);
    });
  }
  return {y.to(q.scalar_type()), lse};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> band_bwd(const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v,
                                                    const Tensor* w, const Tensor& y, const Tensor& lse, int64_t heads,
                                                    int64_t window, bool causal, const Tensor* ps, const Tensor* s0,
                                                    Tensor* ks) {
  const auto acc = acc_dtype(q.scalar_type());
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
  TORCH_INTERNAL_ASSERT(!(ps || ks) || (causal && !w && window == 1), "band_bwd: a state needs causal, no bias");
  Tensor psa, s0a;
  if (ps) psa = ps->to(acc).contiguous();
  if (s0) s0a = s0->to(acc).contiguous();
  if (ks) *ks = at::zeros({B, 2, D}, q.options().dtype(acc));
  if (causal && !w && window == 1 && acc == at::kFloat && B * T * D > 0) {  // causal aft_simple: G, H fused in
    const Tensor dyc = dy.to(acc).contiguous(), qc = q.to(acc).contiguous(), yc = y.to(acc).contiguous();
    const Tensor kc = k.to(acc).contiguous(), vc = v.to(acc).contiguous(), lc = lse.to(acc).contiguous();
    Tensor dq = at::empty({B, T, D}, kc.options()), dk = at::empty({B, T, D}, kc.options());
    Tensor dv = at::empty({B, T, D}, kc.options());
    if (simple_causal_bwd_avx2(dyc.data_ptr<float>(), qc.data_ptr<float>(), yc.data_ptr<float>(), kc.data_ptr<float>(),
                               vc.data_ptr<float>(), lc.data_ptr<float>(), dq.data_ptr<float>(), dk.data_ptr<float>(),
                               dv.data_ptr<float>(), B, T, D, ps ? psa.data_ptr<float>() : nullptr,
                               s0 ? s0a.data_ptr<float>() : nullptr, ks ? ks->data_ptr<float>() : nullptr))
      return {dq.to(q.scalar_type()), dk.to(q.scalar_type()), dv.to(q.scalar_type()), Tensor()};
  }
  Tensor dya = dy.to(acc), qa = q.to(acc), ya = y.to(acc);
  Tensor sq = at::sigmoid(qa);
  Tensor Gt = (dya * sq).contiguous();  // G = dy * sigmoid(q) = dZ
  Tensor Ht = (dya * ya).contiguous();  // H = dy * y = dZ * Z
  Tensor dq = (Ht * (1 - sq)).to(q.scalar_type());
  Tensor ka = k.to(acc).contiguous(), va = v.to(acc).contiguous();
  Tensor la = lse.to(acc).contiguous();
  Tensor wa, dw;
  if (w) {
    wa = w->to(acc).contiguous();
    dw = at::zeros(wa.sizes(), wa.options());
  }
  Tensor dk = at::empty({B, T, D}, ka.options());
  Tensor dv = at::empty({B, T, D}, ka.options());
  const bool vec = dk.numel() > 0 && acc == at::kFloat &&
                   band_bwd_avx2(Gt.data_ptr<float>(), Ht.data_ptr<float>(), ka.data_ptr<float>(), va.data_ptr<float>(),
                                 w ? wa.data_ptr<float>() : nullptr, la.data_ptr<float>(), dk.data_ptr<float>(),
                                 dv.data_ptr<float>(), w ? dw.data_ptr<float>() : nullptr, B, T, D, heads, window,
                                 causal, ps ? psa.data_ptr<float>() : nullptr, s0 ? s0a.data_ptr<float>() : nullptr,
                                 ks ? ks->data_ptr<float>() : nullptr);
  if (dk.numel() > 0 && !vec) {
    AT_DISPATCH_FLOATING_TYPES(acc, "attnfree_band_bwd", [&] {
      band_bwd_kernel<scalar_t>(Gt.data_ptr<scalar_t>(), Ht.data_ptr<scalar_t>(), ka.data_ptr<scalar_t>(),
                                va.data_ptr<scalar_t>(), w ? wa.data_ptr<scalar_t>() : nullptr, la.data_ptr<scalar_t>(),
                                dk.data_ptr<scalar_t>(), dv.data_ptr<scalar_t>(), w ? dw.data_ptr<scalar_t>() : nullptr,
                                B, T, D, heads, window, causal, ps ? psa.data_ptr<scalar_t>() : nullptr,
                                s0 ? s0a.data_ptr<scalar_t>() : nullptr, ks ? ks->data_ptr<scalar_t>() : nullptr);
    });
  }
  if (w) dw = dw.to(w->scalar_type());
  return {dq, dk.to(q.scalar_type()), dv.to(q.scalar_type()), dw};
}

}  // namespace cpu
}  // namespace attnfree
