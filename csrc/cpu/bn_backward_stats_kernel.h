// CPU kernels of bn_backward_stats. Included once per instruction set by the
// bn_backward_stats_<isa>.cpp files, each inside its own namespace GS_CPU_ISA and compiled for that
// instruction set; ops_cpu.cpp picks one at run time. The inner loops are written over fixed-width
// lane arrays so the compiler vectorises them for whatever the including file targets.
//
// Passes over memory (m = N*H*W values per channel):
//   train: pass 1 reads dy, x   -> sum_dy, sum dy*(x - mean), moments of dy
//          pass 2 reads dy, x   -> writes dx, moments of dx
//   eval:  one pass reads dy, x -> sum_dy, sum dy*(x - mean), moments of dy, writes dx, moments of dx
// These are the passes PyTorch's own backward makes (eval is one fewer); the statistics ride on them.
//
// Accumulation: within a chunk of at most kChunk values of one channel, lanes accumulate sums
// shifted by one pivot (see chunk_pivot) in acc_t (float; double for double storage). Each chunk
// becomes (n, mean, m2) and is Chan-merged in double. sum(dy) and sum(dy * (x - mean)), which
// the gradients use, are summed directly, so the pivot cannot cost them accuracy. Work is split into tasks whose
// boundaries depend only on the shape, and partial results are merged in task order, so results
// are bitwise identical run to run and for any number of threads.
#pragma once

#include <algorithm>
#include <cstdint>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../bn_backward_stats.h"
#include "../bn_stats_math.h"

#ifndef GS_CPU_ISA
#error "define GS_CPU_ISA (the namespace of this instruction-set build) before including"
#endif

