// AFT-full forward on CPU as tile-wise factorised GEMMs (docs/design.md §2), per head h with N = B * (D / heads)
// columns (column j = b * Dh + c):
//   key tile J (width tau): r[t] = max_J w[t, J];  Ew = exp(w[t, J] - r);  m[j] = max_J K[J, j];
//   X = exp(K[J] - m);  [n | d] = Ew @ [X * V[J] | X]  (one ATen GEMM, operands in [0, 1]);
//   l = r + m + log d, mean = n / d, merged into the running (M, S, A) per (t, j) like an online softmax.
//   Causal: tiles above the diagonal are skipped, diagonal tiles are computed exactly per element.
//   Masks (docs/design.md §7): every max used as a shift is a safe offset (0 where the max is -inf), so an
//   all -inf key tile, w row or row of logits gives exactly 0 and no (-inf) - (-inf) is formed; a row with no
//   finite logit ends with S = 0: z = 0, lse = -inf. Only compares and selects, no extra exponential.
//   Exactness guard: a tile with d < 1e-30 is "lost" (its products may have underflowed); its contribution is
//   bounded by r + m + log(1e-30 + tau * tiny). Wherever that bound exceeds lse - 30 the (t, j) is recomputed
//   exactly per element (two passes over all visible keys), so the result never depends on a lost tile.
// Memory: O(T * N) state per head + one (T, 2N) tile product; never (B, T, T, D).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "aft_full/aft_full_cpu.h"
#include "aft_full/aft_full_tiled_vec.h"

namespace attnfree {
namespace cpu {
namespace {

// x where x != -inf, else 0: the offset of exp(a - off) when every a may be -inf.
template <typename acc_t>
inline acc_t safe_off(acc_t x) {
  return x == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : x;
}

template <typename acc_t>
inline void merge_one(acc_t& M, acc_t& S, acc_t& A, acc_t l, acc_t mean) {
  if (l > M) {
    const acc_t e = std::exp(M - l);  // M = -inf -> 0
    S = S * e + acc_t(1);
    A = A * e + mean;
    M = l;
  } else {
    const acc_t e = std::exp(l - M);
    S += e;
    A += mean * e;
  }
}

// -lse as an exponent offset: -inf where lse = -inf (a row with no finite logit: P = exp(w + k - lse) = 0)
template <typename acc_t>
inline acc_t neg_lse(acc_t L) {
  return L == -std::numeric_limits<acc_t>::infinity() ? L : -L;
}

// exact (M, S, A) over keys [k0, k1] for query t, column j; S = 0 (and M = 0) where every logit is -inf
template <typename acc_t>
inline void exact_range(const acc_t* wrow, const acc_t* K, const acc_t* V, int64_t N, int64_t j, int64_t k0, int64_t k1,
                        acc_t& M, acc_t& S, acc_t& A) {
  acc_t mx = -std::numeric_limits<acc_t>::infinity();
  for (int64_t tp = k0; tp <= k1; ++tp) mx = std::max(mx, wrow[tp] + K[tp * N + j]);
  mx = safe_off(mx);
  acc_t s = 0, a = 0;
  for (int64_t tp = k0; tp <= k1; ++tp) {
    const acc_t e = std::exp(wrow[tp] + K[tp * N + j] - mx);
    s += e;
    a += e * V[tp * N + j];
  }
  M = mx;
  S = s;
  A = a;
}

// One query tile's rows of a w tile: r[ii] = max_jj w[i0 + ii, j0 + jj], Ew[ii][jj] = exp(w - r) (row stride tau).
template <typename acc_t>
inline void exp_rows(const acc_t* w, int64_t T, int64_t i0, int64_t ni, int64_t j0, int64_t nj, int64_t tau, acc_t* r,
                     acc_t* Ew) {
  for (int64_t ii = 0; ii < ni; ++ii) {
    const acc_t* row = w + (i0 + ii) * T + j0;
    acc_t mx = -std::numeric_limits<acc_t>::infinity();
    for (int64_t jj = 0; jj < nj; ++jj) mx = std::max(mx, row[jj]);
    r[ii] = mx;
    const acc_t off = safe_off(mx);
    acc_t* e = Ew + ii * tau;
    for (int64_t jj = 0; jj < nj; ++jj) e[jj] = std::exp(row[jj] - off);
  }
}

template <typename acc_t>
void head_fwd(const acc_t* w, const acc_t* K, const acc_t* V, acc_t* Zout, acc_t* Lout, int64_t T, int64_t N,
              bool causal, const at::TensorOptions& opts) {
  const int64_t tau = kFullTile;
  const int64_t nt = (T + tau - 1) / tau;
  const acc_t tiny = acc_t(1e-30);
  const acc_t log_tiny = std::log(tiny);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();

  // key side, shared by every query block: m[J, j] = max_J K, XX[t'] = [exp(K - m) * V | exp(K - m)]
  at::Tensor XXt = at::empty({T, 2 * N}, opts);
  std::vector<acc_t> mt(nt * N);
  acc_t* XX = XXt.data_ptr<acc_t>();
  at::parallel_for(0, nt, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t J = b0; J < b1; ++J) {
      const int64_t j0 = J * tau, j1 = std::min(T, j0 + tau);
      acc_t* m = mt.data() + J * N;
      for (int64_t j = 0; j < N; ++j) m[j] = ninf;
      for (int64_t tp = j0; tp < j1; ++tp)
        for (int64_t j = 0; j < N; ++j) m[j] = std::max(m[j], K[tp * N + j]);
      std::vector<acc_t> off(N);
      for (int64_t j = 0; j < N; ++j) off[j] = safe_off(m[j]);
      for (int64_t tp = j0; tp < j1; ++tp) {
        acc_t* row = XX + tp * 2 * N;
        for (int64_t j = 0; j < N; ++j) {
          const acc_t x = std::exp(K[tp * N + j] - off[j]);
          row[j] = x * V[tp * N + j];
          row[N + j] = x;
        }
      }
    }
  });

