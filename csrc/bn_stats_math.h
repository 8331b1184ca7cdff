// The arithmetic every gradstats kernel shares: moment merging (Welford/Chan) and the batch-norm
// backward element formula. Compiled by the host compiler for the CPU kernels and by nvcc for the
// CUDA kernels, so the CPU tests exercise exactly the formulas the GPU runs.
//
// No PyTorch headers here on purpose: the kernel translation units that include this file compile
// in seconds instead of minutes.
#pragma once

#if defined(__CUDACC__)
#define GS_HOST_DEVICE __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined, so that each CPU instruction-set build compiles these into its own loops.
#define GS_HOST_DEVICE inline __attribute__((always_inline))
#else
#define GS_HOST_DEVICE inline
#endif

namespace gradstats {

// Rows of a statistics block, per channel, as every op and state buffer stores them (float64):
//   count      values that are finite (the moments describe these only)
//   mean, m2   mean and sum of squared deviations of the finite values
//   nonfinite  values that are NaN or +-Inf (counted, never mixed into the moments)
enum StatRow : int { kCount = 0, kMean = 1, kM2 = 2, kNonfinite = 3, kStatRows = 4 };

// Population statistics of a set of values: how many (n), their mean, and M2 = sum (v - mean)^2.
// Variance (correction=0) is m2 / n. The empty set is {0, 0, 0}.
// n is kept in the same floating type as mean and m2 because every merge divides by it; exact
// integer counts are reported separately where they matter.
template <typename T>
struct Moments {
  T n;
  T mean;
  T m2;
};

// Chan et al. merge of the moments of two disjoint sets a and b:
//   n = na + nb;  delta = mean_b - mean_a;  mean = mean_a + delta * nb / n;
//   m2 = m2_a + m2_b + delta^2 * na * nb / n.
// decay (0 < decay <= 1) scales the weight of a, first: 1 is the exact merge; below 1 the result
// is the exponentially weighted mean and variance in which a's data count decay times less.
// Stable for any offset of the means, unlike sum(v^2) - sum(v)^2 / n.
template <typename T>
GS_HOST_DEVICE Moments<T> merge_moments(const Moments<T>& a, const Moments<T>& b, T decay = T(1)) {
  const T na = a.n * decay;
  const T n = na + b.n;
  if (!(n > T(0))) {
    return {T(0), T(0), T(0)};
  }
  const T delta = b.mean - a.mean;
  const T weight_b = b.n / n;
  return {n, a.mean + delta * weight_b, a.m2 * decay + b.m2 + delta * delta * na * weight_b};
}

// Turns sums taken around a pivot p into moments:
//   s1 = sum (v - p), s2 = sum (v - p)^2 over n values;
//   mean = p + s1 / n;  m2 = s2 - s1^2 / n.
// The subtraction loses only as many digits as (mean - p)^2 is larger than the variance, so p
// must come from the data: the mean of the chunks merged so far, or a chunk's first value. Then
// |mean - p| is a few standard deviations at most, and no per-element division is needed.
template <typename T>
GS_HOST_DEVICE Moments<T> moments_from_shifted_sums(T n, T pivot, T s1, T s2) {
  if (!(n > T(0))) {
    return {T(0), T(0), T(0)};
  }
  const T shift = s1 / n;
  const T m2 = s2 - s1 * shift;
  return {n, pivot + shift, m2 > T(0) ? m2 : T(0)};
}

// Per-channel constants of the batch-norm backward element formula (m = N*H*W values):
//   train: dx = w * invstd * (dy - sum_dy / m - (x - mean) * invstd^2 * sum_dy_xmu / m)
//   eval (running statistics): dx = w * invstd * dy
// where sum_dy_xmu = sum dy * (x - mean), so that sum_dy_xhat = invstd * sum_dy_xmu.
template <typename T>
struct GradInputCoeffs {
  T mean;     // the saved (or running) mean the forward subtracted
  T scale;    // w * invstd (invstd when affine=False)
  T mean_dy;  // sum_dy / m in train mode, 0 in eval mode
  T k;        // invstd^2 * sum_dy_xmu / m in train mode, 0 in eval mode
};

template <typename T>
GS_HOST_DEVICE GradInputCoeffs<T> grad_input_coeffs(bool train, T m, T sum_dy, T sum_dy_xmu, T mean, T invstd,
                                                    T weight) {
  if (!train) {
    return {mean, weight * invstd, T(0), T(0)};
  }
  return {mean, weight * invstd, sum_dy / m, invstd * invstd * sum_dy_xmu / m};
}

// dx for one element in train mode. Kept in factored form, as PyTorch does: expanding it into
// a*dy + b*x + c would cancel large terms when x or dy carry a large per-channel offset.
template <typename T>
GS_HOST_DEVICE T grad_input_train(T dy, T x, T mean, T scale, T mean_dy, T k) {
  return (dy - mean_dy - (x - mean) * k) * scale;
}

// dx for one element in eval mode: x is not read, so a non-finite x cannot leak into dx.
template <typename T>
GS_HOST_DEVICE T grad_input_eval(T dy, T scale) {
  return dy * scale;
}

// Folds one backward's statistics into a module's state (gradstats::record_grad_stats_):
//   stats: [G][kStatRows][C] = gradient x row x channel (G = 2 for a batch-norm layer:
//          grad_output and grad_input; G = 1 for a gradient probe)
//   state: [3][G][kStatRows][C], slots {last, accumulated, exponential moving average}.
// Moments are Chan-merged; non-finite counts add up (decayed like the weights in the EMA).
// Handles element i in [0, G*C) of the (gradient, channel) pairs; the CPU loops over i, CUDA
// gives each thread one i.
GS_HOST_DEVICE void record_moments(double* state, const double* stats, long long G, long long C, long long i,
                                   double ema_decay) {
  const long long which = i / C, c = i % C;
  const long long base = which * kStatRows * C + c;
  const long long count = base + kCount * C, mean = base + kMean * C, m2 = base + kM2 * C,
                  nonfinite = base + kNonfinite * C;
  const long long slot = G * kStatRows * C;
  const Moments<double> fresh{stats[count], stats[mean], stats[m2]};
  double* slots[3] = {state, state + slot, state + 2 * slot};
  const Moments<double> accumulated =
      merge_moments(Moments<double>{slots[1][count], slots[1][mean], slots[1][m2]}, fresh);
  const Moments<double> ema =
      merge_moments(Moments<double>{slots[2][count], slots[2][mean], slots[2][m2]}, fresh, ema_decay);
  const Moments<double>* updated[3] = {&fresh, &accumulated, &ema};
  const double nonfinite_values[3] = {stats[nonfinite], slots[1][nonfinite] + stats[nonfinite],
                                      slots[2][nonfinite] * ema_decay + stats[nonfinite]};
  for (int k = 0; k < 3; ++k) {
    slots[k][count] = updated[k]->n;
    slots[k][mean] = updated[k]->mean;
    slots[k][m2] = updated[k]->m2;
    slots[k][nonfinite] = nonfinite_values[k];
  }
}

}  // namespace gradstats
