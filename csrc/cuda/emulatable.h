// The two CUDA constructs the kernels write through macros, so that the same source also
// compiles for the host under the test emulator (csrc/cuda_emu, scripts/cuda_emulator.sh):
//   GS_SHARED_ARRAY(name, count, type)  a __shared__ array (emulated: race-checked)
//   GS_LAUNCH(grid, block, smem, stream, kernel)(args...)  kernel<<<grid, block, smem, stream>>>
// Under nvcc they are exactly the plain CUDA forms.
#pragma once

#if defined(GRADSTATS_CUDA_EMU)
#include "../cuda_emu/emulator.h"
#else
#include <cuda_runtime.h>
#define GS_SHARED_ARRAY(name, count, ...) __shared__ __VA_ARGS__ name[count]
#define GS_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif
