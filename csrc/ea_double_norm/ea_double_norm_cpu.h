// External-attention double normalisation on CPU (registered in ea_double_norm_ops.cpp).
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/cpu_common.h"

namespace attnfree {
namespace cpu {

std::tuple<Tensor, Tensor, Tensor> ea_double_norm_fwd(const Tensor& logits, double eps);
Tensor ea_double_norm_bwd(const Tensor& dout, const Tensor& logits, const Tensor& out, const Tensor& lse,
                          const Tensor& rowsum);

}  // namespace cpu
}  // namespace attnfree
