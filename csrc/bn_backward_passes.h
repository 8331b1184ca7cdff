// The arithmetic of bn_backward_stats that the CPU and the CUDA kernels share: the passes, the
// per-element accumulation of each, the sums of a chunk and their fold into moments (with the
// double-precision recount of a chunk whose float sums overflowed or met NaN/Inf), the per-block
// Partial and its merge, and the per-channel finish (grad_bias, grad_weight, the constants of
// dx, the statistics). The kernels only decide how values are visited and where sums meet.
#pragma once

#include <cmath>

#include "bn_backward_stats.h"
#include "bn_stats_math.h"

namespace gradstats {

enum class Pass {
  kReduceGradOutput,  // train pass 1: sum dy, sum dy*(x - mean), moments of dy
  kGradInputTrain,    // train pass 2: dx, moments of dx
  kEvalFused,         // eval: everything in one pass
  kMoments,           // channel_moments: moments of one tensor (read as grad_output) only
};

// Sums of one chunk. V is acc_t (one value) or a vector of them.
enum SumIndex : int {
  kSumDy,     // sum dy                 } for grad_bias, grad_weight and dx
  kSumDyXmu,  // sum dy * (x - mean)    }
  kS1Dy,      // sum (dy - pivot_dy)    } for the moments of dy
  kS2Dy,      // sum (dy - pivot_dy)^2  }
  kS1Dx,      // sum (dx - pivot_dx)
  kS2Dx,      // sum (dx - pivot_dx)^2
  kNumSums,
};

GS_HOST_DEVICE constexpr bool pass_uses(Pass P, int sum) {
  return P == Pass::kMoments ? (sum == kS1Dy || sum == kS2Dy)
                             : (sum < kS1Dx ? P != Pass::kGradInputTrain : P != Pass::kReduceGradOutput);
}

template <typename V>
struct ChunkSums {
  V v[kNumSums];
};

GS_HOST_DEVICE bool is_finite(double v) {
#if defined(__CUDA_ARCH__)
  return isfinite(v);
#else
  return std::isfinite(v);
#endif
}

GS_HOST_DEVICE constexpr bool computes_grad_input(Pass P) {
  return P == Pass::kGradInputTrain || P == Pass::kEvalFused;
}

// The per-element work of pass P, for one value (V = acc_t) or one vector of them, in three
// steps that each kernel strings together (it rounds dx to its storage type in between:
// statistics describe dx as returned):
//   1. accumulate_grad_output: sum dy, sum dy * (x - mean), shifted sums of dy;
//   2. grad_input_value:       dx before rounding (passes that compute dx);
//   3. accumulate_grad_input:  shifted sums of dx as stored.
template <Pass P, typename V>
GS_HOST_DEVICE void accumulate_grad_output(V dy, V x, V mean, V pivot_dy, ChunkSums<V>& s) {
  if constexpr (P != Pass::kGradInputTrain) {
    if constexpr (P != Pass::kMoments) {
      s.v[kSumDy] += dy;
      s.v[kSumDyXmu] += dy * (x - mean);
    }
    const V d = dy - pivot_dy;
    s.v[kS1Dy] += d;
    s.v[kS2Dy] += d * d;
  }
}

template <Pass P, typename V>
GS_HOST_DEVICE V grad_input_value(V dy, V x, V mean, V scale, V mean_dy, V k) {
  if constexpr (P == Pass::kEvalFused) {
    return grad_input_eval(dy, scale);
  } else {
    return grad_input_train(dy, x, mean, scale, mean_dy, k);
  }
}

template <Pass P, typename V>
GS_HOST_DEVICE void accumulate_grad_input(V dx, V pivot_dx, ChunkSums<V>& s) {
  if constexpr (computes_grad_input(P)) {
    const V e = dx - pivot_dx;
    s.v[kS1Dx] += e;
    s.v[kS2Dx] += e * e;
  }
}

// Sums around a pivot, in double, of the finite values of a set, and the count of the others.
struct ShiftedSums {
  double n = 0, s1 = 0, s2 = 0, nonfinite = 0;
  GS_HOST_DEVICE void add(double v, double pivot) {
    if (!is_finite(v)) {
      nonfinite += 1;
      return;
    }
    const double d = v - pivot;
    s1 += d;
    s2 += d * d;
    n += 1;
  }
  GS_HOST_DEVICE void add(const ShiftedSums& o) {
    n += o.n;
    s1 += o.s1;
    s2 += o.s2;
    nonfinite += o.nonfinite;
  }
  GS_HOST_DEVICE Moments<double> moments(double pivot) const {
    return moments_from_shifted_sums(n, pivot, s1, s2);
  }
};

// What a run of chunks adds up to, all around the same pivots: plain sums, so that threads and
// lanes combine them without a division (and with nothing to go wrong on an empty side).
struct RunSums {
  double sum_dy = 0, sum_dy_xmu = 0;
  ShiftedSums dy, dx;
  GS_HOST_DEVICE void add(const RunSums& o) {
    sum_dy += o.sum_dy;
    sum_dy_xmu += o.sum_dy_xmu;
    dy.add(o.dy);
    dx.add(o.dx);
  }
};

// Adds the totals of a chunk of n values (its ChunkSums in double) to `run`. A NaN or an infinity
// in the chunk makes its shifted sums non-finite, and so does a float overflow of the squares or
// of the differences (finite values beyond ~1e19); only then, rarely, `recount(dx, pivot)`
// re-reads the chunk and returns its sums in double around the same pivot, with the count of
// the non-finite values. The gradient sums stay as summed: dbias and dweight carry a NaN exactly
// as PyTorch's would.
template <Pass P, typename Recount>
GS_HOST_DEVICE void add_chunk(RunSums& run, double n, double p_dy, double p_dx, const double* totals,
                              Recount&& recount) {
  auto fold = [&](ShiftedSums& into, double s1, double s2, bool dx, double pivot) {
    if (is_finite(s1) && is_finite(s2)) {
      into.n += n;
      into.s1 += s1;
      into.s2 += s2;
    } else {
      into.add(recount(dx, pivot));
    }
  };
  if constexpr (P != Pass::kGradInputTrain) {
    if constexpr (P != Pass::kMoments) {
      run.sum_dy += totals[kSumDy];
      run.sum_dy_xmu += totals[kSumDyXmu];
    }
    fold(run.dy, totals[kS1Dy], totals[kS2Dy], false, p_dy);
  }
  if constexpr (P != Pass::kReduceGradOutput && P != Pass::kMoments) {
    fold(run.dx, totals[kS1Dx], totals[kS2Dx], true, p_dx);
  }
}

// What one block (CUDA) or task (CPU) contributes for one channel, in double; merged across
// them per channel (Chan merge of the moments, sums of the rest).
struct Partial {
  Moments<double> dy{0, 0, 0};  // of the finite values
  Moments<double> dx{0, 0, 0};
  double nonfinite_dy = 0, nonfinite_dx = 0;
  double sum_dy = 0;
  double sum_dy_xmu = 0;
};

GS_HOST_DEVICE Partial merge_partials(const Partial& a, const Partial& b) {
  Partial m;
  m.dy = merge_moments(a.dy, b.dy);
  m.dx = merge_moments(a.dx, b.dx);
  m.nonfinite_dy = a.nonfinite_dy + b.nonfinite_dy;
  m.nonfinite_dx = a.nonfinite_dx + b.nonfinite_dx;
  m.sum_dy = a.sum_dy + b.sum_dy;
  m.sum_dy_xmu = a.sum_dy_xmu + b.sum_dy_xmu;
  return m;
}

// Folds a run of chunks (sums around pivots p_dy, p_dx) into a partial.
GS_HOST_DEVICE void fold_run(Partial& into, const RunSums& run, double p_dy, double p_dx) {
  Partial r;
  r.dy = run.dy.moments(p_dy);
  r.dx = run.dx.moments(p_dx);
  r.nonfinite_dy = run.dy.nonfinite;
  r.nonfinite_dx = run.dx.nonfinite;
  r.sum_dy = run.sum_dy;
  r.sum_dy_xmu = run.sum_dy_xmu;
  into = merge_partials(into, r);
}

// The pivot of a run of values: the mean of the finite ones among its first few (kPivotSamples),
// close to the channel mean without a pass of its own, and moved by a fraction by one outlier;
// or the mean of what was merged so far, once there is some.
constexpr int kPivotSamples = 16;

struct PivotSamples {
  double sum = 0;
  int n = 0;
  GS_HOST_DEVICE void add(double v) {
    if (is_finite(v)) {
      sum += v;
      ++n;
    }
  }
  template <typename acc_t>
  GS_HOST_DEVICE acc_t pivot(const Moments<double>& so_far) const {
    if (so_far.n > 0) return static_cast<acc_t>(so_far.mean);
    return n > 0 ? static_cast<acc_t>(sum / n) : acc_t(0);
  }
};

// ---- per channel ------------------------------------------------------------------------------
// The constants of dx for channel c (m = N*H*W values), in double, rounded once to acc_t.
// Eval: scale = w * invstd (the sums are not used).
template <typename acc_t>
GS_HOST_DEVICE GradInputCoeffs<acc_t> channel_coeffs(const BnBackwardProblem& p, int64_t c, double sum_dy,
                                                     double sum_dy_xmu) {
  const acc_t* mean = static_cast<const acc_t*>(p.mean);
  const acc_t* invstd = static_cast<const acc_t*>(p.invstd);
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  const double m = static_cast<double>(p.N) * static_cast<double>(p.HW);
  const GradInputCoeffs<double> g = grad_input_coeffs<double>(
      p.train, m, sum_dy, sum_dy_xmu, mean[c], invstd[c], weight ? static_cast<double>(weight[c]) : 1.0);
  return {mean[c], static_cast<acc_t>(g.scale), static_cast<acc_t>(g.mean_dy), static_cast<acc_t>(g.k)};
}

// After the pass that read dy, for channel c: dy statistics, grad_bias, grad_weight; returns the
// constants of dx (which in train mode need the sums).
template <typename acc_t>
GS_HOST_DEVICE GradInputCoeffs<acc_t> finish_grad_output(const BnBackwardProblem& p, const Partial& total,
                                                         int64_t c) {
  store_stats(p.stats, kGradOutput, p.C, c, total.dy, total.nonfinite_dy);
  if (!p.moments_only) {
    const acc_t* invstd = static_cast<const acc_t*>(p.invstd);
    static_cast<acc_t*>(p.grad_bias)[c] = static_cast<acc_t>(total.sum_dy);
    static_cast<acc_t*>(p.grad_weight)[c] =
        static_cast<acc_t>(total.sum_dy_xmu * static_cast<double>(invstd[c]));
    return channel_coeffs<acc_t>(p, c, total.sum_dy, total.sum_dy_xmu);
  }
  return {acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
}

// After the pass that wrote dx, for channel c: dx statistics.
GS_HOST_DEVICE void finish_grad_input(const BnBackwardProblem& p, const Partial& total, int64_t c) {
  store_stats(p.stats, kGradInput, p.C, c, total.dx, total.nonfinite_dx);
}

}  // namespace gradstats
