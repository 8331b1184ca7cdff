// The instruction-set builds of the CPU kernels (isa_builds.cpp); ops_cpu.cpp chooses one at
// run time.
#pragma once

#include "../bn_backward_stats.h"

namespace gradstats {
namespace cpu {

// Each is bn_backward_stats_kernel.h compiled for one instruction set.
void bn_backward_stats_baseline(const BnBackwardProblem& p, ParallelFor parallel_for, int num_threads);
#if defined(__x86_64__)
void bn_backward_stats_avx2(const BnBackwardProblem& p, ParallelFor parallel_for, int num_threads);
void bn_backward_stats_avx512(const BnBackwardProblem& p, ParallelFor parallel_for, int num_threads);
#endif

}  // namespace cpu
}  // namespace gradstats
