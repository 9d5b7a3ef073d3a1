// attnfree_emu: nvcuda::wmma on the CPU.
//
// Fragments are distributed over the 32 lanes of a warp like on the GPU, with num_elements = rows*cols/32 per
// lane, but with the harness's own element-to-lane mapping (lane l holds elements l, l+32, l+64, ... of the
// row-major logical matrix): the wmma layout is unspecified, and a kernel that assumes the hardware one gets wrong
// results here. load_matrix_sync / store_matrix_sync / mma_sync are warp collectives (all 32 lanes, same
// arguments): the load happens when all lanes have arrived; each lane stores its own elements when it resumes (so a
// missing __syncwarp() between store_matrix_sync and reading another lane's elements reads stale data); mma_sync
// is computed once per warp (and counted once: mma_ops, mma_flops = 2*M*N*K).
//
// Numerics (exact operand rounding, fp32 accumulate):
//  * __half / __nv_bfloat16 operands are exact values of their types; products are exact in fp32, accumulated
//    in fp32 (round to nearest) in k order onto C. (The GPU adds the products of one mma with its own alignment
//    and truncation rules and order - Fasi et al., "Numerical behavior of NVIDIA tensor cores", PeerJ CS 2021 -
//    so results agree with the GPU to accumulation rounding, not bit for bit.)
//  * precision::tf32 operands: wmma::__float_to_tf32 is cvt.rna.tf32.f32 (round to nearest, ties away from zero,
//    to 10 mantissa bits; sm_80+ SASS: add 0x1000 to the bits of a finite value, then clear the low 13 bits).
//    Operands loaded into a tf32 fragment without conversion are TRUNCATED: the tensor core reads only the top
//    19 bits (PyTorch documentation, "Numerical accuracy", TF32: "only the first 10 bits of the input mantissa are read";
//    CUTLASS's FastF32 relies on this with round_toward_zero for the big part). Products of tf32 values are exact
//    in fp32.
//  * double (8x8x4): fused multiply-add in k order.   * __half accumulators: fp32 accumulate, rounded once.
#pragma once
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <attnfree_emu/gptr.h>
#include <attnfree_emu/runtime.h>

namespace nvcuda {
namespace wmma {

struct row_major {};
struct col_major {};
struct matrix_a {};
struct matrix_b {};
struct accumulator {};
namespace precision {
struct tf32 {};
}  // namespace precision

enum layout_t { mem_row_major, mem_col_major };

template <typename T>
struct helper_traits {
  typedef T element_type;
  typedef T storage_element_type;
  typedef T fill_argument_type;
};
template <>
struct helper_traits<precision::tf32> {
  typedef precision::tf32 element_type;
  typedef float storage_element_type;
  typedef float fill_argument_type;
};

template <typename T, int size, int packed_size = size>
struct __align__(8) __frag_base {
  enum { num_elements = size };
  enum { num_storage_elements = packed_size };
  typedef T element_type;
  typedef typename helper_traits<T>::storage_element_type storage_element_type;
  storage_element_type x[num_storage_elements];
};

// cvt.rna.tf32.f32
inline float __float_to_tf32(float in) {
  uint32_t u;
  std::memcpy(&u, &in, 4);
  if ((u & 0x7f800000u) != 0x7f800000u) u += 0x1000u;
  u &= 0xffffe000u;
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}

namespace __emu {
template <class Use, int m, int n, int k> struct dims;
template <int m, int n, int k> struct dims<matrix_a, m, n, k> { static constexpr int rows = m, cols = k; };
template <int m, int n, int k> struct dims<matrix_b, m, n, k> { static constexpr int rows = k, cols = n; };
template <int m, int n, int k> struct dims<accumulator, m, n, k> { static constexpr int rows = m, cols = n; };

template <int m, int n, int k> constexpr bool shape16() {
  return (m == 16 && n == 16 && k == 16) || (m == 32 && n == 8 && k == 16) || (m == 8 && n == 32 && k == 16);
}
template <class Use, int m, int n, int k, class T, class L>
constexpr bool valid() {
  if (std::is_same<Use, accumulator>::value) {
    if (!std::is_same<L, void>::value) return false;
    if (std::is_same<T, float>::value) return shape16<m, n, k>() || (m == 16 && n == 16 && k == 8);
    if (std::is_same<T, __half>::value || std::is_same<T, int>::value) return shape16<m, n, k>();
    if (std::is_same<T, double>::value) return m == 8 && n == 8 && k == 4;
    return false;
  }
  if (!(std::is_same<L, row_major>::value || std::is_same<L, col_major>::value)) return false;
  if (std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value ||
      std::is_same<T, signed char>::value || std::is_same<T, unsigned char>::value)
    return shape16<m, n, k>();
  if (std::is_same<T, precision::tf32>::value) return m == 16 && n == 16 && k == 8;
  if (std::is_same<T, double>::value) return m == 8 && n == 8 && k == 4;
  return false;
}
template <class Use, int m, int n, int k>
constexpr int elems() {
  return dims<Use, m, n, k>::rows * dims<Use, m, n, k>::cols / 32;
}
}  // namespace __emu

template <typename Use, int m, int n, int k, typename T, typename Layout = void>
class fragment : public __frag_base<T, __emu::elems<Use, m, n, k>()> {
  static_assert(__emu::valid<Use, m, n, k, T, Layout>(),
                "attnfree_emu: unsupported wmma fragment (use, shape, type or layout)");

