// Glue shared by the CPU and CUDA implementations: argument checks (errors name the argument,
// what was expected and what was given) and the preparation of a BnBackwardProblem.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/DeviceType.h>
#include <c10/util/Optional.h>

#include <tuple>

#include "bn_backward_stats.h"

namespace gradstats {

// Tensors of one bn_backward_stats call after validation: inputs in a layout the kernels read
// natively, per-channel parameters in the accumulation type, outputs allocated.
struct PreparedBnBackward {
  at::Tensor grad_output, input;      // same layout: contiguous NCHW, or channels_last
  at::Tensor mean, invstd, weight;    // [C] contiguous, accumulation dtype; weight may be undefined
  at::Tensor grad_input;              // input's layout; a [0] tensor when not requested
  at::Tensor grad_weight, grad_bias;  // [C], accumulation dtype
  at::Tensor stats;                   // [2, 4, C] float64
  at::Tensor per_sample;              // [2, N, C] accumulation dtype; a [0] tensor when not requested
  at::ScalarType param_dtype;         // dtype grad_weight and grad_bias are returned in
  BnBackwardProblem problem;
};

// Validates the arguments of gradstats::bn_backward_stats (see the schema in ops.cpp) for a
// kernel running on `device_type` and prepares them. Throws c10::Error with an actionable message.
PreparedBnBackward prepare_bn_backward(const at::Tensor& grad_output, const at::Tensor& input,
                                       const c10::optional<at::Tensor>& weight, const at::Tensor& mean,
                                       const at::Tensor& invstd, bool training, bool grad_input_mask,
                                       bool per_sample, c10::DeviceType device_type);

using BnBackwardResult = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// The op's return value: casts grad_weight / grad_bias to the parameter dtype when it differs.
BnBackwardResult finish_bn_backward(PreparedBnBackward& prepared);

// gradstats::channel_moments after validation: the tensor to read and the [4, C] output.
struct PreparedMoments {
  at::Tensor input;
  at::Tensor stats;
  BnBackwardProblem problem;
};

PreparedMoments prepare_channel_moments(const at::Tensor& input, c10::DeviceType device_type);

// Validates gradstats::record_grad_stats_ arguments.
void check_record_grad_stats(const at::Tensor& state, const at::Tensor& stats, double ema_decay,
                             c10::DeviceType device_type);

}  // namespace gradstats