namespace gradstats {
namespace cpu {
namespace GS_CPU_ISA {

// Values of one channel accumulated around one pivot before they are folded into double moments.
// Bounds the float rounding of each lane's sums (kChunk / lanes terms each).
constexpr int64_t kChunk = 8192;
// A task covers about this many values, so small channels are grouped and large ones split.
constexpr int64_t kTaskValues = 1 << 16;
// channels_last: channels per task, so per-task lane arrays stay in L1/L2.
constexpr int64_t kChannelBlock = 256;

template <typename scalar_t>
using acc_type_t = std::conditional_t<std::is_same<scalar_t, double>::value, double, float>;

enum class Pass {
  kReduceGradOutput,  // train pass 1
  kGradInputTrain,    // train pass 2
  kEvalFused,         // eval: everything in one pass
};

// The per-element work of every pass. Everything is a scalar so one definition serves both the
// NCHW loop (constants per channel, lanes along H*W) and the channels_last loop (constants and
// lanes along channels).
//   s_dy = sum dy and s_xmu = sum dy * (x - mean): for grad_bias, grad_weight and dx, summed
//   directly so their rounding matches PyTorch's whatever the pivot;
//   s1_* = sum (v - pivot), s2_* = sum (v - pivot)^2: for the moments of dy and dx.
template <Pass P, bool kWrite, typename scalar_t, typename acc_t>
inline void update(const scalar_t dy_stored, const scalar_t x_stored, scalar_t* dx_out, acc_t mean,
                   acc_t scale, acc_t mean_dy, acc_t k, acc_t pivot_dy, acc_t pivot_dx,
                   acc_t& s_dy, acc_t& s_xmu, acc_t& s1_dy, acc_t& s2_dy, acc_t& s1_dx,
                   acc_t& s2_dx) {
  const acc_t dy = static_cast<acc_t>(dy_stored);
  if constexpr (P != Pass::kGradInputTrain) {
    s_dy += dy;
    const acc_t d = dy - pivot_dy;
    s1_dy += d;
    s2_dy += d * d;
    s_xmu += dy * (static_cast<acc_t>(x_stored) - mean);
  }
  if constexpr (P != Pass::kReduceGradOutput) {
    const acc_t dx_exact =
        P == Pass::kEvalFused
            ? grad_input_eval(dy, scale)
            : grad_input_train(dy, static_cast<acc_t>(x_stored), mean, scale, mean_dy, k);
    // Statistics describe the gradient as stored (rounded to scalar_t), i.e. what autograd sees.
    const scalar_t dx_stored = static_cast<scalar_t>(dx_exact);
    if constexpr (kWrite) {
      *dx_out = dx_stored;
    }
    const acc_t e = static_cast<acc_t>(dx_stored) - pivot_dx;
    s1_dx += e;
    s2_dx += e * e;
  }
}

// dx of one element as update() computes it, rounded to storage: the chunk pivot for dx.
template <Pass P, typename scalar_t, typename acc_t>
inline acc_t stored_grad_input(scalar_t dy_stored, scalar_t x_stored, acc_t mean, acc_t scale,
                               acc_t mean_dy, acc_t k) {
  const acc_t dy = static_cast<acc_t>(dy_stored);
  const acc_t dx = P == Pass::kEvalFused
                       ? grad_input_eval(dy, scale)
                       : grad_input_train(dy, static_cast<acc_t>(x_stored), mean, scale, mean_dy, k);
  return static_cast<acc_t>(static_cast<scalar_t>(dx));
}

// What one task contributes for one channel; merged across tasks in task order.
struct Partial {
  Moments<double> dy{0, 0, 0};
  Moments<double> dx{0, 0, 0};
  double sum_dy = 0;
  double sum_dy_xmu = 0;
};

// Pivot of a new chunk: the moments merged so far in this task, once there are some (then the
// pivot sits within a fraction of a standard deviation of the channel mean), else the chunk's
// first value.
template <typename acc_t>
inline acc_t chunk_pivot(const Moments<double>& so_far, acc_t first_value) {
  return so_far.n > 0 ? static_cast<acc_t>(so_far.mean) : first_value;
}

// Per-channel constants in acc_t, structure-of-arrays for the channels_last inner loop.
template <typename acc_t>
struct Coeffs {
  std::vector<acc_t> mean, scale, mean_dy, k;
  explicit Coeffs(int64_t C) : mean(C), scale(C), mean_dy(C), k(C) {}
};

template <typename acc_t, int L>
inline double lane_sum(const acc_t* v) {
  double s = 0;
  for (int l = 0; l < L; ++l) s += static_cast<double>(v[l]);
  return s;
}

// Folds a chunk's lane sums (n values, pivots p_dy / p_dx) into a partial.
template <Pass P, typename acc_t, int L>
inline void flush_chunk(Partial& out, int64_t n, acc_t p_dy, acc_t p_dx, const acc_t* s_dy,
                        const acc_t* s_xmu, const acc_t* s1_dy, const acc_t* s2_dy,
                        const acc_t* s1_dx, const acc_t* s2_dx) {
  const double dn = static_cast<double>(n);
  if constexpr (P != Pass::kGradInputTrain) {
    out.dy = merge_moments(out.dy, moments_from_shifted_sums<double>(dn, p_dy, lane_sum<acc_t, L>(s1_dy),
                                                                     lane_sum<acc_t, L>(s2_dy)));
    out.sum_dy += lane_sum<acc_t, L>(s_dy);
    out.sum_dy_xmu += lane_sum<acc_t, L>(s_xmu);
  }
  if constexpr (P != Pass::kReduceGradOutput) {
    out.dx = merge_moments(out.dx, moments_from_shifted_sums<double>(dn, p_dx, lane_sum<acc_t, L>(s1_dx),
                                                                     lane_sum<acc_t, L>(s2_dx)));
  }
}

// ---------------------------------------------------------------------------------------------
// NCHW: a task is (channel c, a range of rows n); each row is H*W contiguous values.
template <Pass P, bool kWrite, typename scalar_t>
void nchw_task(const BnBackwardProblem& p, const Coeffs<acc_type_t<scalar_t>>& cf, int64_t c,
               int64_t n_begin, int64_t n_end, Partial& out) {
  using acc_t = acc_type_t<scalar_t>;
  constexpr int L = 64 / sizeof(acc_t);  // one cache line of accumulators per sum
  const int64_t HW = p.HW;
  const int64_t row_stride = p.C * HW;
  const scalar_t* dy = static_cast<const scalar_t*>(p.grad_output) + c * HW;
  const scalar_t* x = static_cast<const scalar_t*>(p.input) + c * HW;
  scalar_t* dx = kWrite ? static_cast<scalar_t*>(p.grad_input) + c * HW : nullptr;
  const acc_t mean = cf.mean[c], scale = cf.scale[c], mean_dy = cf.mean_dy[c], k = cf.k[c];

  alignas(64) acc_t s_dy[L], s_xmu[L], s1_dy[L], s2_dy[L], s1_dx[L], s2_dx[L];
  int64_t filled = 0;
  acc_t p_dy = 0, p_dx = 0;
  for (int64_t n = n_begin; n < n_end; ++n) {
    const int64_t row = n * row_stride;
    for (int64_t i0 = 0; i0 < HW;) {
      if (filled == 0) {
        for (int l = 0; l < L; ++l) s_dy[l] = s_xmu[l] = s1_dy[l] = s2_dy[l] = s1_dx[l] = s2_dx[l] = 0;
        p_dy = chunk_pivot(out.dy, static_cast<acc_t>(dy[row + i0]));
        p_dx = chunk_pivot(out.dx, stored_grad_input<P>(dy[row + i0], x[row + i0], mean, scale, mean_dy, k));
      }
      const int64_t len = std::min(HW - i0, kChunk - filled);
      const scalar_t* dy_r = dy + row + i0;
      const scalar_t* x_r = x + row + i0;
      scalar_t* dx_r = kWrite ? dx + row + i0 : nullptr;
      int64_t i = 0;
      for (; i + L <= len; i += L) {
        for (int l = 0; l < L; ++l) {
          update<P, kWrite>(dy_r[i + l], x_r[i + l], kWrite ? dx_r + i + l : nullptr, mean, scale,
                            mean_dy, k, p_dy, p_dx, s_dy[l], s_xmu[l], s1_dy[l], s2_dy[l],
                            s1_dx[l], s2_dx[l]);
        }
      }
      for (int l = 0; i < len; ++i, ++l) {
        update<P, kWrite>(dy_r[i], x_r[i], kWrite ? dx_r + i : nullptr, mean, scale, mean_dy, k,
                          p_dy, p_dx, s_dy[l], s_xmu[l], s1_dy[l], s2_dy[l], s1_dx[l], s2_dx[l]);
      }
      filled += len;
      i0 += len;
      if (filled == kChunk) {
        flush_chunk<P, acc_t, L>(out, filled, p_dy, p_dx, s_dy, s_xmu, s1_dy, s2_dy, s1_dx, s2_dx);
        filled = 0;
      }
    }
  }
  if (filled > 0) {
    flush_chunk<P, acc_t, L>(out, filled, p_dy, p_dx, s_dy, s_xmu, s1_dy, s2_dy, s1_dx, s2_dx);
  }
}

// ---------------------------------------------------------------------------------------------
// channels_last: a task is (a range of rows r of the [N*H*W][C] matrix, a block of channels);
// lanes run along the channels of a row, so every lane belongs to one channel.
template <Pass P, bool kWrite, typename scalar_t>
void nhwc_task(const BnBackwardProblem& p, const Coeffs<acc_type_t<scalar_t>>& cf, int64_t r_begin,
               int64_t r_end, int64_t c_begin, int64_t c_end, Partial* out /* [C] */) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t C = p.C;
  const int64_t width = c_end - c_begin;
  const scalar_t* dy = static_cast<const scalar_t*>(p.grad_output) + c_begin;
  const scalar_t* x = static_cast<const scalar_t*>(p.input) + c_begin;
  scalar_t* dx = kWrite ? static_cast<scalar_t*>(p.grad_input) + c_begin : nullptr;
  const acc_t* __restrict__ mean = cf.mean.data() + c_begin;
  const acc_t* __restrict__ scale = cf.scale.data() + c_begin;
  const acc_t* __restrict__ mean_dy = cf.mean_dy.data() + c_begin;
  const acc_t* __restrict__ k = cf.k.data() + c_begin;

