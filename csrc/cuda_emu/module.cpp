// gradstats_cuda_emu._C: the operators of gradstats with their CUDA kernels (csrc/cuda/*.cu)
// compiled for the host and run under the emulator, on CPU tensors. Same argument checks,
// outputs, dtypes and layouts as the torch operators (ops.cpp); num_sms sets the multiprocessor
// count the launch plan sizes its grid for.
#include <torch/extension.h>

#include "../cuda/launch.h"
#include "../ops.h"
#include "emulator.h"

namespace gs_emu {
void run_faulty_kernel(const std::string& which);  // faulty_kernels.cpp
}

namespace gradstats {
namespace cuda_emu {
namespace {

void check_launch(cudaError_t err, const char* op) {
  const std::string message = gs_emu::take_error_message();
  TORCH_CHECK(err == cudaSuccess && message.empty(), op,
              ": CUDA emulator: ", message.empty() ? "launch failed" : message);
}

void run(const BnBackwardProblem& problem, int64_t num_sms, const char* op) {
  TORCH_CHECK_VALUE(num_sms >= 1, op, ": num_sms must be at least 1, got ", num_sms);
  const size_t bytes = cuda::bn_backward_stats_workspace_bytes(problem, static_cast<int>(num_sms));
  // Uninitialised, as the caching allocator's memory is: a kernel that reads what no kernel
  // wrote sees garbage, not zeros.
  const at::Tensor workspace = at::empty({static_cast<int64_t>(bytes)}, at::kByte);
  gs_emu::take_error_message();
  gs_emu::take_last_error();
  check_launch(cuda::launch_bn_backward_stats(problem, workspace.mutable_data_ptr(),
                                              static_cast<int>(num_sms), nullptr),
               op);
}

BnBackwardResult bn_backward_stats(const at::Tensor& grad_output, const at::Tensor& input,
                                   const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                   const at::Tensor& invstd, bool training, bool grad_input_mask,
                                   bool per_sample, int64_t num_sms) {
  PreparedBnBackward p = prepare_bn_backward(grad_output, input, weight, mean, invstd, training,
                                             grad_input_mask, per_sample, c10::DeviceType::CPU);
  run(p.problem, num_sms, "bn_backward_stats");
  return finish_bn_backward(p);
}

at::Tensor channel_moments(const at::Tensor& input, int64_t num_sms) {
  PreparedMoments p = prepare_channel_moments(input, c10::DeviceType::CPU);
  run(p.problem, num_sms, "channel_moments");
  return p.stats;
}

void record_grad_stats_(const at::Tensor& state, const at::Tensor& stats, double ema_decay) {
  check_record_grad_stats(state, stats, ema_decay, c10::DeviceType::CPU);
  gs_emu::take_error_message();
  gs_emu::take_last_error();
  check_launch(
      cuda::launch_record_grad_stats(state.mutable_data_ptr<double>(), stats.const_data_ptr<double>(),
                                     stats.size(0), stats.size(2), ema_decay, nullptr),
      "record_grad_stats_");
}

}  // namespace
}  // namespace cuda_emu
}  // namespace gradstats

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace e = gradstats::cuda_emu;
  m.def("bn_backward_stats", &e::bn_backward_stats);
  m.def("channel_moments", &e::channel_moments);
  m.def("record_grad_stats_", &e::record_grad_stats_);
  m.def("run_faulty_kernel", &gs_emu::run_faulty_kernel);
}
