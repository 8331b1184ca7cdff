// Baseline build of the CPU kernels: the compiler's default instruction set (SSE2 on x86-64).
#include "isa_prelude.h"

#define GS_CPU_ISA baseline
#include "bn_backward_stats_kernel.h"

namespace gradstats {
namespace cpu {
void bn_backward_stats_baseline(const BnBackwardProblem& p, ParallelFor parallel_for, int num_threads) {
  baseline::bn_backward_stats(p, parallel_for, num_threads);
}
}  // namespace cpu
}  // namespace gradstats
