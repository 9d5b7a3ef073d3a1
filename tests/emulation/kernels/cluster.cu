// Self-test kernels of the harness's thread-block clusters (tests/emulation/test_harness_clusters.py). Written with
// the device_compat.cuh spellings only (no rewrite needed), so the file also compiles with nvcc for sm_80 and sm_90
// (tests/test_cuda_compile.py).
#include <cuda_runtime.h>
#include <cstdint>

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
  for (int stride = blockDim.x / 2; stride > 0; stride >>= 1) {
    if (int(threadIdx.x) < stride) s[threadIdx.x] += s[threadIdx.x + stride];
    __syncthreads();
  }
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

}  // namespace

extern "C" {

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
