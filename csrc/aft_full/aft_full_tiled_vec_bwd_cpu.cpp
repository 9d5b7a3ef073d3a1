// AFT-full backward, float32 AVX2/FMA, per head (docs/design.md §3): the tile-pair kernel on the (T, N = B * Dh)
// column layout (causal, and the fallback for extreme logits), and the non-causal kernel with whole-sequence
// maxima that reads and writes the (B, T, D) tensors directly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "aft_full/aft_full_tiled_vec.h"
#include "common/cpu_simd.h"

namespace attnfree {
namespace cpu {

#ifdef ATTNFREE_HAVE_AVX2_PATH
using namespace simd;

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

// every x[0, n) finite
bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

inline float safe_off(float x) { return x == -std::numeric_limits<float>::infinity() ? 0.f : x; }

// -lse as an exponent offset: -inf where lse = -inf (a row with no finite logit: P = 0)
inline float neg_lse(float L) { return L == -std::numeric_limits<float>::infinity() ? L : -L; }

// ------------------------------------------------------------------------------------------------ backward
// The tile-pair factorisation of aft_full_tiled_cpu.cpp's head_bwd with kBwdTile x kBwdTile tiles (4x fewer
// per-element exponentials than 64-tiles) and vectorised factor/scale loops. Key tiles J in parallel (each owns
// dV/sPH rows J and dW columns J), query tiles I inside:
//   a[t] = max_J w[t, J] (visible); Ew = exp(w - a); La = a - lse; lam[j] = max_I La; R = exp(La - lam)
//   g = Ew^T [R G | R H]                  ->  dV[t', j] += g_G e^(K + lam),  sPH[t', j] += g_H e^(K + lam)
//   mu[j] = max_J K; Y = exp(K - mu); nu[t] = max_j (La + mu); X = exp(La + mu - nu)
//   g2 = [X G | -X H] [Y V | Y]^T         ->  dW[t, t'] = g2 e^(w - a + nu)
// Same guard: where a scale exponent exceeds 42 that entry is recomputed exactly. Causal: tiles above the
// diagonal skipped; in diagonal tiles hidden keys get Ew = 0 and dW is written only for t' <= t. A non-finite
// [R G | R H] entry of a diagonal tile's row would reach the later keys that row does not see (0 * NaN): it is
// zeroed for the GEMM and the keys that row does see get NaN in that column.
// Masks: -lse enters as -inf for a row with no finite logit (P = 0), shifts are safe offsets.
constexpr int64_t kBwdTile = 256;

void head_bwd(const float* w, const float* K, const float* V, const float* G, const float* Hm, const float* L,
              float* dV, float* sPH, float* dW, int64_t T, int64_t N, bool causal, const at::TensorOptions& opts) {
  const int64_t tau = kBwdTile;
  const int64_t nt = (T + tau - 1) / tau;
  const float guard = 42.f;
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, nt, 1, [&](int64_t p0, int64_t p1) {
    at::Tensor Ew = at::empty({tau, tau}, opts);
    at::Tensor RGH = at::empty({tau, 2 * N}, opts);
    at::Tensor g = at::empty({tau, 2 * N}, opts);
    at::Tensor XGH = at::empty({tau, 2 * N}, opts);
    at::Tensor YVY = at::empty({tau, 2 * N}, opts);
    at::Tensor g2 = at::empty({tau, tau}, opts);
    float* Ewp = Ew.data_ptr<float>();
    float* RGHp = RGH.data_ptr<float>();
    float* gp = g.data_ptr<float>();
    float* XGHp = XGH.data_ptr<float>();
    float* YVYp = YVY.data_ptr<float>();
    const float* g2p = g2.data_ptr<float>();
    std::vector<float> a(tau), nu(tau), lam(N), mu(N), La(tau * N);
    std::vector<int64_t> last(2 * N);  // diagonal tiles: per column, the last zeroed row
    const __m256 vninf = _mm256_set1_ps(ninf);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t J = (p % 2 == 0) ? p / 2 : nt - 1 - p / 2;
      const int64_t j0 = J * tau, j1 = std::min(T, j0 + tau), nj = j1 - j0;
      std::fill(dV + j0 * N, dV + j1 * N, 0.f);
      std::fill(sPH + j0 * N, sPH + j1 * N, 0.f);
      for (int64_t j = 0; j < N; j += 8) {
        const int64_t n = N - j;
        __m256 mx = vninf;
        for (int64_t tp = j0; tp < j1; ++tp) mx = vmax_keep(mx, loadn(K + tp * N + j, n));
        storen(mu.data() + j, mx, n);
        const __m256 off = vsafe_off(mx);
        for (int64_t jj = 0; jj < nj; ++jj) {
          const int64_t tp = j0 + jj;
          const __m256 y = vexp(_mm256_sub_ps(loadn(K + tp * N + j, n), off));
          storen(YVYp + jj * 2 * N + j, _mm256_mul_ps(y, loadn(V + tp * N + j, n)), n);
          storen(YVYp + jj * 2 * N + N + j, y, n);
        }
      }
      for (int64_t I = causal ? J : 0; I < nt; ++I) {
        const int64_t i0 = I * tau, i1 = std::min(T, i0 + tau), ni = i1 - i0;
        const bool diag = causal && I == J;
        // w side: a, Ew (hidden keys 0)
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t t = i0 + ii;
          const int64_t cnt = diag ? t - j0 + 1 : nj;
          const float* row = w + t * T + j0;
          float* e = Ewp + ii * nj;
          __m256 mx = vninf;
          for (int64_t jj = 0; jj < cnt; jj += 8)
            mx = vmax_keep(
                mx, _mm256_blendv_ps(vninf, loadn(row + jj, cnt - jj), _mm256_castsi256_ps(tail_mask(cnt - jj))));
          const float ar = hmax(mx);
          a[ii] = ar;
          const __m256 off = _mm256_set1_ps(ar == ninf ? 0.f : ar);
          for (int64_t jj = 0; jj < cnt; jj += 8)
            storen(e + jj, vexp(_mm256_sub_ps(loadn(row + jj, cnt - jj), off)), cnt - jj);
          for (int64_t jj = cnt; jj < nj; ++jj) e[jj] = 0.f;
        }
        // La = a - lse (-inf where either is -inf: nothing of that row reaches these keys); lam, nu
        for (int64_t j = 0; j < N; ++j) lam[j] = ninf;
        for (int64_t ii = 0; ii < ni; ++ii) {
          const __m256 av = _mm256_set1_ps(a[ii]);
          const float* Lr = L + (i0 + ii) * N;
          float* lr = La.data() + ii * N;
          __m256 nmax = vninf;
          for (int64_t j = 0; j < N; j += 8) {
            const int64_t n = N - j;
            const __m256 Lv = loadn(Lr + j, n);
            __m256 x = _mm256_sub_ps(av, Lv);
            x = _mm256_blendv_ps(
                x, vninf, _mm256_or_ps(_mm256_cmp_ps(av, vninf, _CMP_EQ_OQ), _mm256_cmp_ps(Lv, vninf, _CMP_EQ_OQ)));
            storen(lr + j, x, n);
            storen(lam.data() + j, vmax_keep(loadn(lam.data() + j, n), x), n);
            nmax = vmax_keep(nmax, _mm256_blendv_ps(vninf, _mm256_add_ps(x, loadn(mu.data() + j, n)),
                                                    _mm256_castsi256_ps(tail_mask(n))));
          }
          nu[ii] = hmax(nmax);
        }
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t t = i0 + ii;
          const float* lr = La.data() + ii * N;
          float* rr = RGHp + ii * 2 * N;
          float* xr = XGHp + ii * 2 * N;
          const __m256 nuv = _mm256_set1_ps(nu[ii] == ninf ? 0.f : nu[ii]);
          for (int64_t j = 0; j < N; j += 8) {
            const int64_t n = N - j;
            const __m256 x = loadn(lr + j, n);
            const __m256 Gv = loadn(G + t * N + j, n), Hv = loadn(Hm + t * N + j, n);
            const __m256 R = vexp(_mm256_sub_ps(x, vsafe_off(loadn(lam.data() + j, n))));
            storen(rr + j, _mm256_mul_ps(R, Gv), n);
            storen(rr + N + j, _mm256_mul_ps(R, Hv), n);
            const __m256 X = vexp(_mm256_sub_ps(_mm256_add_ps(x, loadn(mu.data() + j, n)), nuv));
            storen(xr + j, _mm256_mul_ps(X, Gv), n);
            storen(xr + N + j, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(X, Hv)), n);
          }
        }
        // diagonal tile: row t does not see keys after t
        const bool clean = !diag || all_finite(RGHp, (ni - 1) * 2 * N);
        if (!clean) {
          std::fill(last.begin(), last.end(), int64_t(-1));
          for (int64_t ii = 0; ii + 1 < ni; ++ii)
            for (int64_t c = 0; c < 2 * N; ++c) {
              float& x = RGHp[ii * 2 * N + c];
              if (std::isfinite(x)) continue;
              x = 0.f;
              last[c] = std::max(last[c], ii);
            }
        }
        at::Tensor gv = g.narrow(0, 0, nj);
        at::mm_out(gv, Ew.view(-1).narrow(0, 0, ni * nj).view({ni, nj}).t(), RGH.narrow(0, 0, ni));
        if (!clean)  // keys seen by a zeroed row (t' <= t): that column is not finite
          for (int64_t jj = 0; jj < nj; ++jj)
            for (int64_t c = 0; c < 2 * N; ++c)
              if (jj <= last[c]) gp[jj * 2 * N + c] = std::numeric_limits<float>::quiet_NaN();
        at::Tensor g2v = g2.view(-1).narrow(0, 0, ni * nj).view({ni, nj});
        at::mm_out(g2v, XGH.narrow(0, 0, ni), YVY.narrow(0, 0, nj).t());
        // dV, sPH: scale e^(K + lam); guard -> exact over the query tile's visible rows
        for (int64_t jj = 0; jj < nj; ++jj) {
          const int64_t tp = j0 + jj;
          const float* gr = gp + jj * 2 * N;
          for (int64_t j = 0; j < N; j += 8) {
            const int64_t n = N - j;
            const __m256 sc = _mm256_add_ps(loadn(K + tp * N + j, n), loadn(lam.data() + j, n));
            const __m256 big = _mm256_cmp_ps(sc, _mm256_set1_ps(guard), _CMP_GT_OQ);
            const __m256 e = _mm256_andnot_ps(big, vexp(sc));  // guarded lanes: exact below
            storen(dV + tp * N + j, _mm256_fmadd_ps(loadn(gr + j, n), e, loadn(dV + tp * N + j, n)), n);
            storen(sPH + tp * N + j, _mm256_fmadd_ps(loadn(gr + N + j, n), e, loadn(sPH + tp * N + j, n)), n);
            int bad = _mm256_movemask_ps(big) & ((1 << std::min<int64_t>(n, 8)) - 1);
            while (bad) {
              const int c = __builtin_ctz(bad);
              bad &= bad - 1;
              const int64_t jc = j + c;
              float sv = 0, sh = 0;
              for (int64_t t = diag ? tp : i0; t < i1; ++t) {
                const float P = std::exp(w[t * T + tp] + K[tp * N + jc] + neg_lse(L[t * N + jc]));
                sv += P * G[t * N + jc];
                sh += P * Hm[t * N + jc];
              }
              dV[tp * N + jc] += sv;
              sPH[tp * N + jc] += sh;
            }
          }
        }
        // dW = g2 e^(w - a + nu); guard -> exact over the columns
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t t = i0 + ii;
          const float* g2r = g2p + ii * nj;
          const int64_t cnt = diag ? t - j0 + 1 : nj;
          const float* row = w + t * T + j0;
          float* dwr = dW + t * T + j0;
          const __m256 shift = _mm256_set1_ps(safe_off(nu[ii]) - safe_off(a[ii]));
          for (int64_t jj = 0; jj < cnt; jj += 8) {
            const int64_t n = cnt - jj;
            const __m256 sc = _mm256_add_ps(loadn(row + jj, n), shift);
            storen(dwr + jj, _mm256_mul_ps(loadn(g2r + jj, n), vexp(sc)), n);
            int bad = _mm256_movemask_ps(_mm256_cmp_ps(sc, _mm256_set1_ps(guard), _CMP_GT_OQ)) &
                      ((1 << std::min<int64_t>(n, 8)) - 1);
            while (bad) {
              const int c = __builtin_ctz(bad);
              bad &= bad - 1;
              const int64_t tp = j0 + jj + c;
              const float wv = w[t * T + tp];
              float acc = 0;
              for (int64_t j = 0; j < N; ++j) {
                const float P = std::exp(wv + K[tp * N + j] + neg_lse(L[t * N + j]));
                acc += P * (G[t * N + j] * V[tp * N + j] - Hm[t * N + j]);
              }
              dwr[jj + c] = acc;
            }
          }
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------ non-causal, whole
// Non-causal backward with whole-sequence maxima: the factorisation above with one query tile and one key-side
// maximum spanning the sequence, so every factor is computed once per element (Ew once per (t, t'), R and X once
// per (t, j), Y once per (t', j)) and the GEMMs run over all T queries at once:
//   a[t] = max_t' w[t, t'];  La = a - lse;  lam[j] = max_t La;  mu[j] = max_t' K;  nu[t] = max_j (La + mu)
//   R = exp(La - lam), X = exp(La + mu - nu), Y = exp(K - mu), Ew = exp(w - a)        (all in [0, 1])
//   key tile J:  g = Ew[:, J]^T [R G | R H]   ->  dV = g_G e^(K + lam), sPH = g_H e^(K + lam), dk = V dV - sPH
//                g2 = [X G | -X H] [Y V | Y]_J^T  ->  dW[:, J] = g2 e^(w - a + nu)
// The guard is the one above (a scale exponent above 42: that entry exactly); the global maxima only make it
// fire more often on extreme inputs, so the head first counts where it would fire (K + lam > 42; w - a + nu > 42,
// looked at only in rows with nu > 42 since w <= a) and declines when recomputing those would cost more than a
// small fraction of the GEMMs: the caller then runs
// the tile-pair kernel above, whose local maxima keep the exact recomputations rare. Reads dy, q, k, v, y, lse
// and writes dq, dk, dv in their (B, T, D) layout; key tiles J in parallel, each owning dk/dv rows J and dW
// columns J, each entry computed by one thread in a fixed order (bit-identical for any thread count).
constexpr int64_t kWholeKeyTile = 256;

struct BwdHead {
  const float* w;  // (T, T)
  const float* dy;
  const float* q;
  const float* k;
  const float* v;
  const float* y;
  const float* lse;
  float* dq;
  float* dk;
  float* dv;
  float* dw;  // (T, T)
  Cols L;
};

inline float sigmoid1(float x) { return 1.f / (1.f + std::exp(-x)); }

bool head_bwd_whole(const BwdHead& h, const at::TensorOptions& opts) {
  const Cols& L = h.L;
  const int64_t T = L.T, N = L.N(), Dh = L.Dh;
  const float ninf = -std::numeric_limits<float>::infinity();
  const float guard = 42.f;
  const __m256 vninf = _mm256_set1_ps(ninf), vguard = _mm256_set1_ps(guard);
  std::vector<float> a(T), nu(T), lam(N), mu(N);
  // a: row maxima of w
  at::parallel_for(0, T, 64, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) {
      const float* row = h.w + t * T;
      __m256 mx = vninf;
      for (int64_t jj = 0; jj < T; jj += 8)
        mx = vmax_keep(mx, _mm256_blendv_ps(vninf, loadn(row + jj, T - jj), _mm256_castsi256_ps(tail_mask(T - jj))));
      a[t] = hmax(mx);
    }
  });
  // mu, lam: column maxima of K and of La = a - lse (-inf where a or lse is -inf)
  const int64_t ncb = (Dh + 63) / 64;
  at::parallel_for(0, L.B * ncb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t task = b0; task < b1; ++task) {
      const int64_t b = task / ncb, c0 = (task % ncb) * 64, c1 = std::min(Dh, c0 + 64);
      for (int64_t c = c0; c < c1; c += 8) {
        const int64_t n = c1 - c, j = b * Dh + c;
        __m256 mk = vninf, ml = vninf;
        for (int64_t t = 0; t < T; ++t) {
          const int64_t o = L.base(b, t) + c;
          mk = vmax_keep(mk, loadn(h.k + o, n));
          const __m256 av = _mm256_set1_ps(a[t]), Lv = loadn(h.lse + o, n);
          const __m256 masked =
              _mm256_or_ps(_mm256_cmp_ps(av, vninf, _CMP_EQ_OQ), _mm256_cmp_ps(Lv, vninf, _CMP_EQ_OQ));
          ml = vmax_keep(ml, _mm256_blendv_ps(_mm256_sub_ps(av, Lv), vninf, masked));
        }
        storen(mu.data() + j, mk, n);
        storen(lam.data() + j, ml, n);
      }
    }
  });
  // per row t: nu[t]; RGH, XGH rows; dq; YVY row of key t; the guard census
  at::Tensor RGHt = at::empty({T, 2 * N}, opts), XGHt = at::empty({T, 2 * N}, opts), YVYt = at::empty({T, 2 * N}, opts);
  float* RGH = RGHt.data_ptr<float>();
  float* XGH = XGHt.data_ptr<float>();
  float* YVY = YVYt.data_ptr<float>();
  const int64_t nblk = (T + 63) / 64;
  std::vector<int64_t> census(nblk, 0);
  at::parallel_for(0, nblk, 1, [&](int64_t p0, int64_t p1) {
    std::vector<float> La(N);
    for (int64_t p = p0; p < p1; ++p) {
      int64_t cnt = 0;
      for (int64_t t = p * 64; t < std::min(T, p * 64 + 64); ++t) {
        const __m256 av = _mm256_set1_ps(a[t]);
        __m256 nmax = vninf;
        for (int64_t b = 0; b < L.B; ++b)
          for (int64_t c = 0; c < Dh; c += 8) {
            const int64_t n = Dh - c, j = b * Dh + c, o = L.base(b, t) + c;
            const __m256 Lv = loadn(h.lse + o, n);
            const __m256 masked =
                _mm256_or_ps(_mm256_cmp_ps(av, vninf, _CMP_EQ_OQ), _mm256_cmp_ps(Lv, vninf, _CMP_EQ_OQ));
            const __m256 x = _mm256_blendv_ps(_mm256_sub_ps(av, Lv), vninf, masked);
            storen(La.data() + j, x, n);
            nmax = vmax_keep(nmax, _mm256_blendv_ps(vninf, _mm256_add_ps(x, loadn(mu.data() + j, n)),
                                                    _mm256_castsi256_ps(tail_mask(n))));
            // dV guard census of key row t
            const __m256 sc = _mm256_add_ps(loadn(h.k + o, n), loadn(lam.data() + j, n));
            cnt += T * __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(sc, vguard, _CMP_GT_OQ)) &
                                          ((1 << std::min<int64_t>(n, 8)) - 1));
          }
        nu[t] = hmax(nmax);
        if (nu[t] > guard) {  // dW guard census of row t: w - a + nu > guard, an N-term sum each
          const float* row = h.w + t * T;
          const __m256 shift = _mm256_set1_ps(nu[t] - safe_off(a[t]));
          for (int64_t jj = 0; jj < T; jj += 8) {
            const int64_t n = T - jj;
            const __m256 sc = _mm256_add_ps(loadn(row + jj, n), shift);
            cnt += N * __builtin_popcount(_mm256_movemask_ps(_mm256_cmp_ps(sc, vguard, _CMP_GT_OQ)) &
                                          ((1 << std::min<int64_t>(n, 8)) - 1));
          }
        }
        const __m256 nuv = _mm256_set1_ps(safe_off(nu[t]));
        const __m256 one = _mm256_set1_ps(1.f);
        float* rr = RGH + t * 2 * N;
        float* xr = XGH + t * 2 * N;
        float* yr = YVY + t * 2 * N;
        for (int64_t b = 0; b < L.B; ++b)
          for (int64_t c = 0; c < Dh; c += 8) {
            const int64_t n = Dh - c, j = b * Dh + c, o = L.base(b, t) + c;
            const __m256 x = loadn(La.data() + j, n);
            const __m256 dyv = loadn(h.dy + o, n), sq = vsigmoid(loadn(h.q + o, n));
            const __m256 Gv = _mm256_mul_ps(dyv, sq), Hv = _mm256_mul_ps(dyv, loadn(h.y + o, n));
            storen(h.dq + o, _mm256_mul_ps(Hv, _mm256_sub_ps(one, sq)), n);
            const __m256 R = vexp(_mm256_sub_ps(x, vsafe_off(loadn(lam.data() + j, n))));
            storen(rr + j, _mm256_mul_ps(R, Gv), n);
            storen(rr + N + j, _mm256_mul_ps(R, Hv), n);
            // raw mu: X = 0 for a column whose keys are all masked (its Y uses the safe offset)
            const __m256 mv = loadn(mu.data() + j, n);
            const __m256 X = vexp(_mm256_sub_ps(_mm256_add_ps(x, mv), nuv));
            storen(xr + j, _mm256_mul_ps(X, Gv), n);
            storen(xr + N + j, _mm256_sub_ps(_mm256_setzero_ps(), _mm256_mul_ps(X, Hv)), n);
            const __m256 Y = vexp(_mm256_sub_ps(loadn(h.k + o, n), vsafe_off(mv)));
            storen(yr + j, _mm256_mul_ps(Y, loadn(h.v + o, n)), n);
            storen(yr + N + j, Y, n);
          }
      }
      census[p] = cnt;
    }
  });
  // the exact recomputations' cost in multiply-adds (a dV entry sums T terms, a dW entry N), allowed up to
  // ~1/8000 of the GEMMs' 8 T^2 N flops (plus a constant so that small heads take the guard rather than decline)
  int64_t guarded = 0;
  for (const int64_t c : census) guarded += c;
  if (guarded > (int64_t(1) << 18) + T * T / 1024 * N) return false;

  // exact P-weighted sums for one guarded entry: column j, keys t' (dV, sPH) or rows t (dW)
  auto GH = [&](int64_t t, int64_t j, float& G, float& Hh) {
    const int64_t o = L.base(j / Dh, t) + j % Dh;
    G = h.dy[o] * sigmoid1(h.q[o]);
    Hh = h.dy[o] * h.y[o];
  };
  auto at_ = [&](const float* x, int64_t t, int64_t j) { return x[L.base(j / Dh, t) + j % Dh]; };
  const int64_t nt = (T + kWholeKeyTile - 1) / kWholeKeyTile;
  at::parallel_for(0, nt, 1, [&](int64_t p0, int64_t p1) {
    at::Tensor Ew = at::empty({T, kWholeKeyTile}, opts);
    at::Tensor g = at::empty({kWholeKeyTile, 2 * N}, opts);
    at::Tensor g2 = at::empty({T, kWholeKeyTile}, opts);
    float* Ewp = Ew.data_ptr<float>();
    const float* gp = g.data_ptr<float>();
    const float* g2p = g2.data_ptr<float>();
    for (int64_t J = p0; J < p1; ++J) {
      const int64_t j0 = J * kWholeKeyTile, j1 = std::min(T, j0 + kWholeKeyTile), nj = j1 - j0;
      for (int64_t t = 0; t < T; ++t) {
        const float* row = h.w + t * T + j0;
        const __m256 off = _mm256_set1_ps(safe_off(a[t]));
        for (int64_t jj = 0; jj < nj; jj += 8)
          storen(Ewp + t * nj + jj, vexp(_mm256_sub_ps(loadn(row + jj, nj - jj), off)), nj - jj);
      }
      at::Tensor gv = g.narrow(0, 0, nj);
      at::mm_out(gv, Ew.view(-1).narrow(0, 0, T * nj).view({T, nj}).t(), RGHt);
      at::Tensor g2v = g2.view(-1).narrow(0, 0, T * nj).view({T, nj});
      at::mm_out(g2v, XGHt, YVYt.narrow(0, j0, nj).t());
      // dv, dk of key rows J: scale e^(K + lam); guard -> exact over every query
      for (int64_t tp = j0; tp < j1; ++tp) {
        const float* gr = gp + (tp - j0) * 2 * N;
        for (int64_t b = 0; b < L.B; ++b)
          for (int64_t c = 0; c < Dh; c += 8) {
            const int64_t n = Dh - c, j = b * Dh + c, o = L.base(b, tp) + c;
            const __m256 sc = _mm256_add_ps(loadn(h.k + o, n), loadn(lam.data() + j, n));
            const __m256 big = _mm256_cmp_ps(sc, vguard, _CMP_GT_OQ);
            const __m256 e = vexp(sc);
            const __m256 dvv = _mm256_mul_ps(loadn(gr + j, n), e), sph = _mm256_mul_ps(loadn(gr + N + j, n), e);
            storen(h.dv + o, dvv, n);
            storen(h.dk + o, _mm256_fmsub_ps(loadn(h.v + o, n), dvv, sph), n);
            int bad = _mm256_movemask_ps(big) & ((1 << std::min<int64_t>(n, 8)) - 1);
            while (bad) {
              const int lane = __builtin_ctz(bad);
              bad &= bad - 1;
              const int64_t jc = j + lane;
              const float kv = h.k[o + lane];
              float sv = 0, sh = 0;
              for (int64_t t = 0; t < T; ++t) {
                float G, Hh;
                GH(t, jc, G, Hh);
                const float P = std::exp(h.w[t * T + tp] + kv + neg_lse(at_(h.lse, t, jc)));
                sv += P * G;
                sh += P * Hh;
              }
              h.dv[o + lane] = sv;
              h.dk[o + lane] = h.v[o + lane] * sv - sh;
            }
          }
      }
      // dW[:, J] = g2 e^(w - a + nu); guard -> exact over the columns
      for (int64_t t = 0; t < T; ++t) {
        const float* g2r = g2p + t * nj;
        const float* row = h.w + t * T + j0;
        float* dwr = h.dw + t * T + j0;
        const __m256 shift = _mm256_set1_ps(safe_off(nu[t]) - safe_off(a[t]));
        for (int64_t jj = 0; jj < nj; jj += 8) {
          const int64_t n = nj - jj;
          const __m256 sc = _mm256_add_ps(loadn(row + jj, n), shift);
          storen(dwr + jj, _mm256_mul_ps(loadn(g2r + jj, n), vexp(sc)), n);
          int bad = _mm256_movemask_ps(_mm256_cmp_ps(sc, vguard, _CMP_GT_OQ)) & ((1 << std::min<int64_t>(n, 8)) - 1);
          while (bad) {
            const int lane = __builtin_ctz(bad);
            bad &= bad - 1;
            const int64_t tp = j0 + jj + lane;
            const float wv = row[jj + lane];
            float acc = 0;
            for (int64_t j = 0; j < N; ++j) {
              float G, Hh;
              GH(t, j, G, Hh);
              const float P = std::exp(wv + at_(h.k, tp, j) + neg_lse(at_(h.lse, t, j)));
              acc += P * (G * at_(h.v, tp, j) - Hh);
            }
            dwr[jj + lane] = acc;
          }
        }
      }
    }
  });
  return true;
}

}  // namespace

