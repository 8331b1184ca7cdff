// AVX-512 build of the CPU kernels; ops_cpu.cpp calls it only on CPUs that have it.
#if defined(__x86_64__)
#define GS_CPU_ISA avx512
#define GS_CPU_ISA_LEVEL 2
#define GS_CPU_ISA_TARGET "avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512"
#include "isa_build.h"
#endif
