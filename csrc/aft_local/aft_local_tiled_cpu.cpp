// AFT-local forward and backward on CPU as banded tiles (docs/design.md §2.3, §2.6, §3), float32, AVX2/FMA.
// The backward is described above bwd() below.
//
// Keys are split into tiles of tau = 64. For query tile I the keys any of its rows sees with bias w (the band
// |t - t'| < window) lie in the key tiles Jlo..Jhi (the "union", causal: up to I). Everything else is bias 0:
//   * far term: tiles < Jlo and (non-causal) > Jhi, one running-max state per (query tile, b, c), merged from a
//     prefix and a suffix scan over the per-tile states (the "one more tile" of §2.6);
//   * union: per key tile J one GEMM against every column (b, c) of the head (w is shared over the batch),
//       Ew[t, t'] = exp(w'[t, t'] - r[t])    (w' = w inside the band, 0 outside, -inf above the diagonal)
//       X[t', c]  = exp(k[t', c] - m_J[c])   (built once per key tile, with X * v, into XX)
//       [n | d][t, c] = sum_J s_J[c] * (Ew_J @ [X v | X]_J)[t, c],   s_J[c] = exp(m_J[c] - m_U[c]) <= 1
//     with r[t] the row max of w' over the union and m_U = max_J m_J, so every factor is in [0, 1]
//     (common/cpu_tile_gemm.h: the keys outside a row's band, all of weight exp(-r), are summed per column);
//   * one merge per output element against the far state at the larger offset, lse = M + log S,
//     y = sigmoid(q) * A / S.
// Exponentials per output element: 1 for X, 1 for the merge, 1 for the sigmoid, and a log -- instead of one per
// band element. Exactness guard (§2.4): where d < 1e-30 (the band part may have underflowed, also any NaN) the
// band part of that (t, c) is recomputed exactly per element; a key tile holding a NaN in k or v sends its whole
// (query tile, b) through that exact path, so that 0 * NaN from an invisible or masked key can never leak
// (docs/design.md §7). Bit-identical for any thread count: every task (query tile, head; in the backward also
// b and a fixed block of channels) is computed by one thread, in a fixed order, with shapes independent of the
// thread count.
#include "aft_local/aft_local_tiled.h"
#include "common/cpu_tile_gemm.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <memory>
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
// (skipping -inf, NaN propagating); mx = -inf when nothing is visible. wrow[tp - u0] = w[t, tp] in the band.
void exact_union(const float* kcol, const float* vcol, int64_t D, const float* wrow, int64_t t, int64_t u0, int64_t u1,
                 int64_t window, bool causal, float& mx, float& s, float& a) {
  const float ninf = -std::numeric_limits<float>::infinity();
  mx = ninf;
  bool nan = false;
  const int64_t hi = causal ? std::min(u1, t + 1) : u1;
  for (int64_t tp = u0; tp < hi; ++tp) {
    const float wv = (tp - t < window && t - tp < window) ? wrow[tp - u0] : 0.f;
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
    const float wv = (tp - t < window && t - tp < window) ? wrow[tp - u0] : 0.f;
    const float l = kcol[tp * D] + wv;
    if (l == ninf) continue;
    const float e = std::exp(l - mx);
    s += e;
    a += e * vcol[tp * D];
  }
}

// the final merge of the band part (offset o, sums n, d) with the far state (Mf, Sf, Af); writes y and lse.
// Both parts are summed against the larger offset, max(o, Mf): its own weight is 1 (0 when that offset is -inf,
// nothing visible at all) and the other's exp(min - max), one exponential; S stays in [d, d + T] or [Sf, Sf + d],
// never 0 unless nothing is visible (y = 0, lse = -inf). A NaN offset reaches min and S, hence y and lse.
AF_AVX2 void finish(__m256 o, __m256 n, __m256 d, __m256 Mf, __m256 Sf, __m256 Af, __m256 q, float* yp, float* lp,
                    int64_t cnt) {
  const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 hi = vmax_keep(Mf, o);  // NaN-ignoring
  const __m256 Ms = vsafe_off(hi);
  const __m256 es = vexp(_mm256_sub_ps(_mm256_min_ps(Mf, o), Ms));                               // NaN in o: NaN
  const __m256 eb = _mm256_andnot_ps(_mm256_cmp_ps(hi, ninf, _CMP_EQ_OQ), _mm256_set1_ps(1.f));  // 0 if -inf
  const __m256 band_hi = _mm256_cmp_ps(o, Mf, _CMP_GE_OQ);
  const __m256 e1 = _mm256_blendv_ps(es, eb, band_hi), e2 = _mm256_blendv_ps(eb, es, band_hi);
  const __m256 S = _mm256_fmadd_ps(d, e1, _mm256_mul_ps(Sf, e2));
  const __m256 A = _mm256_fmadd_ps(n, e1, _mm256_mul_ps(Af, e2));
  storen(lp, _mm256_add_ps(Ms, vlog(S)), cnt);
  // y = sigmoid(q) * A / S as one division; q < -80 with S large may give 0 instead of < 1e-34 * A / S
  __m256 y = _mm256_div_ps(
      A, _mm256_mul_ps(S, _mm256_add_ps(_mm256_set1_ps(1.f), vexp(_mm256_sub_ps(_mm256_setzero_ps(), q)))));
  y = _mm256_blendv_ps(y, _mm256_setzero_ps(), _mm256_cmp_ps(S, _mm256_setzero_ps(), _CMP_EQ_OQ));
  storen(yp, y, cnt);
}

