// The tensor-core backward of AFT-full (docs/design.md §3). A part of aft_full.cu: included there
// inside namespace aft_full_detail, after the helpers it shares with the forward (column_offset, key_visible, the
// operand formats, the forward's prepass kernels fwd_colmax / fwd_expkv / fwd_rowmax and their workspace layout).
//
// With the forward's fixed references r[t] (row max of w over the visible keys) and m[j] (column max of k over all
// keys), every probability factorises as
//     P[t, s, j] = exp(w[t, s] + k[s, j] - lse[t, j]) = Ew[t, s] * X[s, j] * Sc[t, j]
//     Ew = exp(w - r) <= 1,   X = exp(k - m) <= 1,   Sc = exp(r + m - lse)
// so each exponential is formed once per element of its own operand, and the whole backward is three GEMMs:
//   `bwd_prep_kernel` (one thread per (b, t, c)): dq, and the row operands SG = Sc G, SH = Sc H (G = dy sigmoid(q),
//       H = dy y) into the workspace in the head-major layout [heads][T][B dh] of the forward's X, X v.
//   `bwd_kv_kernel`: CTA = KBM keys x KBN columns of a head, loops over the query rows in steps of KBK:
//       Ew tile (from w and r), SG / SH tiles; gG += Ew^T SG, gH += Ew^T SH in registers across all steps;
//       epilogue dv = X gG, dk = v dv - X gH (X in fp32 from k, m).
//   `bwd_w_kernel`: CTA = WBM query rows x WBN keys of a head (it owns that dw tile), loops over every column of
//       the head in steps of WKC: acc += SG (X v)^T - SH X^T; epilogue dw = Ew acc (fp32 Ew). Deterministic, no
//       atomics; causal tiles above the diagonal only write zeros.
// Operands: bf16 for bf16 inputs, fp32 split into 3xTF32 otherwise (as the forward, docs/design.md §2.5).
// Exact elements: Ew X underflows (each term lost is < 2^-126), which only matters where Sc is large. Where
// Sc > 2^60 (or is NaN) the element (t, j) is left out of SG, SH and its terms are summed exactly per element
// instead (bwd_kv_exact_col for the dk, dv of its column, bwd_w_exact_row for the dw of its row), found through the
// per-row / per-column flags the prepass sets. This catches |k|, |w| ~ 1e4 with misaligned maxima and the causal
// late spike (m raised by a key that rows before it cannot see); NaN reaches the outputs through the same path.
// Rows with lse = -inf (no visible key) contribute nothing.
// Low-rank bias w = u vb^T: the same prepass and dk/dv kernel (w tiles as fp32 dot products from the factor rows of
// the key tile, resident in shared memory, and of each query step); dw is never formed in memory:
//   `bwd_uv_kernel`: CTA = 128 rows of du (or keys of dvb) of a head, loops over the other side's 128-tiles: the
//       dw tile of bwd_w_kernel's GEMM (Ew from both tiles' factor rows in shared memory), contracted on chip with
//       vb (du += dw vb) or u (dvb += dw^T u) into the CTA's own fp32 accumulator rows. Two launches (du, dvb),
//       deterministic, no atomics, no workspace beyond the dense backward's.
// where the factor rows fit (rank <= ~150 for both kernels; larger factors take the per-tile-pair kernels of
// aft_full.cu throughout).

// log2 of Sc = exp(r + m - lse) for an element with lse > -inf, formed in double: r + m may be ~1e4, and float
// rounding there would add its own error to lse's (float lse carries ulp(lse) / 2, ~1.5e-5 at |lse| ~ 300, into
// every P of that element; nothing downstream can remove that).
__device__ __forceinline__ float bwd_scale2(float r, float m, float lse) {
  return static_cast<float>((static_cast<double>(r) + static_cast<double>(m) - static_cast<double>(lse)) *
                            1.4426950408889634);
}

// dq, SG, SH (see above) and the exact flags of rows and columns holding an element with Sc > 2^60 or NaN. The
// flags are set to 1 by any thread (same value: no ordering needed) after the launcher zeroed them.
template <typename E, typename Op>
__global__ void bwd_prep_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q,
                                gptr<const E> __restrict__ y, gptr<const float> __restrict__ lse,
                                gptr<const float> __restrict__ rref, gptr<const float> __restrict__ mref,
                                gptr<E> __restrict__ dq, gptr<Op> __restrict__ sg, gptr<Op> __restrict__ sh,
                                gptr<int> __restrict__ rowflag, gptr<int> __restrict__ colflag, int64_t B, int64_t T,
                                int64_t D, int64_t dh) {
  const int64_t ncols = B * dh;
  AF_GRID_STRIDE(o, B * T * D) {  // o = (h T + t) ncols + j
    const int64_t j = o % ncols, t = (o / ncols) % T, h = o / (ncols * T);
    const int64_t src = column_offset(j, ncols, dh, T, D, h) + t * D;
    const float d = to_acc(dy[src]), sq = af_sigmoid(to_acc(q[src])), yy = to_acc(y[src]);
    dq[src] = from_acc<E>(d * yy * (1.f - sq));
    const float l = lse[src];
    float g = 0.f, hh = 0.f;
    if (l != -INFINITY) {
      const float s2 = bwd_scale2(rref[h * T + t], mref[h * ncols + j], l);
      if (s2 <= kBwdMaxScale2) {
        const float sc = exp2f(s2);
        g = sc * (d * sq);
        hh = sc * (d * yy);
      } else {  // NaN lands here too
        rowflag[h * T + t] = 1;
        colflag[h * ncols + j] = 1;
      }
    }
    store_val(sg + o, g);
    store_val(sh + o, hh);
  }
}

// (t, j) is summed exactly: its lse is finite (or NaN) and Sc > 2^60 or NaN.
__device__ __forceinline__ bool bwd_exact_element(float r, float m, float lse) {
  return lse != -INFINITY && !(bwd_scale2(r, m, lse) <= kBwdMaxScale2);
}

// Exact terms of key s, column j (offset cb) from the exact elements (t, j) of its column: (sum P G, sum P H).
// Returned by value (output references would put the caller's accumulators on the stack).
template <typename E, typename WE, bool LOWRANK>
__device__ __noinline__ float2 bwd_kv_exact_col(const WSrc<WE, LOWRANK> src, gptr<const E> __restrict__ dy,
                                                gptr<const E> __restrict__ q, gptr<const E> __restrict__ y,
                                                gptr<const float> __restrict__ lse, gptr<const float> __restrict__ rh,
                                                float m, float kk, int64_t s, int64_t cb, int64_t T, int64_t D,
                                                bool causal) {
  float sgs = 0.f, shs = 0.f;
  for (int64_t t = causal ? s : 0; t < T; ++t) {
    const int64_t o = cb + t * D;
    const float l = lse[o];
    if (!bwd_exact_element(rh[t], m, l)) continue;
    const float P = p_of(static_cast<float>(src.at(t, s)) + kk, l);
    const float d = to_acc(dy[o]);
    sgs += P * (d * af_sigmoid(to_acc(q[o])));
    shs += P * (d * to_acc(y[o]));
  }
  return make_float2(sgs, shs);
}

