// attnfree_emu: the emulated CUDA device environment (built-in variables, barriers, warp collectives, atomics,
// device math, intrinsics). Included by cuda_emulation.h after the standard and CUDA toolkit headers.
#pragma once
#include <cmath>
#include <cstdint>
#include <cstring>
#include <ctime>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <vector_types.h>

#include <attnfree_emu/gptr.h>
#include <attnfree_emu/runtime.h>

// ------------------------------------------------------------------------------------------------ built-ins
// Set by the scheduler before each switch to a thread (fiber); all threads run on one host thread.
extern uint3 threadIdx;
extern uint3 blockIdx;
extern dim3 blockDim;
extern dim3 gridDim;
constexpr int warpSize = 32;

#define ATTNFREE_EMU_SITE const char *attnfree_emu_file = __builtin_FILE(), int attnfree_emu_line = __builtin_LINE()
#define ATTNFREE_EMU_AT attnfree_emu_file, attnfree_emu_line

// ------------------------------------------------------------------------------------------------ barriers
inline void __syncthreads(ATTNFREE_EMU_SITE) { attnfree_emu::rt::syncthreads(0, 0, ATTNFREE_EMU_AT); }
inline int __syncthreads_count(int pred, ATTNFREE_EMU_SITE) {
  return attnfree_emu::rt::syncthreads(1, pred, ATTNFREE_EMU_AT);
}
inline int __syncthreads_and(int pred, ATTNFREE_EMU_SITE) {
  return attnfree_emu::rt::syncthreads(2, pred, ATTNFREE_EMU_AT);
}
inline int __syncthreads_or(int pred, ATTNFREE_EMU_SITE) {
  return attnfree_emu::rt::syncthreads(3, pred, ATTNFREE_EMU_AT);
}
// Memory fences: no-ops. Threads of a block run one at a time and blocks run one after another, so every write is
// visible to every later read; the harness models ordering only at barriers and warp collectives.
inline void __threadfence() {}
inline void __threadfence_block() {}
inline void __threadfence_system() {}

// ------------------------------------------------------------------------------------------------ warp collectives
namespace attnfree_emu {
namespace wc {
using rt::LaneSlot;

inline void check_width(int width, const char* what) {
  if (width < 1 || width > 32 || (width & (width - 1)) != 0)
    rt::fault(1 /* cudaErrorInvalidValue */, "%s: width %d is not a power of two in [1, 32]", what, width);
}

inline void c_noop(LaneSlot* const*, unsigned) {}

// KIND: 0 idx, 1 up, 2 down, 3 xor
template <int KIND>
void c_shfl(LaneSlot* const* s, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const int width = s[l]->aux2;
    const int seg = l & ~(width - 1);
    const long long a = s[l]->aux;
    long long src;
    if (KIND == 0) {
      src = seg + (a & (width - 1));
    } else if (KIND == 1) {
      src = l - a;
      if (src < seg) src = l;
    } else if (KIND == 2) {
      src = l + a;
      if (src >= seg + width) src = l;
    } else {
      src = l ^ a;
      if (src >= seg + width || src < 0 || src > 31) src = l;
    }
    if (src < 0 || src > 31 || !((mask >> src) & 1u))
      rt::fault(719 /* cudaErrorLaunchFailure */,
                "%s: lane %d reads lane %lld, which is not in the mask 0x%08x (its value is undefined)",
                KIND == 0 ? "__shfl_sync" : KIND == 1 ? "__shfl_up_sync" : KIND == 2 ? "__shfl_down_sync"
                                                                                       : "__shfl_xor_sync",
                l, src, mask);
    std::memcpy(s[l]->out, s[src]->in, sizeof(s[l]->out));
  }
}

template <class T> struct is_gref : std::false_type {};
template <class T> struct is_gref<gref<T>> : std::true_type {};
template <class T> struct is_gref<gref<const T>> : std::true_type {};

template <int KIND, class T>
T shfl(unsigned mask, T var, long long a, int width, const char* what, const char* file, int line) {
  static_assert(!is_gref<T>::value, "shuffle of a global-memory proxy: load the element into a local first");
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 16, "unsupported shuffle type");
  check_width(width, what);
  LaneSlot s;
  std::memcpy(s.in, &var, sizeof(T));
  s.aux = a;
  s.aux2 = width;
  rt::warp_collective(mask, &c_shfl<KIND>, &s, what, file, line);
  T r;
  std::memcpy(&r, s.out, sizeof(T));
  return r;
}

