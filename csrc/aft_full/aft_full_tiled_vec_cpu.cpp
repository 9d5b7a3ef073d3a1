// AFT-full forward, float32 AVX2/FMA: the factorised tiles of aft_full_tiled_cpu.cpp (docs/design.md §2.3, §2.4)
// on wide tiles, reading q, k, v and writing y, lse in their (B, T, D) layout (no transposed copies).
// Per head, N = B * Dh columns (column j = b * Dh + c is channel h * Dh + c of batch entry b); query tiles
// (whole_qtile(T) or kQTile rows) run in parallel, each computed by one thread in a fixed order (bit-identical for any
// thread count).
//
// Non-causal, T <= kWholeMax: one key tile spanning the whole sequence, so no merge at all:
//   r[t] = max_t' w[t, t'], Ew = exp(w - r); m[j] = max_t' K[t', j], XX = [exp(K - m) V | exp(K - m)];
//   [n | d] = Ew @ XX (one ATen GEMM of whole_qtile(T) rows against all 2N columns); lse = r + m + log d, z = n / d.
//   This is the split max of docs/design.md §2.2 with its failure caught: where d < tiny (1e-26) the products
//   may have underflowed (d then holds nothing reliable), and where d is NaN a NaN must propagate; such a (t, j)
//   is recomputed exactly per element. Elsewhere every lost product is below 1e-38 while d >= 1e-26, so the
//   result is exact to rounding. When more than a few (t, j) of a query tile need it (adversarial inputs), the
//   whole tile is redone (as kQTile tiles) with the merge below, whose tile-local maxima keep nearly every tile.
// Causal, long sequences, and redone tiles: key tiles of kKeyTile keys, merged per (t, j):
//   r[t] = max_J w[t, J] (visible keys), Ew = exp(w - r) (0 for causal-hidden keys), m[j] = max_J K,
//   XX = [exp(K - m) V | exp(K - m)], [n | d] = Ew @ XX, s = r + m, merged as (M, Sd, Sn) with M = running max
//   of s: Sd = Sd e^(M - M') + d e^(s - M'), Sn likewise; at the end lse = M + log Sd, z = Sn / Sd.
//   Exactness guard: a tile with d < tiny is lost, bounded by s + log(tiny) + 1e-3; where a lost bound exceeds
//   lse - 30, or a tile gave NaN, the (t, j) is recomputed exactly per element.
// Safe offsets (docs/design.md §7): an all -inf key tile or w row contributes exactly 0; a row with no visible
// finite logit gives z = 0, lse = -inf. Causal: the GEMM of a key tile that reaches past a query row also spans
// keys that row does not see (weight Ew = 0); a NaN/inf there must not reach the row through 0 * NaN
// (docs/design.md §7 rule 2). Where such keys hold a non-finite [X V | X] entry, the GEMM runs on a copy with
// those entries 0 (the hidden rows then get bitwise the values of finite inputs) and the rows that do see one get
// NaN in that column. y = sigmoid(q) * z is formed as each row is written.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "aft_full/aft_full_cpu.h"
#include "aft_full/aft_full_tiled_vec.h"
#include "common/cpu_simd.h"
#include "common/cpu_tile_gemm.h"

