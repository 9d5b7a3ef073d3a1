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
// Channels in 16-byte vectors (D a multiple of 16 / element size, 16-byte aligned buffers): one tiled kernel per
// direction (simple_fwd_tiles_kernel, simple_bwd_tiles_kernel below; docs/design.md §2.7), every input read once,
// no workspace. Other shapes: the chunked log-sum-exp scan of common/cuda_common.cuh (3 kernels: chunk states, scan
// over chunks, re-walk; global mode reduces the chunk states to one total per (b, c)). The recurrent state
// (aft_simple_state_*) rides on either: the initial state starts the scan, the final state is its total.
#include <cstring>

#include "aft_simple/aft_simple.h"
#include "common/cuda_common.cuh"
#include "common/pow4_offsets.cuh"

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

// The backward scan's source (dy, q, y, lse) and output sink (dq, dk, dv) over the launchers' untyped pointers:
// the plain and the state launchers' fallback scans read and write the same tensors.
template <typename scalar_t, typename acc_t>
BwdSrc<scalar_t, acc_t> bwd_src(const void* dy, const void* q, const void* y, const void* lse, int64_t T, int64_t D) {
  return {static_cast<const scalar_t*>(dy),
          static_cast<const scalar_t*>(q),
          static_cast<const scalar_t*>(y),
          static_cast<const acc_t*>(lse),
          T,
          D};
}

template <typename scalar_t, typename acc_t>
BwdOutSink<scalar_t, acc_t> bwd_sink(const void* dy, const void* q, const void* k, const void* v, const void* y,
                                     void* dq, void* dk, void* dv, int64_t T, int64_t D) {
  return {static_cast<const scalar_t*>(dy),
          static_cast<const scalar_t*>(q),
          static_cast<const scalar_t*>(k),
          static_cast<const scalar_t*>(v),
          static_cast<const scalar_t*>(y),
          static_cast<scalar_t*>(dq),
          static_cast<scalar_t*>(dk),
          static_cast<scalar_t*>(dv),
          T,
          D};
}

// ------------------------------------------------------------------ forward at the memory floor
// One CTA per (b, group of NC * VEC channels) walks the whole sequence in tiles of NG * L steps: thread
// (g, cv) holds steps [t0 + g*L, t0 + g*L + L) of VEC channels in registers (16-byte loads of k, v and q, one
// each). Per thread and channel the chunk's max Mc is taken first, then e = exp(k - O(Mc)) once per element (kept
// in registers) gives the chunk state (Mc, sum e, sum e v); O is the power-of-four offset of pow4_offsets.cuh, so
// merging two states scales one side by a power of two, without an exponential. The NG chunk states of a tile are
// scanned in shared memory by one thread per channel, which also carries the prefix from tile to tile (and starts
// it at the initial state). Causal: each chunk is re-walked from its exclusive prefix P under M = max(m_P, Mc):
// a_t = a_P e^{O(m_P) - O(M)} + e^{O(Mc) - O(M)} sum_{t' <= t} e (the scan's factor), lse = O(M) + log a_t,
// y = sigmoid(q) b_t / a_t. Non-causal: the total of the whole column first (threads merge their chunks; one
// reduction, which also takes the column's one log), then y and lse in a second sweep.
//
// Exactness guard (docs/design.md §2.4): a row's largest term is e^{max(m_P, running max) - M}; where it falls
// below e^-GAP (a late spike inside the chunk), the chunk is re-walked per element with the running-max
// recurrence instead (k, v re-read: rare, adversarial inputs only).
// Global traffic: q, k, v read once, y and lse written once; no workspace. SFU per element: exp(k), sigmoid, and
// (causal) log; non-causal one log per column.
constexpr int kFwdL = 8;    // steps per thread
constexpr int kFwdNC = 4;   // channel vectors per CTA
constexpr int kFwdNG = 64;  // time groups per CTA (NG * NC = 256 threads)

template <typename Acc>
__device__ __forceinline__ Acc guard_gap();
template <>
__device__ __forceinline__ float guard_gap<float>() {
  return 40.f;
}
template <>
__device__ __forceinline__ double guard_gap<double>() {
  return 600.0;
}

// VEC elements of S from one 16-byte load / into one 16-byte store.
template <typename S, int VEC>
struct Pack {
  S x[VEC];
};
template <typename S, int VEC>
__device__ __forceinline__ Pack<S, VEC> load16(gptr<const S> p) {
  const uint4 raw = *gptr_cast<const uint4>(p);
  Pack<S, VEC> r;
  memcpy(&r, &raw, 16);
  return r;
}
template <typename S, int VEC>
__device__ __forceinline__ void store16(gptr<S> p, const Pack<S, VEC>& v) {
  uint4 raw;
  memcpy(&raw, &v, 16);
  *gptr_cast<uint4>(p) = raw;
}

