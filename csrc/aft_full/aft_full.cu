// AFT-full (Zhai et al. 2021, eq. 2), non-causal and causal, forward and backward, plus the low-rank
// (factorised) bias w = u @ vb^T computed tile by tile. Plain CUDA C++: no torch headers (see aft_full.h).
//
// =====================================================================================================
// DESIGN
// =====================================================================================================
// AFT-full is GEMM-shaped (docs/design.md §2.1):  [num | den] = exp(w) (T x T) @ [exp(k) * v | exp(k)] (T x 2*B*D),
// with w shared over the batch. For one head h (channels c in [h*dh, (h+1)*dh), dh = D / heads) the GEMM
// "columns" are the B*dh pairs j = (b, c) — a column block may span several batch entries when dh < BN.
//
// Forward, tensor cores (fp16 / bf16 / fp32 inputs): fixed references from three prepasses, then one GEMM whose
// accumulators simply sum over all key tiles (no running max, no per-tile merge: docs/design.md §2.3).
//   `fwd_colmax_kernel`: m[h][j] = max over all keys of k in column j = (b, c) (one thread per column).
//   `fwd_expkv_kernel`:  Ek = exp(k - m) <= 1 (rounded to the operand type first), Ekv = Ek * v, into the workspace
//                        in the head-major layout [heads][T][B*dh] (a column block is contiguous): bf16 for bf16
//                        inputs, fp32 otherwise. One exp per (b, t, c); a thread per 16 time steps of a column.
//   `fwd_rowmax_kernel`: r[h][t] = max of w[h, t, :] over the keys visible to t (w read once, shared over the
//                        batch; the low-rank bias builds its tiles here once instead of once per column block).
//   `fwd_tc_kernel`: CTA = 256 threads (8 warps as 4 x 2) owns FBM query rows x FBN columns of one head, 192 x 96
//   for the dense bias (the shape of least re-read bytes the registers hold: FwdCfg), 128 x 128 for the low-rank
//   one, and loops over key tiles of FBK = 64 keys (causal: keys <= the tile's last row):
//     (1) w tile (loaded, or for the low-rank op built as U[rows] @ Vb[keys]^T by fp32 SIMT dot products: with the
//         CTA's 128 rows of U resident in shared memory and one key tile of Vb per step where they fit, rank 128
//         in bf16 on sm_80, else through chunks of 32 ranks), Ew = exp(w - r) in [0, 1] (0 for invisible / masked keys)
//         to smem as bf16 for bf16 inputs (never fp16: its exponent range ends near e^-17), fp32 otherwise;
//     (2) the Ek, Ekv tiles copied from the workspace (no exps): dense bias, 16-byte aligned rows (B dh a multiple of
//         8 bf16 / 4 fp32 operands): cp.async into the second of two buffers while (1) builds the current Ew tile,
//         else plain loads after (1);
//     (3) nvcuda::wmma (sm_80-compatible, so it also runs on sm_90), fp32 accumulators that stay in registers for
//         the whole key loop (each warp 48 x 48 outputs: 3 x 3 fragments each for den and num = 144 registers; low
//         rank 32 x 64, 2 x 4 fragments, 128 registers):
//         den += Ew @ Ek, num += Ew @ Ekv. bf16: m16n16k16. fp32 inputs: 3xTF32 (a = a_big + a_small, three
//         m16n16k8 tf32 MMAs, ~fp32 accuracy) by default; plain TF32 (one MMA, ~1e-3 relative) when the launcher's
//         `tf32x3` is false. fp16 inputs always take 3xTF32.
//   Exponentials: one per w element per column block (T / FBN per output element) plus one per (b, t, c) in the
//   prepass, against 4 T MMA FLOPs per output element: ~0.7 per 256 FLOPs (bf16, T = 4096, FBN = 96).
//   Guard (epilogue): every term is <= 1, so the only loss is underflow (a lost term is < 2^-126). Where
//   den < (visible keys) * 2^-86 those terms could matter at 2^-40 relative (|w|, |k| ~ 1e4 with misaligned
//   maxima; causally, a late spike in k that raised m above every earlier key; a row or column fully masked), and
//   with bf16 operands and the dense bias for causal rows that see fewer than 16 keys (kFewKeys), that
//   (t, c) is recomputed exactly by a per-element online log-sum-exp over its visible keys (`fallback_element`).
//   Elsewhere y = sigmoid(q) * num / den, lse = r + m + log(den) formed in double and rounded once.
//   Shared memory: union(Ew + Ek + Ekv, per-warp 2 x 16 x 16 fp32 epilogue scratch) + r, m: dense (two Ek, Ekv
//   buffers) bf16 80.1 KB, fp32 152 KB; low rank (one) 53.8 / 101 KB, plus (128 + 64) x (rank + 1) fp32 for
//   resident factors or 2 x 64 x 33 fp32 = 16.9 KB. 249-255 registers, 1 CTA per SM, no local memory
//   (tests/test_cuda_compile.py).
//   Workspace (aft_full_fwd_workspace_bytes): Ek, Ekv (2 B T D operands) + r (heads T) + m (B D) fp32; no T x T.
//
// Forward, exact kernel `fwd_exact_kernel` (fp64 always; any dtype with exact = true): one thread per (b, t, c),
//   online log-sum-exp over the visible keys in the accumulate type. O(T^2 B D) scalar work.
//
// Backward, tensor cores (fp16 / bf16 / fp32; docs/design.md §3), by recomputation from lse. With P = exp(w + k - lse)
// (<= 1), G = dy * sigmoid(q), H = dy * y:  dq = dy * y * (1 - sigmoid(q)).
//   aft_full_bwd.cuh: the forward's fixed references r, m, then three GEMMs with the exponentials of each operand
//   formed once (bwd_prep_kernel, bwd_kv_kernel, bwd_w_kernel); the low-rank bias takes its prepass, dk/dv kernel
//   and, for du / dvb, bwd_uv_kernel where the factor rows fit in shared memory (rank <= ~150).
//   Per 64 x 64 tile pair with local maxima (the low-rank bias with larger factors; `bwd_dq_kernel` first):
//   `bwd_kv_tc_kernel`: CTA = key tile J (64 keys) x 64 columns of a head; loop over query tiles I (causal: I >= J).
//     a[t] = max_{t' in J, visible} w;  Ew = exp(w - a);  La = a - lse;  lam[c] = max_{t in I} La;  R = exp(La - lam)
//     [g1 | g2] = Ew^T [R G | R H]  (two 64x64x64 MMAs, same operand formats as the forward)
//     dv += g1 * exp(k + lam),  sumPH += g2 * exp(k + lam);  dk = v dv - sumPH.
//     Scale guard: for visible (t, t') the scale k + lam <= a[t] - w[t, t'] (P <= 1), i.e. bounded by the spread of
//     w in the row; where (k + lam) * log2 e > 60 (adversarial |w| ~ 1e4, or a causal late spike in the tile), the
//     underflow bound of g is not trusted and that (t', c) tile term is recomputed exactly (64 exps, rare path).
//   `bwd_w_tc_kernel`: CTA = query tile I x key tile J of a head; loop over chunks of 64 columns (b, c):
//     mu[c] = max_{t' in J} k;  Y = exp(k - mu);  Xl = mu - lse;  nu[t] = max_c Xl;  Xt = exp(Xl - nu)
//     g = (Xt G)(Y v)^T - (Xt H) Y^T  (K = 64 columns, two MMAs into one accumulator);  dw += g * exp(w + nu)
//     with the same guard (w + nu) * log2 e > 60 -> exact per-element sum over the chunk.
//   The SIMT kernels below (`bwd_dkdv_kernel`: one thread per (b, t', c); `bwd_dw_kernel`: one warp per
//   (h, t, t')) are used for float64 and with exact = true.
//   Low rank (w = u vb^T, never materialised; the only user of these two kernels): both build their w tiles from
//   u, vb on chip (lowrank_tile);
//   the dw kernel runs twice, once per query tile I looping over key tiles (du[I] += dw[I, J] vb[J]) and once per
//   key tile J looping over query tiles (dvb[J] += dw[I, J]^T u[I]), each CTA owning its rows of an fp32
//   (heads, T, rank) accumulator: deterministic, no atomics, no T x T buffer (2x the dw work of the dense bias).
//   The SIMT path does the same with `bwd_factor_kernel` (one warp per row of du or dvb).
//
// No (B, T, T, D) tensor is ever built. Any B, T, D, heads (T need not be a multiple of any tile: all loads
// are predicated). 64-bit indexing throughout.
// =====================================================================================================

#include "aft_full/aft_full.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <mma.h>

#include <cfloat>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/cluster.h"
#include "common/cuda_common.cuh"
#include "common/wmma_tf32.cuh"