namespace attnfree {
namespace cpu {

#ifdef ATTNFREE_HAVE_AVX2_PATH
using namespace simd;

#pragma GCC push_options
#pragma GCC target("avx2,fma")

namespace {

constexpr int64_t kQTile = 128;
constexpr int64_t kKeyTile = 512;  // a multiple of kQTile (causal: a key tile starts at or before a query tile)
// Query tile of the one-key-tile form, a multiple of kQTile: each single-threaded GEMM packs the whole right-hand
// side once, so taller tiles pay less packing (256 rows ran ~5 % faster than 128, 512 another ~4 % at T = 2048);
// 512 only from T = 2048 on, so shorter sequences still give every thread tiles. It depends on T alone (never on
// the thread count: results stay bit-identical across thread counts). The longest sequence run as one key tile
// (kWholeMax) makes a thread's exp(w - r) block whole_qtile(T) x T floats, 16 MiB at the bound.
constexpr int64_t kWholeQTileLong = 512, kWholeQTileShort = 256;
int64_t whole_qtile(int64_t T) { return T >= 2048 ? kWholeQTileLong : kWholeQTileShort; }
constexpr int64_t kWholeMax = 8192;
constexpr float kTiny = 1e-26f;

// every x[0, n) finite
bool all_finite(const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i)
    if (!std::isfinite(x[i])) return false;
  return true;
}

inline float sigmoid1(float x) { return 1.f / (1.f + std::exp(-x)); }

// One head's inputs and outputs, all (B, T, D) with the head's first channel at offset 0 of each pointer.
struct Head {
  const float* w;  // (T, T)
  const float* q;
  const float* k;
  const float* v;
  float* y;
  float* lse;
  Cols L;
};

// exact y, lse at (t, j) over keys [0, kend] (scalar; the guard's fallback)
void exact_out(const Head& h, int64_t t, int64_t j, int64_t kend) {
  const Cols& L = h.L;
  const int64_t b = j / L.Dh, c = j % L.Dh;
  const float* kb = h.k + L.base(b, 0) + c;
  const float* vb = h.v + L.base(b, 0) + c;
  const float* wrow = h.w + t * L.T;
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t tp = 0; tp <= kend; ++tp) mx = std::max(mx, wrow[tp] + kb[tp * L.D]);
  const float off = mx == -std::numeric_limits<float>::infinity() ? 0.f : mx;
  float s = 0, a = 0;
  for (int64_t tp = 0; tp <= kend; ++tp) {
    const float e = std::exp(wrow[tp] + kb[tp * L.D] - off);
    s += e;
    a += e * vb[tp * L.D];
  }
  const int64_t o = L.base(b, t) + c;
  h.lse[o] = off + std::log(s);
  h.y[o] = sigmoid1(h.q[o]) * (s == 0.f ? 0.f : a / s);
}

// Key side, per key tile J of width kt: m[J * N + j] = max_J K[:, j], XX[t'] = [exp(K - m) V | exp(K - m)].
void key_side(const Head& h, int64_t kt, float* XX, float* m) {
  const Cols& L = h.L;
  const int64_t T = L.T, N = L.N();
  const int64_t nk = (T + kt - 1) / kt, ncb = (L.Dh + 63) / 64;
  const float ninf = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, nk * L.B * ncb, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t task = b0; task < b1; ++task) {
      const int64_t J = task / (L.B * ncb), b = (task / ncb) % L.B, c0 = (task % ncb) * 64;
      const int64_t c1 = std::min(L.Dh, c0 + 64);
      const int64_t j0 = J * kt, j1 = std::min(T, j0 + kt);
      const float* kb = h.k + L.base(b, 0);
      const float* vb = h.v + L.base(b, 0);
      for (int64_t c = c0; c < c1; c += 8) {
        const int64_t n = c1 - c, j = b * L.Dh + c;
        __m256 mx = _mm256_set1_ps(ninf);
        for (int64_t tp = j0; tp < j1; ++tp) mx = vmax_keep(mx, loadn(kb + tp * L.D + c, n));
        storen(m + J * N + j, mx, n);
        const __m256 off = vsafe_off(mx);
        for (int64_t tp = j0; tp < j1; ++tp) {
          const __m256 x = vexp(_mm256_sub_ps(loadn(kb + tp * L.D + c, n), off));
          storen(XX + tp * 2 * N + j, _mm256_mul_ps(x, loadn(vb + tp * L.D + c, n)), n);
          storen(XX + tp * 2 * N + N + j, x, n);
        }
      }
    }
  });
}

// Row t's offset r (max over its first cnt keys of w[t, j0 ...]) and e[0, nj) = exp(w - r), 0 past cnt.
inline float exp_row(const float* row, int64_t cnt, int64_t nj, float* e) {
  const float ninf = -std::numeric_limits<float>::infinity();
  const __m256 vninf = _mm256_set1_ps(ninf);
  __m256 mx = vninf;
  for (int64_t jj = 0; jj < cnt; jj += 8)
    mx = vmax_keep(mx, _mm256_blendv_ps(vninf, loadn(row + jj, cnt - jj), _mm256_castsi256_ps(tail_mask(cnt - jj))));
  const float r = hmax(mx);
  const __m256 off = _mm256_set1_ps(r == ninf ? 0.f : r);
  for (int64_t jj = 0; jj < cnt; jj += 8) storen(e + jj, vexp(_mm256_sub_ps(loadn(row + jj, cnt - jj), off)), cnt - jj);
  for (int64_t jj = cnt; jj < nj; ++jj) e[jj] = 0.f;
  return r;
}

// Per-thread scratch of the query-tile loops.
struct Scratch {
  bool wide;  // the AVX-512 tile GEMM instead of at::mm (ATen's float32 GEMM runs AVX2 code on AMD CPUs)
  at::Tensor Ew, nd, XXs;
  std::vector<float> r, M, Sd, Sn, LB;
  std::vector<int64_t> first, bad;
};