// The chunk states of one tile in shared memory, [group][channel of the CTA], and the scans over them. Every
// thread of the CTA calls put / scan / reduce (they hold barriers); thread tid < NCH owns channel tid and its carry.
template <typename Acc, int NG, int NCH>
struct TileStates {
  Acc (&m)[NG][NCH];
  Acc (&a)[NG][NCH];
  Acc (&b)[NG][NCH];
  // per group, the factor e^{O(min) - O(max)} between its exclusive prefix (suffix) and its own state under their
  // larger max (0 when either is empty), left by scan: the group's re-walk needs that same factor (chunk_factors)
  Acc (&f)[NG][NCH];
  // the VEC states of thread group g, channel vector cv
  template <int VEC>
  __device__ __forceinline__ void put(int g, int cv, const Acc* mm, const Acc* aa, const Acc* bb) {
    for (int i = 0; i < VEC; ++i) {
      m[g][cv * VEC + i] = mm[i];
      a[g][cv * VEC + i] = aa[i];
      b[g][cv * VEC + i] = bb[i];
    }
    __syncthreads();
  }
  __device__ __forceinline__ LseState<Acc> get(int g, int col) const {
    LseState<Acc> st;
    st.m = m[g][col];
    st.a = a[g][col];
    st.b = b[g][col];
    return st;
  }
  // each state becomes the exclusive prefix (REV: suffix) over the groups, starting from the carry, which then
  // includes the whole tile
  template <bool REV>
  __device__ __forceinline__ void scan(int tid, LseState<Acc>& carry) {
    if (tid < NCH) {
      for (int s = 0; s < NG; ++s) {
        const int gi = REV ? NG - 1 - s : s;
        const Acc m2 = m[gi][tid], a2 = a[gi][tid], b2 = b[gi][tid];
        m[gi][tid] = carry.m;
        a[gi][tid] = carry.a;
        b[gi][tid] = carry.b;
        f[gi][tid] = pow4_merge(carry, m2, a2, b2);
      }
    }
    __syncthreads();
  }
  // the carry merged with every group's state; also left in group 0 for every thread to read (LSE: and its
  // log-sum-exp in f[0], one log per channel)
  template <bool LSE>
  __device__ __forceinline__ void reduce(int tid, LseState<Acc>& carry) {
    if (tid < NCH) {
      for (int gi = 0; gi < NG; ++gi) pow4_merge(carry, m[gi][tid], a[gi][tid], b[gi][tid]);
      m[0][tid] = carry.m;
      a[0][tid] = carry.a;
      b[0][tid] = carry.b;
      if (LSE) f[0][tid] = Pow4Offset<Acc>::of(carry.m).lse(carry.a);  // -inf for a column with no finite key
    }
    __syncthreads();
  }
};

// A chunk state (mc, ac, bc) merged into a per-thread running state (m, a, b) (pow4_offsets.cuh convention).
template <typename Acc>
__device__ __forceinline__ void merge_into(Acc& m, Acc& a, Acc& b, Acc mc, Acc ac, Acc bc) {
  LseState<Acc> st;
  st.m = m;
  st.a = a;
  st.b = b;
  pow4_merge(st, mc, ac, bc);
  m = st.m;
  a = st.a;
  b = st.b;
}

// The factors of a neighbour state of max mp and a chunk of max mc under M = max(mp, mc): fp = e^{O(mp) - O(M)},
// fc = e^{O(mc) - O(M)} (0 for a -inf max), from the scan's factor f = e^{O(min) - O(max)} of the same pair
// (TileStates::f): no exponential here.
template <typename Acc>
__device__ __forceinline__ void chunk_factors(Acc mp, Acc mc, Acc f, Acc& fp, Acc& fc, Acc& M) {
  if (mp > mc) {
    fp = Acc(1);
    fc = f;  // e^{O(mc) - O(mp)}; 0 for an empty chunk
  } else if (mc == neg_inf<Acc>()) {
    fp = Acc(0);
    fc = Acc(0);
  } else {
    fc = Acc(1);
    fp = f;  // e^{mp - mc}; 0 without a neighbour
  }
  M = mp > mc ? mp : mc;
}

// The re-walk of a chunk of max mc from its neighbour state nb (the exclusive prefix, or suffix when reversed) and
// the scan's factor f of the two:
// the neighbour's sums under M = max(nb.m, mc) (pa, pb), the chunk's factor fc = e^{mc - M}, and whether the chunk
// must run per element (the guard): the smallest row max a step of the chunk sees is max(nb.m, x_edge) with x_edge
// the item at the chunk's entry edge (first step; last when reversed), or without a neighbour the first
// non-masked item x_first from that edge; the guard trips where it lies more than guard_gap below M.
template <typename Acc>
__device__ __forceinline__ bool chunk_rewalk(const LseState<Acc>& nb, Acc mc, Acc f, Acc x_edge, Acc x_first, Acc& pa,
                                             Acc& pb, Acc& fc, Acc& M) {
  Acc fp;
  chunk_factors(nb.m, mc, f, fp, fc, M);
  pa = nb.a * fp;
  pb = nb.b * fp;
  const Acc lo = nb.m != neg_inf<Acc>() ? (nb.m > x_edge ? nb.m : x_edge) : x_first;
  return lo != neg_inf<Acc>() && M - lo > guard_gap<Acc>();
}

