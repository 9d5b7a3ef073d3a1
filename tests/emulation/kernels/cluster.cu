// Self-test kernels of the harness's thread-block clusters (tests/emulation/test_harness_clusters.py). Written with
// the device_compat.cuh spellings only (no rewrite needed), so the file also compiles with nvcc for sm_80 and sm_90
// (tests/test_cuda_compile.py).
#include <cuda_runtime.h>
#include <cstdint>

#include "common/cluster.h"
#include "common/emulation/device_compat.cuh"

using attnfree::gptr;

namespace {

constexpr int kThreads = 128;

// Each CTA sums its n elements of x into its dynamic shared memory; then every CTA reads the partial sums of all
// CTAs of its cluster through distributed shared memory: out[b] = the sum over its cluster, info[b] = (rank, CTAs).
// flags: 1 = cluster_sync before reading the other CTAs' sums, 2 = cluster_sync before exiting (the others may still
// read this CTA's shared memory).
__global__ void cluster_sum_kernel(gptr<const float> x, gptr<float> out, gptr<int> info, int64_t n, int flags) {
  ATTNFREE_DYNAMIC_SHARED(float, s, 16);
  const int64_t b = blockIdx.x + int64_t(blockIdx.y) * gridDim.x;
  float acc = 0.f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) acc += x[b * n + i];
  s[threadIdx.x] = acc;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride >= 32; stride >>= 1) {
    if (int(threadIdx.x) < stride) s[threadIdx.x] += s[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x < 32) {  // the last 32 partial sums: a warp shuffle (per-CTA warp state)
    float v = s[threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    if (threadIdx.x == 0) s[0] = v;
  }
  __syncthreads();
  if (flags & 1) attnfree::cluster_sync();
  const unsigned num = attnfree::cluster_num_ctas();
  // every thread reads one CTA's sum (thread t: rank t % num), thread 0 of each warp adds them up
  const float mine = *attnfree::cluster_map_shared(&s[0], threadIdx.x % num);
  float tot = 0.f;
  if (threadIdx.x == 0) {
    for (unsigned r = 0; r < num; ++r) tot += *attnfree::cluster_map_shared(&s[0], r);
    out[b] = tot;
    info[2 * b] = static_cast<int>(attnfree::cluster_ctarank());
    info[2 * b + 1] = static_cast<int>(num);
  }
  if (mine != mine) out[b] = mine;  // a NaN (poisoned shared memory) read by any thread shows
  if (flags & 2) attnfree::cluster_sync();
}

// Faults. what: 0 rank 0 reaches cluster_sync at another call site than the other CTAs, 1 CTA rank 1 exits without
// the cluster_sync the others wait at, 2 __syncthreads in warp 0 against cluster_sync in the other warps, 3
// cluster_map_shared of a pointer outside dynamic shared memory, 4 cluster_map_shared to a rank outside the cluster;
// 5 (no fault) reads the never written second half of its own and of the next CTA's shared memory: poisoned, NaN.
__global__ void cluster_fault_kernel(gptr<float> y, int what) {
  ATTNFREE_DYNAMIC_SHARED(float, s, 16);
  s[threadIdx.x] = float(threadIdx.x);
  const unsigned rank = attnfree::cluster_ctarank();
  float local = 1.f;
  float v = 0.f;
  if (what == 0) {
    if (rank == 0)
      attnfree::cluster_sync();
    else
      attnfree::cluster_sync();
  } else if (what == 1) {
    if (rank == 1) return;
    attnfree::cluster_sync();
  } else if (what == 2) {
    if (threadIdx.x < 32)
      __syncthreads();
    else
      attnfree::cluster_sync();
  } else if (what == 5) {
    attnfree::cluster_sync();
    v = s[blockDim.x + threadIdx.x] + *attnfree::cluster_map_shared(s + blockDim.x + threadIdx.x,
                                                                    (rank + 1) % attnfree::cluster_num_ctas());
    attnfree::cluster_sync();
  } else if (what == 3) {
    v = *attnfree::cluster_map_shared(&local, 1);
  } else {
    v = *attnfree::cluster_map_shared(s, attnfree::cluster_num_ctas());
  }
  y[blockIdx.x * blockDim.x + threadIdx.x] = v + s[threadIdx.x];
}

// Static shared memory (one copy per array under the harness): fine in a plain launch or a cluster of one CTA, a
// fault at first use in a cluster launch of several CTAs.
__global__ void static_shared_kernel(gptr<float> y) {
  ATTNFREE_STATIC_SHARED(float, tile, [kThreads]);
  tile[threadIdx.x] = float(blockIdx.x);
  __syncthreads();
  y[blockIdx.x * blockDim.x + threadIdx.x] = tile[kThreads - 1 - threadIdx.x];
}

}  // namespace

extern "C" {

int emu_cluster_fault(float* y, int64_t blocks, int64_t cx, int64_t what) {
  ATTNFREE_LAUNCH_CLUSTER(cluster_fault_kernel, dim3(static_cast<unsigned>(cx)), dim3(static_cast<unsigned>(blocks)),
                          kThreads, 2 * kThreads * sizeof(float), 0)(y, int(what));
  return cudaGetLastError();
}

int emu_static_shared(float* y, int64_t blocks, int64_t cx) {
  if (cx == 0)
    ATTNFREE_LAUNCH(static_shared_kernel, dim3(static_cast<unsigned>(blocks)), kThreads, 0, 0)(y);
  else
    ATTNFREE_LAUNCH_CLUSTER(static_shared_kernel, dim3(static_cast<unsigned>(cx)),
                            dim3(static_cast<unsigned>(blocks)), kThreads, 0, 0)(y);
  return cudaGetLastError();
}

int emu_cluster_device_attribute() {
  int v = -1;
  if (cudaDeviceGetAttribute(&v, cudaDevAttrClusterLaunch, 0) != cudaSuccess) return -2;
  return v;
}

int emu_cluster_kernels_enabled() { return attnfree::cuda::cluster_kernels_enabled() ? 1 : 0; }

int emu_cluster_sum(const float* x, float* out, int* info, int64_t n, int64_t gx, int64_t gy, int64_t cx, int64_t cy,
                    int64_t flags) {
  const dim3 grid(static_cast<unsigned>(gx), static_cast<unsigned>(gy));
  if (cx == 0) {  // no clusters: every CTA a cluster of one
    ATTNFREE_LAUNCH(cluster_sum_kernel, grid, kThreads, kThreads * sizeof(float), 0)(x, out, info, n, int(flags));
  } else {
    const dim3 cluster(static_cast<unsigned>(cx), static_cast<unsigned>(cy));
    ATTNFREE_LAUNCH_CLUSTER(cluster_sum_kernel, cluster, grid, kThreads, kThreads * sizeof(float), 0)(
        x, out, info, n, int(flags));
  }
  return cudaGetLastError();
}

}  // extern "C"