// Rows of query tile [i0, i0 + ni) against the keys [u0, u1) of its union, row stride u1 - u0 (kTau rows):
//   Wt = w[t, t'] inside the band, 0 elsewhere (read from either layout, band entries only);
//   Ew = exp(w' - r[t]) with w' = w in the band, 0 outside, -inf above the diagonal (causal), r the row max of w'
//        (NaN-ignoring; 0 for a row of all -inf), so Ew is in [0, 1].
void build_rows(const float* w, bool banded, int64_t T, int64_t h, int64_t window, bool causal, int64_t i0, int64_t ni,
                int64_t u0, int64_t u1, std::vector<float>& Wt, std::vector<float>& Ew, float* r) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const int64_t nu = u1 - u0;
  // Wt rows: w[t, t'] for keys [u0, u1) inside the band (0 elsewhere), gathered from either layout
  Wt.assign(kTau * nu, 0.f);
  for (int64_t ii = 0; ii < ni; ++ii) {
    const int64_t t = i0 + ii;
    const int64_t lo = std::max(u0, t - window + 1), hi = std::min(u1, t + window);  // band keys [lo, hi)
    const float* src = w + (h * T + t) * (banded ? 2 * window - 1 : T);
    const int64_t shift = banded ? window - 1 - t : 0;  // column of key tp: tp + shift
    for (int64_t tp = lo; tp < hi; ++tp) Wt[ii * nu + tp - u0] = src[tp + shift];
  }
  // Ew rows: w' = w in the band, 0 outside, -inf above the diagonal (causal); r = row max (safe)
  Ew.assign(kTau * nu, 0.f);
  for (int64_t ii = 0; ii < ni; ++ii) {
    const int64_t t = i0 + ii;
    const float* wrow = Wt.data() + ii * nu;
    float* er = Ew.data() + ii * nu;
    __m256 mx = _mm256_set1_ps(ninf);
    for (int64_t c = 0; c < nu; c += 8) {
      const int64_t cnt = nu - c;
      const __m256i tp = _mm256_add_epi32(_mm256_set1_epi32(static_cast<int>(u0 + c - t)),
                                          _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));  // t' - t
      const __m256i wn = _mm256_set1_epi32(static_cast<int>(window));
      const __m256i inband = _mm256_and_si256(_mm256_cmpgt_epi32(wn, tp),
                                              _mm256_cmpgt_epi32(tp, _mm256_sub_epi32(_mm256_setzero_si256(), wn)));
      __m256 x = _mm256_and_ps(loadn(wrow + c, cnt), _mm256_castsi256_ps(inband));  // 0 outside the band
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
}

// One running-max state (M, S, A) per (b, channel) and key tile: the far term's prefix / suffix scans.
struct FarScan {
  std::vector<float> M, S, A;  // (B, nt + 1, D): entry J = the state of tiles [0, J) (prefix) or [J, nt) (suffix)
};

// (M, S, A) <- (M, S, A) merged with (mj, sj, aj); a masked side (max -inf) weighs exactly 0, never inf * 0
AF_AVX2 void merge_state(__m256& M, __m256& S, __m256& A, __m256 mj, __m256 sj, __m256 aj) {
  const __m256 M2 = vmax_keep(M, mj);
  const __m256 off = vsafe_off(M2);
  const __m256 e1 = vexp(_mm256_sub_ps(M, off));
  const __m256 e2 = vexp(_mm256_sub_ps(mj, off));
  S = _mm256_fmadd_ps(S, e1, _mm256_mul_ps(sj, e2));
  A = _mm256_fmadd_ps(A, e1, _mm256_mul_ps(aj, e2));
  M = M2;
}

// Per (b, key tile J): m_J = max k (NaN-ignoring; -inf when every key is masked), X = exp(k - m_J) (0 at masked
// keys) and XV = X * v (0 at masked keys) into XX (H, T, B, 2, Dh): the key rows of all batches side by side, so
// that one GEMM takes a key tile against every column of a head (w is shared over the batch). Every element of XX
// is written. With tS / tA: the tile sums of X and XV. bad[b * nt + J]: the tile holds a NaN in k or v, or with
// `strict` also +inf in k or an infinite v.
void key_tiles(const float* k, const float* v, int64_t B, int64_t T, int64_t D, int64_t H, float* XX, float* tm,
               float* tS, float* tA, unsigned char* bad, bool strict) {
  const int64_t nt = (T + kTau - 1) / kTau, Dh = D / H;
  at::parallel_for(0, B * nt, 1, [&](int64_t p0, int64_t p1) {
    const __m256 ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    const __m256 pinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / nt, J = p % nt;
      const int64_t j0 = J * kTau, j1 = std::min(T, j0 + kTau);
      __m256 flag = _mm256_setzero_ps();
      for (int64_t h = 0; h < H; ++h)
        for (int64_t c = 0; c < Dh; c += 8) {
          const int64_t cnt = std::min<int64_t>(8, Dh - c), hc = h * Dh + c;
          __m256 mx = ninf;
          for (int64_t tp = j0; tp < j1; ++tp) {
            const __m256 kv = loadn(k + (b * T + tp) * D + hc, cnt);
            const __m256 vv = loadn(v + (b * T + tp) * D + hc, cnt);
            flag = _mm256_or_ps(flag, _mm256_cmp_ps(kv, vv, _CMP_UNORD_Q));
            if (strict) {  // +inf in k; +-inf in v (v - v is NaN exactly for those)
              flag = _mm256_or_ps(flag, _mm256_cmp_ps(kv, pinf, _CMP_EQ_OQ));
              flag = _mm256_or_ps(flag, _mm256_cmp_ps(_mm256_sub_ps(vv, vv), vv, _CMP_UNORD_Q));
            }
            mx = vmax_keep(mx, kv);
          }
          const __m256 off = vsafe_off(mx);
          __m256 se = _mm256_setzero_ps(), sv = _mm256_setzero_ps();
          for (int64_t tp = j0; tp < j1; ++tp) {
            const int64_t o = (b * T + tp) * D + hc;
            const __m256 kv = loadn(k + o, cnt);
            const __m256 x = vexp(_mm256_sub_ps(kv, off));
            __m256 xv = _mm256_mul_ps(x, loadn(v + o, cnt));
            xv = _mm256_blendv_ps(xv, _mm256_setzero_ps(), _mm256_cmp_ps(kv, ninf, _CMP_EQ_OQ));
            float* xx = XX + ((h * T + tp) * B + b) * 2 * Dh + c;
            storen(xx, xv, cnt);
            storen(xx + Dh, x, cnt);
            se = _mm256_add_ps(se, x);
            sv = _mm256_add_ps(sv, xv);
          }
          storen(tm + p * D + hc, mx, cnt);
          if (tS) storen(tS + p * D + hc, se, cnt);
          if (tA) storen(tA + p * D + hc, sv, cnt);
        }
      bad[p] = _mm256_movemask_ps(flag) != 0;
    }
  });
}

