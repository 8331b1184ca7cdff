// CPU implementations of the gradstats operators (schemas and contracts: ../ops.cpp).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <string>

#include "../bn_stats_math.h"
#include "../ops.h"
#include "isa_builds.h"

namespace gradstats {
namespace cpu {
namespace {

using KernelFn = void (*)(const BnBackwardProblem&, ParallelFor, int);

struct KernelChoice {
  KernelFn fn;
  const char* name;
};

// The widest build this CPU runs. GRADSTATS_CPU_CAPABILITY=baseline|avx2|avx512 lowers it (for
// comparing builds); a value this CPU cannot run is ignored.
KernelChoice choose_kernel() {
  KernelChoice best{&bn_backward_stats_baseline, "baseline"};
#if defined(__x86_64__)
  __builtin_cpu_init();
  const char* cap = std::getenv("GRADSTATS_CPU_CAPABILITY");
  const std::string want = cap ? cap : "avx512";
  const bool avx2 =
      __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
  const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && want == "avx512") {
    best = {&bn_backward_stats_avx512, "avx512"};
  } else if (avx2 && (want == "avx512" || want == "avx2")) {
    best = {&bn_backward_stats_avx2, "avx2"};
  }
#endif
  return best;
}

const KernelChoice& kernel() {
  static const KernelChoice choice = choose_kernel();
  return choice;
}

void aten_parallel_for(int64_t size, int64_t grain, const RangeFn& fn) {
  at::parallel_for(0, size, grain, fn);
}

BnBackwardResult bn_backward_stats_cpu(const at::Tensor& grad_output, const at::Tensor& input,
                                       const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                       const at::Tensor& invstd, bool training, bool grad_input_mask,
                                       bool per_sample) {
  PreparedBnBackward p = prepare_bn_backward(grad_output, input, weight, mean, invstd, training,
                                             grad_input_mask, per_sample, c10::DeviceType::CPU);
  kernel().fn(p.problem, &aten_parallel_for, at::get_num_threads());
  return finish_bn_backward(p);
}

void record_grad_stats_cpu(const at::Tensor& state, const at::Tensor& stats, double ema_decay) {
  check_record_grad_stats(state, stats, ema_decay, c10::DeviceType::CPU);
  const int64_t G = stats.size(0), C = stats.size(2);
  double* s = state.mutable_data_ptr<double>();
  const double* b = stats.const_data_ptr<double>();
  for (int64_t i = 0; i < G * C; ++i) {
    record_moments(s, b, G, C, i, ema_decay);
  }
}

at::Tensor channel_moments_cpu(const at::Tensor& input) {
  PreparedMoments p = prepare_channel_moments(input, c10::DeviceType::CPU);
  kernel().fn(p.problem, &aten_parallel_for, at::get_num_threads());
  return p.stats;
}

std::string cpu_capability() { return kernel().name; }

}  // namespace
}  // namespace cpu
}  // namespace gradstats

TORCH_LIBRARY_FRAGMENT(gradstats, m) { m.def("cpu_capability() -> str", &gradstats::cpu::cpu_capability); }

TORCH_LIBRARY_IMPL(gradstats, CPU, m) {
  m.impl("bn_backward_stats", &gradstats::cpu::bn_backward_stats_cpu);
  m.impl("record_grad_stats_", &gradstats::cpu::record_grad_stats_cpu);
  m.impl("channel_moments", &gradstats::cpu::channel_moments_cpu);
}
