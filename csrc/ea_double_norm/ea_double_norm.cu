// External-attention double normalisation (Guo et al. 2021), forward and backward. Plain CUDA C++.
// logits (M, N, S) contiguous; p = softmax over N (per (m, s) column); rowsum = sum_S p + eps; out = p / rowsum.
//   lse (M, S) and rowsum (M, N) in the accumulation type.
// Backward: dp = (dout - sum_S(dout*out)) / rowsum ;  dlogits = p * (dp - sum_N(p*dp)),  p = exp(l - lse),
//   evaluated as u = a * (dout - sum_S(dout*a)) (= p*dp), dl = u - p * sum_N u: no division by rowsum, so eps = 0
//   with an underflowed rowsum cannot give inf*0 (the formulation of the Python reference path, docs/design.md §3).
//
// Vectorised kernels (S a multiple of the 16-byte vector width V and at most 32 vectors, pointers 16-byte aligned;
// the paper's S = 64 in every dtype), at the memory floor's structure:
//   forward  1. column (max, sum exp) per (m, row block) in one read of the logits with 16-byte loads (sums
//            relative to power-of-four offsets, common/pow4_offsets.cuh: no exponential to rescale or merge);
//            2. a tiny combine -> lse;  3. per row: p = exp(l - lse), the row L1, out and rowsum (second and last
//            read of the logits). One exp per logit in each of 1 and 3.
//   backward 1. row-blocked: a, rowdot, u = a * (dout - rowdot), column sums of u per row block;  2. combine;
//            3. element-wise dl = u - p * colsum (u recomputed from rowdot). fp32/fp64: p = out * rowsum, the
//            logits are not read; fp16/bf16: a = p / rowsum from the logits, out is not read.
// Cluster kernel (sm_90, ATTNFREE_CLUSTERS=1, the vectorised shapes whose matrix fits in the shared memory of 8 CTAs):
//   the forward in one launch and one read of the logits, a matrix held by a thread-block cluster whose CTAs merge
//   their column statistics through distributed shared memory (ea_fwd_cluster_kernel).
// General kernels (other S / alignments): column log-sum-exp over N with the chunked state kernels of common.cuh
//   (threads along S, chunks of N for occupancy) -> lse; then one warp per row (m, n): rowsum by warp shuffle, out
//   written, in log space (eps = 0 safe). Backward: warp per row -> rowdot; chunked column sums of u over N (chunk
//   partials combined in a second kernel, deterministic); elementwise dlogits.
// Masks (docs/design.md §7 rules 3-4): a -inf logit has p = 0; an all -inf column has lse = -inf and p = 0; a
// token with p = 0 for every unit has out = 0 (also eps = 0) and dlogits = 0. NaN propagates.
#include "common/cluster.h"
#include "common/cuda_common.cuh"
#include "common/pow4_offsets.cuh"
#include "ea_double_norm/ea_double_norm.h"

#include <cstdint>
#include <cstring>
#include <initializer_list>

