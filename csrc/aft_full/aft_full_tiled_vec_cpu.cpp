// AFT-full forward, float32 AVX2/FMA: the factorised tiles of aft_full_tiled_cpu.cpp (docs/design.md §2.3, §2.4)
// with wide key tiles (kKeyTile keys per GEMM instead of 64: 8x fewer merges) and a vectorised merge.
// Per head, N = B * Dh columns; query tiles of kQTile rows run in parallel (interleaved small/large for causal
// balance), each against every visible key tile J:
//   r[t] = max_J w[t, J] (visible keys), Ew = exp(w - r) (0 for masked or causal-hidden keys),
//   m[j] = max_J K, XX = [exp(K - m) V | exp(K - m)], [n | d] = Ew @ XX   (one ATen GEMM over all N columns),
//   s = r + m, merged as (M, Sd, Sn) with M = running max of s: Sd = Sd e^(M - M') + d e^(s - M'), Sn likewise,
//   so no log/division per tile; at the end lse = M + log Sd, z = Sn / Sd.
// Exactness guard (as the 64-tile kernel): a tile with d < tiny (1e-26) is lost, bounded by s + log(tiny) + 1e-3;
// where a lost bound exceeds lse - 30, or a tile gave NaN, the (t, j) is recomputed exactly per element.
// Safe offsets (docs/design.md §7): an all -inf key tile or w row contributes exactly 0; a row with no visible
// finite logit gives z = 0, lse = -inf. Causal: the GEMM of a key tile that reaches past a query row also spans
// keys that row does not see (weight Ew = 0); a NaN/inf there must not reach the row through 0 * NaN
// (docs/design.md §7 rule 2). Where such keys hold a non-finite [X V | X] entry, the GEMM runs on a copy with
// those entries 0 (the hidden rows then get bitwise the values of finite inputs) and the rows that do see one get
// NaN in that column. Each query tile is computed by one thread in a fixed order.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "aft_full/aft_full_cpu.h"
#include "aft_full/aft_full_tiled_vec.h"
#include "common/cpu_simd.h"

