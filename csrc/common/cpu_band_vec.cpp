// AVX2/FMA float32 versions of the band kernels of cpu_band.cpp (same algorithm, same task split, 8 channels per
// vector; docs/design.md §2.6, §2.7, §3). Used by band_fwd / band_bwd when the data is float32 and the CPU has
// AVX2+FMA (cpu_simd.h); the scalar kernels stay the fallback. Non-finite contract (docs/design.md §7): every
// running max uses a safe offset (0 where the max is -inf), so masked keys contribute exactly 0, a row with no
// finite logit gives y = 0, lse = -inf and zero gradients, and NaN propagates through the arithmetic.
// Causal window 1 without bias (causal aft_simple) has its own chunked kernels here (simple_causal_fwd/bwd).
// Bit-identical for any thread count: each (b, head, channel chunk) task and each dw row is computed by one thread
// in a fixed order.
#include "common/cpu_band_vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common/cpu_common.h"
#include "common/cpu_simd.h"

namespace attnfree {
namespace cpu {

#ifdef ATTNFREE_HAVE_AVX2_PATH
using namespace simd;

// Everything up to pop_options is compiled for AVX2/FMA, lambdas (parallel_for bodies) included; the
// exported entry points below it are baseline code that checks the CPU first.
#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

constexpr int64_t kCH = kChannelChunk;  // channels per task (a multiple of 8)

struct Task {
  int64_t b, h, c0, nc, base;
  Task(int64_t task, int64_t T, int64_t D, int64_t H, int64_t Dh, int64_t CH, int64_t ncc) {
    b = task / (H * ncc);
    h = (task / ncc) % H;
    const int64_t cc = task % ncc;
    c0 = h * Dh + cc * CH;
    nc = std::min(CH, Dh - cc * CH);
    base = b * T * D + c0;
  }
};

// running-max state (m, a, d) += key (k, v): the RWKV-style recurrence with a safe offset
AF_AVX2 void vadd_key(float* pm, float* pa, float* pd, const float* kr, const float* vr, int64_t nc) {
  for (int64_t c = 0; c < nc; c += 8) {
    const int64_t n = nc - c;
    const __m256 m = loadn(pm + c, n), k = loadn(kr + c, n), v = loadn(vr + c, n);
    const __m256 m2 = vmax_keep(m, k);
    const __m256 off = vsafe_off(m2);
    const __m256 sc = vexp(_mm256_sub_ps(m, off));
    const __m256 e = vexp(_mm256_sub_ps(k, off));
    storen(pd + c, _mm256_fmadd_ps(loadn(pd + c, n), sc, e), n);
    storen(pa + c, _mm256_fmadd_ps(loadn(pa + c, n), sc, _mm256_mul_ps(e, v)), n);
    storen(pm + c, m2, n);
  }
}

// Causal window 1 without bias (causal aft_simple, docs/design.md §2.7) in chunks of kSteps steps: per chunk and
// channel the chunk max first, then one exp per element under M = max(prefix max, chunk max) and one rescale of
// the carried state per chunk, instead of the running-max recurrence's two exps per step. A chunk whose first row
// has its largest term more than kGap below M (a spike inside the chunk: the earlier rows' sums would lose their
// digits) is walked with the recurrence instead. n is the count of valid lanes (8 or more: all of them).
constexpr int64_t kSteps = 16;
constexpr float kGap = 40.f;

// Row t's outputs from the state (a, d) under offset off: lse = off + log d, y = sigmoid(q) a / d (0 where d = 0).
AF_AVX2 void simple_row_out(const float* qr, float* yr, float* lr, __m256 off, __m256 a, __m256 d, int64_t n) {
  storen(lr, _mm256_add_ps(off, vlog(d)), n);
  const __m256 yv = _mm256_mul_ps(vsigmoid(loadn(qr, n)), _mm256_div_ps(a, d));
  storen(yr, _mm256_blendv_ps(yv, _mm256_setzero_ps(), _mm256_cmp_ps(d, _mm256_setzero_ps(), _CMP_EQ_OQ)), n);
}

AF_AVX2 void simple_chunk(const float* kb, const float* vb, const float* qb, float* yb, float* lb, int64_t D,
                          int64_t t0, int64_t t1, int64_t n, __m256& m, __m256& a, __m256& d) {
  __m256 Mc = loadn(kb + t0 * D, n);
  for (int64_t t = t0 + 1; t < t1; ++t) Mc = vmax_keep(Mc, loadn(kb + t * D, n));
  const __m256 M = vmax_keep(m, Mc);
  const __m256 r0 = vmax_keep(m, loadn(kb + t0 * D, n));
  // r0 - M < -kGap: a spike, or -inf keys before finite ones; (-inf) - (-inf) = NaN (no finite key yet) stays on
  // the chunked form, where every e is exactly 0
  const __m256 gap = _mm256_sub_ps(r0, M);
  const __m256 bad =
      _mm256_andnot_ps(_mm256_cmp_ps(gap, gap, _CMP_UNORD_Q), _mm256_cmp_ps(gap, _mm256_set1_ps(-kGap), _CMP_LT_OQ));
  if (_mm256_movemask_ps(bad) != 0) {
    for (int64_t t = t0; t < t1; ++t) {
      const __m256 kv = loadn(kb + t * D, n);
      const __m256 m2 = vmax_keep(m, kv);
      const __m256 off = vsafe_off(m2);
      const __m256 sc = vexp(_mm256_sub_ps(m, off));
      const __m256 e = vexp(_mm256_sub_ps(kv, off));
      d = _mm256_fmadd_ps(d, sc, e);
      a = _mm256_fmadd_ps(a, sc, _mm256_mul_ps(e, loadn(vb + t * D, n)));
      m = m2;
      simple_row_out(qb + t * D, yb + t * D, lb + t * D, off, a, d, n);
    }
    return;
  }
  const __m256 off = vsafe_off(M);
  const __m256 sc = vexp(_mm256_sub_ps(m, off));  // 0 for an empty prefix (m = -inf)
  d = _mm256_mul_ps(d, sc);
  a = _mm256_mul_ps(a, sc);
  for (int64_t t = t0; t < t1; ++t) {
    const __m256 e = vexp(_mm256_sub_ps(loadn(kb + t * D, n), off));
    d = _mm256_add_ps(d, e);
    a = _mm256_fmadd_ps(e, loadn(vb + t * D, n), a);
    simple_row_out(qb + t * D, yb + t * D, lb + t * D, off, a, d, n);
  }
  m = M;
}

__attribute__((target("avx2,fma"))) void simple_causal_fwd(const float* __restrict__ q, const float* __restrict__ k,
                                                           const float* __restrict__ v, float* __restrict__ y,
                                                           float* __restrict__ lse, int64_t B, int64_t T, int64_t D,
                                                           const float* __restrict__ s0, float* __restrict__ sF) {
  const int64_t ncc = (D + kCH - 1) / kCH;
  at::parallel_for(0, B * ncc, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ncc, c0 = (task % ncc) * kCH;
      const int64_t nc = std::min(kCH, D - c0);
      const int64_t base = b * T * D + c0;
      const int64_t sbase = b * 3 * D + c0;  // (b, row, c0) of a (B, 3, D) state
      for (int64_t c = 0; c < nc; c += 8) {
        const int64_t n = nc - c;
        __m256 m = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
        __m256 a = _mm256_setzero_ps(), d = _mm256_setzero_ps();
        if (s0) {  // the initial state: keys before t = 0
          m = loadn(s0 + sbase + c, n);
          a = loadn(s0 + sbase + D + c, n);
          d = loadn(s0 + sbase + 2 * D + c, n);
        }
        for (int64_t t0 = 0; t0 < T; t0 += kSteps)
          simple_chunk(k + base + c, v + base + c, q + base + c, y + base + c, lse + base + c, D, t0,
                       std::min(T, t0 + kSteps), n, m, a, d);
        if (sF) {
          storen(sF + sbase + c, m, n);
          storen(sF + sbase + D + c, a, n);
          storen(sF + sbase + 2 * D + c, d, n);
        }
      }
    }
  });
}

