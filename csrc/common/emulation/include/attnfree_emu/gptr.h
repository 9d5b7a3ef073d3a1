// attnfree_emu::gptr<T>: a checked "fat" pointer to global memory, used under the harness where kernels write
// gptr<T> (under nvcc `template <class T> using gptr = T*;`, see ../../device_compat.cuh).
//
//  * A raw T* converts implicitly: the pointer is looked up in the buffer registry (buffers registered by the
//    runner with a name and a size), so a launcher passing static_cast<const float*>(q) to a kernel parameter
//    `gptr<const float> q` needs no change. nullptr and pointers outside every buffer give a gptr that faults
//    on access (unless ATTNFREE_EMU_ALLOW_UNREGISTERED=1).
//  * p[i], *p, p->m read and write through a proxy: reads and writes are bounds-checked against the buffer,
//    alignment-checked, and counted separately (bytes_read / bytes_written). A fault stops the launch with the
//    kernel, block, thread, buffer name and element index.
//  * p + i, p - i, p - q, ++, --, +=, -=, comparisons, `if (p)`, p == nullptr, &p[i] (a gptr again).
//  * gptr<T> converts to gptr<const T> (it derives from it, so a template parameter gptr<const T> also deduces
//    from a gptr<float> argument, as `const T*` does from `float*`).
//  * Vector access: gptr_cast<const float4>(p) reinterprets (same buffer; alignment is checked at access).
//  * p.raw() is the raw pointer (harness only: kernels must not use it, nvcc's T* has no .raw()).
// Not supported (compile errors, by design): implicit conversion back to T* (functions taking a global pointer
// take gptr<T> too); member writes through p[i].m / p->m (load, modify, store the element instead).
// Caveat: `auto x = p[i];` keeps a proxy (a deferred read) - write the element type instead of auto.
#pragma once
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include <attnfree_emu/runtime.h>

namespace attnfree_emu {

template <class T> class gptr;
template <class T> class gref;

namespace detail {

[[noreturn]] void gptr_fault(const char* what, const Buffer* b, const void* raw, size_t elem_bytes,
                             size_t elem_align);

inline void check_access(const Buffer* b, const void* p, size_t n, size_t align, bool write) {
  const uintptr_t a = reinterpret_cast<uintptr_t>(p);
  if (b == nullptr) {
    if (rt::allow_unregistered() && p != nullptr) {
      // unchecked (counted) access through an unregistered pointer
    } else {
      gptr_fault(write ? "write" : "read", b, p, n, align);
    }
  } else if (a < b->begin || a + n > b->end || a + n < a) {
    gptr_fault(write ? "out-of-bounds write" : "out-of-bounds read", b, p, n, align);
  } else if (write && !b->writable) {
    gptr_fault("write to a read-only buffer", b, p, n, align);
  }
  if (align > 1 && (a % align) != 0) gptr_fault(write ? "misaligned write" : "misaligned read", b, p, n, align);
  if (g_in_kernel) {
    if (write) g_counters.bytes_written += n;
    else g_counters.bytes_read += n;
  }
}

template <class T> struct is_gref : std::false_type {};
template <class T> struct is_gref<gref<T>> : std::true_type {};

}  // namespace detail

// ------------------------------------------------------------------------------------------------ proxies
// Read-only element proxy (for gptr<const T>).
template <class T>
class gref<const T> {
 public:
  using value_type = typename std::remove_cv<T>::type;
  gref(const T* p, const Buffer* b) : p_(p), b_(b) {}
  value_type load() const {
    detail::check_access(b_, p_, sizeof(T), alignof(T), false);
    value_type v;
    std::memcpy(static_cast<void*>(&v), static_cast<const void*>(p_), sizeof(T));
    return v;
  }
  operator value_type() const { return load(); }
  template <class U, typename std::enable_if<!std::is_same<U, value_type>::value &&
                                                 std::is_constructible<U, const value_type&>::value,
                                             int>::type = 0>
  explicit operator U() const {
    return U(load());
  }
  gptr<const T> operator&() const;

 protected:
  const T* p_;
  const Buffer* b_;
};

// Read-write element proxy (for gptr<T>).
template <class T>
class gref : public gref<const T> {
  using base = gref<const T>;

