// Self-test kernels for the CPU emulation harness (tests/emulation/test_harness.py). Written as ordinary CUDA:
// gptr<T> parameters for global memory, <<<>>> launches, static and dynamic __shared__ memory.
#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>
#include <cstdint>

#include "common/emulation/device_compat.cuh"

using attnfree::gptr;
using attnfree::gptr_cast;

namespace {

// ---------------------------------------------------------------------------------------------- reductions
template <bool BARRIERS>
__global__ void block_sum_kernel(gptr<const float> x, gptr<float> out, int64_t n) {
  __shared__ float s[256];
  float acc = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    acc += x[i];
  s[threadIdx.x] = acc;
  if (BARRIERS) __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) s[threadIdx.x] += s[threadIdx.x + stride];
    if (BARRIERS) __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = s[0];
}

// ---------------------------------------------------------------------------------------------- warp collectives
// per thread: [xor-allreduce sum, broadcast of lane 3, inclusive scan (shfl_up), shfl_down by 1, ballot(v > 0),
//              any(v > 100), all(v > -1000), __reduce_add_sync of lane ids, __match_any_sync(v % 3)]
__global__ void warp_ops_kernel(gptr<const float> x, gptr<float> out) {
  const int t = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x & 31;
  const float v = x[t];
  float s = v;
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  const float b = __shfl_sync(0xffffffffu, v, 3);
  float scan = v;
  for (int o = 1; o < 32; o <<= 1) {
    const float y = __shfl_up_sync(0xffffffffu, scan, o);
    if (lane >= o) scan += y;
  }
  const float dn = __shfl_down_sync(0xffffffffu, v, 1);
  const unsigned bal = __ballot_sync(0xffffffffu, v > 0.f);
  const int any = __any_sync(0xffffffffu, v > 100.f);
  const int all = __all_sync(0xffffffffu, v > -1000.f);
  const unsigned red = __reduce_add_sync(0xffffffffu, static_cast<unsigned>(lane));
  const unsigned mt = __match_any_sync(0xffffffffu, static_cast<int>(v) % 3);
  gptr<float> o = out + int64_t(t) * 9;
  o[0] = s;
  o[1] = b;
  o[2] = scan;
  o[3] = dn;
  o[4] = static_cast<float>(bal & 0xffffu) + 65536.f * static_cast<float>(bal >> 16);
  o[5] = static_cast<float>(any);
  o[6] = static_cast<float>(all);
  o[7] = static_cast<float>(red);
  o[8] = static_cast<float>(__popc(mt));
}

// Half-warp collectives with disjoint masks in divergent branches.
__global__ void half_warp_kernel(gptr<const float> x, gptr<float> out) {
  const int lane = threadIdx.x & 31;
  float v = x[threadIdx.x];
  if (lane < 16) {
    for (int o = 8; o > 0; o >>= 1) v += __shfl_xor_sync(0x0000ffffu, v, o);
  } else {
    for (int o = 8; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffff0000u, v, o));
  }
  out[threadIdx.x] = v;
}

// ---------------------------------------------------------------------------------------------- atomics
__global__ void atomics_kernel(gptr<const int> vals, int64_t n, gptr<int> hist, gptr<float> fsum, gptr<int> imax,
                               gptr<unsigned> cas_count) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const int v = vals[i];
    atomicAdd(&hist[v & 7], 1);
    atomicAdd(&fsum[0], static_cast<float>(v));
    atomicMax(&imax[0], v);
    // increment through a CAS loop
    unsigned old = cas_count[0], assumed;
    do {
      assumed = old;
      old = atomicCAS(&cas_count[0], assumed, assumed + 1u);
    } while (old != assumed);
  }
}

// ---------------------------------------------------------------------------------------------- dynamic smem
__global__ void reverse_kernel(gptr<const float> x, gptr<float> y, int n) {
  extern __shared__ __align__(16) float buf[];
  for (int i = threadIdx.x; i < n; i += blockDim.x) buf[i] = x[i];
  __syncthreads();
  for (int i = threadIdx.x; i < n; i += blockDim.x) y[i] = buf[n - 1 - i];
}

// reads shared memory nobody wrote: must see the NaN poison
__global__ void read_unwritten_smem_kernel(gptr<float> y) {
  __shared__ float s[64];
  extern __shared__ float dyn[];
  y[threadIdx.x] = s[threadIdx.x];
  y[64 + threadIdx.x] = dyn[threadIdx.x];
}

// writes only every other element of y
__global__ void partial_write_kernel(gptr<float> y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n && (i % 2) == 0) y[i] = 1.0f;
}