template <typename scalar_t, typename Acc, bool CAUSAL>
__global__ void __launch_bounds__(kFwdNG* kFwdNC)
    simple_fwd_tiles_kernel(gptr<const scalar_t> q, gptr<const scalar_t> k, gptr<const scalar_t> v, gptr<scalar_t> y,
                            gptr<Acc> lse, gptr<const Acc> s_in, gptr<Acc> s_out, gptr<const int64_t> cu, int64_t B,
                            int64_t T_all, int64_t D) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  constexpr int L = kFwdL, NC = kFwdNC, NG = kFwdNG, NCH = NC * VEC;
  ATTNFREE_STATIC_SHARED(Acc, sm_m, [NG][NCH]);
  ATTNFREE_STATIC_SHARED(Acc, sm_a, [NG][NCH]);
  ATTNFREE_STATIC_SHARED(Acc, sm_b, [NG][NCH]);
  ATTNFREE_STATIC_SHARED(Acc, sm_f, [NG][NCH]);
  TileStates<Acc, NG, NCH> tiles{sm_m, sm_a, sm_b, sm_f};
  const int tid = threadIdx.x, cv = tid % NC, g = tid / NC;
  const int64_t ncb = (D + NCH - 1) / NCH;
  const int64_t b = blockIdx.x / ncb;
  // packed sequences (cu non-null): CTA row b walks sequence b alone, rows cu[b] .. cu[b + 1] of the (1, total_T, D)
  // buffers, so its scan starts empty (or at state b) at the sequence's first key: a segmented scan
  const int64_t row0 = cu ? int64_t(cu[b]) : b * T_all;
  const int64_t T = cu ? int64_t(cu[b + 1]) - row0 : T_all;
  const int64_t c = (blockIdx.x % ncb) * NCH + cv * VEC;  // first channel of this thread (D % VEC == 0)
  const bool live = c < D;
  const Acc ninf = neg_inf<Acc>();
  // carry of the scan thread tid < NCH (channel tid of the CTA): the prefix before the current tile
  LseState<Acc> carry;
  carry.init();
  const int64_t cs = (blockIdx.x % ncb) * NCH + tid;
  if (tid < NCH && cs < D && s_in)
    carry =
        pow4_from_plain(Acc(s_in[(b * 3) * D + cs]), Acc(s_in[(b * 3 + 2) * D + cs]), Acc(s_in[(b * 3 + 1) * D + cs]));
  const int64_t tile = int64_t(NG) * L;
  // non-causal: per-thread running totals of its chunks
  Acc tm[VEC], ta[VEC], tb[VEC];
  for (int i = 0; i < VEC; ++i) {
    tm[i] = ninf;
    ta[i] = Acc(0);
    tb[i] = Acc(0);
  }
  for (int64_t tb0 = 0; tb0 < T; tb0 += tile) {
    const int64_t t0 = tb0 + int64_t(g) * L;
    int n = 0;
    if (live && t0 < T) n = (T - t0 < L) ? int(T - t0) : L;
    Acc e[L][VEC], vv[L][VEC];
    Acc Mc[VEC], k0[VEC], rf[VEC], S[VEC], A[VEC];  // k0: the chunk's first key, rf: its first non-masked key
    for (int i = 0; i < VEC; ++i) {
      Mc[i] = ninf;
      k0[i] = ninf;
      rf[i] = ninf;
      S[i] = Acc(0);
      A[i] = Acc(0);
    }
    for (int s = 0; s < L; ++s) {
      if (s < n) {
        const int64_t j = (row0 + t0 + s) * D + c;
        const Pack<scalar_t, VEC> kp = load16<scalar_t, VEC>(k + j);
        const Pack<scalar_t, VEC> vp = load16<scalar_t, VEC>(v + j);
        for (int i = 0; i < VEC; ++i) {
          const Acc kk = to_acc(kp.x[i]);
          e[s][i] = kk;
          vv[s][i] = to_acc(vp.x[i]);
          Mc[i] = kk > Mc[i] ? kk : Mc[i];  // NaN ignored here, propagated through its exp below
          if (s == 0) k0[i] = kk;
          if (rf[i] == ninf) rf[i] = kk;
        }
      }
    }
    for (int i = 0; i < VEC; ++i) {
      const Pow4Offset<Acc> off = Pow4Offset<Acc>::of(Mc[i]);
      for (int s = 0; s < L; ++s) {
        if (s < n) {
          e[s][i] = off.exp_minus(e[s][i]);
          S[i] += e[s][i];
          A[i] += e[s][i] * vv[s][i];
        }
      }
    }
    if (!CAUSAL) {
      for (int i = 0; i < VEC; ++i) merge_into(tm[i], ta[i], tb[i], Mc[i], S[i], A[i]);
      continue;
    }
    tiles.template put<VEC>(g, cv, Mc, S, A);
    tiles.template scan<false>(tid, carry);
    Acc ap[VEC], bp[VEC], fc[VEC], MM[VEC];
    bool exact = false;
    for (int i = 0; i < VEC; ++i)  // row maxima only grow along the chunk: its first row is the guard's
      exact |= chunk_rewalk(tiles.get(g, cv * VEC + i), Mc[i], tiles.f[g][cv * VEC + i], k0[i], rf[i], ap[i], bp[i],
                            fc[i], MM[i]);
    if (!exact) {
      Acc sa[VEC], sb[VEC];
      Pow4Offset<Acc> om[VEC];  // the re-walk's sums are relative to O(M)
      for (int i = 0; i < VEC; ++i) {
        sa[i] = Acc(0);
        sb[i] = Acc(0);
        om[i] = Pow4Offset<Acc>::of(MM[i]);
      }
      for (int s = 0; s < L; ++s) {
        if (s < n) {
          const int64_t j = (row0 + t0 + s) * D + c;
          const Pack<scalar_t, VEC> qp = load16<scalar_t, VEC>(q + j);
          Pack<scalar_t, VEC> yp;
          Acc lo[VEC];
          for (int i = 0; i < VEC; ++i) {
            sa[i] += e[s][i];
            sb[i] += e[s][i] * vv[s][i];
            const Acc den = ap[i] + fc[i] * sa[i];
            const Acc num = bp[i] + fc[i] * sb[i];
            lo[i] = om[i].lse(den);  // -inf for a row with no finite logit (den = 0)
            yp.x[i] = from_acc<scalar_t>(den == Acc(0) ? Acc(0) : af_sigmoid(to_acc(qp.x[i])) * (num / den));
          }
          store16<scalar_t, VEC>(y + j, yp);
          for (int h = 0; h < VEC * int(sizeof(Acc)) / 16; ++h)
            store16<Acc, 16 / sizeof(Acc)>(
                lse + j + h * (16 / sizeof(Acc)),
                *reinterpret_cast<const Pack<Acc, 16 / sizeof(Acc)>*>(lo + h * (16 / sizeof(Acc))));
        }
      }
    } else {  // the guard: this chunk per element, running max from the prefix (exact for any spike)
      for (int i = 0; i < VEC; ++i) {
        LseState<Acc> st = pow4_to_plain(tiles.get(g, cv * VEC + i));
        for (int s = 0; s < n; ++s) {
          const int64_t j = (row0 + t0 + s) * D + c + i;
          st.add(load_acc(k + j), Acc(1), load_acc(v + j));
          const Acc mean = st.mean();
          store_val(y + j, af_sigmoid(load_acc(q + j)) * mean);
          lse[j] = st.m + af_log(st.a);
        }
      }
    }
    __syncthreads();  // the shared arrays are rewritten by the next tile
  }
  if (!CAUSAL) {  // the column totals: reduce the NG threads of each channel, then one sweep writing y and lse
    tiles.template put<VEC>(g, cv, tm, ta, tb);
    tiles.template reduce<true>(tid, carry);
    Acc lz[VEC], yb[VEC];
    for (int i = 0; i < VEC; ++i) {
      lz[i] = tiles.f[0][cv * VEC + i];           // lse
      yb[i] = tiles.get(0, cv * VEC + i).mean();  // ybar; 0 for a column with no finite key
    }
    for (int64_t t = g; live && t < T; t += NG) {
      const int64_t j = (row0 + t) * D + c;
      const Pack<scalar_t, VEC> qp = load16<scalar_t, VEC>(q + j);
      Pack<scalar_t, VEC> yp;
      for (int i = 0; i < VEC; ++i) yp.x[i] = from_acc<scalar_t>(af_sigmoid(to_acc(qp.x[i])) * yb[i]);
      store16<scalar_t, VEC>(y + j, yp);
      for (int h = 0; h < VEC * int(sizeof(Acc)) / 16; ++h)
        store16<Acc, 16 / sizeof(Acc)>(
            lse + j + h * (16 / sizeof(Acc)),
            *reinterpret_cast<const Pack<Acc, 16 / sizeof(Acc)>*>(lz + h * (16 / sizeof(Acc))));
    }
  }
  if (tid < NCH && cs < D && s_out) {  // the final state (m, num, den), sums relative to e^m
    carry = pow4_to_plain(carry);
    s_out[(b * 3) * D + cs] = carry.m;
    s_out[(b * 3 + 1) * D + cs] = carry.b;
    s_out[(b * 3 + 2) * D + cs] = carry.a;
  }
}

