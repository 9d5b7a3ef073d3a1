// AFT-full CPU entry points: argument checks, then the tile-wise GEMM kernel (aft_full_tiled_cpu.cpp) or the
// per-element band kernel (common/cpu_band.h, window = T).
#include "aft_full/aft_full_cpu.h"

#include <algorithm>

#include "common/cpu_band.h"
#include "common/env.h"

namespace attnfree {
namespace cpu {
namespace {

// The tiled kernel wins when a head has enough GEMM columns (N = B * D / heads >= 32) and, when causal, more
// than one tile (a single tile is all diagonal, computed per element anyway: the band kernel does that faster).
// Measured (2 threads, B=2, D=128, fwd): non-causal T=16 tiled 0.08 ms vs exact 0.22 ms, T=64 0.27 vs 2.9 ms;
// causal T=64 tiled 2.3 ms vs exact 1.5 ms, T=128 5.2 vs 6.2 ms. ATTNFREE_AFT_FULL_KERNEL=tiled|exact forces one
// (tests, debugging); both are exact to rounding.
bool use_tiled(const Tensor& q, int64_t heads, bool causal) {
  switch (aft_full_kernel()) {
    case AftFullKernel::Tiled:
      return true;
    case AftFullKernel::Exact:
      return false;
    case AftFullKernel::Auto:
      break;
  }
  return (!causal || q.size(1) > kFullTile) && q.size(0) * (q.size(2) / heads) >= 32;
}

}  // namespace

std::tuple<Tensor, Tensor> aft_full_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
                                        bool causal) {
  check_qkv(q, k, v);
  const int64_t heads = check_w_full(w, q);
  const int64_t T = q.size(1);
  if (q.numel() > 0 && use_tiled(q, heads, causal)) {
    auto r = aft_full_tiled_fwd(acc_contiguous(q, q), acc_contiguous(k, q), acc_contiguous(v, q),
                                acc_contiguous(w, q).reshape({heads, T, T}).contiguous(), causal);
    return {std::get<0>(r).to(q.scalar_type()), std::get<1>(r)};
  }
  return band_fwd(q, k, v, &w, heads, std::max<int64_t>(T, 1), causal);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> aft_full_bwd(const Tensor& dy, const Tensor& q, const Tensor& k,
                                                        const Tensor& v, const Tensor& w, const Tensor& y,
                                                        const Tensor& lse, bool causal) {
  check_qkv(q, k, v);
  const int64_t heads = check_w_full(w, q);
  check_saved(dy, q, y, lse);
  const int64_t T = q.size(1);
  if (q.numel() > 0 && use_tiled(q, heads, causal)) {
    auto r = aft_full_tiled_bwd(acc_contiguous(dy, q), acc_contiguous(q, q), acc_contiguous(k, q), acc_contiguous(v, q),
                                acc_contiguous(w, q).reshape({heads, T, T}).contiguous(), acc_contiguous(y, q),
                                acc_contiguous(lse, q), causal);
    const auto dt = q.scalar_type();
    return {std::get<0>(r).to(dt), std::get<1>(r).to(dt), std::get<2>(r).to(dt),
            std::get<3>(r).reshape(w.sizes()).to(w.scalar_type())};
  }
  return band_bwd(dy, q, k, v, &w, y, lse, heads, std::max<int64_t>(T, 1), causal);
}

}  // namespace cpu
}  // namespace attnfree