// Exact terms of dw[t, s] (bias wv) from the exact elements (t, j) of row t: sum_j P (G v[s] - H).
template <typename E>
__device__ __noinline__ float bwd_w_exact_row(gptr<const E> __restrict__ k, gptr<const E> __restrict__ v,
                                              gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q,
                                              gptr<const E> __restrict__ y, gptr<const float> __restrict__ lse,
                                              gptr<const float> __restrict__ mh, float r, float wv, int64_t t,
                                              int64_t s, int64_t h, int64_t ncols, int64_t dh, int64_t T, int64_t D) {
  float acc = 0.f;
  for (int64_t j = 0; j < ncols; ++j) {
    const int64_t cb = column_offset(j, ncols, dh, T, D, h), o = cb + t * D, op = cb + s * D;
    const float l = lse[o];
    if (!bwd_exact_element(r, mh[j], l)) continue;
    const float P = p_of(wv + static_cast<float>(to_acc(k[op])), l);
    const float d = to_acc(dy[o]);
    acc += P * (d * af_sigmoid(to_acc(q[o])) * to_acc(v[op]) - d * to_acc(y[o]));
  }
  return acc;
}

// w[t, s0 + i] = sum_r u[t, r] vb[s0 + i, r], i < 16, from factor rows in shared memory (urow: row t, vrows: the 16
// keys' rows, row stride ldu = rank + 1), as fp32 fmaf in rank order: the order of the row-max prepass
// (lowrank_tile), so that w - r <= 0 holds exactly where r is the row's maximum.
__device__ __forceinline__ void lowrank_w_strip(const float* urow, const float* vrows, int ldu, float (&wv)[16]) {
#pragma unroll
  for (int i = 0; i < 16; ++i) wv[i] = 0.f;
#pragma unroll 1
  for (int r = 0; r < ldu - 1; ++r) {
    const float uu = urow[r];
#pragma unroll
    for (int i = 0; i < 16; ++i) wv[i] = fmaf(uu, vrows[i * ldu + r], wv[i]);
  }
}

#if AFT_FULL_TC_ARCH
// A warp's FM x FN accumulator fragments (16 x 16) over rows r0 + 16 i and columns c0 + 16 jj:
// acc[i][jj] += A[r0 + 16 i .., 0 .. K) B[0 .. K, c0 + 16 jj ..). LA/LB: wmma::row_major or wmma::col_major
// (element (i, k) of a col_major A lives at A[k * lda + i], element (k, n) of a col_major B at B[n * ldb + k]).
// NB > 1: NB right-hand sides sharing the A fragments, into NB accumulator sets.
template <bool F32OPS, typename LA, typename LB, int FM, int FN>
struct TileMma {
  static constexpr int KS = F32OPS ? 8 : 16;
  using Op = typename TcCfg<F32OPS>::Op;
  using Prec = typename std::conditional<F32OPS, wmma::precision::tf32, __nv_bfloat16>::type;
  using Acc = wmma::fragment<wmma::accumulator, 16, 16, KS, float>;
  using FA = wmma::fragment<wmma::matrix_a, 16, 16, KS, Prec, LA>;
  using FB = wmma::fragment<wmma::matrix_b, 16, 16, KS, Prec, LB>;
  template <int NB>
  __device__ __forceinline__ static void run(const Op* A, int lda, const Op* const (&Bm)[NB], int ldb, int r0, int c0,
                                             int K, Acc (&acc)[NB][FM][FN]) {
    constexpr bool a_row = std::is_same<LA, wmma::row_major>::value;
    constexpr bool b_row = std::is_same<LB, wmma::row_major>::value;
    FA a[FM], as[FM];
    FB b, bs;
#pragma unroll 1
    for (int kk = 0; kk < K; kk += KS) {
#pragma unroll
      for (int i = 0; i < FM; ++i) {
        const int r = r0 + 16 * i;
        wmma::load_matrix_sync(a[i], a_row ? A + r * lda + kk : A + kk * lda + r, lda);
        if constexpr (F32OPS) split_tf32(a[i], as[i]);
      }
#pragma unroll
      for (int nb = 0; nb < NB; ++nb) {
#pragma unroll
        for (int jj = 0; jj < FN; ++jj) {
          const int c = c0 + 16 * jj;
          wmma::load_matrix_sync(b, b_row ? Bm[nb] + kk * ldb + c : Bm[nb] + c * ldb + kk, ldb);
          if constexpr (F32OPS) split_tf32(b, bs);
#pragma unroll
          for (int i = 0; i < FM; ++i) {
            if constexpr (F32OPS) {
              mma_3xtf32(acc[nb][i][jj], a[i], as[i], b, bs);
            } else {
              wmma::mma_sync(acc[nb][i][jj], a[i], b, acc[nb][i][jj]);
            }
          }
        }
      }
    }
  }
};
#endif  // AFT_FULL_TC_ARCH

// dk/dv tiling: KBM keys x KBN columns per CTA, KBK query rows per step; 8 warps as KWM (keys) x KWN (columns),
// each KFM x KFN fragments for gG and for gH (2 KFM KFN x 8 = 128 fp32 registers per thread).
constexpr int KBM = 128, KBN = 128, KBK = 64, KWM = 4, KWN = 2;
constexpr int KFM = KBM / (16 * KWM), KFN = KBN / (16 * KWN);
static_assert(KWM * KWN * 32 == NT && KBM == KBN && NT == 4 * KBK && KBM == 4 * 32, "dk/dv tiling");

// CL: CTAs per cluster along the key tiles (1: no cluster; the cluster kernels double-buffer the step's operand
// set Ew, SG, SH, NB = 2, so that one cluster barrier per step suffices).
template <bool F32OPS, int CL = 1>
struct BwdKvCfg {
  using Op = typename TcCfg<F32OPS>::Op;
  static constexpr int LD = F32OPS ? KBM + 4 : KBM + 8;  // Ew [KBK][LD] (query row, key), SG / SH [KBK][LD]
  static constexpr int NB = CL > 1 ? 2 : 1;
  static constexpr size_t kTile = size_t(KBK) * LD * sizeof(Op);
  static constexpr size_t kSet = 3 * kTile;  // Ew, SG, SH of one step
  static constexpr size_t kOps = NB * kSet;
  static constexpr size_t kScratch = size_t(NT / 32) * 2 * 256 * sizeof(float);          // per warp: gG, gH 16 x 16
  static constexpr size_t kM = ((kOps > kScratch ? kOps : kScratch) + 127) / 128 * 128;  // float m[KBN]
  static constexpr size_t kFlag = kM + KBN * sizeof(float);                              // int colflag[KBN]
  static constexpr size_t kBytes = kFlag + KBN * sizeof(int);
  static_assert(KBK % CL == 0 && kBytes <= 227 * 1024, "dk/dv cluster tiling");
};

// dw tiling: WBM query rows x WBN keys per CTA, WKC columns per step; 8 warps as WWM x WWN, each WFM x WFN fragments
// (128 fp32 registers per thread).
constexpr int WBM = 256, WBN = 128, WKC = 32, WWM = 4, WWN = 2;
constexpr int WFM = WBM / (16 * WWM), WFN = WBN / (16 * WWN);
static_assert(WWM * WWN * 32 == NT, "dw tiling");

// CL: CTAs per cluster along the key tiles (1: no cluster; the cluster kernels double-buffer the step's operand
// set SG, SH, X v, -X, NB = 2, so that one cluster barrier per step suffices).
template <bool F32OPS, int CL = 1>
struct BwdWCfg {
  using Op = typename TcCfg<F32OPS>::Op;
  static constexpr int LD = F32OPS ? WKC + 4 : WKC + 8;  // SG, SH [WBM][LD]; X v, -X [WBN][LD] (row, column)
  static constexpr int NB = CL > 1 ? 2 : 1;
  static constexpr size_t kRowTile = size_t(WBM) * LD * sizeof(Op);
  static constexpr size_t kKeyTile = size_t(WBN) * LD * sizeof(Op);
  static constexpr size_t kSet = 2 * (kRowTile + kKeyTile);
  static constexpr size_t kOps = NB * kSet;
  static constexpr size_t kScratch = size_t(NT / 32) * 256 * sizeof(float);
  static constexpr size_t kR = ((kOps > kScratch ? kOps : kScratch) + 127) / 128 * 128;  // float r[WBM]
  static constexpr size_t kFlag = kR + WBM * sizeof(float);                              // int rowflag[WBM]
  static constexpr size_t kBytes = kFlag + WBM * sizeof(int);
  static_assert(WBM % CL == 0 && kBytes <= 227 * 1024, "dw cluster tiling");
};

