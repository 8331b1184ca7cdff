// Operator schemas of gradstats with their contracts, and the Python module stub that makes
// `import gradstats._C` load this library (which registers the operators). The argument checks
// both backends share are in ops_prepare.cpp.
#include <Python.h>

#include <torch/library.h>

// -------------------------------------------------------------------------------------------------
// gradstats::bn_backward_stats(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean,
//                              Tensor invstd, bool training, bool grad_input_mask,
//                              bool per_sample=False)
//     -> (Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor stats,
//         Tensor per_sample_grads)
//
// Batch-norm backward over (N, H, W) per channel C of a 4-D input, fused with per-channel
// statistics of the incoming gradient dy = grad_output and the outgoing one dx = grad_input.
//
// Inputs
//   grad_output, input: (N, C, H, W), same shape and dtype: float32, float64, float16 or bfloat16
//                       (storage). Contiguous NCHW and channels_last are read in place; any other
//                       strides are made contiguous once (one copy), grad_output is brought to
//                       input's layout. N*H*W >= 1, and >= 2 when training.
//   weight:             [C] or None (affine=False, weight 1).
//   mean, invstd:       [C]: training=True: the batch mean and 1/sqrt(var + eps) the forward saved;
//                       training=False: the running mean and 1/sqrt(running_var + eps).
//   weight, mean and invstd may be in input's dtype or in the accumulation dtype (float32 for
//   float16/bfloat16 storage) and must be on input's device.
//   training:           True: dx = w*invstd*(dy - mean(dy) - x_hat*mean(dy*x_hat)); False: dx = w*invstd*dy.
//   grad_input_mask:    False skips writing grad_input (its statistics are still computed).
//   per_sample:         True also returns grad_bias and grad_weight split by sample (below).
//
// Outputs
//   grad_input:  input's shape and layout, input's dtype; shape [0] when grad_input_mask is False.
//   grad_weight: [C] sum(dy * x_hat); grad_bias: [C] sum(dy). In weight's dtype (the accumulation
//                dtype when weight is None). Computed whatever the mask: they cost nothing extra.
//   stats:       [2, 4, C] float64: stats[0] describes grad_output, stats[1] grad_input; rows are
//                (count, mean, M2, nonfinite): count and nonfinite are the numbers of finite and
//                of NaN/infinite values per channel, mean and M2 describe the finite values only
//                (population variance = M2 / count). The gradients themselves are untouched:
//                NaNs and infinities in dy flow into dx, grad_weight and grad_bias exactly as in
//                PyTorch's backward.
//   per_sample_grads: [2, N, C] in the accumulation dtype (float32 for float32/float16/bfloat16
//                storage, float64 for float64) when per_sample is True, else shape [0]:
//                [0][n][c] = sum over (h, w) of dy[n, c] (sample n's term of grad_bias),
//                [1][n][c] = sum over (h, w) of dy[n, c] * x_hat[n, c] (its term of grad_weight),
//                x_hat = (x - mean) * invstd with the mean and invstd given (the batch's in
//                training, the running ones in eval). Summed over n they are grad_bias and
//                grad_weight up to rounding. Formed in the pass that reads dy: no extra pass.
//                With per_sample, the kernels sum grad_bias and grad_weight (and so train-mode
//                dx and the statistics) sample by sample: the same precision, but the last bits
//                may differ from a call without it.
//
// Precision (both devices run the arithmetic of bn_backward_passes.h): values accumulate in
// float32 (float64 for float64 storage) within chunks (CPU: at most 8192 values per channel; CUDA:
// 256 per thread) as sums shifted by a pivot taken from the data, and leave the chunk in float64.
// CPU: chunks Chan-merge in float64. CUDA: the threads of a block share one pivot per channel and
// add their float64 sums; blocks Chan-merge in float64. A chunk whose float sums are not finite
// (NaN/Inf values, or finite values whose squares overflow float32) is summed again in float64, so
// every finite float32 value gives finite moments. Statistics describe dx as returned (after
// rounding to its dtype).
//
// Cost: the passes over memory of PyTorch's own backward (train: read dy, x; read dy, x and write
// dx. eval: one pass) and nothing more; statistics ride on them.
//
// -------------------------------------------------------------------------------------------------
// gradstats::record_grad_stats_(Tensor(a!) state, Tensor stats, float ema_decay) -> ()
//
// Folds one backward's stats ([G, 4, C] float64 for G gradients: G = 2 as bn_backward_stats
// returns them, G = 1 for a probe) into a module's state ([3, G, 4, C] float64, slots: 0 last,
// 1 accumulated, 2 exponential moving average), in place and without synchronising with the host:
//   state[0] = stats;  state[1] = chan_merge(state[1], stats);
//   state[2] = chan_merge(state[2] with its weight times ema_decay, stats), 0 <= ema_decay <= 1.
// Non-finite counts add up (and decay in the EMA). An empty slot has count 0 and nonfinite 0.
//
// gradstats::channel_moments(Tensor input) -> Tensor
//
// Per-channel statistics of a (N, C, H, W) or (N, C) tensor over every dimension but C:
// [4, C] float64 rows (count, mean, M2, nonfinite), computed like bn_backward_stats' statistics (one read
// pass, shifted sums in chunks, Chan merges in float64). Layouts as bn_backward_stats. Gradient
// probes call it on the gradient that flows through them.
//
// gradstats::cpu_capability() -> str: the CPU kernel build chosen at run time.
// -------------------------------------------------------------------------------------------------

TORCH_LIBRARY(gradstats, m) {
  m.def(
      "bn_backward_stats(Tensor grad_output, Tensor input, Tensor? weight, Tensor mean, "
      "Tensor invstd, bool training, bool grad_input_mask, bool per_sample=False) -> "
      "(Tensor grad_input, Tensor grad_weight, Tensor grad_bias, Tensor stats, Tensor per_sample_grads)");
  m.def("record_grad_stats_(Tensor(a!) state, Tensor stats, float ema_decay) -> ()");
  m.def("channel_moments(Tensor input) -> Tensor");
}

extern "C" {
// `import gradstats._C` loads this library, whose static initialisers register the operators.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT, "_C", "gradstats operators; use them through torch.ops.gradstats", -1, nullptr};
  return PyModule_Create(&module_def);
}
}