 public:
  using typename base::value_type;
  gref(T* p, const Buffer* b) : base(p, b) {}
  void store(const value_type& v) const {
    detail::check_access(this->b_, this->p_, sizeof(T), alignof(T), true);
    std::memcpy(static_cast<void*>(const_cast<T*>(this->p_)), static_cast<const void*>(&v), sizeof(T));
  }
  const gref& operator=(const value_type& v) const {
    store(v);
    return *this;
  }
  const gref& operator=(const gref& o) const {  // element copy, not proxy rebinding
    store(o.load());
    return *this;
  }
  template <class U>
  const gref& operator=(const gref<U>& o) const {
    store(value_type(o.load()));
    return *this;
  }
  template <class U, typename std::enable_if<!detail::is_gref<typename std::decay<U>::type>::value &&
                                                 !std::is_same<typename std::decay<U>::type, value_type>::value &&
                                                 std::is_constructible<value_type, U&&>::value,
                                             int>::type = 0>
  const gref& operator=(U&& v) const {
    store(value_type(static_cast<U&&>(v)));
    return *this;
  }
#define ATTNFREE_EMU_GREF_OP(op)                                  \
  template <class U>                                              \
  const gref& operator op##=(const U& v) const {                  \
    value_type x = this->load();                                  \
    x op## = v;                                                   \
    store(x);                                                     \
    return *this;                                                 \
  }
  ATTNFREE_EMU_GREF_OP(+)
  ATTNFREE_EMU_GREF_OP(-)
  ATTNFREE_EMU_GREF_OP(*)
  ATTNFREE_EMU_GREF_OP(/)
  ATTNFREE_EMU_GREF_OP(%)
  ATTNFREE_EMU_GREF_OP(&)
  ATTNFREE_EMU_GREF_OP(|)
  ATTNFREE_EMU_GREF_OP(^)
  ATTNFREE_EMU_GREF_OP(<<)
  ATTNFREE_EMU_GREF_OP(>>)
#undef ATTNFREE_EMU_GREF_OP
  value_type operator++() const {
    value_type x = this->load();
    ++x;
    store(x);
    return x;
  }
  value_type operator--() const {
    value_type x = this->load();
    --x;
    store(x);
    return x;
  }
  value_type operator++(int) const {
    value_type x = this->load();
    value_type y = x;
    ++y;
    store(y);
    return x;
  }
  value_type operator--(int) const {
    value_type x = this->load();
    value_type y = x;
    --y;
    store(y);
    return x;
  }
  gptr<T> operator&() const;
};

// ------------------------------------------------------------------------------------------------ pointers
namespace detail {
template <class T> struct arrow_holder {
  T v;
  const T* operator->() const { return &v; }
};
}  // namespace detail

// gptr<const T>: all the read-side functionality.
template <class T>
class gptr<const T> {
 public:
  using element_type = const T;
  gptr() = default;
  gptr(const T* raw) : p_(raw), b_(raw ? rt::lookup(raw) : nullptr) {}  // NOLINT: implicit on purpose
  gptr(const T* raw, const Buffer* b) : p_(raw), b_(b) {}

  const T* raw() const { return p_; }
  const Buffer* buffer() const { return b_; }
  explicit operator bool() const { return p_ != nullptr; }

  template <class I, typename std::enable_if<std::is_integral<I>::value || std::is_enum<I>::value, int>::type = 0>
  gref<const T> operator[](I i) const {
    return gref<const T>(p_ + static_cast<std::ptrdiff_t>(i), b_);
  }
  gref<const T> operator*() const { return gref<const T>(p_, b_); }
  detail::arrow_holder<typename std::remove_cv<T>::type> operator->() const { return {(*this)[0].load()}; }

  template <class I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0>
  gptr operator+(I i) const {
    return gptr(p_ + static_cast<std::ptrdiff_t>(i), b_);
  }
  template <class I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0>
  gptr operator-(I i) const {
    return gptr(p_ - static_cast<std::ptrdiff_t>(i), b_);
  }
  std::ptrdiff_t operator-(const gptr& o) const { return p_ - o.p_; }
  template <class I> gptr& operator+=(I i) { p_ += static_cast<std::ptrdiff_t>(i); return *this; }
  template <class I> gptr& operator-=(I i) { p_ -= static_cast<std::ptrdiff_t>(i); return *this; }
  gptr& operator++() { ++p_; return *this; }
  gptr& operator--() { --p_; return *this; }
  gptr operator++(int) { gptr r = *this; ++p_; return r; }
  gptr operator--(int) { gptr r = *this; --p_; return r; }

 protected:
  const T* p_ = nullptr;
  const Buffer* b_ = nullptr;
};

// gptr<T> (T not const): adds writable element proxies.
template <class T>
class gptr : public gptr<const T> {
  using base = gptr<const T>;

 public:
  using element_type = T;
  gptr() = default;
  gptr(T* raw) : base(raw) {}  // NOLINT: implicit on purpose
  gptr(T* raw, const Buffer* b) : base(raw, b) {}

  T* raw() const { return const_cast<T*>(this->p_); }

  template <class I, typename std::enable_if<std::is_integral<I>::value || std::is_enum<I>::value, int>::type = 0>
  gref<T> operator[](I i) const {
    return gref<T>(raw() + static_cast<std::ptrdiff_t>(i), this->b_);
  }
  gref<T> operator*() const { return gref<T>(raw(), this->b_); }