inline void c_ballot(LaneSlot* const* s, unsigned mask) {
  unsigned b = 0;
  for (int l = 0; l < 32; ++l)
    if (((mask >> l) & 1u) && s[l]->aux) b |= 1u << l;
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) std::memcpy(s[l]->out, &b, sizeof(b));
}

inline unsigned ballot(unsigned mask, int pred, const char* what, const char* file, int line) {
  LaneSlot s;
  s.aux = pred != 0;
  rt::warp_collective(mask, &c_ballot, &s, what, file, line);
  unsigned b;
  std::memcpy(&b, s.out, sizeof(b));
  return b;
}

// integer reductions: OP 0 add, 1 min, 2 max, 3 and, 4 or, 5 xor; SIGNED selects int/unsigned min/max
template <int OP, bool SIGNED>
void c_reduce(LaneSlot* const* s, unsigned mask) {
  long long acc = 0;
  bool first = true;
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    const long long v = SIGNED ? static_cast<long long>(static_cast<int>(s[l]->aux))
                               : static_cast<long long>(static_cast<unsigned>(s[l]->aux));
    if (first) { acc = v; first = false; continue; }
    switch (OP) {
      case 0: acc += v; break;
      case 1: acc = v < acc ? v : acc; break;
      case 2: acc = v > acc ? v : acc; break;
      case 3: acc &= v; break;
      case 4: acc |= v; break;
      default: acc ^= v; break;
    }
  }
  const unsigned r = static_cast<unsigned>(acc);
  for (int l = 0; l < 32; ++l)
    if ((mask >> l) & 1u) std::memcpy(s[l]->out, &r, sizeof(r));
}

template <int OP, bool SIGNED>
unsigned reduce(unsigned mask, unsigned v, const char* what, const char* file, int line) {
  LaneSlot s;
  s.aux = static_cast<long long>(v);
  rt::warp_collective(mask, &c_reduce<OP, SIGNED>, &s, what, file, line);
  unsigned r;
  std::memcpy(&r, s.out, sizeof(r));
  return r;
}

// match: aux2 = value size in bytes; out[0..3] = mask of equal lanes, out[4] = "all equal" predicate
template <bool ALL>
void c_match(LaneSlot* const* s, unsigned mask) {
  for (int l = 0; l < 32; ++l) {
    if (!((mask >> l) & 1u)) continue;
    unsigned eq = 0;
    for (int o = 0; o < 32; ++o)
      if (((mask >> o) & 1u) && std::memcmp(s[l]->in, s[o]->in, static_cast<size_t>(s[l]->aux2)) == 0)
        eq |= 1u << o;
    unsigned r = eq;
    int pred = 1;
    if (ALL) {
      pred = eq == mask;
      r = pred ? mask : 0u;
    }
    std::memcpy(s[l]->out, &r, sizeof(r));
    s[l]->out[4] = static_cast<unsigned char>(pred);
  }
}

}  // namespace wc
}  // namespace attnfree_emu

