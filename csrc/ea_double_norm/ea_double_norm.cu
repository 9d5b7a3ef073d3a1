// External-attention double normalisation (Guo et al. 2021), forward and backward. Plain CUDA C++.
// logits (M, N, S) contiguous; p = softmax over N (per (m, s) column); rowsum = sum_S p + eps; out = p / rowsum.
//   lse (M, S) and rowsum (M, N) in the accumulation type.
// Backward: dp = (dout - sum_S(dout*out)) / rowsum ;  dlogits = p * (dp - sum_N(p*dp)),  p = exp(l - lse),
//   evaluated as u = a * (dout - sum_S(dout*a)) (= p*dp), dl = u - p * sum_N u: no division by rowsum, so eps = 0
//   with an underflowed rowsum cannot give inf*0 (the formulation of the Python reference path, docs/design.md §3).
//
// Forward:  column log-sum-exp over N with the chunked state kernels of common.cuh (threads along S, chunks of N
//           for occupancy) -> lse; then one warp per row (m, n): rowsum by warp shuffle, out written.
// Forward rows work in log space (eps = 0 safe). Backward: warp per row -> rowdot; chunked column sums of u over
//   N (threads along S, chunk partials combined in a second kernel, deterministic); elementwise dlogits.
#include "common/cuda_common.cuh"
#include "ea_double_norm/ea_double_norm.h"

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

}  // namespace

size_t ea_double_norm_fwd_workspace_bytes(DType dtype, int64_t M, int64_t N, int64_t S) {
  const int64_t nc = M * scan_num_chunks(M, N, S) * S;
  return scan_state_bytes(dtype, nc);
}

cudaError_t ea_double_norm_fwd(DType dtype, const void* logits, void* out, void* lse, void* rowsum, int64_t M,
                               int64_t N, int64_t S, double eps, void* workspace, cudaStream_t stream) {
  if (M <= 0 || N <= 0 || S <= 0) return cudaSuccess;
  return AF_DISPATCH(dtype, [&] {
    const int64_t L = scan_chunk_len(M, N, S);
    const int64_t nch = (N + L - 1) / L;
    const int64_t nc = M * nch * S;
    WsCursor ws(workspace);
    const ScanState<acc_t> st = take_scan_state<acc_t>(ws, nc);
    const scalar_t* lp = static_cast<const scalar_t*>(logits);
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
  const size_t a = acc_size(dtype);
  return align_up(a * size_t(M * N)) + align_up(a * size_t(nc)) + align_up(a * size_t(M * S));
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
    acc_t* partial = ws.take<acc_t>(M * nch * S);
    acc_t* colsum = ws.take<acc_t>(M * S);
    const scalar_t* dp = static_cast<const scalar_t*>(dout);
    const scalar_t* lp = static_cast<const scalar_t*>(logits);
    const acc_t* lsep = static_cast<const acc_t*>(lse);
    const acc_t* rsp = static_cast<const acc_t*>(rowsum);
    const scalar_t* op = static_cast<const scalar_t*>(out);
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