// ------------------------------------------------------------------ backward at the memory floor
// The same CTA layout as the forward, time reversed. Rows t give items x = -lse (a row with lse = -inf: none),
// G = dy sigmoid(q), H = dy y; a key t' gets dv = e^{k + M} sum_{t >= t'} e^{x - M} G (sum over every row when
// non-causal), sum P H likewise, dk = v dv - sum P H, and dq = H (1 - sigmoid(q)) is written at once. Per chunk:
// the max Mx of x first, w = e^{x - O(Mx)} once per element, wG and wH kept in registers; the chunk states
// (Mx, sum wG, sum wH) are scanned in reverse (exclusive suffix, a carry from the later tiles, started at the final
// state's gradient as one more row); each chunk is re-walked backwards under M = max(m_S, Mx). Guard as in the
// forward: where the smallest row max a key of the chunk sees lies GAP below M, that chunk runs per element.
// Non-causal: one sweep over the rows (totals), one over the keys. Traffic: every input read once, dq, dk, dv
// written once; no workspace. SFU: sigmoid, e^{x - O(Mx)}, e^{k + O(M)} per element (merges: powers of two).
template <typename scalar_t, typename Acc, bool CAUSAL>
__global__ void __launch_bounds__(kFwdNG* kFwdNC)
    simple_bwd_tiles_kernel(gptr<const scalar_t> dy, gptr<const scalar_t> q, gptr<const scalar_t> k,
                            gptr<const scalar_t> v, gptr<const scalar_t> y, gptr<const Acc> lse, gptr<scalar_t> dq,
                            gptr<scalar_t> dk, gptr<scalar_t> dv, gptr<const Acc> s_in, gptr<const Acc> m0,
                            gptr<Acc> s_out, gptr<const int64_t> cu, int64_t B, int64_t T_all, int64_t D) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  constexpr int L = kFwdL, NC = kFwdNC, NG = kFwdNG, NCH = NC * VEC;
  constexpr int LV = 16 / sizeof(Acc);  // lse elements per 16-byte load
  ATTNFREE_STATIC_SHARED(Acc, sm_m, [NG][NCH]);
  ATTNFREE_STATIC_SHARED(Acc, sm_a, [NG][NCH]);
  ATTNFREE_STATIC_SHARED(Acc, sm_b, [NG][NCH]);
  ATTNFREE_STATIC_SHARED(Acc, sm_f, [NG][NCH]);
  TileStates<Acc, NG, NCH> tiles{sm_m, sm_a, sm_b, sm_f};
  const int tid = threadIdx.x, cv = tid % NC, g = tid / NC;
  const int64_t ncb = (D + NCH - 1) / NCH;
  const int64_t b = blockIdx.x / ncb;
  // packed sequences (cu non-null): CTA row b walks sequence b alone, rows cu[b] .. cu[b + 1] of the (1, total_T, D)
  // buffers, so its scan starts empty (or at state b) at the sequence's first key: a segmented scan
  const int64_t row0 = cu ? int64_t(cu[b]) : b * T_all;
  const int64_t T = cu ? int64_t(cu[b + 1]) - row0 : T_all;
  const int64_t c = (blockIdx.x % ncb) * NCH + cv * VEC;
  const bool live = c < D;
  const Acc ninf = neg_inf<Acc>();
  LseState<Acc> carry;
  carry.init();
  const int64_t cs = (blockIdx.x % ncb) * NCH + tid;
  if (tid < NCH && cs < D && s_in)  // the final state's gradient: one item x = -mF with weights (g_numF, -g_denF)
    carry = pow4_from_plain(bwd_x(Acc(s_in[(b * 3) * D + cs])), Acc(s_in[(b * 3 + 1) * D + cs]),
                            Acc(s_in[(b * 3 + 2) * D + cs]));
  const int64_t tile = int64_t(NG) * L;
  const int64_t ntile = (T + tile - 1) / tile;
  Acc tm[VEC], ta[VEC], tb[VEC];  // non-causal: per-thread totals over its rows
  for (int i = 0; i < VEC; ++i) {
    tm[i] = ninf;
    ta[i] = Acc(0);
    tb[i] = Acc(0);
  }
  // rows: causal from the last tile to the first (a suffix scan), non-causal in any order (totals)
  for (int64_t it = 0; it < ntile; ++it) {
    const int64_t tb0 = (CAUSAL ? ntile - 1 - it : it) * tile;
    const int64_t t0 = tb0 + int64_t(g) * L;
    int n = 0;
    if (live && t0 < T) n = (T - t0 < L) ? int(T - t0) : L;
    Acc wG[L][VEC], wH[L][VEC], xs[L][VEC];
    Acc Mx[VEC], xl[VEC], xf[VEC], SG[VEC], SH[VEC];  // xl: the chunk's last item, xf: its last non-skipped one
    for (int i = 0; i < VEC; ++i) {
      Mx[i] = ninf;
      xl[i] = ninf;
      xf[i] = ninf;
      SG[i] = Acc(0);
      SH[i] = Acc(0);
    }
    for (int s = 0; s < L; ++s) {
      if (s >= n) break;
      const int64_t j = (row0 + t0 + s) * D + c;
      const Pack<scalar_t, VEC> dyp = load16<scalar_t, VEC>(dy + j);
      const Pack<scalar_t, VEC> qp = load16<scalar_t, VEC>(q + j);
      const Pack<scalar_t, VEC> yp = load16<scalar_t, VEC>(y + j);
      Pack<scalar_t, VEC> dqp;
      for (int h = 0; h < VEC / LV; ++h) {
        const Pack<Acc, LV> lp = load16<Acc, LV>(lse + j + h * LV);
        for (int u = 0; u < LV; ++u) xs[s][h * LV + u] = bwd_x(lp.x[u]);
      }
      for (int i = 0; i < VEC; ++i) {
        const Acc gy = to_acc(dyp.x[i]);
        const Acc sq = af_sigmoid(to_acc(qp.x[i]));
        const Acc hh = gy * to_acc(yp.x[i]);
        wG[s][i] = gy * sq;
        wH[s][i] = hh;
        dqp.x[i] = from_acc<scalar_t>(hh * (Acc(1) - sq));
        const Acc x = xs[s][i];
        Mx[i] = x > Mx[i] ? x : Mx[i];
        xl[i] = x;
        if (x != ninf) xf[i] = x;
      }
      store16<scalar_t, VEC>(dq + j, dqp);
    }
    for (int i = 0; i < VEC; ++i) {
      const Pow4Offset<Acc> off = Pow4Offset<Acc>::of(Mx[i]);
      for (int s = 0; s < L; ++s) {
        if (s < n) {
          const bool none = xs[s][i] == ninf;  // a row without a finite logit: no item
          const Acc w = off.exp_minus(xs[s][i]);
          wG[s][i] = none ? Acc(0) : w * wG[s][i];
          wH[s][i] = none ? Acc(0) : w * wH[s][i];
          SG[i] += wG[s][i];
          SH[i] += wH[s][i];
        }
      }
    }
    if (!CAUSAL) {
      for (int i = 0; i < VEC; ++i) merge_into(tm[i], ta[i], tb[i], Mx[i], SG[i], SH[i]);
      continue;
    }
    tiles.template put<VEC>(g, cv, Mx, SG, SH);
    tiles.template scan<true>(tid, carry);
    Acc ag[VEC], ah[VEC], fc[VEC], MM[VEC];
    bool exact = false;
    for (int i = 0; i < VEC; ++i)  // suffix maxima shrink along the chunk: its last key is the guard's
      exact |= chunk_rewalk(tiles.get(g, cv * VEC + i), Mx[i], tiles.f[g][cv * VEC + i], xl[i], xf[i], ag[i], ah[i],
                            fc[i], MM[i]);
    if (!exact) {
      Acc cg[VEC], ch[VEC];
      Pow4Offset<Acc> om[VEC];  // the re-walk's sums are relative to O(M)
      for (int i = 0; i < VEC; ++i) {
        cg[i] = Acc(0);
        ch[i] = Acc(0);
        om[i] = Pow4Offset<Acc>::of(MM[i]);
      }
      for (int s = L - 1; s >= 0; --s) {
        if (s < n) {
          const int64_t j = (row0 + t0 + s) * D + c;
          const Pack<scalar_t, VEC> kp = load16<scalar_t, VEC>(k + j);
          const Pack<scalar_t, VEC> vp = load16<scalar_t, VEC>(v + j);
          Pack<scalar_t, VEC> dkp, dvp;
          for (int i = 0; i < VEC; ++i) {
            cg[i] += wG[s][i];
            ch[i] += wH[s][i];
            const Acc kk = to_acc(kp.x[i]);
            const Acc e = MM[i] == ninf ? Acc(0) : om[i].exp_plus(kk);  // <= 4 (k + M <= 0, O < M + U)
            const Acc dvv = e * (ag[i] + fc[i] * cg[i]);
            dvp.x[i] = from_acc<scalar_t>(dvv);
            dkp.x[i] = from_acc<scalar_t>(to_acc(vp.x[i]) * dvv - e * (ah[i] + fc[i] * ch[i]));
          }
          store16<scalar_t, VEC>(dv + j, dvp);
          store16<scalar_t, VEC>(dk + j, dkp);
        }
      }
    } else {  // the guard: this chunk per element, from its suffix state
      for (int i = 0; i < VEC; ++i) {
        LseState<Acc> st = pow4_to_plain(tiles.get(g, cv * VEC + i));
        for (int s = n - 1; s >= 0; --s) {
          const int64_t j = (row0 + t0 + s) * D + c + i;
          const Acc gy = load_acc(dy + j);
          st.add(bwd_x(Acc(lse[j])), gy * af_sigmoid(load_acc(q + j)), gy * load_acc(y + j));
          const Acc e = st.empty() ? Acc(0) : af_exp(load_acc(k + j) + st.m);
          const Acc dvv = e * st.a;
          store_val(dv + j, dvv);
          store_val(dk + j, load_acc(v + j) * dvv - e * st.b);
        }
      }
    }
    __syncthreads();
  }
  if (!CAUSAL) {  // column totals, then one sweep over the keys
    tiles.template put<VEC>(g, cv, tm, ta, tb);
    tiles.template reduce<false>(tid, carry);
    Acc At[VEC], Bt[VEC];
    Pow4Offset<Acc> Ot[VEC];
    bool none[VEC];  // a column whose rows have no finite lse
    for (int i = 0; i < VEC; ++i) {
      const LseState<Acc> tot = tiles.get(0, cv * VEC + i);
      none[i] = tot.empty();
      Ot[i] = Pow4Offset<Acc>::of(tot.m);
      At[i] = tot.a;
      Bt[i] = tot.b;
    }
    for (int64_t t = g; live && t < T; t += NG) {
      const int64_t j = (row0 + t) * D + c;
      const Pack<scalar_t, VEC> kp = load16<scalar_t, VEC>(k + j);
      const Pack<scalar_t, VEC> vp = load16<scalar_t, VEC>(v + j);
      Pack<scalar_t, VEC> dkp, dvp;
      for (int i = 0; i < VEC; ++i) {
        const Acc e = none[i] ? Acc(0) : Ot[i].exp_plus(to_acc(kp.x[i]));
        const Acc dvv = e * At[i];
        dvp.x[i] = from_acc<scalar_t>(dvv);
        dkp.x[i] = from_acc<scalar_t>(to_acc(vp.x[i]) * dvv - e * Bt[i]);
      }
      store16<scalar_t, VEC>(dv + j, dvp);
      store16<scalar_t, VEC>(dk + j, dkp);
    }
  }
  if (CAUSAL && tid < NCH && cs < D && s_out) {  // the initial state as a key before t = 0: every row sees it
    const Acc e = (m0 && !carry.empty()) ? Pow4Offset<Acc>::of(carry.m).exp_plus(Acc(m0[(b * 3) * D + cs])) : Acc(0);
    s_out[(b * 2) * D + cs] = e * carry.a;
    s_out[(b * 2 + 1) * D + cs] = e * carry.b;
  }
}