namespace attnfree {
namespace cuda {
namespace {

template <typename scalar_t, typename Acc>
struct EaSrc {
  const scalar_t* l;
  int64_t N, S;
  __device__ __forceinline__ ScanTerm<Acc> operator()(int64_t m, int64_t n, int64_t s) const {
    return {load_acc(l + (m * N + n) * S + s), Acc(1), Acc(0)};
  }
};

// log p = l - lse; -inf for a masked logit and for every entry of a column whose logits are all -inf
// (lse = -inf: p = 0 there, out = 0; docs/design.md §7 rule 4). NaN propagates.
__device__ __forceinline__ float logp_of(float l, float lse) { return lse == -INFINITY ? -INFINITY : l - lse; }
__device__ __forceinline__ double logp_of(double l, double lse) {
  return lse == -(double)INFINITY ? -(double)INFINITY : l - lse;
}

template <typename Acc>
__global__ void ea_lse_kernel(gptr<const Acc> __restrict__ wm, gptr<const Acc> __restrict__ wa,
                              gptr<Acc> __restrict__ lse, int64_t M, int64_t nch, int64_t S) {
  AF_GRID_STRIDE(i, M * S) {
    const int64_t s = i % S, m = i / S;
    const int64_t j = (m * nch) * S + s;  // chunk 0 holds the total after the TOTAL scan
    lse[i] = wm[j] + af_log(wa[j]);
  }
}

template <typename Acc>
__device__ __forceinline__ Acc warp_allsum(Acc x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}

template <typename Acc>
__device__ __forceinline__ Acc warp_allmax(Acc x) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) {
    const Acc y = __shfl_xor_sync(0xffffffffu, x, o);
    x = y > x ? y : x;
  }
  return x;
}

// One warp per row (m, n), in log space so that eps = 0 with an underflowing row sum stays finite:
//   z_s = l - lse_s <= 0 ; log_s = logsumexp_s z ; log_r = logaddexp(log_s, log eps) ; out = exp(z - log_r)
//   rowsum = exp(log_s) + eps.
template <typename scalar_t, typename Acc>
__global__ void ea_row_fwd_kernel(gptr<const scalar_t> __restrict__ l, gptr<const Acc> __restrict__ lse,
                                  gptr<scalar_t> __restrict__ out, gptr<Acc> __restrict__ rowsum, Acc eps, int64_t M,
                                  int64_t N, int64_t S) {
  const int lane = threadIdx.x & 31;
  AF_WARP_STRIDE(row, M * N) {
    const int64_t m = row / N;
    gptr<const scalar_t> lr = l + row * S;
    gptr<const Acc> lm = lse + m * S;
    Acc mx = neg_inf<Acc>();
    for (int64_t s = lane; s < S; s += 32) {
      const Acc z = logp_of(load_acc(lr + s), lm[s]);
      mx = z > mx ? z : mx;
    }
    mx = warp_allmax(mx);  // -inf only when p = 0 for every unit (or NaN z's only: they propagate below)
    Acc sum = Acc(0);
    for (int64_t s = lane; s < S; s += 32) {
      const Acc z = logp_of(load_acc(lr + s), lm[s]);
      sum += z == neg_inf<Acc>() ? Acc(0) : af_exp(z - mx);
    }
    sum = warp_allsum(sum);  // >= 1, or 0 for a token with p = 0 for every unit
    const Acc log_s = sum == Acc(0) ? neg_inf<Acc>() : mx + af_log(sum);
    Acc log_r = log_s;
    if (eps > Acc(0)) {  // logaddexp(log_s, log eps)
      const Acc le = af_log(eps);
      const Acc hi = log_s > le ? log_s : le, lo = log_s > le ? le : log_s;
      log_r = hi + af_log(Acc(1) + af_exp(lo - hi));
    }
    for (int64_t s = lane; s < S; s += 32) {  // out = 0 where p = 0 (masked logit, all -inf column, dead token)
      const Acc z = logp_of(load_acc(lr + s), lm[s]);
      store_val(out + row * S + s, z == neg_inf<Acc>() ? Acc(0) : af_exp(z - log_r));
    }
    if (lane == 0) rowsum[row] = af_exp(log_s) + eps;
  }
}

// a = out for fp32/fp64; for fp16/bf16 rebuilt in fp32 as p / rowsum (stored out where rowsum < 1e-30).
template <typename scalar_t, typename Acc>
__device__ __forceinline__ Acc ea_a(gptr<const scalar_t> out, gptr<const scalar_t> l, Acc lse, Acc rowsum, int64_t j) {
  if (sizeof(scalar_t) == sizeof(Acc)) return load_acc(out + j);
  if (rowsum > Acc(1e-30)) return p_of(load_acc(l + j), lse) / rowsum;
  return load_acc(out + j);
}

// Backward without dividing by rowsum (u = p*dp):
//   rowdot = sum_S dout*a ;  u = a*(dout - rowdot) ;  dl = u - p * sum_N u.
template <typename scalar_t, typename Acc>
__global__ void ea_rowdot_kernel(gptr<const scalar_t> __restrict__ dout, gptr<const scalar_t> __restrict__ out,
                                 gptr<const scalar_t> __restrict__ l, gptr<const Acc> __restrict__ lse,
                                 gptr<const Acc> __restrict__ rowsum, gptr<Acc> __restrict__ rowdot, int64_t M,
                                 int64_t N, int64_t S) {
  const int lane = threadIdx.x & 31;
  AF_WARP_STRIDE(row, M * N) {
    const int64_t m = row / N;
    const Acc rs = rowsum[row];
    Acc sum = Acc(0);
    for (int64_t s = lane; s < S; s += 32) {
      const int64_t j = row * S + s;
      sum += load_acc(dout + j) * ea_a<scalar_t, Acc>(out, l, lse[m * S + s], rs, j);
    }
    sum = warp_allsum(sum);
    if (lane == 0) rowdot[row] = sum;
  }
}

// partial[m, ch, s] = sum_{n in chunk} u
template <typename scalar_t, typename Acc>
__global__ void ea_colsum_partial_kernel(gptr<const scalar_t> __restrict__ dout, gptr<const scalar_t> __restrict__ out,
                                         gptr<const scalar_t> __restrict__ l, gptr<const Acc> __restrict__ lse,
                                         gptr<const Acc> __restrict__ rowsum, gptr<const Acc> __restrict__ rowdot,
                                         gptr<Acc> __restrict__ partial, int64_t M, int64_t N, int64_t S, int64_t L,
                                         int64_t nch) {
  AF_GRID_STRIDE(i, M * nch * S) {
    const ChunkItem it(i, N, S, L, nch);  // column (m, s), rows [t0, t1) of the chunk
    const int64_t m = it.b, s = it.c;
    const Acc ls = lse[m * S + s];
    Acc acc = Acc(0);
    for (int64_t n = it.t0; n < it.t1; ++n) {
      const int64_t row = m * N + n;
      const int64_t j = row * S + s;
      acc += ea_a<scalar_t, Acc>(out, l, ls, rowsum[row], j) * (load_acc(dout + j) - rowdot[row]);
    }
    partial[i] = acc;
  }
}

template <typename Acc>
__global__ void ea_colsum_combine_kernel(gptr<const Acc> __restrict__ partial, gptr<Acc> __restrict__ colsum, int64_t M,
                                         int64_t nch, int64_t S) {
  AF_GRID_STRIDE(i, M * S) {
    const int64_t s = i % S, m = i / S;
    Acc acc = Acc(0);
    for (int64_t ch = 0; ch < nch; ++ch) acc += partial[(m * nch + ch) * S + s];
    colsum[i] = acc;
  }
}

template <typename scalar_t, typename Acc>
__global__ void ea_bwd_out_kernel(gptr<const scalar_t> __restrict__ dout, gptr<const scalar_t> __restrict__ out,
                                  gptr<const scalar_t> __restrict__ l, gptr<const Acc> __restrict__ lse,
                                  gptr<const Acc> __restrict__ rowsum, gptr<const Acc> __restrict__ rowdot,
                                  gptr<const Acc> __restrict__ colsum, gptr<scalar_t> __restrict__ dl, int64_t M,
                                  int64_t N, int64_t S) {
  AF_GRID_STRIDE(i, M * N * S) {
    const int64_t s = i % S;
    const int64_t row = i / S;
    const int64_t m = row / N;
    const Acc ls = lse[m * S + s];
    const Acc p = p_of(load_acc(l + i), ls);
    const Acc u = ea_a<scalar_t, Acc>(out, l, ls, rowsum[row], i) * (load_acc(dout + i) - rowdot[row]);
    store_val(dl + i, u - p * colsum[m * S + s]);
  }
}

inline unsigned int row_grid(int64_t rows) { return grid_for(rows * 32); }

// ------------------------------------------------------------------ the vectorised kernels
// Used when a row of S values is at most 32 vectors of 16 bytes (S <= 256 for fp16/bf16, 128 for fp32, 64 for fp64)
// and S and the pointers allow 16-byte access; the kernels above serve the other shapes.
// Layout: a block of kThreads threads works on one leading index m and a block of rows; within it a row is read by
// TPR = pow2ceil(S / V) consecutive threads, each holding V contiguous values (one 16-byte load), so each thread
// keeps its V columns across the rows it visits. Per-block column statistics are combined in shared memory in a
// fixed order (deterministic) and written once per block; per-row sums use shuffles inside the TPR-lane group.
constexpr int kColIters = 16;  // rows per thread of the column-statistics kernel
constexpr int kRowIters = 8;   // rows per thread of the row kernels

template <typename T, int V>
__device__ __forceinline__ void load_vec(gptr<const T> p, acc_of_t<T> (&x)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    const uint4 raw = *gptr_cast<const uint4>(p);
    T t[V];
    memcpy(t, &raw, 16);
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = to_acc(t[i]);
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) x[i] = load_acc(p + i);
  }
}

