// CPU kernels of bn_backward_stats. Included once per instruction set by isa_builds.cpp, each time
// inside its own namespace GS_CPU_ISA and compiled for that instruction set (so: no include
// guard); ops_cpu.cpp picks one at run time. The arithmetic is bn_backward_passes.h, shared with
// the CUDA kernels; this file decides how the CPU visits values. Inner loops use the 64-byte vectors of
// vec.h, so accumulators live in registers whatever the vector width of the target.
//
// Passes over memory (m = N*H*W values per channel):
//   train: pass 1 reads dy, x   -> sum dy, sum dy*(x - mean), moments of dy
//          pass 2 reads dy, x   -> writes dx, moments of dx
//   eval:  one pass reads dy, x -> sum dy, sum dy*(x - mean), moments of dy, writes dx, moments of dx
// These are the passes PyTorch's own backward makes (eval is one fewer); the statistics ride on them.
//
// Accumulation: within a chunk of at most kChunk values of one channel, lanes accumulate sums
// shifted by one pivot (see chunk_pivot) in acc_t (float; double for double storage). Each chunk
// becomes (n, mean, m2) and is Chan-merged in double. sum(dy) and sum(dy * (x - mean)), which the
// gradients use, are plain sums like PyTorch's: a pivot off the mean makes shifted partial sums
// drift, which costs the moments nothing but would cost grad_bias digits.
// Rows are split into parts whose boundaries depend only on the shape; each (part, channel) is
// computed the same way whichever thread runs it, and parts are merged in order, so results are
// bitwise identical run to run and for any number of threads.
//
// Per-sample sums (p.per_sample, template flag kPerSample; the passes that read dy for the
// gradients only): sum dy and sum dy*(x - mean) of each (sample, channel) cost no extra work per
// value. The chunk's own lanes of these two sums start over at each run of one sample's values
// (NCHW: a segment of a row; channels_last: a row block, cut at sample boundaries) and so hold
// that run's sums at its end: they go to the sample (in double) and to the chunk (in double for
// NCHW, in acc_t onto the earlier blocks' sums for channels_last). So grad_bias and
// grad_weight (and, through them, train-mode dx and its statistics) round a little differently
// from a call without per-sample sums, no worse; the statistics of dy are the same computation.
// Samples split between parts are merged in part order, and each per-sample value is rounded to
// acc_t once when written (the weight term times invstd in double, as grad_weight).

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "../bn_backward_passes.h"

#ifndef GS_CPU_ISA
#error "define GS_CPU_ISA (the namespace of this instruction-set build) before including"
#endif

