// One call of bn_backward_stats described with plain pointers, so that the kernels (CPU builds
// for several instruction sets, and CUDA) compile without PyTorch headers. The torch-facing glue
// (ops.cpp, cpu/ops_cpu.cpp, cuda/ops_cuda.cpp) validates tensors and fills this in.
#pragma once

#include <cstdint>
#include <functional>

#include "bn_stats_math.h"

namespace gradstats {

// Storage type of grad_output, input and grad_input.
enum class ScalarKind : int { Float, Double, Half, BFloat16 };

// Which gradient a statistics block describes.
enum StatWhich : int { kGradOutput = 0, kGradInput = 1 };

struct BnBackwardProblem {
  ScalarKind dtype;
  // Same logical shape (N, C, H, W) and the same memory layout:
  //   channels_last == false: [N][C][HW] (contiguous NCHW)
  //   channels_last == true:  [N*HW][C]  (channels_last; also used for contiguous H = W = 1)
  const void* grad_output;
  const void* input;
  void* grad_input;  // nullptr: grad_input is not wanted, only its statistics
  int64_t N, C, HW;
  bool channels_last;
  bool train;  // true: batch statistics (dx has the reduction terms); false: running statistics
  // gradstats::channel_moments: only the moments of grad_output (stats[0]); input, weight, mean,
  // invstd and the other outputs are not used.
  bool moments_only;
  // Per-channel [C] arrays in the accumulation type: float, or double when dtype is Double.
  const void* mean;
  const void* invstd;
  const void* weight;  // nullptr: affine=False, weight 1
  void* grad_weight;   // out: sum dy * x_hat
  void* grad_bias;     // out: sum dy
  // out, [2][kStatRows][C] float64: {grad_output, grad_input} x {count, mean, m2, nonfinite}.
  double* stats;
  // out, [2][N][C] in the accumulation type, or nullptr when not requested: the batch's
  // grad_bias and grad_weight split by sample, per_sample[0][n][c] = sum over (h, w) of dy and
  // per_sample[1][n][c] = sum over (h, w) of dy * x_hat, x_hat = (x - mean) * invstd.
  void* per_sample;
};

// Writes the statistics of one gradient (which = kGradOutput or kGradInput) of channel c.
template <typename MomentsT>
GS_HOST_DEVICE void store_stats(double* stats, int which, int64_t C, int64_t c, const MomentsT& m,
                                double nonfinite) {
  double* base = stats + static_cast<int64_t>(which) * kStatRows * C + c;
  base[kCount * C] = static_cast<double>(m.n);
  base[kMean * C] = static_cast<double>(m.mean);
  base[kM2 * C] = static_cast<double>(m.m2);
  base[kNonfinite * C] = nonfinite;
}

// CPU parallelism is injected by the glue (at::parallel_for) so kernel files need no ATen.
using RangeFn = std::function<void(int64_t begin, int64_t end)>;
using ParallelFor = void (*)(int64_t size, int64_t grain, const RangeFn& fn);

}  // namespace gradstats