// ---------------------------------------------------------------------------------------------- faults
__global__ void oob_read_kernel(gptr<const float> x, gptr<float> y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n) y[i] = x[i + 1];  // reads x[n] in the last thread
}
__global__ void oob_write_kernel(gptr<const float> x, gptr<float> y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = x[i < n ? i : 0];  // writes y[n]
}
__global__ void write_input_kernel(gptr<float> x) { x[threadIdx.x] = 0.f; }
__global__ void raw_oob_write_kernel(float* y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i <= n) y[i] = 2.f;  // a raw pointer: no bounds check, seen by the runner's guard zone
}
__global__ void divergent_barrier_kernel(gptr<float> y) {
  if (threadIdx.x < 16) __syncthreads();
  y[threadIdx.x] = 1.f;
}
__global__ void exit_before_barrier_kernel(gptr<float> y, int n) {
  const int i = threadIdx.x;
  if (i >= n) return;
  __syncthreads();
  y[i] = 1.f;
}
__global__ void shfl_exited_lane_kernel(gptr<float> y) {
  if (threadIdx.x == 5) return;
  y[threadIdx.x] = __shfl_sync(0xffffffffu, 1.f, 0);
}
__global__ void misaligned_kernel(gptr<const float> x, gptr<float> y) {
  const float4 v = gptr_cast<const float4>(x + 1)[0];  // 4-byte offset: not 16-byte aligned
  y[0] = v.x;
}
__global__ void vector_load_kernel(gptr<const float> x, gptr<float> y, int n4) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i < n4) {
    const float4 v = gptr_cast<const float4>(x)[i];
    y[i] = v.x + v.y + v.z + v.w;
  }
}

// ---------------------------------------------------------------------------------------------- async copies
// Double-buffered staging through shared memory with async_copy16: tile i + 1 (16 floats per thread, 4 chunks)
// is issued before tile i is read; chunks at or past n4 are zero-filled. y[i * 64 + tid] = sum of tile i's
// 16 values of that thread, rotated by one thread so that each thread reads chunks another thread copied.
__global__ void async_copy_kernel(gptr<const float> x, gptr<float> y, int n4, int tiles) {
  __shared__ __align__(16) float s[2][64 * 16];
  const int tid = threadIdx.x;
  auto issue = [&](int tile, int b) {
    for (int c = 0; c < 4; ++c) {
      const int chunk = tile * 256 + tid * 4 + c;  // chunk index in units of 4 floats
      attnfree::async_copy16(&s[b][(tid * 4 + c) * 4], x + (chunk < n4 ? chunk * 4 : 0), chunk < n4);
    }
    attnfree::async_commit();
  };
  issue(0, 0);
  for (int i = 0; i < tiles; ++i) {
    if (i + 1 < tiles) {
      issue(i + 1, (i + 1) & 1);
    } else {
      attnfree::async_commit();
    }
    attnfree::async_wait<1>();
    __syncthreads();
    const float* t = s[i & 1] + ((tid + 1) % 64) * 16;
    float acc = 0.f;
    for (int e = 0; e < 16; ++e) acc += t[e];
    y[i * 64 + tid] = acc;
    __syncthreads();
  }
  attnfree::async_wait<0>();
}

// ---------------------------------------------------------------------------------------------- counters
// n elements, one per thread; per element: 1 load, 1 store, expf + logf + rsqrtf + __expf + exp2f (5 SFU:
// 3 exp, 1 log, 1 rsqrt); one __syncthreads per block.
__global__ void counters_kernel(gptr<const float> x, gptr<float> y, int n) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  float v = 0.f;
  if (i < n) {
    const float a = x[i];
    v = expf(a) + logf(a + 2.f) + rsqrtf(a + 2.f) + __expf(a) + exp2f(a);
  }
  __syncthreads();
  if (i < n) y[i] = v;
}

