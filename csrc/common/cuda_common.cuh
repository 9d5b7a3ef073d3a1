// Device helpers shared by the CUDA kernels of every op: element loads and conversions, accurate math, the
// log-sum-exp state, launch and workspace helpers, and the chunked scans over time. Plain CUDA C++: no torch headers.
#pragma once
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include "common/emulation/device_compat.cuh"
#include "common/launch.h"

namespace attnfree {
namespace cuda {
// Everything here has internal linkage (unnamed namespace): each .cu gets its own copy of the template kernels,
// so identical instantiations in several translation units never share one host stub (no -rdc needed).
namespace {

// ------------------------------------------------------------------ types and conversions
// Storage type -> the type kernels compute in: float for float16/bfloat16/float32, double for float64.
template <typename T>
struct AccOf {
  using type = float;
};
template <>
struct AccOf<double> {
  using type = double;
};
template <typename T>
using acc_of_t = typename AccOf<T>::type;

__device__ __forceinline__ float to_acc(float x) { return x; }
__device__ __forceinline__ double to_acc(double x) { return x; }
__device__ __forceinline__ float to_acc(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_acc(__nv_bfloat16 x) { return __bfloat162float(x); }

// Round-to-nearest back to the storage type.
template <typename T>
__device__ __forceinline__ T from_acc(acc_of_t<T> x);
template <>
__device__ __forceinline__ float from_acc<float>(float x) {
  return x;
}
template <>
__device__ __forceinline__ double from_acc<double>(double x) {
  return x;
}
template <>
__device__ __forceinline__ __half from_acc<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_acc<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// Global-memory element access (gptr: T* under nvcc, checked and counted under the emulation harness).
template <typename T>
__device__ __forceinline__ acc_of_t<T> load_acc(gptr<const T> p) {
  return to_acc(static_cast<T>(*p));
}
template <typename T>
__device__ __forceinline__ void store_val(gptr<T> p, acc_of_t<T> x) {
  *p = from_acc<T>(x);
}
#if defined(ATTNFREE_EMULATION)  // shared/local memory (raw pointers; under nvcc gptr<T> is T*, the same overloads)
template <typename T>
__device__ __forceinline__ acc_of_t<T> load_acc(const T* p) {
  return to_acc(*p);
}
template <typename T>
__device__ __forceinline__ void store_val(T* p, acc_of_t<T> x) {
  *p = from_acc<T>(x);
}
#endif

// Accurate (not fast-math) exp/log: the fp32 path must match a float64 oracle to ~1e-5.
__device__ __forceinline__ float af_exp(float x) { return expf(x); }
__device__ __forceinline__ double af_exp(double x) { return exp(x); }
__device__ __forceinline__ float af_log(float x) { return logf(x); }
__device__ __forceinline__ double af_log(double x) { return log(x); }
// exp(-x) = inf gives 0, never NaN.
__device__ __forceinline__ float af_sigmoid(float x) { return 1.0f / (1.0f + expf(-x)); }
__device__ __forceinline__ double af_sigmoid(double x) { return 1.0 / (1.0 + exp(-x)); }
template <typename Acc>
__device__ __forceinline__ Acc neg_inf();
template <>
__device__ __forceinline__ float neg_inf<float>() {
  return -INFINITY;
}
template <>
__device__ __forceinline__ double neg_inf<double>() {
  return -(double)INFINITY;
}

// ------------------------------------------------------------------ log-sum-exp state
// Represents   sum_i exp(x_i) * [a_i, b_i]   as   exp(m) * [a, b]   with m = max_i x_i.
// Empty state: m = -inf, a = b = 0. Merging never forms (-inf) - (-inf).
template <typename Acc>
struct LseState {
  Acc m, a, b;
  __device__ __forceinline__ void init() {
    m = neg_inf<Acc>();
    a = Acc(0);
    b = Acc(0);
  }
  __device__ __forceinline__ bool empty() const { return m == neg_inf<Acc>(); }
  // add one item with log-weight x and values (va, vb); x = -inf is a masked item (skipped: never forms
  // (-inf) - (-inf)); a NaN x propagates into a and b
  __device__ __forceinline__ void add(Acc x, Acc va, Acc vb) {
    if (x == neg_inf<Acc>()) return;
    rescale_add(x, va, vb);
  }
  // b / a, or 0 for an empty state (a row with no finite logit: docs/design.md §7 rule 4)
  __device__ __forceinline__ Acc mean() const { return a == Acc(0) ? Acc(0) : b / a; }
  // merge another state (m2, a2, b2), either side possibly empty
  __device__ __forceinline__ void merge(Acc m2, Acc a2, Acc b2) {
    if (m2 == neg_inf<Acc>()) return;
    if (m == neg_inf<Acc>()) {
      m = m2;
      a = a2;
      b = b2;
      return;
    }
    rescale_add(m2, a2, b2);
  }
  // exp(m2) * [a2, b2] added under the larger of the two maxima (m2 finite)
  __device__ __forceinline__ void rescale_add(Acc m2, Acc a2, Acc b2) {
    if (m2 > m) {
      const Acc f = af_exp(m - m2);
      a = a * f + a2;
      b = b * f + b2;
      m = m2;
    } else {
      const Acc f = af_exp(m2 - m);
      a += a2 * f;
      b += b2 * f;
    }
  }
};

// exp(logit - lse): the softmax weight of one logit in a row with log-sum-exp lse. A row with no finite logit
// (lse = -inf) has weight 0 for every key (never (-inf) - (-inf)); NaN propagates.
// (float and double overloads, not a template: arguments may be global-memory references under the harness)
__device__ __forceinline__ float p_of(float logit, float lse) { return lse == -INFINITY ? 0.f : af_exp(logit - lse); }
__device__ __forceinline__ double p_of(double logit, double lse) {
  return lse == -(double)INFINITY ? 0.0 : af_exp(logit - lse);
}
// The log-weight -lse of a backward scan item: a row with lse = -inf contributes nothing (-inf: skipped).
__device__ __forceinline__ float bwd_x(float lse) { return lse == -INFINITY ? -INFINITY : -lse; }
__device__ __forceinline__ double bwd_x(double lse) { return lse == -(double)INFINITY ? -(double)INFINITY : -lse; }

// ------------------------------------------------------------------ launch helpers
constexpr int kThreads = 256;
inline unsigned int grid_for(int64_t n, int threads = kThreads) {
  int64_t g = (n + threads - 1) / threads;
  if (g < 1) g = 1;
  const int64_t cap = int64_t(1) << 22;  // grid-stride loops cover the rest (grid.x limit is 2^31-1)
  if (g > cap) g = cap;
  return static_cast<unsigned int>(g);
}
#define AF_GRID_STRIDE(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)
// The same with one warp per item (blockDim.x a multiple of 32); the lane is threadIdx.x & 31.
#define AF_WARP_STRIDE(i, n)                                                              \
  for (int64_t i = int64_t(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5); i < (n); \
       i += int64_t(gridDim.x) * (blockDim.x >> 5))

inline size_t align_up(size_t x, size_t a = 256) { return (x + a - 1) / a * a; }

// Bump allocator over the caller's workspace (256-byte aligned pieces).
struct WsCursor {
  char* base;
  size_t off = 0;
  explicit WsCursor(void* p) : base(static_cast<char*>(p)) {}
  template <typename U>
  U* take(int64_t n) {
    U* p = reinterpret_cast<U*>(base + off);
    off += align_up(sizeof(U) * static_cast<size_t>(n > 0 ? n : 0));
    return p;
  }
};
inline size_t acc_size(DType dt) { return dtype_size(acc_dtype(dt)); }

// The chunk states (max, a, b) of a chunked scan (below): three arrays of n accumulate-type values.
template <typename Acc>
struct ScanState {
  gptr<Acc> m;
  gptr<Acc> a;
  gptr<Acc> b;
};
template <typename Acc>
inline ScanState<Acc> take_scan_state(WsCursor& ws, int64_t n) {
  Acc* m = ws.take<Acc>(n);
  Acc* a = ws.take<Acc>(n);
  return {m, a, ws.take<Acc>(n)};
}
inline size_t scan_state_bytes(DType dt, int64_t n) { return 3 * align_up(acc_size(dt) * static_cast<size_t>(n)); }

// dtype switch: body sees `scalar_t` (storage type) and `acc_t`.
// clang-format off
#define AF_DISPATCH(DT, ...)                                                                                      \
  [&]() -> cudaError_t {                                                                                          \
    switch (DT) {                                                                                                 \
      case ::attnfree::DType::Float32: { using scalar_t = float; using acc_t = float; return __VA_ARGS__(); }       \
      case ::attnfree::DType::Float16: { using scalar_t = __half; using acc_t = float; return __VA_ARGS__(); }      \
      case ::attnfree::DType::BFloat16: { using scalar_t = __nv_bfloat16; using acc_t = float; return __VA_ARGS__(); } \
      case ::attnfree::DType::Float64: { using scalar_t = double; using acc_t = double; return __VA_ARGS__(); }     \
    }                                                                                                             \
    return cudaErrorInvalidValue;                                                                                 \
  }()
// clang-format on

// ------------------------------------------------------------------ chunked scans over time
// Per (b, c) column of a (B, T, D) problem, items t carry (x_t, a_t, b_t) given by a Src functor:
//     ScanTerm<Acc> Src::operator()(int64_t b, int64_t t, int64_t c) const
// Time is cut into nch chunks of L steps. Three kernels:
//   1. chunk_state: LseState of each chunk (one thread per (b, chunk, c); threads run along c: coalesced).
//   2. chunk_scan:  per (b, c), replace each chunk state by the EXCLUSIVE prefix (REV=false) / suffix (REV=true)
//                   over chunks, or by the total over all chunks (TOTAL=true).
//   3. chunk_apply: re-walk each chunk from its starting state (in time order, or reversed for REV), adding item t
//                   then calling Sink(b, t, c, state) -> an INCLUSIVE prefix/suffix at t; TOTAL: state is the total.
// Work and traffic: items are read twice (state + apply), the chunk states are O(B*D*T/L).
inline int64_t scan_chunk_len(int64_t B, int64_t T, int64_t D) {
  const int64_t cols = B * D;
  int64_t L = 64;
  if (cols < 2048) L = 32;
  if (cols < 256) L = 16;
  if (L > T) L = T < 1 ? 1 : T;
  return L;
}
inline int64_t scan_num_chunks(int64_t B, int64_t T, int64_t D) {
  const int64_t L = scan_chunk_len(B, T, D);
  return (T + L - 1) / L;
}

// One item of a scan: log-weight x and the two values it weights.
template <typename Acc>
struct ScanTerm {
  Acc x, a, b;
};

// Flat index i over (b, chunk, c) -> its column (b, c) and the time range [t0, t1) of its chunk of L steps.
struct ChunkItem {
  int64_t b, c, ch, t0, t1;
  __device__ __forceinline__ ChunkItem(int64_t i, int64_t T, int64_t D, int64_t L, int64_t nch) {
    c = i % D;
    const int64_t r = i / D;
    ch = r % nch;
    b = r / nch;
    t0 = ch * L;
    t1 = (t0 + L < T) ? t0 + L : T;
  }
};

template <typename Acc, class Src>
__global__ void chunk_state_kernel(Src src, gptr<Acc> __restrict__ wm, gptr<Acc> __restrict__ wa,
                                   gptr<Acc> __restrict__ wb, int64_t B, int64_t T, int64_t D, int64_t L, int64_t nch) {
  const int64_t n = B * nch * D;
  AF_GRID_STRIDE(i, n) {
    const ChunkItem it(i, T, D, L, nch);
    LseState<Acc> st;
    st.init();
    for (int64_t t = it.t0; t < it.t1; ++t) {
      const ScanTerm<Acc> e = src(it.b, t, it.c);
      st.add(e.x, e.a, e.b);
    }
    wm[i] = st.m;
    wa[i] = st.a;
    wb[i] = st.b;
  }
}

template <typename Acc, bool REV, bool TOTAL>
__global__ void chunk_scan_kernel(gptr<Acc> __restrict__ wm, gptr<Acc> __restrict__ wa, gptr<Acc> __restrict__ wb,
                                  int64_t B, int64_t nch, int64_t D) {
  const int64_t n = B * D;
  AF_GRID_STRIDE(i, n) {
    const int64_t c = i % D;
    const int64_t b = i / D;
    LseState<Acc> run;
    run.init();
    if (TOTAL) {
      for (int64_t ch = 0; ch < nch; ++ch) {
        const int64_t j = (b * nch + ch) * D + c;
        run.merge(wm[j], wa[j], wb[j]);
      }
      for (int64_t ch = 0; ch < nch; ++ch) {
        const int64_t j = (b * nch + ch) * D + c;
        wm[j] = run.m;
        wa[j] = run.a;
        wb[j] = run.b;
      }
    } else {
      for (int64_t s = 0; s < nch; ++s) {
        const int64_t ch = REV ? nch - 1 - s : s;
        const int64_t j = (b * nch + ch) * D + c;
        const Acc m2 = wm[j], a2 = wa[j], b2 = wb[j];
        wm[j] = run.m;
        wa[j] = run.a;
        wb[j] = run.b;  // exclusive
        run.merge(m2, a2, b2);
      }
    }
  }
}

template <typename Acc, class Src, class Sink, bool REV, bool TOTAL>
__global__ void chunk_apply_kernel(Src src, Sink sink, gptr<const Acc> __restrict__ wm, gptr<const Acc> __restrict__ wa,
                                   gptr<const Acc> __restrict__ wb, int64_t B, int64_t T, int64_t D, int64_t L,
                                   int64_t nch) {
  const int64_t n = B * nch * D;
  AF_GRID_STRIDE(i, n) {
    const ChunkItem it(i, T, D, L, nch);
    LseState<Acc> st;
    st.m = wm[i];
    st.a = wa[i];
    st.b = wb[i];
    for (int64_t s = 0; s < it.t1 - it.t0; ++s) {
      const int64_t t = REV ? it.t1 - 1 - s : it.t0 + s;
      if (!TOTAL) {
        const ScanTerm<Acc> e = src(it.b, t, it.c);
        st.add(e.x, e.a, e.b);
      }
      sink(it.b, t, it.c, st);
    }
  }
}

// Enqueue the three scan kernels. st holds B * nch * D states (scan_num_chunks).
template <typename Acc, bool REV, bool TOTAL, class Src, class Sink>
inline void run_chunked_scan(const Src& src, const Sink& sink, const ScanState<Acc>& st, int64_t B, int64_t T,
                             int64_t D, cudaStream_t stream) {
  const int64_t L = scan_chunk_len(B, T, D);
  const int64_t nch = (T + L - 1) / L;
  const int64_t n = B * nch * D;
  ATTNFREE_LAUNCH((chunk_state_kernel<Acc, Src>), grid_for(n), kThreads, 0, stream)(src, st.m, st.a, st.b, B, T, D, L,
                                                                                    nch);
  ATTNFREE_LAUNCH((chunk_scan_kernel<Acc, REV, TOTAL>), grid_for(B * D), kThreads, 0, stream)(st.m, st.a, st.b, B, nch,
                                                                                              D);
  ATTNFREE_LAUNCH((chunk_apply_kernel<Acc, Src, Sink, REV, TOTAL>), grid_for(n), kThreads, 0, stream)(
      src, sink, st.m, st.a, st.b, B, T, D, L, nch);
}

// ------------------------------------------------------------------ common item sources / sinks
// Forward items: x = k[t], a = 1, b = v[t]   ->   a = sum exp(k - m), b = sum exp(k - m) v.
template <typename scalar_t, typename Acc>
struct FwdSrc {
  gptr<const scalar_t> k, v;
  int64_t T, D;
  __device__ __forceinline__ ScanTerm<Acc> operator()(int64_t b, int64_t t, int64_t c) const {
    const int64_t j = (b * T + t) * D + c;
    return {load_acc(k + j), Acc(1), load_acc(v + j)};
  }
};
// Backward items: x = -lse[t], a = G = dy*sig(q), b = H = dy*y.
template <typename scalar_t, typename Acc>
struct BwdSrc {
  gptr<const scalar_t> dy, q, y;
  gptr<const Acc> lse;
  int64_t T, D;
  __device__ __forceinline__ ScanTerm<Acc> operator()(int64_t b, int64_t t, int64_t c) const {
    const int64_t j = (b * T + t) * D + c;
    const Acc g = load_acc(dy + j);
    return {bwd_x(lse[j]), g * af_sigmoid(load_acc(q + j)), g * load_acc(y + j)};
  }
};
// Store an inclusive state at t as (lse, mean) = (m + log a, b / a): a >= 1 for a non-empty forward state;
// an empty one (every key masked) stores (-inf, 0).
template <typename Acc>
struct SummarySink {
  gptr<Acc> lse_out, mean_out;
  int64_t T, D;
  __device__ __forceinline__ void operator()(int64_t b, int64_t t, int64_t c, const LseState<Acc>& s) const {
    const int64_t j = (b * T + t) * D + c;
    lse_out[j] = s.m + af_log(s.a);  // -inf for an empty state
    mean_out[j] = s.mean();
  }
};
// Store the raw state (m, a, b) at t (backward summaries: a, b may be any sign).
template <typename Acc>
struct RawSink {
  gptr<Acc> m_out, a_out, b_out;
  int64_t T, D;
  __device__ __forceinline__ void operator()(int64_t b, int64_t t, int64_t c, const LseState<Acc>& s) const {
    const int64_t j = (b * T + t) * D + c;
    m_out[j] = s.m;
    a_out[j] = s.a;
    b_out[j] = s.b;
  }
};

}  // namespace
}  // namespace cuda
}  // namespace attnfree
