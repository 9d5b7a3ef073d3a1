// attnfree_emu shim for <device_launch_parameters.h>: threadIdx & co. come with the emulated environment.
#pragma once
#include <attnfree_emu/cuda_emulation.h>
