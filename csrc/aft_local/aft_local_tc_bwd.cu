// AFT-local backward as block-banded tensor-core tiles (docs/design.md §2.6, §3), for float32 / float16 / bfloat16
// inputs on sm_80+ with a window W <= 64. Plain CUDA C++ (no torch headers); aft_local.cu dispatches here
// (aft_local_tc.h) and keeps the per-element band kernels for float64, wider windows and everything else.
//
// With P[t, t', c] = exp(w'[t, t'] + k[t', c] - lse[t, c]), G = dy sigmoid(q), H = dy y:
//   dq = H (1 - sigmoid(q));  dv[t'] = sum_t P G;  dk[t'] = v dv - sum_t P H;  dw[t, t'] = sum_{b, c in h} P (G v - H).
// A CTA owns one key tile J (KT = 128 keys) of one head and loops over every column (b, c) of the head in blocks of
// CB = 32 columns; per block it visits the query chunks (QC = 64 rows) that meet the band of its keys (at most 4 for
// W <= 64). With references fixed per CTA, r[t] = max of w' over the tile's keys t sees, m[c] = max of k over the
// tile, every P factors as
//   P = Ew[t, t'] X[t', c] Sc[t, c],   Ew = exp(w' - r) <= 1,  X = exp(k - m) <= 1,  Sc = exp(r + m - lse),
// so per chunk two MMAs (same operand formats as the forward: bf16 hi + lo pairs for bf16 inputs, 3xTF32 otherwise)
//   [aG | aH] (KT x 2CB)  += Ew^T (KT x QC) @ [Sc G | -Sc H] (QC x 2CB)        -> dv = X aG, sum P H = -X aH
//   dW (QC x KT)          += [Sc G | -Sc H] (QC x 2CB) @ [X v ; X]^T (2CB x KT) -> dw = Ew dW (band entries)
// aG, aH live in registers for one column block; dW is an fp32 tile in shared memory (the <= 6 pairs of query
// chunk x 64 keys that meet the band) that sums every column of the head, and is written once at the end (each dw
// entry has one writer: the tile of its key; no atomics). 16-bit inputs keep the tile's band of w in shared memory.
// The prep kernel reads dy, q, y, lse once: dq, the far states below, and per (t, c) u = dy exp(rho - lse) with
// rho = the min lse of the row's query chunk, which the CTAs read with q, y instead of dy and lse (Sc G =
// exp(r + m - rho) u sigmoid(q)): 3 bytes per visit instead of 6 for 16-bit inputs (u to 16 significant bits as a
// 16-bit and an 8-bit plane), 4 instead of 8 for float32. Counted cost per output element (bf16, W = 64, B*D large):
// the prep's 10 bytes in and 5 out, per visit (256 rows per 128 keys) 7 bytes of query data, k, v once; about 38
// bytes and 13 special-function operations. 512 threads, up to 227 KB of shared memory (sm_90;
// aft_local_tc_bwd_takes() checks the device limit); one CTA per (key tile, head).
// Far queries (chunks outside the CTA's, bias 0 for every key of the tile) come from prefix / suffix states over
// pairs of query chunks of (ref, sum exp(ref - lse) G, sum exp(ref - lse) H), ref = their min rho (prep kernel; the
// scan kernel merges them per key tile), times exp(k - ref) <= 1.
// Guard: Sc <= e^kGap (tested as r + m - rho <= kGap, rho <= lse) keeps every product in range and any term lost to
// underflow below e^-47 of its row's sum; a (t, c) with a larger gap (|k|, |w| ~ 1e4 with the maxima on different
// keys), an lse more than kSpread above its chunk's rho (u would underflow), and any non-finite input the tile
// sees, flags its key tile x column block (dv, dk) and its rows (dw); the per-element kernels at the end recompute
// exactly those outputs from dy, q, y, lse (and propagate NaN as the band kernels of aft_local.cu do).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "aft_local/aft_local_tc.h"
#include "aft_local/aft_local_tc_ops.cuh"
#include "common/cuda_common.cuh"
#include "common/wmma_tf32.cuh"