// The cluster kernels' share of a step's row operands: rows [first, first + ROWS) of Sc G, Sc H (source row
// t0 + row, column j0 + col; 0 past T or ncols) stored into the SG, SH tiles of all CL CTAs of the cluster. The CL
// destinations are mapped once per call, not once per element.
template <int CL, int ROWS, int COLS, typename Op>
__device__ __forceinline__ void share_row_operands(Op* SG, Op* SH, int LD, int first, gptr<const Op> sgh,
                                                   gptr<const Op> shh, int64_t t0, int64_t j0, int64_t T, int64_t ncols,
                                                   int tid) {
  Op* dg[CL];
  Op* dh[CL];
#pragma unroll
  for (int c = 0; c < CL; ++c) {
    dg[c] = cluster_map_shared(SG, static_cast<unsigned>(c));
    dh[c] = cluster_map_shared(SH, static_cast<unsigned>(c));
  }
#pragma unroll 2
  for (int e = tid; e < ROWS * COLS; e += NT) {
    const int row = first + e / COLS, col = e % COLS;
    const int64_t t = t0 + row, j = j0 + col;
    const bool ok = t < T && j < ncols;
    const float g = ok ? to_acc(sgh[t * ncols + j]) : 0.f;
    const float hh = ok ? to_acc(shh[t * ncols + j]) : 0.f;
#pragma unroll
    for (int c = 0; c < CL; ++c) {
      store_val(dg[c] + row * LD + col, g);
      store_val(dh[c] + row * LD + col, hh);
    }
  }
}

