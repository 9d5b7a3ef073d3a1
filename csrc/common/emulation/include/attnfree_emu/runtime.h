// attnfree_emu: the interface between the header-only device environment and the harness runtime
// (src/runtime.cpp). Not for kernels: kernels use CUDA names (see cuda_emulation.h).
#pragma once
#include <cstddef>
#include <cstdint>

#include <attnfree_emu/capi.h>

namespace attnfree_emu {

// A registered global-memory buffer [begin, end).
struct Buffer {
  uintptr_t begin;
  uintptr_t end;
  const char* name;
  int writable;
};

enum SfuKind { kSfuExp = 0, kSfuLog, kSfuRcp, kSfuRsqrt, kSfuSqrt, kSfuTrig, kSfuKinds };

// Live counters (cumulative since reset) and "a kernel is executing" flag. Only counted while in_kernel != 0.
extern attnfree_emu_counters g_counters;
extern int g_in_kernel;
// A cluster launch of more than one CTA is running: static shared memory (one copy per array) is not modelled.
extern int g_multi_cta_cluster;

inline void count_sfu(SfuKind k, uint64_t n = 1) {
  if (!g_in_kernel) return;
  uint64_t* base = &g_counters.sfu_exp;
  base[k] += n;
  g_counters.sfu_total += n;
}

namespace rt {

// Fault: abort the current launch with a cudaError_t code and a message (printf format). Called from a kernel
// thread it never returns (the launch stops, the error becomes sticky); called outside a kernel it prints the
// message and aborts the process.
[[noreturn]] void fault(int cuda_error, const char* fmt, ...) __attribute__((format(printf, 2, 3)));

// Registry lookup: the smallest registered buffer containing p (p == end counts as inside). nullptr if none.
const Buffer* lookup(const void* p);
bool allow_unregistered();

// Block barrier. kind: 0 __syncthreads, 1 _count, 2 _and, 3 _or. Returns the reduction (0 for kind 0).
int syncthreads(int kind, int pred, const char* file, int line);

// Warp collectives. Each participating lane passes a LaneSlot living on its own stack; when every lane named in
// `mask` has arrived (with the same `fn`), the last one to arrive calls fn(slots, mask) once, with slots[l] the
// slot of lane l (nullptr for lanes outside the mask); fn writes results into the slots (or performs the effect)
// and may call fault(). Then all participants continue, in shuffled order.
struct LaneSlot {
  alignas(16) unsigned char in[16];
  alignas(16) unsigned char out[16];
  long long aux;
  int aux2;
  const void* p[4];
};
typedef void (*CollectiveFn)(LaneSlot* const* slots, unsigned mask);
void warp_collective(unsigned mask, CollectiveFn fn, LaneSlot* slot, const char* what, const char* file, int line);

// A point where the scheduler may switch to another thread of the block (atomics, __nanosleep).
void maybe_yield();

int lane_id();
unsigned live_lanes_mask();       // lanes of the calling warp that have not exited
// Static __shared__ objects (registered by the cu2cpp rewrite on first execution): poisoned before every block.
void register_static_smem(void* p, size_t bytes);
void* dynamic_smem();             // base of the block's dynamic shared memory (1024-byte aligned)
size_t dynamic_smem_bytes();
long long clock_ticks();

// Thread-block clusters (the CTAs of a cluster run together, their threads fibers of one scheduler). Outside a
// cluster launch a CTA is a cluster of one.
unsigned cluster_ctarank();
unsigned cluster_num_ctas();
void cluster_sync(const char* file, int line);  // every thread of every CTA of the cluster, at one call site
// p inside this CTA's dynamic shared memory -> the same offset in CTA `rank`'s (faults otherwise)
void* cluster_map_shared(const void* p, unsigned rank, const char* file, int line);
[[noreturn]] void static_smem_in_cluster(const char* name, const char* file, int line);

// Launch entry points (used by launch.h).
struct LaunchConfig {
  const char* name;    // the kernel expression at the launch site
  const char* file;
  int line;
  const char* caller;  // __PRETTY_FUNCTION__ of the launching function (template arguments included)
  unsigned grid[3];
  unsigned block[3];
  size_t smem;
  const void* func;
  unsigned cluster[3];  // CTAs per cluster; {0,0,0}: a launch without clusters
};
typedef void (*KernelThunk)(void* ctx);
// Validates the configuration; false (and the CUDA error recorded) if the launch must not run.
bool launch_begin(const LaunchConfig& cfg);
// Runs every block of the grid (blocks one at a time, threads as fibers). Faults are recorded, never thrown.
void launch_run(const LaunchConfig& cfg, KernelThunk thunk, void* ctx);

// math (uncounted real implementations, from the runtime; the counted libm calls go through -Wl,--wrap)
float raw_exp2f(float x);
float raw_log2f(float x);
float raw_expf(float x);
float raw_logf(float x);
double raw_exp(double x);
double raw_log(double x);
float raw_sinf(float x);
float raw_cosf(float x);
float raw_tanf(float x);
float raw_powf(float x, float y);
float raw_log10f(float x);
float raw_exp10f(float x);
float raw_sqrtf(float x);
double raw_sqrt(double x);

}  // namespace rt
}  // namespace attnfree_emu