__attribute__((target("avx2,fma"))) void fwd_kernel(const float* __restrict__ q, const float* __restrict__ k,
                                                    const float* __restrict__ v, const float* __restrict__ w,
                                                    float* __restrict__ y, float* __restrict__ lse, int64_t B,
                                                    int64_t T, int64_t D, int64_t H, int64_t window, bool causal,
                                                    const float* __restrict__ s0, float* __restrict__ sF) {
  const int64_t Dh = D / H;
  const int64_t CH = std::min<int64_t>(Dh, kCH);
  const int64_t ncc = (Dh + CH - 1) / CH;
  const int64_t ntask = B * H * ncc;
  if (causal && window == 1 && !w) return simple_causal_fwd(q, k, v, y, lse, B, T, D, s0, sF);
  const bool has_suffix = !causal && window < T;
  const float ninf = -std::numeric_limits<float>::infinity();

  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float pm[kCH], pa[kCH], pd[kCH];
    std::vector<float> sm, sa, sd;
    if (has_suffix) {
      sm.resize(T * CH);
      sa.resize(T * CH);
      sd.resize(T * CH);
    }
    for (int64_t task = begin; task < end; ++task) {
      const Task tk(task, T, D, H, Dh, CH, ncc);
      const int64_t nc = tk.nc, base = tk.base;
      const float* kb = k + base;
      const float* vb = v + base;
      const float* qb = q + base;
      float* yb = y + base;
      float* lb = lse + base;
      const float* wh = w ? w + tk.h * T * T : nullptr;

      if (has_suffix) {
        std::fill(pm, pm + CH, ninf);
        std::fill(pa, pa + CH, 0.f);
        std::fill(pd, pd + CH, 0.f);
        for (int64_t s = T - 1; s >= window; --s) {
          vadd_key(pm, pa, pd, kb + s * D, vb + s * D, nc);
          std::copy(pm, pm + nc, sm.data() + s * CH);
          std::copy(pa, pa + nc, sa.data() + s * CH);
          std::copy(pd, pd + nc, sd.data() + s * CH);
        }
      }
      std::fill(pm, pm + CH, ninf);
      std::fill(pa, pa + CH, 0.f);
      std::fill(pd, pd + CH, 0.f);
      const int64_t sbase = tk.b * 3 * D + tk.c0;  // (b, row, c0) of a (B, 3, D) state
      if (s0) {                                    // the initial state: keys before t = 0
        std::copy(s0 + sbase, s0 + sbase + nc, pm);
        std::copy(s0 + sbase + D, s0 + sbase + D + nc, pa);
        std::copy(s0 + sbase + 2 * D, s0 + sbase + 2 * D + nc, pd);
      }
      for (int64_t t = 0; t < T; ++t) {
        const int64_t tp_old = t - window;
        if (tp_old >= 0) vadd_key(pm, pa, pd, kb + tp_old * D, vb + tp_old * D, nc);
        const bool hasP = tp_old >= 0 || s0;
        const bool hasS = has_suffix && t + window <= T - 1;
        const int64_t lo = std::max<int64_t>(0, t - window + 1);
        const int64_t hi = causal ? t : std::min<int64_t>(T - 1, t + window - 1);
        const float* wrow = wh ? wh + t * T : nullptr;
        const float* m_s = hasS ? sm.data() + (t + window) * CH : nullptr;
        const float* a_s = hasS ? sa.data() + (t + window) * CH : nullptr;
        const float* d_s = hasS ? sd.data() + (t + window) * CH : nullptr;
        const float* qr = qb + t * D;
        float* yr = yb + t * D;
        float* lr = lb + t * D;
        for (int64_t c = 0; c < nc; c += 8) {
          const int64_t n = nc - c;
          __m256 M = _mm256_set1_ps(ninf);
          for (int64_t tp = lo; tp <= hi; ++tp) {
            const __m256 wv = _mm256_set1_ps(wrow ? wrow[tp] : 0.f);
            M = vmax_keep(M, _mm256_add_ps(loadn(kb + tp * D + c, n), wv));
          }
          if (hasP) M = vmax_keep(M, loadn(pm + c, n));
          if (hasS) M = vmax_keep(M, loadn(m_s + c, n));
          const __m256 off = vsafe_off(M);
          __m256 s_ = _mm256_setzero_ps(), a_ = _mm256_setzero_ps();
          if (hasP) {
            const __m256 e = vexp(_mm256_sub_ps(loadn(pm + c, n), off));
            s_ = _mm256_mul_ps(loadn(pd + c, n), e);
            a_ = _mm256_mul_ps(loadn(pa + c, n), e);
          }
          if (hasS) {
            const __m256 e = vexp(_mm256_sub_ps(loadn(m_s + c, n), off));
            s_ = _mm256_fmadd_ps(loadn(d_s + c, n), e, s_);
            a_ = _mm256_fmadd_ps(loadn(a_s + c, n), e, a_);
          }
          for (int64_t tp = lo; tp <= hi; ++tp) {
            const __m256 wv = _mm256_set1_ps(wrow ? wrow[tp] : 0.f);
            const __m256 e = vexp(_mm256_sub_ps(_mm256_add_ps(loadn(kb + tp * D + c, n), wv), off));
            s_ = _mm256_add_ps(s_, e);
            a_ = _mm256_fmadd_ps(e, loadn(vb + tp * D + c, n), a_);
          }
          storen(lr + c, _mm256_add_ps(off, vlog(s_)), n);
          __m256 yv = _mm256_mul_ps(vsigmoid(loadn(qr + c, n)), _mm256_div_ps(a_, s_));
          yv = _mm256_blendv_ps(yv, _mm256_setzero_ps(), _mm256_cmp_ps(s_, _mm256_setzero_ps(), _CMP_EQ_OQ));
          storen(yr + c, yv, n);
        }
      }
      if (sF) {  // the state after the last key: the prefix plus the keys still in the band of row T - 1
        for (int64_t tp = std::max<int64_t>(0, T - window); tp < T; ++tp)
          vadd_key(pm, pa, pd, kb + tp * D, vb + tp * D, nc);
        std::copy(pm, pm + nc, sF + sbase);
        std::copy(pa, pa + nc, sF + sbase + D);
        std::copy(pd, pd + nc, sF + sbase + 2 * D);
      }
    }
  });
}