inline void __syncwarp(unsigned mask = 0xffffffffu, ATTNFREE_EMU_SITE) {
  attnfree_emu::rt::LaneSlot s;
  attnfree_emu::rt::warp_collective(mask, &attnfree_emu::wc::c_noop, &s, "__syncwarp", ATTNFREE_EMU_AT);
}
template <class T>
T __shfl_sync(unsigned mask, T var, int srcLane, int width = warpSize, ATTNFREE_EMU_SITE) {
  return attnfree_emu::wc::shfl<0>(mask, var, srcLane, width, "__shfl_sync", ATTNFREE_EMU_AT);
}
template <class T>
T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize, ATTNFREE_EMU_SITE) {
  return attnfree_emu::wc::shfl<1>(mask, var, delta, width, "__shfl_up_sync", ATTNFREE_EMU_AT);
}
template <class T>
T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize, ATTNFREE_EMU_SITE) {
  return attnfree_emu::wc::shfl<2>(mask, var, delta, width, "__shfl_down_sync", ATTNFREE_EMU_AT);
}
template <class T>
T __shfl_xor_sync(unsigned mask, T var, int laneMask, int width = warpSize, ATTNFREE_EMU_SITE) {
  return attnfree_emu::wc::shfl<3>(mask, var, laneMask, width, "__shfl_xor_sync", ATTNFREE_EMU_AT);
}
inline unsigned __ballot_sync(unsigned mask, int pred, ATTNFREE_EMU_SITE) {
  return attnfree_emu::wc::ballot(mask, pred, "__ballot_sync", ATTNFREE_EMU_AT);
}
inline int __any_sync(unsigned mask, int pred, ATTNFREE_EMU_SITE) {
  return attnfree_emu::wc::ballot(mask, pred, "__any_sync", ATTNFREE_EMU_AT) != 0u;
}
inline int __all_sync(unsigned mask, int pred, ATTNFREE_EMU_SITE) {
  return attnfree_emu::wc::ballot(mask, pred, "__all_sync", ATTNFREE_EMU_AT) == mask;
}
inline int __uni_sync(unsigned mask, int pred, ATTNFREE_EMU_SITE) {
  const unsigned b = attnfree_emu::wc::ballot(mask, pred, "__uni_sync", ATTNFREE_EMU_AT);
  return b == 0u || b == mask;
}
// The lanes of the calling warp that have not exited (the harness cannot know which are converged).
inline unsigned __activemask() { return attnfree_emu::rt::live_lanes_mask(); }

#define ATTNFREE_EMU_REDUCE(name, OP, S, T)                                                                    \
  inline T name(unsigned mask, T value, ATTNFREE_EMU_SITE) {                                                  \
    return static_cast<T>(                                                                                     \
        attnfree_emu::wc::reduce<OP, S>(mask, static_cast<unsigned>(value), #name, ATTNFREE_EMU_AT));          \
  }
ATTNFREE_EMU_REDUCE(__reduce_add_sync, 0, false, unsigned)
ATTNFREE_EMU_REDUCE(__reduce_add_sync, 0, true, int)
ATTNFREE_EMU_REDUCE(__reduce_min_sync, 1, false, unsigned)
ATTNFREE_EMU_REDUCE(__reduce_min_sync, 1, true, int)
ATTNFREE_EMU_REDUCE(__reduce_max_sync, 2, false, unsigned)
ATTNFREE_EMU_REDUCE(__reduce_max_sync, 2, true, int)
ATTNFREE_EMU_REDUCE(__reduce_and_sync, 3, false, unsigned)
ATTNFREE_EMU_REDUCE(__reduce_or_sync, 4, false, unsigned)
ATTNFREE_EMU_REDUCE(__reduce_xor_sync, 5, false, unsigned)
#undef ATTNFREE_EMU_REDUCE

template <class T>
unsigned __match_any_sync(unsigned mask, T value, ATTNFREE_EMU_SITE) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "unsupported __match_any_sync type");
  attnfree_emu::rt::LaneSlot s;
  std::memset(s.in, 0, sizeof(s.in));
  std::memcpy(s.in, &value, sizeof(T));
  s.aux2 = sizeof(T);
  attnfree_emu::rt::warp_collective(mask, &attnfree_emu::wc::c_match<false>, &s, "__match_any_sync", ATTNFREE_EMU_AT);
  unsigned r;
  std::memcpy(&r, s.out, sizeof(r));
  return r;
}
template <class T>
unsigned __match_all_sync(unsigned mask, T value, int* pred, ATTNFREE_EMU_SITE) {
  static_assert(std::is_trivially_copyable<T>::value && sizeof(T) <= 8, "unsupported __match_all_sync type");
  attnfree_emu::rt::LaneSlot s;
  std::memset(s.in, 0, sizeof(s.in));
  std::memcpy(s.in, &value, sizeof(T));
  s.aux2 = sizeof(T);
  attnfree_emu::rt::warp_collective(mask, &attnfree_emu::wc::c_match<true>, &s, "__match_all_sync", ATTNFREE_EMU_AT);
  unsigned r;
  std::memcpy(&r, s.out, sizeof(r));
  *pred = s.out[4];
  return r;
}

