// Environment switches read by the compiled ops (one place, one spelling of each variable and value).
#pragma once

namespace attnfree {

// ATTNFREE_AFT_FULL_KERNEL=auto|tiled|exact picks AFT-full's kernel (docs/design.md §6.2):
//   auto  (or unset/empty): the default choice of each backend,
//   tiled: CPU the tile-wise GEMM kernel, CUDA the tensor-core kernels (float64 has none: per-element),
//   exact: the per-element kernels on both (the reference; equal to the tiled ones up to rounding).
// Read on every call, so a test or a debugging session can switch it between calls. Any other value raises a
// ValueError naming the variable and the allowed values.
enum class AftFullKernel { Auto, Tiled, Exact };
AftFullKernel aft_full_kernel();

// ATTNFREE_CPU_AVX512=0 keeps the CPU kernels off their AVX-512 code (they then run their portable path, e.g. the
// BLAS): how the tests reach the path of CPUs without AVX-512 on a machine that has it. Unset, empty or 1: AVX-512
// where the CPU has it. Read on every call; any other value raises a ValueError naming the variable.
bool cpu_avx512_allowed();

// ATTNFREE_CLUSTERS=1 lets the CUDA launchers select their thread-block cluster kernels (sm_90, distributed shared
// memory) where the device supports them (common/cluster.h decides, torch-free, on every launch). Unset, empty or
// 0: off (opt-in until a GPU run has verified them). Called by the bindings before a launch, so that any other value
// raises a ValueError naming the variable; returns whether clusters were requested.
bool clusters_requested();

}  // namespace attnfree