// lse with -inf (row without a finite logit) replaced by +inf, so that exp(x - lse) = 0 there
AF_AVX2 __m256 load_lse(const float* p, int64_t n) {
  const __m256 l = loadn(p, n);
  return _mm256_blendv_ps(l, _mm256_set1_ps(__builtin_inff()),
                          _mm256_cmp_ps(l, _mm256_set1_ps(-__builtin_inff()), _CMP_EQ_OQ));
}

// scaled query sums: value = exp(-ref) * s; ref starts at +inf (empty)
AF_AVX2 void vadd_query(float* ref, float* sG, float* sH, const float* lr, const float* gr, const float* hr,
                        int64_t nc) {
  for (int64_t c = 0; c < nc; c += 8) {
    const int64_t n = nc - c;
    const __m256 r = loadn(ref + c, n), l = load_lse(lr + c, n);
    __m256 r2 = _mm256_min_ps(l, r);  // NaN lse propagates
    const __m256 r2s =
        _mm256_blendv_ps(r2, _mm256_setzero_ps(), _mm256_cmp_ps(r2, _mm256_set1_ps(__builtin_inff()), _CMP_EQ_OQ));
    const __m256 sc = vexp(_mm256_sub_ps(r2s, r));
    const __m256 e = vexp(_mm256_sub_ps(r2s, l));
    storen(sG + c, _mm256_fmadd_ps(loadn(sG + c, n), sc, _mm256_mul_ps(e, loadn(gr + c, n))), n);
    storen(sH + c, _mm256_fmadd_ps(loadn(sH + c, n), sc, _mm256_mul_ps(e, loadn(hr + c, n))), n);
    storen(ref + c, r2, n);
  }
}

