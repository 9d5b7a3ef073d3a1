// Whether the launchers may select their thread-block cluster kernels (sm_90 distributed shared memory). Torch-free,
// header-only: the launchers call it, the bindings validate ATTNFREE_CLUSTERS beforehand (common/env.h).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdlib>
#include <cstring>

namespace attnfree {
namespace cuda {

// True iff ATTNFREE_CLUSTERS is "1" and the current device has compute capability >= 9.0 and supports cluster
// launches. Until a GPU run has verified the cluster kernels they are opt-in: unset, empty or "0" -> false. Read
// on every call, so tests can switch it between calls.
inline bool cluster_kernels_enabled() {
  const char* v = std::getenv("ATTNFREE_CLUSTERS");
  if (v == nullptr || std::strcmp(v, "1") != 0) return false;
  int dev = 0, major = 0, cluster = 0;
  if (cudaGetDevice(&dev) != cudaSuccess) return false;
  if (cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev) != cudaSuccess || major < 9) return false;
  if (cudaDeviceGetAttribute(&cluster, cudaDevAttrClusterLaunch, dev) != cudaSuccess) return false;
  return cluster != 0;
}

}  // namespace cuda
}  // namespace attnfree