namespace attnfree {
namespace cpu {

#ifdef ATTNFREE_HAVE_AVX2_PATH
using namespace simd;

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

constexpr int64_t kQTile = 128;
constexpr int64_t kKeyTile = 512;  // a multiple of kQTile (causal: a key tile starts at or before a query tile)
constexpr float kTiny = 1e-26f;

// every x[0, n) finite
bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

inline float safe_off(float x) { return x == -std::numeric_limits<float>::infinity() ? 0.f : x; }

// -lse as an exponent offset: -inf where lse = -inf (a row with no finite logit: P = 0)
inline float neg_lse(float L) { return L == -std::numeric_limits<float>::infinity() ? L : -L; }

// exact (M, S, A) over keys [k0, k1] for query t, column j (scalar; the guard's fallback)
void exact_range(const float* wrow, const float* K, const float* V, int64_t N, int64_t j, int64_t k0, int64_t k1,
                 float& M, float& S, float& A) {
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t tp = k0; tp <= k1; ++tp) mx = std::max(mx, wrow[tp] + K[tp * N + j]);
  const float off = mx == -std::numeric_limits<float>::infinity() ? 0.f : mx;
  float s = 0, a = 0;
  for (int64_t tp = k0; tp <= k1; ++tp) {
    const float e = std::exp(wrow[tp] + K[tp * N + j] - off);
    s += e;
    a += e * V[tp * N + j];
  }
  M = off;
  S = s;
  A = a;
}

void head_fwd(const float* w, const float* K, const float* V, float* Zout, float* Lout, int64_t T, int64_t N,
              bool causal, const at::TensorOptions& opts) {
  const int64_t nk = (T + kKeyTile - 1) / kKeyTile;
  const int64_t nq = (T + kQTile - 1) / kQTile;
  const float ninf = -std::numeric_limits<float>::infinity();
  const float log_tiny = std::log(kTiny);

  // key side, shared: m[J, j], XX[t'] = [exp(K - m) V | exp(K - m)]
  at::Tensor XXt = at::empty({T, 2 * N}, opts);
  std::vector<float> mt(nk * N);
  float* XX = XXt.data_ptr<float>();
  at::parallel_for(0, nk * ((N + 255) / 256), 1, [&](int64_t b0, int64_t b1) {
    const int64_t ncb = (N + 255) / 256;
    for (int64_t task = b0; task < b1; ++task) {
      const int64_t J = task / ncb, c0 = (task % ncb) * 256, c1 = std::min(N, c0 + 256);
      const int64_t j0 = J * kKeyTile, j1 = std::min(T, j0 + kKeyTile);
      float* m = mt.data() + J * N;
      for (int64_t c = c0; c < c1; c += 8) {
        const int64_t n = c1 - c;
        __m256 mx = _mm256_set1_ps(ninf);
        for (int64_t tp = j0; tp < j1; ++tp) mx = vmax_keep(mx, loadn(K + tp * N + c, n));
        storen(m + c, mx, n);
        const __m256 off = vsafe_off(mx);
        for (int64_t tp = j0; tp < j1; ++tp) {
          const __m256 x = vexp(_mm256_sub_ps(loadn(K + tp * N + c, n), off));
          storen(XX + tp * 2 * N + c, _mm256_mul_ps(x, loadn(V + tp * N + c, n)), n);
          storen(XX + tp * 2 * N + N + c, x, n);
        }
      }
    }
  });

  at::parallel_for(0, nq, 1, [&](int64_t p0, int64_t p1) {
    at::Tensor Ew = at::empty({kQTile, kKeyTile}, opts);
    at::Tensor nd = at::empty({kQTile, 2 * N}, opts);
    float* Ewp = Ew.data_ptr<float>();
    float* ndp = nd.data_ptr<float>();
    std::vector<float> r(kQTile), M(kQTile * N), Sd(kQTile * N), Sn(kQTile * N), LB(kQTile * N);
    at::Tensor XXs;                     // the sanitised GEMM operand, allocated on first use
    std::vector<int64_t> first(2 * N);  // per column: the first zeroed key
    const __m256 vtiny = _mm256_set1_ps(kTiny), vninf = _mm256_set1_ps(ninf);
    const __m256 vpinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
    const __m256 vlb = _mm256_set1_ps(log_tiny + 1e-3f);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t I = (p % 2 == 0) ? p / 2 : nq - 1 - p / 2;
      const int64_t i0 = I * kQTile, i1 = std::min(T, i0 + kQTile), ni = i1 - i0;
      std::fill(M.begin(), M.end(), ninf);
      std::fill(Sd.begin(), Sd.end(), 0.f);
      std::fill(Sn.begin(), Sn.end(), 0.f);
      std::fill(LB.begin(), LB.end(), ninf);
      for (int64_t J = 0; J < nk; ++J) {
        const int64_t j0 = J * kKeyTile;
        if (causal && j0 >= i1) break;
        const int64_t j1 = std::min(T, j0 + kKeyTile);
        const int64_t nj = causal ? std::min(j1, i1) - j0 : j1 - j0;  // GEMM width
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t t = i0 + ii;
          const int64_t cnt = causal ? std::min(nj, t - j0 + 1) : nj;  // visible keys of this row (>= 1)
          const float* row = w + t * T + j0;
          float* e = Ewp + ii * nj;
          __m256 mx = vninf;
          for (int64_t jj = 0; jj < cnt; jj += 8) {
            const __m256i keep = tail_mask(cnt - jj);
            mx = vmax_keep(mx, _mm256_blendv_ps(vninf, loadn(row + jj, cnt - jj), _mm256_castsi256_ps(keep)));
          }
          const float rr = hmax(mx);
          r[ii] = rr;
          const __m256 off = _mm256_set1_ps(rr == ninf ? 0.f : rr);
          for (int64_t jj = 0; jj < cnt; jj += 8)
            storen(e + jj, vexp(_mm256_sub_ps(loadn(row + jj, cnt - jj), off)), cnt - jj);
          for (int64_t jj = cnt; jj < nj; ++jj) e[jj] = 0.f;
        }
        // keys (i0, j0 + nj) are hidden from the rows of this tile before them
        const bool clean =
            !causal || j0 + nj - 1 <= i0 || all_finite(XX + (i0 + 1) * 2 * N, (j0 + nj - i0 - 1) * 2 * N);
        if (!clean) {
          if (!XXs.defined()) XXs = at::empty({kKeyTile, 2 * N}, opts);
          float* xs = XXs.data_ptr<float>();
          std::copy(XX + j0 * 2 * N, XX + (j0 + nj) * 2 * N, xs);
          std::fill(first.begin(), first.end(), T);
          for (int64_t tp = i0 + 1; tp < j0 + nj; ++tp)
            for (int64_t c = 0; c < 2 * N; ++c) {
              float& x = xs[(tp - j0) * 2 * N + c];
              if (std::isfinite(x)) continue;
              x = 0.f;
              first[c] = std::min(first[c], tp);
            }
        }
        at::Tensor ndv = nd.narrow(0, 0, ni);
        at::mm_out(ndv, Ew.view(-1).narrow(0, 0, ni * nj).view({ni, nj}),
                   clean ? XXt.narrow(0, j0, nj) : XXs.narrow(0, 0, nj));
        if (!clean)  // rows that see a zeroed entry: that column is not finite
          for (int64_t ii = 0; ii < ni; ++ii)
            for (int64_t c = 0; c < 2 * N; ++c)
              if (first[c] <= i0 + ii) ndp[ii * 2 * N + c] = std::numeric_limits<float>::quiet_NaN();
        const float* m = mt.data() + J * N;
        for (int64_t ii = 0; ii < ni; ++ii) {
          const float* nrow = ndp + ii * 2 * N;
          const float* drow = nrow + N;
          const __m256 ri = _mm256_set1_ps(r[ii]);
          float* Mr = M.data() + ii * N;
          float* Sdr = Sd.data() + ii * N;
          float* Snr = Sn.data() + ii * N;
          float* Lr = LB.data() + ii * N;
          for (int64_t j = 0; j < N; j += 8) {
            const int64_t n = N - j;
            const __m256 d = loadn(drow + j, n), nn = loadn(nrow + j, n);
            const __m256 s = _mm256_add_ps(ri, loadn(m + j, n));
            const __m256 ok = _mm256_cmp_ps(d, vtiny, _CMP_GE_OQ);
            const __m256 isnan = _mm256_cmp_ps(d, d, _CMP_UNORD_Q);
            // a lost tile's bound (a NaN tile: +inf, i.e. always recompute exactly)
            __m256 lb = _mm256_blendv_ps(_mm256_add_ps(s, vlb), vninf, ok);
            lb = _mm256_blendv_ps(lb, vpinf, isnan);
            storen(Lr + j, _mm256_max_ps(loadn(Lr + j, n), lb), n);
            const __m256 se = _mm256_blendv_ps(vninf, s, ok);
            const __m256 Mo = loadn(Mr + j, n);
            const __m256 Mn = _mm256_max_ps(Mo, se);
            const __m256 off = vsafe_off(Mn);
            const __m256 eo = vexp(_mm256_sub_ps(Mo, off));
            const __m256 en = _mm256_and_ps(vexp(_mm256_sub_ps(se, off)), ok);  // exactly 0 for a lost tile
            storen(Sdr + j, _mm256_fmadd_ps(loadn(Sdr + j, n), eo, _mm256_mul_ps(_mm256_and_ps(d, ok), en)), n);
            storen(Snr + j, _mm256_fmadd_ps(loadn(Snr + j, n), eo, _mm256_mul_ps(_mm256_and_ps(nn, ok), en)), n);
            storen(Mr + j, Mn, n);
          }
        }
      }
      // finalisation + exactness guard
      for (int64_t ii = 0; ii < ni; ++ii) {
        const int64_t t = i0 + ii;
        const int64_t kend = causal ? t : T - 1;
        const float* Mr = M.data() + ii * N;
        const float* Sdr = Sd.data() + ii * N;
        const float* Snr = Sn.data() + ii * N;
        const float* Lr = LB.data() + ii * N;
        float* Lo = Lout + t * N;
        float* Zo = Zout + t * N;
        for (int64_t j = 0; j < N; j += 8) {
          const int64_t n = N - j;
          const __m256 S = loadn(Sdr + j, n);
          const __m256 lse = _mm256_add_ps(loadn(Mr + j, n), vlog(S));
          const __m256 z = _mm256_blendv_ps(_mm256_div_ps(loadn(Snr + j, n), S), _mm256_setzero_ps(),
                                            _mm256_cmp_ps(S, _mm256_setzero_ps(), _CMP_EQ_OQ));
          storen(Lo + j, lse, n);
          storen(Zo + j, z, n);
          // recompute exactly where !(LB <= lse - 30)
          const __m256 fine = _mm256_cmp_ps(loadn(Lr + j, n), _mm256_sub_ps(lse, _mm256_set1_ps(30.f)), _CMP_LE_OQ);
          int bad = ~_mm256_movemask_ps(fine) & ((1 << std::min<int64_t>(n, 8)) - 1);
          while (bad) {
            const int c = __builtin_ctz(bad);
            bad &= bad - 1;
            float m_, s_, a_;
            exact_range(w + t * T, K, V, N, j + c, 0, kend, m_, s_, a_);
            Lo[j + c] = m_ + std::log(s_);
            Zo[j + c] = s_ == 0.f ? 0.f : a_ / s_;
          }
        }
      }
    }
  });
}

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

}  // namespace

#pragma GCC pop_options

bool aft_full_head_fwd_avx2(const float* w, const float* K, const float* V, float* Z, float* L, int64_t T, int64_t N,
                            bool causal, const at::TensorOptions& opts) {
  if (!cpu_has_avx2_fma()) return false;
  head_fwd(w, K, V, Z, L, T, N, causal, opts);
  return true;
}

bool aft_full_head_bwd_avx2(const float* w, const float* K, const float* V, const float* G, const float* Hm,
                            const float* L, float* dV, float* sPH, float* dW, int64_t T, int64_t N, bool causal,
                            const at::TensorOptions& opts) {
  if (!cpu_has_avx2_fma()) return false;
  head_bwd(w, K, V, G, Hm, L, dV, sPH, dW, T, N, causal, opts);
  return true;
}

#else
bool aft_full_head_bwd_avx2(const float*, const float*, const float*, const float*, const float*, const float*, float*,
                            float*, float*, int64_t, int64_t, bool, const at::TensorOptions&) {
  return false;
}
bool aft_full_head_fwd_avx2(const float*, const float*, const float*, float*, float*, int64_t, int64_t, bool,
                            const at::TensorOptions&) {
  return false;
}
#endif

}  // namespace cpu
}  // namespace attnfree