  // 8 arrays of `width` accumulators: 6 sums and the 2 pivots of the current chunk.
  std::vector<acc_t> buf(8 * width);
  acc_t* __restrict__ s_dy = buf.data();
  acc_t* __restrict__ s_xmu = s_dy + width;
  acc_t* __restrict__ s1_dy = s_xmu + width;
  acc_t* __restrict__ s2_dy = s1_dy + width;
  acc_t* __restrict__ s1_dx = s2_dy + width;
  acc_t* __restrict__ s2_dx = s1_dx + width;
  acc_t* __restrict__ p_dy = s2_dx + width;
  acc_t* __restrict__ p_dx = p_dy + width;
  // Each lane is one channel, so a chunk of kChunk values per channel is kChunk rows; fewer rows
  // keep the fold cost low relative to the row loop while bounding float error the same way.
  const int64_t rows_per_chunk = std::max<int64_t>(1, kChunk / 16);

  for (int64_t r0 = r_begin; r0 < r_end; r0 += rows_per_chunk) {
    const int64_t r1 = std::min(r_end, r0 + rows_per_chunk);
    std::fill(buf.begin(), buf.begin() + 6 * width, acc_t(0));
    for (int64_t j = 0; j < width; ++j) {
      const int64_t off = r0 * C + j;
      const Partial& so_far = out[c_begin + j];
      p_dy[j] = chunk_pivot(so_far.dy, static_cast<acc_t>(dy[off]));
      p_dx[j] = chunk_pivot(so_far.dx, stored_grad_input<P>(dy[off], x[off], mean[j], scale[j],
                                                              mean_dy[j], k[j]));
    }
    for (int64_t r = r0; r < r1; ++r) {
      const scalar_t* __restrict__ dy_r = dy + r * C;
      const scalar_t* __restrict__ x_r = x + r * C;
      scalar_t* __restrict__ dx_r = kWrite ? dx + r * C : nullptr;
      for (int64_t j = 0; j < width; ++j) {
        update<P, kWrite>(dy_r[j], x_r[j], kWrite ? dx_r + j : nullptr, mean[j], scale[j],
                          mean_dy[j], k[j], p_dy[j], p_dx[j], s_dy[j], s_xmu[j], s1_dy[j],
                          s2_dy[j], s1_dx[j], s2_dx[j]);
      }
    }
    const int64_t n = r1 - r0;
    for (int64_t j = 0; j < width; ++j) {
      flush_chunk<P, acc_t, 1>(out[c_begin + j], n, p_dy[j], p_dx[j], s_dy + j, s_xmu + j,
                               s1_dy + j, s2_dy + j, s1_dx + j, s2_dx + j);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Task layout: depends on the shape only (never on the thread count), see the file comment.
struct Tasks {
  int64_t parts;           // row ranges: of n (NCHW) or of the N*H*W rows (channels_last)
  int64_t rows_per_part;
  int64_t channel_blocks;  // NCHW: C (one channel per block); channels_last: ceil(C / block)
  int64_t count() const { return parts * channel_blocks; }
};

inline Tasks make_tasks(const BnBackwardProblem& p) {
  Tasks t;
  const int64_t rows = p.channels_last ? p.N * p.HW : p.N;
  const int64_t values_per_row = p.channels_last ? std::min<int64_t>(p.C, kChannelBlock) : p.HW;
  t.rows_per_part = std::max<int64_t>(1, kTaskValues / std::max<int64_t>(1, values_per_row));
  t.parts = (rows + t.rows_per_part - 1) / t.rows_per_part;
  t.channel_blocks = p.channels_last ? (p.C + kChannelBlock - 1) / kChannelBlock : p.C;
  return t;
}

template <Pass P, bool kWrite, typename scalar_t>
void run_pass(const BnBackwardProblem& p, const Tasks& t, const Coeffs<acc_type_t<scalar_t>>& cf,
              std::vector<Partial>& partials /* [parts][C] */, ParallelFor parallel_for) {
  const int64_t rows = p.channels_last ? p.N * p.HW : p.N;
  parallel_for(t.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t part = task / t.channel_blocks;
      const int64_t block = task % t.channel_blocks;
      const int64_t r0 = part * t.rows_per_part;
      const int64_t r1 = std::min(rows, r0 + t.rows_per_part);
      Partial* out = partials.data() + part * p.C;
      if (p.channels_last) {
        const int64_t c0 = block * kChannelBlock;
        nhwc_task<P, kWrite, scalar_t>(p, cf, r0, r1, c0, std::min(p.C, c0 + kChannelBlock), out);
      } else {
        nchw_task<P, kWrite, scalar_t>(p, cf, block, r0, r1, out[block]);
      }
    }
  });
}

template <Pass P, typename scalar_t>
void run_pass_maybe_write(const BnBackwardProblem& p, const Tasks& t,
                          const Coeffs<acc_type_t<scalar_t>>& cf, std::vector<Partial>& partials,
                          ParallelFor parallel_for) {
  if (p.grad_input != nullptr) {
    run_pass<P, true, scalar_t>(p, t, cf, partials, parallel_for);
  } else {
    run_pass<P, false, scalar_t>(p, t, cf, partials, parallel_for);
  }
}

// Merges the partials of channel c over all parts, in part order.
inline Partial merge_channel(const std::vector<Partial>& partials, int64_t parts, int64_t C,
                             int64_t c) {
  Partial total;
  for (int64_t part = 0; part < parts; ++part) {
    const Partial& q = partials[part * C + c];
    total.dy = merge_moments(total.dy, q.dy);
    total.dx = merge_moments(total.dx, q.dx);
    total.sum_dy += q.sum_dy;
    total.sum_dy_xmu += q.sum_dy_xmu;
  }
  return total;
}

template <typename scalar_t>
void bn_backward_stats_typed(const BnBackwardProblem& p, ParallelFor parallel_for) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t C = p.C;
  const acc_t* mean = static_cast<const acc_t*>(p.mean);
  const acc_t* invstd = static_cast<const acc_t*>(p.invstd);
  const acc_t* weight = static_cast<const acc_t*>(p.weight);
  const double m = static_cast<double>(p.N) * static_cast<double>(p.HW);

