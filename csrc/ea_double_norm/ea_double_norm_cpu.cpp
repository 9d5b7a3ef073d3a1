// External-attention double normalisation on CPU.
//   logits (..., N, S): p = softmax over N (dim -2), rowsum = sum_S p + eps, out = p / rowsum.
//   lse (..., 1, S) = logsumexp over N, rowsum (..., N, 1); both float32 (float64 for float64 input).
// Backward (saves logits, out, lse, rowsum): p = exp(logits - lse),
//   dp = (dout - sum_S(dout * out)) / rowsum;  dlogits = p * (dp - sum_N(p * dp)).
// Parallel over the leading (batch) dims; inner loops run over S (contiguous). Masks (docs/design.md §7 rules 3-4):
// safe offsets, so a -inf logit gives p = 0, an all -inf column lse = -inf and p = 0, and a token with p = 0 for
// every unit out = 0 (also with eps = 0) and dlogits = 0. The float32 kernels are in ea_double_norm_vec_cpu.cpp.
#include "ea_double_norm/ea_double_norm_cpu.h"
#include "ea_double_norm/ea_double_norm_vec.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace attnfree {
namespace cpu {
namespace {

// x where x != -inf, else 0: an offset for exp(l - off) that never forms (-inf) - (-inf) (docs/design.md §7
// rules 3-4: a -inf logit gives p = 0, a column of all -inf logits gives lse = -inf and p = 0).
template <typename acc_t>
acc_t safe_off(acc_t x) {
  return x == -std::numeric_limits<acc_t>::infinity() ? acc_t(0) : x;
}

template <typename acc_t>
void ea_fwd_kernel(const acc_t* __restrict__ l, acc_t* __restrict__ out, acc_t* __restrict__ lse,
                   acc_t* __restrict__ rowsum, int64_t M, int64_t N, int64_t S, acc_t eps) {
  // p = exp(l - lse_N) <= 1; out = p / (sum_S p + eps). Rows whose sum_S p < 1e-30 switch to log space
  // (as the Python reference path): log_s = logsumexp_S(l - lse), out = exp(l - lse - logaddexp(log_s, log eps)),
  // so eps = 0 never gives 0/0.
  const acc_t ninf = -std::numeric_limits<acc_t>::infinity();
  const acc_t log_eps = eps > 0 ? std::log(eps) : ninf;
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> mx(S), sum(S), lsafe(S);
    for (int64_t m = begin; m < end; ++m) {
      const acc_t* lm = l + m * N * S;
      acc_t* om = out + m * N * S;
      acc_t* lsem = lse + m * S;
      acc_t* rs = rowsum + m * N;
      for (int64_t s = 0; s < S; ++s) {
        mx[s] = ninf;
        sum[s] = 0;
      }
      for (int64_t n = 0; n < N; ++n) {
        const acc_t* r = lm + n * S;
        for (int64_t s = 0; s < S; ++s) mx[s] = r[s] > mx[s] ? r[s] : mx[s];
      }
      for (int64_t s = 0; s < S; ++s) mx[s] = safe_off(mx[s]);
      for (int64_t n = 0; n < N; ++n) {
        const acc_t* r = lm + n * S;
        for (int64_t s = 0; s < S; ++s) sum[s] += std::exp(r[s] - mx[s]);  // mx is a safe offset here
      }
      for (int64_t s = 0; s < S; ++s) {  // a column of all -inf logits: sum = 0, lse = -inf
        lsem[s] = mx[s] + std::log(sum[s]);
        lsafe[s] = safe_off(lsem[s]);
      }
      for (int64_t n = 0; n < N; ++n) {
        const acc_t* r = lm + n * S;
        acc_t* o = om + n * S;
        acc_t tot = 0;
        for (int64_t s = 0; s < S; ++s) {
          const acc_t p = std::exp(r[s] - lsafe[s]);
          o[s] = p;
          tot += p;
        }
        if (tot >= acc_t(1e-30)) {  // the usual case: p / (sum_S p + eps) directly
          rs[n] = tot + eps;
          const acc_t inv = acc_t(1) / (tot + eps);
          for (int64_t s = 0; s < S; ++s) o[s] *= inv;
          continue;
        }
        // every p of this row (nearly) underflowed: log space, so eps = 0 cannot give 0/0
        acc_t zmax = ninf;
        for (int64_t s = 0; s < S; ++s) {
          const acc_t z = r[s] - lsafe[s];
          o[s] = z;
          zmax = (z > zmax || z != z) ? z : zmax;  // a NaN (from a NaN column) is kept: the row is NaN
        }
        if (zmax == ninf) {  // p = 0 for every unit (masked token or all -inf columns): out = 0, also for eps = 0
          rs[n] = eps;
          for (int64_t s = 0; s < S; ++s) o[s] = 0;
          continue;
        }
        acc_t t2 = 0;
        for (int64_t s = 0; s < S; ++s) t2 += std::exp(o[s] - zmax);
        const acc_t log_s = zmax + std::log(t2);
        acc_t log_r = log_s;
        if (eps > 0) {
          const acc_t hi = std::max(log_s, log_eps), lo = std::min(log_s, log_eps);
          log_r = hi + std::log1p(std::exp(lo - hi));
        }
        rs[n] = std::exp(log_s) + eps;
        for (int64_t s = 0; s < S; ++s) o[s] = std::exp(o[s] - log_r);
      }
    }
  });
}

