// Log-sum-exp states whose sums are kept relative to a power-of-four offset: the tiled AFT-simple kernels
// (aft_simple/aft_simple.cu, docs/design.md §2.7) and the column statistics of EA's double normalisation
// (ea_double_norm/ea_double_norm.cu). Plain CUDA C++ (no torch headers).
//
// A state (m, a, b) keeps m = the true max of its items and the sums relative to an offset O(m): a = sum e^{x - O},
// b = sum e^{x - O} v. For |m| <= 2^23, O = h U with U = 2 ln 2 and h = ceil(m / U): O is at least m (up to the
// rounding of m / U), so a term is at most ~1 and the largest one at least 1/4, and h is monotone in m, so merging
// two such states takes the larger m and scales the other side's sums by e^{(h_lo - h_hi) U} = 4^{h_lo - h_hi}: an
// exact power of two built from its bits, no exponential. x - h U is evaluated as fma(-h, U_hi, x) - h U_lo, as
// accurate as x - m of a plain state. Beyond 2^23 (h would not be exact, and the float grid of h U is coarser
// than U) O = m, the plain offset, and a merge that involves such a state takes one exponential; so do ±inf maxima.
// Per element the only exponential is the item's own e^{x - O}.
#pragma once

#include <cstdint>
#include <cstring>

#include "common/cuda_common.cuh"

