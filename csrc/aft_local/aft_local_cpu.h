// AFT-local on CPU (registered in aft_local_ops.cpp): the band kernel of common/cpu_band.h with the user's window.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/cpu_common.h"

namespace attnfree {
namespace cpu {

std::tuple<Tensor, Tensor> aft_local_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
                                         int64_t window, bool causal);
std::tuple<Tensor, Tensor, Tensor, Tensor> aft_local_bwd(const Tensor& dy, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const Tensor& w, const Tensor& y,
                                                         const Tensor& lse, int64_t window, bool causal);

}  // namespace cpu
}  // namespace attnfree