template <typename acc_t>
void ea_bwd_kernel(const acc_t* __restrict__ dout, const acc_t* __restrict__ l, const acc_t* __restrict__ out,
                   const acc_t* __restrict__ lse, const acc_t* __restrict__ rowsum, acc_t* __restrict__ dl, int64_t M,
                   int64_t N, int64_t S, bool rebuild_out) {
  // u = a * (dout - sum_S(dout * a)) (= p * dp), dl = u - p * sum_N u: no division by rowsum.
  // For fp16/bf16 inputs a = out is rebuilt in float32 as p / rowsum (stored out where rowsum < 1e-30).
  const acc_t tiny = acc_t(1e-30);
  at::parallel_for(0, M, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> col(S), a(S), lsafe(S);
    for (int64_t m = begin; m < end; ++m) {
      const int64_t off = m * N * S;
      const acc_t* lsem = lse + m * S;
      const acc_t* rs = rowsum + m * N;
      for (int64_t s = 0; s < S; ++s) {
        col[s] = 0;
        lsafe[s] = safe_off(lsem[s]);
      }
      for (int64_t n = 0; n < N; ++n) {
        const acc_t* dr = dout + off + n * S;
        const acc_t* orow = out + off + n * S;
        const acc_t* lr = l + off + n * S;
        acc_t* u = dl + off + n * S;
        if (rebuild_out && rs[n] > tiny) {
          const acc_t inv = acc_t(1) / rs[n];
          for (int64_t s = 0; s < S; ++s) a[s] = std::exp(lr[s] - lsafe[s]) * inv;
        } else {
          for (int64_t s = 0; s < S; ++s) a[s] = orow[s];
        }
        acc_t dot = 0;
        for (int64_t s = 0; s < S; ++s) dot += dr[s] * a[s];
        for (int64_t s = 0; s < S; ++s) {
          const acc_t uu = a[s] * (dr[s] - dot);
          u[s] = uu;
          col[s] += uu;
        }
      }
      for (int64_t n = 0; n < N; ++n) {
        const acc_t* lr = l + off + n * S;
        acc_t* u = dl + off + n * S;
        for (int64_t s = 0; s < S; ++s) u[s] -= std::exp(lr[s] - lsafe[s]) * col[s];
      }
    }
  });
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor> ea_double_norm_fwd(const Tensor& logits, double eps) {
  check_logits(logits);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0, "eps must be a finite float >= 0, got ", eps);
  const auto acc = acc_dtype(logits.scalar_type());
  const int64_t N = logits.size(-2), S = logits.size(-1);
  const int64_t M = (N * S == 0) ? 0 : logits.numel() / (N * S);
  Tensor la = logits.to(acc).contiguous();
  Tensor out = at::empty(la.sizes(), la.options());
  auto lse_shape = logits.sizes().vec();
  lse_shape[lse_shape.size() - 2] = 1;
  auto rs_shape = logits.sizes().vec();
  rs_shape[rs_shape.size() - 1] = 1;
  Tensor lse = at::empty(lse_shape, la.options());
  Tensor rowsum = at::empty(rs_shape, la.options());
  const bool vec = out.numel() > 0 && acc == at::kFloat &&
                   ea_fwd_avx2(la.data_ptr<float>(), out.data_ptr<float>(), lse.data_ptr<float>(),
                               rowsum.data_ptr<float>(), M, N, S, static_cast<float>(eps));
  if (out.numel() > 0) {
    if (!vec)
      AT_DISPATCH_FLOATING_TYPES(acc, "attnfree_ea_fwd", [&] {
        ea_fwd_kernel<scalar_t>(la.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), lse.data_ptr<scalar_t>(),
                                rowsum.data_ptr<scalar_t>(), M, N, S, static_cast<scalar_t>(eps));
      });
  } else {  // empty input: zeros, like the Python reference path
    lse.zero_();
    rowsum.zero_();
  }
  return {out.to(logits.scalar_type()), lse, rowsum};
}

