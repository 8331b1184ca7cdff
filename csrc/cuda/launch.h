// Host entry points of the CUDA kernels (bn_backward_stats_kernel.cu, record_grad_stats_kernel.cu),
// declared without PyTorch types so the .cu files compile without PyTorch headers. The glue in
// ops_cuda.cpp validates tensors, sets the device, allocates the workspace from PyTorch's caching
// allocator and turns a returned error into a c10::Error.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>

#include "../bn_backward_stats.h"

namespace gradstats {
namespace cuda {

// Bytes of device scratch memory bn_backward_stats needs for problem p on a device with
// `num_sms` multiprocessors (per-block partial results and per-channel constants).
size_t bn_backward_stats_workspace_bytes(const BnBackwardProblem& p, int num_sms);

// Enqueues the kernels of bn_backward_stats on `stream`; returns early (cudaSuccess) when there
// is nothing to do, otherwise the first launch error. `workspace` holds at least
// bn_backward_stats_workspace_bytes(p, num_sms) bytes, 16-byte aligned.
cudaError_t launch_bn_backward_stats(const BnBackwardProblem& p, void* workspace, int num_sms,
                                     cudaStream_t stream);

// Enqueues gradstats::record_grad_stats_: state [3][G][4][C], stats [G][4][C], float64.
cudaError_t launch_record_grad_stats(double* state, const double* stats, long long gradients,
                                     long long channels, double ema_decay, cudaStream_t stream);

}  // namespace cuda
}  // namespace gradstats
