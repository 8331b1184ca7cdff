// Baseline build of the CPU kernels: the compiler's default instruction set (SSE2 on x86-64).
#define GS_CPU_ISA baseline
#define GS_CPU_ISA_LEVEL 0
#include "isa_build.h"
