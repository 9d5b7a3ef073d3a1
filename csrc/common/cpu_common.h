// Small helpers shared by the CPU kernels of every op (csrc/<op>/<op>_cpu.cpp, common/cpu_band.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <cstdint>

#include "common/checks.h"

namespace attnfree {
namespace cpu {

using at::Tensor;

// Channels per parallel task: the vector width of the inner loops, which run over contiguous channels.
constexpr int64_t kChannelChunk = 64;

template <typename acc_t>
inline acc_t sigmoid(acc_t x) {
  return acc_t(1) / (acc_t(1) + std::exp(-x));
}

// x in the accumulate type of `like` (float32, or float64 for float64 data), contiguous; no copy when it already
// is both.
inline Tensor acc_contiguous(const Tensor& x, const Tensor& like) {
  return x.to(acc_dtype(like.scalar_type())).contiguous();
}

}  // namespace cpu
}  // namespace attnfree