namespace attnfree {
namespace cuda {
namespace {

using namespace nvcuda;

#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define AFT_LOCAL_TC_BWD_ARCH 1
#else
#define AFT_LOCAL_TC_BWD_ARCH 0
#endif

constexpr int KT = 128, QC = 64, CB = 32, NT = 512, NCH = 4, MAXW = 64;
constexpr int NSUB = KT / QC, NSLOT = 6;  // dW: the (query chunk, 64-key subtile) pairs that meet the band
constexpr int WSPAN = 2 * MAXW - 1;       // w cache: per key, the queries t' - (MAXW - 1) .. t' + MAXW - 1
constexpr float kGap = 40.f, kSpread = 80.f;

struct BGeo {
  int64_t T, W;
  bool causal;
  __host__ __device__ __forceinline__ bool in_band(int64_t t, int64_t tp) const { return t - tp < W && tp - t < W; }
  __host__ __device__ __forceinline__ bool visible(int64_t t, int64_t tp) const { return !causal || tp <= t; }
  // the query chunks that meet the band of key tile J
  __host__ __device__ __forceinline__ int64_t clo(int64_t J) const {
    const int64_t j0 = J * KT;
    return (causal ? j0 : (j0 - W + 1 > 0 ? j0 - W + 1 : 0)) / QC;
  }
  __host__ __device__ __forceinline__ int64_t chi(int64_t J) const {
    const int64_t j1 = (J + 1) * KT < T ? (J + 1) * KT : T;
    return (j1 - 1 + W - 1 < T - 1 ? j1 - 1 + W - 1 : T - 1) / QC;
  }
};

// Far-query state of one column: ref = min lse (+inf: empty), g = sum exp(ref - lse) G, h likewise with H.
struct FarState {
  float r, g, h;
  __device__ __forceinline__ void init() {
    r = INFINITY;
    g = h = 0.f;
  }
  __device__ __forceinline__ void merge(float rb, float gb, float hb) {
    const float r2 = fminf(r, rb);
    if (r2 == INFINITY) return;
    const float ea = r == INFINITY ? 0.f : af_exp(r2 - r), eb = rb == INFINITY ? 0.f : af_exp(r2 - rb);
    g = g * ea + gb * eb;
    h = h * ea + hb * eb;
    r = r2;
  }
  // the far queries' (sum P G, sum P H) for a key with k = kk: exp(kk - ref) <= 1 times the sums
  __device__ __forceinline__ void apply(float kk, float& sg, float& sh) const {
    if (r == INFINITY || kk == -INFINITY) return;
    const float e = af_exp(kk - r);
    sg += e * g;
    sh += e * h;
  }
};

// u = dy exp(rho - lse) in global memory, rho = the min lse of the row's query chunk (<= 1 times dy): float32
// inputs keep it in fp32; 16-bit inputs round it to 16 significant bits (nearest even) and keep its top 16 bits
// (hi) and the next 8 (lo), 3 bytes instead of the 6 of dy and lse (the operands built from it carry ~16 bits).
// A NaN u marks a (t, c) for the per-element kernels: NaN or +inf lse, non-finite dy, or an lse more than kSpread
// above rho (u would lose its bits to underflow).
struct UPlanes {
  gptr<float> f;
  gptr<uint16_t> hi;
  gptr<uint8_t> lo;
};
struct UPlanesRO {
  gptr<const float> f;
  gptr<const uint16_t> hi;
  gptr<const uint8_t> lo;
};

template <typename E>
__device__ __forceinline__ void store_u(const UPlanes& p, int64_t o, float u) {
  if (sizeof(E) == 4) {
    p.f[o] = u;
    return;
  }
  uint32_t b = __float_as_uint(u);
  if (!(u - u == 0.f)) {
    b = 0x7fc00000u;  // every non-finite u as a NaN that the 24 bits keep
  } else {
    b += 0x7fu + ((b >> 8) & 1u);  // round to nearest even at bit 8; |u| <= |dy| stays below the fp32 maximum
  }
  p.hi[o] = static_cast<uint16_t>(b >> 16);
  p.lo[o] = static_cast<uint8_t>((b >> 8) & 0xffu);
}

template <typename E>
__device__ __forceinline__ float load_u(const UPlanesRO& p, int64_t o) {
  if (sizeof(E) == 4) return p.f[o];
  const uint32_t hi = static_cast<uint16_t>(p.hi[o]), lo = static_cast<uint8_t>(p.lo[o]);
  return __uint_as_float((hi << 16) | (lo << 8));
}

// The far states are kept per pair of query chunks, [2S - o, 2S + 2 - o) with o = 1 for W >= 2 (0 for W = 1):
// every key tile's band starts and ends on such a boundary (clo(J) = 2J - o, chi(J) + 1 = 2J + 2 + o, or the ends of
// the sequence), so the scan reads half as many states.
__host__ __device__ __forceinline__ int64_t pair_offset(int64_t W) { return W >= 2 ? 1 : 0; }
__host__ __device__ __forceinline__ int64_t num_pairs(int64_t nI, int64_t W) { return (nI + pair_offset(W) + 1) / 2; }

// dq, u, rho per (b, query chunk, c), and per (b, chunk pair, c) the far state of the pair's rows: the sums of
// exp(rho - lse) G, H per chunk merged against the pair's min. A chunk's lse values stay in registers between its
// min and its sums (read once).
template <typename E>
__global__ void local_bwd_prep_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q,
                                      gptr<const E> __restrict__ y, gptr<const float> __restrict__ lse,
                                      gptr<E> __restrict__ dq, gptr<float> __restrict__ cr, gptr<float> __restrict__ fr,
                                      gptr<float> __restrict__ fg, gptr<float> __restrict__ fh, UPlanes up, int64_t B,
                                      int64_t T, int64_t D, int64_t nI, int64_t W) {
  const int64_t nS = num_pairs(nI, W), po = pair_offset(W);
  AF_GRID_STRIDE(i, B * nS * D) {
    const int64_t c = i % D, S = (i / D) % nS, b = i / (D * nS);
    const int64_t i0 = 2 * S - po > 0 ? 2 * S - po : 0, i1 = 2 * S + 2 - po < nI ? 2 * S + 2 - po : nI;
    FarState st;
    st.init();
    for (int64_t I = i0; I < i1; ++I) {
      const int64_t t0 = I * QC, n = t0 + QC < T ? QC : T - t0, base = (b * T + t0) * D + c;
      float l[QC];
      float r = INFINITY;
#pragma unroll
      for (int j = 0; j < QC; ++j) {
        l[j] = j < n ? lse[base + j * D] : -INFINITY;
        if (l[j] != -INFINITY) r = fminf(r, l[j]);  // a row that sees no key (-inf) has no term; NaN is skipped
      }
      float sg = 0.f, sh = 0.f;
#pragma unroll
      for (int j = 0; j < QC; ++j) {
        if (j >= n) continue;
        const int64_t o = base + j * D;
        const float d = load_acc(dy + o), sq = af_sigmoid(load_acc(q + o)), hh = d * load_acc(y + o);
        store_val(dq + o, hh * (1.f - sq));
        float u = d * 0.f;  // -inf lse: 0 (NaN for a non-finite dy, which the main kernel flags)
        if (l[j] != -INFINITY) {
          const float e = af_exp(r - l[j]);  // NaN for a NaN lse (and an all-+inf chunk): propagates into the sums
          sg += e * d * sq;
          sh += e * hh;
          u = (l[j] < INFINITY && r - l[j] >= -kSpread) ? d * e : __uint_as_float(0x7fc00000u);
        }
        store_u<E>(up, o, u);
      }
      cr[(b * nI + I) * D + c] = r;
      if (r == INFINITY && sg == 0.f && sh == 0.f) continue;  // no term (merge would skip it too)
      if (st.r == INFINITY && !(r < INFINITY)) {
        st.r = r;  // the pair's first chunk: as it is (an all-+inf / NaN chunk keeps its NaN sums)
        st.g = sg;
        st.h = sh;
      } else {
        st.merge(r, sg, sh);
      }
    }
    fr[i] = st.r;
    fg[i] = st.g;
    fh[i] = st.h;
  }
}

// Per (b, key tile J, c): pre = the chunk pairs before J's band (clo(J)), suf = the pairs after it (chi(J)); index
// (b * nJ + J) * D + c. Causal rows before a key tile never see it: no prefix.
__global__ void local_bwd_scan_kernel(gptr<const float> __restrict__ fr, gptr<const float> __restrict__ fg,
                                      gptr<const float> __restrict__ fh, gptr<float> __restrict__ pr,
                                      gptr<float> __restrict__ pg, gptr<float> __restrict__ ph,
                                      gptr<float> __restrict__ sr, gptr<float> __restrict__ sg,
                                      gptr<float> __restrict__ sh, int64_t B, int64_t D, int64_t nI, int64_t nJ,
                                      BGeo g) {
  const int64_t nS = num_pairs(nI, g.W), po = pair_offset(g.W);
  AF_GRID_STRIDE(i, B * D) {
    const int64_t c = i % D, b = i / D;
    FarState st;
    if (!g.causal) {
      st.init();
      int64_t S = 0;
      for (int64_t J = 0; J < nJ; ++J) {
        for (const int64_t lo = (g.clo(J) + po) / 2; S < lo; ++S) {  // the pairs that end by clo(J)
          const int64_t x = (b * nS + S) * D + c;
          st.merge(fr[x], fg[x], fh[x]);
        }
        const int64_t x = (b * nJ + J) * D + c;
        pr[x] = st.r;
        pg[x] = st.g;
        ph[x] = st.h;
      }
    }
    st.init();
    int64_t S = nS - 1;
    for (int64_t J = nJ - 1; J >= 0; --J) {
      for (const int64_t hi = (g.chi(J) + 2 + po) / 2; S >= hi; --S) {  // the pairs that start after chi(J)
        const int64_t x = (b * nS + S) * D + c;
        st.merge(fr[x], fg[x], fh[x]);
      }
      const int64_t x = (b * nJ + J) * D + c;
      sr[x] = st.r;
      sg[x] = st.g;
      sh[x] = st.h;
    }
  }
}

__global__ void local_bwd_zero_kernel(gptr<int> __restrict__ f, int64_t n) { AF_GRID_STRIDE(i, n) f[i] = 0; }

// Operand planes and shared-memory layout of the main kernel for inputs E (bf16: hi + lo bf16 planes; float16 /
// float32: fp32 for 3xTF32). dW: fp32 [NSLOT][QC][QC]; EwT [KT][LDE]; S = [Sc G | -Sc H] [QC][LDS];
// XX = [X v ; X] [2 CB][LDX]; for 16-bit inputs the tile's band of w, E [KT][WSPAN], read once instead of once per
// column block (float32's would not fit).
template <typename E>
struct BwdOps {
  static constexpr bool F32OPS = !std::is_same<E, __nv_bfloat16>::value;
  static constexpr bool WCACHE = sizeof(E) == 2;
  using Op = typename std::conditional<F32OPS, float, __nv_bfloat16>::type;
  static constexpr int PAD = F32OPS ? 4 : 8;
  static constexpr int LDE = QC + PAD, LDS = 2 * CB + PAD, LDX = KT + PAD;
  static constexpr int PL = F32OPS ? 1 : 2;  // planes
  static constexpr size_t kDw = size_t(NSLOT) * QC * QC * sizeof(float);
  static constexpr size_t kEwPlane = size_t(KT) * LDE, kSPlane = size_t(QC) * LDS, kXPlane = size_t(2 * CB) * LDX;
  static constexpr size_t kEw = kDw, kS = kEw + PL * kEwPlane * sizeof(Op), kX = kS + PL * kSPlane * sizeof(Op);
  static constexpr size_t kWc = kX + PL * kXPlane * sizeof(Op);
  static constexpr size_t kRow = kWc + (WCACHE ? (size_t(KT) * WSPAN * sizeof(E) + 127) / 128 * 128 : 0);
  static constexpr size_t kCol = kRow + 2 * NCH * QC * sizeof(float);      // float r[NCH QC], e0[NCH QC]
  static constexpr size_t kRed = kCol + (7 + NCH) * CB * sizeof(float);    // float m, 6 far values, rho[NCH] [CB]
  static constexpr size_t kBase = kRed + (NT / CB) * CB * sizeof(float);   // float red[NT / CB][CB]
  static constexpr size_t kFlag = kBase + CB * sizeof(int64_t);            // int64 colbase[CB]
  static constexpr size_t kBytes = kFlag + 16 + NCH * NSUB * sizeof(int);  // int flag; int slot[NCH][NSUB]
  static_assert(PL * kEwPlane * sizeof(Op) >= 2 * size_t(KT) * CB * sizeof(float), "staging fits the Ew planes");
  static_assert(kBytes <= 232448, "227 KB of shared memory per block (sm_90)");
};

#if AFT_LOCAL_TC_BWD_ARCH
// acc (16 x 16) += A (16 x K, row-major, lda) @ B (K x 16, row-major, ldb); lo planes at element offsets la, lb.
template <bool F32OPS>
struct BwdMma;

template <>
struct BwdMma<false> {
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  __device__ __forceinline__ static void run(Acc& acc, const __nv_bfloat16* A, int lda, size_t la,
                                             const __nv_bfloat16* Bm, int ldb, size_t lb, int K) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a;
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
#pragma unroll 1
    for (int kk = 0; kk < K; kk += 16) {  // small products first
      wmma::load_matrix_sync(a, A + la + kk, lda);
      wmma::load_matrix_sync(b, Bm + size_t(kk) * ldb, ldb);
      wmma::mma_sync(acc, a, b, acc);
      wmma::load_matrix_sync(a, A + kk, lda);
      wmma::load_matrix_sync(b, Bm + lb + size_t(kk) * ldb, ldb);
      wmma::mma_sync(acc, a, b, acc);
      wmma::load_matrix_sync(b, Bm + size_t(kk) * ldb, ldb);
      wmma::mma_sync(acc, a, b, acc);
    }
  }
};

template <>
struct BwdMma<true> {
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  __device__ __forceinline__ static void run(Acc& acc, const float* A, int lda, size_t, const float* Bm, int ldb,
                                             size_t, int K) {
    wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major> ab, as;
    wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major> bb, bs;
#pragma unroll 1
    for (int kk = 0; kk < K; kk += 8) {
      wmma::load_matrix_sync(ab, A + kk, lda);
      split_tf32(ab, as);
      wmma::load_matrix_sync(bb, Bm + size_t(kk) * ldb, ldb);
      split_tf32(bb, bs);
      mma_3xtf32(acc, ab, as, bb, bs);
    }
  }
};
#endif

__device__ __forceinline__ bool finite_f(float x) { return x - x == 0.f; }

template <typename E>
__global__ void __launch_bounds__(NT, 1)
    local_bwd_tc_kernel(UPlanesRO up, gptr<const float> __restrict__ cr, gptr<const E> __restrict__ q,
                        gptr<const E> __restrict__ k, gptr<const E> __restrict__ v, gptr<const E> __restrict__ w,
                        gptr<const E> __restrict__ y, gptr<const float> __restrict__ pr,
                        gptr<const float> __restrict__ pg, gptr<const float> __restrict__ ph,
                        gptr<const float> __restrict__ sr, gptr<const float> __restrict__ sg,
                        gptr<const float> __restrict__ sh, gptr<E> __restrict__ dk, gptr<E> __restrict__ dv,
                        gptr<E> __restrict__ dw, gptr<int> __restrict__ kvflag, gptr<int> __restrict__ rowflag,
                        int64_t B, int64_t D, int64_t dh, int64_t nJ, int64_t nI, BGeo g, WLayout wl) {
#if AFT_LOCAL_TC_BWD_ARCH
  using L = BwdOps<E>;
  constexpr bool F32OPS = L::F32OPS;
  using Op = typename L::Op;
  using Mma = BwdMma<F32OPS>;
  ATTNFREE_DYNAMIC_SHARED(unsigned char, smem, 128);
  float* dW = reinterpret_cast<float*>(smem);
  Op* EwT = reinterpret_cast<Op*>(smem + L::kEw);
  Op* S = reinterpret_cast<Op*>(smem + L::kS);
  Op* XX = reinterpret_cast<Op*>(smem + L::kX);
  float* rrow = reinterpret_cast<float*>(smem + L::kRow);
  float* e0 = rrow + NCH * QC;
  float* mcol = reinterpret_cast<float*>(smem + L::kCol);
  float* far = mcol + CB;     // pr, pg, ph, sr, sg, sh [CB]
  float* rho = far + 6 * CB;  // [chunk - c0][CB]: the u reference of each chunk
  float* red = reinterpret_cast<float*>(smem + L::kRed);
  int64_t* colbase = reinterpret_cast<int64_t*>(smem + L::kBase);
  int* flag = reinterpret_cast<int*>(smem + L::kFlag);
  int* slot = flag + 4;
  E* wc = reinterpret_cast<E*>(smem + L::kWc);  // [key][t - t' + MAXW - 1] (16-bit inputs)

  const int64_t T = g.T;
  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t J = blockIdx.x, h = blockIdx.y, j0 = J * KT, j1 = j0 + KT < T ? j0 + KT : T;
  const int64_t c0 = g.clo(J), c1 = g.chi(J), r0 = c0 * QC;
  const int64_t r1 = (c1 + 1) * QC < T ? (c1 + 1) * QC : T;  // rows [r0, r1)
  const int64_t ncols = B * dh, ncb = (ncols + CB - 1) / CB;

  if (L::WCACHE)
    for (int i = tid; i < KT * WSPAN; i += NT) {
      const int64_t tp = j0 + i / WSPAN, t = tp + i % WSPAN - (MAXW - 1);
      if (tp < j1 && t >= r0 && t < r1 && g.in_band(t, tp) && g.visible(t, tp))
        wc[i] = static_cast<E>(*(w + wl.at(h, t, tp)));
    }

  if (L::WCACHE) __syncthreads();  // the row references read the cache
  // row references of this key tile: r[t] = max of w' over the keys of [j0, j1) that t sees; e0 = exp(-r)
  for (int i = tid; i < NCH * QC; i += NT) {
    const int64_t t = r0 + i;
    float r = -INFINITY;
    if (t < r1) {
      const int64_t hi = g.causal ? (t + 1 < j1 ? t + 1 : j1) : j1;  // keys [j0, hi) visible
      if (hi > j0) {
        const int64_t blo = t - g.W + 1 > j0 ? t - g.W + 1 : j0, bhi = t + g.W < hi ? t + g.W : hi;
        if (blo > j0 || bhi < hi) r = 0.f;  // a visible key of the tile outside the band: bias 0
        for (int64_t tp = blo; tp < bhi; ++tp)
          r = fmaxf(r, L::WCACHE ? to_acc(wc[(tp - j0) * WSPAN + (t - tp + MAXW - 1)]) : load_acc(w + wl.at(h, t, tp)));
      }
    }
    rrow[i] = r;
    e0[i] = r == -INFINITY ? 0.f : af_exp(-r);
  }
  for (int i = tid; i < NSLOT * QC * QC; i += NT) dW[i] = 0.f;
  if (tid == 0) {  // dW slots of the (chunk, subtile) pairs with a band entry: at most NSLOT for W <= MAXW
    int ns = 0;
    for (int x = 0; x < NCH * NSUB; ++x) {
      const int64_t t0 = r0 + (x / NSUB) * QC, k0 = j0 + (x % NSUB) * QC;  // rows t0 .. +QC, keys k0 .. +QC
      const bool meets = t0 < r1 && k0 < j1 && k0 - (t0 + QC - 1) < g.W && t0 - (k0 + QC - 1) < g.W;
      slot[x] = meets && ns < NSLOT ? ns++ : -1;
    }
  }
  const size_t lo_e = L::kEwPlane, lo_s = L::kSPlane, lo_x = L::kXPlane;
  const int lc = tid & (CB - 1), lg = tid >> 5;  // key / column roles: column lc, keys lg*8 .. +8 (or rows lg*4 ..)
  const int ks = (warp >> 1) * 16, cf = (warp & 1) * 16;  // MMA1: key strip, column fragment
  const int rs = (warp >> 2) * 16, kf = (warp & 3) * 32;  // MMA2: row strip, key fragments kf, kf + 16

  for (int64_t cb = 0; cb < ncb; ++cb) {
    __syncthreads();  // the previous block's staging and far values are consumed
    if (tid == 0) *flag = 0;
    if (tid < CB) {
      const int64_t j = cb * CB + tid;
      int64_t base = -1;
      far[tid] = far[3 * CB + tid] = INFINITY;  // empty prefix / suffix states
      far[CB + tid] = far[2 * CB + tid] = far[4 * CB + tid] = far[5 * CB + tid] = 0.f;
      if (j < ncols) {
        const int64_t b = j / dh, c = h * dh + j % dh;
        base = b * T * D + c;
        const int64_t o = (b * nJ + J) * D + c;
        if (!g.causal) {
          far[tid] = pr[o];
          far[CB + tid] = pg[o];
          far[2 * CB + tid] = ph[o];
        }
        far[3 * CB + tid] = sr[o];
        far[4 * CB + tid] = sg[o];
        far[5 * CB + tid] = sh[o];
        for (int64_t ch = c0; ch <= c1; ++ch) rho[(ch - c0) * CB + tid] = cr[(b * nI + ch) * D + c];
      }
      colbase[tid] = base;
    }
    __syncthreads();
    // k, v of the tile: column max m, X = exp(k - m), [X v ; X] planes; k and v kept for the epilogue
    const int64_t cbase = colbase[lc];
    float kx[8], vx[8];
    float mloc = -INFINITY;
    bool bad = false;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int64_t tp = j0 + lg * 8 + i;
      kx[i] = -INFINITY;
      vx[i] = 0.f;
      if (cbase >= 0 && tp < j1) {
        kx[i] = load_acc(k + cbase + tp * D);
        vx[i] = load_acc(v + cbase + tp * D);
        bad |= !(kx[i] < INFINITY) || !finite_f(vx[i]);
      }
      mloc = fmaxf(mloc, kx[i]);
    }
    red[lg * CB + lc] = mloc;
    if (bad) *flag = 1;
    __syncthreads();
    float m = -INFINITY;
    for (int x = 0; x < NT / CB; ++x) m = fmaxf(m, red[x * CB + lc]);
    if (lg == 0) mcol[lc] = m;
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      const int key = lg * 8 + i;
      const float x = (kx[i] == -INFINITY || m == -INFINITY) ? 0.f : af_exp(kx[i] - m);
      put_op(XX + size_t(lc) * L::LDX + key, lo_x, x * vx[i]);
      put_op(XX + size_t(CB + lc) * L::LDX + key, lo_x, x);
    }

