// AFT-local forward on CPU as banded tiles (docs/design.md §2.3, §2.6), float32, AVX2/FMA.
//
// Keys are split into tiles of tau = 64. For query tile I the keys any of its rows sees with bias w (the band
// |t - t'| < window) lie in the key tiles Jlo..Jhi (the "union", causal: up to I). Everything else is bias 0:
//   * far term: tiles < Jlo and (non-causal) > Jhi, one running-max state per (query tile, b, c) from prefix and
//     suffix scans over per-tile sums (the "one more tile" of §2.6);
//   * union: one factorised product per row block,
//       Ew[t, t'] = exp(w'[t, t'] - r[t])    (w' = w inside the band, 0 outside, -inf above the diagonal)
//       X[t', c]  = exp(k[t', c] - m_J[c])   (built once per key tile: XE, and XE * v: XV)
//       [n | d][t, c] = sum_J s_J[c] * (Ew_J @ [XV_J | XE_J])[t, c],   s_J[c] = exp(m_J[c] - m_U[c]) <= 1
//     with r[t] the row max of w' over the union and m_U = max_J m_J, so every factor is in [0, 1];
//   * one merge per output element: l = r + m_U + log d against the far state, lse = M + log S,
//     y = sigmoid(q) * A / S.
// Exponentials: ~0.2 per output element for Ew, ~2 for X, 5 for the merge and sigmoid -- instead of one per band
// element. Exactness guard (§2.4): where d < 1e-30 (the band part may have underflowed, also any NaN) the band
// part of that (t, c) is recomputed exactly per element; a key tile holding a NaN in k or v sends its whole
// (query tile, b) through that exact path, so that 0 * NaN from an invisible or masked key can never leak
// (docs/design.md §7). Bit-identical for any thread count: tasks (query tile, head) are computed by one thread
// each, in a fixed order.
#include "aft_local/aft_local_tiled.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

constexpr int64_t kTau = 64;
constexpr float kTiny = 1e-30f;

// exact band-union part for query t, channel c: (mx, s, a) over keys [u0, u1) with logits k + w'
// (skipping -inf, NaN propagating); mx = -inf when nothing is visible.
void exact_union(const float* kcol, const float* vcol, int64_t D, const float* wrow, int64_t t, int64_t u0, int64_t u1,
                 int64_t window, bool causal, float& mx, float& s, float& a) {
  const float ninf = -std::numeric_limits<float>::infinity();
  mx = ninf;
  bool nan = false;
  const int64_t hi = causal ? std::min(u1, t + 1) : u1;
  for (int64_t tp = u0; tp < hi; ++tp) {
    const float wv = (tp - t < window && t - tp < window) ? wrow[tp] : 0.f;
    const float l = kcol[tp * D] + wv;
    if (std::isnan(l)) nan = true;
    if (l > mx) mx = l;
  }
  s = 0;
  a = 0;
  if (nan) {
    mx = s = a = std::numeric_limits<float>::quiet_NaN();
    return;
  }
  if (mx == ninf) return;
  for (int64_t tp = u0; tp < hi; ++tp) {
    const float wv = (tp - t < window && t - tp < window) ? wrow[tp] : 0.f;
    const float l = kcol[tp * D] + wv;
    if (l == ninf) continue;
    const float e = std::exp(l - mx);
    s += e;
    a += e * vcol[tp * D];
  }
}

// the final merge of the band part (offset o, sums n, d) with the far state (Mf, Sf, Af); writes y and lse
AF_AVX2 void finish(__m256 o, __m256 n, __m256 d, __m256 Mf, __m256 Sf, __m256 Af, __m256 q, float* yp, float* lp,
                    int64_t cnt) {
  const __m256 l = _mm256_add_ps(o, vlog(d));
  const __m256 M = vmax_keep(Mf, l);
  const __m256 Ms = vsafe_off(M);
  const __m256 e1 = vexp(_mm256_sub_ps(o, Ms));
  const __m256 e2 = vexp(_mm256_sub_ps(Mf, Ms));
  const __m256 S = _mm256_fmadd_ps(d, e1, _mm256_mul_ps(Sf, e2));
  const __m256 A = _mm256_fmadd_ps(n, e1, _mm256_mul_ps(Af, e2));
  storen(lp, _mm256_add_ps(Ms, vlog(S)), cnt);
  __m256 y = _mm256_mul_ps(vsigmoid(q), _mm256_div_ps(A, S));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(S, _mm256_setzero_ps(), _CMP_EQ_OQ));
  storen(yp, y, cnt);
}

