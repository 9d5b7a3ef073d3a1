// AFT-simple (w = 0), global and causal, forward and backward. Plain CUDA C++ (no torch headers).
//
// Forward   y[t,c] = sigmoid(q[t,c]) * sum_t' softmax_t'(k[t',c]) v[t',c]   (causal: t' <= t)
//           lse[t,c] = log sum_t' exp(k[t',c])
// Backward  (P = exp(k[t'] - lse[t]), G = dy*sig(q), H = dy*y)
//           dv[t'] = sum_t P G = exp(k[t'] + mu) * sum_t exp(-lse[t] - mu) G[t]     (mu = max_t -lse[t])
//           dk[t'] = v[t'] dv[t'] - exp(k[t'] + mu) * sum_t exp(-lse[t] - mu) H[t]
//           dq     = dy * y * (1 - sig(q))
//           sums over all t (global) or t >= t' (causal: a reverse scan). k[t'] + mu <= 0 since lse[t] >= k[t'].
//
// Both directions use the chunked log-sum-exp scan of common/cuda_common.cuh (3 kernels: chunk states, scan over
// chunks, re-walk). Global mode is the same machinery with the chunk states reduced to one total per (b, c).
#include "aft_simple/aft_simple.h"
#include "common/cuda_common.cuh"

namespace attnfree {
namespace cuda {
namespace {

template <typename scalar_t, typename Acc>
struct FwdOutSink {
  gptr<const scalar_t> q;
  gptr<scalar_t> y;
  gptr<Acc> lse;
  int64_t T, D;
  __device__ __forceinline__ void operator()(int64_t b, int64_t t, int64_t c, const LseState<Acc>& s) const {
    const int64_t j = (b * T + t) * D + c;
    const Acc mean = s.mean();  // a >= 1: the max item contributes exp(0); 0 for a fully masked row
    store_val(y + j, af_sigmoid(load_acc(q + j)) * mean);
    lse[j] = s.m + af_log(s.a);
  }
};

template <typename scalar_t, typename Acc>
struct BwdOutSink {
  gptr<const scalar_t> dy, q, k, v, y;
  gptr<scalar_t> dq, dk, dv;
  int64_t T, D;
  __device__ __forceinline__ void operator()(int64_t b, int64_t t, int64_t c, const LseState<Acc>& s) const {
    const int64_t j = (b * T + t) * D + c;
    const Acc e = af_exp(load_acc(k + j) + s.m);  // <= 1 (up to rounding of the saved lse)
    const Acc dvv = e * s.a;
    const Acc g = load_acc(dy + j);
    const Acc sq = af_sigmoid(load_acc(q + j));
    store_val(dv + j, dvv);
    store_val(dk + j, load_acc(v + j) * dvv - e * s.b);
    store_val(dq + j, g * load_acc(y + j) * (Acc(1) - sq));
  }
};

}  // namespace

size_t aft_simple_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, bool /*causal*/) {
  return scan_state_bytes(dtype, B * scan_num_chunks(B, T, D) * D);
}
size_t aft_simple_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D, bool causal) {
  return aft_simple_fwd_workspace_bytes(dtype, B, T, D, causal);
}

cudaError_t aft_simple_fwd(DType dtype, const void* q, const void* k, const void* v, void* y, void* lse, int64_t B,
                           int64_t T, int64_t D, bool causal, void* workspace, cudaStream_t stream) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  return AF_DISPATCH(dtype, [&] {
    WsCursor ws(workspace);
    const ScanState<acc_t> st = take_scan_state<acc_t>(ws, B * scan_num_chunks(B, T, D) * D);
    FwdSrc<scalar_t, acc_t> src{static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v), T, D};
    FwdOutSink<scalar_t, acc_t> sink{static_cast<const scalar_t*>(q), static_cast<scalar_t*>(y),
                                     static_cast<acc_t*>(lse), T, D};
    if (causal)
      run_chunked_scan<acc_t, false, false>(src, sink, st, B, T, D, stream);
    else
      run_chunked_scan<acc_t, false, true>(src, sink, st, B, T, D, stream);
    return cudaGetLastError();
  });
}

cudaError_t aft_simple_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v, const void* y,
                           const void* lse, void* dq, void* dk, void* dv, int64_t B, int64_t T, int64_t D, bool causal,
                           void* workspace, cudaStream_t stream) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  return AF_DISPATCH(dtype, [&] {
    WsCursor ws(workspace);
    const ScanState<acc_t> st = take_scan_state<acc_t>(ws, B * scan_num_chunks(B, T, D) * D);
    BwdSrc<scalar_t, acc_t> src{static_cast<const scalar_t*>(dy),
                                static_cast<const scalar_t*>(q),
                                static_cast<const scalar_t*>(y),
                                static_cast<const acc_t*>(lse),
                                T,
                                D};
    BwdOutSink<scalar_t, acc_t> sink{static_cast<const scalar_t*>(dy),
                                     static_cast<const scalar_t*>(q),
                                     static_cast<const scalar_t*>(k),
                                     static_cast<const scalar_t*>(v),
                                     static_cast<const scalar_t*>(y),
                                     static_cast<scalar_t*>(dq),
                                     static_cast<scalar_t*>(dk),
                                     static_cast<scalar_t*>(dv),
                                     T,
                                     D};
    if (causal)
      run_chunked_scan<acc_t, true, false>(src, sink, st, B, T, D, stream);
    else
      run_chunked_scan<acc_t, true, true>(src, sink, st, B, T, D, stream);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace attnfree