// dk, dv of KBM keys x KBN columns of head h (see the top of this file). ek: X = exp(k - m) is recomputed in fp32
// from k and m here, so only the row operands come from the workspace.
// CL > 1 (sm_90, dense bias only): launched in clusters of CL CTAs along blockIdx.y, i.e. CL adjacent key tiles of
// the same column block, which need the same SG, SH rows at every step. Each CTA loads KBK / CL of the step's rows
// and stores them into every CTA's shared memory (distributed shared memory), so the cluster reads each row once
// instead of CL times; the step's operand set is double-buffered and one cluster barrier per step orders the
// stores before the reads (a CTA writes buffer b again only after every CTA passed the barrier that follows its
// last reads of b). All CTAs of a cluster run the same steps: causal, from the cluster's first key tile on, and a
// CTA with no visible key in a step (or past the last key: the launcher pads the grid to a multiple of CL) skips
// its Ew tile and MMAs but still loads its share.
template <typename E, typename WE, bool LOWRANK, int CL = 1>
__global__ void __launch_bounds__(NT, AFT_FULL_MIN_BLOCKS)
    bwd_kv_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q, gptr<const E> __restrict__ k,
                  gptr<const E> __restrict__ v, gptr<const WE> __restrict__ w, gptr<const WE> __restrict__ u,
                  gptr<const WE> __restrict__ vbias, int64_t rank, gptr<const E> __restrict__ y,
                  gptr<const float> __restrict__ lse,
                  gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ sg,
                  gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ sh,
                  gptr<const float> __restrict__ rref, gptr<const float> __restrict__ mref,
                  gptr<const int> __restrict__ colflag, gptr<E> __restrict__ dk, gptr<E> __restrict__ dv, int64_t B,
                  int64_t T, int64_t D, int64_t dh, bool causal) {
#if AFT_FULL_TC_ARCH
  constexpr bool F32OPS = uses_tf32_operands<E>();
  static_assert(CL == 1 || !LOWRANK, "the cluster kernel is the dense bias's");
  using Cfg = BwdKvCfg<F32OPS, CL>;
  using Op = typename Cfg::Op;
  using Mma = TileMma<F32OPS, wmma::col_major, wmma::row_major, KFM, KFN>;
  constexpr int LD = Cfg::LD;
  ATTNFREE_DYNAMIC_SHARED(unsigned char, smem, 128);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t h = blockIdx.z;
  const int crank = CL > 1 ? static_cast<int>(blockIdx.y % CL) : 0;  // = cluster_ctarank() for clusters (1, CL, 1)
  const int64_t s0 = static_cast<int64_t>(blockIdx.y) * KBM;
  const int64_t sc0 = s0 - crank * KBM;  // the cluster's first key
  const int64_t j0 = static_cast<int64_t>(blockIdx.x) * KBN;
  const int64_t ncols = B * dh;
  float* m_s = reinterpret_cast<float*>(smem + Cfg::kM);
  int* flag_s = reinterpret_cast<int*>(smem + Cfg::kFlag);
  if (tid < KBN && s0 < T) {  // read once per column here, not once per output in the epilogue (padding: none)
    const bool ok = j0 + tid < ncols;
    m_s[tid] = ok ? mref[h * ncols + j0 + tid] : 0.f;
    flag_s[tid] = ok ? colflag[h * ncols + j0 + tid] : 0;
  }
  const int wr0 = (warp / KWN) * 16 * KFM, wc0 = (warp % KWN) * 16 * KFN;  // keys, columns of this warp
  typename Mma::Acc acc[2][KFM][KFN];                                      // [0]: gG, [1]: gH
#pragma unroll
  for (int nb = 0; nb < 2; ++nb)
#pragma unroll
    for (int i = 0; i < KFM; ++i)
#pragma unroll
      for (int jj = 0; jj < KFN; ++jj) wmma::fill_fragment(acc[nb][i][jj], 0.f);

  const WSrc<WE, LOWRANK> src = head_bias<WE, LOWRANK>(w, u, vbias, h, T, rank);
  gptr<const Op> sgh = sg + h * T * ncols;
  gptr<const Op> shh = sh + h * T * ncols;
  const int erow = tid >> 2, epart = tid & 3;  // Ew roles: query row erow, keys 32 epart .. + 32
  // low rank: the key tile's rows of vb stay in shared memory (Vt [KBM][rank + 1]); each step loads its rows of u
  // (Ut [KBK][rank + 1]) and forms w as fp32 dot products in the order of the row-max prepass (lowrank_tile)
  const int ldu = static_cast<int>(rank) + 1;
  float* Vt = reinterpret_cast<float*>(smem + Cfg::kBytes);
  float* Ut = Vt + KBM * ldu;
  if constexpr (LOWRANK) {
    for (int64_t e = tid; e < KBM * rank; e += NT) {
      const int64_t kk = e / rank, c = e % rank;
      Vt[kk * ldu + c] = (s0 + kk < T) ? static_cast<float>(to_acc(src.vb[(s0 + kk) * rank + c])) : 0.f;
    }
  }
  if constexpr (CL > 1) cluster_sync();  // every CTA of the cluster runs before any stores into its shared memory
  // causal: query rows before the cluster's first key see none of its tiles (sc0 is a multiple of KBK)
  int step = 0;
  for (int64_t t0 = causal ? sc0 : 0; t0 < T; t0 += KBK, ++step) {
    unsigned char* set = smem + (CL > 1 ? (step & 1) : 0) * Cfg::kSet;
    Op* Ew = reinterpret_cast<Op*>(set);
    Op* SG = reinterpret_cast<Op*>(set + Cfg::kTile);
    Op* SH = reinterpret_cast<Op*>(set + 2 * Cfg::kTile);
    const Op* const rhs[2] = {SG, SH};
    // does any key of this tile see a row of this step? (without clusters always: the loop starts at s0)
    const bool active = s0 < T && (!causal || t0 + KBK > s0);
    // (1) Ew = exp(w - r) over the visible keys (0 elsewhere and for masked keys, w = -inf)
    if constexpr (LOWRANK) {
      for (int64_t e = tid; e < KBK * rank; e += NT) {
        const int64_t rr = e / rank, c = e % rank;
        Ut[rr * ldu + c] = (t0 + rr < T) ? static_cast<float>(to_acc(src.u[(t0 + rr) * rank + c])) : 0.f;
      }
      __syncthreads();
      const int64_t t = t0 + erow;
      const float rr = (t < T) ? rref[h * T + t] : 0.f;
#pragma unroll 1
      for (int half = 0; half < 2; ++half) {
        const int kb = epart * 32 + half * 16;
        float wv[16];
        lowrank_w_strip(Ut + erow * ldu, Vt + kb * ldu, ldu, wv);
#pragma unroll
        for (int i = 0; i < 16; ++i) {
          const bool vis = key_visible(t, s0 + kb + i, T, causal) && wv[i] != -INFINITY;
          store_val(&Ew[erow * LD + kb + i], vis ? exp2f((wv[i] - rr) * kLog2e) : 0.f);
        }
      }
    } else if (active) {
      const int64_t t = t0 + erow;
      const float rr = (t < T) ? rref[h * T + t] : 0.f;
#pragma unroll 8
      for (int i = 0; i < 32; ++i) {
        const int64_t s = s0 + epart * 32 + i;
        float e = 0.f;
        if (key_visible(t, s, T, causal)) {
          const float wv = to_acc(src.w[t * T + s]);
          if (wv != -INFINITY) e = exp2f((wv - rr) * kLog2e);
        }
        store_val(&Ew[erow * LD + epart * 32 + i], e);
      }
    }
    // (2) the SG, SH tiles (0 past the last row / column); clusters: this CTA's KBK / CL rows, into every CTA
    if constexpr (CL == 1) {
#pragma unroll 4
      for (int e = tid; e < KBK * KBN; e += NT) {
        const int row = e / KBN, col = e % KBN;
        const int64_t t = t0 + row, j = j0 + col;
        const bool ok = t < T && j < ncols;
        store_val(&SG[row * LD + col], ok ? to_acc(sgh[t * ncols + j]) : 0.f);
        store_val(&SH[row * LD + col], ok ? to_acc(shh[t * ncols + j]) : 0.f);
      }
      __syncthreads();
    } else {
      share_row_operands<CL, KBK / CL, KBN>(SG, SH, LD, crank * (KBK / CL), sgh, shh, t0, j0, T, ncols, tid);
      cluster_sync();
    }
    // (3) gG += Ew^T SG, gH += Ew^T SH
    if (active) Mma::template run<2>(Ew, LD, rhs, LD, wr0, wc0, KBK, acc);
    if constexpr (CL == 1) __syncthreads();  // before the next step (or the epilogue's scratch) overwrites the operands
  }
  // clusters: no CTA stores into this one after the last cluster barrier; the epilogue's scratch aliases the operands
  if constexpr (CL > 1) __syncthreads();

  // ---------------- epilogue: per fragment pair through a per-warp scratch (aliases the dead operands)
  float* sc = reinterpret_cast<float*>(smem) + warp * 512;
#pragma unroll
  for (int fm = 0; fm < KFM; ++fm) {
#pragma unroll
    for (int fn = 0; fn < KFN; ++fn) {
      wmma::store_matrix_sync(sc, acc[0][fm][fn], 16, wmma::mem_row_major);
      wmma::store_matrix_sync(sc + 256, acc[1][fm][fn], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll 1
      for (int e = lane; e < 256; e += 32) {
        const int col = wc0 + 16 * fn + e % 16;
        const int64_t s = s0 + wr0 + 16 * fm + e / 16, j = j0 + col;
        if (s < T && j < ncols) {
          const int64_t cb = column_offset(j, ncols, dh, T, D, h), o = cb + s * D;
          const float kk = to_acc(k[o]), m = m_s[col];
          const float X = (kk == -INFINITY) ? 0.f : exp2f((kk - m) * kLog2e);  // masked key: no gradient
          float pg = X * sc[e], ph = X * sc[256 + e];
          if (flag_s[col] != 0) {  // rare: the exact elements of this column
            const float2 ex =
                bwd_kv_exact_col<E, WE, LOWRANK>(src, dy, q, y, lse, rref + h * T, m, kk, s, cb, T, D, causal);
            pg += ex.x;
            ph += ex.y;
          }
          dv[o] = from_acc<E>(pg);
          dk[o] = from_acc<E>(to_acc(v[o]) * pg - ph);
        }
      }
      __syncwarp();  // before the next fragment pair overwrites the scratch
    }
  }
#else
  __trap();  // sm < 80: the launchers never select this kernel there (aft_full_tc_supported)
#endif
}

// dw of WBM query rows x WBN keys of head h (see the top of this file). ek, ekv: the forward's X, X v.
// CL > 1 (sm_90): launched in clusters of CL CTAs along blockIdx.x, i.e. CL adjacent key tiles of the same query
// rows, which need the same SG, SH tiles at every step; each CTA loads WBM / CL of their rows into every CTA's shared
// memory (double-buffered, one cluster barrier per step, as bwd_kv_kernel). Causal: a cluster whose first tile lies
// above the diagonal writes zeros and leaves at once; a CTA above the diagonal (or past the last key: the launcher
// pads the grid to a multiple of CL) in a cluster that is not writes its zeros and still loads its share of every
// step, without X tiles, MMAs or epilogue.
template <typename E, typename WE, int CL = 1>
__global__ void __launch_bounds__(NT, AFT_FULL_MIN_BLOCKS)
    bwd_w_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q, gptr<const E> __restrict__ k,
                 gptr<const E> __restrict__ v, gptr<const WE> __restrict__ w, gptr<const E> __restrict__ y,
                 gptr<const float> __restrict__ lse,
                 gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ sg,
                 gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ sh,
                 gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ ek,
                 gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ ekv,
                 gptr<const float> __restrict__ rref, gptr<const float> __restrict__ mref,
                 gptr<const int> __restrict__ rowflag, gptr<WE> __restrict__ dw, int64_t B, int64_t T, int64_t D,
                 int64_t dh, bool causal) {
#if AFT_FULL_TC_ARCH
  constexpr bool F32OPS = uses_tf32_operands<E>();
  using Cfg = BwdWCfg<F32OPS, CL>;
  using Op = typename Cfg::Op;
  using Mma = TileMma<F32OPS, wmma::row_major, wmma::col_major, WFM, WFN>;
  constexpr int LD = Cfg::LD;
  ATTNFREE_DYNAMIC_SHARED(unsigned char, smem, 128);

  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31;
  const int64_t h = blockIdx.z;
  const int crank = CL > 1 ? static_cast<int>(blockIdx.x % CL) : 0;  // = cluster_ctarank() for clusters (CL, 1, 1)
  const int64_t t0 = static_cast<int64_t>(blockIdx.y) * WBM;
  const int64_t s0 = static_cast<int64_t>(blockIdx.x) * WBN;
  const int64_t sc0 = s0 - crank * WBN;  // the cluster's first key
  const int64_t ncols = B * dh;
  gptr<WE> dwh = dw + h * T * T;
  const int64_t t_last = (t0 + WBM < T ? t0 + WBM : T) - 1;
  const bool above = causal && s0 > t_last;  // the whole tile is above the diagonal
  if (above) {
    for (int e = tid; e < WBM * WBN; e += NT) {
      const int64_t t = t0 + e / WBN, s = s0 + e % WBN;
      if (t < T && s < T) dwh[t * T + s] = from_acc<WE>(0.f);
    }
  }
  if (causal && sc0 > t_last) return;  // so is every tile of the cluster (CL = 1: this one)
  const bool active = s0 < T && !above;
  float* r_s = reinterpret_cast<float*>(smem + Cfg::kR);
  int* flag_s = reinterpret_cast<int*>(smem + Cfg::kFlag);
  if (tid < WBM && active) {  // read once per row here, not once per dw entry in the epilogue
    const bool ok = t0 + tid < T;
    r_s[tid] = ok ? rref[h * T + t0 + tid] : 0.f;
    flag_s[tid] = ok ? rowflag[h * T + t0 + tid] : 0;
  }
  const int wr0 = (warp / WWN) * 16 * WFM, wc0 = (warp % WWN) * 16 * WFN;  // rows, keys of this warp
  typename Mma::Acc acc[1][WFM][WFN];
#pragma unroll
  for (int i = 0; i < WFM; ++i)
#pragma unroll
    for (int jj = 0; jj < WFN; ++jj) wmma::fill_fragment(acc[0][i][jj], 0.f);

  gptr<const Op> sgh = sg + h * T * ncols;
  gptr<const Op> shh = sh + h * T * ncols;
  gptr<const Op> ekh = ek + h * T * ncols;
  gptr<const Op> ekvh = ekv + h * T * ncols;
  if constexpr (CL > 1) cluster_sync();  // every CTA of the cluster runs before any stores into its shared memory
  int step = 0;
  for (int64_t c0 = 0; c0 < ncols; c0 += WKC, ++step) {
    unsigned char* set = smem + (CL > 1 ? (step & 1) : 0) * Cfg::kSet;
    Op* SG = reinterpret_cast<Op*>(set);
    Op* SH = reinterpret_cast<Op*>(set + Cfg::kRowTile);
    Op* XV = reinterpret_cast<Op*>(set + 2 * Cfg::kRowTile);
    Op* XN = reinterpret_cast<Op*>(set + 2 * Cfg::kRowTile + Cfg::kKeyTile);  // -X
    const Op* const xv[1] = {XV};
    const Op* const xn[1] = {XN};
    // the row operands SG, SH and the key operands X v, -X of WKC columns (0 past the last row / key / column);
    // clusters: this CTA's WBM / CL rows of SG, SH, into every CTA
    if constexpr (CL == 1) {
#pragma unroll 4
      for (int e = tid; e < WBM * WKC; e += NT) {
        const int row = e / WKC, c = e % WKC;
        const int64_t t = t0 + row, j = c0 + c;
        const bool ok = t < T && j < ncols;
        store_val(&SG[row * LD + c], ok ? to_acc(sgh[t * ncols + j]) : 0.f);
        store_val(&SH[row * LD + c], ok ? to_acc(shh[t * ncols + j]) : 0.f);
      }
    } else {
      share_row_operands<CL, WBM / CL, WKC>(SG, SH, LD, crank * (WBM / CL), sgh, shh, t0, c0, T, ncols, tid);
    }
    if (active) {
#pragma unroll 4
      for (int e = tid; e < WBN * WKC; e += NT) {
        const int key = e / WKC, c = e % WKC;
        const int64_t s = s0 + key, j = c0 + c;
        const bool ok = s < T && j < ncols;
        store_val(&XV[key * LD + c], ok ? to_acc(ekvh[s * ncols + j]) : 0.f);
        store_val(&XN[key * LD + c], ok ? -to_acc(ekh[s * ncols + j]) : 0.f);
      }
    }
    if constexpr (CL == 1) {
      __syncthreads();
    } else {
      cluster_sync();
    }
    // acc += SG (X v)^T - SH X^T
    if (active) {
      Mma::template run<1>(SG, LD, xv, LD, wr0, wc0, WKC, acc);
      Mma::template run<1>(SH, LD, xn, LD, wr0, wc0, WKC, acc);
    }
    if constexpr (CL == 1) __syncthreads();  // before the next step (or the epilogue's scratch) overwrites the operands
  }
  // clusters: no CTA stores into this one after the last cluster barrier; the epilogue's scratch aliases the operands
  if constexpr (CL > 1) __syncthreads();
  if (!active) return;

  // ---------------- epilogue: dw = exp(w - r) acc (+ the exact elements of flagged rows); 0 where invisible
  float* sc = reinterpret_cast<float*>(smem) + warp * 256;
  gptr<const WE> wh = w + h * T * T;
#pragma unroll
  for (int fm = 0; fm < WFM; ++fm) {
#pragma unroll
    for (int fn = 0; fn < WFN; ++fn) {
      wmma::store_matrix_sync(sc, acc[0][fm][fn], 16, wmma::mem_row_major);
      __syncwarp();
#pragma unroll 1
      for (int e = lane; e < 256; e += 32) {
        const int row = wr0 + 16 * fm + e / 16;
        const int64_t t = t0 + row, s = s0 + wc0 + 16 * fn + e % 16;
        if (t < T && s < T) {
          float g = 0.f;
          if (!causal || s <= t) {
            const float wv = to_acc(wh[t * T + s]);
            if (wv != -INFINITY) {  // masked bias entry: no gradient
              const float r = r_s[row];
              g = exp2f((wv - r) * kLog2e) * sc[e];
              if (flag_s[row] != 0)  // rare: the exact elements of this row
                g += bwd_w_exact_row<E>(k, v, dy, q, y, lse, mref + h * ncols, r, wv, t, s, h, ncols, dh, T, D);
            }
          }
          dwh[t * T + s] = from_acc<WE>(g);
        }
      }
      __syncwarp();  // before the next fragment overwrites the scratch
    }
  }
#else
  __trap();  // sm < 80: the launchers never select this kernel there (aft_full_tc_supported)
#endif
}