// ------------------------------------------------------------------------------------------------ atomics
// Threads run one at a time, so a read-modify-write is atomic; the scheduler may switch threads after it (spin
// loops on atomics make progress). Through gptr the access is bounds-checked and counted (read + write).
namespace attnfree_emu {
namespace at {
template <class T, class F>
T rmw(T* p, F f) {
  if (g_in_kernel) ++g_counters.atomics;
  T old;
  std::memcpy(static_cast<void*>(&old), static_cast<const void*>(p), sizeof(T));
  const T nv = f(old);
  std::memcpy(static_cast<void*>(p), static_cast<const void*>(&nv), sizeof(T));
  rt::maybe_yield();
  return old;
}
template <class T, class F>
T rmw(const gptr<T>& p, F f) {
  detail::check_access(p.buffer(), p.raw(), sizeof(T), alignof(T), false);
  detail::check_access(p.buffer(), p.raw(), sizeof(T), alignof(T), true);
  return rmw(p.raw(), f);
}
inline __half hadd(__half a, __half b) { return __float2half_rn(__half2float(a) + __half2float(b)); }
inline __nv_bfloat16 badd(__nv_bfloat16 a, __nv_bfloat16 b) {
  return __float2bfloat16_rn(__bfloat162float(a) + __bfloat162float(b));
}
}  // namespace at
}  // namespace attnfree_emu

#define ATTNFREE_EMU_ATOMIC2(name, T, EXPR)                                                                    \
  inline T name(T* address, T val) {                                                                           \
    return attnfree_emu::at::rmw(address, [&](T old) -> T { return EXPR; });                                   \
  }                                                                                                            \
  inline T name(const attnfree_emu::gptr<T>& address, T val) {                                                 \
    return attnfree_emu::at::rmw(address, [&](T old) -> T { return EXPR; });                                   \
  }
