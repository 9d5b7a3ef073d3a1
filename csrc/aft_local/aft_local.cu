// AFT-local: bias w'[t,t'] = w[h,t,t'] inside the band |t - t'| < window, 0 outside (every key stays visible
// through the 0-bias term; causal masks t' > t). Forward and backward. Plain CUDA C++ (no torch headers).
//
// Exact split (docs/design.md §2.6):  sum_t' exp(w'[t,t'] + k[t']) [1, v[t']] =
//      band:   sum_{|t-t'| < W, visible} exp(w[t,t'] + k[t']) [1, v[t']]          (exact, per key)
//    + prefix: sum_{t' <= t-W} exp(k[t']) [1, v[t']]                               (inclusive prefix scan at t-W)
//    + suffix: sum_{t' >= t+W} exp(k[t']) [1, v[t']]   (global only)               (inclusive suffix scan at t+W)
// The prefix/suffix sums come from the chunked scans of common/cuda_common.cuh, stored per (b,t,c) as (lse, mean),
// and are merged into the band's online (max, sum) state as one more "item" - no overflow for any finite input.
//
// Backward (P[t,t'] = exp(w'[t,t'] + k[t'] - lse[t]), G = dy*sig(q), H = dy*y):
//   dv[t'] = sum_t P G ; dk[t'] = v dv - sum_t P H ; dq = dy*y*(1-sig(q))
//   queries t that see key t' with bias 0 (out of band): t >= t'+W (reverse scan of (-lse, G, H), inclusive at
//   t'+W) and, global only, t <= t'-W (forward scan, inclusive at t'-W); each stored as a raw (max, a, b) state.
//   dw[h,t,t'] (band only) = sum_{b, c in head h} P (G[t,c] v[t',c] - H[t,c]): one block per (h, t), one warp per
//   t', lanes over (b, c); a warp-shuffle reduction, written once (no atomics, deterministic).
// w and dw are read and written at band entries only, through WLayout: the full (heads, T, T) layout or the banded
// (heads, T, 2W-1) one, so with a banded w nothing of size T x T exists (memory O(B*T*D + heads*T*W)).
// The forward of float32/float16/bfloat16 inputs on sm_80+ runs as block-banded tensor-core tiles (aft_local_tc.cu);
// the per-element forward here serves float64, older devices and grids past that kernel's launch limits. The backward
// of those inputs with W <= 64 runs as tensor-core tiles too (aft_local_tc_bwd.cu); the band kernels below serve the
// rest.
#include "aft_local/aft_local.h"
#include "aft_local/aft_local_tc.h"
#include "common/cuda_common.cuh"

