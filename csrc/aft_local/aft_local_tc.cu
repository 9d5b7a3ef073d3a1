// AFT-local forward as block-banded tensor-core tiles (docs/design.md §2.6), for float32 / float16 / bfloat16 inputs
// on sm_80+. Plain CUDA C++ (no torch headers); aft_local.cu dispatches here (aft_local_tc.h) and keeps the
// per-element band kernels for float64 and everything this file does not take.
//
// With w'[t,t'] = w inside the band |t - t'| < W and 0 outside (causal: t' > t masked), a query tile I of BM rows
// meets the key tiles J_lo .. J_hi (BK keys each) that intersect its band. Its keys split into
//   union: keys of the tiles J_lo .. J_hi, every visible one with its w' (w in the band, 0 outside but inside a tile);
//   prefix: keys before tile J_lo, all with bias 0;   suffix (non-causal): keys after tile J_hi, all with bias 0.
// The union part is the AFT-full tile loop restricted to those tiles, with FIXED references instead of a per-tile
// renormalisation: r[t] = max of w' over the row's visible union keys (kernel row_ref_kernel) and m[c] = max of k over
// the union tiles (from the per-tile maxima of tile_stats_kernel), so every product exp(w' - r) exp(k - m) <= 1 and
// one pair of accumulators d = Ew @ Ek, n = Ew @ (Ek * v) serves all tiles (no merge per tile):
//   (1) Ew tile (BM x BK) = exp(w - r) in the band, exp(-r) (one exponential per row) out of the band, 0 if masked;
//   (2) Ek, Ekv tiles (BK x BN), Ek = exp(k - m);   (3) nvcuda::wmma into d, n (bf16 hi + lo operand pairs for
//   bf16 inputs, 3xTF32 for float16 / float32: never float16 operands for exponentials, §2.5; see TcOps).
// CTA: 512 threads (16 warps, each a 16 x 64 strip of the BM x BN = 128 x 128 output) per (query tile, column block
// of one head, head); 128 registers, no local memory, ~110 KB of dynamic shared memory.
// The prefix and suffix are one (lse, mean) state per (column, tile boundary), the same for every row of the tile:
// tile_stats_kernel summarises each key tile (one exponential per key), tile_scan_kernel scans the tile states.
// The epilogue merges the three parts per (t, c) (three exponentials, one log; the union's log-magnitude uses d's
// binary exponent, a valid stabiliser) and writes y = sigmoid(q) * num / den and lse = M + log S (M in double).
// Lost-sum guard (§2.4 with one tile for the whole union): every term lost to underflow is below 2^-126 of exp(r + m),
// so where d >= nkeys * 2^-96 the loss is below 2^-30 relative; elsewhere, unless the union's bound r + m + log nkeys
// lies 28 log units under the prefix/suffix total, that (t, c) is recomputed per element (exact_element), as is
// every (t, c) whose d or n is NaN (a NaN key the row does not see, causal, must not reach it: §7 rule 2).
// Counted cost per output element (bf16, BM = BN = 128, W = 64): k, v re-read (BM + 2 BK) / BM = 2 times, w once per
// column block ((2W - 1) / BN), about 9 special-function operations.
#include "aft_local/aft_local_tc.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "aft_local/aft_local_tc_ops.cuh"
#include "common/cuda_common.cuh"
#include "common/wmma_tf32.cuh"

