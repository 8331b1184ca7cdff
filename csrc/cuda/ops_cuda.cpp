// CUDA implementations of the gradstats operators (schemas and contracts: ../ops.cpp): argument
// checks, device guard, current stream, workspace from the caching allocator, launch checks.
// Only the light c10/cuda headers are included (ATen/cuda/CUDAContext.h would pull in cuSPARSE).
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <mutex>
#include <vector>

#include "../ops.h"
#include "launch.h"

namespace gradstats {
namespace cuda {
namespace {

void check_cuda(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, ": CUDA error ", cudaGetErrorName(err), ": ",
              cudaGetErrorString(err));
}

int multiprocessor_count(c10::DeviceIndex device) {
  static std::mutex mutex;
  static std::vector<int> cache;
  std::lock_guard<std::mutex> lock(mutex);
  if (static_cast<size_t>(device) >= cache.size()) cache.resize(device + 1, 0);
  if (cache[device] == 0) {
    check_cuda(cudaDeviceGetAttribute(&cache[device], cudaDevAttrMultiProcessorCount, device),
               "bn_backward_stats: querying the device");
  }
  return cache[device];
}

// Enqueues a prepared problem on the current stream, with its workspace from the caching
// allocator (the device guard is the caller's).
void launch(const BnBackwardProblem& problem, const at::Tensor& like, const char* what) {
  const int sms = multiprocessor_count(like.device().index());
  const size_t bytes = bn_backward_stats_workspace_bytes(problem, sms);
  const at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
  check_cuda(
      launch_bn_backward_stats(problem, workspace.mutable_data_ptr(), sms, c10::cuda::getCurrentCUDAStream()),
      what);
}

BnBackwardResult bn_backward_stats_cuda(const at::Tensor& grad_output, const at::Tensor& input,
                                        const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                        const at::Tensor& invstd, bool training, bool grad_input_mask,
                                        bool per_sample) {
  c10::cuda::CUDAGuard guard(input.device());
  PreparedBnBackward p = prepare_bn_backward(grad_output, input, weight, mean, invstd, training,
                                             grad_input_mask, per_sample, c10::DeviceType::CUDA);
  launch(p.problem, input, "bn_backward_stats");
  return finish_bn_backward(p);
}

at::Tensor channel_moments_cuda(const at::Tensor& input) {
  c10::cuda::CUDAGuard guard(input.device());
  PreparedMoments p = prepare_channel_moments(input, c10::DeviceType::CUDA);
  launch(p.problem, input, "channel_moments");
  return p.stats;
}

void record_grad_stats_cuda(const at::Tensor& state, const at::Tensor& stats, double ema_decay) {
  c10::cuda::CUDAGuard guard(state.device());
  check_record_grad_stats(state, stats, ema_decay, c10::DeviceType::CUDA);
  check_cuda(
      launch_record_grad_stats(state.mutable_data_ptr<double>(), stats.const_data_ptr<double>(),
                               stats.size(0), stats.size(2), ema_decay, c10::cuda::getCurrentCUDAStream()),
      "record_grad_stats_");
}

}  // namespace
}  // namespace cuda
}  // namespace gradstats

TORCH_LIBRARY_IMPL(gradstats, CUDA, m) {
  m.impl("bn_backward_stats", &gradstats::cuda::bn_backward_stats_cuda);
  m.impl("record_grad_stats_", &gradstats::cuda::record_grad_stats_cuda);
  m.impl("channel_moments", &gradstats::cuda::channel_moments_cuda);
}