// du, dvb tiling: UBM query rows x UBN keys per tile pair, WKC columns per step; 8 warps as UWM x UWN, each UFM x UFN
// fragments (64 fp32 registers per thread). The tile is smaller than bwd_w_kernel's so that the factor rows of both
// sides (the CTA's own, resident, and the other tile's, reloaded per pair) fit in shared memory next to the operands.
constexpr int UBM = 128, UBN = 128, UWM = 4, UWN = 2;
constexpr int UFM = UBM / (16 * UWM), UFN = UBN / (16 * UWN);
static_assert(UWM * UWN * 32 == NT && UBM == UBN && UBM == NT / 2, "du/dvb tiling");

template <bool F32OPS>
struct BwdUvCfg {
  using Op = typename TcCfg<F32OPS>::Op;
  static constexpr int LD = F32OPS ? WKC + 4 : WKC + 8;  // SG, SH [UBM][LD]; X v, -X [UBN][LD] (row, column)
  static constexpr int LDW = UBN + 4;                    // the fp32 dw tile [UBM][LDW] (aliases the operands)
  static constexpr size_t kTile = size_t(UBM) * LD * sizeof(Op);
  static constexpr size_t kOps = 4 * kTile;
  static constexpr size_t kStage = size_t(UBM) * LDW * sizeof(float);
  static constexpr size_t kR = ((kOps > kStage ? kOps : kStage) + 127) / 128 * 128;  // float r[UBM]
  static constexpr size_t kFlag = kR + UBM * sizeof(float);                          // int rowflag[UBM]
  static constexpr size_t kBytes = kFlag + UBM * sizeof(int);  // then float Ut [UBM][rank + 1], Vt [UBN][rank + 1]
};