template <typename scalar_t, typename Acc>
inline void launch_bwd_tiles(const void* dy, const void* q, const void* k, const void* v, const void* y,
                             const void* lse, void* dq, void* dk, void* dv, const void* s_in, const void* m0,
                             void* s_out, const int64_t* cu, int64_t B, int64_t T, int64_t D, bool causal,
                             cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t ncb = (D + kFwdNC * VEC - 1) / (kFwdNC * VEC);
  const unsigned grid = static_cast<unsigned>(B * ncb);
  using S = const scalar_t*;
  if (causal)
    ATTNFREE_LAUNCH((simple_bwd_tiles_kernel<scalar_t, Acc, true>), grid, kFwdNG * kFwdNC, 0, stream)(
        static_cast<S>(dy), static_cast<S>(q), static_cast<S>(k), static_cast<S>(v), static_cast<S>(y),
        static_cast<const Acc*>(lse), static_cast<scalar_t*>(dq), static_cast<scalar_t*>(dk),
        static_cast<scalar_t*>(dv), static_cast<const Acc*>(s_in), static_cast<const Acc*>(m0),
        static_cast<Acc*>(s_out), cu, B, T, D);
  else
    ATTNFREE_LAUNCH((simple_bwd_tiles_kernel<scalar_t, Acc, false>), grid, kFwdNG * kFwdNC, 0, stream)(
        static_cast<S>(dy), static_cast<S>(q), static_cast<S>(k), static_cast<S>(v), static_cast<S>(y),
        static_cast<const Acc*>(lse), static_cast<scalar_t*>(dq), static_cast<scalar_t*>(dk),
        static_cast<scalar_t*>(dv), static_cast<const Acc*>(s_in), static_cast<const Acc*>(m0),
        static_cast<Acc*>(s_out), cu, B, T, D);
}

