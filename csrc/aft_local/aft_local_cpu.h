// AFT-local on CPU (registered in aft_local_ops.cpp): banded tiles (float32) or the band kernel of common/cpu_band.h
// with the user's window. banded: w (and the returned dw) in the layout (heads?, T, 2W - 1) of aft_local_checks.h.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

#include "common/cpu_common.h"

namespace attnfree {
namespace cpu {

std::tuple<Tensor, Tensor> aft_local_fwd(const Tensor& q, const Tensor& k, const Tensor& v, const Tensor& w,
                                         int64_t window, bool causal, bool banded);
std::tuple<Tensor, Tensor, Tensor, Tensor> aft_local_bwd(const Tensor& dy, const Tensor& q, const Tensor& k,
                                                         const Tensor& v, const Tensor& w, const Tensor& y,
                                                         const Tensor& lse, int64_t window, bool causal, bool banded);

}  // namespace cpu
}  // namespace attnfree
