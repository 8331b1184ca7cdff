// AVX2 + FMA build of the CPU kernels; ops_cpu.cpp calls it only on CPUs that have both.
#if defined(__x86_64__)
#define GS_CPU_ISA avx2
#define GS_CPU_ISA_LEVEL 1
#define GS_CPU_ISA_TARGET "avx2,fma,f16c"
#include "isa_build.h"
#endif
