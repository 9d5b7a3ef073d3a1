#include "common/env.h"

#include <c10/util/Exception.h>

#include <cstdlib>
#include <cstring>

namespace attnfree {

AftFullKernel aft_full_kernel() {
  const char* v = std::getenv("ATTNFREE_AFT_FULL_KERNEL");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "auto") == 0) return AftFullKernel::Auto;
  if (std::strcmp(v, "tiled") == 0) return AftFullKernel::Tiled;
  if (std::strcmp(v, "exact") == 0) return AftFullKernel::Exact;
  TORCH_CHECK_VALUE(false, "ATTNFREE_AFT_FULL_KERNEL must be one of auto, tiled, exact (or unset), got '", v, "'");
  return AftFullKernel::Auto;
}

bool cpu_avx512_allowed() {
  const char* v = std::getenv("ATTNFREE_CPU_AVX512");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "1") == 0) return true;
  if (std::strcmp(v, "0") == 0) return false;
  TORCH_CHECK_VALUE(false, "ATTNFREE_CPU_AVX512 must be 0 or 1 (or unset), got '", v, "'");
  return true;
}

bool clusters_requested() {
  const char* v = std::getenv("ATTNFREE_CLUSTERS");
  if (v == nullptr || *v == '\0' || std::strcmp(v, "0") == 0) return false;
  if (std::strcmp(v, "1") == 0) return true;
  TORCH_CHECK_VALUE(false, "ATTNFREE_CLUSTERS must be 0 or 1 (or unset), got '", v, "'");
  return false;
}

}  // namespace attnfree