__global__ void raw_null_kernel(const float* p, float* y) { y[threadIdx.x] = p[threadIdx.x]; }
__device__ __noinline__ float deep(volatile float* chain, int depth) {
  volatile float buf[512];
  buf[depth & 511] = static_cast<float>(depth);
  if (depth == 0) return buf[0];
  return deep(chain, depth - 1) + buf[depth & 511];
}
__global__ void stack_overflow_kernel(gptr<float> y, int depth) { y[threadIdx.x] = deep(nullptr, depth); }
__global__ void assert_kernel(gptr<float> y) {
  assert(threadIdx.x < 16);
  y[threadIdx.x] = 1.f;
}
__global__ void trap_kernel(gptr<float> y) {
  if (threadIdx.x == 7) __trap();
  y[threadIdx.x] = 1.f;
}
__global__ void overlapping_masks_kernel(gptr<float> y) {
  const int lane = threadIdx.x & 31;
  float v = 1.f;
  if (lane < 16) v = __shfl_sync(0xffffffffu, v, 0);
  else __syncwarp(0xffff0000u);
  y[threadIdx.x] = v;
}
__global__ void grid_stride_kernel(gptr<const float> x, gptr<float> y, int64_t n) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = 2.f * x[i];
}
__global__ void sync_count_kernel(gptr<const float> x, gptr<int> out) {
  const int p = x[threadIdx.x] > 0.f;
  const int c = __syncthreads_count(p);
  const int a = __syncthreads_and(p);
  const int o = __syncthreads_or(p);
  if (threadIdx.x == 0) {
    out[0] = c;
    out[1] = a;
    out[2] = o;
  }
}
// a spin lock among the threads of a block: needs the scheduler to switch threads at atomics
__global__ void spin_lock_kernel(gptr<int> lock, gptr<int> counter) {
  bool done = false;
  while (!done) {
    if (atomicCAS(&lock[0], 0, 1) == 0) {
      const int c = counter[0];
      counter[0] = c + 1;
      atomicExch(&lock[0], 0);
      done = true;
    }
  }
}

// ---------------------------------------------------------------------------------------------- gptr API
template <class T> __device__ __forceinline__ float load_as_float(gptr<const T> p) { return static_cast<float>(p[0]); }
__device__ __forceinline__ void store_to(gptr<float> p, float v) { *p = v; }

// out[4i + 0..3] = see test_gptr_api
__global__ void gptr_api_kernel(gptr<const float> x, gptr<const __half> h, gptr<const float2> xy, gptr<float> out,
                                int n) {
  const int i = threadIdx.x;
  if (i >= n) return;
  gptr<float> o = out + 4 * i;
  gptr<const float> xi = &x[i];
  gptr<const float> maybe = (i < 0) ? nullptr : xi;
  // template deduction through gptr<const T> from gptr<const float>, gptr<const __half> and a non-const gptr<float>
  store_to(o, load_as_float(x + i) + load_as_float(h + i) + __ldg(xi));
  gptr<float> slot = o + 2;
  *slot = 1.f;
  *slot += 2.f;
  (*slot)++;
  slot[0] *= 2.f;
  const float2 v = xy[i];
  o[1] = v.x * v.y + xy->x + 0.f * load_as_float(slot);
  o[3] = float((slot - out) == 4 * i + 2) + 2.f * float(slot > out) + 4.f * float(maybe != nullptr) +
         8.f * float(x + i == xi) + 16.f * float(!(o < out));
}

}  // namespace