// Causal window 1 without bias, backward (docs/design.md §2.7, §3), time reversed in chunks of kSteps rows:
// G = dy sigmoid(q), H = dy y and dq are formed here; the suffix sums over queries t >= t' of e^{-lse[t]} (G, H)
// are kept under ref = the smallest lse seen (+inf when empty), rescaled once per chunk to the chunk's smallest
// lse, so each row costs one exp for its weight and one for e^{k - ref}. Key t' sees every row t >= t', whose
// lse >= k[t'], so e^{k - ref} <= e^{kGap} when the chunk's last row lies within kGap of ref; otherwise (a low
// lse inside the chunk) the chunk is walked with the per-row running min, as the band kernel does.
AF_AVX2 void simple_bwd_row(const float* dyr, const float* qr, const float* yr, float* dqr, int64_t n, __m256& g,
                            __m256& h) {
  const __m256 dyv = loadn(dyr, n);
  const __m256 s = vsigmoid(loadn(qr, n));
  g = _mm256_mul_ps(dyv, s);
  h = _mm256_mul_ps(dyv, loadn(yr, n));
  storen(dqr, _mm256_mul_ps(h, _mm256_sub_ps(_mm256_set1_ps(1.0f), s)), n);
}

AF_AVX2 void simple_bwd_chunk(const float* dyb, const float* qb, const float* yb, const float* kb, const float* vb,
                              const float* lb, float* dqb, float* dkb, float* dvb, int64_t D, int64_t t0, int64_t t1,
                              int64_t n, __m256& ref, __m256& sG, __m256& sH) {
  const __m256 pinf = _mm256_set1_ps(__builtin_inff());
  __m256 rc = load_lse(lb + (t1 - 1) * D, n);
  const __m256 rl = _mm256_min_ps(rc, ref);  // the running min at the chunk's last row
  for (int64_t t = t0; t < t1 - 1; ++t) rc = _mm256_min_ps(load_lse(lb + t * D, n), rc);
  const __m256 r2 = _mm256_min_ps(rc, ref);
  const __m256 gap = _mm256_sub_ps(rl, r2);  // NaN ((+inf) - (+inf)): no finite lse, exact either way
  if (_mm256_movemask_ps(_mm256_cmp_ps(gap, _mm256_set1_ps(kGap), _CMP_GT_OQ)) != 0) {
    for (int64_t t = t1 - 1; t >= t0; --t) {
      const int64_t o = t * D;
      __m256 g, h;
      simple_bwd_row(dyb + o, qb + o, yb + o, dqb + o, n, g, h);
      const __m256 l = load_lse(lb + o, n);
      const __m256 rn = _mm256_min_ps(l, ref);
      const __m256 rs = _mm256_blendv_ps(rn, _mm256_setzero_ps(), _mm256_cmp_ps(rn, pinf, _CMP_EQ_OQ));
      const __m256 sc = vexp(_mm256_sub_ps(rs, ref));
      const __m256 e = vexp(_mm256_sub_ps(rs, l));
      sG = _mm256_fmadd_ps(sG, sc, _mm256_mul_ps(e, g));
      sH = _mm256_fmadd_ps(sH, sc, _mm256_mul_ps(e, h));
      ref = rn;
      const __m256 sk = vexp(_mm256_sub_ps(loadn(kb + o, n), ref));
      const __m256 dvv = _mm256_mul_ps(sk, sG);
      storen(dvb + o, dvv, n);
      storen(dkb + o, _mm256_fmsub_ps(loadn(vb + o, n), dvv, _mm256_mul_ps(sk, sH)), n);
    }
    return;
  }
  const __m256 rs = _mm256_blendv_ps(r2, _mm256_setzero_ps(), _mm256_cmp_ps(r2, pinf, _CMP_EQ_OQ));
  const __m256 sc = vexp(_mm256_sub_ps(rs, ref));  // 0 for an empty suffix (ref = +inf)
  sG = _mm256_mul_ps(sG, sc);
  sH = _mm256_mul_ps(sH, sc);
  ref = r2;
  for (int64_t t = t1 - 1; t >= t0; --t) {
    const int64_t o = t * D;
    __m256 g, h;
    simple_bwd_row(dyb + o, qb + o, yb + o, dqb + o, n, g, h);
    const __m256 e = vexp(_mm256_sub_ps(rs, load_lse(lb + o, n)));
    sG = _mm256_fmadd_ps(e, g, sG);
    sH = _mm256_fmadd_ps(e, h, sH);
    const __m256 sk = vexp(_mm256_sub_ps(loadn(kb + o, n), ref));
    const __m256 dvv = _mm256_mul_ps(sk, sG);
    storen(dvb + o, dvv, n);
    storen(dkb + o, _mm256_fmsub_ps(loadn(vb + o, n), dvv, _mm256_mul_ps(sk, sH)), n);
  }
}