Tensor ea_double_norm_bwd(const Tensor& dout, const Tensor& logits, const Tensor& out, const Tensor& lse,
                          const Tensor& rowsum) {
  check_logits(logits);
  check_like("dout", dout, "logits", logits);
  check_like("out", out, "logits", logits);
  check_tensor("lse", lse);
  check_tensor("rowsum", rowsum);
  const int64_t N = logits.size(-2), S = logits.size(-1);
  // M = prod(leading dims): the (..., 1, S) statistics of an N = 0 input still have M * S elements
  const int64_t M = c10::multiply_integers(logits.sizes().begin(), logits.sizes().end() - 2);
  TORCH_CHECK_VALUE(lse.numel() == M * S, "lse must have shape (..., 1, S) matching logits ", py_shape(logits.sizes()),
                    ", got ", py_shape(lse.sizes()));
  TORCH_CHECK_VALUE(rowsum.numel() == M * N, "rowsum must have shape (..., N, 1) matching logits ",
                    py_shape(logits.sizes()), ", got ", py_shape(rowsum.sizes()));
  const auto acc = acc_dtype(logits.scalar_type());
  Tensor da = dout.to(acc).contiguous(), la = logits.to(acc).contiguous();
  Tensor oa = out.to(acc).contiguous(), lsea = lse.to(acc).contiguous();
  Tensor rsa = rowsum.to(acc).contiguous();
  Tensor dl = at::empty(la.sizes(), la.options());
  const bool rebuild_out = out.scalar_type() != acc;
  const bool vec = dl.numel() > 0 && acc == at::kFloat &&
                   ea_bwd_avx2(da.data_ptr<float>(), la.data_ptr<float>(), oa.data_ptr<float>(), lsea.data_ptr<float>(),
                               rsa.data_ptr<float>(), dl.data_ptr<float>(), M, N, S, rebuild_out);
  if (dl.numel() > 0 && !vec) {
    AT_DISPATCH_FLOATING_TYPES(acc, "attnfree_ea_bwd", [&] {
      ea_bwd_kernel<scalar_t>(da.data_ptr<scalar_t>(), la.data_ptr<scalar_t>(), oa.data_ptr<scalar_t>(),
                              lsea.data_ptr<scalar_t>(), rsa.data_ptr<scalar_t>(), dl.data_ptr<scalar_t>(), M, N, S,
                              rebuild_out);
    });
  }
  return dl.to(logits.scalar_type());
}

}  // namespace cpu
}  // namespace attnfree