template <typename T, int V>
__device__ __forceinline__ void store_vec(gptr<T> p, const acc_of_t<T> (&x)[V]) {
  if constexpr (V * sizeof(T) == 16) {
    T t[V];
#pragma unroll
    for (int i = 0; i < V; ++i) t[i] = from_acc<T>(x[i]);
    uint4 raw;
    memcpy(&raw, t, 16);
    *gptr_cast<uint4>(p) = raw;
  } else {
#pragma unroll
    for (int i = 0; i < V; ++i) store_val(p + i, x[i]);
  }
}

// Sum / max over the TPR-lane group of a row (xor offsets below TPR stay inside the group; all 32 lanes call).
template <typename Acc>
__device__ __forceinline__ Acc group_sum(Acc x, int tpr) {
  for (int o = tpr >> 1; o > 0; o >>= 1) x += __shfl_xor_sync(0xffffffffu, x, o);
  return x;
}
// NaN-propagating: a NaN log p (from a NaN column) makes the row's max NaN, so the whole row is NaN.
template <typename Acc>
__device__ __forceinline__ Acc group_max(Acc x, int tpr) {
  for (int o = tpr >> 1; o > 0; o >>= 1) {
    const Acc y = __shfl_xor_sync(0xffffffffu, x, o);
    x = (y > x || y != y) ? y : x;
  }
  return x;
}

// Geometry of the vectorised kernels: tpr threads per row, rows_per_pass = kThreads / tpr rows at a time.
struct VecGeom {
  int nvec, tpr, rows_per_pass;
  int64_t rows_per_block, nblk;
};
inline VecGeom vec_geom(int64_t N, int64_t S, int V, int iters) {
  VecGeom g;
  g.nvec = static_cast<int>(S / V);
  g.tpr = 1;
  while (g.tpr < g.nvec) g.tpr <<= 1;
  g.rows_per_pass = kThreads / g.tpr;
  g.rows_per_block = int64_t(g.rows_per_pass) * iters;
  g.nblk = (N + g.rows_per_block - 1) / g.rows_per_block;
  return g;
}

// Pass 1 of the forward: per (m, row block), the column max and sum exp(l - O(max)) over the block's rows, one read
// of the logits (O: the power-of-four offset of common/pow4_offsets.cuh, so the rescale when the max rises and the
// merges are powers of two: one exponential per logit). Each thread keeps a running (max, sum) for its V columns;
// the row lanes are merged in shared memory. Writes pm, ps (M, nblk, S).
template <typename scalar_t, typename Acc, int V>
__global__ void __launch_bounds__(kThreads)
    ea_colstat_vec_kernel(gptr<const scalar_t> __restrict__ l, gptr<Acc> __restrict__ pm, gptr<Acc> __restrict__ ps,
                          int64_t M, int64_t N, int64_t S, int nvec, int tpr, int64_t rows_per_block, int64_t nblk) {
  ATTNFREE_STATIC_SHARED(Acc, sh_m, [kThreads * V]);
  ATTNFREE_STATIC_SHARED(Acc, sh_s, [kThreads * V]);
  const int t = threadIdx.x, cg = t % tpr, rl = t / tpr, rpp = kThreads / tpr;
  for (int64_t item = blockIdx.x; item < M * nblk; item += gridDim.x) {
    const int64_t m = item / nblk, blk = item % nblk;
    const int64_t n0 = blk * rows_per_block, n1 = n0 + rows_per_block < N ? n0 + rows_per_block : N;
    Acc mx[V], sm[V];
#pragma unroll
    for (int i = 0; i < V; ++i) {
      mx[i] = neg_inf<Acc>();
      sm[i] = Acc(0);
    }
    if (cg < nvec) {
      for (int64_t n = n0 + rl; n < n1; n += rpp) {
        Acc x[V];
        load_vec<scalar_t, V>(l + (m * N + n) * S + int64_t(cg) * V, x);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          if (x[i] > mx[i]) {  // NaN never raises the max; it reaches the sum below
            if (mx[i] != neg_inf<Acc>()) sm[i] *= pow4_factor(mx[i], x[i]);  // (else 0, or NaN: kept)
            mx[i] = x[i];
          }
          // a -inf logit adds 0 (docs §7 rule 3)
          if (x[i] != neg_inf<Acc>()) sm[i] += Pow4Offset<Acc>::of(mx[i]).exp_minus(x[i]);
        }
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) {
      sh_m[t * V + i] = mx[i];
      sh_s[t * V + i] = sm[i];
    }
    __syncthreads();
    for (int c = t; c < nvec * V; c += kThreads) {  // column c = cg * V + i: merge the row lanes in order
      const int g = c / V, i = c % V;
      Acc m2 = neg_inf<Acc>();
      for (int r = 0; r < rpp; ++r) {
        const Acc y = sh_m[(r * tpr + g) * V + i];
        m2 = y > m2 ? y : m2;
      }
      Acc s2 = Acc(0);
      for (int r = 0; r < rpp; ++r) {
        const Acc y = sh_m[(r * tpr + g) * V + i], z = sh_s[(r * tpr + g) * V + i];
        if (y != neg_inf<Acc>())
          s2 += y == m2 ? z : z * pow4_factor(y, m2);
        else
          s2 += z;  // 0, or NaN from a NaN logit of an otherwise all -inf lane
      }
      pm[(m * nblk + blk) * S + c] = m2;
      ps[(m * nblk + blk) * S + c] = s2;
    }
    __syncthreads();
  }
}

// lse[m, s] = logsumexp over the row blocks' (max, sum relative to O(max)); -inf for a column of all -inf logits
// (docs §7 rule 4).
template <typename Acc>
__global__ void ea_lse_combine_kernel(gptr<const Acc> __restrict__ pm, gptr<const Acc> __restrict__ ps,
                                      gptr<Acc> __restrict__ lse, int64_t M, int64_t nblk, int64_t S) {
  AF_GRID_STRIDE(i, M * S) {
    const int64_t s = i % S, m = i / S;
    Acc m2 = neg_inf<Acc>();
    for (int64_t b = 0; b < nblk; ++b) {
      const Acc y = pm[(m * nblk + b) * S + s];
      m2 = y > m2 ? y : m2;
    }
    Acc s2 = Acc(0);
    for (int64_t b = 0; b < nblk; ++b) {
      const Acc y = pm[(m * nblk + b) * S + s], z = ps[(m * nblk + b) * S + s];
      s2 += y == neg_inf<Acc>() ? z : (y == m2 ? z : z * pow4_factor(y, m2));
    }
    lse[i] = m2 == neg_inf<Acc>() ? m2 + s2 : Pow4Offset<Acc>::of(m2).lse(s2);  // -inf (NaN stays NaN)
  }
}