  // query blocks: one parallel region; blocks interleaved small/large so causal work is balanced
  at::parallel_for(0, nt, 1, [&](int64_t p0, int64_t p1) {
    at::Tensor Ew = at::empty({tau, tau}, opts);
    at::Tensor nd = at::empty({tau, 2 * N}, opts);
    acc_t* Ewp = Ew.data_ptr<acc_t>();
    const acc_t* ndp = nd.data_ptr<acc_t>();
    std::vector<acc_t> r(tau), M(tau * N), S(tau * N), A(tau * N), LB(tau * N);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t I = (p % 2 == 0) ? p / 2 : nt - 1 - p / 2;
      const int64_t i0 = I * tau, i1 = std::min(T, i0 + tau), ni = i1 - i0;
      std::fill(M.begin(), M.end(), ninf);
      std::fill(S.begin(), S.end(), acc_t(0));
      std::fill(A.begin(), A.end(), acc_t(0));
      std::fill(LB.begin(), LB.end(), ninf);
      for (int64_t J = 0; J < nt; ++J) {
        const int64_t j0 = J * tau, j1 = std::min(T, j0 + tau), nj = j1 - j0;
        if (causal && J > I) break;
        if (causal && J == I) {  // diagonal tile: exact per element over keys j0..t
          for (int64_t ii = 0; ii < ni; ++ii) {
            const int64_t t = i0 + ii;
            for (int64_t j = 0; j < N; ++j) {
              acc_t m_, s_, a_;
              exact_range(w + t * T, K, V, N, j, j0, t, m_, s_, a_);
              if (s_ == acc_t(0)) continue;  // every key of the tile masked: nothing to merge
              merge_one(M[ii * N + j], S[ii * N + j], A[ii * N + j], m_ + std::log(s_), a_ / s_);
            }
          }
          continue;
        }
        exp_rows(w, T, i0, ni, j0, nj, tau, r.data(), Ewp);
        at::Tensor ndv = nd.narrow(0, 0, ni);
        at::mm_out(ndv, Ew.narrow(0, 0, ni).narrow(1, 0, nj), XXt.narrow(0, j0, nj));
        const acc_t* m = mt.data() + J * N;
        for (int64_t ii = 0; ii < ni; ++ii) {
          const acc_t* nrow = ndp + ii * 2 * N;
          const acc_t* drow = nrow + N;
          const acc_t ri = r[ii];
          acc_t* Mr = M.data() + ii * N;
          acc_t* Sr = S.data() + ii * N;
          acc_t* Ar = A.data() + ii * N;
          acc_t* Lr = LB.data() + ii * N;
          for (int64_t j = 0; j < N; ++j) {
            const acc_t d = drow[j];
            if (!(d >= tiny)) {  // lost tile: remember an upper bound of its log-contribution (NaN: +inf, exact)
              Lr[j] =
                  d != d ? std::numeric_limits<acc_t>::infinity() : std::max(Lr[j], ri + m[j] + log_tiny + acc_t(1e-3));
              continue;
            }
            merge_one(Mr[j], Sr[j], Ar[j], ri + m[j] + std::log(d), nrow[j] / d);
          }
        }
      }
      // exactness guard + finalisation
      for (int64_t ii = 0; ii < ni; ++ii) {
        const int64_t t = i0 + ii;
        const int64_t kend = causal ? t : T - 1;
        for (int64_t j = 0; j < N; ++j) {
          const int64_t o = ii * N + j;
          acc_t lse = M[o] + std::log(S[o]);  // -inf where S = 0
          acc_t z = S[o] == acc_t(0) ? acc_t(0) : A[o] / S[o];
          if (!(LB[o] <= lse - acc_t(30))) {  // a lost tile could matter (or nothing survived): exact
            acc_t m_, s_, a_;
            exact_range(w + t * T, K, V, N, j, 0, kend, m_, s_, a_);
            lse = m_ + std::log(s_);
            z = s_ == acc_t(0) ? acc_t(0) : a_ / s_;
          }
          Lout[t * N + j] = lse;
          Zout[t * N + j] = z;
        }
      }
    }
  });
}