ATTNFREE_EMU_ATOMIC2(atomicAdd, int, old + val)
ATTNFREE_EMU_ATOMIC2(atomicAdd, unsigned int, old + val)
ATTNFREE_EMU_ATOMIC2(atomicAdd, unsigned long long int, old + val)
ATTNFREE_EMU_ATOMIC2(atomicAdd, float, old + val)
ATTNFREE_EMU_ATOMIC2(atomicAdd, double, old + val)
ATTNFREE_EMU_ATOMIC2(atomicAdd, __half, attnfree_emu::at::hadd(old, val))
ATTNFREE_EMU_ATOMIC2(atomicAdd, __nv_bfloat16, attnfree_emu::at::badd(old, val))
ATTNFREE_EMU_ATOMIC2(atomicSub, int, old - val)
ATTNFREE_EMU_ATOMIC2(atomicSub, unsigned int, old - val)
ATTNFREE_EMU_ATOMIC2(atomicExch, int, ((void)old, val))
ATTNFREE_EMU_ATOMIC2(atomicExch, unsigned int, ((void)old, val))
ATTNFREE_EMU_ATOMIC2(atomicExch, unsigned long long int, ((void)old, val))
ATTNFREE_EMU_ATOMIC2(atomicExch, float, ((void)old, val))
ATTNFREE_EMU_ATOMIC2(atomicMin, int, val < old ? val : old)
ATTNFREE_EMU_ATOMIC2(atomicMin, unsigned int, val < old ? val : old)
ATTNFREE_EMU_ATOMIC2(atomicMin, long long int, val < old ? val : old)
ATTNFREE_EMU_ATOMIC2(atomicMin, unsigned long long int, val < old ? val : old)
ATTNFREE_EMU_ATOMIC2(atomicMax, int, val > old ? val : old)
ATTNFREE_EMU_ATOMIC2(atomicMax, unsigned int, val > old ? val : old)
ATTNFREE_EMU_ATOMIC2(atomicMax, long long int, val > old ? val : old)
ATTNFREE_EMU_ATOMIC2(atomicMax, unsigned long long int, val > old ? val : old)
ATTNFREE_EMU_ATOMIC2(atomicInc, unsigned int, old >= val ? 0u : old + 1u)
ATTNFREE_EMU_ATOMIC2(atomicDec, unsigned int, (old == 0u || old > val) ? val : old - 1u)
ATTNFREE_EMU_ATOMIC2(atomicAnd, int, old & val)
ATTNFREE_EMU_ATOMIC2(atomicAnd, unsigned int, old & val)
ATTNFREE_EMU_ATOMIC2(atomicAnd, unsigned long long int, old & val)
ATTNFREE_EMU_ATOMIC2(atomicOr, int, old | val)
ATTNFREE_EMU_ATOMIC2(atomicOr, unsigned int, old | val)
ATTNFREE_EMU_ATOMIC2(atomicOr, unsigned long long int, old | val)
ATTNFREE_EMU_ATOMIC2(atomicXor, int, old ^ val)
ATTNFREE_EMU_ATOMIC2(atomicXor, unsigned int, old ^ val)
ATTNFREE_EMU_ATOMIC2(atomicXor, unsigned long long int, old ^ val)
#undef ATTNFREE_EMU_ATOMIC2

#define ATTNFREE_EMU_CAS(T)                                                                                    \
  inline T atomicCAS(T* address, T compare, T val) {                                                           \
    return attnfree_emu::at::rmw(address, [&](T old) -> T { return old == compare ? val : old; });             \
  }                                                                                                            \
  inline T atomicCAS(const attnfree_emu::gptr<T>& address, T compare, T val) {                                 \
    return attnfree_emu::at::rmw(address, [&](T old) -> T { return old == compare ? val : old; });             \
  }
ATTNFREE_EMU_CAS(int)
ATTNFREE_EMU_CAS(unsigned int)
ATTNFREE_EMU_CAS(unsigned long long int)
ATTNFREE_EMU_CAS(unsigned short int)
#undef ATTNFREE_EMU_CAS

// ------------------------------------------------------------------------------------------------ min / max
// The CUDA overload set (crt/math_functions.hpp), host+device there, plain inline functions here.
#define ATTNFREE_EMU_MINMAX(R, A, B)                                                                           \
  inline R min(const A a, const B b) { return static_cast<R>(a) < static_cast<R>(b) ? static_cast<R>(a)        \
                                                                                    : static_cast<R>(b); }     \
  inline R max(const A a, const B b) { return static_cast<R>(a) > static_cast<R>(b) ? static_cast<R>(a)        \
                                                                                    : static_cast<R>(b); }
ATTNFREE_EMU_MINMAX(int, int, int)
ATTNFREE_EMU_MINMAX(unsigned int, unsigned int, unsigned int)
ATTNFREE_EMU_MINMAX(unsigned int, int, unsigned int)
ATTNFREE_EMU_MINMAX(unsigned int, unsigned int, int)
ATTNFREE_EMU_MINMAX(long int, long int, long int)
ATTNFREE_EMU_MINMAX(unsigned long int, unsigned long int, unsigned long int)
ATTNFREE_EMU_MINMAX(unsigned long int, long int, unsigned long int)
ATTNFREE_EMU_MINMAX(unsigned long int, unsigned long int, long int)
ATTNFREE_EMU_MINMAX(long long int, long long int, long long int)
ATTNFREE_EMU_MINMAX(unsigned long long int, unsigned long long int, unsigned long long int)
ATTNFREE_EMU_MINMAX(unsigned long long int, long long int, unsigned long long int)
ATTNFREE_EMU_MINMAX(unsigned long long int, unsigned long long int, long long int)
#undef ATTNFREE_EMU_MINMAX
inline float min(const float a, const float b) { return std::fmin(a, b); }
inline float max(const float a, const float b) { return std::fmax(a, b); }
inline double min(const double a, const double b) { return std::fmin(a, b); }
inline double max(const double a, const double b) { return std::fmax(a, b); }
inline double min(const float a, const double b) { return std::fmin(static_cast<double>(a), b); }
inline double max(const float a, const double b) { return std::fmax(static_cast<double>(a), b); }
inline double min(const double a, const float b) { return std::fmin(a, static_cast<double>(b)); }
inline double max(const double a, const float b) { return std::fmax(a, static_cast<double>(b)); }