#pragma GCC pop_options

bool aft_full_head_bwd_avx2(const float* w, const float* K, const float* V, const float* G, const float* Hm,
                            const float* L, float* dV, float* sPH, float* dW, int64_t T, int64_t N, bool causal,
                            const at::TensorOptions& opts) {
  if (!cpu_has_avx2_fma()) return false;
  head_bwd(w, K, V, G, Hm, L, dV, sPH, dW, T, N, causal, opts);
  return true;
}

bool aft_full_head_bwd_whole_avx2(int64_t hh, const at::Tensor& dya, const at::Tensor& qa, const at::Tensor& ka,
                                  const at::Tensor& va, const at::Tensor& wa, const at::Tensor& ya,
                                  const at::Tensor& lsea, at::Tensor& dq, at::Tensor& dk, at::Tensor& dv,
                                  at::Tensor& dw) {
  if (!cpu_has_avx2_fma()) return false;
  const int64_t B = qa.size(0), T = qa.size(1), D = qa.size(2), H = wa.size(0);
  const int64_t Dh = D / H, c0 = hh * Dh;
  const BwdHead h{wa.data_ptr<float>() + hh * T * T, dya.data_ptr<float>() + c0,        qa.data_ptr<float>() + c0,
                  ka.data_ptr<float>() + c0,         va.data_ptr<float>() + c0,         ya.data_ptr<float>() + c0,
                  lsea.data_ptr<float>() + c0,       dq.data_ptr<float>() + c0,         dk.data_ptr<float>() + c0,
                  dv.data_ptr<float>() + c0,         dw.data_ptr<float>() + hh * T * T, Cols{B, T, D, Dh}};
  return head_bwd_whole(h, qa.options());
}

#else
bool aft_full_head_bwd_whole_avx2(int64_t, const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                  const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, at::Tensor&,
                                  at::Tensor&, at::Tensor&) {
  return false;
}
bool aft_full_head_bwd_avx2(const float*, const float*, const float*, const float*, const float*, const float*, float*,
                            float*, float*, int64_t, int64_t, bool, const at::TensorOptions&) {
  return false;
}
#endif

}  // namespace cpu
}  // namespace attnfree
