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

// The scan over chunk states with a boundary (the recurrent state, docs/design.md §2.7), per (b, c); replaces
// chunk_scan_kernel of common/cuda_common.cuh for the state launchers.
//   Forward (REV = false): the run starts at the initial state s_in (B, 3, D) = (m0, num0, den0) (null: empty),
//     each chunk state becomes the exclusive prefix, and the total after the last chunk is written to s_out
//     (B, 3, D) in the same format.
//   Backward (REV = true): the run starts at the final state's gradient as one more query after the last row,
//     s_in (B, 3, D) = (mF, g_numF, -g_denF) (null: none), each chunk state becomes the exclusive suffix, and the
//     total over every row, scaled by exp(m0) (m0 = row 0 of the initial state, null: -inf), is written to s_out
//     (B, 2, D) = (sum exp(m0 - lse) G, sum exp(m0 - lse) H): the initial state's dv and sum P H as one more key.
template <typename Acc, bool REV>
__global__ void state_scan_kernel(gptr<Acc> __restrict__ wm, gptr<Acc> __restrict__ wa, gptr<Acc> __restrict__ wb,
                                  int64_t B, int64_t nch, int64_t D, gptr<const Acc> s_in, gptr<Acc> s_out,
                                  gptr<const Acc> m0) {
  const int64_t n = B * D;
  AF_GRID_STRIDE(i, n) {
    const int64_t c = i % D;
    const int64_t b = i / D;
    const int64_t s0 = b * 3 * D + c;  // (b, row 0, c) of a (B, 3, D) state
    LseState<Acc> run;
    run.init();
    if (s_in) {
      if (REV)
        run.add(bwd_x(Acc(s_in[s0])), s_in[s0 + D], s_in[s0 + 2 * D]);
      else
        run.merge(s_in[s0], s_in[s0 + 2 * D], s_in[s0 + D]);  // LseState: a = den, b = num
    }
    for (int64_t s = 0; s < nch; ++s) {
      const int64_t ch = REV ? nch - 1 - s : s;
      const int64_t j = (b * nch + ch) * D + c;
      const Acc m2 = wm[j], a2 = wa[j], b2 = wb[j];
      wm[j] = run.m;
      wa[j] = run.a;
      wb[j] = run.b;  // exclusive
      run.merge(m2, a2, b2);
    }
    if (REV) {
      const Acc e = m0 ? (run.empty() ? Acc(0) : af_exp(Acc(m0[s0]) + run.m)) : Acc(0);
      const int64_t o = b * 2 * D + c;
      s_out[o] = e * run.a;
      s_out[o + D] = e * run.b;
    } else {
      s_out[s0] = run.m;
      s_out[s0 + D] = run.b;
      s_out[s0 + 2 * D] = run.a;
    }
  }
}

template <typename Acc, bool REV, class Src, class Sink>
inline void run_state_scan(const Src& src, const Sink& sink, const ScanState<Acc>& st, gptr<const Acc> s_in,
                           gptr<Acc> s_out, gptr<const Acc> m0, int64_t B, int64_t T, int64_t D, cudaStream_t stream) {
  const int64_t L = scan_chunk_len(B, T, D);
  const int64_t nch = (T + L - 1) / L;
  const int64_t n = B * nch * D;
  ATTNFREE_LAUNCH((chunk_state_kernel<Acc, Src>), grid_for(n), kThreads, 0, stream)(src, st.m, st.a, st.b, B, T, D, L,
                                                                                    nch);
  ATTNFREE_LAUNCH((state_scan_kernel<Acc, REV>), grid_for(B * D), kThreads, 0, stream)(st.m, st.a, st.b, B, nch, D,
                                                                                       s_in, s_out, m0);
  ATTNFREE_LAUNCH((chunk_apply_kernel<Acc, Src, Sink, REV, false>), grid_for(n), kThreads, 0, stream)(
      src, sink, st.m, st.a, st.b, B, T, D, L, nch);
}

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

size_t aft_simple_state_fwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D) {
  return aft_simple_fwd_workspace_bytes(dtype, B, T, D, true);
}
size_t aft_simple_state_bwd_workspace_bytes(DType dtype, int64_t B, int64_t T, int64_t D) {
  return aft_simple_fwd_workspace_bytes(dtype, B, T, D, true);
}

cudaError_t aft_simple_state_fwd(DType dtype, const void* q, const void* k, const void* v, const void* initial_state,
                                 void* y, void* lse, void* final_state, int64_t B, int64_t T, int64_t D,
                                 void* workspace, cudaStream_t stream) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  return AF_DISPATCH(dtype, [&] {
    WsCursor ws(workspace);
    const ScanState<acc_t> st = take_scan_state<acc_t>(ws, B * scan_num_chunks(B, T, D) * D);
    FwdSrc<scalar_t, acc_t> src{static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v), T, D};
    FwdOutSink<scalar_t, acc_t> sink{static_cast<const scalar_t*>(q), static_cast<scalar_t*>(y),
                                     static_cast<acc_t*>(lse), T, D};
    run_state_scan<acc_t, false>(src, sink, st, static_cast<const acc_t*>(initial_state),
                                 static_cast<acc_t*>(final_state), static_cast<const acc_t*>(nullptr), B, T, D,
                                 stream);
    return cudaGetLastError();
  });
}

cudaError_t aft_simple_state_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v,
                                 const void* y, const void* lse, const void* final_query, const void* initial_state,
                                 void* dq, void* dk, void* dv, void* key_sums, int64_t B, int64_t T, int64_t D,
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
    run_state_scan<acc_t, true>(src, sink, st, static_cast<const acc_t*>(final_query), static_cast<acc_t*>(key_sums),
                                static_cast<const acc_t*>(initial_state), B, T, D, stream);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace attnfree