// True when the tiled forward can run: 16-byte vectors of channels (D % VEC == 0, aligned buffers).
inline bool tiles_ok(DType dt, const void* const* ptrs, int n, int64_t D) {
  const int64_t vec = 16 / static_cast<int64_t>(dtype_size(dt));
  if (D % vec != 0) return false;
  for (int i = 0; i < n; ++i)
    if (ptrs[i] && (reinterpret_cast<uintptr_t>(ptrs[i]) % 16) != 0) return false;
  return true;
}

template <typename scalar_t, typename Acc>
inline void launch_fwd_tiles(const void* q, const void* k, const void* v, void* y, void* lse, const void* s_in,
                             void* s_out, const int64_t* cu, int64_t B, int64_t T, int64_t D, bool causal,
                             cudaStream_t stream) {
  constexpr int VEC = 16 / sizeof(scalar_t);
  const int64_t ncb = (D + kFwdNC * VEC - 1) / (kFwdNC * VEC);
  const unsigned grid = static_cast<unsigned>(B * ncb);
  const auto* qq = static_cast<const scalar_t*>(q);
  const auto* kk = static_cast<const scalar_t*>(k);
  const auto* vv = static_cast<const scalar_t*>(v);
  auto* yy = static_cast<scalar_t*>(y);
  auto* ll = static_cast<Acc*>(lse);
  const auto* si = static_cast<const Acc*>(s_in);
  auto* so = static_cast<Acc*>(s_out);
  if (causal)
    ATTNFREE_LAUNCH((simple_fwd_tiles_kernel<scalar_t, Acc, true>), grid, kFwdNG * kFwdNC, 0, stream)(
        qq, kk, vv, yy, ll, si, so, cu, B, T, D);
  else
    ATTNFREE_LAUNCH((simple_fwd_tiles_kernel<scalar_t, Acc, false>), grid, kFwdNG * kFwdNC, 0, stream)(
        qq, kk, vv, yy, ll, si, so, cu, B, T, D);
}

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