// log p and p of a thread's V columns of one row: z holds the logits and becomes log p (-inf for a masked logit and
// in a column whose lse is -inf, NaN where lse is NaN), o = p (0 where log p = -inf). Returns the thread's part of
// the row sum.
template <typename Acc, int V>
__device__ __forceinline__ Acc ea_row_p(Acc (&z)[V], Acc (&o)[V], const Acc* lse) {
  const Acc ninf = neg_inf<Acc>();
  Acc tot = Acc(0);
#pragma unroll
  for (int i = 0; i < V; ++i) {
    const Acc ls = lse[i];
    z[i] = ls == ninf ? ninf : z[i] - ls;
    o[i] = z[i] == ninf ? Acc(0) : af_exp(z[i]);
    tot += o[i];
  }
  return tot;
}

// The row part of the forward, from log p (z) and p (o) of the thread's V columns and its part of the row sum:
// rowsum = sum_S p + eps (returned) and o becomes out = p / rowsum; the rare row whose sum_S p < 1e-30 is redone in
// log space (eps = 0 cannot give 0/0), and a token with p = 0 for every unit gets out = 0, rowsum = eps. Every lane
// of the warp calls (shuffles inside the tpr-lane groups); `row` is false for a group past the rows (its tot = 0).
template <typename Acc, int V>
__device__ __forceinline__ Acc ea_row_out(const Acc (&z)[V], Acc (&o)[V], Acc tot, bool row, Acc eps, int tpr) {
  const Acc ninf = neg_inf<Acc>();
  tot = group_sum(tot, tpr);
  Acc rs = Acc(0);
  // also NaN: the log-space branch propagates it as well; a row past the end (the last block's tail) is never small,
  // else its tot = 0 would send the real rows of its warp through the log-space branch's exponentials
  const bool small = row && !(tot >= Acc(1e-30));
  if (__any_sync(0xffffffffu, small)) {  // every lane joins the shuffles of the log-space branch
    Acc zm = ninf;
#pragma unroll
    for (int i = 0; i < V; ++i) zm = (z[i] > zm || z[i] != z[i]) ? z[i] : zm;
    zm = group_max(zm, tpr);
    Acc t2 = Acc(0);
#pragma unroll
    for (int i = 0; i < V; ++i) t2 += (z[i] == ninf || zm == ninf) ? Acc(0) : af_exp(z[i] - zm);
    t2 = group_sum(t2, tpr);
    if (small) {
      const Acc log_s = zm == ninf ? ninf : zm + af_log(t2);  // -inf: p = 0 for every unit
      Acc log_r = log_s;
      if (eps > Acc(0)) {  // logaddexp(log_s, log eps)
        const Acc le = af_log(eps);
        const Acc hi = log_s > le ? log_s : le, lo = log_s > le ? le : log_s;
        log_r = hi + af_log(Acc(1) + af_exp(lo - hi));
      }
#pragma unroll
      for (int i = 0; i < V; ++i) o[i] = (z[i] == ninf || log_r == ninf) ? Acc(0) : af_exp(z[i] - log_r);
      rs = (log_s == ninf ? Acc(0) : af_exp(log_s)) + eps;
    }
  }
  if (!small) {
    rs = tot + eps;
    const Acc inv = Acc(1) / rs;
#pragma unroll
    for (int i = 0; i < V; ++i) o[i] *= inv;
  }
  return rs;
}

// Pass 2 of the forward: per row, p = exp(l - lse), out and rowsum (ea_row_out). Second and last read of the logits.
template <typename scalar_t, typename Acc, int V>
__global__ void __launch_bounds__(kThreads)
    ea_rows_fwd_vec_kernel(gptr<const scalar_t> __restrict__ l, gptr<const Acc> __restrict__ lse,
                           gptr<scalar_t> __restrict__ out, gptr<Acc> __restrict__ rowsum, Acc eps, int64_t M,
                           int64_t N, int64_t S, int nvec, int tpr, int64_t rows_per_block, int64_t nblk) {
  ATTNFREE_STATIC_SHARED(Acc, sh_lse, [kThreads * V]);
  const int t = threadIdx.x, cg = t % tpr, rl = t / tpr, rpp = kThreads / tpr;
  for (int64_t item = blockIdx.x; item < M * nblk; item += gridDim.x) {
    const int64_t m = item / nblk, blk = item % nblk;
    for (int64_t c = t; c < S; c += kThreads) sh_lse[c] = lse[m * S + c];
    __syncthreads();
    for (int64_t n = blk * rows_per_block + rl; n < (blk + 1) * rows_per_block; n += rpp) {  // warp-uniform trip
      const bool valid = n < N && cg < nvec;
      Acc z[V], o[V];  // log p, then p, then out
      Acc tot = Acc(0);
      if (valid) {
        load_vec<scalar_t, V>(l + (m * N + n) * S + int64_t(cg) * V, z);
        tot = ea_row_p<Acc, V>(z, o, sh_lse + cg * V);
      } else {
#pragma unroll
        for (int i = 0; i < V; ++i) z[i] = neg_inf<Acc>(), o[i] = Acc(0);
      }
      const Acc rs = ea_row_out<Acc, V>(z, o, tot, n < N, eps, tpr);
      if (valid) store_vec<scalar_t, V>(out + (m * N + n) * S + int64_t(cg) * V, o);
      if (valid && cg == 0) rowsum[m * N + n] = rs;
    }
    __syncthreads();
  }
}

// a (= out; for fp16/bf16 logits p / rowsum rebuilt in fp32, the stored out where rowsum < 1e-30) and p of V
// columns. fp32/fp64: p = out * rowsum (no read of the logits; 0 where out = 0). Reads l or out, not both, except
// for the rare fp16/bf16 row with rowsum < 1e-30.
template <typename scalar_t, typename Acc, int V>
__device__ __forceinline__ void ea_a_p(gptr<const scalar_t> out, gptr<const scalar_t> l, const Acc* lse, Acc rs,
                                       int64_t j, Acc (&a)[V], Acc (&p)[V]) {
  if constexpr (sizeof(scalar_t) == sizeof(Acc)) {
    load_vec<scalar_t, V>(out + j, a);
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = a[i] * rs;
  } else {
    load_vec<scalar_t, V>(l + j, p);
#pragma unroll
    for (int i = 0; i < V; ++i) p[i] = p_of(p[i], lse[i]);
    if (rs > Acc(1e-30)) {
      const Acc inv = Acc(1) / rs;
#pragma unroll
      for (int i = 0; i < V; ++i) a[i] = p[i] * inv;
    } else {
      load_vec<scalar_t, V>(out + j, a);
    }
  }
}