namespace gradstats {
namespace cpu {
namespace GS_CPU_ISA {

#include "vec.h"

// Values of one channel accumulated around one pivot before they are folded into double
// moments: bounds the float rounding of each lane's sums (kChunk / lanes terms each).
constexpr int64_t kChunk = 8192;
// A dx at least this large is written with streaming (non-temporal) stores: it cannot stay in
// cache for the next layer anyway, and a streaming store saves reading each line before
// writing it (a sixth of the memory traffic of the train-mode backward).
constexpr int64_t kStreamBytes = int64_t(16) << 20;

template <typename scalar_t>
inline bool stream_output(const BnBackwardProblem& p) {
  return p.grad_input != nullptr && static_cast<int64_t>(sizeof(scalar_t)) * p.N * p.C * p.HW >= kStreamBytes;
}

// Whether a vector store at p may stream (streaming stores need their own size of alignment).
template <typename scalar_t, int L>
inline bool stream_aligned(const scalar_t* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(scalar_t) * L) == 0;
}

// channels_last: rows per chunk. Each lane is one channel there, so a chunk's sums have this many
// terms; the fold that ends a chunk costs a few double divisions per channel, so chunks must be
// long enough to amortise it.
constexpr int64_t kRowsPerChunk = 1024;
// channels_last: rows per part (task) at most; see make_tasks.
constexpr int64_t kMaxRowsPerPart = 2048;
// A task covers about this many values, so small channels are grouped and large ones split.
constexpr int64_t kTaskValues = 1 << 16;
// channels_last: channels per task: eight strips (see nhwc_task), so that a task's rows are long
// enough for the prefetcher and its sums still fit in cache (history: bench/RESULTS.md).
constexpr int64_t kChannelBlock = 512;
// channels_last: how far ahead (in row blocks) each strip prefetches its own columns: one block
// (~32 KB per tensor) arrives in time without evicting the block being read.
constexpr int64_t kPrefetchBlocks = 1;

template <typename scalar_t>
using acc_type_t = typename Io<scalar_t>::acc_t;

// dx as stored in scalar_t (rounded), in the accumulation type: statistics describe the
// gradient autograd receives.
template <typename scalar_t>
GS_VEC_INLINE typename Io<scalar_t>::vec stored_value(typename Io<scalar_t>::vec v) {
  return Io<scalar_t>::round(v);
}
template <typename scalar_t>
GS_VEC_INLINE acc_type_t<scalar_t> stored_value(acc_type_t<scalar_t> v) {
  return Io<scalar_t>::round1(v);
}

// The per-element work of pass P (bn_backward_passes.h) for one value or one vector. Returns dx
// as stored (in the passes that compute dx).
template <Pass P, typename scalar_t, typename V>
GS_VEC_INLINE V update(V dy, V x, V mean, V scale, V mean_dy, V k, V pivot_dy, V pivot_dx, ChunkSums<V>& s) {
  accumulate_grad_output<P>(dy, x, mean, pivot_dy, s);
  if constexpr (!computes_grad_input(P)) {
    return V{};
  } else {
    const V dx = stored_value<scalar_t>(grad_input_value<P>(dy, x, mean, scale, mean_dy, k));
    accumulate_grad_input<P>(dx, pivot_dx, s);
    return dx;
  }
}

// dx of the element at dy, x as update() stores it (a chunk's pivot, or the re-read of a chunk).
template <Pass P, typename scalar_t, typename acc_t>
inline acc_t grad_input_at(const scalar_t* dy, const scalar_t* x, acc_t mean, acc_t scale, acc_t mean_dy,
                           acc_t k) {
  constexpr Pass kDxPass = P == Pass::kEvalFused ? P : Pass::kGradInputTrain;
  return stored_value<scalar_t>(
      grad_input_value<kDxPass>(Io<scalar_t>::load1(dy), Io<scalar_t>::load1(x), mean, scale, mean_dy, k));
}

// Pivot of a new chunk (see PivotSamples): the mean of the chunks of this (part, channel) merged
// so far, else the mean of the chunk's first few finite values, value_at(0 .. available-1).
template <typename acc_t, typename ValueAt>
inline acc_t chunk_pivot(const Moments<double>& so_far, int64_t available, ValueAt value_at) {
  PivotSamples samples;
  if (so_far.n == 0) {
    for (int64_t i = 0; i < std::min<int64_t>(available, kPivotSamples); ++i) samples.add(value_at(i));
  }
  return samples.pivot<acc_t>(so_far);
}

// Folds the totals of a chunk of n values into a partial (shared arithmetic: add_chunk, fold_run);
// recount(dx, pivot) re-reads the chunk, which is still in cache, when its float sums are not
// finite.
template <Pass P, typename Recount>
inline void flush_chunk(Partial& out, int64_t n, double p_dy, double p_dx, const double* totals,
                        Recount&& recount) {
  RunSums run;
  add_chunk<P>(run, static_cast<double>(n), p_dy, p_dx, totals, recount);
  fold_run(out, run, p_dy, p_dx);
}

template <typename Vec, int L>
inline double lane_total(const Vec& v) {
  double s = 0;
  for (int l = 0; l < L; ++l) s += static_cast<double>(v[l]);
  return s;
}

// sum dy and sum dy * (x - mean): with per-sample sums, they start over at each segment (NCHW) or
// row block (channels_last) of one sample, whose sums they then are, and carry on from there.
constexpr bool is_gradient_sum(int q) { return q == kSumDy || q == kSumDyXmu; }

// The lanes of v added in double as a tree (lane l + lane l + L/2, ...): the compiler turns it into
// a few vector additions, where lane_total is L dependent ones. For the per-sample sums of NCHW
// segments, which end every row.
template <typename Vec, int L>
inline double lane_tree_total(const Vec& v) {
  double d[L];
  for (int l = 0; l < L; ++l) d[l] = static_cast<double>(v[l]);
  for (int w = L / 2; w >= 1; w /= 2) {
    for (int l = 0; l < w; ++l) d[l] += d[l + w];
  }
  return d[0];
}

// Per-channel constants in acc_t, structure-of-arrays for the channels_last inner loop.
template <typename acc_t>
struct Coeffs {
  std::vector<acc_t> mean, scale, mean_dy, k;
  explicit Coeffs(int64_t C) : mean(C), scale(C), mean_dy(C), k(C) {}
};

// Writes the per-sample sums of sample n, channel c (totals in double): rounded once.
template <typename acc_t>
inline void store_sample(const BnBackwardProblem& p, int64_t n, int64_t c, double sum_dy, double sum_dy_xmu) {
  acc_t* out = static_cast<acc_t*>(p.per_sample);
  const double invstd = static_cast<const acc_t*>(p.invstd)[c];
  out[n * p.C + c] = static_cast<acc_t>(sum_dy);
  out[(p.N + n) * p.C + c] = static_cast<acc_t>(sum_dy_xmu * invstd);
}

// ---------------------------------------------------------------------------------------------
// NCHW: a task is (channel c, a range of rows n); each row is H*W contiguous values. A row
// (sample n of channel c) is never split between tasks, so its per-sample sums are complete when
// the task reaches its end; a chunk may end or start inside it, so the row's sums are
// accumulators of their own, added up in double over the row's segments.
template <Pass P, bool kWrite, bool kPerSample, typename scalar_t>
void nchw_task(const BnBackwardProblem& p, const Coeffs<acc_type_t<scalar_t>>& cf, int64_t c, int64_t n_begin,
               int64_t n_end, Partial& out) {
  // Only the passes that compute dx write it.
  constexpr bool kStore = kWrite && (P == Pass::kGradInputTrain || P == Pass::kEvalFused);
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using vec = typename IO::vec;
  constexpr int L = VecOf<acc_t>::kLanes;
  const int64_t HW = p.HW;
  const int64_t row_stride = p.C * HW;
  const scalar_t* dy = static_cast<const scalar_t*>(p.grad_output) + c * HW;
  const scalar_t* x = static_cast<const scalar_t*>(p.input) + c * HW;
  scalar_t* dx = kStore ? static_cast<scalar_t*>(p.grad_input) + c * HW : nullptr;
  const acc_t mean = cf.mean[c], scale = cf.scale[c], mean_dy = cf.mean_dy[c], k = cf.k[c];
  const vec mean_v = vec{} + mean, scale_v = vec{} + scale, mean_dy_v = vec{} + mean_dy, k_v = vec{} + k;
  const bool stream = kStore && stream_output<scalar_t>(p);
  // kPerSample: the current row's sums over its segments so far.
  [[maybe_unused]] double row_dy = 0, row_dy_xmu = 0;

  // One iteration of the outer loop is one chunk: its sums are locals of the loop body, so they
  // stay in registers across the rows of the chunk.
  int64_t n = n_begin, i0 = 0;
  while (n < n_end) {
    const int64_t first = n * row_stride + i0;
    const int64_t chunk_n = n, chunk_i0 = i0;
    const int64_t samples = HW - i0;  // the rest of the first row
    // Only the pivots of the statistics this pass computes (an unused one feeds zero sums).
    constexpr bool kPivotDy = pass_uses(P, kS1Dy), kPivotDx = pass_uses(P, kS1Dx);
    const acc_t p_dy =
        !kPivotDy ? acc_t(0)
                  : chunk_pivot<acc_t>(out.dy, samples, [&](int64_t i) { return IO::load1(dy + first + i); });
    const acc_t p_dx = !kPivotDx ? acc_t(0) : chunk_pivot<acc_t>(out.dx, samples, [&](int64_t i) {
      return grad_input_at<P>(dy + first + i, x + first + i, mean, scale, mean_dy, k);
    });
    const vec p_dy_v = vec{} + p_dy, p_dx_v = vec{} + p_dx;
    ChunkSums<vec> lanes{};   // the vector body
    ChunkSums<acc_t> tail{};  // the remainder of segments whose length is not a multiple of L
    int64_t filled = 0;
    // kPerSample: the chunk's sum dy and sum dy * (x - mean), over its segments.
    [[maybe_unused]] double chunk_dy = 0, chunk_dy_xmu = 0;
    while (filled < kChunk && n < n_end) {
      const int64_t len = std::min(HW - i0, kChunk - filled);
      const int64_t at = n * row_stride + i0;
      const scalar_t* __restrict__ dy_r = dy + at;
      const scalar_t* __restrict__ x_r = x + at;
      scalar_t* __restrict__ dx_r = kStore ? dx + at : nullptr;
      if constexpr (kPerSample) {  // the gradient sums start over: they become the segment's
        lanes.v[kSumDy] = lanes.v[kSumDyXmu] = vec{};
        tail.v[kSumDy] = tail.v[kSumDyXmu] = acc_t(0);
      }
      int64_t i = 0;
      if (stream) {
        // Streaming stores need aligned vectors: the segment's first values up to the next
        // aligned address go through the scalar path.
        constexpr int64_t kAlign = sizeof(scalar_t) * L;
        const int64_t misalign = static_cast<int64_t>(reinterpret_cast<uintptr_t>(dx_r) % kAlign);
        const int64_t head =
            misalign == 0 || misalign % sizeof(scalar_t) != 0
                ? 0
                : std::min(len, (kAlign - misalign) / static_cast<int64_t>(sizeof(scalar_t)));
        for (; i < head; ++i) {
          const acc_t v = update<P, scalar_t>(IO::load1(dy_r + i), IO::load1(x_r + i), mean, scale, mean_dy,
                                              k, p_dy, p_dx, tail);
          IO::store1(dx_r + i, v);
        }
      }
      const bool stream_here = stream && stream_aligned<scalar_t, L>(dx_r + i);
      for (; i + L <= len; i += L) {
        const vec v = update<P, scalar_t>(IO::load(dy_r + i), IO::load(x_r + i), mean_v, scale_v, mean_dy_v,
                                          k_v, p_dy_v, p_dx_v, lanes);
        if constexpr (kStore) {
          if (stream_here) {
            IO::store_stream(dx_r + i, v);
          } else {
            IO::store(dx_r + i, v);
          }
        }
      }
      for (; i < len; ++i) {
        const acc_t v = update<P, scalar_t>(IO::load1(dy_r + i), IO::load1(x_r + i), mean, scale, mean_dy, k,
                                            p_dy, p_dx, tail);
        if constexpr (kStore) IO::store1(dx_r + i, v);
      }
      if constexpr (kPerSample) {
        const double seg_dy = lane_tree_total<vec, L>(lanes.v[kSumDy]) + static_cast<double>(tail.v[kSumDy]);
        const double seg_dy_xmu =
            lane_tree_total<vec, L>(lanes.v[kSumDyXmu]) + static_cast<double>(tail.v[kSumDyXmu]);
        chunk_dy += seg_dy;
        chunk_dy_xmu += seg_dy_xmu;
        row_dy += seg_dy;
        row_dy_xmu += seg_dy_xmu;
        if (i0 + len == HW) {
          store_sample<acc_t>(p, n, c, row_dy, row_dy_xmu);
          row_dy = row_dy_xmu = 0;
        }
      }
      filled += len;
      i0 += len;
      if (i0 == HW) {
        i0 = 0;
        ++n;
      }
    }
    double totals[kNumSums];
    for (int q = 0; q < kNumSums; ++q) {
      totals[q] = lane_total<vec, L>(lanes.v[q]) + static_cast<double>(tail.v[q]);
    }
    if constexpr (kPerSample) {
      totals[kSumDy] = chunk_dy;
      totals[kSumDyXmu] = chunk_dy_xmu;
    }
    auto recount = [&](bool want_dx, double pivot) {
      ShiftedSums finite;
      int64_t rn = chunk_n, ri = chunk_i0;
      for (int64_t left = filled; left > 0;) {
        const int64_t len = std::min(HW - ri, left);
        for (int64_t at = rn * row_stride + ri, end = at + len; at < end; ++at) {
          finite.add(
              want_dx ? grad_input_at<P>(dy + at, x + at, mean, scale, mean_dy, k) : IO::load1(dy + at),
              pivot);
        }
        left -= len;
        ri += len;
        if (ri == HW) {
          ri = 0;
          ++rn;
        }
      }
      return finite;
    };
    flush_chunk<P>(out, filled, p_dy, p_dx, totals, recount);
  }
  if (stream) stream_fence();
}

// ---------------------------------------------------------------------------------------------
// channels_last per-sample sums of one task (rows r_begin .. r_end - 1, channels c_begin + j for
// j < width). Sample n is rows n*HW .. (n+1)*HW - 1, and parts are cut by row count: a sample may
// start before the task's first row or end after its last. Its segments in this task add up in
// double (`open`, per channel); when its last one here is added, a sample wholly inside the
// part is written, and one that is not goes to the part's staging slots (slot 0: the sample of
// the part's first row, slot 1: that of its last row), which merge_staged_samples adds up in
// part order after the pass. Each channel's state is touched by the one strip that owns it.
template <typename acc_t>
class SampleSink {
 public:
  // stage: this part's slots, [2 slots][2 sums][C].
  SampleSink(const BnBackwardProblem& p, int64_t r_begin, int64_t r_end, int64_t c_begin, int64_t width,
             double* stage)
      : p_(p),
        r_begin_(r_begin),
        r_end_(r_end),
        c_begin_(c_begin),
        width_(width),
        stage_(stage),
        open_(2 * width) {}

