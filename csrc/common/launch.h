// The launcher ABI shared by every CUDA kernel of attnfree_ext: plain C++ entry points that torch-side bindings
// (csrc/<op>/<op>_cuda.cpp) and any other host code can call. Depends only on the CUDA runtime API, never on torch.
//
// Every op declares, in csrc/<op>/<op>.h, namespace attnfree::cuda:
//   size_t      <op>_<fwd|bwd>_workspace_bytes(DType dtype, <the launcher's sizes and flags>);
//   cudaError_t <op>_<fwd|bwd>(DType dtype, [DType w_dtype,] <raw pointers...>, <sizes as int64_t...>,
//                              <scalars and flags...>, void* workspace, cudaStream_t stream);
// Rules:
//  * Buffers are dense, contiguous and row-major, on the current device of `stream`. Data tensors are in `dtype`;
//    log-sum-exp and other saved statistics are in the accumulate type acc_dtype(dtype) (float32, or float64 for
//    float64 data), because the backward recomputes probabilities from them.
//  * `workspace` points to at least workspace_bytes(...) bytes of device memory, 256-byte aligned; its content on
//    entry does not matter. When workspace_bytes returns 0, `workspace` may be null.
//  * A launcher only enqueues work on `stream` and never synchronises. It returns cudaSuccess (also for empty
//    inputs) or the first CUDA error of an attribute call, a memset or a launch (cudaErrorInvalidValue for
//    arguments it cannot serve, e.g. an unsupported dtype pair).
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "common/dtype.h"