namespace attnfree {
namespace cuda {
namespace {

// Band kernels map a block of kThreads threads to a tile of RT consecutive time rows x CT consecutive channels
// (CT = 32, or the next power of two >= D when D < 32; RT = kThreads / CT): loads stay coalesced along D, and the
// RT rows of a block read overlapping band rows of k, v (G, H, lse in the backward), so most of the 2*window-fold
// re-reads hit L1 instead of L2. Blocks loop over tiles (grid-stride), so any B, T, D fits the grid.
// The struct also carries the problem geometry every band kernel needs (W: the window clipped to T).
struct BandTiles {
  int64_t CT, RT, nct, ntt, ntiles;
  int64_t T, D, dh, W;
  bool causal;
  BandTiles(int64_t B, int64_t T_, int64_t D_, int64_t heads, int64_t W_, bool causal_)
      : T(T_), D(D_), dh(D_ / heads), W(W_), causal(causal_) {
    CT = 32;
    if (D < 32) {
      CT = 1;
      while (CT < D) CT *= 2;
    }
    RT = kThreads / CT;
    nct = (D + CT - 1) / CT;
    ntt = (T + RT - 1) / RT;
    ntiles = B * ntt * nct;
  }
};
#define TILE_LOOP(b, t, c, i)                                                                                   \
  const int64_t CT_ = tiles.CT, RT_ = tiles.RT;                                                                 \
  for (int64_t tile_ = blockIdx.x; tile_ < tiles.ntiles; tile_ += gridDim.x)                                    \
    if (const int64_t c = (tile_ % tiles.nct) * CT_ + (threadIdx.x % CT_),                                      \
        t = ((tile_ / tiles.nct) % tiles.ntt) * RT_ + (threadIdx.x / CT_), b = tile_ / (tiles.nct * tiles.ntt), \
        i = (b * T + t) * D + c;                                                                                \
        c < D && t < T)

template <typename scalar_t, typename Acc>
__global__ void local_band_fwd_kernel(gptr<const scalar_t> __restrict__ q, gptr<const scalar_t> __restrict__ k,
                                      gptr<const scalar_t> __restrict__ v, gptr<const scalar_t> __restrict__ w,
                                      gptr<const Acc> __restrict__ plse, gptr<const Acc> __restrict__ pmean,
                                      gptr<const Acc> __restrict__ slse, gptr<const Acc> __restrict__ smean,
                                      gptr<scalar_t> __restrict__ y, gptr<Acc> __restrict__ lse, BandTiles tiles,
                                      WLayout wl) {
  const int64_t T = tiles.T, D = tiles.D, dh = tiles.dh, W = tiles.W;
  const bool causal = tiles.causal;
  TILE_LOOP(b, t, c, i) {
    const int64_t h = c / dh;
    gptr<const scalar_t> kc = k + b * T * D + c;
    gptr<const scalar_t> vc = v + b * T * D + c;
    const int64_t lo = (t - W + 1 > 0) ? t - W + 1 : 0;
    const int64_t hi = causal ? t : ((t + W - 1 < T - 1) ? t + W - 1 : T - 1);
    LseState<Acc> st;
    st.init();
    for (int64_t tp = lo; tp <= hi; ++tp) {
      st.add(load_acc(w + wl.at(h, t, tp)) + load_acc(kc + tp * D), Acc(1), load_acc(vc + tp * D));
    }
    if (t - W >= 0) {
      const int64_t j = (b * T + (t - W)) * D + c;
      st.merge(plse[j], Acc(1), pmean[j]);
    }
    if (!causal && t + W <= T - 1) {
      const int64_t j = (b * T + (t + W)) * D + c;
      st.merge(slse[j], Acc(1), smean[j]);
    }
    store_val(y + i, af_sigmoid(load_acc(q + i)) * st.mean());
    lse[i] = st.m + af_log(st.a);
  }
}

// G = dy*sig(q), H = dy*y (acc type) and dq = dy*y*(1-sig(q)).
template <typename scalar_t, typename Acc>
__global__ void local_prep_bwd_kernel(gptr<const scalar_t> __restrict__ dy, gptr<const scalar_t> __restrict__ q,
                                      gptr<const scalar_t> __restrict__ y, gptr<Acc> __restrict__ G,
                                      gptr<Acc> __restrict__ H, gptr<scalar_t> __restrict__ dq, int64_t n) {
  AF_GRID_STRIDE(i, n) {
    const Acc g = load_acc(dy + i);
    const Acc sq = af_sigmoid(load_acc(q + i));
    const Acc gy = g * load_acc(y + i);
    G[i] = g * sq;
    H[i] = gy;
    store_val(dq + i, gy * (Acc(1) - sq));
  }
}

template <typename Acc>
struct GHSrc {
  const Acc *G, *H, *lse;
  int64_t T, D;
  __device__ __forceinline__ ScanTerm<Acc> operator()(int64_t b, int64_t t, int64_t c) const {
    const int64_t j = (b * T + t) * D + c;
    return {bwd_x(lse[j]), G[j], H[j]};
  }
};

template <typename scalar_t, typename Acc>
__global__ void local_band_bwd_kv_kernel(gptr<const scalar_t> __restrict__ k, gptr<const scalar_t> __restrict__ v,
                                         gptr<const scalar_t> __restrict__ w, gptr<const Acc> __restrict__ lse,
                                         gptr<const Acc> __restrict__ G, gptr<const Acc> __restrict__ H,
                                         gptr<const Acc> __restrict__ sm, gptr<const Acc> __restrict__ sa,
                                         gptr<const Acc> __restrict__ sb, gptr<const Acc> __restrict__ pm,
                                         gptr<const Acc> __restrict__ pa, gptr<const Acc> __restrict__ pb,
                                         gptr<scalar_t> __restrict__ dk, gptr<scalar_t> __restrict__ dv,
                                         BandTiles tiles, WLayout wl) {
  const int64_t T = tiles.T, D = tiles.D, dh = tiles.dh, W = tiles.W;
  const bool causal = tiles.causal;
  TILE_LOOP(b, tp, c, i) {  // tp: key position t'
    const int64_t h = c / dh;
    const int64_t base = b * T * D + c;
    const Acc kk = load_acc(k + i);
    const int64_t lo = causal ? tp : ((tp - W + 1 > 0) ? tp - W + 1 : 0);
    const int64_t hi = (tp + W - 1 < T - 1) ? tp + W - 1 : T - 1;
    Acc sg = Acc(0), sh = Acc(0);
    for (int64_t t = lo; t <= hi; ++t) {
      const int64_t j = base + t * D;
      const Acc p = p_of(load_acc(w + wl.at(h, t, tp)) + kk, lse[j]);
      sg += p * G[j];
      sh += p * H[j];
    }
    if (tp + W <= T - 1) {  // queries t >= t'+W see t' with bias 0
      const int64_t j = base + (tp + W) * D;
      const Acc e = af_exp(kk + sm[j]);
      sg += e * sa[j];
      sh += e * sb[j];
    }
    if (!causal && tp - W >= 0) {  // queries t <= t'-W
      const int64_t j = base + (tp - W) * D;
      const Acc e = af_exp(kk + pm[j]);
      sg += e * pa[j];
      sh += e * pb[j];
    }
    store_val(dv + i, sg);
    store_val(dk + i, load_acc(v + i) * sg - sh);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc warp_sum(Acc x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_down_sync(0xffffffffu, x, o);
  return x;
}

template <typename scalar_t, typename Acc>
__global__ void local_band_bwd_w_kernel(gptr<const scalar_t> __restrict__ k, gptr<const scalar_t> __restrict__ v,
                                        gptr<const scalar_t> __restrict__ w, gptr<const Acc> __restrict__ lse,
                                        gptr<const Acc> __restrict__ G, gptr<const Acc> __restrict__ H,
                                        gptr<scalar_t> __restrict__ dw, int64_t B, int64_t T, int64_t D, int64_t heads,
                                        int64_t W, bool causal, WLayout wl) {
  const int64_t dh = D / heads;
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
  const int nwarps = blockDim.x >> 5;
  const int64_t nblk = heads * T;
  for (int64_t blk = blockIdx.x; blk < nblk; blk += gridDim.x) {
    const int64_t t = blk % T;
    const int64_t h = blk / T;
    const int64_t lo = (t - W + 1 > 0) ? t - W + 1 : 0;
    const int64_t hi = causal ? t : ((t + W - 1 < T - 1) ? t + W - 1 : T - 1);
    const int64_t nwork = B * dh;
    const int64_t q32 = 32 / dh, r32 = 32 % dh;
    for (int64_t tp = lo + warp; tp <= hi; tp += nwarps) {
      const Acc wv = load_acc(w + wl.at(h, t, tp));
      Acc acc = Acc(0);
      // j = lane, lane+32, ... over (b, cc) with cc fastest; (b, cc) advanced without 64-bit division
      int64_t b = lane / dh, cc = lane % dh;
      for (int64_t j = lane; j < nwork; j += 32) {
        const int64_t c = h * dh + cc;
        const int64_t it = (b * T + t) * D + c;
        const int64_t ik = (b * T + tp) * D + c;
        const Acc p = p_of(wv + load_acc(k + ik), lse[it]);
        acc += p * (G[it] * load_acc(v + ik) - H[it]);
        cc += r32;
        b += q32;
        if (cc >= dh) {
          cc -= dh;
          ++b;
        }
      }
      acc = warp_sum(acc);
      if (lane == 0) store_val(dw + wl.at(h, t, tp), acc);
    }
  }
}

inline int64_t eff_window(int64_t window, int64_t T) { return window < T ? window : T; }

}  // namespace

size_t aft_local_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t window,
                                     bool causal) {
  const int64_t W = eff_window(window, T);
  if (aft_local_tc_fwd_takes(dtype, B, T, D, heads, W))
    return aft_local_tc_fwd_workspace_bytes(dtype, B, T, D, heads, W);
  if (W >= T) return 256;
  const size_t a = acc_size(dtype);
  const int64_t n = B * T * D;
  const int64_t nc = B * scan_num_chunks(B, T, D) * D;
  return (causal ? 2 : 4) * align_up(a * size_t(n)) + scan_state_bytes(dtype, nc);
}

cudaError_t aft_local_fwd(DType dtype, const void* q, const void* k, const void* v, const void* w, void* y, void* lse,
                          int64_t B, int64_t T, int64_t D, int64_t heads, int64_t window, bool causal, bool banded,
                          void* workspace, cudaStream_t stream) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  if (heads < 1 || D % heads != 0 || window < 1) return cudaErrorInvalidValue;
  const int64_t W = eff_window(window, T);
  if (aft_local_tc_fwd_takes(dtype, B, T, D, heads, W))
    return aft_local_tc_fwd(dtype, q, k, v, w, y, lse, B, T, D, heads, W, causal, banded, workspace, stream);
  return AF_DISPATCH(dtype, [&] {
    const int64_t n = B * T * D;
    const scalar_t* kp = static_cast<const scalar_t*>(k);
    const scalar_t* vp = static_cast<const scalar_t*>(v);
    acc_t *plse = nullptr, *pmean = nullptr, *slse = nullptr, *smean = nullptr;
    if (W < T) {
      const int64_t nc = B * scan_num_chunks(B, T, D) * D;
      WsCursor ws(workspace);
      plse = ws.take<acc_t>(n);
      pmean = ws.take<acc_t>(n);
      if (!causal) {
        slse = ws.take<acc_t>(n);
        smean = ws.take<acc_t>(n);
      }
      const ScanState<acc_t> st = take_scan_state<acc_t>(ws, nc);
      FwdSrc<scalar_t, acc_t> src{kp, vp, T, D};
      run_chunked_scan<acc_t, false, false>(src, SummarySink<acc_t>{plse, pmean, T, D}, st, B, T, D, stream);
      if (!causal)
        run_chunked_scan<acc_t, true, false>(src, SummarySink<acc_t>{slse, smean, T, D}, st, B, T, D, stream);
    }
    const BandTiles tiles(B, T, D, heads, W, causal);
    ATTNFREE_LAUNCH((local_band_fwd_kernel<scalar_t, acc_t>), grid_for(tiles.ntiles * kThreads), kThreads, 0, stream)(
        static_cast<const scalar_t*>(q), kp, vp, static_cast<const scalar_t*>(w), plse, pmean, slse, smean,
        static_cast<scalar_t*>(y), static_cast<acc_t*>(lse), tiles, WLayout(T, W, banded));
    return cudaGetLastError();
  });
}

size_t aft_local_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t window,
                                     bool causal) {
  const int64_t W = eff_window(window, T);
  if (aft_local_tc_bwd_takes(dtype, B, T, D, heads, W))
    return aft_local_tc_bwd_workspace_bytes(dtype, B, T, D, heads, W);
  const size_t a = acc_size(dtype);
  const int64_t n = B * T * D;
  size_t bytes = 2 * align_up(a * size_t(n));  // G, H
  if (W < T) {
    const int64_t nc = B * scan_num_chunks(B, T, D) * D;
    bytes += (causal ? 3 : 6) * align_up(a * size_t(n)) + scan_state_bytes(dtype, nc);
  }
  return bytes;
}

cudaError_t aft_local_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v, const void* w,
                          const void* y, const void* lse, void* dq, void* dk, void* dv, void* dw, int64_t B, int64_t T,
                          int64_t D, int64_t heads, int64_t window, bool causal, bool banded, void* workspace,
                          cudaStream_t stream) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  if (heads < 1 || D % heads != 0 || window < 1) return cudaErrorInvalidValue;
  const int64_t W = eff_window(window, T);
  if (aft_local_tc_bwd_takes(dtype, B, T, D, heads, W))
    return aft_local_tc_bwd(dtype, dy, q, k, v, w, y, lse, dq, dk, dv, dw, B, T, D, heads, W, causal, banded, workspace,
                            stream);
  return AF_DISPATCH(dtype, [&] {
    const scalar_t* kp = static_cast<const scalar_t*>(k);
    const scalar_t* vp = static_cast<const scalar_t*>(v);
    const scalar_t* wp = static_cast<const scalar_t*>(w);
    const acc_t* lp = static_cast<const acc_t*>(lse);
    const int64_t n = B * T * D;
    WsCursor ws(workspace);
    acc_t* G = ws.take<acc_t>(n);
    acc_t* H = ws.take<acc_t>(n);
    ATTNFREE_LAUNCH((local_prep_bwd_kernel<scalar_t, acc_t>), grid_for(n), kThreads, 0, stream)(
        static_cast<const scalar_t*>(dy), static_cast<const scalar_t*>(q), static_cast<const scalar_t*>(y), G, H,
        static_cast<scalar_t*>(dq), n);
    acc_t *sm = nullptr, *sa = nullptr, *sb = nullptr, *pm = nullptr, *pa = nullptr, *pb = nullptr;
    if (W < T) {
      const int64_t nc = B * scan_num_chunks(B, T, D) * D;
      sm = ws.take<acc_t>(n);
      sa = ws.take<acc_t>(n);
      sb = ws.take<acc_t>(n);
      if (!causal) {
        pm = ws.take<acc_t>(n);
        pa = ws.take<acc_t>(n);
        pb = ws.take<acc_t>(n);
      }
      const ScanState<acc_t> st = take_scan_state<acc_t>(ws, nc);
      GHSrc<acc_t> src{G, H, lp, T, D};
      run_chunked_scan<acc_t, true, false>(src, RawSink<acc_t>{sm, sa, sb, T, D}, st, B, T, D, stream);
      if (!causal) run_chunked_scan<acc_t, false, false>(src, RawSink<acc_t>{pm, pa, pb, T, D}, st, B, T, D, stream);
    }
    const BandTiles tiles(B, T, D, heads, W, causal);
    ATTNFREE_LAUNCH((local_band_bwd_kv_kernel<scalar_t, acc_t>), grid_for(tiles.ntiles * kThreads), kThreads, 0,
                    stream)(kp, vp, wp, lp, G, H, sm, sa, sb, pm, pa, pb, static_cast<scalar_t*>(dk),
                            static_cast<scalar_t*>(dv), tiles, WLayout(T, W, banded));
    ATTNFREE_LAUNCH((local_band_bwd_w_kernel<scalar_t, acc_t>), grid_for(heads * T * kThreads), kThreads, 0, stream)(
        kp, vp, wp, lp, G, H, static_cast<scalar_t*>(dw), B, T, D, heads, W, causal, WLayout(T, W, banded));
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace attnfree