    typename Mma::Acc aG, aH;
    wmma::fill_fragment(aG, 0.f);
    wmma::fill_fragment(aH, 0.f);
    for (int64_t ch = c0; ch <= c1; ++ch) {
      const int64_t t0 = ch * QC, ci = ch - c0;
      __syncthreads();  // mcol written; the previous chunk's operands consumed
      // S = [Sc G | -Sc H]: column lc, rows lg*4 .. +4
      {
        const float mm = mcol[lc], rh = rho[ci * CB + lc];
        bool fl = false;
#pragma unroll
        for (int i = 0; i < 4; ++i) {
          const int ri = lg * 4 + i;
          const int64_t t = t0 + ri;
          float sgv = 0.f, shv = 0.f;
          if (cbase >= 0 && t < T) {
            const int64_t o = cbase + t * D;
            const float u = load_u<E>(up, o);  // dy exp(rho - lse)
            const float G = u * af_sigmoid(load_acc(q + o)), Hh = u * load_acc(y + o);
            const float r = rrow[ci * QC + ri];
            if (!finite_f(G) || !finite_f(Hh)) {
              fl = true;  // NaN / +inf, or u marked: exact per element
            } else if (u != 0.f && r != -INFINITY && mm != -INFINITY) {
              const float gap = r + mm - rh;  // >= r + m - lse: Sc = exp(gap) u / dy <= e^kGap
              if (gap > kGap) {
                fl = true;
              } else {
                const float sc = af_exp(gap);
                sgv = sc * G;
                shv = -sc * Hh;
              }
            }
          }
          put_op(S + size_t(ri) * L::LDS + lc, lo_s, sgv);
          put_op(S + size_t(ri) * L::LDS + CB + lc, lo_s, shv);
        }
        if (fl) *flag = 1;
      }
      // Ew^T: key tid >> 2, rows (tid & 3) * 16 .. +16
      {
        const int key = tid >> 2, qp = (tid & 3) * 16;
        const int64_t tp = j0 + key;
        bool fl = false;
        for (int i = 0; i < 16; ++i) {
          const int ri = qp + i;
          const int64_t t = t0 + ri;
          float e = 0.f;
          if (t < T && tp < j1 && g.visible(t, tp)) {
            const float r = rrow[ci * QC + ri];
            if (g.in_band(t, tp)) {
              const float wv =
                  L::WCACHE ? to_acc(wc[key * WSPAN + (t - tp + MAXW - 1)]) : load_acc(w + wl.at(h, t, tp));
              if (!(wv < INFINITY)) fl = true;
              e = wv == -INFINITY ? 0.f : af_exp(wv - r);
            } else {
              e = e0[ci * QC + ri];
            }
          }
          put_op(EwT + size_t(key) * L::LDE + ri, lo_e, e);
        }
        if (fl) *flag = 1;
      }
      __syncthreads();
      Mma::run(aG, EwT + size_t(ks) * L::LDE, L::LDE, lo_e, S + cf, L::LDS, lo_s, QC);
      Mma::run(aH, EwT + size_t(ks) * L::LDE, L::LDE, lo_e, S + CB + cf, L::LDS, lo_s, QC);
      const int sl = slot[ci * NSUB + kf / QC];  // the same for both fragments of the warp
      if (sl >= 0) {
#pragma unroll
        for (int f = 0; f < 2; ++f) {
          float* dst = dW + (size_t(sl) * QC + rs) * QC + kf % QC + f * 16;
          typename Mma::Acc acc;
          wmma::load_matrix_sync(acc, dst, QC, wmma::mem_row_major);
          Mma::run(acc, S + size_t(rs) * L::LDS, L::LDS, lo_s, XX + kf + f * 16, L::LDX, lo_x, 2 * CB);
          wmma::store_matrix_sync(dst, acc, QC, wmma::mem_row_major);
        }
      }
    }
    __syncthreads();  // the Ew planes become the staging of aG, aH
    float* stG = reinterpret_cast<float*>(EwT);
    float* stH = stG + KT * CB;
    wmma::store_matrix_sync(stG + size_t(ks) * CB + cf, aG, CB, wmma::mem_row_major);
    wmma::store_matrix_sync(stH + size_t(ks) * CB + cf, aH, CB, wmma::mem_row_major);
    __syncthreads();
    if (cbase >= 0) {
      FarState pre{far[lc], far[CB + lc], far[2 * CB + lc]}, suf{far[3 * CB + lc], far[4 * CB + lc], far[5 * CB + lc]};
#pragma unroll
      for (int i = 0; i < 8; ++i) {
        const int key = lg * 8 + i;
        const int64_t tp = j0 + key;
        if (tp >= j1) continue;
        const float x = get_op(XX + size_t(CB + lc) * L::LDX + key, lo_x);  // X (hi + lo for bf16)
        float sgv = x * stG[key * CB + lc], shv = -x * stH[key * CB + lc];
        pre.apply(kx[i], sgv, shv);
        suf.apply(kx[i], sgv, shv);
        const int64_t o = cbase + tp * D;
        store_val(dv + o, sgv);
        store_val(dk + o, vx[i] * sgv - shv);
      }
    }
    if (tid == 0 && *flag) kvflag[(h * nJ + J) * ncb + cb] = 1;
    if (*flag)
      for (int64_t t = r0 + tid; t < r1; t += NT) rowflag[h * T + t] = 1;
  }
  __syncthreads();
  // dw = Ew dW over the band entries of the tile's keys (a zero Ew, masked or negligible, gives 0)
  for (int i = tid; i < NCH * QC * KT; i += NT) {
    const int ri = i / KT, key = i % KT;
    const int64_t t = r0 + ri, tp = j0 + key;
    if (t >= r1 || tp >= j1 || !g.in_band(t, tp) || !g.visible(t, tp)) continue;
    const int64_t at = wl.at(h, t, tp);
    const float wv = L::WCACHE ? to_acc(wc[key * WSPAN + (t - tp + MAXW - 1)]) : load_acc(w + at);
    const float e = wv == -INFINITY ? 0.f : af_exp(wv - rrow[ri]);
    const int sl = slot[(ri / QC) * NSUB + key / QC];  // >= 0: the pair holds this band entry
    store_val(dw + at, e == 0.f ? 0.f : e * dW[(size_t(sl) * QC + ri % QC) * QC + key % QC]);
  }