namespace attnfree {
namespace cuda {

template <typename Acc>
struct Pow4;
template <>
struct Pow4<float> {
  static constexpr float inv_u = 0.7213475204444817f;     // 1 / (2 ln 2)
  static constexpr float u_hi = 1.3862943649291992f;      // float(2 ln 2)
  static constexpr float u_lo = -3.809308599915536e-09f;  // 2 ln 2 - u_hi
};
template <>
struct Pow4<double> {
  static constexpr double inv_u = 0.7213475204444817;
  static constexpr double u_hi = 1.3862943611198906;
  static constexpr double u_lo = 4.638093627692599e-17;
};

__device__ __forceinline__ float af_ceil(float x) { return ceilf(x); }
__device__ __forceinline__ double af_ceil(double x) { return ceil(x); }
__device__ __forceinline__ float af_fma(float a, float b, float c) { return fmaf(a, b, c); }
__device__ __forceinline__ double af_fma(double a, double b, double c) { return fma(a, b, c); }

// 2^e for an integer e in the normal range, from its bits
__device__ __forceinline__ float pow2_bits(int e, float) {
  const uint32_t u = uint32_t(e + 127) << 23;
  float r;
  memcpy(&r, &u, sizeof r);
  return r;
}
__device__ __forceinline__ double pow2_bits(int e, double) {
  const uint64_t u = uint64_t(e + 1023) << 52;
  double r;
  memcpy(&r, &u, sizeof r);
  return r;
}
template <typename Acc>
struct Pow2Range;
template <>
struct Pow2Range<float> {
  static constexpr int min_normal = -126, min_sub = -149;
};
template <>
struct Pow2Range<double> {
  static constexpr int min_normal = -1022, min_sub = -1074;
};

// 4^d for an integral d <= 0, exact (subnormal results included, 0 below them); NaN stays NaN. Two normal powers of
// two multiplied: integer and multiply instructions only.
template <typename Acc>
__device__ __forceinline__ Acc pow4_nonpos(Acc d) {
  constexpr int lo = Pow2Range<Acc>::min_normal, sub = Pow2Range<Acc>::min_sub;
  if (d != d) return d;
  if (!(d * 2 >= Acc(sub))) return Acc(0);
  const int e = 2 * int(d);  // in [min_sub, 0]
  const int e1 = e < lo ? lo : e;
  return pow2_bits(e1, Acc(0)) * pow2_bits(e - e1, Acc(0));
}

// The offset of a state of max m (-inf: an empty state, offset 0, so that its items (-inf or NaN) keep e^x).
template <typename Acc>
struct Pow4Offset {
  Acc m;    // the max, 0 for an empty state
  Acc h;    // ceil(m / U) where p4
  bool p4;  // O = h U (else O = m)
  __device__ __forceinline__ static Pow4Offset of(Acc mx) {
    Pow4Offset o;
    o.m = mx == neg_inf<Acc>() ? Acc(0) : mx;
    o.p4 = o.m >= -Acc(8388608) && o.m <= Acc(8388608);  // false for +inf and NaN
    o.h = o.p4 ? af_ceil(o.m * Pow4<Acc>::inv_u) : Acc(0);
    return o;
  }
  __device__ __forceinline__ Acc lo() const { return h * Pow4<Acc>::u_lo; }
  // e^{x - O}
  __device__ __forceinline__ Acc exp_minus(Acc x) const {
    return af_exp(p4 ? af_fma(-h, Pow4<Acc>::u_hi, x) - lo() : x - m);
  }
  // e^{x + O}
  __device__ __forceinline__ Acc exp_plus(Acc x) const {
    return af_exp(p4 ? af_fma(h, Pow4<Acc>::u_hi, x) + lo() : x + m);
  }
  // O + log a: the log-sum-exp of a state with sum a (-inf for a = 0)
  __device__ __forceinline__ Acc lse(Acc a) const {
    return p4 ? af_fma(h, Pow4<Acc>::u_hi, lo() + af_log(a)) : m + af_log(a);
  }
  // O - m
  __device__ __forceinline__ Acc delta() const { return p4 ? af_fma(h, Pow4<Acc>::u_hi, -m) + lo() : Acc(0); }
};

// e^{O(m_lo) - O(m_hi)} for non-empty states of maxima m_lo <= m_hi: the factor of the side with the smaller max
template <typename Acc>
__device__ __forceinline__ Acc pow4_factor(Acc m_lo, Acc m_hi) {
  const Pow4Offset<Acc> lo = Pow4Offset<Acc>::of(m_lo), hi = Pow4Offset<Acc>::of(m_hi);
  if (lo.p4 && hi.p4) return pow4_nonpos(lo.h - hi.h);
  return af_exp((lo.m - hi.m) + (lo.delta() - hi.delta()));
}

// carry merged with (m2, a2, b2) (both in this convention, either possibly empty), returning the factor
// 4^{h_min - h_max} applied to the side with the smaller max (0 when either side is empty).
template <typename Acc>
__device__ __forceinline__ Acc pow4_merge(LseState<Acc>& carry, Acc m2, Acc a2, Acc b2) {
  if (m2 == neg_inf<Acc>()) return Acc(0);
  if (carry.m == neg_inf<Acc>()) {
    carry.m = m2;
    carry.a = a2;
    carry.b = b2;
    return Acc(0);
  }
  Acc f;
  if (m2 > carry.m) {
    f = pow4_factor(carry.m, m2);
    carry.a = carry.a * f + a2;
    carry.b = carry.b * f + b2;
    carry.m = m2;
  } else {
    f = pow4_factor(m2, carry.m);
    carry.a += a2 * f;
    carry.b += b2 * f;
  }
  return f;
}

// A plain state (sums relative to e^m: the format of the recurrent state and of LseState) in this convention and
// back: one exponential per state, e^{m - O} (in (1/4, 1]) or its inverse.
template <typename Acc>
__device__ __forceinline__ LseState<Acc> pow4_from_plain(Acc m, Acc a, Acc b) {
  LseState<Acc> s;
  s.init();
  if (m == neg_inf<Acc>()) return s;
  const Acc f = Pow4Offset<Acc>::of(m).exp_minus(m);
  s.m = m;
  s.a = a * f;
  s.b = b * f;
  return s;
}
template <typename Acc>
__device__ __forceinline__ LseState<Acc> pow4_to_plain(LseState<Acc> s) {
  if (s.empty()) return s;
  const Acc f = Pow4Offset<Acc>::of(s.m).exp_plus(-s.m);  // e^{O - m}
  s.a *= f;
  s.b *= f;
  return s;
}

}  // namespace cuda
}  // namespace attnfree
