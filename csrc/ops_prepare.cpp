// Argument checks and preparation of a BnBackwardProblem, shared by the CPU and CUDA operators
// (contracts: ops.cpp) and by the CUDA emulator's module (csrc/cuda_emu), which cannot link the
// schemas of ops.cpp a second time into a process that has gradstats._C loaded.
#include <ATen/Functions.h>
#include <ATen/OpMathType.h>
#include <tuple>
#include <utility>

#include "ops.h"

namespace gradstats {
namespace {

bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kHalf || t == at::kBFloat16;
}

// The tensor an op reads its values from: a supported floating dtype, on this backend's device.
void check_float_input(const char* op, const at::Tensor& input, c10::DeviceType device_type) {
  TORCH_CHECK_TYPE(is_supported_float(input.scalar_type()), op,
                   ": input must be float32, float64, float16 or bfloat16, got ", input.scalar_type());
  TORCH_CHECK_VALUE(input.device().type() == device_type, op, ": input must be on a ",
                    c10::DeviceTypeName(device_type, true), " device, got ", input.device());
}

ScalarKind scalar_kind(at::ScalarType t) {
  switch (t) {
    case at::kFloat:
      return ScalarKind::Float;
    case at::kDouble:
      return ScalarKind::Double;
    case at::kHalf:
      return ScalarKind::Half;
    default:
      return ScalarKind::BFloat16;
  }
}

void check_on_device(const at::Tensor& t, const char* name, const at::Tensor& input,
                     c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(t.device().type() == device_type && t.device() == input.device(),
                    "bn_backward_stats: ", name, " must be on input's device ", input.device(), ", got ",
                    t.device());
}

// weight / mean / invstd: [C], in input's dtype or the accumulation dtype; returned contiguous
// in the accumulation dtype (a copy of C values at most).
at::Tensor per_channel_param(const at::Tensor& t, const char* name, const at::Tensor& input,
                             at::ScalarType acc, c10::DeviceType device_type) {
  const int64_t C = input.size(1);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == C, "bn_backward_stats: ", name, " must have shape [", C,
                    "] (one value per channel of input), got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == input.scalar_type() || t.scalar_type() == acc,
                   "bn_backward_stats: ", name, " must be ", input.scalar_type(), " (like input) or ", acc,
                   ", got ", t.scalar_type());
  check_on_device(t, name, input, device_type);
  return t.to(acc).contiguous();
}

// Layouts read in place: contiguous NCHW ([N][C][HW]) and channels_last ([N*HW][C]). With
// H = W = 1 both are the same [N][C] matrix, which the channels_last kernel reads best. Any
// other strides are made contiguous once. Returns the tensor to read and whether it is
// channels_last for the kernels.
std::pair<at::Tensor, bool> readable_layout(const at::Tensor& t, int64_t HW) {
  if (t.is_contiguous()) return {t, HW == 1};
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return {t, true};
  return {t.contiguous(), HW == 1};
}

}  // namespace

PreparedBnBackward prepare_bn_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                       const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                       const at::Tensor& invstd, bool training, bool grad_input_mask,
                                       bool per_sample, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(input.dim() == 4, "bn_backward_stats: input must be a 4-D tensor (N, C, H, W), got ",
                    input.dim(), "-D with shape ", input.sizes());
  TORCH_CHECK_VALUE(grad_output.sizes() == input.sizes(),
                    "bn_backward_stats: grad_output must have input's shape ", input.sizes(), ", got ",
                    grad_output.sizes());
  check_float_input("bn_backward_stats", input, device_type);
  TORCH_CHECK_TYPE(grad_output.scalar_type() == input.scalar_type(),
                   "bn_backward_stats: grad_output must have input's dtype ", input.scalar_type(), ", got ",
                   grad_output.scalar_type());
  check_on_device(grad_output, "grad_output", input, device_type);

  const int64_t N = input.size(0), C = input.size(1), HW = input.size(2) * input.size(3);
  TORCH_CHECK_VALUE(C >= 1, "bn_backward_stats: input must have at least one channel, got shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(N * HW >= 1, "bn_backward_stats: input has no values per channel (empty batch): shape ",
                    input.sizes());
  TORCH_CHECK_VALUE(
      !training || N * HW >= 2,
      "bn_backward_stats: training needs more than 1 value per channel (as torch.nn.BatchNorm2d "
      "does), got input of shape ",
      input.sizes());

  PreparedBnBackward p;
  const at::ScalarType acc = at::toOpMathType(input.scalar_type());
  const bool affine = weight.has_value() && weight->defined();
  p.param_dtype = affine ? weight->scalar_type() : acc;
  if (affine) {
    p.weight = per_channel_param(*weight, "weight", input, acc, device_type);
  }
  p.mean = per_channel_param(mean, "mean", input, acc, device_type);
  p.invstd = per_channel_param(invstd, "invstd", input, acc, device_type);

  bool channels_last;
  std::tie(p.input, channels_last) = readable_layout(input, HW);
  const bool nhwc_memory = channels_last && HW != 1;
  p.grad_output =
      nhwc_memory ? grad_output.contiguous(at::MemoryFormat::ChannelsLast) : grad_output.contiguous();

  const auto opts = input.options();
  p.grad_input = grad_input_mask ? at::empty_like(p.input) : at::empty({0}, opts);
  p.grad_weight = at::empty({C}, opts.dtype(acc));
  p.grad_bias = at::empty({C}, opts.dtype(acc));
  p.stats = at::empty({2, kStatRows, C}, opts.dtype(at::kDouble));
  p.per_sample = per_sample ? at::empty({2, N, C}, opts.dtype(acc)) : at::empty({0}, opts.dtype(acc));

  BnBackwardProblem& pr = p.problem;
  pr.dtype = scalar_kind(input.scalar_type());
  pr.grad_output = p.grad_output.const_data_ptr();
  pr.input = p.input.const_data_ptr();
  pr.grad_input = grad_input_mask ? p.grad_input.mutable_data_ptr() : nullptr;
  pr.N = N;
  pr.C = C;
  pr.HW = HW;
  pr.channels_last = channels_last;
  pr.train = training;
  pr.moments_only = false;
  pr.mean = p.mean.const_data_ptr();
  pr.invstd = p.invstd.const_data_ptr();
  pr.weight = p.weight.defined() ? p.weight.const_data_ptr() : nullptr;
  pr.grad_weight = p.grad_weight.mutable_data_ptr();
  pr.grad_bias = p.grad_bias.mutable_data_ptr();
  pr.stats = p.stats.mutable_data_ptr<double>();
  pr.per_sample = per_sample ? p.per_sample.mutable_data_ptr() : nullptr;
  return p;
}