namespace attnfree {
namespace cuda {
namespace aft_full_detail {

using namespace nvcuda;

// bf16 and tf32 wmma exist from sm_80 on. The tensor-core helpers and kernel bodies are compiled for the host pass
// (and the emulation harness) and for device passes with __CUDA_ARCH__ >= 800; below that the kernels are declared
// with a trapping body and the launchers fall back to the per-element kernels (aft_full_tc_supported()).
#if !defined(__CUDA_ARCH__) || __CUDA_ARCH__ >= 800
#define AFT_FULL_TC_ARCH 1
#else
#define AFT_FULL_TC_ARCH 0
#endif

constexpr float kLog2e = 1.4426950408889634f;
constexpr double kLn2d = 0.6931471805599453094;
// Online log-sum-exp over the visible keys of one (b, t, c): z = sum softmax * v, lse. `wget(t')` -> w[t, t'].
template <typename E, typename A, typename WGet>
__device__ __forceinline__ void exact_element(const WGet& wget, gptr<const E> __restrict__ kcol,
                                              gptr<const E> __restrict__ vcol, int64_t D, int64_t tend, A& z, A& lse) {
  A M = neg_inf<A>(), S = A(0), Acc = A(0);
  for (int64_t tp = 0; tp < tend; ++tp) {
    const A l = static_cast<A>(wget(tp)) + static_cast<A>(to_acc(kcol[tp * D]));
    if (l == neg_inf<A>()) continue;  // a masked key (-inf in k or w): excluded, never (-inf) - (-inf)
    const A vv = static_cast<A>(to_acc(vcol[tp * D]));
    if (l > M) {
      const A sc = af_exp(M - l);  // M = -inf -> 0
      S = S * sc + A(1);
      Acc = Acc * sc + vv;
      M = l;
    } else {
      const A e = af_exp(l - M);
      S += e;
      Acc += e * vv;
    }
  }
  z = S == A(0) ? A(0) : Acc / S;  // no finite logit: z = 0, lse = -inf (docs/design.md §7 rule 4)
  lse = M + af_log(S);
}

// The bias of one head as the kernels read it: dense w[h] (T x T), or the factorised w[h] = u[h] vb[h]^T (T x rank
// factors), never materialised: an element is a rank-long dot product, a tile is built through shared memory
// (lowrank_tile). Pointers already point at head h.
template <typename WE, bool LOWRANK>
struct WSrc {
  gptr<const WE> w;      // dense: w[h]
  gptr<const WE> u, vb;  // low rank: u[h], vb[h]
  int64_t T, rank;
  __device__ __forceinline__ acc_of_t<WE> at(int64_t t, int64_t tk) const {
    if constexpr (LOWRANK) {
      acc_of_t<WE> s = 0;
      gptr<const WE> ur = u + t * rank;
      gptr<const WE> vr = vb + tk * rank;
      for (int64_t r = 0; r < rank; ++r) s += to_acc(ur[r]) * to_acc(vr[r]);
      return s;
    } else {
      return to_acc(w[t * T + tk]);
    }
  }
};

// WSrc of head h from the full (heads, T, T) or (heads, T, rank) tensors.
template <typename WE, bool LOWRANK>
__device__ __forceinline__ WSrc<WE, LOWRANK> head_bias(gptr<const WE> w, gptr<const WE> u, gptr<const WE> vb, int64_t h,
                                                       int64_t T, int64_t rank) {
  if constexpr (LOWRANK) {
    return WSrc<WE, LOWRANK>{nullptr, u + h * T * rank, vb + h * T * rank, T, rank};
  } else {
    return WSrc<WE, LOWRANK>{w + h * T * T, nullptr, nullptr, T, rank};
  }
}

// Row t of a WSrc as exact_element reads it: tp -> w[t, tp].
template <typename WE, bool LOWRANK>
struct WRow {
  WSrc<WE, LOWRANK> src;
  int64_t t;
  __device__ __forceinline__ acc_of_t<WE> operator()(int64_t tp) const { return src.at(t, tp); }
};

// ------------------------------------------------------------------------------------------ exact forward
// Element idx of a (B, T, D) tensor: batch b, time t, channel c of head h; base = offset of (b, 0, c).
struct ElementIdx {
  int64_t b, t, c, h, base;
  __device__ __forceinline__ ElementIdx(int64_t idx, int64_t T, int64_t D, int64_t dh) {
    c = idx % D;
    t = (idx / D) % T;
    b = idx / (T * D);
    h = c / dh;
    base = b * T * D + c;
  }
};

template <typename E, typename WE, bool LOWRANK>
__global__ void fwd_exact_kernel(gptr<const E> __restrict__ q, gptr<const E> __restrict__ k,
                                 gptr<const E> __restrict__ v, gptr<const WE> __restrict__ w,
                                 gptr<const WE> __restrict__ u, gptr<const WE> __restrict__ vbias,
                                 gptr<E> __restrict__ y, gptr<acc_of_t<E>> __restrict__ lse, int64_t B, int64_t T,
                                 int64_t D, int64_t dh, int64_t rank, bool causal) {
  using A = acc_of_t<E>;
  AF_GRID_STRIDE(idx, B * T * D) {  // 64-bit grid-stride: any B * T * D fits the (capped) grid
    const ElementIdx e(idx, T, D, dh);
    A z, l;
    const WRow<WE, LOWRANK> wg{head_bias<WE, LOWRANK>(w, u, vbias, e.h, T, rank), e.t};
    exact_element<E, A>(wg, k + e.base, v + e.base, D, causal ? e.t + 1 : T, z, l);
    y[idx] = from_acc<E>(af_sigmoid(to_acc(q[idx])) * z);
    lse[idx] = l;
  }
}

// ------------------------------------------------------------------------------------------ tensor-core forward
// Minimum resident CTAs per SM requested from ptxas for the tensor-core kernels. 1: ~170-230 registers, no
// local memory (tests/test_cuda_compile.py asserts a 0-byte stack frame), 8 warps/SM; 2: 128 registers, 16 warps/SM,
// but the per-thread merge state no longer fits (sm_90: dense forward 16-64 B of stack, the others more). Default 1
// everywhere; -DAFT_FULL_FWD_MIN_BLOCKS=2 (dense forward) / -DAFT_FULL_MIN_BLOCKS=2 to compare on the GPU.
#ifndef AFT_FULL_MIN_BLOCKS
#define AFT_FULL_MIN_BLOCKS 1
#endif
#ifndef AFT_FULL_FWD_MIN_BLOCKS
#define AFT_FULL_FWD_MIN_BLOCKS 1
#endif
constexpr int NT = 256, RCH = 32, LDR = RCH + 1, LDS = 64 + 4;

// Operand type of the tensor-core kernels: bf16 for bf16 inputs, fp32 (split into tf32 parts) otherwise.
template <bool F32OPS>
struct TcCfg {
  using Op = typename std::conditional<F32OPS, float, __nv_bfloat16>::type;
};

// Forward tiling (FwdCfg): a CTA owns FBM query rows x FBN columns and loops over key tiles of FBK keys; its 8 warps
// form a FWM x FWN grid, each warp owning FFM x FFN accumulator fragments of 16 x 16 for den and for num (kept in
// registers across all key tiles: 2 FFM FFN x 8 fp32 registers per thread). Per key a CTA reads FBM w entries and
// 2 FBN operand entries, i.e. w_bytes / FBN + 2 op_bytes / FBM per output element and key: for the FBM FBN the
// registers hold, least at FBM = 2 FBN. Dense bias 192 x 96 (144 accumulator registers, 249-255 in all, no local
// memory); the low-rank bias, whose tile building needs more registers (192 x 96 spills there), 128 x 128.
constexpr int FBK = 64, FWM = 4, FWN = 2;
// den below kLostRel x (visible keys): terms lost to underflow (each < 2^-126) may matter at 2^-40 relative, so
// that (t, c) is recomputed exactly.
constexpr float kLostRel = 0x1p-86f;
// With bf16 operands and the dense bias, causal rows that see fewer keys than this are summed exactly too: over a few
// terms the operands' rounding (2^-9 relative) does not average out, and the backward's P = exp(w + k - lse)
// inherits it (cost: kFewKeys^2 / 2 exact terms per column, next to the T^2 / 2 of the tensor cores; not for the
// low-rank bias, where each exact term is a rank-long dot product).
constexpr float kFewKeys = 16.f;

template <bool F32OPS, bool LOWRANK>
struct FwdCfg {
  using Op = typename TcCfg<F32OPS>::Op;
  static constexpr int FBM = LOWRANK ? 128 : 192, FBN = LOWRANK ? 128 : 96;
  static constexpr int FFM = FBM / (16 * FWM), FFN = FBN / (16 * FWN);
  static_assert(FWM * FWN * 32 == NT && FBM % 64 == 0 && FBM == 16 * FWM * FFM && FBN == 16 * FWN * FFN && FBK == 64 &&
                    FBM <= NT && FBN <= NT,
                "forward tiling");
  static constexpr int LDA = F32OPS ? FBK + 4 : FBK + 8;  // Ew [FBM][LDA]
  static constexpr int LDB = F32OPS ? FBN + 4 : FBN + 8;  // Ek, Ekv [FBK][LDB]
  static constexpr size_t kEwBytes = size_t(FBM) * LDA * sizeof(Op);
  static constexpr size_t kEkBytes = size_t(FBK) * LDB * sizeof(Op);
  // the dense bias double-buffers the Ek, Ekv tiles (cp.async of the next key tile while this one's Ew is built)
  static constexpr int kEkBufs = LOWRANK ? 1 : 2;
  static constexpr size_t kOpsBytes = kEwBytes + 2 * kEkBufs * kEkBytes;
  static constexpr size_t kScratchBytes = size_t(NT / 32) * 2 * 256 * sizeof(float);  // per warp: den, num 16 x 16
  static constexpr size_t kUnionBytes = ((kOpsBytes > kScratchBytes ? kOpsBytes : kScratchBytes) + 127) / 128 * 128;
  static constexpr size_t kR = kUnionBytes;               // float r[FBM]
  static constexpr size_t kM = kR + FBM * sizeof(float);  // float m[FBN]
  static constexpr size_t kBase = (kM + FBN * sizeof(float) + 127) / 128 * 128;
  static constexpr size_t kUs = kBase;                                   // float Us[64][LDR] (low rank)
  static constexpr size_t kVs = kUs + size_t(64) * LDR * sizeof(float);  // float Vs[64][LDR]
  static constexpr size_t kLowRankBytes = kVs + size_t(64) * LDR * sizeof(float);
  // Low rank with the factors resident (ldu = rank + 1 > 0): Us[FBM][ldu] (the CTA's rows of u, loaded once) and
  // Vs[64][ldu] (a key tile of vb), instead of the 32-rank chunks of both re-read for every 64 x 64 tile.
  static size_t lowrank_resident_bytes(int64_t ldu) { return kBase + size_t(FBM + 64) * ldu * sizeof(float); }
  static size_t smem_bytes(bool lowrank, int64_t ldu) {
    return !lowrank ? kBase : ldu > 0 ? lowrank_resident_bytes(ldu) : kLowRankBytes;
  }
};

// ------------------------------------------------------------------------------------------ shared tile loads
// The tensor-core kernels (forward and both backward kernels) stage their 64 x 64 exponentiated operand tiles the
// same way: a thread owns a strip of 16 consecutive entries, maxima are combined across the tile in registers or
// shared memory, and exp(x - max) lands in [0, 1] so that bf16/tf32 operands cannot overflow.

// Offset of GEMM column j = (b, c) of head h in a (B, T, D) tensor (time step 0), -1 past the last column.
__device__ __forceinline__ int64_t column_offset(int64_t j, int64_t ncols, int64_t dh, int64_t T, int64_t D,
                                                 int64_t h) {
  return (j < ncols) ? (j / dh) * T * D + h * dh + (j % dh) : int64_t(-1);
}

// Query row t sees key tk iff both exist and, when causal, tk <= t.
__device__ __forceinline__ bool key_visible(int64_t t, int64_t tk, int64_t T, bool causal) {
  return t < T && tk < T && (!causal || tk <= t);
}

// Dense bias strip w[t, k0 + 16 part + i], i < 16: the visible entries (0 elsewhere, never read).
template <typename WE>
__device__ __forceinline__ void load_w_strip(gptr<const WE> __restrict__ wh, int64_t t, int64_t k0, int part, int64_t T,
                                             bool causal, float (&wv)[16]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t tk = k0 + part * 16 + i;
    wv[i] = key_visible(t, tk, T, causal) ? static_cast<float>(to_acc(wh[t * T + tk])) : 0.f;
  }
}

// A 64 x 64 tile of a low-rank bias, w[t0 + row, k0 + key] = sum_r u[t0 + row, r] vb[k0 + key, r], as fp32 dot
// products through shared-memory chunks of RCH ranks (Us [64][LDR], Vs [64][LDR]; missing rows/keys read 0). Each
// thread gets 16 entries: STRIP: row `a`, keys 16 b + i (the w-strip layout of load_w_strip); else keys `a`, rows
// b + i (the output layout of a warp strip). Every thread of the CTA must call it (it synchronises).
template <bool STRIP, typename WE>
__device__ __forceinline__ void lowrank_tile(const WSrc<WE, true>& src, int64_t t0, int64_t k0, int a, int b, float* Us,
                                             float* Vs, float (&wv)[16]) {
  const int64_t T = src.T, rank = src.rank;
#pragma unroll
  for (int i = 0; i < 16; ++i) wv[i] = 0.f;
  for (int64_t r0 = 0; r0 < rank; r0 += RCH) {
    for (int e = threadIdx.x; e < 64 * RCH; e += NT) {
      const int rr = e / RCH, cc = e % RCH;
      const int64_t tq = t0 + rr, tk = k0 + rr, rk = r0 + cc;
      Us[rr * LDR + cc] = (tq < T && rk < rank) ? static_cast<float>(to_acc(src.u[tq * rank + rk])) : 0.f;
      Vs[rr * LDR + cc] = (tk < T && rk < rank) ? static_cast<float>(to_acc(src.vb[tk * rank + rk])) : 0.f;
    }
    __syncthreads();
#pragma unroll 4
    for (int cc = 0; cc < RCH; ++cc) {
      if constexpr (STRIP) {
        const float uu = Us[a * LDR + cc];
#pragma unroll
        for (int i = 0; i < 16; ++i) wv[i] = fmaf(uu, Vs[(b * 16 + i) * LDR + cc], wv[i]);
      } else {
        const float vv = Vs[a * LDR + cc];
#pragma unroll
        for (int i = 0; i < 16; ++i) wv[i] = fmaf(Us[(b + i) * LDR + cc], vv, wv[i]);
      }
    }
    __syncthreads();
  }
}

// The w strip of thread (wrow, wpart) of the tile at (t0, k0) from either bias (low rank: every thread must call).
template <typename WE, bool LOWRANK>
__device__ __forceinline__ void bias_strip(const WSrc<WE, LOWRANK>& src, int64_t t0, int64_t k0, int wrow, int wpart,
                                           bool causal, float* Us, float* Vs, float (&wv)[16]) {
  if constexpr (LOWRANK) {
    lowrank_tile<true>(src, t0, k0, wrow, wpart, Us, Vs, wv);
  } else {
    load_w_strip(src.w, t0 + wrow, k0, wpart, src.T, causal, wv);
  }
}

// Row max r of a w tile over the visible keys (the 4 threads of a row are lanes 4 r .. 4 r + 3 of one warp) and
// ew_row[16 part + i] = exp(w - r), 0 for invisible keys. Returns r (-inf when the row sees no key of the tile).
template <typename Op>
__device__ __forceinline__ float exp_w_strip(const float (&wv)[16], int64_t t, int64_t k0, int part, int64_t T,
                                             bool causal, Op* ew_row) {
  float rmax = -INFINITY;
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (key_visible(t, k0 + part * 16 + i, T, causal)) rmax = fmaxf(rmax, wv[i]);
  rmax = fmaxf(rmax, __shfl_xor_sync(0xffffffffu, rmax, 1));
  rmax = fmaxf(rmax, __shfl_xor_sync(0xffffffffu, rmax, 2));
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const bool vis = key_visible(t, k0 + part * 16 + i, T, causal) && wv[i] != -INFINITY;  // -inf: masked key
    store_val(&ew_row[part * 16 + i], vis ? exp2f((wv[i] - rmax) * kLog2e) : 0.f);
  }
  return rmax;
}

// Max over the 4 partial maxima red[g * 64 + col], g < 4, of the 64 rows of a tile.
__device__ __forceinline__ float max_of_4(const float* red, int col) {
  return fmaxf(fmaxf(red[col], red[64 + col]), fmaxf(red[128 + col], red[192 + col]));
}

// k, v tile: thread (col, g) owns keys k0 + 16 g + i of the column at offset cb (-1: no column). Column max m over
// the tile's keys (through red[4][64] and one __syncthreads, so every thread of the CTA must call this), then
// ek[key][col] = exp(k - m) and ekv[key][col] = ek * v (0 for missing keys). Returns m.
template <typename E, typename Op>
__device__ __forceinline__ float exp_kv_strip(gptr<const E> __restrict__ k, gptr<const E> __restrict__ v, int64_t cb,
                                              int64_t k0, int g, int col, int64_t T, int64_t D, float* red, Op* ek,
                                              Op* ekv, int ld) {
  float kv[16], vv[16];
  float lmax = -INFINITY;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t tk = k0 + g * 16 + i;
    const bool ok = cb >= 0 && tk < T;
    kv[i] = ok ? to_acc(k[cb + tk * D]) : 0.f;
    vv[i] = ok ? to_acc(v[cb + tk * D]) : 0.f;
    if (ok) lmax = fmaxf(lmax, kv[i]);
  }
  red[g * 64 + col] = lmax;
  __syncthreads();
  const float m = max_of_4(red, col);
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t tk = k0 + g * 16 + i;
    const float e = (cb >= 0 && tk < T && kv[i] != -INFINITY) ? exp2f((kv[i] - m) * kLog2e) : 0.f;  // -inf: masked
    store_val(&ek[(g * 16 + i) * ld + col], e);
    store_val(&ekv[(g * 16 + i) * ld + col], e * vv[i]);
  }
  return m;
}