__attribute__((target("avx2,fma"))) void simple_causal_bwd(const float* __restrict__ dy, const float* __restrict__ q,
                                                           const float* __restrict__ y, const float* __restrict__ k,
                                                           const float* __restrict__ v, const float* __restrict__ lse,
                                                           float* __restrict__ dq, float* __restrict__ dk,
                                                           float* __restrict__ dv, int64_t B, int64_t T, int64_t D,
                                                           const float* __restrict__ ps, const float* __restrict__ m0,
                                                           float* __restrict__ ks) {
  const int64_t ncc = (D + kCH - 1) / kCH;
  at::parallel_for(0, B * ncc, 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = task / ncc, c0 = (task % ncc) * kCH;
      const int64_t nc = std::min(kCH, D - c0);
      const int64_t base = b * T * D + c0;
      const int64_t sbase = b * 3 * D + c0;
      for (int64_t c = 0; c < nc; c += 8) {
        const int64_t n = nc - c, o = base + c;  // lanes: min(n, 8)
        alignas(32) float ref[8], sG[8], sH[8];
        std::fill(ref, ref + 8, __builtin_inff());
        std::fill(sG, sG + 8, 0.f);
        std::fill(sH, sH + 8, 0.f);
        if (ps)
          vadd_query(ref, sG, sH, ps + sbase + c, ps + sbase + D + c, ps + sbase + 2 * D + c, std::min<int64_t>(n, 8));
        __m256 r = _mm256_load_ps(ref), g = _mm256_load_ps(sG), h = _mm256_load_ps(sH);
        for (int64_t t1 = T; t1 > 0; t1 -= kSteps)
          simple_bwd_chunk(dy + o, q + o, y + o, k + o, v + o, lse + o, dq + o, dk + o, dv + o, D,
                           std::max<int64_t>(0, t1 - kSteps), t1, n, r, g, h);
        if (ks) {  // the initial state as a key before t = 0, seen by every row
          const int64_t kbase = b * 2 * D + c0 + c;
          const __m256 mv = m0 ? loadn(m0 + sbase + c, n) : _mm256_set1_ps(-__builtin_inff());
          const __m256 sc = vexp(_mm256_sub_ps(mv, r));
          storen(ks + kbase, _mm256_mul_ps(sc, g), n);
          storen(ks + kbase + D, _mm256_mul_ps(sc, h), n);
        }
      }
    }
  });
}

