// The CPU kernels (bn_backward_stats_kernel.h) compiled once per instruction set, each in its own
// namespace and compiler target region: baseline (the compiler's default, SSE2 on x86-64),
// AVX2 + FMA + F16C, and AVX-512. ops_cpu.cpp calls a build only on CPUs that run it.
//
// Every header outside the kernel is included first, for the baseline target: otherwise the
// linker could pick an AVX instantiation of a shared inline function for code that runs on a CPU
// without AVX. Only the kernel and vec.h (which it includes in its namespace) are compiled
// inside each target region.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#if defined(__x86_64__)
#include <immintrin.h>  // streaming stores and F16C (vec.h); usable inside each target region
#endif

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../bn_backward_passes.h"
#include "isa_builds.h"

#define GS_DO_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define GS_TARGET_BEGIN(t) GS_DO_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define GS_TARGET_END() GS_DO_PRAGMA(clang attribute pop)
#else
#define GS_TARGET_BEGIN(t) GS_DO_PRAGMA(GCC push_options) GS_DO_PRAGMA(GCC target(t))
#define GS_TARGET_END() GS_DO_PRAGMA(GCC pop_options)
#endif

// GS_CPU_ISA names a build's namespace and entry (bn_backward_stats_<isa>); GS_CPU_ISA_LEVEL
// (0 baseline, 1 AVX2, 2 AVX-512) says which intrinsics vec.h may use.
#define GS_CPU_ISA baseline
#define GS_CPU_ISA_LEVEL 0
#include "bn_backward_stats_kernel.h"
#undef GS_CPU_ISA
#undef GS_CPU_ISA_LEVEL

#if defined(__x86_64__)
GS_TARGET_BEGIN("avx2,fma,f16c")
#define GS_CPU_ISA avx2
#define GS_CPU_ISA_LEVEL 1
#include "bn_backward_stats_kernel.h"
#undef GS_CPU_ISA
#undef GS_CPU_ISA_LEVEL
GS_TARGET_END()

GS_TARGET_BEGIN("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,prefer-vector-width=512")
#define GS_CPU_ISA avx512
#define GS_CPU_ISA_LEVEL 2
#include "bn_backward_stats_kernel.h"
#undef GS_CPU_ISA
#undef GS_CPU_ISA_LEVEL
GS_TARGET_END()
#endif