// Packed sequences on the three-kernel scans: the (b, t) grid is (sequence, position) over a padded length T that
// bounds every sequence; a position past its sequence's end is an empty item (skipped by the scan) and writes
// nothing, so each sequence's scan restarts at its first key. cu null: the dense (B, T, D) layout, unchanged.
template <class Inner, typename Acc>
struct SeqSrc {
  Inner in;
  gptr<const int64_t> cu;
  __device__ __forceinline__ ScanTerm<Acc> operator()(int64_t b, int64_t t, int64_t c) const {
    if (!cu) return in(b, t, c);
    const int64_t r = int64_t(cu[b]) + t;
    if (r >= int64_t(cu[b + 1])) return {neg_inf<Acc>(), Acc(0), Acc(0)};
    return in(0, r, c);
  }
};
template <class Inner, typename Acc>
struct SeqSink {
  Inner in;
  gptr<const int64_t> cu;
  __device__ __forceinline__ void operator()(int64_t b, int64_t t, int64_t c, const LseState<Acc>& s) const {
    if (!cu) return in(b, t, c, s);
    const int64_t r = int64_t(cu[b]) + t;
    if (r < int64_t(cu[b + 1])) in(0, r, c, s);
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
                           int64_t T, int64_t D, bool causal, void* workspace, cudaStream_t stream,
                           const int64_t* cu_seqlens) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  const void* ptrs[5] = {q, k, v, y, lse};
  const bool tiles = tiles_ok(dtype, ptrs, 5, D);
  return AF_DISPATCH(dtype, [&] {
    if (tiles) {
      launch_fwd_tiles<scalar_t, acc_t>(q, k, v, y, lse, nullptr, nullptr, cu_seqlens, B, T, D, causal, stream);
      return cudaGetLastError();
    }
    WsCursor ws(workspace);
    const ScanState<acc_t> st = take_scan_state<acc_t>(ws, B * scan_num_chunks(B, T, D) * D);
    SeqSrc<FwdSrc<scalar_t, acc_t>, acc_t> src{{static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v), T, D},
                                               cu_seqlens};
    SeqSink<FwdOutSink<scalar_t, acc_t>, acc_t> sink{
        {static_cast<const scalar_t*>(q), static_cast<scalar_t*>(y), static_cast<acc_t*>(lse), T, D}, cu_seqlens};
    if (causal)
      run_chunked_scan<acc_t, false, false>(src, sink, st, B, T, D, stream);
    else
      run_chunked_scan<acc_t, false, true>(src, sink, st, B, T, D, stream);
    return cudaGetLastError();
  });
}

