// AVX2 + FMA build of the CPU kernels; ops_cpu.cpp calls it only on CPUs that have both.
#include "isa_prelude.h"

#if defined(__x86_64__)
#if defined(__clang__)
#pragma clang attribute push(__attribute__((target("avx2,fma,f16c"))), apply_to = function)
#else
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#endif

#define GS_CPU_ISA avx2
#include "bn_backward_stats_kernel.h"

namespace gradstats {
namespace cpu {
void bn_backward_stats_avx2(const BnBackwardProblem& p, ParallelFor parallel_for, int num_threads) {
  avx2::bn_backward_stats(p, parallel_for, num_threads);
}
}  // namespace cpu
}  // namespace gradstats

#if defined(__clang__)
#pragma clang attribute pop
#else
#pragma GCC pop_options
#endif
#endif  // __x86_64__