// du (dvb = false) or dvb (dvb = true) of UBM rows of head h for the low-rank bias w = u vb^T. The CTA owns query
// rows own0 .. + UBM of du (or keys own0 .. + UBN of dvb) and loops over the other side's tiles in a fixed order;
// per tile pair: acc = SG (X v)^T - SH X^T over every column as bwd_w_kernel, staged in shared memory as fp32; there
// dw = exp(w - r) acc (w as fp32 dot products of the resident factor rows, in the order of the row-max prepass; the
// exact elements of flagged rows as bwd_w_kernel), then du[own] += dw vb[keys] or dvb[own] += dw^T u[rows] into the
// CTA's own rows of the fp32 accumulator facc (no atomics: deterministic). dw never leaves the chip.
template <typename E, typename WE>
__global__ void __launch_bounds__(NT, AFT_FULL_MIN_BLOCKS)
    bwd_uv_kernel(gptr<const E> __restrict__ dy, gptr<const E> __restrict__ q, gptr<const E> __restrict__ k,
                  gptr<const E> __restrict__ v, gptr<const WE> __restrict__ u, gptr<const WE> __restrict__ vbias,
                  int64_t rank, gptr<const E> __restrict__ y, gptr<const float> __restrict__ lse,
                  gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ sg,
                  gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ sh,
                  gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ ek,
                  gptr<const typename TcCfg<uses_tf32_operands<E>()>::Op> __restrict__ ekv,
                  gptr<const float> __restrict__ rref, gptr<const float> __restrict__ mref,
                  gptr<const int> __restrict__ rowflag, gptr<float> __restrict__ facc, int64_t B, int64_t T, int64_t D,
                  int64_t dh, bool causal, bool dvb) {
#if AFT_FULL_TC_ARCH
  constexpr bool F32OPS = uses_tf32_operands<E>();
  using Cfg = BwdUvCfg<F32OPS>;
  using Op = typename Cfg::Op;
  using Mma = TileMma<F32OPS, wmma::row_major, wmma::col_major, UFM, UFN>;
  constexpr int LD = Cfg::LD, LDW = Cfg::LDW;
  ATTNFREE_DYNAMIC_SHARED(unsigned char, smem, 128);
  Op* SG = reinterpret_cast<Op*>(smem);
  Op* SH = reinterpret_cast<Op*>(smem + Cfg::kTile);
  Op* XV = reinterpret_cast<Op*>(smem + 2 * Cfg::kTile);
  Op* XN = reinterpret_cast<Op*>(smem + 3 * Cfg::kTile);  // -X
  float* Wst = reinterpret_cast<float*>(smem);            // the dw tile, after the column loop
  float* r_s = reinterpret_cast<float*>(smem + Cfg::kR);
  int* flag_s = reinterpret_cast<int*>(smem + Cfg::kFlag);
  const int ldu = static_cast<int>(rank) + 1;
  float* Ut = reinterpret_cast<float*>(smem + Cfg::kBytes);  // u rows of the query tile
  float* Vt = Ut + UBM * ldu;                                // vb rows of the key tile

  const int tid = threadIdx.x, warp = tid >> 5;
  const int64_t h = blockIdx.z;
  const int64_t own0 = static_cast<int64_t>(blockIdx.x) * UBM;
  const int64_t ncols = B * dh;
  const WSrc<WE, true> src = head_bias<WE, true>(nullptr, u, vbias, h, T, rank);
  float* own_rows = dvb ? Vt : Ut;
  float* oth_rows = dvb ? Ut : Vt;
  gptr<const WE> own_f = dvb ? src.vb : src.u;
  gptr<const WE> oth_f = dvb ? src.u : src.vb;
  for (int64_t e = tid; e < UBM * rank; e += NT) {
    const int64_t a = e / rank, c = e % rank;
    own_rows[a * ldu + c] = (own0 + a < T) ? static_cast<float>(to_acc(own_f[(own0 + a) * rank + c])) : 0.f;
  }
  const int wr0 = (warp / UWN) * 16 * UFM, wc0 = (warp % UWN) * 16 * UFN;  // rows, keys of this warp
  const int erow = tid >> 1, ehalf = tid & 1;                              // dw roles: row erow, keys 64 ehalf .. + 64
  gptr<const Op> sgh = sg + h * T * ncols;
  gptr<const Op> shh = sh + h * T * ncols;
  gptr<const Op> ekh = ek + h * T * ncols;
  gptr<const Op> ekvh = ekv + h * T * ncols;
  gptr<float> fh = facc + h * T * rank;
  const Op* const xv[1] = {XV};
  const Op* const xn[1] = {XN};
  // causal: du's rows see the key tiles up to their own (UBM == UBN), dvb's keys are seen from their own row tile on
  const int64_t p0 = (dvb && causal) ? own0 : 0;
  const int64_t p1 = (!dvb && causal) ? own0 + 1 : T;
  for (int64_t p = p0; p < p1; p += UBM) {
    const int64_t t0 = dvb ? p : own0, s0 = dvb ? own0 : p;
    for (int64_t e = tid; e < UBM * rank; e += NT) {
      const int64_t a = e / rank, c = e % rank;
      oth_rows[a * ldu + c] = (p + a < T) ? static_cast<float>(to_acc(oth_f[(p + a) * rank + c])) : 0.f;
    }
    if (tid < UBM) {
      const bool ok = t0 + tid < T;
      r_s[tid] = ok ? rref[h * T + t0 + tid] : 0.f;
      flag_s[tid] = ok ? rowflag[h * T + t0 + tid] : 0;
    }
    typename Mma::Acc acc[1][UFM][UFN];
#pragma unroll
    for (int i = 0; i < UFM; ++i)
#pragma unroll
      for (int jj = 0; jj < UFN; ++jj) wmma::fill_fragment(acc[0][i][jj], 0.f);
    for (int64_t c0 = 0; c0 < ncols; c0 += WKC) {
      // the row operands SG, SH and the key operands X v, -X of WKC columns (0 past the last row / key / column)
#pragma unroll 4
      for (int e = tid; e < UBM * WKC; e += NT) {
        const int row = e / WKC, c = e % WKC;
        const int64_t t = t0 + row, s = s0 + row, j = c0 + c;
        const bool okt = t < T && j < ncols, oks = s < T && j < ncols;
        store_val(&SG[row * LD + c], okt ? to_acc(sgh[t * ncols + j]) : 0.f);
        store_val(&SH[row * LD + c], okt ? to_acc(shh[t * ncols + j]) : 0.f);
        store_val(&XV[row * LD + c], oks ? to_acc(ekvh[s * ncols + j]) : 0.f);
        store_val(&XN[row * LD + c], oks ? -to_acc(ekh[s * ncols + j]) : 0.f);
      }
      __syncthreads();
      // acc += SG (X v)^T - SH X^T
      Mma::template run<1>(SG, LD, xv, LD, wr0, wc0, WKC, acc);
      Mma::template run<1>(SH, LD, xn, LD, wr0, wc0, WKC, acc);
      __syncthreads();  // before the next step (or the dw tile) overwrites the operands
    }
#pragma unroll
    for (int fm = 0; fm < UFM; ++fm)
#pragma unroll
      for (int fn = 0; fn < UFN; ++fn)
        wmma::store_matrix_sync(Wst + (wr0 + 16 * fm) * LDW + wc0 + 16 * fn, acc[0][fm][fn], LDW, wmma::mem_row_major);
    __syncthreads();
    // dw = exp(w - r) acc (+ the exact elements of flagged rows); 0 where invisible or masked
    {
      const int64_t t = t0 + erow;
      const float rr = r_s[erow];
#pragma unroll 1
      for (int quarter = 0; quarter < 4; ++quarter) {
        const int kb = ehalf * 64 + quarter * 16;
        float wv[16];
        lowrank_w_strip(Ut + erow * ldu, Vt + kb * ldu, ldu, wv);
#pragma unroll
        for (int i = 0; i < 16; ++i) {  // unrolled: wv stays in registers
          const int64_t s = s0 + kb + i;
          float g = 0.f;
          if (key_visible(t, s, T, causal) && wv[i] != -INFINITY) {
            g = exp2f((wv[i] - rr) * kLog2e) * Wst[erow * LDW + kb + i];
            if (flag_s[erow] != 0)  // rare: the exact elements of this row
              g += bwd_w_exact_row<E>(k, v, dy, q, y, lse, mref + h * ncols, rr, wv[i], t, s, h, ncols, dh, T, D);
          }
          Wst[erow * LDW + kb + i] = g;
        }
      }
    }
    __syncthreads();
    // du[own0 + a] += dw[a, :] vb[keys],  dvb[own0 + a] += dw[:, a]^T u[rows]
    for (int64_t e = tid; e < UBM * rank; e += NT) {
      const int a = static_cast<int>(e / rank), c = static_cast<int>(e % rank);
      if (own0 + a >= T) continue;
      float sum = 0.f;
#pragma unroll 4
      for (int x = 0; x < UBN; ++x) sum = fmaf(dvb ? Wst[x * LDW + a] : Wst[a * LDW + x], oth_rows[x * ldu + c], sum);
      fh[(own0 + a) * rank + c] += sum;
    }
    __syncthreads();  // before the next pair overwrites the factor rows, the flags and the dw tile
  }
#else
  __trap();  // sm < 80: the launchers never select this kernel there (aft_full_tc_supported)
#endif
}