// NR rows x 8 channels of the union product: n, d = sum_J s_J * (Ew_J @ [XV_J | XE_J])
template <int NR>
AF_AVX2 void union_block(const float* Ew, int64_t ldE, const float* XV, const float* XE, int64_t D, const float* sJ,
                         int64_t nsc, int64_t c, int64_t cnt, int64_t u0, int64_t u1, __m256* n, __m256* d) {
  for (int r = 0; r < NR; ++r) n[r] = d[r] = _mm256_setzero_ps();
  for (int64_t j0 = u0; j0 < u1; j0 += kTau) {
    const int64_t j1 = std::min(u1, j0 + kTau);
    __m256 tn[NR], td[NR];
    for (int r = 0; r < NR; ++r) tn[r] = td[r] = _mm256_setzero_ps();
    for (int64_t tp = j0; tp < j1; ++tp) {
      const __m256 xv = loadn(XV + tp * D + c, cnt);
      const __m256 xe = loadn(XE + tp * D + c, cnt);
      const float* er = Ew + (tp - u0);
      for (int r = 0; r < NR; ++r) {
        const __m256 e = _mm256_broadcast_ss(er + r * ldE);
        tn[r] = _mm256_fmadd_ps(e, xv, tn[r]);
        td[r] = _mm256_fmadd_ps(e, xe, td[r]);
      }
    }
    const __m256 s = loadn(sJ + ((j0 - u0) / kTau) * nsc + c, cnt);
    for (int r = 0; r < NR; ++r) {
      n[r] = _mm256_fmadd_ps(tn[r], s, n[r]);
      d[r] = _mm256_fmadd_ps(td[r], s, d[r]);
    }
  }
}