// ------------------------------------------------------------------------------------------------ device math
// libm functions (expf, logf, exp2f, ...) are counted by the link (-Wl,--wrap=expf ...: see the runner / README);
// the CUDA-only spellings below count themselves and call the uncounted implementations.
namespace attnfree_emu {
namespace m {
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kLog2_10 = 3.3219280948873623f;
constexpr float kLog10_2 = 0.30102999566398120f;
}  // namespace m
}  // namespace attnfree_emu

inline float rsqrtf(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuRsqrt);
  return 1.0f / attnfree_emu::rt::raw_sqrtf(x);
}
inline double rsqrt(double x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuRsqrt);
  return 1.0 / attnfree_emu::rt::raw_sqrt(x);
}
inline float rcbrtf(float x) { return 1.0f / std::cbrt(x); }
inline double rcbrt(double x) { return 1.0 / std::cbrt(x); }
// fast-math intrinsics: hardware approximations (ex2.approx, lg2.approx, ...) are modelled by the accurate
// function of the same mathematical definition (results differ from the GPU in the last bits)
inline float __expf(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuExp);
  return attnfree_emu::rt::raw_exp2f(x * attnfree_emu::m::kLog2e);
}
inline float __exp10f(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuExp);
  return attnfree_emu::rt::raw_exp2f(x * attnfree_emu::m::kLog2_10);
}
inline float __logf(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuLog);
  return attnfree_emu::rt::raw_log2f(x) * attnfree_emu::m::kLn2;
}
inline float __log2f(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuLog);
  return attnfree_emu::rt::raw_log2f(x);
}
inline float __log10f(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuLog);
  return attnfree_emu::rt::raw_log2f(x) * attnfree_emu::m::kLog10_2;
}
inline float __powf(float x, float y) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuExp);
  attnfree_emu::count_sfu(attnfree_emu::kSfuLog);
  return attnfree_emu::rt::raw_exp2f(y * attnfree_emu::rt::raw_log2f(x));
}
inline float __sinf(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuTrig);
  return attnfree_emu::rt::raw_sinf(x);
}
inline float __cosf(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuTrig);
  return attnfree_emu::rt::raw_cosf(x);
}
inline float __tanf(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuTrig);
  return attnfree_emu::rt::raw_tanf(x);
}
inline void __sincosf(float x, float* s, float* c) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuTrig, 2);
  *s = attnfree_emu::rt::raw_sinf(x);
  *c = attnfree_emu::rt::raw_cosf(x);
}
inline float __fdividef(float a, float b) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuRcp);
  return a / b;
}
inline float fdividef(float a, float b) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuRcp);
  return a / b;
}
inline float __frcp_rn(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuRcp);
  return 1.0f / x;
}
// directed roundings are not emulated (round to nearest)
inline float __frcp_rz(float x) { return __frcp_rn(x); }
inline float __frcp_ru(float x) { return __frcp_rn(x); }
inline float __frcp_rd(float x) { return __frcp_rn(x); }
inline double __drcp_rn(double x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuRcp);
  return 1.0 / x;
}
inline float __frsqrt_rn(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuRsqrt);
  return 1.0f / attnfree_emu::rt::raw_sqrtf(x);
}
inline float __fsqrt_rn(float x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuSqrt);
  return attnfree_emu::rt::raw_sqrtf(x);
}
inline double __dsqrt_rn(double x) {
  attnfree_emu::count_sfu(attnfree_emu::kSfuSqrt);
  return attnfree_emu::rt::raw_sqrt(x);
}
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fmaf_ieee_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return std::fma(a, b, c); }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }

// bit casts and conversions
inline int __float_as_int(float x) { int r; std::memcpy(&r, &x, 4); return r; }
inline unsigned int __float_as_uint(float x) { unsigned r; std::memcpy(&r, &x, 4); return r; }
inline float __int_as_float(int x) { float r; std::memcpy(&r, &x, 4); return r; }
inline float __uint_as_float(unsigned int x) { float r; std::memcpy(&r, &x, 4); return r; }
inline long long __double_as_longlong(double x) { long long r; std::memcpy(&r, &x, 8); return r; }
inline double __longlong_as_double(long long x) { double r; std::memcpy(&r, &x, 8); return r; }
inline int __double2hiint(double x) { return static_cast<int>(__double_as_longlong(x) >> 32); }
inline int __double2loint(double x) { return static_cast<int>(__double_as_longlong(x) & 0xffffffffLL); }
inline double __hiloint2double(int hi, int lo) {
  return __longlong_as_double((static_cast<long long>(hi) << 32) | static_cast<unsigned int>(lo));
}
inline int __float2int_rn(float x) { return static_cast<int>(std::nearbyint(x)); }
inline int __float2int_rz(float x) { return static_cast<int>(x); }
inline int __float2int_rd(float x) { return static_cast<int>(std::floor(x)); }
inline int __float2int_ru(float x) { return static_cast<int>(std::ceil(x)); }
inline unsigned int __float2uint_rn(float x) { return static_cast<unsigned int>(std::nearbyint(x)); }
inline unsigned int __float2uint_rz(float x) { return static_cast<unsigned int>(x); }
inline long long __float2ll_rn(float x) { return static_cast<long long>(std::nearbyint(x)); }
inline long long __float2ll_rz(float x) { return static_cast<long long>(x); }
inline int __double2int_rn(double x) { return static_cast<int>(std::nearbyint(x)); }
inline int __double2int_rz(double x) { return static_cast<int>(x); }
inline long long __double2ll_rn(double x) { return static_cast<long long>(std::nearbyint(x)); }
inline float __double2float_rn(double x) { return static_cast<float>(x); }
inline float __int2float_rn(int x) { return static_cast<float>(x); }
inline float __uint2float_rn(unsigned int x) { return static_cast<float>(x); }
inline float __ll2float_rn(long long x) { return static_cast<float>(x); }
inline double __int2double_rn(int x) { return static_cast<double>(x); }
inline double __ll2double_rn(long long x) { return static_cast<double>(x); }

