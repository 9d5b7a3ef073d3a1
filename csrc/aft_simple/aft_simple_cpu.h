// AFT-simple on CPU (registered in aft_simple_ops.cpp): non-causal as one softmax over T per (b, c)
// (aft_simple_cpu.cpp), causal as the band kernel of common/cpu_band.h with window = 1 and no bias.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/cpu_common.h"

namespace attnfree {
namespace cpu {

std::tuple<Tensor, Tensor> aft_simple_fwd(const Tensor& q, const Tensor& k, const Tensor& v, bool causal);
std::tuple<Tensor, Tensor, Tensor> aft_simple_bwd(const Tensor& dy, const Tensor& q, const Tensor& k, const Tensor& v,
                                                  const Tensor& y, const Tensor& lse, bool causal);

}  // namespace cpu
}  // namespace attnfree