__attribute__((target("avx2,fma"))) void fwd(const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, const float* __restrict__ w,
                                             float* __restrict__ y, float* __restrict__ lse, int64_t B, int64_t T,
                                             int64_t D, int64_t H, int64_t window, bool causal) {
  const int64_t nt = (T + kTau - 1) / kTau;
  const int64_t Dh = D / H;
  const float ninf = -std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  std::vector<float> XE(B * T * D), XV(B * T * D);
  std::vector<float> tm(B * nt * D), tS(B * nt * D), tA(B * nt * D);  // per key tile: max, sums
  std::vector<unsigned char> bad(B * nt, 0);                          // tile holds a NaN in k or v

  // pass 0: per (b, key tile) the offsets, XE = exp(k - m), XV = XE * v, the tile sums and the NaN flag
  at::parallel_for(0, B * nt, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / nt, J = p % nt;
      const int64_t j0 = J * kTau, j1 = std::min(T, j0 + kTau);
      float* m = tm.data() + p * D;
      float* sE = tS.data() + p * D;
      float* sV = tA.data() + p * D;
      __m256 nanacc = _mm256_setzero_ps();
      for (int64_t c = 0; c < D; c += 8) {
        const int64_t cnt = D - c;
        __m256 mx = _mm256_set1_ps(ninf);
        for (int64_t tp = j0; tp < j1; ++tp) {
          const __m256 kv = loadn(k + (b * T + tp) * D + c, cnt);
          const __m256 vv = loadn(v + (b * T + tp) * D + c, cnt);
          nanacc = _mm256_or_ps(nanacc, _mm256_cmp_ps(kv, vv, _CMP_UNORD_Q));
          mx = vmax_keep(mx, kv);
        }
        const __m256 off = vsafe_off(mx);
        __m256 se = _mm256_setzero_ps(), sv = _mm256_setzero_ps();
        for (int64_t tp = j0; tp < j1; ++tp) {
          const int64_t o = (b * T + tp) * D + c;
          const __m256 kv = loadn(k + o, cnt);
          const __m256 x = vexp(_mm256_sub_ps(kv, off));
          __m256 xv = _mm256_mul_ps(x, loadn(v + o, cnt));
          xv = _mm256_blendv_ps(xv, _mm256_setzero_ps(), _mm256_cmp_ps(kv, _mm256_set1_ps(ninf), _CMP_EQ_OQ));
          storen(XE.data() + o, x, cnt);
          storen(XV.data() + o, xv, cnt);
          se = _mm256_add_ps(se, x);
          sv = _mm256_add_ps(sv, xv);
        }
        storen(m + c, mx, cnt);
        storen(sE + c, se, cnt);
        storen(sV + c, sv, cnt);
      }
      bad[p] = _mm256_movemask_ps(nanacc) != 0;
    }
  });

  // per query tile: band union [Jlo, Jhi], far term = prefix over tiles < Jlo (+ suffix over tiles > Jhi)
  auto union_of = [&](int64_t I, int64_t& Jlo, int64_t& Jhi) {
    const int64_t i0 = I * kTau, i1 = std::min(T, i0 + kTau);
    Jlo = std::max<int64_t>(0, i0 - window + 1) / kTau;
    Jhi = causal ? I : std::min<int64_t>(T - 1, i1 - 1 + window - 1) / kTau;
  };

  at::parallel_for(0, nt * H, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> Ew, r(kTau), mU(Dh), sJ, Mf(Dh), Sf(Dh), Af(Dh);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t I = p / H, h = p % H;
      const int64_t i0 = I * kTau, i1 = std::min(T, i0 + kTau), ni = i1 - i0;
      int64_t Jlo, Jhi;
      union_of(I, Jlo, Jhi);
      const int64_t u0 = Jlo * kTau, u1 = std::min(T, (Jhi + 1) * kTau), nu = u1 - u0, nJ = Jhi - Jlo + 1;
      const float* wh = w + h * T * T;
      // Ew rows: w' = w in the band, 0 outside, -inf above the diagonal (causal); r = row max (safe)
      Ew.assign(kTau * nu, 0.f);
      for (int64_t ii = 0; ii < ni; ++ii) {
        const int64_t t = i0 + ii;
        const float* wrow = wh + t * T;
        float* er = Ew.data() + ii * nu;
        __m256 mx = _mm256_set1_ps(ninf);
        for (int64_t c = 0; c < nu; c += 8) {
          const int64_t cnt = nu - c;
          const __m256i tp = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(u0 + c - t)),
                                              _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));  // t' - t
          const __m256i wn = _mm256_set1_epi32(static_cast<int>(window));
          const __m256i inband = _mm256_and_si256(_mm256_cmpgt_epi32(wn, tp),
                                                  _mm256_cmpgt_epi32(tp, _mm256_sub_epi32(_mm256_setzero_si256(), wn)));
          __m256 x = _mm256_and_ps(loadn(wrow + u0 + c, cnt), _mm256_castsi256_ps(inband));  // 0 outside the band
          if (causal)
            x = _mm256_blendv_ps(x, _mm256_set1_ps(ninf),
                                 _mm256_castsi256_ps(_mm256_cmpgt_epi32(tp, _mm256_setzero_si256())));
          x = _mm256_blendv_ps(_mm256_set1_ps(ninf), x, _mm256_castsi256_ps(tail_mask(cnt)));
          storen(er + c, x, cnt);
          mx = vmax_keep(mx, x);
        }
        float rm = hmax(mx);
        // NaN-ignoring max above; an all -inf row gets offset 0
        if (rm == ninf) rm = 0;
        r[ii] = rm;
        const __m256 rv = _mm256_set1_ps(rm);
        for (int64_t c = 0; c < nu; c += 8) {
          const int64_t cnt = nu - c;
          storen(er + c, vexp(_mm256_sub_ps(loadn(er + c, cnt), rv)), cnt);
        }
      }
      sJ.resize(nJ * Dh);
      for (int64_t b = 0; b < B; ++b) {
        bool any_bad = false;
        for (int64_t J = Jlo; J <= Jhi; ++J) any_bad |= bad[b * nt + J] != 0;
        const int64_t hc = h * Dh;
        // union offsets m_U, scales s_J, far state
        for (int64_t c = 0; c < Dh; c += 8) {
          const int64_t cnt = Dh - c;
          __m256 mu = _mm256_set1_ps(ninf);
          for (int64_t J = Jlo; J <= Jhi; ++J) mu = vmax_keep(mu, loadn(tm.data() + (b * nt + J) * D + hc + c, cnt));
          const __m256 mus = vsafe_off(mu);
          storen(mU.data() + c, mus, cnt);
          // a tile with every key masked (m_J = -inf) gets scale 0, not exp(0 - m_U): its sums are 0, and a
          // scale exp(-m_U) would overflow for m_U < -88 (0 * inf)
          for (int64_t J = Jlo; J <= Jhi; ++J) {
            const __m256 mj = loadn(tm.data() + (b * nt + J) * D + hc + c, cnt);
            storen(sJ.data() + (J - Jlo) * Dh + c, vexp(_mm256_sub_ps(mj, mus)), cnt);
          }
          // far state: running max over the far tiles
          __m256 M = _mm256_set1_ps(ninf), S = _mm256_setzero_ps(), A = _mm256_setzero_ps();
          auto add_tile = [&](int64_t J) {
            const int64_t o = (b * nt + J) * D + hc + c;
            const __m256 mj = loadn(tm.data() + o, cnt);
            const __m256 M2 = vmax_keep(M, mj);
            const __m256 off = vsafe_off(M2);
            const __m256 e1 = vexp(_mm256_sub_ps(M, off));
            const __m256 e2 = vexp(_mm256_sub_ps(mj, off));  // masked tile (mj = -inf): 0, never inf * 0
            S = _mm256_fmadd_ps(S, e1, _mm256_mul_ps(loadn(tS.data() + o, cnt), e2));
            A = _mm256_fmadd_ps(A, e1, _mm256_mul_ps(loadn(tA.data() + o, cnt), e2));
            M = M2;
          };
          for (int64_t J = 0; J < Jlo; ++J) add_tile(J);
          if (!causal)
            for (int64_t J = Jhi + 1; J < nt; ++J) add_tile(J);
          storen(Mf.data() + c, M, cnt);
          storen(Sf.data() + c, S, cnt);
          storen(Af.data() + c, A, cnt);
        }
        const float* XVb = XV.data() + b * T * D + hc;
        const float* XEb = XE.data() + b * T * D + hc;
        const float* kb = k + b * T * D + hc;
        const float* vb = v + b * T * D + hc;
        for (int64_t ii = 0; ii < ni; ii += 4) {
          const int64_t nr = std::min<int64_t>(4, ni - ii);
          for (int64_t c = 0; c < Dh; c += 8) {
            const int64_t cnt = std::min<int64_t>(8, Dh - c);
            __m256 n[4], d[4];
            if (!any_bad) {
              if (nr == 4)
                union_block<4>(Ew.data() + ii * nu, nu, XVb, XEb, D, sJ.data(), Dh, c, cnt, u0, u1, n, d);
              else
                for (int64_t rr = 0; rr < nr; ++rr)
                  union_block<1>(Ew.data() + (ii + rr) * nu, nu, XVb, XEb, D, sJ.data(), Dh, c, cnt, u0, u1, n + rr,
                                 d + rr);
            }
            const __m256 mu = loadn(mU.data() + c, cnt);
            const __m256 Mfv = loadn(Mf.data() + c, cnt), Sfv = loadn(Sf.data() + c, cnt),
                         Afv = loadn(Af.data() + c, cnt);
            for (int64_t rr = 0; rr < nr; ++rr) {
              const int64_t t = i0 + ii + rr;
              const int64_t o = (b * T + t) * D + hc + c;
              __m256 o_ = _mm256_add_ps(_mm256_set1_ps(r[ii + rr]), mu);
              __m256 nn = n[rr], dd = d[rr];
              const int lost =
                  any_bad ? 0xff : _mm256_movemask_ps(_mm256_cmp_ps(dd, _mm256_set1_ps(kTiny), _CMP_NGE_UQ));
              if (lost) {  // exact band part for the lost lanes
                alignas(32) float ob[8], nb[8], db[8];
                _mm256_store_ps(ob, any_bad ? _mm256_setzero_ps() : o_);
                _mm256_store_ps(nb, any_bad ? _mm256_setzero_ps() : nn);
                _mm256_store_ps(db, any_bad ? _mm256_setzero_ps() : dd);
                for (int64_t l = 0; l < cnt; ++l) {
                  if (!(lost >> l & 1)) continue;
                  float mx, s, a;
                  exact_union(kb + c + l, vb + c + l, D, wh + t * T, t, u0, u1, window, causal, mx, s, a);
                  if (std::isnan(mx)) {
                    ob[l] = nb[l] = db[l] = nan;
                  } else if (mx == ninf) {  // nothing visible in the union: contributes exactly 0
                    ob[l] = ninf;
                    nb[l] = db[l] = 0;
                  } else {
                    ob[l] = mx;
                    nb[l] = a;
                    db[l] = s;
                  }
                }
                o_ = _mm256_load_ps(ob);
                nn = _mm256_load_ps(nb);
                dd = _mm256_load_ps(db);
              }
              finish(o_, nn, dd, Mfv, Sfv, Afv, loadn(q + o, cnt), y + o, lse + o, cnt);
            }
          }
        }
      }
    }
  });
}

}  // namespace

#pragma GCC pop_options

bool aft_local_tiled_fwd_avx2(const float* q, const float* k, const float* v, const float* w, float* y, float* lse,
                              int64_t B, int64_t T, int64_t D, int64_t H, int64_t window, bool causal) {
  if (!cpu_has_avx2_fma()) return false;
  fwd(q, k, v, w, y, lse, B, T, D, H, window, causal);
  return true;
}

#else
bool aft_local_tiled_fwd_avx2(const float*, const float*, const float*, const float*, float*, float*, int64_t, int64_t,
                              int64_t, int64_t, int64_t, bool) {
  return false;
}
#endif

}  // namespace cpu
}  // namespace attnfree