// Backward pass 1, row-blocked: per row rowdot = sum_S dout * a (stored), u = a * (dout - rowdot), and per
// (m, row block) the column sums of u (row lanes merged in shared memory in a fixed order) -> partial (M, nblk, S).
template <typename scalar_t, typename Acc, int V>
__global__ void __launch_bounds__(kThreads)
    ea_bwd_rows_vec_kernel(gptr<const scalar_t> __restrict__ dout, gptr<const scalar_t> __restrict__ out,
                           gptr<const scalar_t> __restrict__ l, gptr<const Acc> __restrict__ lse,
                           gptr<const Acc> __restrict__ rowsum, gptr<Acc> __restrict__ rowdot,
                           gptr<Acc> __restrict__ partial, int64_t M, int64_t N, int64_t S, int nvec, int tpr,
                           int64_t rows_per_block, int64_t nblk) {
  ATTNFREE_STATIC_SHARED(Acc, sh_lse, [kThreads * V]);
  ATTNFREE_STATIC_SHARED(Acc, sh_u, [kThreads * V]);
  const int t = threadIdx.x, cg = t % tpr, rl = t / tpr, rpp = kThreads / tpr;
  const int lead = (t & 31) & ~(tpr - 1);  // lane of the group's column-0 thread
  for (int64_t item = blockIdx.x; item < M * nblk; item += gridDim.x) {
    const int64_t m = item / nblk, blk = item % nblk;
    for (int64_t c = t; c < S; c += kThreads) sh_lse[c] = lse[m * S + c];
    __syncthreads();
    Acc col[V];
#pragma unroll
    for (int i = 0; i < V; ++i) col[i] = Acc(0);
    for (int64_t n = blk * rows_per_block + rl; n < (blk + 1) * rows_per_block; n += rpp) {  // warp-uniform trip
      const bool valid = n < N && cg < nvec;
      const int64_t row = m * N + n;
      Acc rs = (n < N && cg == 0) ? rowsum[row] : Acc(0);
      rs = __shfl_sync(0xffffffffu, rs, lead);
      Acc a[V], p[V], d[V];
      Acc dot = Acc(0);
      if (valid) {
        const int64_t j = row * S + int64_t(cg) * V;
        ea_a_p<scalar_t, Acc, V>(out, l, sh_lse + cg * V, rs, j, a, p);
        load_vec<scalar_t, V>(dout + j, d);
#pragma unroll
        for (int i = 0; i < V; ++i) dot += d[i] * a[i];
      }
      dot = group_sum(dot, tpr);
      if (valid) {
#pragma unroll
        for (int i = 0; i < V; ++i) col[i] += a[i] * (d[i] - dot);
        if (cg == 0) rowdot[row] = dot;
      }
    }
#pragma unroll
    for (int i = 0; i < V; ++i) sh_u[t * V + i] = col[i];
    __syncthreads();
    for (int c = t; c < nvec * V; c += kThreads) {
      const int g = c / V, i = c % V;
      Acc acc = Acc(0);
      for (int r = 0; r < rpp; ++r) acc += sh_u[(r * tpr + g) * V + i];
      partial[(m * nblk + blk) * S + c] = acc;
    }
    __syncthreads();
  }
}

// Backward pass 2, element-wise over the same row blocks: dl = a * (dout - rowdot) - p * colsum.
template <typename scalar_t, typename Acc, int V>
__global__ void __launch_bounds__(kThreads)
    ea_bwd_out_vec_kernel(gptr<const scalar_t> __restrict__ dout, gptr<const scalar_t> __restrict__ out,
                          gptr<const scalar_t> __restrict__ l, gptr<const Acc> __restrict__ lse,
                          gptr<const Acc> __restrict__ rowsum, gptr<const Acc> __restrict__ rowdot,
                          gptr<const Acc> __restrict__ colsum, gptr<scalar_t> __restrict__ dl, int64_t M, int64_t N,
                          int64_t S, int nvec, int tpr, int64_t rows_per_block, int64_t nblk) {
  ATTNFREE_STATIC_SHARED(Acc, sh_lse, [kThreads * V]);
  ATTNFREE_STATIC_SHARED(Acc, sh_col, [kThreads * V]);
  const int t = threadIdx.x, cg = t % tpr, rl = t / tpr, rpp = kThreads / tpr;
  const int lead = (t & 31) & ~(tpr - 1);
  for (int64_t item = blockIdx.x; item < M * nblk; item += gridDim.x) {
    const int64_t m = item / nblk, blk = item % nblk;
    for (int64_t c = t; c < S; c += kThreads) {
      sh_lse[c] = lse[m * S + c];
      sh_col[c] = colsum[m * S + c];
    }
    __syncthreads();
    for (int64_t n = blk * rows_per_block + rl; n < (blk + 1) * rows_per_block; n += rpp) {
      const bool valid = n < N && cg < nvec;
      const int64_t row = m * N + n;
      Acc rs = Acc(0), dot = Acc(0);
      if (n < N && cg == 0) {
        rs = rowsum[row];
        dot = rowdot[row];
      }
      rs = __shfl_sync(0xffffffffu, rs, lead);
      dot = __shfl_sync(0xffffffffu, dot, lead);
      if (valid) {
        const int64_t j = row * S + int64_t(cg) * V;
        Acc a[V], p[V], d[V];
        ea_a_p<scalar_t, Acc, V>(out, l, sh_lse + cg * V, rs, j, a, p);
        load_vec<scalar_t, V>(dout + j, d);
#pragma unroll
        for (int i = 0; i < V; ++i) d[i] = a[i] * (d[i] - dot) - p[i] * sh_col[cg * V + i];
        store_vec<scalar_t, V>(dl + j, d);
      }
    }
    __syncthreads();
  }
}

template <typename Acc>
__global__ void ea_colsum_vec_combine_kernel(gptr<const Acc> __restrict__ partial, gptr<Acc> __restrict__ colsum,
                                             int64_t M, int64_t nblk, int64_t S) {
  AF_GRID_STRIDE(i, M * S) {
    const int64_t s = i % S, m = i / S;
    Acc acc = Acc(0);
    for (int64_t b = 0; b < nblk; ++b) acc += partial[(m * nblk + b) * S + s];
    colsum[i] = acc;
  }
}