#else
  __trap();  // sm < 80: aft_local_tc_bwd_takes() keeps the launcher off this kernel
#endif
}

// Exact per-element dv, dk of the flagged (key tile, column block)s: one block per flag, threads over its (key,
// column) pairs; the near rows one by one, the far rows from the same prefix / suffix states.
template <typename E>
__global__ void local_bwd_exact_kv_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q,
                                          gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                                          gptr<const E> __restrict__ w, gptr<const E> __restrict__ y,
                                          gptr<const float> __restrict__ lse, gptr<const float> __restrict__ pr,
                                          gptr<const float> __restrict__ pg, gptr<const float> __restrict__ ph,
                                          gptr<const float> __restrict__ sr, gptr<const float> __restrict__ sg,
                                          gptr<const float> __restrict__ sh, gptr<E> __restrict__ dk,
                                          gptr<E> __restrict__ dv, gptr<const int> __restrict__ kvflag, int64_t B,
                                          int64_t D, int64_t heads, int64_t dh, int64_t nJ, int64_t nI, BGeo g,
                                          WLayout wl) {
  const int64_t T = g.T, ncols = B * dh, ncb = (ncols + CB - 1) / CB;
  ATTNFREE_STATIC_SHARED(int, flagged, [1]);
  for (int64_t f = blockIdx.x; f < heads * nJ * ncb; f += gridDim.x) {
    __syncthreads();                               // the previous item's flag was read by every thread
    if (threadIdx.x == 0) flagged[0] = kvflag[f];  // one read per block
    __syncthreads();
    if (!flagged[0]) continue;
    const int64_t cb = f % ncb, J = (f / ncb) % nJ, h = f / (ncb * nJ);
    const int64_t c0 = g.clo(J), c1 = g.chi(J), r0 = c0 * QC, r1 = (c1 + 1) * QC < T ? (c1 + 1) * QC : T;
    for (int x = threadIdx.x; x < KT * CB; x += blockDim.x) {
      const int64_t j = cb * CB + x % CB, tp = J * KT + x / CB;
      if (j >= ncols || tp >= T) continue;
      const int64_t b = j / dh, c = h * dh + j % dh, base = b * T * D + c, i = base + tp * D;
      const float kk = load_acc(k + i);
      float sgv = 0.f, shv = 0.f;
      for (int64_t t = r0; t < r1; ++t) {
        if (!g.visible(t, tp)) continue;
        const int64_t o = base + t * D;
        const float bias = g.in_band(t, tp) ? load_acc(w + wl.at(h, t, tp)) : 0.f;
        const float p = p_of(bias + kk, lse[o]);
        const float d = load_acc(dy + o);
        sgv += p * d * af_sigmoid(load_acc(q + o));
        shv += p * d * load_acc(y + o);
      }
      const int64_t o = (b * nJ + J) * D + c;
      if (!g.causal) FarState{pr[o], pg[o], ph[o]}.apply(kk, sgv, shv);
      FarState{sr[o], sg[o], sh[o]}.apply(kk, sgv, shv);
      store_val(dv + i, sgv);
      store_val(dk + i, load_acc(v + i) * sgv - shv);
    }
  }
}