  template <class I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0>
  gptr operator+(I i) const {
    return gptr(raw() + static_cast<std::ptrdiff_t>(i), this->b_);
  }
  template <class I, typename std::enable_if<std::is_integral<I>::value, int>::type = 0>
  gptr operator-(I i) const {
    return gptr(raw() - static_cast<std::ptrdiff_t>(i), this->b_);
  }
  std::ptrdiff_t operator-(const base& o) const { return this->p_ - o.raw(); }
  template <class I> gptr& operator+=(I i) { this->p_ += static_cast<std::ptrdiff_t>(i); return *this; }
  template <class I> gptr& operator-=(I i) { this->p_ -= static_cast<std::ptrdiff_t>(i); return *this; }
  gptr& operator++() { ++this->p_; return *this; }
  gptr& operator--() { --this->p_; return *this; }
  gptr operator++(int) { gptr r = *this; ++this->p_; return r; }
  gptr operator--(int) { gptr r = *this; --this->p_; return r; }
};

template <> class gptr<void>;        // gptr<void> / gptr<const void>: only as a cast source or target
template <> class gptr<const void> {
 public:
  gptr() = default;
  gptr(const void* raw) : p_(raw), b_(raw ? rt::lookup(raw) : nullptr) {}
  gptr(const void* raw, const Buffer* b) : p_(raw), b_(b) {}
  template <class U> gptr(const gptr<U>& o) : p_(o.raw()), b_(o.buffer()) {}
  const void* raw() const { return p_; }
  const Buffer* buffer() const { return b_; }
  explicit operator bool() const { return p_ != nullptr; }

 protected:
  const void* p_ = nullptr;
  const Buffer* b_ = nullptr;
};
template <> class gptr<void> : public gptr<const void> {
 public:
  gptr() = default;
  gptr(void* raw) : gptr<const void>(raw) {}
  gptr(void* raw, const Buffer* b) : gptr<const void>(raw, b) {}
  template <class U, typename std::enable_if<!std::is_const<U>::value, int>::type = 0>
  gptr(const gptr<U>& o) : gptr<const void>(o.raw(), o.buffer()) {}
  void* raw() const { return const_cast<void*>(p_); }
};

template <class T>
gptr<const T> gref<const T>::operator&() const {
  return gptr<const T>(p_, b_);
}
template <class T>
gptr<T> gref<T>::operator&() const {
  return gptr<T>(const_cast<T*>(this->p_), this->b_);
}

template <class I, class T, typename std::enable_if<std::is_integral<I>::value, int>::type = 0>
gptr<T> operator+(I i, const gptr<T>& p) {
  return p + i;
}

// comparisons (deduce through the gptr<const T> base)
template <class T> bool operator==(const gptr<const T>& a, const gptr<const T>& b) { return a.raw() == b.raw(); }
template <class T> bool operator!=(const gptr<const T>& a, const gptr<const T>& b) { return a.raw() != b.raw(); }
template <class T> bool operator<(const gptr<const T>& a, const gptr<const T>& b) { return a.raw() < b.raw(); }
template <class T> bool operator<=(const gptr<const T>& a, const gptr<const T>& b) { return a.raw() <= b.raw(); }
template <class T> bool operator>(const gptr<const T>& a, const gptr<const T>& b) { return a.raw() > b.raw(); }
template <class T> bool operator>=(const gptr<const T>& a, const gptr<const T>& b) { return a.raw() >= b.raw(); }
template <class T> bool operator==(const gptr<const T>& a, std::nullptr_t) { return a.raw() == nullptr; }
template <class T> bool operator!=(const gptr<const T>& a, std::nullptr_t) { return a.raw() != nullptr; }
template <class T> bool operator==(std::nullptr_t, const gptr<const T>& a) { return a.raw() == nullptr; }
template <class T> bool operator!=(std::nullptr_t, const gptr<const T>& a) { return a.raw() != nullptr; }

// gptr_cast<U>(p): reinterpret a global pointer (vector loads: gptr_cast<const float4>(p)). Const is kept.
template <class U, class T>
gptr<U> gptr_cast(const gptr<T>& p) {
  static_assert(!std::is_const<T>::value || std::is_const<U>::value, "gptr_cast must not cast away const");
  return gptr<U>(reinterpret_cast<U*>(const_cast<typename std::remove_const<T>::type*>(p.raw())), p.buffer());
}
// gptr_cast from a raw pointer (same spelling as under nvcc, where gptr<T> is T*)
template <class U, class T>
gptr<U> gptr_cast(T* p) {
  return gptr_cast<U>(gptr<T>(p));
}

// Register [p, p + n) as a named global buffer and return a checked pointer to it - for C++ code that drives kernels
// without the Python runner (the runner registers every tensor it passes). Registrations last until
// attnfree_emu_reset(). Raw pointers into the buffer convert to checked gptr<T> from then on.
template <class T>
gptr<T> bind(T* p, size_t n_elems, const char* name, bool writable = !std::is_const<T>::value) {
  attnfree_emu_register(p, static_cast<uint64_t>(n_elems) * sizeof(T), name, writable ? 1 : 0);
  return gptr<T>(p);
}

// Uniform access for device helpers written for both raw and checked pointers.
template <class T> inline T* raw_pointer(T* p) { return p; }
template <class T> inline T* raw_pointer(const gptr<T>& p) { return p.raw(); }

}  // namespace attnfree_emu