  // Adds the sums of rows seg_begin .. seg_end - 1 (all of sample n) for the channels
  // c_begin + j0 + i, i < count: dy[i] and dy_xmu[i].
  void add(int64_t n, int64_t seg_begin, int64_t seg_end, int64_t j0, int64_t count, const acc_t* dy,
           const acc_t* dy_xmu) {
    const int64_t s0 = n * p_.HW, s1 = s0 + p_.HW;
    const bool first = seg_begin == std::max(s0, r_begin_);  // the sample's first segment here
    const bool last = seg_end == std::min(s1, r_end_);       // and its last one
    double* open_dy = open_.data() + j0;
    double* open_dy_xmu = open_dy + width_;
    if (!last) {
      for (int64_t i = 0; i < count; ++i) {
        open_dy[i] = first ? static_cast<double>(dy[i]) : open_dy[i] + static_cast<double>(dy[i]);
        open_dy_xmu[i] =
            first ? static_cast<double>(dy_xmu[i]) : open_dy_xmu[i] + static_cast<double>(dy_xmu[i]);
      }
      return;
    }
    const int64_t c0 = c_begin_ + j0;
    if (s0 >= r_begin_ && s1 <= r_end_) {
      for (int64_t i = 0; i < count; ++i) {
        const double sum_dy = first ? static_cast<double>(dy[i]) : open_dy[i] + static_cast<double>(dy[i]);
        const double sum_dy_xmu =
            first ? static_cast<double>(dy_xmu[i]) : open_dy_xmu[i] + static_cast<double>(dy_xmu[i]);
        store_sample<acc_t>(p_, n, c0 + i, sum_dy, sum_dy_xmu);
      }
      return;
    }
    const int64_t slot = n == r_begin_ / p_.HW ? 0 : 1;
    double* stage_dy = stage_ + 2 * slot * p_.C + c0;
    double* stage_dy_xmu = stage_dy + p_.C;
    for (int64_t i = 0; i < count; ++i) {
      stage_dy[i] = first ? static_cast<double>(dy[i]) : open_dy[i] + static_cast<double>(dy[i]);
      stage_dy_xmu[i] =
          first ? static_cast<double>(dy_xmu[i]) : open_dy_xmu[i] + static_cast<double>(dy_xmu[i]);
    }
  }