// Exact per-element dw of the flagged rows: one block per (h, t), one warp per key, lanes over (b, c).
template <typename E>
__global__ void local_bwd_exact_w_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q,
                                         gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                                         gptr<const E> __restrict__ w, gptr<const E> __restrict__ y,
                                         gptr<const float> __restrict__ lse, gptr<E> __restrict__ dw,
                                         gptr<const int> __restrict__ rowflag, int64_t B, int64_t D, int64_t heads,
                                         BGeo g, WLayout wl) {
  const int64_t T = g.T, W = g.W, dh = D / heads;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  ATTNFREE_STATIC_SHARED(int, flagged, [1]);
  for (int64_t blk = blockIdx.x; blk < heads * T; blk += gridDim.x) {
    __syncthreads();                                  // the previous row's flag was read by every thread
    if (threadIdx.x == 0) flagged[0] = rowflag[blk];  // one read per block
    __syncthreads();
    if (!flagged[0]) continue;
    const int64_t t = blk % T, h = blk / T;
    const int64_t lo = t - W + 1 > 0 ? t - W + 1 : 0;
    const int64_t hi = g.causal ? t : (t + W - 1 < T - 1 ? t + W - 1 : T - 1);
    for (int64_t tp = lo + warp; tp <= hi; tp += nwarps) {
      const float wv = load_acc(w + wl.at(h, t, tp));
      float acc = 0.f;
      for (int64_t j = lane; j < B * dh; j += 32) {
        const int64_t b = j / dh, c = h * dh + j % dh;
        const int64_t it = (b * T + t) * D + c, ik = (b * T + tp) * D + c;
        const float p = p_of(wv + load_acc(k + ik), lse[it]);
        const float d = load_acc(dy + it);
        acc += p * (d * af_sigmoid(load_acc(q + it)) * load_acc(v + ik) - d * load_acc(y + it));
      }
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, o);
      if (lane == 0) store_val(dw + wl.at(h, t, tp), acc);
    }
  }
}

