// attnfree_emu shim for <mma.h>: nvcuda::wmma on the CPU (see attnfree_emu/wmma.h).
#pragma once
#include <attnfree_emu/cuda_emulation.h>
#include <attnfree_emu/wmma.h>
