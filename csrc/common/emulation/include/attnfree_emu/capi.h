// attnfree_emu C API: what a runner (tests/emulation/emu_runner.py via ctypes, or C++ code) uses around the
// project's launchers. Every library built with the harness exports these symbols. Plain C.
//
// Typical call sequence (one "call" of a launcher):
//   attnfree_emu_reset();                                   // clears buffers, counters, launch records, errors
//   attnfree_emu_register(q_ptr, q_bytes, "q", 0);          // inputs read-only, outputs/workspace writable
//   attnfree_emu_register(y_ptr, y_bytes, "y", 1);
//   rc = <the project's launcher>(...);                     // kernels run to completion inside the call
//   attnfree_emu_fault_message()                            // "" or why a launch failed
//   attnfree_emu_get_counters(&c); attnfree_emu_get_launch(i, &rec) ...
// The library is single-threaded: one call at a time (the Python runner holds a lock).
#pragma once
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

#define ATTNFREE_EMU_ABI_VERSION 2

// Counted costs. Cumulative since the last attnfree_emu_reset(); per launch in attnfree_emu_launch_record.
typedef struct attnfree_emu_counters {
  uint64_t launches;          // kernel launches that ran (a launch refused by a configuration error is not counted)
  uint64_t blocks;            // blocks executed
  uint64_t threads;           // threads executed (blocks * threads per block)
  uint64_t bytes_read;        // global memory bytes read through gptr<T> (raw pointers are not counted)
  uint64_t bytes_written;     // global memory bytes written through gptr<T>
  uint64_t sfu_exp;           // expf, exp, exp2f, exp2, expm1(f), exp10(f), __expf, __exp10f, pow (1 of 2)
  uint64_t sfu_log;           // logf, log, log2(f), log10(f), log1p(f), __logf, __log2f, __log10f, pow (1 of 2)
  uint64_t sfu_rcp;           // __frcp_rn (rz/ru/rd), __drcp_rn, __fdividef, fdividef
  uint64_t sfu_rsqrt;         // rsqrtf, rsqrt, __frsqrt_rn
  uint64_t sfu_sqrt;          // sqrtf, sqrt, __fsqrt_rn, __dsqrt_rn
  uint64_t sfu_trig;          // sin/cos/tan/tanh (+ f, __ variants), sincos(f)
  uint64_t sfu_total;         // sum of the sfu_* above
  uint64_t mma_ops;           // warp-level wmma::mma_sync operations (one per warp, not per lane)
  uint64_t mma_flops;         // 2*M*N*K per warp-level mma_sync
  uint64_t barriers;          // completed __syncthreads(_count/_and/_or) barriers, summed over blocks
  uint64_t warp_collectives;  // completed warp collectives (shuffles, votes, __syncwarp, wmma load/store/mma)
  uint64_t atomics;           // atomic operations (any address space)
  uint64_t memset_bytes;      // cudaMemset(Async) bytes
  uint64_t memcpy_bytes;      // cudaMemcpy(Async) bytes
  uint64_t cluster_barriers;  // completed attnfree::cluster_sync barriers, one per cluster (a plain launch: per block)
} attnfree_emu_counters;

typedef struct attnfree_emu_launch_record {
  char kernel[256];           // kernel expression as written at the launch site (e.g. "fwd_tc_kernel<E, WE, false>")
  char file[256];             // launch site
  char caller[512];           // the launching function (__PRETTY_FUNCTION__: template arguments included)
  int32_t line;
  uint32_t grid[3];           // as requested
  uint32_t block[3];
  uint32_t grid_run[3];       // as executed (differs from grid when a grid cap applies)
  uint32_t cluster[3];        // CTAs per cluster (1,1,1 for a launch without clusters)
  uint64_t smem_dynamic;      // dynamic shared memory bytes
  int32_t error;              // cudaError_t of this launch (0 = success)
  int32_t reserved;
  attnfree_emu_counters counters;
} attnfree_emu_launch_record;

int attnfree_emu_abi_version(void);

// Clears registered buffers, counters, launch records, the last and sticky errors and the fault message.
void attnfree_emu_reset(void);

// Registers [ptr, ptr + bytes) as a named global-memory buffer: a raw pointer inside it converts to a checked
// gptr<T> (bounds = the buffer). writable = 0: a write through gptr faults. Returns 0, or -1 (bad arguments).
int attnfree_emu_register(const void* ptr, uint64_t bytes, const char* name, int writable);

void attnfree_emu_get_counters(attnfree_emu_counters* out);
int attnfree_emu_num_launches(void);
int attnfree_emu_get_launch(int index, attnfree_emu_launch_record* out);  // 0, or -1 (index out of range)

// Why the last launch failed ("" if none): kernel, launch site, block, thread, detail. Valid until the next reset.
const char* attnfree_emu_fault_message(void);
int attnfree_emu_fault_code(void);  // cudaError_t of the first fault since the reset (0 = none)

// Scheduling / options (defaults come from the environment, read once at load; see README.md):
void attnfree_emu_set_seed(uint64_t seed);        // ATTNFREE_EMU_SEED (default 0x5eed)
uint64_t attnfree_emu_get_seed(void);
void attnfree_emu_set_schedule(int mode);         // ATTNFREE_EMU_SCHEDULE: 0 shuffle (default), 1 in order
void attnfree_emu_set_grid_cap(uint64_t cap);     // ATTNFREE_EMU_GRID_CAP: 0 = off (default); caps gridDim.x
void attnfree_emu_set_poison(int on);             // ATTNFREE_EMU_POISON: 1 (default) poison shared memory
void attnfree_emu_set_allow_unregistered(int on); // ATTNFREE_EMU_ALLOW_UNREGISTERED: 0 (default) = fault

#ifdef __cplusplus
}
#endif