__attribute__((target("avx2,fma"))) void fwd(const float* __restrict__ q, const float* __restrict__ k,
                                             const float* __restrict__ v, const float* __restrict__ w,
                                             float* __restrict__ y, float* __restrict__ lse, int64_t B, int64_t T,
                                             int64_t D, int64_t H, int64_t window, bool causal, bool banded) {
  const int64_t nt = (T + kTau - 1) / kTau;
  const int64_t Dh = D / H;
  const int64_t N2 = 2 * B * Dh;  // one key row of XX for one head: per b, [XV | XE] over the head's channels
  const bool wide = tile_gemm_available();
  const float ninf = -std::numeric_limits<float>::infinity();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // XX (H, T, B, 2, Dh): X = exp(k - m_J), XV = X * v; key rows of all batches side by side, so that one GEMM
  // takes a key tile against every column of a head (w is shared over the batch). Every element is written.
  const std::unique_ptr<float[]> XX(new float[H * T * N2]);
  std::vector<float> tm(B * nt * D), tS(B * nt * D), tA(B * nt * D);  // per key tile: max, sums
  std::vector<unsigned char> bad(B * nt, 0);                          // tile holds a NaN in k or v

  key_tiles(k, v, B, T, D, H, XX.get(), tm.data(), tS.data(), tA.data(), bad.data(), false);

  // far term: prefix (and, non-causal, suffix) scans of the tile states, per (b, channel); serial: O(B * D * T / tau)
  // merges, less than a parallel region's start-up
  FarScan pre, suf;
  const int64_t ns = B * (nt + 1) * D;
  pre.M.resize(ns), pre.S.resize(ns), pre.A.resize(ns);
  if (!causal) suf.M.resize(ns), suf.S.resize(ns), suf.A.resize(ns);
  for (int64_t b = 0; b < B; ++b)
    for (int64_t c = 0; c < D; c += 8) {
      const int64_t cnt = std::min<int64_t>(8, D - c);
      auto put = [&](FarScan& f, int64_t J, __m256 M, __m256 S, __m256 A) {
        const int64_t o = (b * (nt + 1) + J) * D + c;
        storen(f.M.data() + o, M, cnt);
        storen(f.S.data() + o, S, cnt);
        storen(f.A.data() + o, A, cnt);
      };
      auto tile = [&](int64_t J, __m256& M, __m256& S, __m256& A) {
        const int64_t o = (b * nt + J) * D + c;
        merge_state(M, S, A, loadn(tm.data() + o, cnt), loadn(tS.data() + o, cnt), loadn(tA.data() + o, cnt));
      };
      __m256 M = _mm256_set1_ps(ninf), S = _mm256_setzero_ps(), A = _mm256_setzero_ps();
      put(pre, 0, M, S, A);
      for (int64_t J = 0; J < nt; ++J) tile(J, M, S, A), put(pre, J + 1, M, S, A);
      if (causal) continue;
      M = _mm256_set1_ps(ninf), S = A = _mm256_setzero_ps();
      put(suf, nt, M, S, A);
      for (int64_t J = nt - 1; J >= 0; --J) tile(J, M, S, A), put(suf, J, M, S, A);
    }

  // per query tile: band union [Jlo, Jhi], far term = prefix over tiles < Jlo (+ suffix over tiles > Jhi)
  auto union_of = [&](int64_t I, int64_t& Jlo, int64_t& Jhi) {
    const int64_t i0 = I * kTau, i1 = std::min(T, i0 + kTau);
    Jlo = std::max<int64_t>(0, i0 - window + 1) / kTau;
    Jhi = causal ? I : std::min<int64_t>(T - 1, i1 - 1 + window - 1) / kTau;
  };
  // batches per GEMM: about 512 columns (XV and XE of nb batches of one head)
  const int64_t nb = std::max<int64_t>(1, std::min<int64_t>(B, 256 / std::max<int64_t>(Dh, 1)));
  const int64_t ncmax = nb * 2 * Dh;
  const auto fopt = at::TensorOptions().dtype(at::kFloat);

  at::parallel_for(0, nt * H, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> Ew, Wt, r(kTau), sJ, sc(ncmax), C(kTau * ncmax), acc(kTau * ncmax);
    std::vector<float> mU(nb * Dh), Mf(nb * Dh), Sf(nb * Dh), Af(nb * Dh);
    std::vector<int64_t> kb(kTau), ke(kTau);
    std::vector<float> eL(kTau), eR(kTau);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t I = p / H, h = p % H;
      const int64_t i0 = I * kTau, i1 = std::min(T, i0 + kTau), ni = i1 - i0;
      int64_t Jlo, Jhi;
      union_of(I, Jlo, Jhi);
      const int64_t u0 = Jlo * kTau, u1 = std::min(T, (Jhi + 1) * kTau), nu = u1 - u0, nJ = Jhi - Jlo + 1;
      build_rows(w, banded, T, h, window, causal, i0, ni, u0, u1, Wt, Ew, r.data());
      sJ.resize(nJ * nb * Dh);
      // the weight Ew of a key outside row t's band: exp(0 - r) (r >= 0 wherever such a key exists; the min keeps
      // it finite where none does), 0 above the diagonal (causal)
      for (int64_t ii = 0; ii < ni; ++ii) {
        eL[ii] = std::exp(std::min(-r[ii], 0.f));
        eR[ii] = causal ? 0.f : eL[ii];
      }
      const int64_t hc = h * Dh;
      for (int64_t b0 = 0; b0 < B; b0 += nb) {
        const int64_t b1 = std::min(B, b0 + nb), nc = (b1 - b0) * 2 * Dh;
        bool any_bad = false;
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t J = Jlo; J <= Jhi; ++J) any_bad |= bad[b * nt + J] != 0;
        // union offsets m_U, scales s_J, far state, per (b, channel) of the chunk
        for (int64_t b = b0; b < b1; ++b)
          for (int64_t c = 0; c < Dh; c += 8) {
            const int64_t cnt = std::min<int64_t>(8, Dh - c), bc = (b - b0) * Dh + c;
            __m256 mu = _mm256_set1_ps(ninf);
            for (int64_t J = Jlo; J <= Jhi; ++J) mu = vmax_keep(mu, loadn(tm.data() + (b * nt + J) * D + hc + c, cnt));
            const __m256 mus = vsafe_off(mu);
            storen(mU.data() + bc, mus, cnt);
            // a tile with every key masked (m_J = -inf) gets scale 0, not exp(0 - m_U): its sums are 0, and a
            // scale exp(-m_U) would overflow for m_U < -88 (0 * inf)
            for (int64_t J = Jlo; J <= Jhi; ++J) {
              const __m256 mj = loadn(tm.data() + (b * nt + J) * D + hc + c, cnt);
              storen(sJ.data() + (J - Jlo) * nb * Dh + bc, vexp(_mm256_sub_ps(mj, mus)), cnt);
            }
            const int64_t op = (b * (nt + 1) + Jlo) * D + hc + c;
            __m256 M = loadn(pre.M.data() + op, cnt), S = loadn(pre.S.data() + op, cnt),
                   A = loadn(pre.A.data() + op, cnt);
            if (!causal) {
              const int64_t os = (b * (nt + 1) + Jhi + 1) * D + hc + c;
              merge_state(M, S, A, loadn(suf.M.data() + os, cnt), loadn(suf.S.data() + os, cnt),
                          loadn(suf.A.data() + os, cnt));
            }
            storen(Mf.data() + bc, M, cnt);
            storen(Sf.data() + bc, S, cnt);
            storen(Af.data() + bc, A, cnt);
          }
        // acc = sum_J s_J * (Ew_J @ [XV_J | XE_J]): one GEMM per key tile, columns scaled by s_J
        if (!any_bad) {
          for (int64_t J = Jlo; J <= Jhi; ++J) {
            const int64_t j0 = J * kTau, nj = std::min(T, j0 + kTau) - j0;
            for (int64_t bb = 0; bb < b1 - b0; ++bb)  // s_J per column: the same for XV and XE of (b, c)
              for (int64_t c = 0; c < Dh; ++c)
                sc[bb * 2 * Dh + c] = sc[bb * 2 * Dh + Dh + c] = sJ[(J - Jlo) * nb * Dh + bb * Dh + c];
            const float* Xj = XX.get() + ((h * T + j0) * B + b0) * 2 * Dh;
            for (int64_t ii = 0; ii < ni; ++ii) {  // each row's band within the tile
              const int64_t t = i0 + ii;
              kb[ii] = std::clamp<int64_t>(t - window + 1 - j0, 0, nj);
              ke[ii] = std::clamp<int64_t>((causal ? t + 1 : t + window) - j0, 0, nj);
            }
            if (wide && tile_gemm_banded(ni, nc, nj, Ew.data() + (j0 - u0), nu, 1, Xj, N2, sc.data(), acc.data(), nc,
                                         J > Jlo, TileBand{kb.data(), ke.data(), eL.data(), eR.data()}))
              continue;
            const at::Tensor Ct = at::from_blob(C.data(), {ni, nc}, fopt);
            const at::Tensor Et = at::from_blob(Ew.data() + (j0 - u0), {ni, nj}, {nu, 1}, fopt);
            const at::Tensor Xt = at::from_blob(const_cast<float*>(Xj), {nj, nc}, {N2, 1}, fopt);
            at::mm_out(const_cast<at::Tensor&>(Ct), Et, Xt);
            for (int64_t ii = 0; ii < ni; ++ii) {
              float* a = acc.data() + ii * nc;
              const float* cr = C.data() + ii * nc;
              for (int64_t x = 0; x < nc; x += 8) {
                const int64_t cnt = std::min<int64_t>(8, nc - x);
                const __m256 prod = _mm256_mul_ps(loadn(cr + x, cnt), loadn(sc.data() + x, cnt));
                storen(a + x, J == Jlo ? prod : _mm256_add_ps(loadn(a + x, cnt), prod), cnt);
              }
            }
          }
        }
        for (int64_t b = b0; b < b1; ++b) {
          const float* kb = k + b * T * D + hc;
          const float* vb = v + b * T * D + hc;
          for (int64_t c = 0; c < Dh; c += 8) {
            const int64_t cnt = std::min<int64_t>(8, Dh - c), bc = (b - b0) * Dh + c;
            const __m256 mu = loadn(mU.data() + bc, cnt);
            const __m256 Mfv = loadn(Mf.data() + bc, cnt), Sfv = loadn(Sf.data() + bc, cnt),
                         Afv = loadn(Af.data() + bc, cnt);
            for (int64_t ii = 0; ii < ni; ++ii) {
              const int64_t t = i0 + ii;
              const int64_t o = (b * T + t) * D + hc + c;
              const float* a = acc.data() + ii * nc + (b - b0) * 2 * Dh + c;
              __m256 o_ = _mm256_add_ps(_mm256_set1_ps(r[ii]), mu);
              __m256 nn = any_bad ? _mm256_setzero_ps() : loadn(a, cnt);
              __m256 dd = any_bad ? _mm256_setzero_ps() : loadn(a + Dh, cnt);
              const int lost =
                  any_bad ? 0xff : _mm256_movemask_ps(_mm256_cmp_ps(dd, _mm256_set1_ps(kTiny), _CMP_NGE_UQ));
              if (lost) {  // exact band part for the lost lanes
                alignas(32) float ob[8], nb_[8], db[8];
                _mm256_store_ps(ob, o_);
                _mm256_store_ps(nb_, nn);
                _mm256_store_ps(db, dd);
                for (int64_t l = 0; l < cnt; ++l) {
                  if (!(lost >> l & 1)) continue;
                  float mx, s, a_;
                  exact_union(kb + c + l, vb + c + l, D, Wt.data() + ii * nu, t, u0, u1, window, causal, mx, s, a_);
                  if (std::isnan(mx)) {
                    ob[l] = nb_[l] = db[l] = nan;
                  } else if (mx == ninf) {  // nothing visible in the union: contributes exactly 0
                    ob[l] = ninf;
                    nb_[l] = db[l] = 0;
                  } else {
                    ob[l] = mx;
                    nb_[l] = a_;
                    db[l] = s;
                  }
                }
                o_ = _mm256_load_ps(ob);
                nn = _mm256_load_ps(nb_);
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

// Backward as banded tiles (docs/design.md §3): with G = dy * sigmoid(q), H = dy * y (formed here, in the pass
// that reads dy, q, y once and also writes dq = H * (1 - sigmoid(q))) and, for the keys of the union of query
// tile I (the key tiles its band meets, as in the forward),
//   P[t, t', c] = Ew[t, t'] * X[t', c] * Sc[t, c] * s_IJ[c],
//   Sc = exp(r[t] + m_U[c] - lse[t, c]),  s_IJ = exp(m_J[c] - m_U[c]) <= 1   (key tile J of t', m_U = max_J m_J)
// so that per (I, J) block
//   dv[t'] += X[t'] * s_IJ * sum_t Ew[t, t'] (Sc G)[t],    sumPH[t'] += X[t'] * s_IJ * sum_t Ew[t, t'] (Sc H)[t]
//   dw[t, t'] = Ew[t, t'] * sum_{b, c in h} s_IJ (Sc G)[t, c] XV[t', c] - s_IJ (Sc H)[t, c] X[t', c]   (band)
// are ATen GEMMs (pass 1: Ew^T against [Sc G | Sc H] of one column block; pass 2: [Sc G | -Sc H] of every column
// of a head against [XV | X]). X multiplies every term of key t', so pass 1 sums s_IJ * (Ew^T [Sc G | Sc H]) and
// multiplies by X once at the end. Far keys (tiles outside the union, bias 0) are one more term per key tile:
// suffix (and, non-causal, prefix) sums over query tiles of exp(ref - lse) [G | H], ref = min lse, times
// exp(k - ref) = X * exp(m_J - ref) <= 1. Sc can be large where the row max of w' and the column max of k sit on
// different keys: where r + m_U - lse > kGap the (t, c) is computed exactly per element instead (the split-max
// guard of §3). lse = -inf (a row with no visible key): Sc = 0. Inputs holding NaN or +inf (k, lse, band entries of
// w) or a non-finite v, G, H are detected on the way: false is returned and the caller runs the per-element band
// kernel, whose NaN propagation is exact (docs/design.md §7).
constexpr float kGap = 40.f;

void union_tiles(int64_t I, int64_t T, int64_t window, bool causal, int64_t& Jlo, int64_t& Jhi) {
  const int64_t i0 = I * kTau, i1 = std::min(T, i0 + kTau);
  Jlo = std::max<int64_t>(0, i0 - window + 1) / kTau;
  Jhi = causal ? I : std::min<int64_t>(T - 1, i1 - 1 + window - 1) / kTau;
}

// Columns per pass-1 task: a fixed split (never the thread count), so that every GEMM has the same shape whatever
// the number of threads.
constexpr int64_t kBwdCols = 128;

__attribute__((target("avx2,fma"))) bool bwd(const float* __restrict__ dy, const float* __restrict__ q,
                                             const float* __restrict__ yv, const float* __restrict__ k,
                                             const float* __restrict__ v, const float* __restrict__ w,
                                             const float* __restrict__ lse, float* __restrict__ dq,
                                             float* __restrict__ dk, float* __restrict__ dv, float* __restrict__ dw,
                                             int64_t B, int64_t T, int64_t D, int64_t H, int64_t window, bool causal,
                                             bool banded) {
  const int64_t nt = (T + kTau - 1) / kTau;
  const int64_t Dh = D / H;
  const int64_t N2 = 2 * B * Dh;
  const bool wide = tile_gemm_available();
  const float ninf = -std::numeric_limits<float>::infinity();
  const float pinf = std::numeric_limits<float>::infinity();
  const auto fopt = at::TensorOptions().dtype(at::kFloat);
  // XX as in the forward; SGH (H, nt, B, 2, Dh, kTau): [Sc G | -Sc H] of every row, written by pass 1 for pass 2,
  // per query tile transposed (rows contiguous) so that pass 2 reads it as the B operand of its GEMM
  const std::unique_ptr<float[]> XX(new float[H * T * N2]);
  const std::unique_ptr<float[]> SGH(new float[dw ? H * nt * N2 * kTau : 1]);
  std::vector<float> tm(B * nt * D);
  std::vector<unsigned char> bad(B * nt, 0);
  key_tiles(k, v, B, T, D, H, XX.get(), tm.data(), nullptr, nullptr, bad.data(), true);
  for (unsigned char f : bad)
    if (f) return false;

  // rows of every (query tile, head): Wt, Ew, r; union offsets m_U per (query tile, b, channel)
  std::vector<int64_t> ulo(nt), uhi(nt), roff(nt + 1, 0);
  for (int64_t I = 0; I < nt; ++I) {
    union_tiles(I, T, window, causal, ulo[I], uhi[I]);
    roff[I + 1] = roff[I] + kTau * (std::min(T, (uhi[I] + 1) * kTau) - ulo[I] * kTau);
  }
  std::vector<float> WtA(H * roff[nt]), EwA(H * roff[nt]), rA(H * nt * kTau), mUA(nt * B * D);
  std::vector<unsigned char> wbad(nt * H, 0);
  at::parallel_for(0, nt * H, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> Wt, Ew;
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t I = p / H, h = p % H;
      const int64_t i0 = I * kTau, ni = std::min(T, i0 + kTau) - i0;
      const int64_t u0 = ulo[I] * kTau, u1 = std::min(T, (uhi[I] + 1) * kTau);
      build_rows(w, banded, T, h, window, causal, i0, ni, u0, u1, Wt, Ew, rA.data() + (h * nt + I) * kTau);
      std::copy(Wt.begin(), Wt.end(), WtA.begin() + h * roff[nt] + roff[I]);
      std::copy(Ew.begin(), Ew.end(), EwA.begin() + h * roff[nt] + roff[I]);
      for (float x : Wt)
        if (std::isnan(x) || x == pinf) wbad[p] = 1;  // band entries of w only
      for (int64_t b = 0; b < B; ++b)
        for (int64_t c = 0; c < Dh; c += 8) {
          const int64_t cnt = std::min<int64_t>(8, Dh - c), hc = h * Dh + c;
          __m256 mu = _mm256_set1_ps(ninf);
          for (int64_t J = ulo[I]; J <= uhi[I]; ++J) mu = vmax_keep(mu, loadn(tm.data() + (b * nt + J) * D + hc, cnt));
          storen(mUA.data() + (I * B + b) * D + hc, vsafe_off(mu), cnt);
        }
    }
  });
  for (unsigned char f : wbad)
    if (f) return false;
  auto in_band = [&](int64_t t, int64_t tp) { return tp - t < window && t - tp < window && (!causal || tp <= t); };
  auto visible = [&](int64_t t, int64_t tp) { return !causal || tp <= t; };

  // pass 1: dq, dv, dk (and SGH) per (b, head, block of kBwdCols channels)
  const int64_t ncb = (Dh + kBwdCols - 1) / kBwdCols;
  // gexact[task * nt + I]: query tile I of that task has exact lanes (one writer per entry)
  std::vector<unsigned char> gbad(B * H * ncb, 0), gexact(B * H * ncb * nt, 0);
  at::parallel_for(0, B * H * ncb, 1, [&](int64_t p0, int64_t p1) {
    // acc2 (T, 2 cw): per key the union and far sums [G | H] before the factor X; exG / exH: the exact parts
    std::vector<float> acc2, exG, exH, S2(kTau * 2 * kBwdCols), R(kTau * 2 * kBwdCols), sIJ(2 * kBwdCols);
    std::vector<float> GH(kTau * 2 * kBwdCols);  // [G | H] of the query tile's rows
    std::vector<float> fref(nt * kBwdCols), fG(nt * kBwdCols), fH(nt * kBwdCols), ref(kBwdCols);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t b = p / (H * ncb), h = (p / ncb) % H, cb = p % ncb;
      const int64_t cw = std::min(kBwdCols, Dh - cb * kBwdCols), c0 = h * Dh + cb * kBwdCols;
      const int64_t base = b * T * D + c0;
      acc2.assign(T * 2 * cw, 0.f);
      bool have_exact = false;
      __m256 flag = _mm256_setzero_ps();
      for (int64_t I = 0; I < nt; ++I) {
        const int64_t i0 = I * kTau, ni = std::min(T, i0 + kTau) - i0;
        const int64_t u0 = ulo[I] * kTau, nu = std::min(T, (uhi[I] + 1) * kTau) - u0;
        const float* Ew = EwA.data() + h * roff[nt] + roff[I];
        const float* Wt = WtA.data() + h * roff[nt] + roff[I];
        const float* r = rA.data() + (h * nt + I) * kTau;
        const float* mU = mUA.data() + (I * B + b) * D + c0;
        // G, H, dq, [Sc G | Sc H] (S2, row stride 2 cw) and the far-term reference ref = min finite lse
        for (int64_t c = 0; c < cw; c += 8) _mm256_storeu_ps(ref.data() + c, _mm256_set1_ps(pinf));
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t t = i0 + ii, o = base + t * D;
          float* sgh = dw ? SGH.get() + (((h * nt + I) * B + b) * 2 * Dh + cb * kBwdCols) * kTau + ii : nullptr;
          for (int64_t c = 0; c < cw; c += 8) {
            const int64_t cnt = std::min<int64_t>(8, cw - c);
            const __m256 d_ = loadn(dy + o + c, cnt), qv = loadn(q + o + c, cnt), l = loadn(lse + o + c, cnt);
            const __m256 sq = vsigmoid(qv);
            const __m256 g = _mm256_mul_ps(d_, sq), hh = _mm256_mul_ps(d_, loadn(yv + o + c, cnt));
            storen(dq + o + c, _mm256_fnmadd_ps(hh, sq, hh), cnt);
            // NaN / +inf in lse, non-finite G or H: the band kernel takes over
            flag = _mm256_or_ps(flag, _mm256_cmp_ps(l, _mm256_set1_ps(pinf), _CMP_NLT_UQ));
            const __m256 fin = _mm256_add_ps(g, hh);
            flag = _mm256_or_ps(flag, _mm256_cmp_ps(_mm256_sub_ps(fin, fin), fin, _CMP_UNORD_Q));
            const __m256 live = _mm256_cmp_ps(l, _mm256_set1_ps(ninf), _CMP_NEQ_OQ);
            storen(ref.data() + c,
                   _mm256_blendv_ps(loadn(ref.data() + c, cnt), _mm256_min_ps(loadn(ref.data() + c, cnt), l), live),
                   cnt);
            const __m256 gap = _mm256_sub_ps(_mm256_add_ps(_mm256_set1_ps(r[ii]), loadn(mU + c, cnt)), l);
            const __m256 big = _mm256_and_ps(live, _mm256_cmp_ps(gap, _mm256_set1_ps(kGap), _CMP_GT_OQ));
            const int exact = _mm256_movemask_ps(big) & ((1 << cnt) - 1);
            const __m256 sc =
                _mm256_andnot_ps(_mm256_or_ps(_mm256_xor_ps(live, _mm256_castsi256_ps(_mm256_set1_epi32(-1))), big),
                                 vexp(_mm256_min_ps(gap, _mm256_set1_ps(kGap))));
            const __m256 sg = _mm256_mul_ps(sc, g), sh = _mm256_mul_ps(sc, hh);
            storen(S2.data() + ii * 2 * cw + c, sg, cnt);
            storen(S2.data() + ii * 2 * cw + cw + c, sh, cnt);
            storen(GH.data() + ii * 2 * cw + c, g, cnt);
            storen(GH.data() + ii * 2 * cw + cw + c, hh, cnt);
            if (sgh) {
              alignas(32) float gb[8], hb[8];
              _mm256_store_ps(gb, sg);
              _mm256_store_ps(hb, sh);
              for (int64_t l_ = 0; l_ < cnt; ++l_) {
                sgh[(c + l_) * kTau] = gb[l_];
                sgh[(Dh + c + l_) * kTau] = -hb[l_];
              }
            }
            if (exact) {  // exact per element over the union for lanes with a large split-max gap
              if (!have_exact) {
                exG.assign(T * cw, 0.f);
                exH.assign(T * cw, 0.f);
                have_exact = true;
              }
              gexact[p * nt + I] = 1;
              alignas(32) float gb[8], hb[8];
              _mm256_store_ps(gb, g);
              _mm256_store_ps(hb, hh);
              for (int64_t l_ = 0; l_ < cnt; ++l_) {
                if (!(exact >> l_ & 1)) continue;
                const float lt = lse[o + c + l_];
                for (int64_t tp = u0; tp < u0 + nu; ++tp) {
                  if (!visible(t, tp)) continue;
                  const float wv = in_band(t, tp) ? Wt[ii * nu + tp - u0] : 0.f;
                  const float x = k[base + tp * D + c + l_] + wv;
                  if (x == ninf) continue;
                  const float P = std::exp(x - lt);
                  exG[tp * cw + c + l_] += P * gb[l_];
                  exH[tp * cw + c + l_] += P * hb[l_];
                }
              }
            }
          }
        }
        // far-term sums of this query tile: exp(ref - lse) [G | H]
        for (int64_t c = 0; c < cw; c += 8) {
          const int64_t cnt = std::min<int64_t>(8, cw - c);
          const __m256 rf = loadn(ref.data() + c, cnt);
          const __m256 rfin = _mm256_cmp_ps(rf, _mm256_set1_ps(pinf), _CMP_NEQ_OQ);
          __m256 sGf = _mm256_setzero_ps(), sHf = _mm256_setzero_ps();
          for (int64_t ii = 0; ii < ni; ++ii) {
            const int64_t o = base + (i0 + ii) * D + c;
            const __m256 l = loadn(lse + o, cnt);
            const __m256 live = _mm256_cmp_ps(l, _mm256_set1_ps(ninf), _CMP_NEQ_OQ);
            const __m256 e = _mm256_and_ps(_mm256_and_ps(live, rfin), vexp(_mm256_sub_ps(rf, l)));
            sGf = _mm256_fmadd_ps(e, loadn(GH.data() + ii * 2 * cw + c, cnt), sGf);
            sHf = _mm256_fmadd_ps(e, loadn(GH.data() + ii * 2 * cw + cw + c, cnt), sHf);
          }
          storen(fref.data() + I * kBwdCols + c, rf, cnt);
          storen(fG.data() + I * kBwdCols + c, sGf, cnt);
          storen(fH.data() + I * kBwdCols + c, sHf, cnt);
        }
        // union: acc2[t'] += s_IJ * (Ew_IJ^T [Sc G | Sc H])[t']
        const at::Tensor St = at::from_blob(S2.data(), {ni, 2 * cw}, fopt);
        for (int64_t J = ulo[I]; J <= uhi[I]; ++J) {
          const int64_t j0 = J * kTau, nj = std::min(T, j0 + kTau) - j0;
          for (int64_t c = 0; c < cw; c += 8) {
            const int64_t cnt = std::min<int64_t>(8, cw - c);
            const __m256 s = vexp(_mm256_sub_ps(loadn(tm.data() + (b * nt + J) * D + c0 + c, cnt), loadn(mU + c, cnt)));
            storen(sIJ.data() + c, s, cnt);
            storen(sIJ.data() + cw + c, s, cnt);
          }
          float* a2 = acc2.data() + j0 * 2 * cw;
          if (wide && tile_gemm_scaled(nj, 2 * cw, ni, Ew + (j0 - u0), 1, nu, S2.data(), 2 * cw, nullptr, sIJ.data(),
                                       a2, 2 * cw, true))
            continue;
          const at::Tensor Et = at::from_blob(const_cast<float*>(Ew) + (j0 - u0), {nj, ni}, {1, nu}, fopt);
          at::Tensor Rt = at::from_blob(R.data(), {nj, 2 * cw}, fopt);
          at::mm_out(Rt, Et, St);
          for (int64_t tp = 0; tp < nj; ++tp)
            for (int64_t x = 0; x < 2 * cw; x += 8) {
              const int64_t cnt = std::min<int64_t>(8, 2 * cw - x);
              float* ap = a2 + tp * 2 * cw + x;
              storen(
                  ap,
                  _mm256_fmadd_ps(loadn(sIJ.data() + x, cnt), loadn(R.data() + tp * 2 * cw + x, cnt), loadn(ap, cnt)),
                  cnt);
            }
        }
      }
      // far keys: key tile J is far for query tiles I with ulo[I] > J (and, non-causal, uhi[I] < J); their
      // weight exp(k - ref) = X * exp(m_J - ref), the second factor one value per (J, c)
      for (int64_t c = 0; c < cw; c += 8) {
        const int64_t cnt = std::min<int64_t>(8, cw - c);
        auto merge = [&](__m256& ra, __m256& ga, __m256& ha, int64_t I) {
          const __m256 rb = loadn(fref.data() + I * kBwdCols + c, cnt);
          const __m256 r2 = _mm256_min_ps(ra, rb);
          const __m256 fin = _mm256_cmp_ps(r2, _mm256_set1_ps(pinf), _CMP_NEQ_OQ);
          const __m256 ea = _mm256_and_ps(fin, vexp(_mm256_sub_ps(r2, ra)));
          const __m256 eb = _mm256_and_ps(fin, vexp(_mm256_sub_ps(r2, rb)));
          ga = _mm256_fmadd_ps(ga, ea, _mm256_mul_ps(loadn(fG.data() + I * kBwdCols + c, cnt), eb));
          ha = _mm256_fmadd_ps(ha, ea, _mm256_mul_ps(loadn(fH.data() + I * kBwdCols + c, cnt), eb));
          ra = r2;
        };
        auto add_far = [&](int64_t J, __m256 ra, __m256 ga, __m256 ha) {
          const __m256 s = vexp(_mm256_sub_ps(loadn(tm.data() + (b * nt + J) * D + c0 + c, cnt), ra));  // +inf: 0
          const __m256 sg = _mm256_mul_ps(s, ga), sh = _mm256_mul_ps(s, ha);
          for (int64_t tp = J * kTau; tp < std::min(T, (J + 1) * kTau); ++tp) {
            float* ap = acc2.data() + tp * 2 * cw + c;
            storen(ap, _mm256_add_ps(sg, loadn(ap, cnt)), cnt);
            storen(ap + cw, _mm256_add_ps(sh, loadn(ap + cw, cnt)), cnt);
          }
        };
        {
          __m256 ra = _mm256_set1_ps(pinf), ga = _mm256_setzero_ps(), ha = _mm256_setzero_ps();
          int64_t I = nt - 1;
          for (int64_t J = nt - 1; J >= 0; --J) {  // suffix over query tiles, ulo non-decreasing in I
            while (I >= 0 && ulo[I] > J) merge(ra, ga, ha, I--);
            add_far(J, ra, ga, ha);
          }
        }
        if (!causal) {
          __m256 ra = _mm256_set1_ps(pinf), ga = _mm256_setzero_ps(), ha = _mm256_setzero_ps();
          int64_t I = 0;
          for (int64_t J = 0; J < nt; ++J) {  // prefix over query tiles, uhi non-decreasing in I
            while (I < nt && uhi[I] < J) merge(ra, ga, ha, I++);
            add_far(J, ra, ga, ha);
          }
        }
      }
      for (int64_t tp = 0; tp < T; ++tp) {
        const int64_t o = base + tp * D;
        const float* x = XX.get() + ((h * T + tp) * B + b) * 2 * Dh + Dh + cb * kBwdCols;
        for (int64_t c = 0; c < cw; c += 8) {
          const int64_t cnt = std::min<int64_t>(8, cw - c);
          const __m256 xv = loadn(x + c, cnt);
          __m256 av = _mm256_mul_ps(xv, loadn(acc2.data() + tp * 2 * cw + c, cnt));
          __m256 ah = _mm256_mul_ps(xv, loadn(acc2.data() + tp * 2 * cw + cw + c, cnt));
          if (have_exact) {
            av = _mm256_add_ps(av, loadn(exG.data() + tp * cw + c, cnt));
            ah = _mm256_add_ps(ah, loadn(exH.data() + tp * cw + c, cnt));
          }
          storen(dv + o + c, av, cnt);
          storen(dk + o + c, _mm256_fmsub_ps(loadn(v + o + c, cnt), av, ah), cnt);
        }
      }
      gbad[p] = _mm256_movemask_ps(flag) != 0;
    }
  });
  for (unsigned char f : gbad)
    if (f) return false;
  if (!dw) return true;

  // pass 2: dw rows of query tile I, head h: per key tile J one GEMM [Sc G | -Sc H] s_IJ (all b, c of the head)
  // against [XV | X]^T
  at::parallel_for(0, nt * H, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> acc, accx, As(wide ? 0 : kTau * N2), Cb(kTau * kTau), sc(N2);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t I = p / H, h = p % H;
      const int64_t i0 = I * kTau, ni = std::min(T, i0 + kTau) - i0;
      const int64_t u0 = ulo[I] * kTau, nu = std::min(T, (uhi[I] + 1) * kTau) - u0;
      const float* Ew = EwA.data() + h * roff[nt] + roff[I];
      const float* Wt = WtA.data() + h * roff[nt] + roff[I];
      const float* r = rA.data() + (h * nt + I) * kTau;
      const int64_t hc = h * Dh;
      acc.assign(kTau * nu, 0.f);
      const float* sgh = SGH.get() + (h * nt + I) * N2 * kTau;  // (N2, kTau): row k = column k of every row t
      for (int64_t J = ulo[I]; J <= uhi[I]; ++J) {
        const int64_t j0 = J * kTau, nj = std::min(T, j0 + kTau) - j0;
        for (int64_t b = 0; b < B; ++b)
          for (int64_t c = 0; c < Dh; c += 8) {
            const int64_t cnt = std::min<int64_t>(8, Dh - c);
            const __m256 s = vexp(_mm256_sub_ps(loadn(tm.data() + (b * nt + J) * D + hc + c, cnt),
                                                loadn(mUA.data() + (I * B + b) * D + hc + c, cnt)));
            storen(sc.data() + b * 2 * Dh + c, s, cnt);
            storen(sc.data() + b * 2 * Dh + Dh + c, s, cnt);
          }
        // Cb (nj, ni) = [XV | X]_J (nj x N2) @ (s_IJ * SGH) (N2 x ni), in chunks of 64 along N2
        const float* Xj = XX.get() + (h * T + j0) * N2;
        const bool done = wide;
        int64_t ldc = kTau;
        for (int64_t k0 = 0; done && k0 < N2; k0 += kTau) {
          const int64_t kc = std::min(kTau, N2 - k0);
          tile_gemm_scaled(nj, ni, kc, Xj + k0, N2, 1, sgh + k0 * kTau, kTau, sc.data() + k0, nullptr, Cb.data(), kTau,
                           k0 > 0);
        }
        if (!done) {
          for (int64_t x = 0; x < N2; ++x)
            for (int64_t ii = 0; ii < ni; ++ii) As[x * kTau + ii] = sgh[x * kTau + ii] * sc[x];
          const at::Tensor At = at::from_blob(As.data(), {N2, ni}, {kTau, 1}, fopt);
          const at::Tensor Xt = at::from_blob(const_cast<float*>(Xj), {nj, N2}, {N2, 1}, fopt);
          at::Tensor Ct = at::from_blob(Cb.data(), {nj, ni}, fopt);
          at::mm_out(Ct, Xt, At);
          ldc = ni;
        }
        for (int64_t tp = 0; tp < nj; ++tp)
          for (int64_t ii = 0; ii < ni; ++ii) acc[ii * nu + j0 - u0 + tp] = Cb[tp * ldc + ii];
      }
      bool any_exact = false;
      for (int64_t b = 0; b < B; ++b)
        for (int64_t cb = 0; cb < ncb; ++cb) any_exact |= gexact[((b * H + h) * ncb + cb) * nt + I] != 0;
      if (any_exact) {  // the exact per-element parts of lanes with a large split-max gap
        accx.assign(kTau * nu, 0.f);
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t t = i0 + ii;
          for (int64_t b = 0; b < B; ++b)
            for (int64_t c = 0; c < Dh; ++c) {
              const int64_t o = (b * T + t) * D + hc + c;
              const float lt = lse[o];
              if (lt == ninf || !(r[ii] + mUA[(I * B + b) * D + hc + c] - lt > kGap)) continue;
              const float gt = dy[o] / (1.f + std::exp(-q[o])), ht = dy[o] * yv[o];
              for (int64_t tp = std::max(u0, t - window + 1); tp < std::min(u0 + nu, t + window); ++tp) {
                if (!visible(t, tp)) continue;
                const int64_t ko = (b * T + tp) * D + hc + c;
                const float x = k[ko] + Wt[ii * nu + tp - u0];
                if (x == ninf) continue;
                accx[ii * nu + tp - u0] += std::exp(x - lt) * (gt * v[ko] - ht);
              }
            }
        }
      }
      const int64_t ld = banded ? 2 * window - 1 : T;
      for (int64_t ii = 0; ii < ni; ++ii) {
        const int64_t t = i0 + ii;
        const int64_t lo = std::max<int64_t>(0, t - window + 1), hi = std::min(T, causal ? t + 1 : t + window);
        float* dwrow = dw + (h * T + t) * ld;
        const int64_t shift = banded ? window - 1 - t : 0;  // column of key tp: tp + shift
        std::fill(dwrow, dwrow + ld, 0.f);  // entries outside the band (and, causal, above the diagonal)
        for (int64_t tp = lo; tp < hi; ++tp) {
          const int64_t j = ii * nu + tp - u0;
          const float e = (Ew[j] == 0.f ? 0.f : Ew[j] * acc[j]);  // Ew = 0: masked (or negligible)
          dwrow[tp + shift] = any_exact ? e + accx[j] : e;
        }
      }
    }
  });
  return true;
}

}  // namespace