// A warp's output strip: two 16 x 16 accumulator fragments side by side (rows r0 .. r0 + 16, columns c0 .. c0 + 32).
template <typename Frag>
__device__ __forceinline__ void zero_strip(Frag (&a)[2]) {
#pragma unroll
  for (int jj = 0; jj < 2; ++jj) wmma::fill_fragment(a[jj], 0.f);
}

// The strip into an fp32 staging tile of row stride LDS, for the per-element epilogue.
template <typename Frag>
__device__ __forceinline__ void store_strip(float* stage, const Frag (&a)[2], int r0, int c0) {
#pragma unroll
  for (int jj = 0; jj < 2; ++jj)
    wmma::store_matrix_sync(stage + r0 * LDS + c0 + jj * 16, a[jj], LDS, wmma::mem_row_major);
}

#if AFT_FULL_TC_ARCH  // bf16 / tf32 wmma: sm_80+
// 3xTF32 (split_tf32, mma_3xtf32): common/wmma_tf32.cuh.

// The forward's per-key-tile product of a warp: d[i][jj] += Ew[rows] Ek[:, cols], n[i][jj] += Ew[rows] Ekv[:, cols]
// over FBK keys (rows wr0 + 16 i, columns wc0 + 16 jj). The accumulators stay in registers across key tiles.
template <bool F32OPS>
struct FwdMma;

template <>
struct FwdMma<false> {  // bf16 operands, fp32 accumulate
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 16, float>;
  template <typename Cfg, int FFM = Cfg::FFM, int FFN = Cfg::FFN>
  __device__ __forceinline__ static void run(const __nv_bfloat16* Ew, const __nv_bfloat16* Ek, const __nv_bfloat16* Ekv,
                                             int wr0, int wc0, bool /*x3*/, Acc (&d)[FFM][FFN], Acc (&n)[FFM][FFN]) {
    wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::row_major> a[FFM];
    wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::row_major> b;
#pragma unroll 2
    for (int kk = 0; kk < FBK; kk += 16) {
#pragma unroll
      for (int i = 0; i < FFM; ++i) wmma::load_matrix_sync(a[i], Ew + (wr0 + 16 * i) * Cfg::LDA + kk, Cfg::LDA);
#pragma unroll
      for (int jj = 0; jj < FFN; ++jj) {
        wmma::load_matrix_sync(b, Ek + kk * Cfg::LDB + wc0 + jj * 16, Cfg::LDB);
#pragma unroll
        for (int i = 0; i < FFM; ++i) wmma::mma_sync(d[i][jj], a[i], b, d[i][jj]);
        wmma::load_matrix_sync(b, Ekv + kk * Cfg::LDB + wc0 + jj * 16, Cfg::LDB);
#pragma unroll
        for (int i = 0; i < FFM; ++i) wmma::mma_sync(n[i][jj], a[i], b, n[i][jj]);
      }
    }
  }
};

template <>
struct FwdMma<true> {  // fp32 operands: 3xTF32 (x3, ~fp32 accuracy) or plain TF32 (~1e-3 relative, 1/3 the MMAs)
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, 8, float>;
  using FA = wmma::fragment<wmma::matrix_a, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  using FB = wmma::fragment<wmma::matrix_b, 16, 16, 8, wmma::precision::tf32, wmma::row_major>;
  template <typename F>
  __device__ __forceinline__ static void to_tf32(F& big, F& small, bool x3) {
    if (x3) {
      split_tf32(big, small);
    } else {
#pragma unroll
      for (int i = 0; i < big.num_elements; ++i) big.x[i] = wmma::__float_to_tf32(big.x[i]);
    }
  }
  __device__ __forceinline__ static void prod(Acc& c, const FA& ab, const FA& as, const FB& bb, const FB& bs, bool x3) {
    if (x3) {
      mma_3xtf32(c, ab, as, bb, bs);
    } else {
      wmma::mma_sync(c, ab, bb, c);
    }
  }
  template <typename Cfg, int FFM = Cfg::FFM, int FFN = Cfg::FFN>
  __device__ __forceinline__ static void run(const float* Ew, const float* Ek, const float* Ekv, int wr0, int wc0,
                                             bool x3, Acc (&d)[FFM][FFN], Acc (&n)[FFM][FFN]) {
    FA ab[FFM], as[FFM];
    FB bb, bs;
#pragma unroll 2
    for (int kk = 0; kk < FBK; kk += 8) {
#pragma unroll
      for (int i = 0; i < FFM; ++i) {
        wmma::load_matrix_sync(ab[i], Ew + (wr0 + 16 * i) * Cfg::LDA + kk, Cfg::LDA);
        to_tf32(ab[i], as[i], x3);
      }
#pragma unroll
      for (int jj = 0; jj < FFN; ++jj) {
        wmma::load_matrix_sync(bb, Ek + kk * Cfg::LDB + wc0 + jj * 16, Cfg::LDB);
        to_tf32(bb, bs, x3);
#pragma unroll
        for (int i = 0; i < FFM; ++i) prod(d[i][jj], ab[i], as[i], bb, bs, x3);
        wmma::load_matrix_sync(bb, Ekv + kk * Cfg::LDB + wc0 + jj * 16, Cfg::LDB);
        to_tf32(bb, bs, x3);
#pragma unroll
        for (int i = 0; i < FFM; ++i) prod(n[i][jj], ab[i], as[i], bb, bs, x3);
      }
    }
  }
};
#endif  // AFT_FULL_TC_ARCH

// Rare path of the tensor-core kernel, kept out of line so the unrolled epilogue stays small. Returns (z, lse)
// by value (output references would put the caller's variables on the stack).
template <typename E, typename WE, bool LOWRANK>
__device__ __noinline__ float2 fallback_element(gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                                                gptr<const WE> __restrict__ w, gptr<const WE> __restrict__ u,
                                                gptr<const WE> __restrict__ vbias, int64_t T, int64_t D, int64_t h,
                                                int64_t t, int64_t cb, int64_t rank, bool causal) {
  const WRow<WE, LOWRANK> wg{head_bias<WE, LOWRANK>(w, u, vbias, h, T, rank), t};
  float z, l;
  exact_element<E, float>(wg, k + cb, v + cb, D, causal ? t + 1 : T, z, l);
  return make_float2(z, l);
}

// Tensor-core operand precision per input type: bf16 operands only for bf16 inputs; fp16 inputs take the (3x)TF32
// path like fp32 (a bf16 operand has 8 mantissa bits, fewer than fp16's 11: the low-precision 2x rule fails; fp16
// operands are never used for exponentials, docs/design.md §2.5).
template <typename E>
__host__ __device__ constexpr bool uses_tf32_operands() {
  return !std::is_same<E, __nv_bfloat16>::value;
}

// ---- prepasses of the tensor-core forward: the fixed references r, m and the operands Ek, Ekv (workspace, FwdWs)
// r[h][t] = max of w[h, t, :] over the keys visible to t and m[h][j] = max_t k of column j = (b, c): then
// Ew = exp(w - r) <= 1 and Ek = exp(k - m) <= 1 for every visible (t, t'), so the main kernel needs no running
// rescale. fmaxf skips NaN (it then propagates through Ew or Ek); -inf only where every entry is -inf (masked).

// m[h][j], j = b dh + c: one thread per column of every head.
template <typename E>
__global__ void fwd_colmax_kernel(gptr<const E> __restrict__ k, gptr<float> __restrict__ m, int64_t B, int64_t T,
                                  int64_t D, int64_t dh) {
  const int64_t ncols = B * dh;
  AF_GRID_STRIDE(i, (D / dh) * ncols) {
    const int64_t cb = column_offset(i % ncols, ncols, dh, T, D, i / ncols);
    float mx = -INFINITY;
    for (int64_t t = 0; t < T; ++t) mx = fmaxf(mx, static_cast<float>(to_acc(k[cb + t * D])));
    m[i] = mx;
  }
}

// ek[h][t][j] = exp(k - m[h][j]) (0 for a masked key), ekv = ek * v, in the operand type: the B operands of the
// main kernel in the head-major layout where a column block is contiguous. A thread takes kExpKvSteps time steps of
// one column, so m is read once per strip, not once per element (adjacent threads: adjacent columns, coalesced).
constexpr int kExpKvSteps = 16;
template <typename E, typename Op>
__global__ void fwd_expkv_kernel(gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                                 gptr<const float> __restrict__ m, gptr<Op> __restrict__ ek, gptr<Op> __restrict__ ekv,
                                 int64_t B, int64_t T, int64_t D, int64_t dh) {
  const int64_t ncols = B * dh, nstrips = (T + kExpKvSteps - 1) / kExpKvSteps;
  AF_GRID_STRIDE(i, (D / dh) * nstrips * ncols) {  // i = (h nstrips + strip) ncols + j
    const int64_t j = i % ncols, strip = (i / ncols) % nstrips, h = i / (ncols * nstrips);
    const int64_t cb = column_offset(j, ncols, dh, T, D, h);
    const float mj = m[h * ncols + j];
    const int64_t ta = strip * kExpKvSteps, tb = ta + kExpKvSteps < T ? ta + kExpKvSteps : T;
    for (int64_t t = ta; t < tb; ++t) {
      const int64_t src = cb + t * D, o = (h * T + t) * ncols + j;
      const float kk = to_acc(k[src]);
      // ekv from the rounded ek: num and den then weigh every key alike (one rounding between them, not two)
      const Op e = from_acc<Op>((kk == -INFINITY) ? 0.f : exp2f((kk - mj) * kLog2e));
      ek[o] = e;
      store_val(ekv + o, to_acc(e) * static_cast<float>(to_acc(v[src])));
    }
  }
}

// r[h][t]: CTA = 64 query rows of head h, the w strips of the main kernel (a low-rank bias builds its tiles once
// here instead of once per column block there).
template <typename WE, bool LOWRANK>
__global__ void __launch_bounds__(NT)
    fwd_rowmax_kernel(gptr<const WE> __restrict__ w, gptr<const WE> __restrict__ u, gptr<const WE> __restrict__ vbias,
                      gptr<float> __restrict__ r, int64_t T, int64_t rank, bool causal) {
  ATTNFREE_DYNAMIC_SHARED(unsigned char, smem, 128);  // low rank: Us[64][LDR], Vs[64][LDR]
  float* Us = reinterpret_cast<float*>(smem);
  float* Vs = Us + 64 * LDR;
  const int64_t h = blockIdx.z, t0 = static_cast<int64_t>(blockIdx.x) * 64;
  const int wrow = threadIdx.x >> 2, wpart = threadIdx.x & 3;
  const WSrc<WE, LOWRANK> src = head_bias<WE, LOWRANK>(w, u, vbias, h, T, rank);
  const int64_t t = t0 + wrow;
  const int64_t kend = causal ? (t0 + 64 < T ? t0 + 64 : T) : T;
  float mx = -INFINITY;
  for (int64_t k0 = 0; k0 < kend; k0 += 64) {
    float wv[16];
    bias_strip(src, t0, k0, wrow, wpart, causal, Us, Vs, wv);
#pragma unroll
    for (int i = 0; i < 16; ++i)
      if (key_visible(t, k0 + wpart * 16 + i, T, causal)) mx = fmaxf(mx, wv[i]);
  }
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
  mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
  if (wpart == 0 && t < T) r[h * T + t] = mx;
}

// ew_row[16 part + i] = exp(w - r) for the keys of the strip visible to row t, 0 elsewhere (-inf in w: masked key).
template <typename Op>
__device__ __forceinline__ void exp_w_ref(const float (&wv)[16], int64_t t, int64_t k0, int part, int64_t T,
                                          bool causal, float r, Op* ew_row) {
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const bool vis = key_visible(t, k0 + part * 16 + i, T, causal) && wv[i] != -INFINITY;
    store_val(&ew_row[part * 16 + i], vis ? exp2f((wv[i] - r) * kLog2e) : 0.f);
  }
}

