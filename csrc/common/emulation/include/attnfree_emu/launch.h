// attnfree_emu: kernel launches.
//
//   KERNEL<<<grid, block, smem, stream>>>(args...)            is rewritten by tools/cu2cpp.py into
//   ::attnfree_emu::launch_at(ATTNFREE_EMU_KERNEL(KERNEL), "KERNEL", __FILE__, __LINE__, __PRETTY_FUNCTION__,
//                             grid, block, smem, stream)(args...)
//
// ATTNFREE_EMU_KERNEL(K) is a generic lambda calling K: the kernel is chosen, its remaining template arguments
// deduced and the arguments converted to its parameter types (a raw pointer becomes a checked gptr<T> by registry
// lookup) exactly as in CUDA, where `chunk_state_kernel<acc_t><<<...>>>(src, ...)` deduces Src from `src`. The
// arguments are evaluated once, at the launch site; each thread calls the kernel with its own copy of them.
// Every block of the grid runs before the launch statement returns (one in-order stream: nothing is
// asynchronous). Errors are reported through cudaGetLastError().
//
// launch_at(void (*kernel)(P...), ...) also exists: a launch through a function pointer knows the kernel's
// identity, so the cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, n) opt-in is checked
// for exactly that kernel; through the lambda form the largest opt-in set for any kernel applies.
#pragma once
#include <cstddef>
#include <tuple>
#include <type_traits>
#include <utility>

#include <driver_types.h>
#include <vector_types.h>

#include <attnfree_emu/runtime.h>

#define ATTNFREE_EMU_KERNEL(...) \
  [&](auto&&... attnfree_emu_a) { __VA_ARGS__(static_cast<decltype(attnfree_emu_a)&&>(attnfree_emu_a)...); }

namespace attnfree_emu {

inline rt::LaunchConfig make_config(const void* func, const char* name, const char* file, int line,
                                    const char* caller, dim3 grid, dim3 block, size_t smem) {
  rt::LaunchConfig cfg{};
  cfg.name = name;
  cfg.caller = caller;
  cfg.file = file;
  cfg.line = line;
  cfg.grid[0] = grid.x;
  cfg.grid[1] = grid.y;
  cfg.grid[2] = grid.z;
  cfg.block[0] = block.x;
  cfg.block[1] = block.y;
  cfg.block[2] = block.z;
  cfg.smem = smem;
  cfg.func = func;
  return cfg;
}

// Launch through a callable that invokes the kernel (the ATTNFREE_EMU_KERNEL lambda).
template <class F>
class CallableLauncher {
 public:
  CallableLauncher(F f, const rt::LaunchConfig& cfg) : f_(f), cfg_(cfg) {}
  template <class... A>
  void operator()(A&&... a) const {
    if (!rt::launch_begin(cfg_)) return;
    Ctx<typename std::decay<A>::type...> ctx{&f_, std::tuple<typename std::decay<A>::type...>(std::forward<A>(a)...)};
    rt::launch_run(cfg_, &thunk<Ctx<typename std::decay<A>::type...>>, &ctx);
  }

 private:
  template <class... D>
  struct Ctx {
    const F* f;
    std::tuple<D...> args;
  };
  template <class C>
  static void thunk(void* c) {
    C* x = static_cast<C*>(c);
    std::apply(*x->f, x->args);  // lvalues: the kernel's by-value parameters are per-thread copies
  }
  F f_;
  rt::LaunchConfig cfg_;
};

// Launch through a kernel function pointer: parameters converted once at the launch site.
template <class... P>
class Launcher {
 public:
  Launcher(void (*f)(P...), const rt::LaunchConfig& cfg) : f_(f), cfg_(cfg) {}
  template <class... A>
  void operator()(A&&... a) const {
    static_assert(sizeof...(A) == sizeof...(P), "kernel launched with a wrong number of arguments");
    if (!rt::launch_begin(cfg_)) return;
    Ctx ctx{f_, std::tuple<P...>(std::forward<A>(a)...)};
    rt::launch_run(cfg_, &thunk, &ctx);
  }

 private:
  struct Ctx {
    void (*f)(P...);
    std::tuple<P...> params;
  };
  static void thunk(void* c) {
    Ctx* x = static_cast<Ctx*>(c);
    std::apply(x->f, x->params);
  }
  void (*f_)(P...);
  rt::LaunchConfig cfg_;
};

template <class... P>
Launcher<P...> launch_at(void (*f)(P...), const char* name, const char* file, int line, const char* caller,
                         dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = 0) {
  (void)stream;
  return Launcher<P...>(f, make_config(reinterpret_cast<const void*>(f), name, file, line, caller, grid, block, smem));
}

// A thread-block cluster launch (ATTNFREE_LAUNCH_CLUSTER): through the kernel pointer, as cudaLaunchKernelEx.
template <class... P>
Launcher<P...> launch_cluster_at(void (*f)(P...), const char* name, const char* file, int line, const char* caller,
                                 dim3 cluster, dim3 grid, dim3 block, size_t smem = 0, cudaStream_t stream = 0) {
  (void)stream;
  rt::LaunchConfig cfg = make_config(reinterpret_cast<const void*>(f), name, file, line, caller, grid, block, smem);
  cfg.cluster[0] = cluster.x;
  cfg.cluster[1] = cluster.y;
  cfg.cluster[2] = cluster.z;
  return Launcher<P...>(f, cfg);
}

template <class F, typename std::enable_if<!std::is_pointer<typename std::decay<F>::type>::value, int>::type = 0>
CallableLauncher<typename std::decay<F>::type> launch_at(F&& f, const char* name, const char* file, int line,
                                                         const char* caller, dim3 grid, dim3 block, size_t smem = 0,
                                                         cudaStream_t stream = 0) {
  (void)stream;
  return CallableLauncher<typename std::decay<F>::type>(
      std::forward<F>(f), make_config(nullptr, name, file, line, caller, grid, block, smem));
}

}  // namespace attnfree_emu