// Non-causal query tile I (of whole_qtile(T) rows) against the whole sequence as one key tile (XX, m from key_side with
// kt = T). Returns false, having written nothing reliable, when too many (t, j) would need the exact fallback.
bool qtile_whole(const Head& h, const float* XX, const float* m, int64_t I, Scratch& sc) {
  const Cols& L = h.L;
  const int64_t T = L.T, N = L.N();
  const int64_t QT = whole_qtile(T), i0 = I * QT, i1 = std::min(T, i0 + QT), ni = i1 - i0;
  float* Ewp = sc.Ew.data_ptr<float>();
  for (int64_t ii = 0; ii < ni; ++ii) sc.r[ii] = exp_row(h.w + (i0 + ii) * T, T, T, Ewp + ii * T);
  at::Tensor ndv = sc.nd.narrow(0, 0, ni);
  if (!(sc.wide && tile_gemm(ni, 2 * N, T, Ewp, T, XX, 2 * N, sc.nd.data_ptr<float>(), 2 * N)))
    at::mm_out(ndv, sc.Ew.view(-1).narrow(0, 0, ni * T).view({ni, T}),
               at::from_blob(const_cast<float*>(XX), {T, 2 * N}, sc.nd.options()));
  const float* ndp = sc.nd.data_ptr<float>();
  const __m256 vtiny = _mm256_set1_ps(kTiny), vninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
  const __m256 zero = _mm256_setzero_ps();
  sc.bad.clear();
  const size_t limit = static_cast<size_t>(16 + ni * N / 256);
  for (int64_t ii = 0; ii < ni; ++ii) {
    const int64_t t = i0 + ii;
    const float* nrow = ndp + ii * 2 * N;
    const __m256 ri = _mm256_set1_ps(sc.r[ii]);
    for (int64_t b = 0; b < L.B; ++b)
      for (int64_t c = 0; c < L.Dh; c += 8) {
        const int64_t n = L.Dh - c, j = b * L.Dh + c, o = L.base(b, t) + c;
        const __m256 d = loadn(nrow + N + j, n), nn = loadn(nrow + j, n);
        const __m256 s = _mm256_add_ps(ri, loadn(m + j, n));
        const __m256 z = _mm256_blendv_ps(_mm256_div_ps(nn, d), zero, _mm256_cmp_ps(d, zero, _CMP_EQ_OQ));
        storen(h.lse + o, _mm256_add_ps(s, vlog(d)), n);
        storen(h.y + o, _mm256_mul_ps(vsigmoid(loadn(h.q + o, n)), z), n);
        // d NaN, or d < tiny with a finite offset (an offset of -inf means every logit is -inf: lse = -inf, z = 0)
        const __m256 lost = _mm256_and_ps(_mm256_cmp_ps(d, vtiny, _CMP_LT_OQ), _mm256_cmp_ps(s, vninf, _CMP_NEQ_OQ));
        int bad = _mm256_movemask_ps(_mm256_or_ps(lost, _mm256_cmp_ps(d, d, _CMP_UNORD_Q))) &
                  ((1 << std::min<int64_t>(n, 8)) - 1);
        while (bad) {
          const int lane = __builtin_ctz(bad);
          bad &= bad - 1;
          if (sc.bad.size() >= limit) return false;
          sc.bad.push_back(t * N + j + lane);
        }
      }
  }
  for (const int64_t e : sc.bad) exact_out(h, e / N, e % N, T - 1);
  return true;
}