// ------------------------------------------------------------------------------------------ host side
// Workspace of the dense tensor-core backward (byte offsets): the forward's prepass layout (X, X v, r, m), then
// SG, SH [heads][T][B dh] in the operand type and the exact flags per row (heads T) and column (heads B dh), int32.
struct BwdWs {
  FwdWs f;
  size_t sg, sh, rowflag, colflag, total;
};
inline BwdWs bwd_ws_layout(bool f32ops, int64_t B, int64_t T, int64_t D, int64_t heads) {
  const size_t n = static_cast<size_t>(B * T * D) * (f32ops ? sizeof(float) : sizeof(__nv_bfloat16));
  BwdWs l;
  l.f = fwd_ws_layout(f32ops, B, T, D, heads);
  l.sg = l.f.total;
  l.sh = l.sg + align256(n);
  l.rowflag = l.sh + align256(n);
  l.colflag = l.rowflag + align256(static_cast<size_t>(heads * T) * sizeof(int));
  l.total = l.colflag + align256(static_cast<size_t>(B * D) * sizeof(int));
  return l;
}
inline size_t bwd_tc_workspace_bytes(DType dt, int64_t B, int64_t T, int64_t D, int64_t heads, bool exact) {
  if (exact || dt == DType::Float64 || B <= 0 || T <= 0 || D <= 0 || heads <= 0) return 0;
  return bwd_ws_layout(dt != DType::BFloat16, B, T, D, heads).total;
}

// Dynamic shared memory of bwd_kv_kernel: the operands, plus for the low-rank bias the resident factor rows
// (KBM + KBK) x (rank + 1) fp32; 0 when that exceeds the device's opt-in limit (the launcher then takes the
// per-tile-pair kernels).
template <bool F32OPS>
inline size_t bwd_kv_smem_bytes(bool lowrank, int64_t rank) {
  const size_t base = BwdKvCfg<F32OPS>::kBytes;
  if (!lowrank) return base;
  const size_t bytes = base + size_t(KBM + KBK) * static_cast<size_t>(rank + 1) * sizeof(float);
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 0;
  return bytes <= static_cast<size_t>(optin) ? bytes : 0;
}

// Dynamic shared memory of bwd_uv_kernel: the operands or the dw tile, plus the factor rows of both tiles
// (UBM + UBN) x (rank + 1) fp32; 0 when that exceeds the device's opt-in limit.
template <bool F32OPS>
inline size_t bwd_uv_smem_bytes(int64_t rank) {
  const size_t bytes = BwdUvCfg<F32OPS>::kBytes + size_t(UBM + UBN) * static_cast<size_t>(rank + 1) * sizeof(float);
  int dev = 0, optin = 0;
  if (cudaGetDevice(&dev) != cudaSuccess ||
      cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev) != cudaSuccess)
    return 0;
  return bytes <= static_cast<size_t>(optin) ? bytes : 0;
}

// CTAs per cluster of the cluster kernels (sm_90), along the key tiles in both: each SG / SH row tile is read once
// per 4 key tiles instead of once per key tile, in both GEMMs (docs/design.md §3). The key-tile grid is padded to a
// multiple of it with CTAs that only load and share (their keys are past T): no odd-grid fallback is needed.
constexpr int kBwdCluster = 4;

inline unsigned bwd_padded_to(unsigned n, unsigned m) { return (n + m - 1) / m * m; }