inline bool tc_bwd_device(size_t smem) {
  int dev = 0, major = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return true;  // a failed query is left to the launch
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return true;
  if (major < 8) return false;
  if (cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess) return true;
  return size_t(optin) >= smem;
}

inline int64_t num_chunks(int64_t T) { return (T + QC - 1) / QC; }
inline int64_t num_tiles(int64_t T) { return (T + KT - 1) / KT; }

}  // namespace

bool aft_local_tc_bwd_takes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t W) {
  if (dtype != DType::Float32 && dtype != DType::Float16 && dtype != DType::BFloat16) return false;
  if (B <= 0 || T <= 0 || D <= 0 || heads < 1 || D % heads != 0 || W < 1 || W > MAXW) return false;
  if (num_tiles(T) > 0x7fffffff || heads > 65535) return false;
  const size_t smem = dtype == DType::BFloat16  ? BwdOps<__nv_bfloat16>::kBytes
                      : dtype == DType::Float16 ? BwdOps<__half>::kBytes
                                                : BwdOps<float>::kBytes;
  return tc_bwd_device(smem);
}

size_t aft_local_tc_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t W) {
  const int64_t nI = num_chunks(T), nJ = num_tiles(T), ncb = (B * (D / heads) + CB - 1) / CB, n = B * T * D;
  const size_t u = dtype == DType::Float32 ? align_up(sizeof(float) * size_t(n))
                                           : align_up(sizeof(uint16_t) * size_t(n)) + align_up(size_t(n));
  return align_up(sizeof(float) * size_t(B * nI * D)) + 3 * align_up(sizeof(float) * size_t(B * num_pairs(nI, W) * D)) +
         6 * align_up(sizeof(float) * size_t(B * nJ * D)) + u +
         align_up(sizeof(int) * size_t(heads * nJ * ncb + heads * T));
}