// E: q/k/v type; WE: w type (or u/vb type when LOWRANK); Op: the operand type (TcCfg). ek, ekv, rref, mref: the
// prepasses' results. x3: 3xTF32 for fp32 operands (else plain TF32).
template <typename E, typename WE, bool LOWRANK>
__global__ void __launch_bounds__(NT, LOWRANK ? AFT_FULL_MIN_BLOCKS : AFT_FULL_FWD_MIN_BLOCKS)
    fwd_tc_kernel(gptr<const E> __restrict__ q, gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                  gptr<const WE> __restrict__ w, gptr<const WE> __restrict__ u, gptr<const WE> __restrict__ vbias,
                  gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ ek,
                  gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ ekv,
                  gptr<const float> __restrict__ rref, gptr<const float> __restrict__ mref, gptr<E> __restrict__ y,
                  gptr<float> __restrict__ lse, int64_t B, int64_t T, int64_t D, int64_t dh, int64_t rank, bool causal,
                  bool x3, int ldu) {
#if AFT_FULL_TC_ARCH
  constexpr bool F32OPS = uses_tf32_operands<E>();
  using Cfg = FwdCfg<F32OPS, LOWRANK>;
  using Op = typename Cfg::Op;
  using Mma = FwdMma<F32OPS>;
  constexpr int FBM = Cfg::FBM, FBN = Cfg::FBN, FFM = Cfg::FFM, FFN = Cfg::FFN;
  ATTNFREE_DYNAMIC_SHARED(unsigned char, smem, 128);
  Op* Ew = reinterpret_cast<Op*>(smem);
  Op* Ek = reinterpret_cast<Op*>(smem + Cfg::kEwBytes);  // buffer b: Ek + 2 b kEk, Ekv = Ek + kEk
  float* r_s = reinterpret_cast<float*>(smem + Cfg::kR);
  float* m_s = reinterpret_cast<float*>(smem + Cfg::kM);
  float* Us = reinterpret_cast<float*>(smem + Cfg::kUs);
  float* Vs = reinterpret_cast<float*>(smem + Cfg::kVs);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t h = blockIdx.z;
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * FBM;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * FBN;
  const int64_t ncols = B * dh;
  if (tid < FBM) r_s[tid] = (t0 + tid < T) ? rref[h * T + t0 + tid] : -INFINITY;
  if (tid < FBN) m_s[tid] = (j0 + tid < ncols) ? mref[h * ncols + j0 + tid] : -INFINITY;

  const int wr0 = (warp / FWN) * 16 * FFM, wc0 = (warp % FWN) * 16 * FFN;
  typename Mma::Acc dacc[FFM][FFN], nacc[FFM][FFN];
#pragma unroll
  for (int i = 0; i < FFM; ++i)
#pragma unroll
    for (int jj = 0; jj < FFN; ++jj) {
      wmma::fill_fragment(dacc[i][jj], 0.f);
      wmma::fill_fragment(nacc[i][jj], 0.f);
    }

  const WSrc<WE, LOWRANK> src = head_bias<WE, LOWRANK>(w, u, vbias, h, T, rank);
  const int64_t kend = causal ? (t0 + FBM < T ? t0 + FBM : T) : T;  // causal: keys up to the last query row
  const int wrow = tid >> 2, wpart = tid & 3;                       // w-strip roles: row, keys 16 wpart .. + 16
  gptr<const Op> ekh = ek + h * T * ncols;
  gptr<const Op> ekvh = ekv + h * T * ncols;
  // Dense bias with 16-byte aligned operand rows: the Ek, Ekv tiles of key tile k0 + FBK are copied (cp.async) while
  // the Ew tile of k0 is built; otherwise they are loaded after it (one buffer).
  constexpr int CW = 16 / sizeof(Op), kEk = FBK * Cfg::LDB;  // operands per 16-byte chunk; elements per tile
  const bool async_tiles = Cfg::kEkBufs == 2 && ncols % CW == 0;
  auto issue_tiles = [&](int64_t kt, Op* dst) {  // Ek, Ekv of key tile kt into dst, dst + kEk (0 past T / ncols)
#pragma unroll 2
    for (int c = tid; c < 2 * FBK * FBN / CW; c += NT) {
      const int arr = c / (FBK * FBN / CW), e = c % (FBK * FBN / CW);
      const int key = e / (FBN / CW), col = (e % (FBN / CW)) * CW;
      const int64_t tk = kt + key, j = j0 + col;
      const bool ok = tk < T && j < ncols;  // ncols % CW == 0: a chunk is wholly inside or outside
      async_copy16(dst + arr * kEk + key * Cfg::LDB + col, (arr ? ekvh : ekh) + (ok ? tk * ncols + j : 0), ok);
    }
    async_commit();
  };
  if (async_tiles) issue_tiles(0, Ek);
  int buf = 0;
  if constexpr (LOWRANK) {
    if (ldu > 0) {  // resident factors: the CTA's rows of u, once
      for (int64_t e = tid; e < FBM * rank; e += NT) {
        const int64_t rr = e / rank, c = e % rank;
        Us[rr * ldu + c] = (t0 + rr < T) ? static_cast<float>(to_acc(src.u[(t0 + rr) * rank + c])) : 0.f;
      }
    }
  }
  __syncthreads();

  for (int64_t k0 = 0; k0 < kend; k0 += FBK) {
    Op* Ekb = Ek + 2 * buf * kEk;
    Op* Ekvb = Ekb + kEk;
    // the next key tile's operands into the other buffer (read by the previous step's MMA, behind its barrier)
    if (async_tiles) {
      if (k0 + FBK < kend) {
        issue_tiles(k0 + FBK, Ek + 2 * (buf ^ 1) * kEk);
      } else {
        async_commit();  // an empty group: the wait below then always leaves one group in flight
      }
    }
    // (1) Ew = exp(w - r) over the visible keys, FBM / 64 strips of 64 rows
    bool resident = false;
    if constexpr (LOWRANK) resident = ldu > 0;
    if (resident) {  // low rank, factors resident: this key tile of vb, then both strips from shared memory
      float* Vt = Us + FBM * ldu;
      for (int64_t e = tid; e < 64 * rank; e += NT) {
        const int64_t kk = e / rank, c = e % rank;
        Vt[kk * ldu + c] = (k0 + kk < T) ? static_cast<float>(to_acc(src.vb[(k0 + kk) * rank + c])) : 0.f;
      }
      __syncthreads();
#pragma unroll 1
      for (int p = 0; p < FBM / 64; ++p) {
        const int row = p * 64 + wrow;
        float wv[16];
#pragma unroll
        for (int i = 0; i < 16; ++i) wv[i] = 0.f;
        const float* ur = Us + row * ldu;
        const float* vr = Vt + wpart * 16 * ldu;
        // the same fmaf order over the ranks as lowrank_tile (the prepass's row maxima bound these values exactly)
#pragma unroll 1
        for (int r = 0; r < ldu - 1; ++r) {  // ldu - 1 = rank
          const float uu = ur[r];
#pragma unroll
          for (int i = 0; i < 16; ++i) wv[i] = fmaf(uu, vr[i * ldu + r], wv[i]);
        }
        exp_w_ref(wv, t0 + row, k0, wpart, T, causal, r_s[row], Ew + row * Cfg::LDA);
      }
    } else {
#pragma unroll 1
      for (int p = 0; p < FBM / 64; ++p) {
        const int row = p * 64 + wrow;
        float wv[16];
        bias_strip(src, t0 + p * 64, k0, wrow, wpart, causal, Us, Vs, wv);
        exp_w_ref(wv, t0 + row, k0, wpart, T, causal, r_s[row], Ew + row * Cfg::LDA);
      }
    }
    // (2) the Ek, Ekv tiles (0 past the last key / column): this step's copies complete, or loaded now
    if (async_tiles) {
      async_wait<1>();
    } else {
#pragma unroll 4
      for (int e = tid; e < FBK * FBN; e += NT) {
        const int key = e / FBN, col = e % FBN;
        const int64_t tk = k0 + key, j = j0 + col;
        const bool ok = tk < T && j < ncols;
        store_val(&Ekb[key * Cfg::LDB + col], ok ? to_acc(ekh[tk * ncols + j]) : 0.f);
        store_val(&Ekvb[key * Cfg::LDB + col], ok ? to_acc(ekvh[tk * ncols + j]) : 0.f);
      }
    }
    __syncthreads();
    // (3) den += Ew Ek, num += Ew Ekv
    Mma::template run<Cfg>(Ew, Ekb, Ekvb, wr0, wc0, x3, dacc, nacc);
    __syncthreads();  // before the next tile (or the epilogue's scratch) overwrites the operands
    if (async_tiles) buf ^= 1;
  }
  if (async_tiles) async_wait<0>();  // the trailing empty group

  // ---------------- epilogue: per fragment pair through a per-warp scratch (aliases the dead operands)
  float* sc = reinterpret_cast<float*>(smem) + warp * 512;
#pragma unroll
  for (int fm = 0; fm < FFM; ++fm) {
#pragma unroll
    for (int fn = 0; fn < FFN; ++fn) {
      wmma::store_matrix_sync(sc, dacc[fm][fn], 16, wmma::mem_row_major);
      wmma::store_matrix_sync(sc + 256, nacc[fm][fn], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll 1
      for (int e = lane; e < 256; e += 32) {
        const int row = wr0 + 16 * fm + e / 16, col = wc0 + 16 * fn + e % 16;
        const int64_t t = t0 + row, j = j0 + col;
        if (t < T && j < ncols) {
          const int64_t cb = column_offset(j, ncols, dh, T, D, h), o = cb + t * D;
          const float den = sc[e], nvis = static_cast<float>(causal ? t + 1 : T);
          float z, l;
          if (!(den < nvis * kLostRel) &&
              (F32OPS || LOWRANK || !causal || nvis >= kFewKeys)) {  // NaN takes this branch
            z = sc[256 + e] / den;
            l = static_cast<float>(static_cast<double>(r_s[row]) + static_cast<double>(m_s[col]) +
                                   static_cast<double>(log2f(den)) * kLn2d);
          } else {  // rare: terms lost to underflow may matter (or nothing is visible): exact recompute
            const float2 zl = fallback_element<E, WE, LOWRANK>(k, v, w, u, vbias, T, D, h, t, cb, rank, causal);
            z = zl.x;
            l = zl.y;
          }
          y[o] = from_acc<E>(af_sigmoid(to_acc(q[o])) * z);
          lse[o] = l;
        }
      }
      __syncwarp();  // before the next fragment pair overwrites the scratch
    }
  }
#else
  __trap();  // sm < 80: the launchers never select this kernel there (aft_full_tc_supported)
#endif
}

// ------------------------------------------------------------------------------------------ backward (SIMT)
template <typename E>
__global__ void bwd_dq_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q, gptr<const E> __restrict__ y,
                              gptr<E> __restrict__ dq, int64_t n) {
  using A = acc_of_t<E>;
  AF_GRID_STRIDE(i, n) {
    const A s = af_sigmoid(to_acc(q[i]));
    dq[i] = from_acc<E>(to_acc(dy[i]) * to_acc(y[i]) * (A(1) - s));
  }
}

// one thread per (b, t', c): dv = sum_t P G, dk = v dv - sum_t P H
template <typename E, typename WE, bool LOWRANK>
__global__ void bwd_dkdv_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q,
                                gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                                gptr<const WE> __restrict__ w, gptr<const WE> __restrict__ u,
                                gptr<const WE> __restrict__ vbias, gptr<const E> __restrict__ y,
                                gptr<const acc_of_t<E>> __restrict__ lse, gptr<E> __restrict__ dk,
                                gptr<E> __restrict__ dv, int64_t B, int64_t T, int64_t D, int64_t dh, int64_t rank,
                                bool causal) {
  using A = acc_of_t<E>;
  AF_GRID_STRIDE(idx, B * T * D) {
    const ElementIdx e(idx, T, D, dh);  // e.t is the key position t'
    const int64_t tp = e.t, base = e.base;
    const A kk = to_acc(k[idx]);
    const WSrc<WE, LOWRANK> src = head_bias<WE, LOWRANK>(w, u, vbias, e.h, T, rank);
    A sg = 0, sh = 0;
    for (int64_t t = causal ? tp : 0; t < T; ++t) {
      const int64_t o = base + t * D;
      const A P = p_of(static_cast<A>(src.at(t, tp)) + kk, lse[o]);
      const A d = to_acc(dy[o]);
      sg += P * d * af_sigmoid(to_acc(q[o]));
      sh += P * d * static_cast<A>(to_acc(y[o]));
    }
    dv[idx] = from_acc<E>(sg);
    dk[idx] = from_acc<E>(static_cast<A>(to_acc(v[idx])) * sg - sh);
  }
}

