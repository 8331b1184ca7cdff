// One instruction-set build of the CPU kernels. Each bn_backward_stats_<isa>.cpp defines
//   GS_CPU_ISA          the build's name: its namespace and its entry's suffix
//   GS_CPU_ISA_TARGET   (optional) the compiler target string, e.g. "avx2,fma,f16c"
//   GS_CPU_ISA_LEVEL    0 baseline, 1 AVX2, 2 AVX-512: which intrinsics vec.h may use
// and includes this file, which compiles bn_backward_stats_kernel.h for that target only.
#include "isa_prelude.h"  // everything else first, for the baseline target (see there)

#define GS_DO_PRAGMA(x) _Pragma(#x)
#define GS_JOIN2(a, b) a##b
#define GS_JOIN(a, b) GS_JOIN2(a, b)

#if defined(GS_CPU_ISA_TARGET)
#if defined(__clang__)
#define GS_TARGET_PUSH(t) GS_DO_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
GS_TARGET_PUSH(GS_CPU_ISA_TARGET)
#else
#define GS_TARGET_PUSH(t) GS_DO_PRAGMA(GCC target(t))
GS_DO_PRAGMA(GCC push_options)
GS_TARGET_PUSH(GS_CPU_ISA_TARGET)
#endif
#endif

#include "bn_backward_stats_kernel.h"

namespace gradstats {
namespace cpu {
void GS_JOIN(bn_backward_stats_, GS_CPU_ISA)(const BnBackwardProblem& p, ParallelFor parallel_for,
                                             int num_threads) {
  GS_CPU_ISA::bn_backward_stats(p, parallel_for, num_threads);
}
}  // namespace cpu
}  // namespace gradstats

#if defined(GS_CPU_ISA_TARGET)
#if defined(__clang__)
GS_DO_PRAGMA(clang attribute pop)
#else
GS_DO_PRAGMA(GCC pop_options)
#endif
#endif
