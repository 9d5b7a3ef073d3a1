// AFT-local CPU entry points: argument checks, then the banded-tile forward (aft_local_tiled_cpu.cpp) or the band
// kernels (common/cpu_band.h). w comes in either layout (aft_local_checks.h); dw is returned in w's layout.
#include "aft_local/aft_local_cpu.h"

#include <algorithm>

#include "aft_local/aft_local_checks.h"
#include "aft_local/aft_local_tiled.h"
#include "common/cpu_band.h"

namespace attnfree {
namespace cpu {
namespace {

// Below this window the per-element band kernel is faster than banded tiles (forward; 2 threads, B=4, T=2048,
// D=256). The backward uses the same threshold (not tuned separately).
constexpr int64_t kLocalTiledMinWindow = 16;

// (H, T, T) index j = t' - t + W - 1 of a banded row (clamped) and the band mask |t - t'| < W.
std::tuple<Tensor, Tensor> band_index(int64_t T, int64_t W, const at::TensorOptions& opts) {
  const Tensor idx = at::arange(T, opts.dtype(at::kLong));
  const Tensor j = idx.unsqueeze(0) - idx.unsqueeze(1) + (W - 1);
  return {j.clamp(0, 2 * W - 2), (j >= 0).logical_and(j <= 2 * W - 2)};
}

// Banded (H, T, 2W - 1) -> full (H, T, T), 0 outside the band. The band kernels of common/cpu_band.h read w
// as (H, T, T) rows; this is the one place a banded w becomes T x T (see aft_local_fwd / aft_local_bwd).
Tensor band_to_full(const Tensor& wb, int64_t T, int64_t W) {
  auto [j, inside] = band_index(T, W, wb.options());
  const Tensor full = wb.gather(-1, j.expand({wb.size(0), T, T}));
  return at::where(inside, full, at::zeros({}, wb.options()));
}

// Full (H, T, T) -> banded (H, T, 2W - 1), 0 where the key t + j - (W - 1) falls outside [0, T).
Tensor full_to_band(const Tensor& w, int64_t T, int64_t W) {
  const auto lopt = w.options().dtype(at::kLong);
  const Tensor tp = at::arange(T, lopt).unsqueeze(1) + at::arange(2 * W - 1, lopt).unsqueeze(0) - (W - 1);
  const Tensor valid = (tp >= 0).logical_and(tp < T);
  const Tensor band = w.gather(-1, tp.clamp(0, std::max<int64_t>(T - 1, 0)).expand({w.size(0), T, 2 * W - 1}));
  return at::where(valid, band, at::zeros({}, w.options()));
}

}  // namespace

std::tuple<Tensor, Tensor> aft_local_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
                                         int64_t window, bool causal, bool banded) {
  check_qkv(q, k, v);
  const int64_t heads = check_w_local_layout(w, q, window, banded);
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
  window = std::min<int64_t>(window, std::max<int64_t>(T, 1));  // huge windows: no t + window overflow
  if (q.scalar_type() == at::kFloat && window >= kLocalTiledMinWindow && q.numel() > 0) {
    // banded tiles (aft_local_tiled_cpu.cpp), either layout; false when the CPU lacks AVX2/FMA
    Tensor qa = q.contiguous(), ka = k.contiguous(), va = v.contiguous();
    Tensor wa = w.reshape({heads, T, w.size(-1)}).contiguous();
    Tensor y = at::empty({B, T, D}, qa.options()), lse = at::empty({B, T, D}, qa.options());
    if (aft_local_tiled_fwd_avx2(qa.data_ptr<float>(), ka.data_ptr<float>(), va.data_ptr<float>(), wa.data_ptr<float>(),
                                 y.data_ptr<float>(), lse.data_ptr<float>(), B, T, D, heads, window, causal, banded))
      return {y, lse};
  }
  if (!banded) return band_fwd(q, k, v, &w, heads, window, causal);
  const Tensor wf = band_to_full(w.reshape({heads, T, w.size(-1)}), T, window);
  return band_fwd(q, k, v, &wf, heads, window, causal);
}

std::tuple<Tensor, Tensor, Tensor, Tensor> aft_local_bwd(const Tensor& dy, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const Tensor& w, const Tensor& y,
                                                         const Tensor& lse, int64_t window, bool causal, bool banded) {
  check_qkv(q, k, v);
  const int64_t heads = check_w_local_layout(w, q, window, banded);
  check_saved(dy, q, y, lse);
  const int64_t B = q.size(0), T = q.size(1), D = q.size(2);
  window = std::min<int64_t>(window, std::max<int64_t>(T, 1));  // huge windows: no t + window overflow
  if (q.scalar_type() == at::kFloat && window >= kLocalTiledMinWindow && q.numel() > 0) {
    // banded tiles (aft_local_tiled_cpu.cpp), either layout, dq included. Inputs holding NaN or +inf keep the
    // per-element band kernel, whose NaN propagation is exact (docs/design.md §7); -inf (a mask) is handled by the
    // tiles. Every output element is written by the tiles (dw: 0 outside the band), so at::empty.
    const Tensor dya = dy.contiguous(), qa = q.contiguous(), ya = y.contiguous(), ka = k.contiguous();
    const Tensor va = v.contiguous(), la = lse.to(at::kFloat).contiguous();
    const Tensor wa = w.reshape({heads, T, w.size(-1)}).contiguous();
    Tensor dq = at::empty({B, T, D}, qa.options()), dk = at::empty({B, T, D}, qa.options());
    Tensor dv = at::empty({B, T, D}, qa.options()), dw = at::empty(wa.sizes(), wa.options());
    if (aft_local_tiled_bwd_avx2(dya.data_ptr<float>(), qa.data_ptr<float>(), ya.data_ptr<float>(),
                                 ka.data_ptr<float>(), va.data_ptr<float>(), wa.data_ptr<float>(), la.data_ptr<float>(),
                                 dq.data_ptr<float>(), dk.data_ptr<float>(), dv.data_ptr<float>(), dw.data_ptr<float>(),
                                 B, T, D, heads, window, causal, banded))
      return {dq, dk, dv, dw.view(w.sizes())};
  }
  if (!banded) return band_bwd(dy, q, k, v, &w, y, lse, heads, window, causal);
  const Tensor wf = band_to_full(w.reshape({heads, T, w.size(-1)}), T, window);
  auto [dq, dk, dv, dwf] = band_bwd(dy, q, k, v, &wf, y, lse, heads, window, causal);
  return {dq, dk, dv, full_to_band(dwf, T, window).view(w.sizes())};
}

}  // namespace cpu
}  // namespace attnfree