BnBackwardResult finish_bn_backward(PreparedBnBackward& p) {
  return {p.grad_input, p.grad_weight.to(p.param_dtype), p.grad_bias.to(p.param_dtype), p.stats,
          p.per_sample};
}

PreparedMoments prepare_channel_moments(const at::Tensor& input, c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(input.dim() == 4 || input.dim() == 2,
                    "channel_moments: input must be a 4-D (N, C, H, W) or 2-D (N, C) tensor, got ",
                    input.dim(), "-D with shape ", input.sizes());
  check_float_input("channel_moments", input, device_type);
  const at::Tensor x = input.dim() == 2 ? input.unsqueeze(2).unsqueeze(3) : input;
  const int64_t N = x.size(0), C = x.size(1), HW = x.size(2) * x.size(3);
  TORCH_CHECK_VALUE(C >= 1 && N * HW >= 1,
                    "channel_moments: input needs at least one channel and one value per channel, got shape ",
                    input.sizes());
  PreparedMoments p;
  bool channels_last;
  std::tie(p.input, channels_last) = readable_layout(x, HW);
  // [kStatRows, C]: the layout of the grad_output block (which = 0) of a backward's stats.
  p.stats = at::empty({kStatRows, C}, input.options().dtype(at::kDouble));
  BnBackwardProblem& pr = p.problem;
  pr = BnBackwardProblem{};
  pr.dtype = scalar_kind(input.scalar_type());
  pr.grad_output = p.input.const_data_ptr();
  // Nothing is computed from x here, but code shared with the backward may still load or
  // prefetch it: point it at the same memory, so that costs no extra traffic.
  pr.input = pr.grad_output;
  pr.N = N;
  pr.C = C;
  pr.HW = HW;
  pr.channels_last = channels_last;
  pr.moments_only = true;
  pr.stats = p.stats.mutable_data_ptr<double>();
  return p;
}

void check_record_grad_stats(const at::Tensor& state, const at::Tensor& stats, double ema_decay,
                             c10::DeviceType device_type) {
  TORCH_CHECK_VALUE(stats.dim() == 3 && stats.size(0) >= 1 && stats.size(1) == kStatRows,
                    "record_grad_stats_: stats must have shape [G, ", kStatRows, ", C], got ", stats.sizes());
  const int64_t G = stats.size(0), C = stats.size(2);
  TORCH_CHECK_VALUE(state.dim() == 4 && state.size(0) == 3 && state.size(1) == G &&
                        state.size(2) == kStatRows && state.size(3) == C,
                    "record_grad_stats_: state must have shape [3, ", G, ", ", kStatRows, ", ", C,
                    "] for stats of shape ", stats.sizes(), ", got ", state.sizes());
  TORCH_CHECK_TYPE(state.scalar_type() == at::kDouble && stats.scalar_type() == at::kDouble,
                   "record_grad_stats_: state and stats must be float64, got ", state.scalar_type(), " and ",
                   stats.scalar_type());
  TORCH_CHECK_VALUE(state.device().type() == device_type && stats.device() == state.device(),
                    "record_grad_stats_: state and stats must be on the same ",
                    c10::DeviceTypeName(device_type, true), " device, got ", state.device(), " and ",
                    stats.device());
  TORCH_CHECK_VALUE(state.is_contiguous() && stats.is_contiguous(),
                    "record_grad_stats_: state and stats must be contiguous");
  TORCH_CHECK_VALUE(ema_decay >= 0.0 && ema_decay <= 1.0,
                    "record_grad_stats_: ema_decay must be in [0, 1], got ", ema_decay);
}

}  // namespace gradstats