// ------------------------------------------------------------------ the cluster kernel (sm_90)
// One read of the logits (docs/design.md §5.3): a matrix m (N x S) is spread over the dynamic shared memory of a
// thread-block cluster of C CTAs, CTA `rank` holding rows [rank R, (rank + 1) R), R = ceil(N / C). Each CTA loads
// its rows once (16-byte loads, kept in shared memory in the logits' dtype), takes their column (max, sum e^{l -
// O(max)}) (one exponential per logit, power-of-four offsets as in ea_colstat_vec_kernel), publishes them in its shared
// memory, and after a cluster barrier merges the C partials read through distributed shared memory, in rank order in
// every CTA, so every CTA holds the same lse (rank 0 writes it). Then the rows as in ea_rows_fwd_vec_kernel, from
// shared memory. Same thread layout as the vectorised kernels (tpr threads per row, V columns per thread).
constexpr int kClusterThreads = 512;
constexpr int kClusterWarps = kClusterThreads / 32;
constexpr int kMaxCluster = 8;    // the portable cluster size
constexpr int kClusterLoads = 4;  // 16-byte loads per thread in flight in the first phase

// (m1, s1) merged with (m2, s2), column states whose sums are relative to the power-of-four offsets of their maxima
// (never NaN: a NaN logit never raises a max; its NaN sum is kept). -inf: an empty state.
template <typename Acc>
__device__ __forceinline__ void pow4_col_merge(Acc& m1, Acc& s1, Acc m2, Acc s2) {
  const Acc mm = m2 > m1 ? m2 : m1;
  const Acc a = (m1 == neg_inf<Acc>() || m1 == mm) ? s1 : s1 * pow4_factor(m1, mm);
  const Acc b = (m2 == neg_inf<Acc>() || m2 == mm) ? s2 : s2 * pow4_factor(m2, mm);
  m1 = mm;
  s1 = a + b;
}

// Shared memory of a CTA: the rows (R x S logits), then in the accumulation type its column partials (max, sum)
// read by the other CTAs, the lse, and the per-warp partials (kClusterWarps x S, twice).
// (S is a multiple of the 16-byte vector: the partials stay aligned.)
inline size_t ea_cluster_smem_bytes(int64_t rows, int64_t S, size_t elt, size_t acc) {
  return size_t(rows * S) * elt + acc * size_t(S) * (3 + 2 * kClusterWarps);
}

template <typename scalar_t, typename Acc, int V>
__global__ void __launch_bounds__(kClusterThreads)
    ea_fwd_cluster_kernel(gptr<const scalar_t> __restrict__ l, gptr<Acc> __restrict__ lse,
                          gptr<scalar_t> __restrict__ out, gptr<Acc> __restrict__ rowsum, Acc eps, int64_t N, int64_t S,
                          int nvec, int tpr, int64_t rows_per_cta) {
  static_assert(V * sizeof(scalar_t) == 16, "one 16-byte vector per thread and row");
  ATTNFREE_DYNAMIC_SHARED(unsigned char, smem, 16);
  scalar_t* const tile = reinterpret_cast<scalar_t*>(smem);
  Acc* const part_m = reinterpret_cast<Acc*>(smem + size_t(rows_per_cta * S) * sizeof(scalar_t));
  Acc* const part_s = part_m + S;
  Acc* const sh_lse = part_s + S;
  Acc* const warp_m = sh_lse + S;
  Acc* const warp_s = warp_m + kClusterWarps * S;
  const Acc ninf = neg_inf<Acc>();
  const unsigned rank = cluster_ctarank(), C = cluster_num_ctas();
  const int64_t m = blockIdx.x / C;
  const int t = threadIdx.x, lane = t & 31, warp = t >> 5, cg = t % tpr, rl = t / tpr;
  const int rpp = kClusterThreads / tpr;
  const int64_t n0 = int64_t(rank) * rows_per_cta;
  const int64_t nr = N - n0 < rows_per_cta ? (N - n0 > 0 ? N - n0 : 0) : rows_per_cta;  // this CTA's rows
  gptr<const scalar_t> lm = l + (m * N + n0) * S;

  // 1. the rows into shared memory and their column statistics (the update of ea_colstat_vec_kernel)
  Acc mx[V], sm[V];
#pragma unroll
  for (int i = 0; i < V; ++i) {
    mx[i] = ninf;
    sm[i] = Acc(0);
  }
  if (cg < nvec) {
    for (int64_t r0 = rl; r0 < nr; r0 += kClusterLoads * rpp) {
      uint4 raw[kClusterLoads];  // the loads of kClusterLoads rows in flight together
#pragma unroll
      for (int b = 0; b < kClusterLoads; ++b) {
        const int64_t r = r0 + b * rpp;
        if (r < nr) raw[b] = *gptr_cast<const uint4>(lm + r * S + int64_t(cg) * V);
      }
#pragma unroll
      for (int b = 0; b < kClusterLoads; ++b) {
        const int64_t r = r0 + b * rpp;
        if (r >= nr) break;
        *reinterpret_cast<uint4*>(tile + r * S + int64_t(cg) * V) = raw[b];
        scalar_t v[V];
        memcpy(v, &raw[b], 16);
#pragma unroll
        for (int i = 0; i < V; ++i) {
          const Acc x = to_acc(v[i]);
          if (x > mx[i]) {                                      // NaN never raises the max; it reaches the sum below
            if (mx[i] != ninf) sm[i] *= pow4_factor(mx[i], x);  // (else 0, or NaN: kept)
            mx[i] = x;
          }
          if (x != ninf) sm[i] += Pow4Offset<Acc>::of(mx[i]).exp_minus(x);  // a -inf logit adds 0
        }
      }
    }
  }
  // the row lanes of a warp (lanes tpr apart hold the same columns), then the warps in order
  for (int o = 16; o >= tpr; o >>= 1) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      const Acc m2 = __shfl_xor_sync(0xffffffffu, mx[i], o), s2 = __shfl_xor_sync(0xffffffffu, sm[i], o);
      pow4_col_merge(mx[i], sm[i], m2, s2);
    }
  }
  if (lane < tpr && cg < nvec) {
#pragma unroll
    for (int i = 0; i < V; ++i) {
      warp_m[warp * S + cg * V + i] = mx[i];
      warp_s[warp * S + cg * V + i] = sm[i];
    }
  }
  __syncthreads();
  for (int64_t c = t; c < S; c += kClusterThreads) {
    Acc m2 = ninf, s2 = Acc(0);
    for (int w = 0; w < kClusterWarps; ++w) pow4_col_merge(m2, s2, warp_m[w * S + c], warp_s[w * S + c]);
    part_m[c] = m2;
    part_s[c] = s2;
  }
  cluster_sync();  // every CTA's partials are written

  // 2. lse: the C partials merged in rank order (the same in every CTA), as ea_lse_combine_kernel
  for (int64_t c = t; c < S; c += kClusterThreads) {
    Acc m2 = ninf;
    for (unsigned q = 0; q < C; ++q) {
      const Acc y = cluster_map_shared(part_m, q)[c];
      m2 = y > m2 ? y : m2;
    }
    Acc s2 = Acc(0);
    for (unsigned q = 0; q < C; ++q) {
      const Acc y = cluster_map_shared(part_m, q)[c], z = cluster_map_shared(part_s, q)[c];
      s2 += y == ninf ? z : (y == m2 ? z : z * pow4_factor(y, m2));
    }
    const Acc ls = m2 == ninf ? m2 + s2 : Pow4Offset<Acc>::of(m2).lse(s2);  // -inf (NaN stays NaN)
    sh_lse[c] = ls;
    if (rank == 0) lse[m * S + c] = ls;
  }
  __syncthreads();

  // 3. the rows from shared memory: p = exp(l - lse), out, rowsum (ea_rows_fwd_vec_kernel)
  const int64_t cap = (rows_per_cta + rpp - 1) / rpp * rpp;  // the same trip count in every warp
  for (int64_t r = rl; r < cap; r += rpp) {
    const bool valid = r < nr && cg < nvec;
    const int64_t j = r * S + int64_t(cg) * V;
    Acc z[V], o[V];
    Acc tot = Acc(0);
    if (valid) {
      const uint4 raw = *reinterpret_cast<const uint4*>(tile + j);
      scalar_t v[V];
      memcpy(v, &raw, 16);
#pragma unroll
      for (int i = 0; i < V; ++i) z[i] = to_acc(v[i]);
      tot = ea_row_p<Acc, V>(z, o, sh_lse + cg * V);
    } else {
#pragma unroll
      for (int i = 0; i < V; ++i) z[i] = ninf, o[i] = Acc(0);
    }
    const Acc rs = ea_row_out<Acc, V>(z, o, tot, r < nr, eps, tpr);
    if (valid) store_vec<scalar_t, V>(out + (m * N + n0) * S + j, o);
    if (valid && cg == 0) rowsum[m * N + n0 + r] = rs;
  }
  cluster_sync();  // the other CTAs may still read this CTA's partials
}