namespace attnfree {
namespace cuda {
namespace {

using namespace nvcuda;

// bf16 / tf32 wmma need sm_80: below that the kernel body traps and aft_local_tc_fwd_takes() says no.
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define AFT_LOCAL_TC_ARCH 1
#else
#define AFT_LOCAL_TC_ARCH 0
#endif

constexpr int BM = 128, BN = 128, BK = 64, NT = 512, SLD = 20;
constexpr float kLostScale = 0x1p-96f;  // d below nkeys * this: terms may have been lost (see the file comment)
constexpr double kDropMargin = 28.0;    // natural-log units (~40 bits): a lost union part this far down is dropped
constexpr double kLn2 = 0.6931471805599453094;

// The key tiles a query tile meets, and which keys a row sees with which bias.
struct Geo {
  int64_t T, W;
  bool causal;
  __host__ __device__ __forceinline__ int64_t jlo(int64_t t0) const { return (t0 - W + 1 > 0 ? t0 - W + 1 : 0) / BK; }
  __host__ __device__ __forceinline__ int64_t jhi(int64_t t0) const {
    const int64_t last = (t0 + BM < T ? t0 + BM : T) - 1;
    return (causal ? last : (last + W - 1 < T - 1 ? last + W - 1 : T - 1)) / BK;
  }
  __host__ __device__ __forceinline__ bool in_band(int64_t t, int64_t tp) const { return t - tp < W && tp - t < W; }
  __host__ __device__ __forceinline__ bool visible(int64_t t, int64_t tp) const {
    return tp < T && (!causal || tp <= t);
  }
};

// r[h, t]: max of w' over the visible keys of the union of t's query tile (0 where such a key lies outside the band),
// -inf when there is none. One thread per (h, t); w is read at band entries only.
template <typename E>
__global__ void row_ref_kernel(gptr<const E> __restrict__ w, gptr<float> __restrict__ rref, int64_t heads, Geo g,
                               WLayout wl) {
  const int64_t T = g.T, W = g.W;
  AF_GRID_STRIDE(i, heads * T) {
    const int64_t h = i / T, t = i % T, t0 = t / BM * BM;
    const int64_t ulo = g.jlo(t0) * BK, uhi = ((g.jhi(t0) + 1) * BK < T ? (g.jhi(t0) + 1) * BK : T);
    const int64_t lo = t - W + 1 > 0 ? t - W + 1 : 0;
    const int64_t hi = g.causal ? t : (t + W - 1 < T - 1 ? t + W - 1 : T - 1);
    float r = (ulo < lo || (!g.causal && uhi - 1 > hi)) ? 0.f : -INFINITY;
    for (int64_t tp = lo; tp <= hi; ++tp) r = fmaxf(r, load_acc(w + wl.at(h, t, tp)));
    rref[i] = r;
  }
}

// Per (b, key tile J, c): the column max of k over the tile and the tile's (lse, mean) of exp(k) [1, v]. An empty or
// fully masked tile gives (-inf, -inf, 0); a NaN propagates into lse and mean.
template <typename E>
__global__ void tile_stats_kernel(gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                                  gptr<float> __restrict__ tmax, gptr<float> __restrict__ tlse,
                                  gptr<float> __restrict__ tmean, int64_t B, int64_t T, int64_t D, int64_t nJ) {
  AF_GRID_STRIDE(i, B * nJ * D) {
    const int64_t c = i % D, J = (i / D) % nJ, b = i / (D * nJ);
    const int64_t k0 = J * BK, base = (b * T + k0) * D + c;
    const int64_t n = T - k0 < BK ? T - k0 : BK;
    float kr[BK];
    float m = -INFINITY;
#pragma unroll
    for (int j = 0; j < BK; ++j) {
      kr[j] = j < n ? load_acc(k + base + j * D) : -INFINITY;
      m = fmaxf(m, kr[j]);
    }
    float a = 0.f, s = 0.f;
#pragma unroll
    for (int j = 0; j < BK; ++j) {
      if (kr[j] != -INFINITY) {  // a masked key (or past T): excluded, never (-inf) - (-inf)
        const float e = af_exp(kr[j] - m);
        a += e;
        s += e * load_acc(v + base + j * D);
      }
    }
    tmax[i] = m;
    tlse[i] = a == 0.f ? -INFINITY : m + af_log(a);
    tmean[i] = a == 0.f ? 0.f : s / a;
  }
}

// Per (b, c): pre[J] = the keys of tiles < J, suf[J] = the keys of tiles >= J (non-causal), as (lse, mean); index
// (b * (nJ + 1) + J) * D + c.
__global__ void tile_scan_kernel(gptr<const float> __restrict__ tlse, gptr<const float> __restrict__ tmean,
                                 gptr<float> __restrict__ plse, gptr<float> __restrict__ pmean,
                                 gptr<float> __restrict__ slse, gptr<float> __restrict__ smean, int64_t B, int64_t D,
                                 int64_t nJ, bool causal) {
  AF_GRID_STRIDE(i, B * D) {
    const int64_t c = i % D, b = i / D;
    LseState<float> st;
    st.init();
    for (int64_t J = 0; J < nJ; ++J) {
      const int64_t o = (b * (nJ + 1) + J) * D + c, s = (b * nJ + J) * D + c;
      plse[o] = st.m + af_log(st.a);  // -inf for the empty state
      pmean[o] = st.mean();
      st.merge(tlse[s], 1.f, tmean[s]);
    }
    if (causal) continue;
    st.init();
    for (int64_t J = nJ; J >= 1; --J) {
      const int64_t o = (b * (nJ + 1) + J) * D + c, s = (b * nJ + J - 1) * D + c;
      slse[o] = st.m + af_log(st.a);
      smean[o] = st.mean();
      st.merge(tlse[s], 1.f, tmean[s]);
    }
  }
}

// Operand format, shared-memory layout and MMA of the main kernel. float16 and float32 inputs use 3xTF32 (x = big +
// small, three tf32 products: ~fp32 accuracy). bf16 inputs use bf16 operands as hi + lo pairs (three
// bf16 products, ~16 significant bits): lse is saved for the backward, which rebuilds every P = exp(logit - lse)
// from it, and dk = v dv - sum P dy y cancels, so neither lse nor y may carry more than one bf16 rounding (single
// bf16 products gave 2-3x the eager bf16 error in dk and dw). Planes: Ew, Ek, Ekv, then (bf16) Ew_lo, Ek_lo, Ekv_lo.
template <bool F32OPS>
struct TcOps {
  using Op = typename std::conditional<F32OPS, float, __nv_bfloat16>::type;
  static constexpr int LDA = F32OPS ? BK + 4 : BK + 8;  // Ew [BM][LDA]
  static constexpr int LDB = F32OPS ? BN + 4 : BN + 8;  // Ek, Ekv [BK][LDB]
  static constexpr size_t kEw = size_t(BM) * LDA * sizeof(Op), kEk = size_t(BK) * LDB * sizeof(Op);
  static constexpr size_t kOps = F32OPS ? kEw + 2 * kEk : 2 * kEw + 4 * kEk;
  static constexpr size_t kStage = size_t(NT / 32) * 2 * 16 * SLD * sizeof(float);  // per-warp epilogue tiles
  static constexpr size_t kUnion = ((kOps > kStage ? kOps : kStage) + 127) / 128 * 128;
  static constexpr size_t kRow = kUnion;                          // float r[BM], e0[BM]
  static constexpr size_t kCol = kRow + 2 * BM * sizeof(float);   // float m, plse, pmean, slse, smean [BN]
  static constexpr size_t kBase = kCol + 5 * BN * sizeof(float);  // int64 colbase[BN]
  static constexpr size_t kBytes = kBase + BN * sizeof(int64_t);
};

#if AFT_LOCAL_TC_ARCH
template <bool F32OPS>
struct TcMma;

template <>
struct TcMma<false> {
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  __device__ __forceinline__ static void run(const __nv_bfloat16* Ew, const __nv_bfloat16* Ek, const __nv_bfloat16* Ekv,
                                             int wr0, int wc0, Acc (&d)[4], Acc (&n)[4]) {
    using L = TcOps<false>;
    const __nv_bfloat16* EwLo = Ekv + size_t(BK) * L::LDB;
    const __nv_bfloat16* EkLo = EwLo + size_t(BM) * L::LDA;
    const __nv_bfloat16* EkvLo = EkLo + size_t(BK) * L::LDB;
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
    // one A fragment live at a time (128 registers, no local memory): the lo products of Ew in a second sweep
#pragma unroll 1
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::load_matrix_sync(a, EwLo + wr0 * L::LDA + kk, L::LDA);
#pragma unroll
      for (int f = 0; f < 4; ++f) {  // small products first
        wmma::load_matrix_sync(b, Ek + kk * L::LDB + wc0 + f * 16, L::LDB);
        wmma::mma_sync(d[f], a, b, d[f]);
        wmma::load_matrix_sync(b, Ekv + kk * L::LDB + wc0 + f * 16, L::LDB);
        wmma::mma_sync(n[f], a, b, n[f]);
      }
      wmma::load_matrix_sync(a, Ew + wr0 * L::LDA + kk, L::LDA);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        wmma::load_matrix_sync(b, EkLo + kk * L::LDB + wc0 + f * 16, L::LDB);
        wmma::mma_sync(d[f], a, b, d[f]);
        wmma::load_matrix_sync(b, Ek + kk * L::LDB + wc0 + f * 16, L::LDB);
        wmma::mma_sync(d[f], a, b, d[f]);
        wmma::load_matrix_sync(b, EkvLo + kk * L::LDB + wc0 + f * 16, L::LDB);
        wmma::mma_sync(n[f], a, b, n[f]);
        wmma::load_matrix_sync(b, Ekv + kk * L::LDB + wc0 + f * 16, L::LDB);
        wmma::mma_sync(n[f], a, b, n[f]);
      }
    }
  }
};

template <>
struct TcMma<true> {
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  using FA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  __device__ __forceinline__ static void run(const float* Ew, const float* Ek, const float* Ekv, int wr0, int wc0,
                                             Acc (&d)[4], Acc (&n)[4]) {
    using L = TcOps<true>;
    FA ab, as;
    FB bb, bs;
#pragma unroll 1
    for (int kk = 0; kk < BK; kk += 8) {
      wmma::load_matrix_sync(ab, Ew + wr0 * L::LDA + kk, L::LDA);
      split_tf32(ab, as);
#pragma unroll
      for (int f = 0; f < 4; ++f) {
        wmma::load_matrix_sync(bb, Ek + kk * L::LDB + wc0 + f * 16, L::LDB);
        split_tf32(bb, bs);
        mma_3xtf32(d[f], ab, as, bb, bs);
        wmma::load_matrix_sync(bb, Ekv + kk * L::LDB + wc0 + f * 16, L::LDB);
        split_tf32(bb, bs);
        mma_3xtf32(n[f], ab, as, bb, bs);
      }
    }
  }
};
#endif  // AFT_LOCAL_TC_ARCH

// The zero-bias prefix and suffix states of one column, as the epilogue merges them.
struct Outside {
  float plse, pmean, slse, smean;
};

// Rare path: (z, lse) of one (t, c) by an online log-sum-exp over the union keys [u0, u1) with their w', merged with
// the prefix and suffix states. Out of line (and by value) so the unrolled epilogue keeps its registers.
template <typename E>
__device__ __noinline__ float2 exact_element(gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                                             gptr<const E> __restrict__ w, int64_t h, int64_t t, int64_t cb, int64_t D,
                                             int64_t u0, int64_t u1, Geo g, WLayout wl, Outside o) {
  LseState<float> st;
  st.init();
  for (int64_t tp = u0; tp < u1 && g.visible(t, tp); ++tp) {
    const float bias = g.in_band(t, tp) ? load_acc(w + wl.at(h, t, tp)) : 0.f;
    st.add(bias + load_acc(k + cb + tp * D), 1.f, load_acc(v + cb + tp * D));
  }
  st.merge(o.plse, 1.f, o.pmean);
  st.merge(o.slse, 1.f, o.smean);
  return make_float2(st.mean(), st.m + af_log(st.a));
}

template <typename E>
__global__ void __launch_bounds__(NT, 1)
    local_fwd_tc_kernel(gptr<const E> __restrict__ q, gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                        gptr<const E> __restrict__ w, gptr<const float> __restrict__ rref,
                        gptr<const float> __restrict__ tmax, gptr<const float> __restrict__ plse,
                        gptr<const float> __restrict__ pmean, gptr<const float> __restrict__ slse,
                        gptr<const float> __restrict__ smean, gptr<E> __restrict__ y, gptr<float> __restrict__ lse,
                        int64_t B, int64_t D, int64_t dh, int64_t nJ, Geo g, WLayout wl) {
#if AFT_LOCAL_TC_ARCH
  constexpr bool F32OPS = !std::is_same<E, __nv_bfloat16>::value;
  using L = TcOps<F32OPS>;
  using Op = typename L::Op;
  using Mma = TcMma<F32OPS>;
  ATTNFREE_DYNAMIC_SHARED(unsigned char, smem, 128);
  Op* Ew = reinterpret_cast<Op*>(smem);
  Op* Ek = reinterpret_cast<Op*>(smem + L::kEw);
  Op* Ekv = reinterpret_cast<Op*>(smem + L::kEw + L::kEk);
  float* rrow = reinterpret_cast<float*>(smem + L::kRow);
  float* e0 = rrow + BM;
  float* mcol = reinterpret_cast<float*>(smem + L::kCol);
  float* cpl = mcol + BN;
  float* cpm = cpl + BN;
  float* csl = cpm + BN;
  float* csm = csl + BN;
  int64_t* colbase = reinterpret_cast<int64_t*>(smem + L::kBase);

  const int64_t T = g.T;
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t h = blockIdx.z, t0 = int64_t(blockIdx.y) * BM, j0 = int64_t(blockIdx.x) * BN, ncols = B * dh;
  const int64_t jlo = g.jlo(t0), jhi = g.jhi(t0);
  const int64_t u0 = jlo * BK, u1 = ((jhi + 1) * BK < T ? (jhi + 1) * BK : T);
  // keys past the tile's last row are seen by no row when causal: never loaded (a NaN there must not enter d, n)
  const int64_t kend = g.causal ? (t0 + BM < T ? t0 + BM : T) : T;

  for (int i = tid; i < BN; i += NT) {
    const int64_t j = j0 + i;
    int64_t cb = -1;
    float m = -INFINITY;
    Outside o{-INFINITY, 0.f, -INFINITY, 0.f};
    if (j < ncols) {
      const int64_t b = j / dh, c = h * dh + j % dh;
      cb = b * T * D + c;
      for (int64_t J = jlo; J <= jhi; ++J) m = fmaxf(m, tmax[(b * nJ + J) * D + c]);
      o.plse = plse[(b * (nJ + 1) + jlo) * D + c];
      o.pmean = pmean[(b * (nJ + 1) + jlo) * D + c];
      if (!g.causal) {
        o.slse = slse[(b * (nJ + 1) + jhi + 1) * D + c];
        o.smean = smean[(b * (nJ + 1) + jhi + 1) * D + c];
      }
    }
    colbase[i] = cb;
    mcol[i] = m;
    cpl[i] = o.plse;
    cpm[i] = o.pmean;
    csl[i] = o.slse;
    csm[i] = o.smean;
  }
  for (int i = tid; i < BM; i += NT) {
    const float r = t0 + i < T ? rref[h * T + t0 + i] : -INFINITY;
    rrow[i] = r;
    e0[i] = r == -INFINITY ? 0.f : af_exp(-r);  // the out-of-band weight of the row (used only where r >= 0)
  }

  const int wr0 = (warp >> 1) * 16, wc0 = (warp & 1) * 64;  // the warp's 16 x 64 output strip
  typename Mma::Acc dacc[4], nacc[4];
#pragma unroll
  for (int f = 0; f < 4; ++f) {
    wmma::fill_fragment(dacc[f], 0.f);
    wmma::fill_fragment(nacc[f], 0.f);
  }
  // element offset of the lo planes from Ew and from Ek (bf16; unused for float operands): both kEw + 2 kEk bytes
  const size_t lo_ew = (L::kEw + 2 * L::kEk) / sizeof(Op), lo_ek = lo_ew;
  const int wrow = tid >> 2, wpart = tid & 3;      // Ew roles: row, keys 16 wpart .. + 16
  const int kcol = tid & (BN - 1), kg = tid >> 7;  // Ek roles: column, keys 16 kg .. + 16
  __syncthreads();

  for (int64_t J = jlo; J <= jhi; ++J) {
    const int64_t k0 = J * BK;
    {
      const int64_t t = t0 + wrow;
      const float r = rrow[wrow], z0 = e0[wrow];
      Op* row = Ew + wrow * L::LDA + wpart * 16;
#pragma unroll 4
      for (int i = 0; i < 16; ++i) {
        const int64_t tp = k0 + wpart * 16 + i;
        float e = 0.f;
        if (t < T && g.visible(t, tp)) {
          if (g.in_band(t, tp)) {
            const float wv = load_acc(w + wl.at(h, t, tp));
            e = wv == -INFINITY ? 0.f : af_exp(wv - r);  // -inf: a masked key; r >= wv otherwise
          } else {
            e = z0;
          }
        }
        put_op(row + i, lo_ew, e);
      }
    }
    {
      const int64_t cb = colbase[kcol];
      const float m = mcol[kcol];
#pragma unroll 4
      for (int i = 0; i < 16; ++i) {
        const int key = kg * 16 + i;
        const int64_t tp = k0 + key;
        float e = 0.f, ev = 0.f;
        if (cb >= 0 && tp < kend) {
          const float kk = load_acc(k + cb + tp * D);
          if (kk != -INFINITY) {  // masked key: 0 (m >= every other k, so no (-inf) - (-inf))
            e = af_exp(kk - m);
            ev = e * load_acc(v + cb + tp * D);
          }
        }
        put_op(Ek + key * L::LDB + kcol, lo_ek, e);
        put_op(Ekv + key * L::LDB + kcol, lo_ek, ev);
      }
    }
    __syncthreads();
    Mma::run(Ew, Ek, Ekv, wr0, wc0, dacc, nacc);
    __syncthreads();  // before the next tile overwrites the operands (and the epilogue's staging aliases them)
  }

  // ---------------- epilogue: per-warp staging of one 16 x 16 fragment pair at a time
  float* sd = reinterpret_cast<float*>(smem) + warp * 2 * 16 * SLD;
  float* sn = sd + 16 * SLD;
  const int64_t nk = u1 - u0;
  const float thresh = static_cast<float>(nk) * kLostScale;
  int bits = 0;
  while ((int64_t(1) << bits) < nk) ++bits;
  const double lnk = bits * kLn2;  // >= log(nk): the union part is at most exp(r + m) nk
#pragma unroll                     // constant fragment indices: the accumulators stay in registers
  for (int f = 0; f < 4; ++f) {
    wmma::store_matrix_sync(sd, dacc[f], SLD, wmma::mem_row_major);
    wmma::store_matrix_sync(sn, nacc[f], SLD, wmma::mem_row_major);
    __syncwarp();
    const int cc = lane & 15, col = wc0 + f * 16 + cc;
    const int64_t cb = colbase[col];
    const Outside o{cpl[col], cpm[col], csl[col], csm[col]};
    const float m = mcol[col];
#pragma unroll 1
    for (int i = 0; i < 8; ++i) {
      const int rr = (lane >> 4) + 2 * i;
      const int64_t t = t0 + wr0 + rr;
      if (cb < 0 || t >= T) continue;
      const float dd = sd[rr * SLD + cc], nn = sn[rr * SLD + cc];
      const double s = double(rrow[wr0 + rr]) + double(m);
      const bool ok = dd >= thresh;  // false for NaN
      const int ex = ((__float_as_int(dd) >> 23) & 0xff) - 127;
      const double lb = ok ? s + ex * kLn2 : -INFINITY;  // within log 2 of log(d) + s
      const double M = fmax(lb, fmax(double(o.plse), double(o.slse)));
      float z, l;
      if (dd != dd || nn != nn || (!ok && !(s + lnk < M - kDropMargin))) {
        const float2 zl = exact_element<E>(k, v, w, h, t, cb, D, u0, u1, g, wl, o);
        z = zl.x;
        l = zl.y;
      } else {
        const float fb = ok ? af_exp(static_cast<float>(s - M)) : 0.f;
        const float fp = o.plse == -INFINITY ? 0.f : af_exp(static_cast<float>(double(o.plse) - M));
        const float fs = o.slse == -INFINITY ? 0.f : af_exp(static_cast<float>(double(o.slse) - M));
        const float S = dd * fb + fp + fs;  // in [1, 4) (NaN from a NaN prefix / suffix propagates)
        z = (nn * fb + o.pmean * fp + o.smean * fs) / S;
        l = static_cast<float>(M + double(af_log(S)));
      }
      const int64_t oi = cb + t * D;
      store_val(y + oi, af_sigmoid(load_acc(q + oi)) * z);
      lse[oi] = l;
    }
    __syncwarp();  // before the next fragment overwrites the staging
  }
#else
  __trap();  // sm < 80: aft_local_tc_fwd_takes() keeps the launcher off this kernel
#endif
}

inline bool tc_device() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return true;  // a failed query is left to the launch
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return true;
  return major >= 8;
}