cudaError_t aft_simple_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v, const void* y,
                           const void* lse, void* dq, void* dk, void* dv, int64_t B, int64_t T, int64_t D, bool causal,
                           void* workspace, cudaStream_t stream, const int64_t* cu_seqlens) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  const void* ptrs[9] = {dy, q, k, v, y, lse, dq, dk, dv};
  const bool tiles = tiles_ok(dtype, ptrs, 9, D);
  return AF_DISPATCH(dtype, [&] {
    if (tiles) {
      launch_bwd_tiles<scalar_t, acc_t>(dy, q, k, v, y, lse, dq, dk, dv, nullptr, nullptr, nullptr, cu_seqlens, B, T, D,
                                        causal, stream);
      return cudaGetLastError();
    }
    WsCursor ws(workspace);
    const ScanState<acc_t> st = take_scan_state<acc_t>(ws, B * scan_num_chunks(B, T, D) * D);
    SeqSrc<BwdSrc<scalar_t, acc_t>, acc_t> src{bwd_src<scalar_t, acc_t>(dy, q, y, lse, T, D), cu_seqlens};
    SeqSink<BwdOutSink<scalar_t, acc_t>, acc_t> sink{bwd_sink<scalar_t, acc_t>(dy, q, k, v, y, dq, dk, dv, T, D),
                                                     cu_seqlens};
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
                                 void* workspace, cudaStream_t stream, const int64_t* cu_seqlens) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  const void* ptrs[7] = {q, k, v, y, lse, initial_state, final_state};
  const bool tiles = tiles_ok(dtype, ptrs, 7, D);
  return AF_DISPATCH(dtype, [&] {
    if (tiles) {
      launch_fwd_tiles<scalar_t, acc_t>(q, k, v, y, lse, initial_state, final_state, cu_seqlens, B, T, D, true, stream);
      return cudaGetLastError();
    }
    WsCursor ws(workspace);
    const ScanState<acc_t> st = take_scan_state<acc_t>(ws, B * scan_num_chunks(B, T, D) * D);
    SeqSrc<FwdSrc<scalar_t, acc_t>, acc_t> src{{static_cast<const scalar_t*>(k), static_cast<const scalar_t*>(v), T, D},
                                               cu_seqlens};
    SeqSink<FwdOutSink<scalar_t, acc_t>, acc_t> sink{
        {static_cast<const scalar_t*>(q), static_cast<scalar_t*>(y), static_cast<acc_t*>(lse), T, D}, cu_seqlens};
    run_state_scan<acc_t, false>(src, sink, st, static_cast<const acc_t*>(initial_state),
                                 static_cast<acc_t*>(final_state), static_cast<const acc_t*>(nullptr), B, T, D, stream);
    return cudaGetLastError();
  });
}

cudaError_t aft_simple_state_bwd(DType dtype, const void* dy, const void* q, const void* k, const void* v,
                                 const void* y, const void* lse, const void* final_query, const void* initial_state,
                                 void* dq, void* dk, void* dv, void* key_sums, int64_t B, int64_t T, int64_t D,
                                 void* workspace, cudaStream_t stream, const int64_t* cu_seqlens) {
  if (B <= 0 || T <= 0 || D <= 0) return cudaSuccess;
  const void* ptrs[12] = {dy, q, k, v, y, lse, dq, dk, dv, final_query, initial_state, key_sums};
  const bool tiles = tiles_ok(dtype, ptrs, 12, D);
  return AF_DISPATCH(dtype, [&] {
    if (tiles) {
      launch_bwd_tiles<scalar_t, acc_t>(dy, q, k, v, y, lse, dq, dk, dv, final_query, initial_state, key_sums,
                                        cu_seqlens, B, T, D, true, stream);
      return cudaGetLastError();
    }
    WsCursor ws(workspace);
    const ScanState<acc_t> st = take_scan_state<acc_t>(ws, B * scan_num_chunks(B, T, D) * D);
    SeqSrc<BwdSrc<scalar_t, acc_t>, acc_t> src{bwd_src<scalar_t, acc_t>(dy, q, y, lse, T, D), cu_seqlens};
    SeqSink<BwdOutSink<scalar_t, acc_t>, acc_t> sink{bwd_sink<scalar_t, acc_t>(dy, q, k, v, y, dq, dk, dv, T, D),
                                                     cu_seqlens};
    run_state_scan<acc_t, true>(src, sink, st, static_cast<const acc_t*>(final_query), static_cast<acc_t*>(key_sums),
                                static_cast<const acc_t*>(initial_state), B, T, D, stream);
    return cudaGetLastError();
  });
}

}  // namespace cuda
}  // namespace attnfree