// The cluster size of the cluster kernel for (N, S): the smallest power of two <= kMaxCluster whose CTAs' rows fit in
// the opt-in shared memory (*smem: the bytes per CTA), or 0 (then the two-pass kernels).
template <typename scalar_t, typename acc_t>
inline int ea_cluster_size(int64_t M, int64_t N, int64_t S, size_t* smem) {
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 0;
  for (int C = 1; C <= kMaxCluster; C *= 2) {
    const size_t b = ea_cluster_smem_bytes((N + C - 1) / C, S, sizeof(scalar_t), sizeof(acc_t));
    if (b <= static_cast<size_t>(optin)) {
      if (M > int64_t(INT32_MAX) / C) return 0;  // grid.x = M C
      *smem = b;
      return C;
    }
  }
  return 0;
}

// Vector width (elements per 16 bytes) when the vectorised kernels apply to this shape and these pointers, else 0.
template <typename scalar_t>
inline int vec_width(int64_t S, std::initializer_list<const void*> ptrs) {
  constexpr int V = 16 / sizeof(scalar_t);
  if (S % V != 0 || S / V > 32) return 0;
  for (const void* q : ptrs)
    if (reinterpret_cast<uintptr_t>(q) % 16 != 0) return 0;
  return V;
}

inline unsigned int vec_grid(int64_t items) { return static_cast<unsigned int>(items < (1 << 22) ? items : 1 << 22); }

}  // namespace

// Workspace: the larger of the vectorised kernels' block statistics and the general kernels' scan states.
size_t ea_double_norm_fwd_workspace_bytes(DType dtype, int64_t M, int64_t N, int64_t S) {
  const int64_t nc = M * scan_num_chunks(M, N, S) * S;
  const int64_t nb = (N + kColIters - 1) / kColIters;  // at least kColIters rows per block: an upper bound
  const size_t vec = 2 * align_up(acc_size(dtype) * size_t(M * nb * S));
  const size_t gen = scan_state_bytes(dtype, nc);
  return vec > gen ? vec : gen;
}