// Low-rank factor gradients without dw: one warp per (h, s). DVB false: s = t, du[t] = sum_{t'} dw[t, t'] vb[t'];
// DVB true: s = t', dvb[t'] = sum_t dw[t, t'] u[t]; dw[t, t'] = sum_{b, c in h} P (G v[t'] - H) by warp reduction,
// never stored. Each warp owns its row of the accumulate-type result (lanes r = lane, lane + 32, ...).
template <typename E, typename UE, bool DVB>
__global__ void bwd_factor_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q,
                                  gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                                  gptr<const UE> __restrict__ u, gptr<const UE> __restrict__ vbias,
                                  gptr<const E> __restrict__ y, gptr<const acc_of_t<E>> __restrict__ lse,
                                  gptr<acc_of_t<E>> __restrict__ out, int64_t B, int64_t T, int64_t D, int64_t dh,
                                  int64_t heads, int64_t rank, bool causal) {
  using A = acc_of_t<E>;
  const int lane = threadIdx.x & 31;
  AF_WARP_STRIDE(gw, heads * T) {  // every lane of a warp takes the same gw: the shuffles stay converged
    const int64_t s = gw % T, h = gw / T;
    const WSrc<UE, true> src = head_bias<UE, true>(nullptr, u, vbias, h, T, rank);
    gptr<const UE> other = DVB ? src.u : src.vb;  // the factor dw is multiplied with
    gptr<A> orow = out + gw * rank;
    for (int64_t r = lane; r < rank; r += 32) orow[r] = A(0);
    const int64_t n0 = (DVB && causal) ? s : 0, n1 = (!DVB && causal) ? s + 1 : T;
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t t = DVB ? n : s, tp = DVB ? s : n;
      const A wv = static_cast<A>(src.at(t, tp));
      A acc = 0;
      for (int64_t j = lane; j < B * dh; j += 32) {
        const int64_t base = (j / dh) * T * D + h * dh + (j % dh);
        const int64_t o = base + t * D, op = base + tp * D;
        const A P = p_of(wv + static_cast<A>(to_acc(k[op])), lse[o]);
        const A d = to_acc(dy[o]);
        acc += P * (d * af_sigmoid(to_acc(q[o])) * static_cast<A>(to_acc(v[op])) - d * static_cast<A>(to_acc(y[o])));
      }
#pragma unroll
      for (int sh = 16; sh > 0; sh >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, sh);
      for (int64_t r = lane; r < rank; r += 32) orow[r] += acc * static_cast<A>(to_acc(other[n * rank + r]));
    }
  }
}

// Elementwise dtype conversion (16-bit factors to fp32, accumulate-type factor gradients to the factors' dtype).
template <typename S, typename Dt>
__global__ void convert_kernel(gptr<const S> __restrict__ src, gptr<Dt> __restrict__ dst, int64_t n) {
  AF_GRID_STRIDE(i, n) { dst[i] = from_acc<Dt>(to_acc(src[i])); }
}

// one warp per (h, t, t'): dw = sum_{b, c in h} P (G v[t'] - H)
template <typename E, typename WE>
__global__ void bwd_dw_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q, gptr<const E> __restrict__ k,
                              gptr<const E> __restrict__ v, gptr<const WE> __restrict__ w, gptr<const E> __restrict__ y,
                              gptr<const acc_of_t<E>> __restrict__ lse, gptr<WE> __restrict__ dw, int64_t B, int64_t T,
                              int64_t D, int64_t dh, int64_t heads, bool causal) {
  using A = acc_of_t<E>;
  const int lane = threadIdx.x & 31;
  AF_WARP_STRIDE(gw, heads * T * T) {  // every lane of a warp takes the same gw: the shuffles stay converged
    const int64_t tp = gw % T;
    const int64_t t = (gw / T) % T;
    const int64_t h = gw / (T * T);
    A acc = 0;
    if (!causal || tp <= t) {
      const A wv = to_acc(w[gw]);
      for (int64_t j = lane; j < B * dh; j += 32) {
        const int64_t base = (j / dh) * T * D + h * dh + (j % dh);
        const int64_t o = base + t * D, op = base + tp * D;
        const A P = p_of(wv + static_cast<A>(to_acc(k[op])), lse[o]);
        const A d = to_acc(dy[o]);
        const A G = d * af_sigmoid(to_acc(q[o]));
        const A H = d * static_cast<A>(to_acc(y[o]));
        acc += P * (G * static_cast<A>(to_acc(v[op])) - H);
      }
#pragma unroll
      for (int s = 16; s > 0; s >>= 1) acc += __shfl_xor_sync(0xffffffffu, acc, s);
    }
    if (lane == 0) dw[gw] = from_acc<WE>(acc);
  }
}

// ------------------------------------------------------------------------------------------ backward (tensor cores)
// Generic warp-level strip product: acc[jj] (16 x 16) += A[r0 .. r0+16, 0 .. K) @ B[0 .. K, c0 + 16 jj ..), jj < 2.
// LA/LB: wmma::row_major or wmma::col_major (element (i, k) of a col_major A lives at A[k * lda + i]).
#if AFT_FULL_TC_ARCH
template <bool F32OPS, typename LA, typename LB>
struct WarpMma {
  static constexpr int KS = F32OPS ? 8 : 16;
  using Op = typename TcCfg<F32OPS>::Op;
  using Prec = typename std::conditional<F32OPS, wmma::precision::tf32, __nv_bfloat16>::type;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, KS, float>;
  using FA = wmma::fragment<wmma::matrix_a, 16, 16, KS, Prec, LA>;
  using FB = wmma::fragment<wmma::matrix_b, 16, 16, KS, Prec, LB>;
  __device__ __forceinline__ static void run(const Op* A, int lda, const Op* Bm, int ldb, int r0, int c0, int K,
                                             Acc (&acc)[2]) {
    constexpr bool a_row = std::is_same<LA, wmma::row_major>::value;
    constexpr bool b_row = std::is_same<LB, wmma::row_major>::value;
    FA a, as;
    FB b, bs;
#pragma unroll 2
    for (int kk = 0; kk < K; kk += KS) {
      wmma::load_matrix_sync(a, a_row ? A + r0 * lda + kk : A + kk * lda + r0, lda);
      if constexpr (F32OPS) split_tf32(a, as);
#pragma unroll
      for (int jj = 0; jj < 2; ++jj) {
        const int c = c0 + jj * 16;
        wmma::load_matrix_sync(b, b_row ? Bm + kk * ldb + c : Bm + c * ldb + kk, ldb);
        if constexpr (F32OPS) {
          split_tf32(b, bs);
          mma_3xtf32(acc[jj], a, as, b, bs);
        } else {
          wmma::mma_sync(acc[jj], a, b, acc[jj]);
        }
      }
    }
  }
};
#endif  // AFT_FULL_TC_ARCH

constexpr float kBwdMaxScale2 = 60.0f;  // log2 units: beyond this the factorised scale is not trusted -> exact path

template <bool F32OPS>
struct BwdCfg {
  using Op = typename TcCfg<F32OPS>::Op;
  static constexpr int LD = F32OPS ? 64 + 4 : 64 + 8;  // every operand tile is [64][LD]
  static constexpr size_t kTile = size_t(64) * LD * sizeof(Op);
  static constexpr size_t kOps4 = 4 * kTile;
  static constexpr size_t kStage = 2 * size_t(64) * LDS * sizeof(float);
  static constexpr size_t kUnion = ((kOps4 > kStage ? kOps4 : kStage) + 127) / 128 * 128;
  static constexpr size_t kVec0 = kUnion;                        // float [64]
  static constexpr size_t kVec1 = kVec0 + 64 * sizeof(float);    // float [64]
  static constexpr size_t kRed = kVec1 + 64 * sizeof(float);     // float [4][64]
  static constexpr size_t kCol = kRed + 4 * 64 * sizeof(float);  // int64 [64]
  static constexpr size_t kBytes = (kCol + 64 * sizeof(int64_t) + 127) / 128 * 128;
  static constexpr size_t kUs = kBytes;                                  // float Us[64][LDR] (low rank)
  static constexpr size_t kVs = kUs + size_t(64) * LDR * sizeof(float);  // float Vs[64][LDR]
  static constexpr size_t kLowRankBytes = kVs + size_t(64) * LDR * sizeof(float);
};

// Exact (per-element) partial sums for the rare path of the dk/dv kernel: (sum P G, sum P H) over query rows
// [ta, tb) for key tk (returned by value: output references would put the caller's accumulators on the stack).
template <typename E, typename WE>
__device__ __noinline__ float2 bwd_kv_exact(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q,
                                            gptr<const E> __restrict__ y, gptr<const float> __restrict__ lse,
                                            gptr<const WE> __restrict__ u, gptr<const WE> __restrict__ vbias, int64_t h,
                                            int64_t rank, int64_t tk, float kk, int64_t cb, int64_t T, int64_t D,
                                            int64_t ta, int64_t tb) {
  const WSrc<WE, true> src = head_bias<WE, true>(nullptr, u, vbias, h, T, rank);
  float sg = 0.f, sh = 0.f;
  for (int64_t t = ta; t < tb; ++t) {
    const int64_t o = cb + t * D;
    const float P = p_of(static_cast<float>(src.at(t, tk)) + kk, lse[o]);
    const float d = to_acc(dy[o]);
    sg += P * d * af_sigmoid(to_acc(q[o]));
    sh += P * d * to_acc(y[o]);
  }
  return make_float2(sg, sh);
}

// Low-rank dk, dv. CTA: key tile J (64 keys) x 64 columns (b, c) of head h; loops over query tiles I.
// Per I: a[t] = max_{t' in J visible} w, Ew = exp(w - a) (64 x 64, [t][t']); La = a - lse, lam[c] = max_t La,
// R = exp(La - lam); X1 = R G, X2 = R H ([t][c]); g = Ew^T X (keys x columns); contribution = g * exp(k + lam).
template <typename E, typename WE>
__global__ void __launch_bounds__(NT, AFT_FULL_MIN_BLOCKS)
    bwd_kv_tc_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q, gptr<const E> __restrict__ k,
                     gptr<const E> __restrict__ v, gptr<const WE> __restrict__ u, gptr<const WE> __restrict__ vbias,
                     gptr<const E> __restrict__ y, gptr<const float> __restrict__ lse, gptr<E> __restrict__ dk,
                     gptr<E> __restrict__ dv, int64_t B, int64_t T, int64_t D, int64_t dh, int64_t rank, bool causal) {
#if AFT_FULL_TC_ARCH
  constexpr bool F32OPS = uses_tf32_operands<E>();
  using Cfg = BwdCfg<F32OPS>;
  using Op = typename Cfg::Op;
  using Mma = WarpMma<F32OPS, wmma::col_major, wmma::row_major>;
  constexpr int LD = Cfg::LD;
  ATTNFREE_DYNAMIC_SHARED(unsigned char, smem, 128);
  Op* Ew = reinterpret_cast<Op*>(smem);  // [t][t']
  Op* X1 = reinterpret_cast<Op*>(smem + Cfg::kTile);
  Op* X2 = reinterpret_cast<Op*>(smem + 2 * Cfg::kTile);
  float* st1 = reinterpret_cast<float*>(smem);
  float* st2 = st1 + 64 * LDS;
  float* a_s = reinterpret_cast<float*>(smem + Cfg::kVec0);
  float* lam_s = reinterpret_cast<float*>(smem + Cfg::kVec1);
  float* red = reinterpret_cast<float*>(smem + Cfg::kRed);
  int64_t* colbase = reinterpret_cast<int64_t*>(smem + Cfg::kCol);
  float* Us = reinterpret_cast<float*>(smem + Cfg::kUs);
  float* Vs = reinterpret_cast<float*>(smem + Cfg::kVs);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t h = blockIdx.z;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * 64;
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * 64;
  if (tid < 64) colbase[tid] = column_offset(j0 + tid, B * dh, dh, T, D, h);
  __syncthreads();
  const WSrc<WE, true> src = head_bias<WE, true>(nullptr, u, vbias, h, T, rank);
  // outputs owned: keys k0 + wr0 + i (i < 16), column wc0 + lane
  const int wr0 = (warp >> 1) * 16, wc0 = (warp & 1) * 32;
  const int64_t cbo = colbase[wc0 + lane];
  float kreg[16], sg[16], sh[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t tk = k0 + wr0 + i;
    kreg[i] = (cbo >= 0 && tk < T) ? to_acc(k[cbo + tk * D]) : 0.f;
    sg[i] = 0.f;
    sh[i] = 0.f;
  }
  const int wrow = tid >> 2, wpart = tid & 3;  // w-tile roles
  const int xcol = tid & 63, xg = tid >> 6;    // X roles: column, rows xg*16 .. +16
  const int64_t xcb = colbase[xcol];
  const int64_t it0 = causal ? k0 / 64 : 0;  // BM == BK: query tiles before the key tile see none of it
  const int64_t nit = (T + 63) / 64;
  for (int64_t it = it0; it < nit; ++it) {
    const int64_t t0 = it * 64;
    // (1) w tile, row max over visible keys
    const int64_t trow = t0 + wrow;
    float wv[16];
    bias_strip(src, t0, k0, wrow, wpart, causal, Us, Vs, wv);
    const float amax = exp_w_strip(wv, trow, k0, wpart, T, causal, Ew + wrow * LD);
    if (wpart == 0) a_s[wrow] = amax;
    __syncthreads();
    // (2) La = a - lse, lam = column max, X = exp(La - lam) [G | H]
    float la[16], gg[16], hh[16];
    float lmax = -INFINITY;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int r = xg * 16 + i;
      const int64_t t = t0 + r;
      const float a = a_s[r];
      la[i] = -INFINITY;
      gg[i] = 0.f;
      hh[i] = 0.f;
      const int64_t o = xcb + t * D;
      // rows with no visible finite w in the tile, or no finite logit at all (lse = -inf), contribute 0
      if (xcb >= 0 && t < T && a > -INFINITY && lse[o] != -INFINITY) {
        const float d = to_acc(dy[o]);
        la[i] = a - lse[o];
        gg[i] = d * af_sigmoid(to_acc(q[o]));
        hh[i] = d * to_acc(y[o]);
        lmax = fmaxf(lmax, la[i]);
      }
    }
    red[xg * 64 + xcol] = lmax;
    __syncthreads();
    const float lam = max_of_4(red, xcol);
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      const int r = xg * 16 + i;
      const float R = (la[i] > -INFINITY) ? exp2f((la[i] - lam) * kLog2e) : 0.f;
      store_val(&X1[r * LD + xcol], R * gg[i]);
      store_val(&X2[r * LD + xcol], R * hh[i]);
    }
    if (xg == 0) lam_s[xcol] = lam;
    __syncthreads();
    // (3) g = Ew^T X  (keys x columns)
    typename Mma::Acc a1[2], a2[2];
    zero_strip(a1);
    zero_strip(a2);
    Mma::run(Ew, LD, X1, LD, wr0, wc0, 64, a1);
    Mma::run(Ew, LD, X2, LD, wr0, wc0, 64, a2);
    __syncthreads();
    store_strip(st1, a1, wr0, wc0);
    store_strip(st2, a2, wr0, wc0);
    __syncwarp();
    // (4) scale by exp(k + lam); exact rare path where that scale is too large to trust the underflow bound
    const float lamc = lam_s[wc0 + lane];
    if (cbo >= 0 && lamc > -INFINITY) {
#pragma unroll
      for (int i = 0; i < 16; ++i) {
        const int64_t tk = k0 + wr0 + i;
        if (tk < T) {
          const float s2 = (kreg[i] + lamc) * kLog2e;
          if (s2 <= kBwdMaxScale2) {
            const float sc = exp2f(s2);
            sg[i] = fmaf(st1[(wr0 + i) * LDS + wc0 + lane], sc, sg[i]);
            sh[i] = fmaf(st2[(wr0 + i) * LDS + wc0 + lane], sc, sh[i]);
          } else {
            const int64_t tb = (t0 + 64 < T) ? t0 + 64 : T;
            const int64_t ta = (causal && tk > t0) ? tk : t0;
            const float2 e = bwd_kv_exact<E, WE>(dy, q, y, lse, u, vbias, h, rank, tk, kreg[i], cbo, T, D, ta, tb);
            sg[i] += e.x;
            sh[i] += e.y;
          }
        }
      }
    }
    __syncthreads();
  }
  if (cbo < 0) return;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    const int64_t tk = k0 + wr0 + i;
    if (tk < T) {
      const int64_t o = cbo + tk * D;
      dv[o] = from_acc<E>(sg[i]);
      dk[o] = from_acc<E>(to_acc(v[o]) * sg[i] - sh[i]);
    }
  }