__attribute__((target("avx2,fma"))) void bwd_kernel(const float* __restrict__ G, const float* __restrict__ Hm,
                                                    const float* __restrict__ k, const float* __restrict__ v,
                                                    const float* __restrict__ w, const float* __restrict__ lse,
                                                    float* __restrict__ dk, float* __restrict__ dv,
                                                    float* __restrict__ dw, int64_t B, int64_t T, int64_t D, int64_t H,
                                                    int64_t window, bool causal, const float* __restrict__ ps,
                                                    const float* __restrict__ m0, float* __restrict__ ks) {
  const int64_t Dh = D / H;
  const int64_t CH = std::min<int64_t>(Dh, kCH);
  const int64_t ncc = (Dh + CH - 1) / CH;
  const int64_t ntask = B * H * ncc;
  const bool has_mirror = !causal && window < T;
  const float pinf = std::numeric_limits<float>::infinity();

  at::parallel_for(0, ntask, 1, [&](int64_t begin, int64_t end) {
    alignas(32) float ref[kCH], sG[kCH], sH[kCH];
    std::vector<float> sph(T * CH);
    for (int64_t task = begin; task < end; ++task) {
      const Task tk(task, T, D, H, Dh, CH, ncc);
      const int64_t nc = tk.nc, base = tk.base;
      const float* kb = k + base;
      const float* vb = v + base;
      const float* Gb = G + base;
      const float* Hb = Hm + base;
      const float* lb = lse + base;
      float* dvb = dv + base;
      float* dkb = dk + base;
      const float* wh = w ? w + tk.h * T * T : nullptr;

      std::fill(ref, ref + CH, pinf);
      std::fill(sG, sG + CH, 0.f);
      std::fill(sH, sH + CH, 0.f);
      bool has = false;
      const int64_t sbase = tk.b * 3 * D + tk.c0;
      if (ps) {  // the final state's gradient: one more query after row T - 1, seeing every key
        has = true;
        vadd_query(ref, sG, sH, ps + sbase, ps + sbase + D, ps + sbase + 2 * D, nc);
      }
      for (int64_t tp = T - 1; tp >= 0; --tp) {
        const int64_t tq = tp + window;
        if (tq <= T - 1) {
          has = true;
          vadd_query(ref, sG, sH, lb + tq * D, Gb + tq * D, Hb + tq * D, nc);
        }
        const float* kr = kb + tp * D;
        const int64_t lo = causal ? tp : std::max<int64_t>(0, tp - window + 1);
        const int64_t hi = std::min<int64_t>(T - 1, tp + window - 1);
        float* dvr = dvb + tp * D;
        float* sp = sph.data() + tp * CH;
        for (int64_t c = 0; c < nc; c += 8) {
          const int64_t n = nc - c;
          const __m256 kv = loadn(kr + c, n);
          __m256 av = _mm256_setzero_ps(), ah = _mm256_setzero_ps();
          if (has) {
            const __m256 s = vexp(_mm256_sub_ps(kv, loadn(ref + c, n)));
            av = _mm256_mul_ps(s, loadn(sG + c, n));
            ah = _mm256_mul_ps(s, loadn(sH + c, n));
          }
          for (int64_t t = lo; t <= hi; ++t) {
            const __m256 wv = _mm256_set1_ps(wh ? wh[t * T + tp] : 0.f);
            const __m256 P = vexp(_mm256_sub_ps(_mm256_add_ps(wv, kv), load_lse(lb + t * D + c, n)));
            av = _mm256_fmadd_ps(P, loadn(Gb + t * D + c, n), av);
            ah = _mm256_fmadd_ps(P, loadn(Hb + t * D + c, n), ah);
          }
          storen(dvr + c, av, n);
          storen(sp + c, ah, n);
        }
      }
      if (ks) {  // the initial state as a key before t = 0 (window = 1: every row sees it with bias 0)
        vadd_query(ref, sG, sH, lb, Gb, Hb, nc);
        const int64_t kbase = tk.b * 2 * D + tk.c0;
        for (int64_t c = 0; c < nc; c += 8) {
          const int64_t n = nc - c;
          const __m256 mv = m0 ? loadn(m0 + sbase + c, n) : _mm256_set1_ps(-pinf);
          const __m256 sc = vexp(_mm256_sub_ps(mv, loadn(ref + c, n)));
          storen(ks + kbase + c, _mm256_mul_ps(sc, loadn(sG + c, n)), n);
          storen(ks + kbase + D + c, _mm256_mul_ps(sc, loadn(sH + c, n)), n);
        }
      }
      if (has_mirror) {
        std::fill(ref, ref + CH, pinf);
        std::fill(sG, sG + CH, 0.f);
        std::fill(sH, sH + CH, 0.f);
        for (int64_t tp = window; tp < T; ++tp) {
          const int64_t tq = tp - window;
          vadd_query(ref, sG, sH, lb + tq * D, Gb + tq * D, Hb + tq * D, nc);
          const float* kr = kb + tp * D;
          float* dvr = dvb + tp * D;
          float* sp = sph.data() + tp * CH;
          for (int64_t c = 0; c < nc; c += 8) {
            const int64_t n = nc - c;
            const __m256 s = vexp(_mm256_sub_ps(loadn(kr + c, n), loadn(ref + c, n)));
            storen(dvr + c, _mm256_fmadd_ps(s, loadn(sG + c, n), loadn(dvr + c, n)), n);
            storen(sp + c, _mm256_fmadd_ps(s, loadn(sH + c, n), loadn(sp + c, n)), n);
          }
        }
      }
      for (int64_t tp = 0; tp < T; ++tp) {
        const float* vr = vb + tp * D;
        const float* dvr = dvb + tp * D;
        const float* sp = sph.data() + tp * CH;
        float* dkr = dkb + tp * D;
        for (int64_t c = 0; c < nc; c += 8) {
          const int64_t n = nc - c;
          storen(dkr + c, _mm256_fmsub_ps(loadn(vr + c, n), loadn(dvr + c, n), loadn(sp + c, n)), n);
        }
      }
    }
  });

  if (!w) return;
  at::parallel_for(0, H * T, 1, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t h = row / T;
      const int64_t t = row % T;
      const int64_t lo = std::max<int64_t>(0, t - window + 1);
      const int64_t hi = causal ? t : std::min<int64_t>(T - 1, t + window - 1);
      const float* wrow = w + (h * T + t) * T;
      float* dwrow = dw + (h * T + t) * T;
      for (int64_t tp = lo; tp <= hi; ++tp) {
        const __m256 wv = _mm256_set1_ps(wrow[tp]);
        __m256 acc = _mm256_setzero_ps();
        for (int64_t b = 0; b < B; ++b) {
          const int64_t qo = (b * T + t) * D + h * Dh;
          const int64_t ko = (b * T + tp) * D + h * Dh;
          for (int64_t c = 0; c < Dh; c += 8) {
            const int64_t n = Dh - c;
            __m256 P = vexp(_mm256_sub_ps(_mm256_add_ps(wv, loadn(k + ko + c, n)), load_lse(lse + qo + c, n)));
            if (n < 8) P = _mm256_and_ps(P, _mm256_castsi256_ps(tail_mask(n)));  // lanes past Dh enter the sum
            const __m256 x = _mm256_fmsub_ps(loadn(G + qo + c, n), loadn(v + ko + c, n), loadn(Hm + qo + c, n));
            acc = _mm256_fmadd_ps(P, x, acc);
          }
        }
        alignas(32) float tmp[8];
        _mm256_store_ps(tmp, acc);
        dwrow[tp] = ((tmp[0] + tmp[1]) + (tmp[2] + tmp[3])) + ((tmp[4] + tmp[5]) + (tmp[6] + tmp[7]));
      }
    }
  });
}

}  // namespace