cudaError_t ea_double_norm_fwd(DType dtype, const void* logits, void* out, void* lse, void* rowsum, int64_t M,
                               int64_t N, int64_t S, double eps, void* workspace, cudaStream_t stream) {
  if (M <= 0 || N <= 0 || S <= 0) return cudaSuccess;
  return AF_DISPATCH(dtype, [&] {
    const scalar_t* lp = static_cast<const scalar_t*>(logits);
    if (vec_width<scalar_t>(S, {logits, out}) > 0) {
      constexpr int V = 16 / sizeof(scalar_t);
      size_t smem = 0;
      const int C = cluster_kernels_enabled() ? ea_cluster_size<scalar_t, acc_t>(M, N, S, &smem) : 0;
      if (C > 0) {  // one read of the logits
        const cudaError_t err =
            cudaFuncSetAttribute(ea_fwd_cluster_kernel<scalar_t, acc_t, V>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                 static_cast<int>(smem));
        if (err != cudaSuccess) return err;
        const VecGeom g = vec_geom(N, S, V, 1);
        ATTNFREE_LAUNCH_CLUSTER((ea_fwd_cluster_kernel<scalar_t, acc_t, V>), dim3(C, 1, 1),
                                dim3(static_cast<unsigned>(M * C)), kClusterThreads, smem, stream)(
            lp, static_cast<acc_t*>(lse), static_cast<scalar_t*>(out), static_cast<acc_t*>(rowsum),
            static_cast<acc_t>(eps), N, S, g.nvec, g.tpr, (N + C - 1) / C);
        return cudaGetLastError();
      }
      const VecGeom gc = vec_geom(N, S, V, kColIters), gr = vec_geom(N, S, V, kRowIters);
      WsCursor ws(workspace);
      acc_t* pm = ws.take<acc_t>(M * gc.nblk * S);
      acc_t* ps = ws.take<acc_t>(M * gc.nblk * S);
      ATTNFREE_LAUNCH((ea_colstat_vec_kernel<scalar_t, acc_t, V>), vec_grid(M * gc.nblk), kThreads, 0, stream)(
          lp, pm, ps, M, N, S, gc.nvec, gc.tpr, gc.rows_per_block, gc.nblk);
      ATTNFREE_LAUNCH((ea_lse_combine_kernel<acc_t>), grid_for(M * S), kThreads, 0, stream)(
          pm, ps, static_cast<acc_t*>(lse), M, gc.nblk, S);
      ATTNFREE_LAUNCH((ea_rows_fwd_vec_kernel<scalar_t, acc_t, V>), vec_grid(M * gr.nblk), kThreads, 0, stream)(
          lp, static_cast<const acc_t*>(lse), static_cast<scalar_t*>(out), static_cast<acc_t*>(rowsum),
          static_cast<acc_t>(eps), M, N, S, gr.nvec, gr.tpr, gr.rows_per_block, gr.nblk);
      return cudaGetLastError();
    }
    const int64_t L = scan_chunk_len(M, N, S);
    const int64_t nch = (N + L - 1) / L;
    const int64_t nc = M * nch * S;
    WsCursor ws(workspace);
    const ScanState<acc_t> st = take_scan_state<acc_t>(ws, nc);
    EaSrc<scalar_t, acc_t> src{lp, N, S};
    ATTNFREE_LAUNCH((chunk_state_kernel<acc_t>), grid_for(nc), kThreads, 0, stream)(src, st.m, st.a, st.b, M, N, S, L,
                                                                                    nch);
    ATTNFREE_LAUNCH((chunk_scan_kernel<acc_t, false, true>), grid_for(M * S), kThreads, 0, stream)(st.m, st.a, st.b, M,
                                                                                                   nch, S);
    ATTNFREE_LAUNCH((ea_lse_kernel<acc_t>), grid_for(M * S), kThreads, 0, stream)(st.m, st.a, static_cast<acc_t*>(lse),
                                                                                  M, nch, S);
    ATTNFREE_LAUNCH((ea_row_fwd_kernel<scalar_t, acc_t>), row_grid(M * N), kThreads, 0, stream)(
        lp, static_cast<const acc_t*>(lse), static_cast<scalar_t*>(out), static_cast<acc_t*>(rowsum),
        static_cast<acc_t>(eps), M, N, S);
    return cudaGetLastError();
  });
}

size_t ea_double_norm_bwd_workspace_bytes(DType dtype, int64_t M, int64_t N, int64_t S) {
  const int64_t nc = M * scan_num_chunks(M, N, S) * S;
  const int64_t nb = (N + kRowIters - 1) / kRowIters;  // the vectorised kernels' partials (upper bound)
  const size_t a = acc_size(dtype);
  return align_up(a * size_t(M * N)) + align_up(a * size_t(nc > M * nb * S ? nc : M * nb * S)) +
         align_up(a * size_t(M * S));
}

cudaError_t ea_double_norm_bwd(DType dtype, const void* dout, const void* logits, const void* out, const void* lse,
                               const void* rowsum, void* dlogits, int64_t M, int64_t N, int64_t S, void* workspace,
                               cudaStream_t stream) {
  if (M <= 0 || N <= 0 || S <= 0) return cudaSuccess;
  return AF_DISPATCH(dtype, [&] {
    const int64_t L = scan_chunk_len(M, N, S);
    const int64_t nch = (N + L - 1) / L;
    WsCursor ws(workspace);
    acc_t* rowdot = ws.take<acc_t>(M * N);
    const int64_t nbv = (N + kRowIters - 1) / kRowIters;
    acc_t* partial = ws.take<acc_t>(M * (nch * S > nbv * S ? nch : nbv) * S);
    acc_t* colsum = ws.take<acc_t>(M * S);
    const scalar_t* dp = static_cast<const scalar_t*>(dout);
    const scalar_t* lp = static_cast<const scalar_t*>(logits);
    const acc_t* lsep = static_cast<const acc_t*>(lse);
    const acc_t* rsp = static_cast<const acc_t*>(rowsum);
    const scalar_t* op = static_cast<const scalar_t*>(out);
    if (vec_width<scalar_t>(S, {dout, logits, out, dlogits}) > 0) {
      constexpr int V = 16 / sizeof(scalar_t);
      const VecGeom g = vec_geom(N, S, V, kRowIters);
      ATTNFREE_LAUNCH((ea_bwd_rows_vec_kernel<scalar_t, acc_t, V>), vec_grid(M * g.nblk), kThreads, 0, stream)(
          dp, op, lp, lsep, rsp, rowdot, partial, M, N, S, g.nvec, g.tpr, g.rows_per_block, g.nblk);
      ATTNFREE_LAUNCH((ea_colsum_vec_combine_kernel<acc_t>), grid_for(M * S), kThreads, 0, stream)(partial, colsum, M,
                                                                                                   g.nblk, S);
      ATTNFREE_LAUNCH((ea_bwd_out_vec_kernel<scalar_t, acc_t, V>), vec_grid(M * g.nblk), kThreads, 0, stream)(
          dp, op, lp, lsep, rsp, rowdot, colsum, static_cast<scalar_t*>(dlogits), M, N, S, g.nvec, g.tpr,
          g.rows_per_block, g.nblk);
      return cudaGetLastError();
    }
    ATTNFREE_LAUNCH((ea_rowdot_kernel<scalar_t, acc_t>), row_grid(M * N), kThreads, 0, stream)(dp, op, lp, lsep, rsp,
                                                                                               rowdot, M, N, S);
    ATTNFREE_LAUNCH((ea_colsum_partial_kernel<scalar_t, acc_t>), grid_for(M * nch * S), kThreads, 0, stream)(
        dp, op, lp, lsep, rsp, rowdot, partial, M, N, S, L, nch);
    ATTNFREE_LAUNCH((ea_colsum_combine_kernel<acc_t>), grid_for(M * S), kThreads, 0, stream)(partial, colsum, M, nch,
                                                                                             S);
    ATTNFREE_LAUNCH((ea_bwd_out_kernel<scalar_t, acc_t>), grid_for(M * N * S), kThreads, 0, stream)(
        dp, op, lp, lsep, rsp, rowdot, colsum, static_cast<scalar_t*>(dlogits), M, N, S);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace attnfree