// integer intrinsics
inline int __popc(unsigned int x) { return __builtin_popcount(x); }
inline int __popcll(unsigned long long x) { return __builtin_popcountll(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline int __clzll(long long x) { return x == 0 ? 64 : __builtin_clzll(static_cast<unsigned long long>(x)); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __ffsll(long long x) { return __builtin_ffsll(x); }
inline unsigned int __brev(unsigned int x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline unsigned long long __brevll(unsigned long long x) {
  unsigned long long r = 0;
  for (int i = 0; i < 64; ++i) r |= ((x >> i) & 1ull) << (63 - i);
  return r;
}
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const unsigned long long v = (static_cast<unsigned long long>(y) << 32) | x;
  unsigned r = 0;
  for (int i = 0; i < 4; ++i) r |= static_cast<unsigned>((v >> (8 * ((s >> (4 * i)) & 7u))) & 0xffu) << (8 * i);
  return r;
}
inline unsigned int __funnelshift_l(unsigned int lo, unsigned int hi, unsigned int shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift & 31u)) >> 32);
}
inline unsigned int __funnelshift_lc(unsigned int lo, unsigned int hi, unsigned int shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>((v << (shift > 32u ? 32u : shift)) >> 32);
}
inline unsigned int __funnelshift_r(unsigned int lo, unsigned int hi, unsigned int shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift & 31u));
}
inline unsigned int __funnelshift_rc(unsigned int lo, unsigned int hi, unsigned int shift) {
  const unsigned long long v = (static_cast<unsigned long long>(hi) << 32) | lo;
  return static_cast<unsigned>(v >> (shift > 32u ? 32u : shift));
}
inline int __mul24(int x, int y) { return ((x << 8) >> 8) * ((y << 8) >> 8); }
inline unsigned int __umul24(unsigned int x, unsigned int y) { return (x & 0xffffffu) * (y & 0xffffffu); }
inline int __mulhi(int x, int y) { return static_cast<int>((static_cast<long long>(x) * y) >> 32); }
inline unsigned int __umulhi(unsigned int x, unsigned int y) {
  return static_cast<unsigned>((static_cast<unsigned long long>(x) * y) >> 32);
}
inline long long __mul64hi(long long x, long long y) {
  return static_cast<long long>((static_cast<__int128>(x) * y) >> 64);
}
inline unsigned long long __umul64hi(unsigned long long x, unsigned long long y) {
  return static_cast<unsigned long long>((static_cast<unsigned __int128>(x) * y) >> 64);
}
inline unsigned int __sad(int x, int y, unsigned int z) { return z + static_cast<unsigned>(x > y ? x - y : y - x); }
inline unsigned int __usad(unsigned int x, unsigned int y, unsigned int z) { return z + (x > y ? x - y : y - x); }

// cache-hinted loads/stores: plain accesses (raw or checked)
#define ATTNFREE_EMU_LD(name)                                                                                  \
  template <class T> inline T name(const T* p) { return *p; }                                                 \
  template <class T> inline T name(const attnfree_emu::gptr<const T>& p) { return p[0].load(); }
ATTNFREE_EMU_LD(__ldg)
ATTNFREE_EMU_LD(__ldcg)
ATTNFREE_EMU_LD(__ldca)
ATTNFREE_EMU_LD(__ldcs)
ATTNFREE_EMU_LD(__ldlu)
ATTNFREE_EMU_LD(__ldcv)
#undef ATTNFREE_EMU_LD
#define ATTNFREE_EMU_ST(name)                                                                                  \
  template <class T> inline void name(T* p, T v) { *p = v; }                                                  \
  template <class T> inline void name(const attnfree_emu::gptr<T>& p, T v) { p[0] = v; }
ATTNFREE_EMU_ST(__stwb)
ATTNFREE_EMU_ST(__stcg)
ATTNFREE_EMU_ST(__stcs)
ATTNFREE_EMU_ST(__stwt)
#undef ATTNFREE_EMU_ST

// misc
inline long long clock64() { return attnfree_emu::rt::clock_ticks(); }
inline void __nanosleep(unsigned int) { attnfree_emu::rt::maybe_yield(); }
[[noreturn]] inline void __trap() { attnfree_emu::rt::fault(710 /* cudaErrorAssert */, "__trap() called"); }
[[noreturn]] inline void __brkpt() { attnfree_emu::rt::fault(710, "__brkpt() called"); }

// dynamic shared memory (the cu2cpp rewrite of `extern __shared__ T name[];`)
namespace attnfree_emu {
template <class T> inline T* dynamic_smem() { return static_cast<T*>(rt::dynamic_smem()); }
// the cu2cpp rewrite of `__shared__ T name...;` registers each static shared object once
inline void static_smem(const volatile void* p, size_t bytes) {
  rt::register_static_smem(const_cast<void*>(p), bytes);
}
// Executed by every thread at each static shared declaration: one copy per array cannot serve several CTAs.
inline bool static_smem_use(const char* name, const char* file, int line) {
  if (g_multi_cta_cluster) rt::static_smem_in_cluster(name, file, line);
  return true;
}
}  // namespace attnfree_emu
