// attnfree_emu shim for <cuda_runtime_api.h>: forwards to the CUDA toolkit's header (plain C declarations; the
// functions the harness supports are defined by its runtime, src/runtime.cpp). Host-only code (launcher headers)
// includes this; device code gets the emulated environment from <cuda_runtime.h> or the forced include.
#pragma once
#include_next <cuda_runtime_api.h>