  const Tasks t = make_tasks(p);
  std::vector<Partial> partials(t.parts * C);
  std::vector<double> sum_dy(C), sum_dy_xmu(C);
  Coeffs<acc_t> cf(C);

  if (p.train) {
    for (int64_t c = 0; c < C; ++c) cf.mean[c] = mean[c];
    run_pass_maybe_write<Pass::kReduceGradOutput, scalar_t>(p, t, cf, partials, parallel_for);
    for (int64_t c = 0; c < C; ++c) {
      const Partial total = merge_channel(partials, t.parts, C, c);
      sum_dy[c] = total.sum_dy;
      sum_dy_xmu[c] = total.sum_dy_xmu;
      // Constants in double, then rounded once to acc_t.
      const GradInputCoeffs<double> g =
          grad_input_coeffs<double>(true, m, sum_dy[c], sum_dy_xmu[c], mean[c], invstd[c],
                                    weight ? weight[c] : 1.0);
      cf.scale[c] = static_cast<acc_t>(g.scale);
      cf.mean_dy[c] = static_cast<acc_t>(g.mean_dy);
      cf.k[c] = static_cast<acc_t>(g.k);
      // Keep the dy moments; the second pass only adds dx moments to fresh partials.
      store_stats(p.stats, kGradOutput, C, c, total.dy);
    }
    std::fill(partials.begin(), partials.end(), Partial{});
    run_pass_maybe_write<Pass::kGradInputTrain, scalar_t>(p, t, cf, partials, parallel_for);
    for (int64_t c = 0; c < C; ++c) {
      const Partial total = merge_channel(partials, t.parts, C, c);
      store_stats(p.stats, kGradInput, C, c, total.dx);
    }
  } else {
    for (int64_t c = 0; c < C; ++c) {
      const GradInputCoeffs<double> g = grad_input_coeffs<double>(
          false, m, 0.0, 0.0, mean[c], invstd[c], weight ? weight[c] : 1.0);
      cf.mean[c] = static_cast<acc_t>(g.mean);
      cf.scale[c] = static_cast<acc_t>(g.scale);
      cf.mean_dy[c] = static_cast<acc_t>(g.mean_dy);
      cf.k[c] = static_cast<acc_t>(g.k);
    }
    run_pass_maybe_write<Pass::kEvalFused, scalar_t>(p, t, cf, partials, parallel_for);
    for (int64_t c = 0; c < C; ++c) {
      const Partial total = merge_channel(partials, t.parts, C, c);
      sum_dy[c] = total.sum_dy;
      sum_dy_xmu[c] = total.sum_dy_xmu;
      store_stats(p.stats, kGradOutput, C, c, total.dy);
      store_stats(p.stats, kGradInput, C, c, total.dx);
    }
  }
  acc_t* grad_weight = static_cast<acc_t*>(p.grad_weight);
  acc_t* grad_bias = static_cast<acc_t*>(p.grad_bias);
  for (int64_t c = 0; c < C; ++c) {
    grad_bias[c] = static_cast<acc_t>(sum_dy[c]);
    grad_weight[c] = static_cast<acc_t>(sum_dy_xmu[c] * static_cast<double>(invstd[c]));
  }
}

inline void bn_backward_stats(const BnBackwardProblem& p, ParallelFor parallel_for) {
  switch (p.dtype) {
    case ScalarKind::Float:
      return bn_backward_stats_typed<float>(p, parallel_for);
    case ScalarKind::Double:
      return bn_backward_stats_typed<double>(p, parallel_for);
    case ScalarKind::Half:
      return bn_backward_stats_typed<c10::Half>(p, parallel_for);
    case ScalarKind::BFloat16:
      return bn_backward_stats_typed<c10::BFloat16>(p, parallel_for);
  }
}

}  // namespace GS_CPU_ISA
}  // namespace cpu
}  // namespace gradstats
