// Baseline build of the CPU kernels: the compiler's default instruction set (SSE2 on x86-64).
#define GS_CPU_ISA baseline
#include "isa_build.h"