#else
  __trap();  // sm < 80: the launchers never select this kernel there (aft_full_tc_supported)
#endif
}

// Exact rare path of the dw kernel: sum over the chunk's columns of P (G v - H) for one (t, t').
template <typename E>
__device__ __noinline__ float bwd_w_exact(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q,
                                          gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                                          gptr<const E> __restrict__ y, gptr<const float> __restrict__ lse,
                                          const int64_t* colbase, float wv, int64_t t, int64_t tp, int64_t D) {
  float s = 0.f;
  for (int c = 0; c < 64; ++c) {
    const int64_t cb = colbase[c];
    if (cb < 0) continue;
    const int64_t o = cb + t * D, op = cb + tp * D;
    const float P = p_of(wv + static_cast<float>(to_acc(k[op])), lse[o]);
    const float d = to_acc(dy[o]);
    s += P * (d * af_sigmoid(to_acc(q[o])) * to_acc(v[op]) - d * to_acc(y[o]));
  }
  return s;
}

// What the low-rank dw kernel does with a finished tile g = dw[I, J] of head h (w = u vb^T built tile by tile: the
// dw tile never leaves the chip):
//   DU:  CTA (-, I) loops over the key tiles J and accumulates du[I] += dw[I, J] vb[J];
//   DVb: CTA (J, -) loops over the query tiles I and accumulates dvb[J] += dw[I, J]^T u[I].
// Each CTA owns its rows of the fp32 accumulator and adds the tiles in a fixed order: no atomics, deterministic.
// The two passes recompute dw once each. (DU and DVb share one instantiation: the mode is a kernel argument.)
enum class DwMode : int { DU, DVb };

// Low-rank dw. CTA as above; per tile pair (I, J), loops over chunks of 64 columns (b, c) of the head.
// Per chunk: mu[c] = max_{t' in J} k, Y = exp(k - mu); Xl = mu - lse, nu[t] = max_c Xl, Xt = exp(Xl - nu);
// g = (Xt G) (Y v)^T - (Xt H) Y^T (rows x keys); dw += g * exp(w + nu).
template <typename E, typename WE>
__global__ void __launch_bounds__(NT, AFT_FULL_MIN_BLOCKS)
    bwd_w_tc_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q, gptr<const E> __restrict__ k,
                    gptr<const E> __restrict__ v, gptr<const WE> __restrict__ u, gptr<const WE> __restrict__ vbias,
                    gptr<const E> __restrict__ y, gptr<const float> __restrict__ lse, gptr<float> __restrict__ facc,
                    int64_t B, int64_t T, int64_t D, int64_t dh, int64_t rank, bool causal, DwMode mode) {
#if AFT_FULL_TC_ARCH
  constexpr bool F32OPS = uses_tf32_operands<E>();
  using Cfg = BwdCfg<F32OPS>;
  using Op = typename Cfg::Op;
  using Mma = WarpMma<F32OPS, wmma::row_major, wmma::col_major>;
  constexpr int LD = Cfg::LD;
  ATTNFREE_DYNAMIC_SHARED(unsigned char, smem, 128);
  Op* XG = reinterpret_cast<Op*>(smem);                   // [t][c]
  Op* XH = reinterpret_cast<Op*>(smem + Cfg::kTile);      // [t][c], holds -Xt H
  Op* YV = reinterpret_cast<Op*>(smem + 2 * Cfg::kTile);  // [t'][c]
  Op* YY = reinterpret_cast<Op*>(smem + 3 * Cfg::kTile);  // [t'][c]
  float* st = reinterpret_cast<float*>(smem);
  float* mu_s = reinterpret_cast<float*>(smem + Cfg::kVec0);
  float* nu_s = reinterpret_cast<float*>(smem + Cfg::kVec1);
  float* red = reinterpret_cast<float*>(smem + Cfg::kRed);
  int64_t* colbase = reinterpret_cast<int64_t*>(smem + Cfg::kCol);
  float* Us = reinterpret_cast<float*>(smem + Cfg::kUs);
  float* Vs = reinterpret_cast<float*>(smem + Cfg::kVs);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t h = blockIdx.z;
  const WSrc<WE, true> src = head_bias<WE, true>(nullptr, u, vbias, h, T, rank);
  // outputs owned: rows t0 + wr0 + i, key k0 + wc0 + lane
  const int wr0 = (warp >> 1) * 16, wc0 = (warp & 1) * 32;
  const int ycol = tid & 63, yg = tid >> 6;    // Y roles: column, keys yg*16 .. +16
  const int xrow = tid >> 2, xpart = tid & 3;  // X roles: row, columns xpart*16 .. +16
  const int64_t ncols = B * dh;
  const int64_t ntiles = (T + 63) / 64;
  // the tile pairs of this CTA: DU (I fixed) the key tiles J, DVb (J fixed) the query tiles I
  const int64_t fixed = (mode == DwMode::DVb) ? static_cast<int64_t>(blockIdx.x) : static_cast<int64_t>(blockIdx.y);
  const bool du = mode == DwMode::DU;
  const int64_t p0 = (!du && causal) ? fixed : 0;
  const int64_t p1 = (du && causal) ? (fixed * 64 + 63 < T ? fixed * 64 + 63 : T - 1) / 64 + 1 : ntiles;
  for (int64_t p = p0; p < p1; ++p) {
    const int64_t t0 = 64 * (du ? fixed : p);
    const int64_t k0 = 64 * (du ? p : fixed);
    const int64_t tkey = k0 + wc0 + lane;
    float wreg[16], acc[16];
    lowrank_tile<false>(src, t0, k0, wc0 + lane, wr0, Us, Vs, wreg);
#pragma unroll
    for (int i = 0; i < 16; ++i) acc[i] = 0.f;
    for (int64_t j0 = 0; j0 < ncols; j0 += 64) {
      if (tid < 64) colbase[tid] = column_offset(j0 + tid, ncols, dh, T, D, h);
      __syncthreads();
      // (a) Y = exp(k - mu), Y v over the key tile
      {
        const int64_t cb = colbase[ycol];
        const float mu = exp_kv_strip(k, v, cb, k0, yg, ycol, T, D, red, YY, YV, LD);
        if (yg == 0) mu_s[ycol] = (cb >= 0) ? mu : -INFINITY;
        __syncthreads();
      }
      // (b) Xl = mu - lse, nu = row max, Xt = exp(Xl - nu): XG = Xt G, XH = -Xt H
      {
        const int64_t t = t0 + xrow;
        float xl[16], gg[16], hh[16];
        float lmax = -INFINITY;
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const int c = xpart * 16 + i;
          const int64_t cb = colbase[c];
          xl[i] = -INFINITY;
          gg[i] = 0.f;
          hh[i] = 0.f;
          const int64_t o = cb + t * D;
          // columns whose keys in the tile are all masked (mu = -inf) and rows with lse = -inf contribute 0
          if (cb >= 0 && t < T && mu_s[c] > -INFINITY && lse[o] != -INFINITY) {
            const float d = to_acc(dy[o]);
            xl[i] = mu_s[c] - lse[o];
            gg[i] = d * af_sigmoid(to_acc(q[o]));
            hh[i] = d * to_acc(y[o]);
            lmax = fmaxf(lmax, xl[i]);
          }
        }
        lmax = fmaxf(lmax, __shfl_xor_sync(0xffffffffu, lmax, 1));
        lmax = fmaxf(lmax, __shfl_xor_sync(0xffffffffu, lmax, 2));
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const int c = xpart * 16 + i;
          const float X = (xl[i] > -INFINITY) ? exp2f((xl[i] - lmax) * kLog2e) : 0.f;
          store_val(&XG[xrow * LD + c], X * gg[i]);
          store_val(&XH[xrow * LD + c], -X * hh[i]);
        }
        if (xpart == 0) nu_s[xrow] = lmax;
      }
      __syncthreads();
      // (c) g = XG YV^T + XH YY^T  (rows x keys)
      typename Mma::Acc g[2];
      zero_strip(g);
      Mma::run(XG, LD, YV, LD, wr0, wc0, 64, g);
      Mma::run(XH, LD, YY, LD, wr0, wc0, 64, g);
      __syncthreads();
      store_strip(st, g, wr0, wc0);
      __syncwarp();
      // (d) dw += g * exp(w + nu); exact rare path where that scale is too large
      if (tkey < T) {
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const int64_t t = t0 + wr0 + i;
          const float nu = nu_s[wr0 + i];
          if (t < T && nu > -INFINITY && (!causal || tkey <= t)) {
            const float z2 = (wreg[i] + nu) * kLog2e;
            if (z2 <= kBwdMaxScale2) {
              acc[i] = fmaf(st[(wr0 + i) * LDS + wc0 + lane], exp2f(z2), acc[i]);
            } else {
              acc[i] += bwd_w_exact<E>(dy, q, k, v, y, lse, colbase, wreg[i], t, tkey, D);
            }
          }
        }
      }
      __syncthreads();  // before the next chunk overwrites colbase / operands / staging
    }
    // the dw tile (0 outside the visible part: acc was only added to there) through shared memory, then the
    // factor product of this CTA's rows
