// attnfree_ext: declarations of the CPU implementations registered in csrc/ops.cpp.
// Schemas (TORCH_LIBRARY(attnfree, m)) live only in csrc/ops.cpp.
#pragma once

#include <ATen/ATen.h>

#include <tuple>

namespace attnfree {
namespace cpu {

using at::Tensor;

std::tuple<Tensor, Tensor> aft_full_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                        const Tensor& w, bool causal);
std::tuple<Tensor, Tensor, Tensor, Tensor> aft_full_bwd(const Tensor& dy, const Tensor& q,
                                                        const Tensor& k, const Tensor& v,
                                                        const Tensor& w, const Tensor& y,
                                                        const Tensor& lse, bool causal);

std::tuple<Tensor, Tensor> aft_local_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                         const Tensor& w, int64_t window, bool causal);
std::tuple<Tensor, Tensor, Tensor, Tensor> aft_local_bwd(const Tensor& dy, const Tensor& q,
                                                         const Tensor& k, const Tensor& v,
                                                         const Tensor& w, const Tensor& y,
                                                         const Tensor& lse, int64_t window,
                                                         bool causal);

std::tuple<Tensor, Tensor> aft_simple_fwd(const Tensor& q, const Tensor& k, const Tensor& v,
                                          bool causal);
std::tuple<Tensor, Tensor, Tensor> aft_simple_bwd(const Tensor& dy, const Tensor& q,
                                                  const Tensor& k, const Tensor& v,
                                                  const Tensor& y, const Tensor& lse, bool causal);

std::tuple<Tensor, Tensor, Tensor> ea_double_norm_fwd(const Tensor& logits, double eps);
Tensor ea_double_norm_bwd(const Tensor& dout, const Tensor& logits, const Tensor& out,
                          const Tensor& lse, const Tensor& rowsum);

}  // namespace cpu
}  // namespace attnfree