// ------------------------------------------------------------------------------------------------ backward
// Per head, key tiles J in parallel (each owns dv/dk rows J and dw columns J), query tiles I inside:
//   a[t] = max_J w[t, J]; Ew = exp(w - a); La = a - lse; lam[j] = max_I La; R = exp(La - lam)
//   g = Ew^T [R G | R H]   (GEMM)  ->  dv[t', j] += g_G exp(K + lam),  sumPH[t', j] += g_H exp(K + lam)
//   mu[j] = max_J K; Y = exp(K - mu); Xl = La + mu; nu[t] = max_j Xl; Xt = exp(Xl - nu)
//   g2 = [Xt G | -Xt H] [Y V | Y]^T   (GEMM)  ->  dw[t, t'] = g2 exp(w - a + nu)
// Every factor is in [0, 1]; the scale exponent s (K + lam, or w - a + nu) is applied at the end. Guard:
// where s > kGuard (float32: 42, float64: 663) underflowed products could matter, so that entry is
// recomputed exactly; otherwise anything lost is below tiny * e^s (~1e-20 relative to |G|, |H|).
// Causal diagonal tiles are exact per element; tiles above the diagonal are skipped.
// Masks (docs/design.md §7): -lse enters as neg_lse (-inf for a row with no finite logit, which gets P = 0),
// shifts are safe offsets (an all -inf key tile column, w row or query tile column gives factors exactly 0).
template <typename acc_t>
void head_bwd(const acc_t* w, const acc_t* K, const acc_t* V, const acc_t* G, const acc_t* Hm, const acc_t* L,
              acc_t* dV, acc_t* sPH, acc_t* dW, int64_t T, int64_t N, bool causal, const at::TensorOptions& opts) {
  const int64_t tau = kFullTile;
  const int64_t nt = (T + tau - 1) / tau;
  const acc_t guard = sizeof(acc_t) == 4 ? acc_t(42) : acc_t(663);
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  // NL = -lse, -inf where lse = -inf, once per head (the inner loops then add it, as they subtracted lse)
  std::vector<acc_t> NLv(T * N);
  for (int64_t i = 0; i < T * N; ++i) NLv[i] = neg_lse(L[i]);
  const acc_t* NL = NLv.data();
  at::parallel_for(0, nt, 1, [&](int64_t p0, int64_t p1) {
    at::Tensor Ew = at::empty({tau, tau}, opts);
    at::Tensor RGH = at::empty({tau, 2 * N}, opts);
    at::Tensor g = at::empty({tau, 2 * N}, opts);
    at::Tensor XGH = at::empty({tau, 2 * N}, opts);
    at::Tensor YVY = at::empty({tau, 2 * N}, opts);
    at::Tensor g2 = at::empty({tau, tau}, opts);
    acc_t* Ewp = Ew.data_ptr<acc_t>();
    acc_t* RGHp = RGH.data_ptr<acc_t>();
    const acc_t* gp = g.data_ptr<acc_t>();
    acc_t* XGHp = XGH.data_ptr<acc_t>();
    acc_t* YVYp = YVY.data_ptr<acc_t>();
    const acc_t* g2p = g2.data_ptr<acc_t>();
    std::vector<acc_t> a(tau), nu(tau), lam(N), lam_off(N), mu(N), mu_off(N);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t J = (p % 2 == 0) ? p / 2 : nt - 1 - p / 2;
      const int64_t j0 = J * tau, j1 = std::min(T, j0 + tau), nj = j1 - j0;
      for (int64_t tp = j0; tp < j1; ++tp)
        for (int64_t j = 0; j < N; ++j) {
          dV[tp * N + j] = 0;
          sPH[tp * N + j] = 0;
        }
      // key-side factors of the dw product
      for (int64_t j = 0; j < N; ++j) mu[j] = ninf;
      for (int64_t tp = j0; tp < j1; ++tp)
        for (int64_t j = 0; j < N; ++j) mu[j] = std::max(mu[j], K[tp * N + j]);
      for (int64_t j = 0; j < N; ++j) mu_off[j] = safe_off(mu[j]);
      for (int64_t jj = 0; jj < nj; ++jj) {
        const int64_t tp = j0 + jj;
        acc_t* row = YVYp + jj * 2 * N;
        for (int64_t j = 0; j < N; ++j) {
          const acc_t y = std::exp(K[tp * N + j] - mu_off[j]);
          row[j] = y * V[tp * N + j];
          row[N + j] = y;
        }
      }
      for (int64_t I = causal ? J : 0; I < nt; ++I) {
        const int64_t i0 = I * tau, i1 = std::min(T, i0 + tau), ni = i1 - i0;
        if (causal && I == J) {  // diagonal tile, exact: keys t' <= t
          for (int64_t tp = j0; tp < j1; ++tp) {
            for (int64_t t = tp; t < i1; ++t) {
              const acc_t wv = w[t * T + tp];
              acc_t dw_acc = 0;
              for (int64_t j = 0; j < N; ++j) {
                const acc_t P = std::exp(wv + K[tp * N + j] + NL[t * N + j]);
                dV[tp * N + j] += P * G[t * N + j];
                sPH[tp * N + j] += P * Hm[t * N + j];
                dw_acc += P * (G[t * N + j] * V[tp * N + j] - Hm[t * N + j]);
              }
              dW[t * T + tp] = dw_acc;
            }
          }
          continue;
        }
        exp_rows(w, T, i0, ni, j0, nj, tau, a.data(), Ewp);
        for (int64_t j = 0; j < N; ++j) lam[j] = ninf;
        // La = a - lse: -inf where a = -inf (w row masked over the tile) or lse = -inf (no finite logit)
        for (int64_t ii = 0; ii < ni; ++ii) {
          const acc_t* NLr = NL + (i0 + ii) * N;
          for (int64_t j = 0; j < N; ++j) lam[j] = std::max(lam[j], a[ii] + NLr[j]);
        }
        for (int64_t j = 0; j < N; ++j) lam_off[j] = safe_off(lam[j]);
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t t = i0 + ii;
          const acc_t* NLr = NL + t * N;
          acc_t* rr = RGHp + ii * 2 * N;
          acc_t nmax = ninf;
          for (int64_t j = 0; j < N; ++j) {
            const acc_t La = a[ii] + NLr[j];
            const acc_t R = std::exp(La - lam_off[j]);
            rr[j] = R * G[t * N + j];
            rr[N + j] = R * Hm[t * N + j];
            nmax = std::max(nmax, La + mu[j]);
          }
          nmax = safe_off(nmax);
          nu[ii] = nmax;
          acc_t* xr = XGHp + ii * 2 * N;
          for (int64_t j = 0; j < N; ++j) {
            // raw mu: X = 0 for a column whose keys are all masked in this tile (its Y uses the safe offset)
            const acc_t X = std::exp(a[ii] + NLr[j] + mu[j] - nmax);
            xr[j] = X * G[t * N + j];
            xr[N + j] = -X * Hm[t * N + j];
          }
        }
        at::Tensor gv = g.narrow(0, 0, nj);
        at::mm_out(gv, Ew.narrow(0, 0, ni).narrow(1, 0, nj).t(), RGH.narrow(0, 0, ni));
        at::Tensor g2v = g2.narrow(0, 0, ni).narrow(1, 0, nj);
        at::mm_out(g2v, XGH.narrow(0, 0, ni), YVY.narrow(0, 0, nj).t());
        for (int64_t jj = 0; jj < nj; ++jj) {
          const int64_t tp = j0 + jj;
          const acc_t* gr = gp + jj * 2 * N;
          for (int64_t j = 0; j < N; ++j) {
            const acc_t sc = K[tp * N + j] + lam[j];
            if (sc > guard) {  // exact over the query tile
              acc_t sv = 0, sh = 0;
              for (int64_t t = i0; t < i1; ++t) {
                const acc_t P = std::exp(w[t * T + tp] + K[tp * N + j] + NL[t * N + j]);
                sv += P * G[t * N + j];
                sh += P * Hm[t * N + j];
              }
              dV[tp * N + j] += sv;
              sPH[tp * N + j] += sh;
            } else {
              const acc_t e = std::exp(sc);
              dV[tp * N + j] += gr[j] * e;
              sPH[tp * N + j] += gr[N + j] * e;
            }
          }
        }
        for (int64_t ii = 0; ii < ni; ++ii) {
          const int64_t t = i0 + ii;
          const acc_t* g2r = g2p + ii * tau;
          for (int64_t jj = 0; jj < nj; ++jj) {
            const int64_t tp = j0 + jj;
            const acc_t wv = w[t * T + tp];
            const acc_t sc = wv - safe_off(a[ii]) + nu[ii];
            if (sc > guard) {  // exact over the columns
              acc_t acc = 0;
              for (int64_t j = 0; j < N; ++j) {
                const acc_t P = std::exp(wv + K[tp * N + j] + NL[t * N + j]);
                acc += P * (G[t * N + j] * V[tp * N + j] - Hm[t * N + j]);
              }
              dW[t * T + tp] = acc;
            } else {
              dW[t * T + tp] = g2r[jj] * std::exp(sc);
            }
          }
        }
      }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> aft_full_tiled_fwd(const at::Tensor& qa, const at::Tensor& ka, const at::Tensor& va,
                                                      const at::Tensor& wa, bool causal) {
  const int64_t B = qa.size(0), T = qa.size(1), D = qa.size(2);
  const int64_t H = wa.size(0);
  const int64_t Dh = D / H;
  const int64_t N = B * Dh;
  if (qa.scalar_type() == at::kFloat) {
    at::Tensor y, lse;
    if (aft_full_fwd_avx2(qa, ka, va, wa, causal, y, lse)) return {y, lse};
  }
  at::Tensor Z = at::empty({B, T, D}, qa.options());
  at::Tensor lse = at::empty({B, T, D}, qa.options());
  for (int64_t h = 0; h < H; ++h) {
    // (B, T, Dh) -> (T, B * Dh)
    at::Tensor Kt = ka.narrow(2, h * Dh, Dh).permute({1, 0, 2}).reshape({T, N}).contiguous();
    at::Tensor Vt = va.narrow(2, h * Dh, Dh).permute({1, 0, 2}).reshape({T, N}).contiguous();
    at::Tensor wt = wa[h].contiguous();
    at::Tensor Zh = at::empty({T, N}, qa.options());
    at::Tensor Lh = at::empty({T, N}, qa.options());
    AT_DISPATCH_FLOATING_TYPES(qa.scalar_type(), "attnfree_aft_full_tiled", [&] {
      head_fwd<scalar_t>(wt.data_ptr<scalar_t>(), Kt.data_ptr<scalar_t>(), Vt.data_ptr<scalar_t>(),
                         Zh.data_ptr<scalar_t>(), Lh.data_ptr<scalar_t>(), T, N, causal, qa.options());
    });
    Z.narrow(2, h * Dh, Dh).copy_(Zh.view({T, B, Dh}).permute({1, 0, 2}));
    lse.narrow(2, h * Dh, Dh).copy_(Lh.view({T, B, Dh}).permute({1, 0, 2}));
  }
  return {at::sigmoid(qa) * Z, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> aft_full_tiled_bwd(
    const at::Tensor& dya, const at::Tensor& qa, const at::Tensor& ka, const at::Tensor& va, const at::Tensor& wa,
    const at::Tensor& ya, const at::Tensor& lsea, bool causal) {
  const int64_t B = qa.size(0), T = qa.size(1), D = qa.size(2);
  const int64_t H = wa.size(0);
  const int64_t Dh = D / H;
  const int64_t N = B * Dh;
  at::Tensor dq = at::empty({B, T, D}, qa.options());
  at::Tensor dk = at::empty({B, T, D}, qa.options());
  at::Tensor dv = at::empty({B, T, D}, qa.options());
  // non-causal kernels write every dw entry; causal ones leave t' > t at 0
  at::Tensor dw = causal ? at::zeros({H, T, T}, qa.options()) : at::empty({H, T, T}, qa.options());
  auto cols = [&](const at::Tensor& x, int64_t h) {
    return x.narrow(2, h * Dh, Dh).permute({1, 0, 2}).reshape({T, N}).contiguous();
  };
  at::Tensor Gf, Hf;  // dZ, dZ * Z of the tile-pair kernels, formed on first use
  for (int64_t h = 0; h < H; ++h) {
    if (!causal && qa.scalar_type() == at::kFloat &&
        aft_full_head_bwd_whole_avx2(h, dya, qa, ka, va, wa, ya, lsea, dq, dk, dv, dw))
      continue;
    if (!Gf.defined()) {
      at::Tensor sq = at::sigmoid(qa);
      Gf = dya * sq;
      Hf = dya * ya;
      dq.copy_(Hf * (1 - sq));
    }
    at::Tensor Kt = cols(ka, h), Vt = cols(va, h), Gt = cols(Gf, h), Ht = cols(Hf, h), Lt = cols(lsea, h);
    at::Tensor wt = wa[h].contiguous();
    at::Tensor dVt = at::empty({T, N}, qa.options());
    at::Tensor sPHt = at::empty({T, N}, qa.options());
    at::Tensor dWh = dw[h];
    const bool vec =
        qa.scalar_type() == at::kFloat &&
        aft_full_head_bwd_avx2(wt.data_ptr<float>(), Kt.data_ptr<float>(), Vt.data_ptr<float>(), Gt.data_ptr<float>(),
                               Ht.data_ptr<float>(), Lt.data_ptr<float>(), dVt.data_ptr<float>(),
                               sPHt.data_ptr<float>(), dWh.data_ptr<float>(), T, N, causal, qa.options());
    if (!vec)
      AT_DISPATCH_FLOATING_TYPES(qa.scalar_type(), "attnfree_aft_full_tiled_bwd", [&] {
        head_bwd<scalar_t>(wt.data_ptr<scalar_t>(), Kt.data_ptr<scalar_t>(), Vt.data_ptr<scalar_t>(),
                           Gt.data_ptr<scalar_t>(), Ht.data_ptr<scalar_t>(), Lt.data_ptr<scalar_t>(),
                           dVt.data_ptr<scalar_t>(), sPHt.data_ptr<scalar_t>(), dWh.data_ptr<scalar_t>(), T, N, causal,
                           qa.options());
      });
    at::Tensor dKt = Vt * dVt - sPHt;
    dv.narrow(2, h * Dh, Dh).copy_(dVt.view({T, B, Dh}).permute({1, 0, 2}));
    dk.narrow(2, h * Dh, Dh).copy_(dKt.view({T, B, Dh}).permute({1, 0, 2}));
  }
  return {dq, dk, dv, dw};
}

}  // namespace cpu
}  // namespace attnfree