#pragma unroll
    for (int i = 0; i < 16; ++i) st[(wr0 + i) * LDS + wc0 + lane] = acc[i];
    __syncthreads();
    // the other factor's 64 rows (vb[J] for DU, u[I] for DVb) in chunks of RCH ranks through Vs, read once
    gptr<float> fh = facc + h * T * rank;
    const int64_t own0 = du ? t0 : k0, oth0 = du ? k0 : t0;
    gptr<const WE> fac = du ? src.vb : src.u;
    for (int64_t r0 = 0; r0 < rank; r0 += RCH) {
      for (int e = tid; e < 64 * RCH; e += NT) {
        const int c = e / RCH, cc = e % RCH;
        const int64_t tc = oth0 + c, rk = r0 + cc;
        Vs[c * LDR + cc] = (tc < T && rk < rank) ? static_cast<float>(to_acc(fac[tc * rank + rk])) : 0.f;
      }
      __syncthreads();
      for (int e = tid; e < 64 * RCH; e += NT) {
        const int a = e / RCH, cc = e % RCH;  // a: the owned row (DU) or key (DVb) of the tile
        const int64_t rk = r0 + cc;
        if (own0 + a >= T || rk >= rank) continue;
        float sum = 0.f;
        for (int c = 0; c < 64; ++c) sum = fmaf(du ? st[a * LDS + c] : st[c * LDS + a], Vs[c * LDR + cc], sum);
        fh[(own0 + a) * rank + rk] += sum;
      }
      __syncthreads();  // before the next chunk overwrites Vs
    }
    __syncthreads();  // before the next tile pair overwrites the staging
  }
#else
  __trap();  // sm < 80: the launchers never select this kernel there (aft_full_tc_supported)
#endif
}

// ------------------------------------------------------------------------------------------ host side
inline unsigned blocks_for(int64_t n, int threads) { return static_cast<unsigned>((n + threads - 1) / threads); }

// The tensor-core kernels need sm_80+ (bf16 / tf32 wmma; their bodies trap below, see AFT_FULL_TC_ARCH): older
// devices take the per-element (exact) kernels, as if `exact` were set. A failed query is left to the launch.
inline bool aft_full_tc_supported() {
  int dev = 0, major = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return true;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess) return true;
  return major >= 8;
}

// Workspace of the tensor-core forward (byte offsets): ek, ekv [heads][T][B dh] in the operand type (bf16 for
// bf16 inputs, fp32 otherwise), r [heads][T] and m [heads][B dh] fp32. O(B T D + heads T), never T x T.
struct FwdWs {
  size_t ek, ekv, r, m, total;
};
inline size_t align256(size_t x) { return (x + 255) / 256 * 256; }
inline FwdWs fwd_ws_layout(bool f32ops, int64_t B, int64_t T, int64_t D, int64_t heads) {
  const size_t n = static_cast<size_t>(B * T * D) * (f32ops ? sizeof(float) : sizeof(__nv_bfloat16));
  FwdWs l;
  l.ek = 0;
  l.ekv = align256(n);
  l.r = l.ekv + align256(n);
  l.m = l.r + align256(static_cast<size_t>(heads * T) * sizeof(float));
  l.total = l.m + align256(static_cast<size_t>(B * D) * sizeof(float));
  return l;
}
inline size_t fwd_tc_workspace_bytes(DType dt, int64_t B, int64_t T, int64_t D, int64_t heads, bool exact) {
  if (exact || dt == DType::Float64 || B <= 0 || T <= 0 || D <= 0 || heads <= 0) return 0;
  return fwd_ws_layout(dt != DType::BFloat16, B, T, D, heads).total;
}

// The prepasses (column maxima, Ek / Ekv, row maxima) and the main kernel; ws: fwd_ws_layout's bytes. x3: 3xTF32
// for float32 inputs (fp16 inputs always take it: plain TF32 would not keep their precision).
template <typename E, typename WE, bool LOWRANK>
cudaError_t launch_tc(const void* q, const void* k, const void* v, const void* w, const void* u, const void* vb,
                      void* y, void* lse, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank, bool causal,
                      bool x3, void* ws, cudaStream_t s) {
  constexpr bool F32OPS = uses_tf32_operands<E>();
  using Op = typename TcCfg<F32OPS>::Op;
  if (ws == nullptr) return cudaErrorInvalidValue;
  const int64_t dh = D / heads, ncols = B * dh;
  using Cfg = FwdCfg<F32OPS, LOWRANK>;
  const dim3 grid(blocks_for(ncols, Cfg::FBN), blocks_for(T, Cfg::FBM), static_cast<unsigned>(heads));
  if (grid.y > 65535u || grid.z > 65535u) return cudaErrorInvalidConfiguration;
  const FwdWs l = fwd_ws_layout(F32OPS, B, T, D, heads);
  unsigned char* base = static_cast<unsigned char*>(ws);
  Op* ek = reinterpret_cast<Op*>(base + l.ek);
  Op* ekv = reinterpret_cast<Op*>(base + l.ekv);
  float* r = reinterpret_cast<float*>(base + l.r);
  float* m = reinterpret_cast<float*>(base + l.m);
  const E* ke = static_cast<const E*>(k);
  ATTNFREE_LAUNCH((fwd_colmax_kernel<E>), grid_for(heads * ncols, 256), 256, 0, s)(ke, m, B, T, D, dh);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  ATTNFREE_LAUNCH((fwd_expkv_kernel<E, Op>), grid_for(heads * blocks_for(T, kExpKvSteps) * ncols, 256), 256, 0, s)(
      ke, static_cast<const E*>(v), static_cast<const float*>(m), ek, ekv, B, T, D, dh);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t rsmem = LOWRANK ? 2 * size_t(64) * LDR * sizeof(float) : 0;
  ATTNFREE_LAUNCH((fwd_rowmax_kernel<WE, LOWRANK>), dim3(blocks_for(T, 64), 1, static_cast<unsigned>(heads)), NT, rsmem,
                  s)(static_cast<const WE*>(w), static_cast<const WE*>(u), static_cast<const WE*>(vb), r, T, rank,
                     causal);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // low rank: keep the factors resident in shared memory where they fit next to the operands
  int ldu = 0;
  if (LOWRANK && rank > 0) {
    int dev = 0, optin = 0;
    if (cudaGetDevice(&dev) == cudaSuccess &&
        cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) == cudaSuccess &&
        Cfg::lowrank_resident_bytes(rank + 1) <= static_cast<size_t>(optin))
      ldu = static_cast<int>(rank + 1);
  }
  const size_t smem = Cfg::smem_bytes(LOWRANK, ldu);
  auto kern = fwd_tc_kernel<E, WE, LOWRANK>;
  err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  ATTNFREE_LAUNCH(kern, grid, NT, smem, s)(
      static_cast<const E*>(q), ke, static_cast<const E*>(v), static_cast<const WE*>(w), static_cast<const WE*>(u),
      static_cast<const WE*>(vb), static_cast<const Op*>(ek), static_cast<const Op*>(ekv), static_cast<const float*>(r),
      static_cast<const float*>(m), static_cast<E*>(y), static_cast<float*>(lse), B, T, D, dh, rank, causal,
      x3 || !std::is_same<E, float>::value, ldu);
  return cudaGetLastError();
}

template <typename E, typename WE, bool LOWRANK>
cudaError_t launch_exact(const void* q, const void* k, const void* v, const void* w, const void* u, const void* vb,
                         void* y, void* lse, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank, bool causal,
                         cudaStream_t s) {
  using A = acc_of_t<E>;
  const int64_t n = B * T * D;
  ATTNFREE_LAUNCH((fwd_exact_kernel<E, WE, LOWRANK>), grid_for(n, 256), 256, 0, s)(
      static_cast<const E*>(q), static_cast<const E*>(k), static_cast<const E*>(v), static_cast<const WE*>(w),
      static_cast<const WE*>(u), static_cast<const WE*>(vb), static_cast<E*>(y), static_cast<A*>(lse), B, T, D,
      D / heads, rank, causal);
  return cudaGetLastError();
}

// The backward's buffers, typed (layouts: aft_full.h); lse is in the accumulate type. Dense: w, dw; low rank: u, vb
// and the accumulate-type factor gradients du_acc, dvb_acc (heads, T, rank) of the workspace.
template <typename E, typename WE>
struct BwdBuffers {
  gptr<const E> dy, q, k, v;
  gptr<const WE> w, u, vb;
  gptr<const E> y;
  gptr<const acc_of_t<E>> lse;
  gptr<E> dq, dk, dv;
  gptr<WE> dw;
  gptr<acc_of_t<E>> du_acc, dvb_acc;
};

// dq = dy * y * (1 - sigmoid(q)), elementwise: the first kernel of both backward paths.
template <typename E, typename WE>
cudaError_t launch_bwd_dq(const BwdBuffers<E, WE>& p, int64_t n, cudaStream_t s) {
  ATTNFREE_LAUNCH((bwd_dq_kernel<E>), grid_for(n, 256), 256, 0, s)(p.dy, p.q, p.y, p.dq, n);
  return cudaGetLastError();
}

// The SIMT kernels.
template <typename E, typename WE, bool LOWRANK>
cudaError_t launch_bwd(const BwdBuffers<E, WE>& p, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank,
                       bool causal, cudaStream_t s) {
  const int64_t n = B * T * D, dh = D / heads;
  cudaError_t err = launch_bwd_dq(p, n, s);
  if (err != cudaSuccess) return err;
  ATTNFREE_LAUNCH((bwd_dkdv_kernel<E, WE, LOWRANK>), grid_for(n, 256), 256, 0, s)(
      p.dy, p.q, p.k, p.v, p.w, p.u, p.vb, p.y, p.lse, p.dk, p.dv, B, T, D, dh, rank, causal);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  if constexpr (LOWRANK) {
    const int64_t nthreads = heads * T * 32;
    ATTNFREE_LAUNCH((bwd_factor_kernel<E, WE, false>), grid_for(nthreads, 256), 256, 0, s)(
        p.dy, p.q, p.k, p.v, p.u, p.vb, p.y, p.lse, p.du_acc, B, T, D, dh, heads, rank, causal);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
    ATTNFREE_LAUNCH((bwd_factor_kernel<E, WE, true>), grid_for(nthreads, 256), 256, 0, s)(
        p.dy, p.q, p.k, p.v, p.u, p.vb, p.y, p.lse, p.dvb_acc, B, T, D, dh, heads, rank, causal);
  } else {
    const int64_t nthreads = heads * T * T * 32;
    ATTNFREE_LAUNCH((bwd_dw_kernel<E, WE>), grid_for(nthreads, 256), 256, 0, s)(p.dy, p.q, p.k, p.v, p.w, p.y, p.lse,
                                                                                p.dw, B, T, D, dh, heads, causal);
  }
  return cudaGetLastError();
}

