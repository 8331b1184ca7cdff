// CUDA kernel of gradstats::record_grad_stats_: one thread per (gradient, channel) pair applies
// record_moments from the shared math header, so the GPU folds statistics exactly as the CPU does.
#include <cuda_runtime.h>

#include "../bn_stats_math.h"
#include "emulatable.h"
#include "launch.h"

namespace gradstats {
namespace cuda {
namespace {

__global__ void record_grad_stats_kernel(double* state, const double* stats, long long gradients,
                                         long long channels, double ema_decay) {
  const long long i = static_cast<long long>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < gradients * channels) {
    record_moments(state, stats, gradients, channels, i, ema_decay);
  }
}

}  // namespace

cudaError_t launch_record_grad_stats(double* state, const double* stats, long long gradients,
                                     long long channels, double ema_decay, cudaStream_t stream) {
  if (gradients * channels == 0) return cudaSuccess;
  constexpr int kThreads = 256;
  const long long blocks = (gradients * channels + kThreads - 1) / kThreads;
  GS_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, record_grad_stats_kernel)(
      state, stats, gradients, channels, ema_decay);
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace gradstats