// bwd_kv_kernel<.., kBwdCluster> over clusters (1, kBwdCluster, 1) of the padded grid (dense bias).
template <typename E, typename WE, typename Op>
cudaError_t launch_bwd_kv_cluster(const BwdBuffers<E, WE>& p, const Op* sg, const Op* sh, const float* r,
                                  const float* m, const int* colflag, int64_t B, int64_t T, int64_t D, int64_t dh,
                                  int64_t heads, bool causal, cudaStream_t s) {
  constexpr int CL = kBwdCluster;
  const size_t smem = BwdKvCfg<uses_tf32_operands<E>(), CL>::kBytes;
  auto kv = bwd_kv_kernel<E, WE, false, CL>;
  cudaError_t err = cudaFuncSetAttribute(kv, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(blocks_for(B * dh, KBN), bwd_padded_to(blocks_for(T, KBM), CL), static_cast<unsigned>(heads));
  ATTNFREE_LAUNCH_CLUSTER((bwd_kv_kernel<E, WE, false, CL>), dim3(1, CL, 1), grid, NT, smem, s)(
      p.dy, p.q, p.k, p.v, p.w, p.u, p.vb, int64_t(0), p.y, p.lse, sg, sh, r, m, colflag, p.dk, p.dv, B, T, D, dh,
      causal);
  return cudaGetLastError();
}

// bwd_w_kernel<.., kBwdCluster> over clusters (kBwdCluster, 1, 1) of the padded grid.
template <typename E, typename WE, typename Op>
cudaError_t launch_bwd_w_cluster(const BwdBuffers<E, WE>& p, const Op* sg, const Op* sh, const Op* ek, const Op* ekv,
                                 const float* r, const float* m, const int* rowflag, int64_t B, int64_t T, int64_t D,
                                 int64_t dh, int64_t heads, bool causal, cudaStream_t s) {
  constexpr int CL = kBwdCluster;
  const size_t smem = BwdWCfg<uses_tf32_operands<E>(), CL>::kBytes;
  auto kw = bwd_w_kernel<E, WE, CL>;
  cudaError_t err = cudaFuncSetAttribute(kw, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
  if (err != cudaSuccess) return err;
  const dim3 grid(bwd_padded_to(blocks_for(T, WBN), CL), blocks_for(T, WBM), static_cast<unsigned>(heads));
  ATTNFREE_LAUNCH_CLUSTER((bwd_w_kernel<E, WE, CL>), dim3(CL, 1, 1), grid, NT, smem, s)(
      p.dy, p.q, p.k, p.v, p.w, p.y, p.lse, sg, sh, ek, ekv, r, m, rowflag, p.dw, B, T, D, dh, causal);
  return cudaGetLastError();
}

// The forward's prepasses (m, X, X v, r), the flags, bwd_prep_kernel, then the dk/dv kernel and the dw kernel
// (low rank: the du and dvb passes of bwd_uv_kernel); sm_90 with ATTNFREE_CLUSTERS=1: their cluster variants (dense
// bias). ws: bwd_ws_layout's bytes.
template <typename E, typename WE, bool LOWRANK>
cudaError_t launch_bwd_tc(const BwdBuffers<E, WE>& p, int64_t B, int64_t T, int64_t D, int64_t heads, int64_t rank,
                          bool causal, void* ws, cudaStream_t s) {
  constexpr bool F32OPS = uses_tf32_operands<E>();
  using Op = typename TcCfg<F32OPS>::Op;
  if (ws == nullptr) return cudaErrorInvalidValue;
  const int64_t dh = D / heads, ncols = B * dh;
  if (blocks_for(T, WBN) > 65535u || heads > 65535) return cudaErrorInvalidConfiguration;
  const size_t kv_smem = bwd_kv_smem_bytes<F32OPS>(LOWRANK, rank);
  if (kv_smem == 0) return cudaErrorInvalidConfiguration;
  const BwdWs l = bwd_ws_layout(F32OPS, B, T, D, heads);
  unsigned char* base = static_cast<unsigned char*>(ws);
  Op* ek = reinterpret_cast<Op*>(base + l.f.ek);
  Op* ekv = reinterpret_cast<Op*>(base + l.f.ekv);
  float* r = reinterpret_cast<float*>(base + l.f.r);
  float* m = reinterpret_cast<float*>(base + l.f.m);
  Op* sg = reinterpret_cast<Op*>(base + l.sg);
  Op* sh = reinterpret_cast<Op*>(base + l.sh);
  int* rowflag = reinterpret_cast<int*>(base + l.rowflag);
  int* colflag = reinterpret_cast<int*>(base + l.colflag);
  ATTNFREE_LAUNCH((fwd_colmax_kernel<E>), grid_for(heads * ncols, 256), 256, 0, s)(p.k, m, B, T, D, dh);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  ATTNFREE_LAUNCH((fwd_expkv_kernel<E, Op>), grid_for(B * T * D, 256), 256, 0, s)(
      p.k, p.v, static_cast<const float*>(m), ek, ekv, B, T, D, dh);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const size_t rsmem = LOWRANK ? 2 * size_t(64) * LDR * sizeof(float) : 0;
  const dim3 rgrid(blocks_for(T, 64), 1, static_cast<unsigned>(heads));
  ATTNFREE_LAUNCH((fwd_rowmax_kernel<WE, LOWRANK>), rgrid, NT, rsmem, s)(p.w, p.u, p.vb, r, T, rank, causal);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  err = cudaMemsetAsync(base + l.rowflag, 0, l.total - l.rowflag, s);
  if (err != cudaSuccess) return err;
  ATTNFREE_LAUNCH((bwd_prep_kernel<E, Op>), grid_for(B * T * D, 256), 256, 0, s)(
      p.dy, p.q, p.y, p.lse, static_cast<const float*>(r), static_cast<const float*>(m), p.dq, sg, sh, rowflag, colflag,
      B, T, D, dh);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  // sm_90 with ATTNFREE_CLUSTERS=1, dense bias: the cluster kernels (bwd_kv_kernel, bwd_w_kernel with CL = kBwdCluster)
  const bool clusters = !LOWRANK && cluster_kernels_enabled();
  if constexpr (!LOWRANK) {
    if (clusters) {
      err = launch_bwd_kv_cluster<E, WE>(p, sg, sh, r, m, colflag, B, T, D, dh, heads, causal, s);
      if (err != cudaSuccess) return err;
    }
  }
  if (!clusters) {
    auto kv = bwd_kv_kernel<E, WE, LOWRANK>;
    err = cudaFuncSetAttribute(kv, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(kv_smem));
    if (err != cudaSuccess) return err;
    const dim3 kv_grid(blocks_for(ncols, KBN), blocks_for(T, KBM), static_cast<unsigned>(heads));
    ATTNFREE_LAUNCH((bwd_kv_kernel<E, WE, LOWRANK>), kv_grid, NT, kv_smem, s)(
        p.dy, p.q, p.k, p.v, p.w, p.u, p.vb, rank, p.y, p.lse, static_cast<const Op*>(sg), static_cast<const Op*>(sh),
        static_cast<const float*>(r), static_cast<const float*>(m), static_cast<const int*>(colflag), p.dk, p.dv, B, T,
        D, dh, causal);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  if constexpr (LOWRANK) {
    const size_t uv_smem = bwd_uv_smem_bytes<F32OPS>(rank);
    if (uv_smem == 0) return cudaErrorInvalidConfiguration;
    auto ku = bwd_uv_kernel<E, WE>;
    err = cudaFuncSetAttribute(ku, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(uv_smem));
    if (err != cudaSuccess) return err;
    const dim3 u_grid(blocks_for(T, UBM), 1, static_cast<unsigned>(heads));
    for (int pass = 0; pass < 2; ++pass) {  // du, then dvb
      ATTNFREE_LAUNCH((bwd_uv_kernel<E, WE>), u_grid, NT, uv_smem, s)(
          p.dy, p.q, p.k, p.v, p.u, p.vb, rank, p.y, p.lse, static_cast<const Op*>(sg), static_cast<const Op*>(sh),
          static_cast<const Op*>(ek), static_cast<const Op*>(ekv), static_cast<const float*>(r),
          static_cast<const float*>(m), static_cast<const int*>(rowflag), pass == 0 ? p.du_acc : p.dvb_acc, B, T, D, dh,
          causal, pass == 1);
      err = cudaGetLastError();
      if (err != cudaSuccess) return err;
    }
    return cudaSuccess;
  } else {
    if (clusters) return launch_bwd_w_cluster<E, WE>(p, sg, sh, ek, ekv, r, m, rowflag, B, T, D, dh, heads, causal, s);
    const size_t w_smem = BwdWCfg<F32OPS>::kBytes;
    auto kw = bwd_w_kernel<E, WE>;
    err = cudaFuncSetAttribute(kw, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(w_smem));
    if (err != cudaSuccess) return err;
    const dim3 w_grid(blocks_for(T, WBN), blocks_for(T, WBM), static_cast<unsigned>(heads));
    ATTNFREE_LAUNCH((bwd_w_kernel<E, WE>), w_grid, NT, w_smem, s)(
        p.dy, p.q, p.k, p.v, p.w, p.y, p.lse, static_cast<const Op*>(sg), static_cast<const Op*>(sh),
        static_cast<const Op*>(ek), static_cast<const Op*>(ekv), static_cast<const float*>(r),
        static_cast<const float*>(m), static_cast<const int*>(rowflag), p.dw, B, T, D, dh, causal);
    return cudaGetLastError();
  }
}