cudaError_t aft_local_tc_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v, const void* w,
                             const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw, int64_t B,
                             int64_t T, int64_t D, int64_t heads, int64_t W, bool causal, bool banded, void* workspace,
                             cudaStream_t stream) {
  const int64_t nI = num_chunks(T), nJ = num_tiles(T), dh = D / heads, ncb = (B * dh + CB - 1) / CB;
  const BGeo g{T, W, causal};
  const WLayout wl(T, W, banded);
  WsCursor ws(workspace);
  float* cr = ws.take<float>(B * nI * D);
  float* fr = ws.take<float>(B * num_pairs(nI, W) * D);
  float* fg = ws.take<float>(B * num_pairs(nI, W) * D);
  float* fh = ws.take<float>(B * num_pairs(nI, W) * D);
  float* pr = ws.take<float>(B * nJ * D);
  float* pg = ws.take<float>(B * nJ * D);
  float* ph = ws.take<float>(B * nJ * D);
  float* sr = ws.take<float>(B * nJ * D);
  float* sg = ws.take<float>(B * nJ * D);
  float* sh = ws.take<float>(B * nJ * D);
  UPlanes up{nullptr, nullptr, nullptr};
  if (dtype == DType::Float32) {
    up.f = ws.take<float>(B * T * D);
  } else {
    up.hi = ws.take<uint16_t>(B * T * D);
    up.lo = ws.take<uint8_t>(B * T * D);
  }
  const UPlanesRO upr{up.f, up.hi, up.lo};
  int* kvflag = ws.take<int>(heads * nJ * ncb + heads * T);
  int* rowflag = kvflag + heads * nJ * ncb;
  const float* lp = static_cast<const float*>(lse);
  auto run = [&](auto tag) -> cudaError_t {
    using E = decltype(tag);
    const E *dyp = static_cast<const E*>(dy), *qp = static_cast<const E*>(q), *kp = static_cast<const E*>(k);
    const E *vp = static_cast<const E*>(v), *wp = static_cast<const E*>(w), *yp = static_cast<const E*>(y);
    E *dkp = static_cast<E*>(dk), *dvp = static_cast<E*>(dv), *dwp = static_cast<E*>(dw);
    ATTNFREE_LAUNCH(local_bwd_zero_kernel, grid_for(heads * nJ * ncb + heads * T), kThreads, 0, stream)(
        kvflag, heads * nJ * ncb + heads * T);
    ATTNFREE_LAUNCH((local_bwd_prep_kernel<E>), grid_for(B * num_pairs(nI, W) * D), kThreads, 0, stream)(
        dyp, qp, yp, lp, static_cast<E*>(dq), cr, fr, fg, fh, up, B, T, D, nI, W);
    ATTNFREE_LAUNCH(local_bwd_scan_kernel, grid_for(B * D), kThreads, 0, stream)(fr, fg, fh, pr, pg, ph, sr, sg, sh, B,
                                                                                 D, nI, nJ, g);
    const size_t smem = BwdOps<E>::kBytes;
    cudaError_t err = cudaFuncSetAttribute(local_bwd_tc_kernel<E>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                           static_cast<int>(smem));
    if (err != cudaSuccess) return err;
    const dim3 grid(static_cast<unsigned>(nJ), static_cast<unsigned>(heads));
    ATTNFREE_LAUNCH((local_bwd_tc_kernel<E>), grid, NT, smem, stream)(
        upr, cr, qp, kp, vp, wp, yp, pr, pg, ph, sr, sg, sh, dkp, dvp, dwp, kvflag, rowflag, B, D, dh, nJ, nI, g, wl);
    ATTNFREE_LAUNCH((local_bwd_exact_kv_kernel<E>), grid_for(heads * nJ * ncb * kThreads), kThreads, 0, stream)(
        dyp, qp, kp, vp, wp, yp, lp, pr, pg, ph, sr, sg, sh, dkp, dvp, kvflag, B, D, heads, dh, nJ, nI, g, wl);
    ATTNFREE_LAUNCH((local_bwd_exact_w_kernel<E>), grid_for(heads * T * kThreads), kThreads, 0, stream)(
        dyp, qp, kp, vp, wp, yp, lp, dwp, rowflag, B, D, heads, g, wl);
    return cudaGetLastError();
  };
  return tc_dtype_dispatch(dtype, run);
}

}  // namespace cuda
}  // namespace attnfree
