// The one element-type tag of the raw-buffer interfaces (the torch-free CUDA launchers). Plain C++, no torch.
// The numeric values are part of the launcher ABI: callers outside C++ (ctypes in
// tests/test_cuda_compile.py) read them from this file rather than keeping a copy.
#pragma once

#include <cstddef>

namespace attnfree {

enum class DType : int { Float32 = 0, Float16 = 1, BFloat16 = 2, Float64 = 3 };

// Kernels compute in float32 for float16/bfloat16/float32 data and in float64 for float64 data.
constexpr DType acc_dtype(DType t) { return t == DType::Float64 ? DType::Float64 : DType::Float32; }

constexpr size_t dtype_size(DType t) { return t == DType::Float64 ? 8 : t == DType::Float32 ? 4 : 2; }

}  // namespace attnfree