#pragma GCC pop_options

bool aft_local_tiled_fwd_avx2(const float* q, const float* k, const float* v, const float* w, float* y, float* lse,
                              int64_t B, int64_t T, int64_t D, int64_t H, int64_t window, bool causal, bool banded) {
  if (!cpu_has_avx2_fma()) return false;
  fwd(q, k, v, w, y, lse, B, T, D, H, window, causal, banded);
  return true;
}

bool aft_local_tiled_bwd_avx2(const float* dy, const float* q, const float* y, const float* k, const float* v,
                              const float* w, const float* lse, float* dq, float* dk, float* dv, float* dw, int64_t B,
                              int64_t T, int64_t D, int64_t H, int64_t window, bool causal, bool banded) {
  if (!cpu_has_avx2_fma()) return false;
  return bwd(dy, q, y, k, v, w, lse, dq, dk, dv, dw, B, T, D, H, window, causal, banded);
}

#else
bool aft_local_tiled_bwd_avx2(const float*, const float*, const float*, const float*, const float*, const float*,
                              const float*, float*, float*, float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                              bool, bool) {
  return false;
}
bool aft_local_tiled_fwd_avx2(const float*, const float*, const float*, const float*, float*, float*, int64_t, int64_t,
                              int64_t, int64_t, int64_t, bool, bool) {
  return false;
}
#endif

}  // namespace cpu
}  // namespace attnfree
