// AFT-local CPU entry points: argument checks, then the band kernel (common/cpu_band.h).
#include "aft_local/aft_local_cpu.h"

#include <algorithm>

#include "common/cpu_band.h"

namespace attnfree {
namespace cpu {

std::tuple<Tensor, Tensor> aft_local_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
                                         int64_t window, bool causal) {
  check_qkv(q, k, v);
  const int64_t heads = check_w_local(w, q, window);
  window = std::min<int64_t>(window, std::max<int64_t>(q.size(1), 1));  // huge windows: no t + window overflow
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