// One low-rank dw-kernel pass (see DwMode) on the grid it needs.
template <typename E, typename WE>
cudaError_t launch_bwd_w_tc(DwMode mode, const BwdBuffers<E, WE>& p, gptr<float> facc, int64_t B, int64_t T, int64_t D,
                            int64_t heads, int64_t rank, bool causal, cudaStream_t s) {
  constexpr bool F32OPS = uses_tf32_operands<E>();
  const size_t smem = BwdCfg<F32OPS>::kLowRankBytes;
  const unsigned tiles = blocks_for(T, 64);
  auto kw = bwd_w_tc_kernel<E, WE>;
  cudaError_t err = cudaFuncSetAttribute(kw, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(mode == DwMode::DU ? 1u : tiles, mode == DwMode::DVb ? 1u : tiles, static_cast<unsigned>(heads));
  ATTNFREE_LAUNCH((bwd_w_tc_kernel<E, WE>), grid, NT, smem, s)(p.dy, p.q, p.k, p.v, p.u, p.vb, p.y, p.lse, facc, B, T,
                                                               D, D / heads, rank, causal, mode);
  return cudaGetLastError();
}

// The per-tile-pair tensor-core kernels of the low-rank bias (no float64), for factors too large for launch_bwd_tc.
template <typename E, typename WE>
cudaError_t launch_bwd_lowrank_tc(const BwdBuffers<E, WE>& p, int64_t B, int64_t T, int64_t D, int64_t heads,
                                  int64_t rank, bool causal, cudaStream_t s) {
  constexpr bool F32OPS = uses_tf32_operands<E>();
  const int64_t n = B * T * D, dh = D / heads;
  const size_t smem = BwdCfg<F32OPS>::kLowRankBytes;
  const unsigned tiles = blocks_for(T, 64);
  if (tiles > 65535u || heads > 65535) return cudaErrorInvalidConfiguration;
  cudaError_t err = launch_bwd_dq(p, n, s);
  if (err != cudaSuccess) return err;
  auto kv = bwd_kv_tc_kernel<E, WE>;
  err = cudaFuncSetAttribute(kv, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  ATTNFREE_LAUNCH((bwd_kv_tc_kernel<E, WE>), dim3(blocks_for(B * dh, 64), tiles, static_cast<unsigned>(heads)), NT,
                  smem, s)(p.dy, p.q, p.k, p.v, p.u, p.vb, p.y, p.lse, p.dk, p.dv, B, T, D, dh, rank, causal);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = launch_bwd_w_tc<E, WE>(DwMode::DU, p, p.du_acc, B, T, D, heads, rank, causal, s);
  if (err != cudaSuccess) return err;
  return launch_bwd_w_tc<E, WE>(DwMode::DVb, p, p.dvb_acc, B, T, D, heads, rank, causal, s);
}

// The three-GEMM tensor-core backward: bwd_prep_kernel, bwd_kv_kernel, bwd_w_kernel, launch_bwd_tc.
#include "aft_full/aft_full_bwd.cuh"

// SIMT for float64 or when `exact`, tensor cores otherwise (ws: the dense backward's workspace, bwd_ws_layout).
template <typename E, typename WE, bool LOWRANK>
cudaError_t launch_bwd_any(const BwdBuffers<E, WE>& p, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank,
                           bool causal, bool exact, void* ws, cudaStream_t s) {
  if constexpr (std::is_same<E, double>::value) {
    return launch_bwd<E, WE, LOWRANK>(p, B, T, D, heads, rank, causal, s);
  } else {
    if (exact) return launch_bwd<E, WE, LOWRANK>(p, B, T, D, heads, rank, causal, s);
    // low rank with factors too large for bwd_kv_kernel's or bwd_uv_kernel's shared memory: the per-tile-pair
    // kernels throughout
    if (LOWRANK && (ws == nullptr || bwd_kv_smem_bytes<uses_tf32_operands<E>()>(true, rank) == 0 ||
                    bwd_uv_smem_bytes<uses_tf32_operands<E>()>(rank) == 0))
      return launch_bwd_lowrank_tc<E, WE>(p, B, T, D, heads, rank, causal, s);
    return launch_bwd_tc<E, WE, LOWRANK>(p, B, T, D, heads, rank, causal, ws, s);
  }
}

// dtype dispatch: calls f(E{}, WE{}) with value-initialised tag objects.
template <typename F>
cudaError_t dispatch(DType dt, DType w_dt, F&& f) {
  const bool w_same = w_dt == dt, w_acc = w_dt == acc_dtype(dt);
  switch (dt) {
    case DType::Float16:
      if (w_same) return f(__half{}, __half{});
      if (w_acc) return f(__half{}, float{});
      break;
    case DType::BFloat16:
      if (w_same) return f(__nv_bfloat16{}, __nv_bfloat16{});
      if (w_acc) return f(__nv_bfloat16{}, float{});
      break;
    case DType::Float32:
      if (w_same) return f(float{}, float{});
      break;
    case DType::Float64:
      if (w_same) return f(double{}, double{});
      break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace aft_full_detail

using namespace aft_full_detail;

size_t aft_full_fwd_workspace_bytes(DType dt, int64_t B, int64_t T, int64_t D, int64_t heads, bool /*causal*/,
                                    bool exact) {
  return fwd_tc_workspace_bytes(dt, B, T, D, heads, exact);
}

cudaError_t aft_full_fwd(DType dt, DType w_dt, const void* q, const void* k, const void* v, const void* w, void* y,
                         void* lse, int64_t B, int64_t T, int64_t D, int64_t heads, bool causal, bool exact,
                         bool tf32x3, void* workspace, cudaStream_t stream) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  if (heads <= 0 || D % heads != 0) return cudaErrorInvalidValue;
  exact = exact || !aft_full_tc_supported();
  return dispatch(dt, w_dt, [&](auto e, auto we) -> cudaError_t {
    using E = decltype(e);
    using WE = decltype(we);
    if constexpr (std::is_same<E, double>::value) {
      return launch_exact<E, WE, false>(q, k, v, w, nullptr, nullptr, y, lse, B, T, D, heads, 0, causal, stream);
    } else {
      if (exact)
        return launch_exact<E, WE, false>(q, k, v, w, nullptr, nullptr, y, lse, B, T, D, heads, 0, causal, stream);
      return launch_tc<E, WE, false>(q, k, v, w, nullptr, nullptr, y, lse, B, T, D, heads, 0, causal, tf32x3, workspace,
                                     stream);
    }
  });
}

size_t aft_full_bwd_workspace_bytes(DType dt, int64_t B, int64_t T, int64_t D, int64_t heads, bool /*causal*/,
                                    bool exact) {
  return bwd_tc_workspace_bytes(dt, B, T, D, heads, exact);
}

cudaError_t aft_full_bwd(DType dt, DType w_dt, const void* dy, const void* q, const void* k, const void* v,
                         const void* w, const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw,
                         int64_t B, int64_t T, int64_t D, int64_t heads, bool causal, bool exact, void* workspace,
                         cudaStream_t stream) {
  if (heads <= 0 || (D > 0 && D % heads != 0)) return cudaErrorInvalidValue;
  if (T <= 0) return cudaSuccess;
  if (B <= 0 || D <= 0) {  // empty q/k/v: dw is all zeros
    return cudaMemsetAsync(dw, 0, static_cast<size_t>(heads * T * T) * dtype_size(w_dt), stream);
  }
  exact = exact || !aft_full_tc_supported();
  return dispatch(dt, w_dt, [&](auto e, auto we) -> cudaError_t {
    using E = decltype(e);
    using WE = decltype(we);
    const BwdBuffers<E, WE> p{static_cast<const E*>(dy),
                              static_cast<const E*>(q),
                              static_cast<const E*>(k),
                              static_cast<const E*>(v),
                              static_cast<const WE*>(w),
                              nullptr,
                              nullptr,
                              static_cast<const E*>(y),
                              static_cast<const acc_of_t<E>*>(lse),
                              static_cast<E*>(dq),
                              static_cast<E*>(dk),
                              static_cast<E*>(dv),
                              static_cast<WE*>(dw),
                              nullptr,
                              nullptr};
    return launch_bwd_any<E, WE, false>(p, B, T, D, heads, 0, causal, exact, workspace, stream);
  });
}

// The factorised bias is never materialised (no T x T buffer): every kernel builds its w tiles from u and vb on
// chip (a tile costs 64 * 64 * rank fp32 FMAs, ~rank / 32 times the tile's exponential and merge work), and the
// backward reduces its dw tiles into du, dvb at once. 16-bit factors are converted to fp32 once, into the workspace
// (so the kernels exist for fp32/fp64 factors only). Memory: O(B T D + heads T rank).
inline size_t lowrank_factor_bytes(DType dt, int64_t T, int64_t heads, int64_t rank) {
  const bool f16 = dt == DType::Float16 || dt == DType::BFloat16;
  return f16 ? 2 * static_cast<size_t>(heads * T * rank) * sizeof(float) : 0;
}

template <typename S, typename Dt>
cudaError_t launch_cast(const void* src, Dt* dst, int64_t n, cudaStream_t s) {
  if (n <= 0) return cudaSuccess;
  ATTNFREE_LAUNCH((convert_kernel<S, Dt>), grid_for(n, 256), 256, 0, s)(static_cast<const S*>(src), dst, n);
  return cudaGetLastError();
}

// u, vb as the kernels read them (accumulate type A): as given, or converted into fp32 at `ws` (room for both).
template <typename WE, typename A>
cudaError_t lowrank_factors(const void* u, const void* vb, void* ws, int64_t n, const A*& uk, const A*& vk,
                            cudaStream_t s) {
  if constexpr (std::is_same<WE, A>::value) {
    uk = static_cast<const A*>(u);
    vk = static_cast<const A*>(vb);
    return cudaSuccess;
  } else {
    A* w = static_cast<A*>(ws);
    cudaError_t err = launch_cast<WE, A>(u, w, n, s);
    if (err == cudaSuccess) err = launch_cast<WE, A>(vb, w + n, n, s);
    uk = w;
    vk = w + n;
    return err;
  }
}

// The fp32 factors (16-bit inputs), then the tensor-core forward's workspace (fwd_ws_layout).
size_t aft_full_lowrank_fwd_workspace_bytes(DType dt, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank,
                                            bool /*causal*/, bool exact) {
  return align256(lowrank_factor_bytes(dt, T, heads, rank)) + fwd_tc_workspace_bytes(dt, B, T, D, heads, exact);
}

cudaError_t aft_full_lowrank_fwd(DType dt, DType w_dt, const void* q, const void* k, const void* v, const void* u,
                                 const void* vb, void* y, void* lse, int64_t B, int64_t T, int64_t D, int64_t heads,
                                 int64_t rank, bool causal, bool exact, bool tf32x3, void* workspace,
                                 cudaStream_t stream) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  if (heads <= 0 || D % heads != 0 || rank < 0) return cudaErrorInvalidValue;
  if (workspace == nullptr && aft_full_lowrank_fwd_workspace_bytes(dt, B, T, D, heads, rank, causal, exact) > 0)
    return cudaErrorInvalidValue;
  void* fwd_ws = static_cast<unsigned char*>(workspace) + align256(lowrank_factor_bytes(dt, T, heads, rank));
  exact = exact || !aft_full_tc_supported();
  return dispatch(dt, w_dt, [&](auto e, auto we) -> cudaError_t {
    using E = decltype(e);
    using WE = decltype(we);
    using A = acc_of_t<E>;
    const A *uk = nullptr, *vk = nullptr;
    const cudaError_t err = lowrank_factors<WE, A>(u, vb, workspace, heads * T * rank, uk, vk, stream);
    if (err != cudaSuccess) return err;
    if constexpr (std::is_same<E, double>::value) {
      return launch_exact<E, A, true>(q, k, v, nullptr, uk, vk, y, lse, B, T, D, heads, rank, causal, stream);
    } else {
      if (exact)
        return launch_exact<E, A, true>(q, k, v, nullptr, uk, vk, y, lse, B, T, D, heads, rank, causal, stream);
      return launch_tc<E, A, true>(q, k, v, nullptr, uk, vk, y, lse, B, T, D, heads, rank, causal, tf32x3, fwd_ws,
                                   stream);
    }
  });
}

// du, dvb accumulated in the accumulate type, 2 x (heads, T, rank), then the fp32 factors of 16-bit inputs, then
// the three-GEMM backward's workspace (bwd_ws_layout).
size_t aft_full_lowrank_bwd_workspace_bytes(DType dt, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank,
                                            bool /*causal*/, bool exact) {
  return align256(2 * static_cast<size_t>(heads * T * rank) * dtype_size(acc_dtype(dt)) +
                  lowrank_factor_bytes(dt, T, heads, rank)) +
         bwd_tc_workspace_bytes(dt, B, T, D, heads, exact);
}

cudaError_t aft_full_lowrank_bwd(DType dt, DType w_dt, const void* dy, const void* q, const void* k, const void* v,
                                 const void* u, const void* vb, const void* y, const void* lse, void* dq, void* dk,
                                 void* dv, void* du, void* dvb, int64_t B, int64_t T, int64_t D, int64_t heads,
                                 int64_t rank, bool causal, bool exact, void* workspace, cudaStream_t stream) {
  if (heads <= 0 || (D > 0 && D % heads != 0) || rank < 0) return cudaErrorInvalidValue;
  if (T <= 0) return cudaSuccess;
  const size_t fbytes = static_cast<size_t>(heads * T * rank) * dtype_size(w_dt);
  if (B <= 0 || D <= 0) {  // empty q/k/v: du, dvb are all zeros
    cudaError_t err = cudaMemsetAsync(du, 0, fbytes, stream);
    return err == cudaSuccess ? cudaMemsetAsync(dvb, 0, fbytes, stream) : err;
  }
  if (workspace == nullptr && rank > 0) return cudaErrorInvalidValue;
  exact = exact || !aft_full_tc_supported();
  return dispatch(dt, w_dt, [&](auto e, auto we) -> cudaError_t {
    using E = decltype(e);
    using WE = decltype(we);
    using A = acc_of_t<E>;
    const int64_t n = heads * T * rank;
    A* du_acc = static_cast<A*>(workspace);
    A* dvb_acc = du_acc + n;
    const A *uk = nullptr, *vk = nullptr;
    cudaError_t err = lowrank_factors<WE, A>(u, vb, dvb_acc + n, n, uk, vk, stream);
    if (err != cudaSuccess) return err;
    const BwdBuffers<E, A> p{static_cast<const E*>(dy),
                             static_cast<const E*>(q),
                             static_cast<const E*>(k),
                             static_cast<const E*>(v),
                             nullptr,
                             uk,
                             vk,
                             static_cast<const E*>(y),
                             static_cast<const acc_of_t<E>*>(lse),
                             static_cast<E*>(dq),
                             static_cast<E*>(dk),
                             static_cast<E*>(dv),
                             nullptr,
                             du_acc,
                             dvb_acc};
    // the dw kernels add into the accumulators (the SIMT factor kernel zeroes its own rows)
    if (n > 0) err = cudaMemsetAsync(workspace, 0, 2 * static_cast<size_t>(n) * sizeof(A), stream);
    void* tc_ws = (workspace != nullptr && bwd_tc_workspace_bytes(dt, B, T, D, heads, exact) > 0)
                      ? static_cast<unsigned char*>(workspace) +
                            align256(2 * static_cast<size_t>(n) * sizeof(A) + lowrank_factor_bytes(dt, T, heads, rank))
                      : nullptr;
    if (err == cudaSuccess) err = launch_bwd_any<E, A, true>(p, B, T, D, heads, rank, causal, exact, tc_ws, stream);
    if (err == cudaSuccess) err = launch_cast<A, WE>(du_acc, static_cast<WE*>(du), n, stream);
    if (err == cudaSuccess) err = launch_cast<A, WE>(dvb_acc, static_cast<WE*>(dvb), n, stream);
    return err;
  });
}

}  // namespace cuda
}  // namespace attnfree