 private:
  const BnBackwardProblem& p_;
  int64_t r_begin_, r_end_, c_begin_, width_;
  double* stage_;
  std::vector<double> open_;  // [2][width]
};

// The sink of a pass without per-sample sums: nothing.
struct NoSampleSink {
  template <typename... Args>
  explicit NoSampleSink(Args&&...) {}
};

// ---------------------------------------------------------------------------------------------
// channels_last: a task is (a range of rows r of the [N*H*W][C] matrix, a block of channels);
// lanes run along the channels of a row, so each lane belongs to one channel and the sums live
// in per-channel arrays (touched once per row, so they stay in L1 without a dependency chain).
template <Pass P, bool kWrite, bool kPerSample, typename scalar_t>
void nhwc_task(const BnBackwardProblem& p, const Coeffs<acc_type_t<scalar_t>>& cf, int64_t r_begin,
               int64_t r_end, int64_t c_begin, int64_t c_end, Partial* out /* [C] */, double* stage) {
  // Only the passes that compute dx write it.
  constexpr bool kStore = kWrite && (P == Pass::kGradInputTrain || P == Pass::kEvalFused);
  using IO = Io<scalar_t>;
  using acc_t = typename IO::acc_t;
  using AccIO = Io<acc_t>;
  using vec = typename IO::vec;
  constexpr int L = VecOf<acc_t>::kLanes;
  const int64_t C = p.C;
  const int64_t width = c_end - c_begin;
  const scalar_t* dy = static_cast<const scalar_t*>(p.grad_output) + c_begin;
  const scalar_t* x = static_cast<const scalar_t*>(p.input) + c_begin;
  scalar_t* dx = kStore ? static_cast<scalar_t*>(p.grad_input) + c_begin : nullptr;
  const acc_t* mean = cf.mean.data() + c_begin;
  const acc_t* scale = cf.scale.data() + c_begin;
  const acc_t* mean_dy = cf.mean_dy.data() + c_begin;
  const acc_t* k = cf.k.data() + c_begin;

  const bool stream = kStore && stream_output<scalar_t>(p);
  // A chunk's sums per channel, [kNumSums][width], then its pivots, [2][width].
  std::vector<acc_t> buf((kNumSums + 2) * width);
  acc_t* sums[kNumSums];
  for (int q = 0; q < kNumSums; ++q) sums[q] = buf.data() + q * width;
  acc_t* p_dy = buf.data() + kNumSums * width;
  acc_t* p_dx = p_dy + width;
  std::vector<PivotSamples> samples(2 * width);  // dy's, then dx's
  [[maybe_unused]] std::conditional_t<kPerSample, SampleSink<acc_t>, NoSampleSink> sink(
      p, r_begin, r_end, c_begin, width, stage);

  for (int64_t r0 = r_begin, r1 = r_begin; r0 < r_end; r0 = r1) {
    r1 = std::min(r_end, r0 + kRowsPerChunk);
    // Pivots of the passes' statistics (see chunk_pivot), sampled row by row: memory order.
    constexpr bool kPivotDy = pass_uses(P, kS1Dy), kPivotDx = pass_uses(P, kS1Dx);
    std::fill(samples.begin(), samples.end(), PivotSamples{});
    for (int64_t i = 0; i < std::min<int64_t>(r1 - r0, kPivotSamples); ++i) {
      const int64_t row = (r0 + i) * C;
      for (int64_t j = 0; j < width; ++j) {
        if (kPivotDy) samples[j].add(IO::load1(dy + row + j));
        if (kPivotDx) {
          samples[width + j].add(
              grad_input_at<P>(dy + row + j, x + row + j, mean[j], scale[j], mean_dy[j], k[j]));
        }
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      p_dy[j] = samples[j].pivot<acc_t>(out[c_begin + j].dy);
      p_dx[j] = samples[width + j].pivot<acc_t>(out[c_begin + j].dx);
    }
    // Strips of K vectors of channels, each over a block of rows: the strip's sums stay in
    // registers over the block, and memory sees mostly the data (per-row sums in arrays would
    // cost a load and a store per sum and vector, and stores are what limits this loop). Row
    // blocks of ~32 KB per tensor stay in cache while the strips that share their cache lines
    // pass over them.
    const int64_t row_bytes = width * static_cast<int64_t>(sizeof(scalar_t));
    // A task over every channel is followed (on its thread) by the next rows' task.
    const int64_t prefetch_end = width == C ? p.N * p.HW : r_end;
    const int64_t block_rows = std::max<int64_t>(8, (32 * 1024) / row_bytes);
    auto strip = [&](auto vectors, int64_t j0, int64_t rb0, int64_t rb1) {
      constexpr int K = decltype(vectors)::value;
      const bool stream_here = stream && stream_aligned<scalar_t, L>(dx + j0) &&
                               (C * sizeof(scalar_t)) % (sizeof(scalar_t) * L) == 0;
      ChunkSums<vec> s[K] = {};
      vec mean_v[K], scale_v[K], mean_dy_v[K], k_v[K], p_dy_v[K], p_dx_v[K];
      for (int b = 0; b < K; ++b) {
        const int64_t j = j0 + b * L;
        mean_v[b] = AccIO::load(mean + j);
        scale_v[b] = AccIO::load(scale + j);
        mean_dy_v[b] = AccIO::load(mean_dy + j);
        k_v[b] = AccIO::load(k + j);
        p_dy_v[b] = AccIO::load(p_dy + j);
        p_dx_v[b] = AccIO::load(p_dx + j);
        if (rb0 != r0) {  // carry on from the chunk's earlier row blocks
          for (int q = 0; q < kNumSums; ++q) {
            if (pass_uses(P, q) && !(kPerSample && is_gradient_sum(q))) s[b].v[q] = AccIO::load(sums[q] + j);
          }
        }
      }
      // The strips read a row block column by column, an order the hardware prefetcher does
      // not follow from DRAM: each strip asks for its own columns of the row one block ahead,
      // a few lines per row processed, spread out rather than in one burst per row.
      const int64_t ahead_rows = kPrefetchBlocks * block_rows;
      for (int64_t r = rb0; r < rb1; ++r) {
        if (r + ahead_rows < prefetch_end) {
          const int64_t ahead = (r + ahead_rows) * C + j0;
          for (int64_t b = 0; b < static_cast<int64_t>(K * L * sizeof(scalar_t)); b += 64) {
            __builtin_prefetch(reinterpret_cast<const char*>(dy + ahead) + b, 0, 1);
            __builtin_prefetch(reinterpret_cast<const char*>(x + ahead) + b, 0, 1);
            // A streamed dx bypasses the caches: fetching its lines would only add a read.
            if (kStore && !stream) __builtin_prefetch(reinterpret_cast<const char*>(dx + ahead) + b, 1, 1);
          }
        }
        for (int b = 0; b < K; ++b) {
          const int64_t off = r * C + j0 + b * L;
          const vec v = update<P, scalar_t>(IO::load(dy + off), IO::load(x + off), mean_v[b], scale_v[b],
                                            mean_dy_v[b], k_v[b], p_dy_v[b], p_dx_v[b], s[b]);
          if constexpr (kStore) {
            if (stream_here) {
              IO::store_stream(dx + off, v);
            } else {
              IO::store(dx + off, v);
            }
          }
        }
      }
      if constexpr (kPerSample) {  // the block's gradient sums are one sample's; then the chunk's
        acc_t seg_dy[K * L], seg_dy_xmu[K * L];
        for (int b = 0; b < K; ++b) {
          AccIO::store(seg_dy + b * L, s[b].v[kSumDy]);
          AccIO::store(seg_dy_xmu + b * L, s[b].v[kSumDyXmu]);
          if (rb0 != r0) {
            s[b].v[kSumDy] += AccIO::load(sums[kSumDy] + j0 + b * L);
            s[b].v[kSumDyXmu] += AccIO::load(sums[kSumDyXmu] + j0 + b * L);
          }
        }
        sink.add(rb0 / p.HW, rb0, rb1, j0, K * L, seg_dy, seg_dy_xmu);
      }
      for (int b = 0; b < K; ++b) {
        for (int q = 0; q < kNumSums; ++q) {
          if (pass_uses(P, q)) AccIO::store(sums[q] + j0 + b * L, s[b].v[q]);
        }
      }
    };
    // Eval keeps six sums per vector: two vectors per strip stay within the registers.
    constexpr int kStrip = P == Pass::kEvalFused ? 2 : 4;
    auto row_block = [&](int64_t rb0, int64_t rb1) {
      int64_t j = 0;
      for (; j + kStrip * L <= width; j += kStrip * L) {
        strip(std::integral_constant<int, kStrip>{}, j, rb0, rb1);
      }
      for (; j + L <= width; j += L) strip(std::integral_constant<int, 1>{}, j, rb0, rb1);
      for (; j < width; ++j) {  // channels past the last whole vector
        ChunkSums<acc_t> s{};
        if (rb0 != r0) {
          for (int q = 0; q < kNumSums; ++q) {
            if (!(kPerSample && is_gradient_sum(q))) s.v[q] = sums[q][j];
          }
        }
        for (int64_t r = rb0; r < rb1; ++r) {
          const int64_t off = r * C + j;
          const acc_t v = update<P, scalar_t>(IO::load1(dy + off), IO::load1(x + off), mean[j], scale[j],
                                              mean_dy[j], k[j], p_dy[j], p_dx[j], s);
          if constexpr (kStore) IO::store1(dx + off, v);
        }
        if constexpr (kPerSample) {  // as in the strips
          sink.add(rb0 / p.HW, rb0, rb1, j, 1, &s.v[kSumDy], &s.v[kSumDyXmu]);
          if (rb0 != r0) {
            s.v[kSumDy] += sums[kSumDy][j];
            s.v[kSumDyXmu] += sums[kSumDyXmu][j];
          }
        }
        for (int q = 0; q < kNumSums; ++q) sums[q][j] = s.v[q];
      }
    };
    if constexpr (!kPerSample) {
      for (int64_t rb0 = r0; rb0 < r1; rb0 += block_rows) row_block(rb0, std::min(r1, rb0 + block_rows));
    } else {
      // Row blocks end at sample boundaries too, so that a block's per-sample sums are one
      // sample's (the chunk sums carry over between blocks exactly, in acc_t).
      for (int64_t rb0 = r0, rb1; rb0 < r1; rb0 = rb1) {
        rb1 = std::min({r1, rb0 + block_rows, (rb0 / p.HW + 1) * p.HW});
        row_block(rb0, rb1);
      }
    }
    for (int64_t j = 0; j < width; ++j) {
      double totals[kNumSums];
      for (int q = 0; q < kNumSums; ++q) totals[q] = pass_uses(P, q) ? static_cast<double>(sums[q][j]) : 0.0;
      auto recount = [&](bool want_dx, double pivot) {
        ShiftedSums finite;
        for (int64_t r = r0; r < r1; ++r) {
          const int64_t off = r * C + j;
          finite.add(want_dx ? grad_input_at<P>(dy + off, x + off, mean[j], scale[j], mean_dy[j], k[j])
                             : IO::load1(dy + off),
                     pivot);
        }
        return finite;
      };
      flush_chunk<P>(out[c_begin + j], r1 - r0, p_dy[j], p_dx[j], totals, recount);
    }
  }
  if (stream) stream_fence();
}

// ---------------------------------------------------------------------------------------------
// Task layout: depends on the shape only (never on the thread count), see the file comment.
struct Tasks {
  int64_t rows;   // N (NCHW) or N*H*W (channels_last)
  int64_t parts;  // row ranges
  int64_t rows_per_part;
  int64_t channel_blocks;  // NCHW: C (one channel per block); channels_last: ceil(C / block)
  int64_t count() const { return parts * channel_blocks; }
};

inline Tasks make_tasks(const BnBackwardProblem& p) {
  Tasks t;
  t.rows = p.channels_last ? p.N * p.HW : p.N;
  const int64_t values_per_row = p.channels_last ? std::min<int64_t>(p.C, kChannelBlock) : p.HW;
  t.rows_per_part = std::max<int64_t>(1, kTaskValues / std::max<int64_t>(1, values_per_row));
  if (p.channels_last) {
    // Long parts amortise the per-channel fold of each chunk; a multiple of 4 parts of equal
    // length (when there are rows enough) keeps 2 or 4 threads evenly loaded.
    const int64_t parts = (t.rows + kMaxRowsPerPart - 1) / kMaxRowsPerPart;
    t.rows_per_part = std::max<int64_t>(128, (t.rows + 4 * ((parts + 3) / 4) - 1) / (4 * ((parts + 3) / 4)));
  }
  t.parts = (t.rows + t.rows_per_part - 1) / t.rows_per_part;
  t.channel_blocks = p.channels_last ? (p.C + kChannelBlock - 1) / kChannelBlock : p.C;
  return t;
}

// Pass P over the rows of `part` for one channel block (a channel, for NCHW). kPerSample: the
// pass also forms the per-sample sums; stage holds the channels_last staging slots,
// [parts][2][2][C] (see SampleSink).
template <Pass P, bool kWrite, bool kPerSample, typename scalar_t>
void run_unit(const BnBackwardProblem& p, const Tasks& t, const Coeffs<acc_type_t<scalar_t>>& cf,
              int64_t part, int64_t block, std::vector<Partial>& partials /* [parts][C] */, double* stage) {
  const int64_t r0 = part * t.rows_per_part;
  const int64_t r1 = std::min(t.rows, r0 + t.rows_per_part);
  Partial* out = partials.data() + part * p.C;
  if (p.channels_last) {
    const int64_t c0 = block * kChannelBlock;
    double* part_stage = kPerSample ? stage + part * 4 * p.C : nullptr;
    nhwc_task<P, kWrite, kPerSample, scalar_t>(p, cf, r0, r1, c0, std::min(p.C, c0 + kChannelBlock), out,
                                               part_stage);
  } else {
    nchw_task<P, kWrite, kPerSample, scalar_t>(p, cf, block, r0, r1, out[block]);
  }
}

// Pass P over every (part, block) unit, in parallel.
template <Pass P, bool kWrite, bool kPerSample, typename scalar_t>
void run_pass(const BnBackwardProblem& p, const Tasks& t, const Coeffs<acc_type_t<scalar_t>>& cf,
              std::vector<Partial>& partials, double* stage, ParallelFor parallel_for) {
  parallel_for(t.count(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      run_unit<P, kWrite, kPerSample, scalar_t>(p, t, cf, task / t.channel_blocks, task % t.channel_blocks,
                                                partials, stage);
    }
  });
}

// channels_last, after the pass that formed the per-sample sums: the samples split between parts
// (see SampleSink), each the sum of its parts' slots in part order, written once. A split
// sample's parts are consecutive, so one running total suffices.
template <typename acc_t>
void merge_staged_samples(const BnBackwardProblem& p, const Tasks& t, const std::vector<double>& stage) {
  const int64_t C = p.C, HW = p.HW;
  std::vector<double> total(2 * C);
  int64_t current = -1;  // the sample `total` holds
  auto write = [&] {
    for (int64_t c = 0; c < C; ++c) store_sample<acc_t>(p, current, c, total[c], total[C + c]);
  };
  for (int64_t part = 0; part < t.parts; ++part) {
    const int64_t r0 = part * t.rows_per_part;
    const int64_t r1 = std::min(t.rows, r0 + t.rows_per_part);
    const int64_t firsts[2] = {r0 / HW, (r1 - 1) / HW};  // the samples of slots 0 and 1
    for (int slot = 0; slot < 2; ++slot) {
      const int64_t n = firsts[slot];
      const bool split = n * HW < r0 || (n + 1) * HW > r1;
      if (!split || (slot == 1 && n == firsts[0])) continue;
      const double* staged = stage.data() + (part * 4 + 2 * slot) * C;
      if (n != current) {
        if (current >= 0) write();
        current = n;
        std::copy(staged, staged + 2 * C, total.begin());
      } else {
        for (int64_t i = 0; i < 2 * C; ++i) total[i] += staged[i];
      }
    }
  }
  if (current >= 0) write();
}

// Merges the partials of channel c over all parts, in part order.
inline Partial merge_channel(const std::vector<Partial>& partials, int64_t parts, int64_t C, int64_t c) {
  Partial total;
  for (int64_t part = 0; part < parts; ++part) total = merge_partials(total, partials[part * C + c]);
  return total;
}

// NCHW train mode with enough channels to keep every thread busy runs both passes of a channel
// in one task: the second pass then reads what the first just brought into cache. The
// arithmetic (parts, chunks, merge order) is the same as the two-region schedule, so results
// do not depend on which schedule ran.
constexpr int64_t kChannelTasksPerThread = 4;

// kPerSample: p.per_sample is wanted (never with moments_only); the pass that reads dy for the
// gradients forms it.
template <bool kWrite, bool kPerSample, typename scalar_t>
void bn_backward_stats_typed(const BnBackwardProblem& p, ParallelFor parallel_for, int num_threads) {
  using acc_t = acc_type_t<scalar_t>;
  const int64_t C = p.C;

  const Tasks t = make_tasks(p);
  std::vector<Partial> partials(t.parts * C);  // pass 1 fills .dy and sums, pass 2 .dx
  Coeffs<acc_t> cf(C);
  // channels_last per-sample staging slots, [parts][2][2][C] (see SampleSink).
  std::vector<double> stage(kPerSample && p.channels_last ? t.parts * 4 * C : 0);
  if (p.moments_only) {
    run_pass<Pass::kMoments, false, false, scalar_t>(p, t, cf, partials, nullptr, parallel_for);
    for (int64_t c = 0; c < C; ++c) finish_grad_output<acc_t>(p, merge_channel(partials, t.parts, C, c), c);
    return;
  }
  // The constants of dx for channel c, in double, rounded once to acc_t (shared with CUDA).
  auto set_coeffs = [&](int64_t c, const GradInputCoeffs<acc_t>& g) {
    cf.mean[c] = g.mean;
    cf.scale[c] = g.scale;
    cf.mean_dy[c] = g.mean_dy;
    cf.k[c] = g.k;
  };
  // After the pass that reads dy, for channel c: dy statistics, dbias, dweight (and in train
  // mode the constants of dx, which need the sums).
  auto finish_reduction = [&](const Partial& total, int64_t c) {
    const GradInputCoeffs<acc_t> g = finish_grad_output<acc_t>(p, total, c);
    if (p.train) set_coeffs(c, g);
  };
  auto finish_dx = [&](const Partial& total, int64_t c) { finish_grad_input(p, total, c); };
  // Train: pass 1 reads only the mean; pass 2 gets the rest once the sums are known.
  for (int64_t c = 0; c < C; ++c) set_coeffs(c, channel_coeffs<acc_t>(p, c, 0.0, 0.0));
  auto merged = [&](int64_t c) { return merge_channel(partials, t.parts, C, c); };

  if (!p.train) {
    // Eval: dx = w * invstd * dy needs no reduction, so one pass does everything.
    run_pass<Pass::kEvalFused, kWrite, kPerSample, scalar_t>(p, t, cf, partials, stage.data(), parallel_for);
    for (int64_t c = 0; c < C; ++c) {
      const Partial total = merged(c);
      finish_reduction(total, c);
      finish_dx(total, c);
    }
  } else if (!p.channels_last && C >= kChannelTasksPerThread * num_threads) {
    parallel_for(C, 1, [&](int64_t begin, int64_t end) {
      for (int64_t c = begin; c < end; ++c) {
        for (int64_t part = 0; part < t.parts; ++part) {
          run_unit<Pass::kReduceGradOutput, kWrite, kPerSample, scalar_t>(p, t, cf, part, c, partials,
                                                                          nullptr);
        }
        finish_reduction(merged(c), c);
        for (int64_t part = 0; part < t.parts; ++part) {
          run_unit<Pass::kGradInputTrain, kWrite, false, scalar_t>(p, t, cf, part, c, partials, nullptr);
        }
        finish_dx(merged(c), c);
      }
    });
  } else {
    run_pass<Pass::kReduceGradOutput, kWrite, kPerSample, scalar_t>(p, t, cf, partials, stage.data(),
                                                                    parallel_for);
    for (int64_t c = 0; c < C; ++c) finish_reduction(merged(c), c);
    run_pass<Pass::kGradInputTrain, kWrite, false, scalar_t>(p, t, cf, partials, nullptr, parallel_for);
    for (int64_t c = 0; c < C; ++c) finish_dx(merged(c), c);
  }
  if constexpr (kPerSample) {
    if (p.channels_last) merge_staged_samples<acc_t>(p, t, stage);
  }
}

// The two flags that shape the inner loops, as template arguments: a call without them runs code
// with no trace of them.
template <typename scalar_t>
void dispatch_write(const BnBackwardProblem& p, ParallelFor parallel_for, int num_threads) {
  const bool per_sample = p.per_sample != nullptr && !p.moments_only;
  if (p.grad_input != nullptr) {
    if (per_sample) return bn_backward_stats_typed<true, true, scalar_t>(p, parallel_for, num_threads);
    bn_backward_stats_typed<true, false, scalar_t>(p, parallel_for, num_threads);
  } else {
    if (per_sample) return bn_backward_stats_typed<false, true, scalar_t>(p, parallel_for, num_threads);
    bn_backward_stats_typed<false, false, scalar_t>(p, parallel_for, num_threads);
  }
}

inline void bn_backward_stats(const BnBackwardProblem& p, ParallelFor parallel_for, int num_threads) {
  switch (p.dtype) {
    case ScalarKind::Float:
      return dispatch_write<float>(p, parallel_for, num_threads);
    case ScalarKind::Double:
      return dispatch_write<double>(p, parallel_for, num_threads);
    case ScalarKind::Half:
      return dispatch_write<c10::Half>(p, parallel_for, num_threads);
    case ScalarKind::BFloat16:
      return dispatch_write<c10::BFloat16>(p, parallel_for, num_threads);
  }
}

}  // namespace GS_CPU_ISA
}  // namespace cpu
}  // namespace gradstats

namespace gradstats {
namespace cpu {
#define GS_JOIN2(a, b) a##b
#define GS_JOIN(a, b) GS_JOIN2(a, b)
// This build's entry point (declared in isa_builds.h).
void GS_JOIN(bn_backward_stats_, GS_CPU_ISA)(const BnBackwardProblem& p, ParallelFor parallel_for,
                                             int num_threads) {
  GS_CPU_ISA::bn_backward_stats(p, parallel_for, num_threads);
}
#undef GS_JOIN
#undef GS_JOIN2
}  // namespace cpu
}  // namespace gradstats