// ---------------------------------------------------------------------------------------------- C ABI
extern "C" {

int emu_block_sum(const float* x, float* out, int64_t n, int64_t blocks, int barriers) {
  if (barriers)
    block_sum_kernel<true><<<static_cast<unsigned>(blocks), 256>>>(x, out, n);
  else
    block_sum_kernel<false><<<static_cast<unsigned>(blocks), 256>>>(x, out, n);
  return cudaGetLastError();
}
int emu_warp_ops(const float* x, float* out, int64_t blocks, int64_t threads) {
  warp_ops_kernel<<<static_cast<unsigned>(blocks), static_cast<unsigned>(threads)>>>(x, out);
  return cudaGetLastError();
}
int emu_half_warp(const float* x, float* out) {
  half_warp_kernel<<<1, 64>>>(x, out);
  return cudaGetLastError();
}
int emu_atomics(const int* vals, int64_t n, int* hist, float* fsum, int* imax, unsigned* cas_count) {
  atomics_kernel<<<3, 64>>>(vals, n, hist, fsum, imax, cas_count);
  return cudaGetLastError();
}
int emu_reverse(const float* x, float* y, int64_t n, int64_t threads) {
  reverse_kernel<<<1, static_cast<unsigned>(threads), static_cast<size_t>(n) * sizeof(float)>>>(x, y, static_cast<int>(n));
  return cudaGetLastError();
}
int emu_reverse_big(const float* x, float* y, int64_t n, int64_t set_attr) {
  const size_t smem = static_cast<size_t>(n) * sizeof(float);
  if (set_attr) {
    cudaError_t e = cudaFuncSetAttribute(reverse_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem));
    if (e != cudaSuccess) return e;
  }
  reverse_kernel<<<1, 256, smem>>>(x, y, static_cast<int>(n));
  return cudaGetLastError();
}
int emu_read_unwritten_smem(float* y) {
  read_unwritten_smem_kernel<<<1, 64, 64 * sizeof(float)>>>(y);
  return cudaGetLastError();
}
int emu_partial_write(float* y, int64_t n) {
  partial_write_kernel<<<static_cast<unsigned>((n + 127) / 128), 128>>>(y, static_cast<int>(n));
  return cudaGetLastError();
}
int emu_oob_read(const float* x, float* y, int64_t n) {
  oob_read_kernel<<<static_cast<unsigned>((n + 63) / 64), 64>>>(x, y, static_cast<int>(n));
  return cudaGetLastError();
}
int emu_oob_write(const float* x, float* y, int64_t n) {
  oob_write_kernel<<<static_cast<unsigned>((n + 64) / 64), 64>>>(x, y, static_cast<int>(n));
  return cudaGetLastError();
}
int emu_write_input(const float* x) {
  write_input_kernel<<<1, 32>>>(const_cast<float*>(x));
  return cudaGetLastError();
}
int emu_raw_oob_write(float* y, int64_t n) {
  raw_oob_write_kernel<<<static_cast<unsigned>((n + 64) / 64), 64>>>(y, static_cast<int>(n));
  return cudaGetLastError();
}
int emu_divergent_barrier(float* y) {
  divergent_barrier_kernel<<<2, 32>>>(y);
  return cudaGetLastError();
}
int emu_exit_before_barrier(float* y, int64_t n) {
  exit_before_barrier_kernel<<<1, 64>>>(y, static_cast<int>(n));
  return cudaGetLastError();
}
int emu_shfl_exited_lane(float* y) {
  shfl_exited_lane_kernel<<<1, 32>>>(y);
  return cudaGetLastError();
}
int emu_misaligned(const float* x, float* y) {
  misaligned_kernel<<<1, 1>>>(x, y);
  return cudaGetLastError();
}
int emu_vector_load(const float* x, float* y, int64_t n4) {
  vector_load_kernel<<<static_cast<unsigned>((n4 + 63) / 64), 64>>>(x, y, static_cast<int>(n4));
  return cudaGetLastError();
}
int emu_async_copy(const float* x, float* y, int64_t n4, int64_t tiles) {
  async_copy_kernel<<<1, 64>>>(x, y, static_cast<int>(n4), static_cast<int>(tiles));
  return cudaGetLastError();
}
int emu_counters(const float* x, float* y, int64_t n, int64_t threads) {
  counters_kernel<<<static_cast<unsigned>((n + threads - 1) / threads), static_cast<unsigned>(threads)>>>(x, y, static_cast<int>(n));
  return cudaGetLastError();
}
int emu_two_launches_after_fault(const float* x, float* y, int64_t n) {
  oob_read_kernel<<<static_cast<unsigned>((n + 63) / 64), 64>>>(x, y, static_cast<int>(n));
  partial_write_kernel<<<1, 64>>>(y, static_cast<int>(n));  // must not run: the fault is sticky
  return cudaGetLastError();
}
int emu_gptr_api(const float* x, const void* h, const float* xy, float* out, int64_t n) {
  gptr_api_kernel<<<1, 64>>>(x, static_cast<const __half*>(h), reinterpret_cast<const float2*>(xy), out,
                             static_cast<int>(n));
  return cudaGetLastError();
}
int emu_raw_null(const float* p, float* y) {
  raw_null_kernel<<<1, 32>>>(p, y);
  return cudaGetLastError();
}
int emu_stack_overflow(float* y, int64_t depth) {
  stack_overflow_kernel<<<1, 32>>>(y, static_cast<int>(depth));
  return cudaGetLastError();
}
int emu_assert(float* y) {
  assert_kernel<<<1, 32>>>(y);
  return cudaGetLastError();
}
int emu_trap(float* y) {
  trap_kernel<<<1, 32>>>(y);
  return cudaGetLastError();
}
int emu_overlapping_masks(float* y) {
  overlapping_masks_kernel<<<1, 32>>>(y);
  return cudaGetLastError();
}
int emu_grid_stride(const float* x, float* y, int64_t n) {
  grid_stride_kernel<<<static_cast<unsigned>((n + 63) / 64), 64>>>(x, y, n);
  return cudaGetLastError();
}
int emu_sync_count(const float* x, int* out) {
  sync_count_kernel<<<1, 96>>>(x, out);
  return cudaGetLastError();
}
int emu_spin_lock(int* lock, int* counter, int64_t blocks) {
  spin_lock_kernel<<<static_cast<unsigned>(blocks), 64>>>(lock, counter);
  return cudaGetLastError();
}
int emu_bad_config(float* y) {
  partial_write_kernel<<<1, 2048>>>(y, 4);
  return cudaGetLastError();
}

}  // extern "C"
