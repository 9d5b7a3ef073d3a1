// AFT-local CPU entry points: argument checks, then the band kernel (common/cpu_band.h).
#include "aft_local/aft_local_cpu.h"

#include <algorithm>

#include "aft_local/aft_local_tiled.h"
#include "common/cpu_band.h"

namespace attnfree {
namespace cpu {

// Below this window the per-element band kernel is faster than banded tiles (2 threads, B=4, T=2048, D=256).
constexpr int64_t kLocalTiledMinWindow = 16;

std::tuple<Tensor, Tensor> aft_local_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
                                         int64_t window, bool causal) {
  check_qkv(q, k, v);
  const int64_t heads = check_w_local(w, q, window);
  window = std::min<int64_t>(window, std::max<int64_t>(q.size(1), 1));  // huge windows: no t + window overflow
  if (q.scalar_type() == at::kFloat && window >= kLocalTiledMinWindow && q.numel() > 0) {
    // banded tiles (aft_local_tiled_cpu.cpp); false when the CPU lacks AVX2/FMA
    const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
    Tensor qa = q.contiguous(), ka = k.contiguous(), va = v.contiguous();
    Tensor wa = w.reshape({heads, T, T}).contiguous();
    Tensor y = at::empty({B, T, D}, qa.options()), lse = at::empty({B, T, D}, qa.options());
    if (aft_local_tiled_fwd_avx2(qa.data_ptr<float>(), ka.data_ptr<float>(), va.data_ptr<float>(), wa.data_ptr<float>(),
                                 y.data_ptr<float>(), lse.data_ptr<float>(), B, T, D, heads, std::min(window, T),
                                 causal))
      return {y, lse};
  }
  return band_fwd(q, k, v, &w, heads, window, causal);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> aft_local_bwd(const Tensor& dy, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const Tensor& w, const Tensor& y,
                                                         const Tensor& lse, int64_t window, bool causal) {
  check_qkv(q, k, v);
  const int64_t heads = check_w_local(w, q, window);
  check_saved(dy, q, y, lse);
  window = std::min<int64_t>(window, std::max<int64_t>(q.size(1), 1));  // huge windows: no t + window overflow
  return band_bwd(dy, q, k, v, &w, y, lse, heads, window, causal);
}

}  // namespace cpu
}  // namespace attnfree