 public:
  typedef Use __use;
  typedef Layout __layout;
  static constexpr int __m = m, __n = n, __k = k;
  static constexpr int __rows = __emu::dims<Use, m, n, k>::rows;
  static constexpr int __cols = __emu::dims<Use, m, n, k>::cols;
};

template <typename T, int size, int packed_size>
inline void fill_fragment(__frag_base<T, size, packed_size>& f,
                          const typename helper_traits<T>::fill_argument_type& in) {
  const typename helper_traits<T>::storage_element_type v = in;
  for (int i = 0; i < f.num_storage_elements; ++i) f.x[i] = v;
}

namespace __emu {
using ::attnfree_emu::rt::LaneSlot;

// numeric value of a stored element, in the compute type
inline float value(const __half& x, __half*) { return __half2float(x); }
inline float value(const __nv_bfloat16& x, __nv_bfloat16*) { return __bfloat162float(x); }
inline float value(const float& x, precision::tf32*) {
  uint32_t u;
  std::memcpy(&u, &x, 4);
  u &= 0xffffe000u;  // the tensor core ignores the low 13 bits of an unconverted operand
  float r;
  std::memcpy(&r, &u, 4);
  return r;
}
inline float value(const float& x, float*) { return x; }
inline double value(const double& x, double*) { return x; }
inline int value(const signed char& x, signed char*) { return x; }
inline int value(const unsigned char& x, unsigned char*) { return x; }
inline int value(const int& x, int*) { return x; }

template <class S> inline void put(S& dst, float v);
template <> inline void put<float>(float& dst, float v) { dst = v; }
template <> inline void put<__half>(__half& dst, float v) { dst = __float2half_rn(v); }
inline void put(double& dst, double v) { dst = v; }
inline void put(int& dst, long long v) { dst = static_cast<int>(static_cast<uint32_t>(v)); }

inline int lane() { return ::attnfree_emu::rt::lane_id(); }

// slot layout for load/store: p[0] = fragment, p[1] = raw address, p[2] = Buffer (checked) or null,
// aux = ldm, aux2 = 2 * layout (1 = col major) + checked
template <class S>
inline S read_elem(const LaneSlot* s, long long off) {
  const S* p = static_cast<const S*>(s->p[1]) + off;
  if (s->aux2 & 1)
    ::attnfree_emu::detail::check_access(static_cast<const ::attnfree_emu::Buffer*>(s->p[2]), p, sizeof(S),
                                         alignof(S), false);
  S v;
  std::memcpy(static_cast<void*>(&v), static_cast<const void*>(p), sizeof(S));
  return v;
}
template <class S>
inline void write_elem(const LaneSlot* s, long long off, const S& v) {
  S* p = const_cast<S*>(static_cast<const S*>(s->p[1])) + off;
  if (s->aux2 & 1)
    ::attnfree_emu::detail::check_access(static_cast<const ::attnfree_emu::Buffer*>(s->p[2]), p, sizeof(S),
                                         alignof(S), true);
  std::memcpy(static_cast<void*>(p), static_cast<const void*>(&v), sizeof(S));
}

template <class S>
inline void check_args(LaneSlot* const* s, const char* what) {
  for (int l = 1; l < 32; ++l)
    if (s[l]->p[1] != s[0]->p[1] || s[l]->aux != s[0]->aux || s[l]->aux2 != s[0]->aux2)
      ::attnfree_emu::rt::fault(719, "%s: lanes 0 and %d pass different pointers, ldm or layout (%p/%lld vs %p/%lld)",
                                what, l, s[0]->p[1], s[0]->aux, s[l]->p[1], s[l]->aux);
  const uintptr_t a = reinterpret_cast<uintptr_t>(s[0]->p[1]);
  if (a % 32 != 0)
    ::attnfree_emu::rt::fault(716 /* cudaErrorMisalignedAddress */,
                              "%s: the matrix pointer %p is not 256-bit (32-byte) aligned", what, s[0]->p[1]);
  if ((static_cast<unsigned long long>(s[0]->aux) * sizeof(S)) % 16 != 0)
    ::attnfree_emu::rt::fault(716, "%s: ldm = %lld elements is not a multiple of 16 bytes", what, s[0]->aux);
}

template <class Frag, bool COL>
void c_load(LaneSlot* const* s, unsigned) {
  typedef typename Frag::storage_element_type S;
  check_args<S>(s, "load_matrix_sync");
  const long long ldm = s[0]->aux;
  for (int l = 0; l < 32; ++l) {
    Frag* f = static_cast<Frag*>(const_cast<void*>(s[l]->p[0]));
    for (int e = 0; e < Frag::num_elements; ++e) {
      const int idx = e * 32 + l, r = idx / Frag::__cols, c = idx % Frag::__cols;
      f->x[e] = read_elem<S>(s[0], COL ? static_cast<long long>(c) * ldm + r : static_cast<long long>(r) * ldm + c);
    }
  }
}
template <class Frag>
void c_store_check(LaneSlot* const* s, unsigned) {
  check_args<typename Frag::storage_element_type>(s, "store_matrix_sync");
}

template <class Frag>
inline void load(Frag& f, const void* raw, const ::attnfree_emu::Buffer* b, bool checked, unsigned ldm, bool col,
                 const char* file, int line) {
  LaneSlot s;
  s.p[0] = &f;
  s.p[1] = raw;
  s.p[2] = b;
  s.aux = ldm;
  s.aux2 = (col ? 2 : 0) | (checked ? 1 : 0);
  if (col)
    ::attnfree_emu::rt::warp_collective(0xffffffffu, &c_load<Frag, true>, &s, "load_matrix_sync", file, line);
  else
    ::attnfree_emu::rt::warp_collective(0xffffffffu, &c_load<Frag, false>, &s, "load_matrix_sync", file, line);
}

template <class Frag>
inline void store(const Frag& f, const void* raw, const ::attnfree_emu::Buffer* b, bool checked, unsigned ldm,
                  bool col, const char* file, int line) {
  typedef typename Frag::storage_element_type S;
  LaneSlot s;
  s.p[0] = &f;
  s.p[1] = raw;
  s.p[2] = b;
  s.aux = ldm;
  s.aux2 = (col ? 2 : 0) | (checked ? 1 : 0);
  ::attnfree_emu::rt::warp_collective(0xffffffffu, &c_store_check<Frag>, &s, "store_matrix_sync", file, line);
  const int l = lane();  // each lane stores its own elements when it resumes
  for (int e = 0; e < Frag::num_elements; ++e) {
    const int idx = e * 32 + l, r = idx / Frag::__cols, c = idx % Frag::__cols;
    write_elem<S>(&s, col ? static_cast<long long>(c) * ldm + r : static_cast<long long>(r) * ldm + c, f.x[e]);
  }
}

template <class FD, class FA, class FB, class FC>
void c_mma(LaneSlot* const* s, unsigned) {
  constexpr int M = FA::__rows, K = FA::__cols, N = FB::__cols;
  typedef typename FA::element_type TA;
  typedef typename FB::element_type TB;
  typedef typename FC::element_type TC;
  typedef decltype(value(std::declval<const typename FC::storage_element_type&>(), static_cast<TC*>(nullptr))) Acc;
  typedef typename std::conditional<std::is_same<Acc, int>::value, long long, Acc>::type Sum;
  static Sum A[M * K], B[K * N], C[M * N];
  for (int l = 0; l < 32; ++l) {
    const FA* a = static_cast<const FA*>(s[l]->p[1]);
    const FB* b = static_cast<const FB*>(s[l]->p[2]);
    const FC* c = static_cast<const FC*>(s[l]->p[3]);
    for (int e = 0; e < FA::num_elements; ++e) A[e * 32 + l] = value(a->x[e], static_cast<TA*>(nullptr));
    for (int e = 0; e < FB::num_elements; ++e) B[e * 32 + l] = value(b->x[e], static_cast<TB*>(nullptr));
    for (int e = 0; e < FC::num_elements; ++e) C[e * 32 + l] = value(c->x[e], static_cast<TC*>(nullptr));
  }
  static Sum Dm[M * N];
  for (int i = 0; i < M; ++i)
    for (int j = 0; j < N; ++j) {
      Sum acc = C[i * N + j];
      for (int kk = 0; kk < K; ++kk) {
        if (std::is_same<Sum, double>::value)
          acc = std::fma(A[i * K + kk], B[kk * N + j], acc);
        else
          acc += A[i * K + kk] * B[kk * N + j];  // exact product (fp16/bf16/tf32 in fp32; ints)
      }
      Dm[i * N + j] = acc;
    }
  for (int l = 0; l < 32; ++l) {
    FD* d = static_cast<FD*>(const_cast<void*>(s[l]->p[0]));
    for (int e = 0; e < FD::num_elements; ++e) put(d->x[e], Dm[e * 32 + l]);
  }
  if (::attnfree_emu::g_in_kernel) {
    ++::attnfree_emu::g_counters.mma_ops;
    ::attnfree_emu::g_counters.mma_flops += 2ull * M * N * K;
  }
}
}  // namespace __emu

// ---- load_matrix_sync
template <typename Use, int m, int n, int k, typename T, typename L>
inline void load_matrix_sync(fragment<Use, m, n, k, T, L>& a,
                             const typename helper_traits<T>::storage_element_type* p, unsigned ldm,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t argument");
  __emu::load(a, p, nullptr, false, ldm, std::is_same<L, col_major>::value, file, line);
}
template <typename Use, int m, int n, int k, typename T, typename L>
inline void load_matrix_sync(fragment<Use, m, n, k, T, L>& a,
                             const ::attnfree_emu::gptr<const typename helper_traits<T>::storage_element_type>& p,
                             unsigned ldm, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(!std::is_same<Use, accumulator>::value, "accumulator loads take a layout_t argument");
  __emu::load(a, p.raw(), p.buffer(), true, ldm, std::is_same<L, col_major>::value, file, line);
}
template <int m, int n, int k, typename T>
inline void load_matrix_sync(fragment<accumulator, m, n, k, T>& a, const T* p, unsigned ldm, layout_t layout,
                             const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  __emu::load(a, p, nullptr, false, ldm, layout == mem_col_major, file, line);
}
template <int m, int n, int k, typename T>
inline void load_matrix_sync(fragment<accumulator, m, n, k, T>& a, const ::attnfree_emu::gptr<const T>& p,
                             unsigned ldm, layout_t layout, const char* file = __builtin_FILE(),
                             int line = __builtin_LINE()) {
  __emu::load(a, p.raw(), p.buffer(), true, ldm, layout == mem_col_major, file, line);
}

// ---- store_matrix_sync (accumulators)
template <int m, int n, int k, typename T>
inline void store_matrix_sync(T* p, const fragment<accumulator, m, n, k, T>& a, unsigned ldm, layout_t layout,
                              const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  __emu::store(a, p, nullptr, false, ldm, layout == mem_col_major, file, line);
}
template <int m, int n, int k, typename T>
inline void store_matrix_sync(const ::attnfree_emu::gptr<T>& p, const fragment<accumulator, m, n, k, T>& a,
                              unsigned ldm, layout_t layout, const char* file = __builtin_FILE(),
                              int line = __builtin_LINE()) {
  __emu::store(a, p.raw(), p.buffer(), true, ldm, layout == mem_col_major, file, line);
}

// ---- mma_sync
template <int m, int n, int k, typename TA, typename LA, typename TB, typename LB, typename TC, typename TD>
inline void mma_sync(fragment<accumulator, m, n, k, TD>& d, const fragment<matrix_a, m, n, k, TA, LA>& a,
                     const fragment<matrix_b, m, n, k, TB, LB>& b, const fragment<accumulator, m, n, k, TC>& c,
                     bool satf = false, const char* file = __builtin_FILE(), int line = __builtin_LINE()) {
  static_assert(std::is_same<TA, TB>::value, "wmma::mma_sync: a and b must have the same element type");
  (void)satf;
  typedef fragment<accumulator, m, n, k, TD> FD;
  typedef fragment<matrix_a, m, n, k, TA, LA> FA;
  typedef fragment<matrix_b, m, n, k, TB, LB> FB;
  typedef fragment<accumulator, m, n, k, TC> FC;
  ::attnfree_emu::rt::LaneSlot s;
  s.p[0] = &d;
  s.p[1] = &a;
  s.p[2] = &b;
  s.p[3] = &c;
  ::attnfree_emu::rt::warp_collective(0xffffffffu, &__emu::c_mma<FD, FA, FB, FC>, &s, "mma_sync", file, line);
}

}  // namespace wmma
}  // namespace nvcuda