#pragma GCC pop_options

bool band_fwd_avx2(const float* q, const float* k, const float* v, const float* w, float* y, float* lse, int64_t B,
                   int64_t T, int64_t D, int64_t H, int64_t window, bool causal, const float* s0, float* sF) {
  if (!cpu_has_avx2_fma()) return false;
  fwd_kernel(q, k, v, w, y, lse, B, T, D, H, window, causal, s0, sF);
  return true;
}

bool simple_causal_bwd_avx2(const float* dy, const float* q, const float* y, const float* k, const float* v,
                            const float* lse, float* dq, float* dk, float* dv, int64_t B, int64_t T, int64_t D,
                            const float* ps, const float* m0, float* ks) {
  if (!cpu_has_avx2_fma()) return false;
  simple_causal_bwd(dy, q, y, k, v, lse, dq, dk, dv, B, T, D, ps, m0, ks);
  return true;
}

bool band_bwd_avx2(const float* G, const float* Hm, const float* k, const float* v, const float* w, const float* lse,
                   float* dk, float* dv, float* dw, int64_t B, int64_t T, int64_t D, int64_t H, int64_t window,
                   bool causal, const float* ps, const float* m0, float* ks) {
  if (!cpu_has_avx2_fma()) return false;
  bwd_kernel(G, Hm, k, v, w, lse, dk, dv, dw, B, T, D, H, window, causal, ps, m0, ks);
  return true;
}

#else  // not x86-64: the scalar kernels run

bool band_fwd_avx2(const float*, const float*, const float*, const float*, float*, float*, int64_t, int64_t, int64_t,
                   int64_t, int64_t, bool, const float*, float*) {
  return false;
}
bool simple_causal_bwd_avx2(const float*, const float*, const float*, const float*, const float*, const float*, float*,
                            float*, float*, int64_t, int64_t, int64_t, const float*, const float*, float*) {
  return false;
}
bool band_bwd_avx2(const float*, const float*, const float*, const float*, const float*, const float*, float*, float*,
                   float*, int64_t, int64_t, int64_t, int64_t, int64_t, bool, const float*, const float*, float*) {
  return false;
}

#endif

}  // namespace cpu
}  // namespace attnfree