inline int64_t num_key_tiles(int64_t T) { return (T + BK - 1) / BK; }

}  // namespace

bool aft_local_tc_fwd_takes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t W) {
  if (dtype != DType::Float32 && dtype != DType::Float16 && dtype != DType::BFloat16) return false;
  if (B <= 0 || T <= 0 || D <= 0 || heads < 1 || D % heads != 0 || W < 1) return false;
  const int64_t cols = B * (D / heads);
  if ((cols + BN - 1) / BN > 0x7fffffff || (T + BM - 1) / BM > 65535 || heads > 65535) return false;
  return tc_device();
}

size_t aft_local_tc_fwd_workspace_bytes(DType /*dtype*/, int64_t B, int64_t T, int64_t D, int64_t heads,
                                        int64_t /*W*/) {
  const int64_t nJ = num_key_tiles(T);
  return align_up(sizeof(float) * size_t(heads * T)) + 3 * align_up(sizeof(float) * size_t(B * nJ * D)) +
         4 * align_up(sizeof(float) * size_t(B * (nJ + 1) * D));
}

cudaError_t aft_local_tc_fwd(DType dtype, const void* q, const void* k, const void* v, const void* w, void* y,
                             void* lse, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t W, bool causal,
                             bool banded, void* workspace, cudaStream_t stream) {
  const int64_t nJ = num_key_tiles(T);
  const Geo g{T, W, causal};
  const WLayout wl(T, W, banded);
  WsCursor ws(workspace);
  float* rref = ws.take<float>(heads * T);
  float* tmax = ws.take<float>(B * nJ * D);
  float* tlse = ws.take<float>(B * nJ * D);
  float* tmean = ws.take<float>(B * nJ * D);
  float* pl = ws.take<float>(B * (nJ + 1) * D);
  float* pm = ws.take<float>(B * (nJ + 1) * D);
  float* sl = ws.take<float>(B * (nJ + 1) * D);
  float* sm = ws.take<float>(B * (nJ + 1) * D);
  auto run = [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    const E* kp = static_cast<const E*>(k);
    const E* vp = static_cast<const E*>(v);
    ATTNFREE_LAUNCH((row_ref_kernel<E>), grid_for(heads * T), kThreads, 0, stream)(static_cast<const E*>(w), rref,
                                                                                   heads, g, wl);
    ATTNFREE_LAUNCH((tile_stats_kernel<E>), grid_for(B * nJ * D), kThreads, 0, stream)(kp, vp, tmax, tlse, tmean, B, T,
                                                                                       D, nJ);
    ATTNFREE_LAUNCH(tile_scan_kernel, grid_for(B * D), kThreads, 0, stream)(tlse, tmean, pl, pm, sl, sm, B, D, nJ,
                                                                            causal);
    constexpr bool F32OPS = !std::is_same<E, __nv_bfloat16>::value;
    const size_t smem = TcOps<F32OPS>::kBytes;
    cudaError_t err = cudaFuncSetAttribute(local_fwd_tc_kernel<E>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    const int64_t dh = D / heads;
    const dim3 grid(static_cast<unsigned>((B * dh + BN - 1) / BN), static_cast<unsigned>((T + BM - 1) / BM),
                    static_cast<unsigned>(heads));
    ATTNFREE_LAUNCH((local_fwd_tc_kernel<E>), grid, NT, smem, stream)(
        static_cast<const E*>(q), kp, vp, static_cast<const E*>(w), rref, tmax, pl, pm, sl, sm, static_cast<E*>(y),
        static_cast<float*>(lse), B, D, dh, nJ, g, wl);
    return cudaGetLastError();
  };
  return tc_dtype_dispatch(dtype, run);
}

}  // namespace cuda
}  // namespace attnfree