// Query tile I merged over key tiles of kKeyTile keys (XX, mt from key_side with kt = kKeyTile).
void qtile_merge(const Head& h, const float* XX, const float* mt, int64_t I, bool causal, Scratch& sc) {
  const Cols& L = h.L;
  const int64_t T = L.T, N = L.N();
  const int64_t nk = (T + kKeyTile - 1) / kKeyTile;
  const float ninf = -std::numeric_limits<float>::infinity();
  const float log_tiny = std::log(kTiny);
  const at::TensorOptions opts = sc.nd.options();
  if (sc.M.empty()) {
    sc.M.resize(kQTile * N);
    sc.Sd.resize(kQTile * N);
    sc.Sn.resize(kQTile * N);
    sc.LB.resize(kQTile * N);
    sc.first.resize(2 * N);
  }
  float* Ewp = sc.Ew.data_ptr<float>();
  float* ndp = sc.nd.data_ptr<float>();
  const __m256 vtiny = _mm256_set1_ps(kTiny), vninf = _mm256_set1_ps(ninf);
  const __m256 vpinf = _mm256_set1_ps(std::numeric_limits<float>::infinity());
  const __m256 vlb = _mm256_set1_ps(log_tiny + 1e-3f);
  const int64_t i0 = I * kQTile, i1 = std::min(T, i0 + kQTile), ni = i1 - i0;
  std::fill(sc.M.begin(), sc.M.end(), ninf);
  std::fill(sc.Sd.begin(), sc.Sd.end(), 0.f);
  std::fill(sc.Sn.begin(), sc.Sn.end(), 0.f);
  std::fill(sc.LB.begin(), sc.LB.end(), ninf);
  for (int64_t J = 0; J < nk; ++J) {
    const int64_t j0 = J * kKeyTile;
    if (causal && j0 >= i1) break;
    const int64_t j1 = std::min(T, j0 + kKeyTile);
    const int64_t nj = causal ? std::min(j1, i1) - j0 : j1 - j0;  // GEMM width
    for (int64_t ii = 0; ii < ni; ++ii) {
      const int64_t t = i0 + ii;
      const int64_t cnt = causal ? std::min(nj, t - j0 + 1) : nj;  // visible keys of this row (>= 1)
      sc.r[ii] = exp_row(h.w + t * T + j0, cnt, nj, Ewp + ii * nj);
    }
    // keys (i0, j0 + nj) are hidden from the rows of this tile before them
    const bool clean = !causal || j0 + nj - 1 <= i0 || all_finite(XX + (i0 + 1) * 2 * N, (j0 + nj - i0 - 1) * 2 * N);
    if (!clean) {
      if (!sc.XXs.defined()) sc.XXs = at::empty({kKeyTile, 2 * N}, opts);
      float* xs = sc.XXs.data_ptr<float>();
      std::copy(XX + j0 * 2 * N, XX + (j0 + nj) * 2 * N, xs);
      std::fill(sc.first.begin(), sc.first.end(), T);
      for (int64_t tp = i0 + 1; tp < j0 + nj; ++tp)
        for (int64_t c = 0; c < 2 * N; ++c) {
          float& x = xs[(tp - j0) * 2 * N + c];
          if (std::isfinite(x)) continue;
          x = 0.f;
          sc.first[c] = std::min(sc.first[c], tp);
        }
    }
    at::Tensor ndv = sc.nd.narrow(0, 0, ni);
    at::Tensor rhs =
        clean ? at::from_blob(const_cast<float*>(XX) + j0 * 2 * N, {nj, 2 * N}, opts) : sc.XXs.narrow(0, 0, nj);
    if (!(sc.wide && tile_gemm(ni, 2 * N, nj, sc.Ew.data_ptr<float>(), nj, rhs.data_ptr<float>(), 2 * N,
                               sc.nd.data_ptr<float>(), 2 * N)))
      at::mm_out(ndv, sc.Ew.view(-1).narrow(0, 0, ni * nj).view({ni, nj}), rhs);
    if (!clean)  // rows that see a zeroed entry: that column is not finite
      for (int64_t ii = 0; ii < ni; ++ii)
        for (int64_t c = 0; c < 2 * N; ++c)
          if (sc.first[c] <= i0 + ii) ndp[ii * 2 * N + c] = std::numeric_limits<float>::quiet_NaN();
    const float* m = mt + J * N;
    for (int64_t ii = 0; ii < ni; ++ii) {
      const float* nrow = ndp + ii * 2 * N;
      const float* drow = nrow + N;
      const __m256 ri = _mm256_set1_ps(sc.r[ii]);
      float* Mr = sc.M.data() + ii * N;
      float* Sdr = sc.Sd.data() + ii * N;
      float* Snr = sc.Sn.data() + ii * N;
      float* Lr = sc.LB.data() + ii * N;
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
    for (int64_t b = 0; b < L.B; ++b)
      for (int64_t c = 0; c < L.Dh; c += 8) {
        const int64_t n = L.Dh - c, j = ii * N + b * L.Dh + c, o = L.base(b, t) + c;
        const __m256 S = loadn(sc.Sd.data() + j, n);
        const __m256 lse = _mm256_add_ps(loadn(sc.M.data() + j, n), vlog(S));
        const __m256 z = _mm256_blendv_ps(_mm256_div_ps(loadn(sc.Sn.data() + j, n), S), _mm256_setzero_ps(),
                                          _mm256_cmp_ps(S, _mm256_setzero_ps(), _CMP_EQ_OQ));
        storen(h.lse + o, lse, n);
        storen(h.y + o, _mm256_mul_ps(vsigmoid(loadn(h.q + o, n)), z), n);
        // recompute exactly where !(LB <= lse - 30)
        const __m256 fine =
            _mm256_cmp_ps(loadn(sc.LB.data() + j, n), _mm256_sub_ps(lse, _mm256_set1_ps(30.f)), _CMP_LE_OQ);
        int bad = ~_mm256_movemask_ps(fine) & ((1 << std::min<int64_t>(n, 8)) - 1);
        while (bad) {
          const int lane = __builtin_ctz(bad);
          bad &= bad - 1;
          exact_out(h, t, b * L.Dh + c + lane, kend);
        }
      }
  }
}

void head_fwd(const Head& h, bool causal, const at::TensorOptions& opts) {
  const int64_t T = h.L.T, N = h.L.N();
  const int64_t nq = (T + kQTile - 1) / kQTile;
  const int64_t nk = (T + kKeyTile - 1) / kKeyTile;
  const bool whole = !causal && T <= kWholeMax;
  // query tiles in the order they run: interleaved small/large so causal work is balanced
  std::vector<int64_t> order;
  for (int64_t p = 0; p < nq; ++p) order.push_back((p % 2 == 0) ? p / 2 : nq - 1 - p / 2);
  at::Tensor XXt = at::empty({T, 2 * N}, opts);
  float* XX = XXt.data_ptr<float>();
  const bool wide = tile_gemm_available();
  auto scratch = [&](int64_t rows, int64_t kw) {
    Scratch sc;
    sc.wide = wide;
    sc.Ew = at::empty({rows * kw}, opts);
    sc.nd = at::empty({rows, 2 * N}, opts);
    sc.r.resize(rows);
    return sc;
  };
  if (whole) {
    std::vector<float> m(N);
    key_side(h, T, XX, m.data());
    const int64_t QT = whole_qtile(T), nw = (T + QT - 1) / QT, per = QT / kQTile;
    std::vector<char> redo(nw, 0);
    at::parallel_for(0, nw, 1, [&](int64_t p0, int64_t p1) {
      Scratch sc = scratch(QT, T);
      for (int64_t I = p0; I < p1; ++I) redo[I] = !qtile_whole(h, XX, m.data(), I, sc);
    });
    std::vector<int64_t> rest;  // the kQTile query tiles of the tiles to redo
    for (int64_t I = 0; I < nw; ++I)
      if (redo[I])
        for (int64_t i = I * per; i < std::min(nq, (I + 1) * per); ++i) rest.push_back(i);
    order.swap(rest);
    if (order.empty()) return;
  }
  std::vector<float> mt(nk * N);
  key_side(h, kKeyTile, XX, mt.data());
  at::parallel_for(0, static_cast<int64_t>(order.size()), 1, [&](int64_t p0, int64_t p1) {
    Scratch sc = scratch(kQTile, kKeyTile);
    for (int64_t p = p0; p < p1; ++p) qtile_merge(h, XX, mt.data(), order[p], causal, sc);
  });
}

}  // namespace

#pragma GCC pop_options

bool aft_full_fwd_avx2(const at::Tensor& qa, const at::Tensor& ka, const at::Tensor& va, const at::Tensor& wa,
                       bool causal, at::Tensor& y, at::Tensor& lse) {
  if (!cpu_has_avx2_fma()) return false;
  const int64_t B = qa.size(0), T = qa.size(1), D = qa.size(2), H = wa.size(0);
  const int64_t Dh = D / H;
  y = at::empty({B, T, D}, qa.options());
  lse = at::empty({B, T, D}, qa.options());
  for (int64_t hh = 0; hh < H; ++hh) {
    const int64_t c0 = hh * Dh;
    const Head h{wa.data_ptr<float>() + hh * T * T,
                 qa.data_ptr<float>() + c0,
                 ka.data_ptr<float>() + c0,
                 va.data_ptr<float>() + c0,
                 y.data_ptr<float>() + c0,
                 lse.data_ptr<float>() + c0,
                 Cols{B, T, D, Dh}};
    head_fwd(h, causal, qa.options());
  }
  return true;
}

#else
bool aft_full_fwd_avx2(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&, bool, at::Tensor&,
                       at::Tensor&) {
  return false;
}
#endif

}  // namespace cpu
}  // namespace attnfree
