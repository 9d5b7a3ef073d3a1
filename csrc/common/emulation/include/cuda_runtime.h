// attnfree_emu shim for <cuda_runtime.h>: the CUDA runtime API (declarations from the toolkit's own
// cuda_runtime_api.h, implemented by the harness runtime) plus the emulated device environment.
#pragma once
#include <attnfree_emu/cuda_emulation.h>
