// CUDA kernels of gradstats::bn_backward_stats (contract: ../ops.cpp). No PyTorch headers, so this
// file compiles in seconds; ops_cuda.cpp is the glue. The arithmetic (per-element accumulation,
// chunk sums, Partial and its merge, per-channel finish) is ../bn_backward_passes.h, shared with
// the CPU kernels; this file decides how threads visit values and where their sums meet.
//
// Work decomposition, both layouts: a block owns one channel tile and one slice of the values
// along the reduction (N*H*W). NCHW: a 1-D block of 512 threads, all on one channel, walking the
// channel's (n, hw) positions in memory order. channels_last ([N*H*W][C]): a 2-D block of
// TX channels x TY rows (TX = 32 for wide C so a warp reads 128 contiguous bytes). The grid has
// enough slices per channel to fill the GPU even when C is small.
//
// Per-sample sums (per_sample requested; the train reduction and the eval pass only): the same
// number of blocks, but a block's slice is whole samples [n0, n1), or, when there are fewer
// samples than blocks, an equal part of the positions of one sample. The thread rows of a channel
// form groups of G rows (a power of two); group g takes samples n0 + g, n0 + g + TY / G, ..., its
// rows stepping through the sample's positions by G: NCHW, G >= 32 (or >= HW) consecutive
// threads read consecutive positions (coalesced); channels_last, rows of a sample are C apart and
// a warp still reads TX contiguous channels of a row, G = 1 once a block has TY samples, so a
// sample's sums are thread-local. A thread's sums of one sample are chunks in acc_t, added in
// double; the group adds them (shuffles, then shared memory across its warps) in a fixed tree
// and its first row writes per_sample, or, for a sample split across blocks, stages the block's
// part in the workspace for the finish kernel to add in part order. The statistics ride along
// as in the other passes; the train grad_input pass keeps the plain plan.
//
// Kernels (train):  1. reduce       dy, x -> per-block partials (sum dy, sum dy*(x-mean), dy moments)
//                   2. finish(dy)   partials -> per channel: grad_weight, grad_bias, dy stats, dx constants
//                   3. grad_input   dy, x -> dx, per-block dx moments
//                   4. finish(dx)   partials -> dx stats
//         (eval):   1. fused        dy, x -> dx and every partial;  2. finish(both)
//         (channel_moments): 1. moments of one tensor;  2. finish(its stats)
// Memory passes are those of PyTorch's own backward; the finish kernels touch O(C * slices) bytes
// (and O(N * C * parts) for per-sample parts).
//
// Precision: every thread of a block takes the same pivot per channel (from the first values of
// the block's slice), accumulates shifted sums in acc_t (float; double for double) over chunks
// of at most kThreadChunk values, and adds each chunk to running sums in double; a chunk whose
// float sums are not finite (a NaN or Inf, or finite values whose squares overflow float) is
// re-read and summed in double. Threads then add their double sums (no division: they share
// the pivot), and blocks Chan-merge in double in the finish kernels.
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cstdint>

#include "../bn_backward_passes.h"
#include "emulatable.h"
#include "launch.h"

namespace gradstats {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarp = 32;
constexpr int kThreadChunk = 256;  // values per thread summed in acc_t before they go to double
constexpr int kUnroll = 4;         // loads in flight per thread
constexpr unsigned kMaxGridY = 65535;

// ---- storage <-> accumulation ---------------------------------------------------------------
template <typename scalar_t>
struct Storage;
template <>
struct Storage<float> {
  using acc_t = float;
  static __device__ __forceinline__ float load(float v) { return v; }
  static __device__ __forceinline__ float store(float v) { return v; }
};
template <>
struct Storage<double> {
  using acc_t = double;
  static __device__ __forceinline__ double load(double v) { return v; }
  static __device__ __forceinline__ double store(double v) { return v; }
};
template <>
struct Storage<__half> {
  using acc_t = float;
  static __device__ __forceinline__ float load(__half v) { return __half2float(v); }
  static __device__ __forceinline__ __half store(float v) { return __float2half_rn(v); }
};
template <>
struct Storage<__nv_bfloat16> {
  using acc_t = float;
  static __device__ __forceinline__ float load(__nv_bfloat16 v) { return __bfloat162float(v); }
  static __device__ __forceinline__ __nv_bfloat16 store(float v) { return __float2bfloat16_rn(v); }
};

// The per-element work of pass P (bn_backward_passes.h). Returns dx as stored.
template <Pass P, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t update(acc_t dy, acc_t x, const GradInputCoeffs<acc_t>& cf, acc_t pivot_dy,
                                        acc_t pivot_dx, ChunkSums<acc_t>& s) {
  using S = Storage<scalar_t>;
  accumulate_grad_output<P>(dy, x, cf.mean, pivot_dy, s);
  if (!computes_grad_input(P)) return acc_t(0);
  const acc_t dx = S::load(S::store(grad_input_value<P>(dy, x, cf.mean, cf.scale, cf.mean_dy, cf.k)));
  accumulate_grad_input<P>(dx, pivot_dx, s);
  return dx;
}

// dx of one element as update() stores it (pivots and recounts).
template <Pass P, typename scalar_t, typename acc_t>
__device__ __forceinline__ acc_t stored_grad_input(acc_t dy, acc_t x, const GradInputCoeffs<acc_t>& cf) {
  using S = Storage<scalar_t>;
  constexpr Pass kDxPass = P == Pass::kEvalFused ? P : Pass::kGradInputTrain;
  return S::load(S::store(grad_input_value<kDxPass>(dy, x, cf.mean, cf.scale, cf.mean_dy, cf.k)));
}

__device__ __forceinline__ ShiftedSums shfl_down(const ShiftedSums& v, int delta) {
  ShiftedSums o;
  o.n = __shfl_down_sync(0xffffffffu, v.n, delta);
  o.s1 = __shfl_down_sync(0xffffffffu, v.s1, delta);
  o.s2 = __shfl_down_sync(0xffffffffu, v.s2, delta);
  o.nonfinite = __shfl_down_sync(0xffffffffu, v.nonfinite, delta);
  return o;
}

__device__ __forceinline__ RunSums shfl_down(const RunSums& v, int delta) {
  RunSums o;
  o.sum_dy = __shfl_down_sync(0xffffffffu, v.sum_dy, delta);
  o.sum_dy_xmu = __shfl_down_sync(0xffffffffu, v.sum_dy_xmu, delta);
  o.dy = shfl_down(v.dy, delta);
  o.dx = shfl_down(v.dx, delta);
  return o;
}

// Adds up the RunSums of the TY threads of each of the TX columns of a (TX, TY) block (TX a power
// of two <= 32; thread id = ty * TX + tx): lanes of one warp with the same tx through shuffles,
// warps through shared memory. The total for column tx is returned to thread (tx, 0). Plain
// additions: the threads of a column share their pivots.
template <typename SharedSums>
__device__ RunSums block_sum(RunSums v, int TX, SharedSums& smem) {
  for (int delta = kWarp / 2; delta >= TX; delta >>= 1) v.add(shfl_down(v, delta));
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = tid / kWarp, lane = tid % kWarp;
  const int warps = (blockDim.x * blockDim.y + kWarp - 1) / kWarp;
  // After the shuffles lanes 0..TX-1 of each warp hold that warp's column sums.
  if (lane < TX) smem[warp * TX + lane] = v;
  __syncthreads();
  if (tid < TX) {
    v = smem[tid];
    for (int w = 1; w < warps; ++w) v.add(static_cast<RunSums>(smem[w * TX + tid]));
  }
  return v;
}

// ---- the pass kernel --------------------------------------------------------------------------
struct PassArgs {
  BnBackwardProblem p;
  int64_t M;           // N * HW values per channel
  int64_t slice;       // values (NCHW) or rows (channels_last) per block along the reduction
  int slices;          // blocks per channel tile along the reduction
  int tile;            // channels_last: TX channels per block
  const void* coeffs;  // train grad_input pass: [3][C] scale, mean_dy, k from the finish kernel
  Partial* partials;   // out: [C][slices]
  // Per-sample passes: block b owns samples [b * samples, (b + 1) * samples) of its channel tile
  // (parts == 1), or positions [q * part_len, (q + 1) * part_len) of sample b / parts, q = b % parts.
  int64_t samples;
  int64_t part_len;
  int parts;
  int group;       // thread rows that share a sample (G, a power of two dividing TY)
  double* staged;  // parts > 1: out [C][N][parts] x {sum dy, sum dy*(x-mean)}
};

template <Pass P, typename acc_t>
__device__ __forceinline__ GradInputCoeffs<acc_t> pass_coeffs(const PassArgs& a, int64_t c) {
  if (P == Pass::kMoments || P == Pass::kReduceGradOutput) {
    return {P == Pass::kMoments ? acc_t(0) : static_cast<const acc_t*>(a.p.mean)[c], acc_t(0), acc_t(0),
            acc_t(0)};
  }
  if (P == Pass::kEvalFused) return channel_coeffs<acc_t>(a.p, c, 0.0, 0.0);
  const acc_t* k = static_cast<const acc_t*>(a.coeffs);
  return {static_cast<const acc_t*>(a.p.mean)[c], k[c], k[a.p.C + c], k[2 * a.p.C + c]};
}

// NCHW: value j of channel c (j in [0, N*HW)) is at (j / HW) * C * HW + c * HW + j % HW.
// Threads step through j by a fixed stride; (n, hw) are updated without a division.
struct NchwWalker {
  int64_t n, hw, HW, row_stride, base, step_n, step_hw;
  __device__ __forceinline__ int64_t offset() const { return base + n * row_stride + hw; }
  __device__ __forceinline__ void advance() {
    hw += step_hw;
    n += step_n;
    if (hw >= HW) {
      hw -= HW;
      ++n;
    }
  }
};

// channels_last: row r of channel c is at r * C + c; threads step through rows.
struct RowWalker {
  int64_t off, step;
  __device__ __forceinline__ int64_t offset() const { return off; }
  __device__ __forceinline__ void advance() { off += step; }
};

// The sums of one sample that the threads of a group add up.
struct SampleSums {
  double dy = 0, dy_xmu = 0;
};

// Adds the SampleSums of the rows of a group, per column: a group is W = G * TX consecutive
// threads (W a power of two, groups start at multiples of W; thread id = ty * TX + tx). Lanes
// through shuffles, then the group's warps (W > 32) through shared memory. The total for
// column tx is returned to the group's first row. Every thread of the block calls it alike.
template <typename SharedSums>
__device__ SampleSums group_sum(SampleSums v, int W, int TX, SharedSums& smem) {
  for (int delta = (W < kWarp ? W : kWarp) / 2; delta >= TX; delta >>= 1) {
    v.dy += __shfl_down_sync(0xffffffffu, v.dy, delta);
    v.dy_xmu += __shfl_down_sync(0xffffffffu, v.dy_xmu, delta);
  }
  if (W <= kWarp) return v;
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = tid / kWarp, lane = tid % kWarp;
  if (lane < TX) smem[warp * TX + lane] = v;
  __syncthreads();
  if (tid % W < TX) {
    for (int w = 1; w < W / kWarp; ++w) {
      const SampleSums o = smem[(warp + w) * TX + lane];
      v.dy += o.dy;
      v.dy_xmu += o.dy_xmu;
    }
  }
  __syncthreads();  // the next sample's sums reuse smem
  return v;
}

// Visits the `count` values of one thread (offsets from `walker`) in chunks of kThreadChunk,
// writing dx if kWrite, and adds their sums around the pivots to `run`; with kSample also their
// sum dy and sum dy*(x-mean) to `sample` (the same chunk totals, so no extra registers per value
// and none of the thread's other samples mixed in).
template <Pass P, bool kWrite, bool kSample, typename scalar_t, typename Walker>
__device__ void visit_values_into(const PassArgs& a, Walker walker, int64_t count,
                                  const GradInputCoeffs<typename Storage<scalar_t>::acc_t>& cf,
                                  typename Storage<scalar_t>::acc_t p_dy,
                                  typename Storage<scalar_t>::acc_t p_dx, RunSums& run, SampleSums& sample) {
  using S = Storage<scalar_t>;
  using acc_t = typename S::acc_t;
  const scalar_t* __restrict__ dy = static_cast<const scalar_t*>(a.p.grad_output);
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(a.p.input);
  scalar_t* __restrict__ dx = static_cast<scalar_t*>(a.p.grad_input);
  for (int64_t done = 0; done < count; done += kThreadChunk) {
    const int64_t n = count - done < kThreadChunk ? count - done : kThreadChunk;
    const Walker chunk_start = walker;
    ChunkSums<acc_t> s{};
    for (int64_t i = 0; i < n; i += kUnroll) {
      int64_t off[kUnroll];
      scalar_t dy_v[kUnroll], x_v[kUnroll];
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        off[u] = walker.offset();
        walker.advance();
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u < n) {
          dy_v[u] = dy[off[u]];
          if (P != Pass::kMoments) x_v[u] = x[off[u]];
        }
      }
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        if (i + u >= n) break;
        const acc_t xv = P == Pass::kMoments ? acc_t(0) : S::load(x_v[u]);
        const acc_t v = update<P, scalar_t>(S::load(dy_v[u]), xv, cf, p_dy, p_dx, s);
        if (kWrite && computes_grad_input(P)) dx[off[u]] = S::store(v);
      }
    }
    // The walker ran ahead by up to kUnroll - 1 positions: only n of them belong to the chunk.
    walker = chunk_start;
    for (int64_t i = 0; i < n; ++i) walker.advance();
    double totals[kNumSums];
    for (int q = 0; q < kNumSums; ++q) totals[q] = pass_uses(P, q) ? static_cast<double>(s.v[q]) : 0.0;
    if constexpr (kSample) {
      sample.dy += totals[kSumDy];
      sample.dy_xmu += totals[kSumDyXmu];
    }
    add_chunk<P>(run, static_cast<double>(n), p_dy, p_dx, totals, [&](bool want_dx, double pivot) {
      ShiftedSums r;
      Walker w = chunk_start;
      for (int64_t i = 0; i < n; ++i, w.advance()) {
        const acc_t g = S::load(dy[w.offset()]);
        r.add(want_dx ? stored_grad_input<P, scalar_t>(g, S::load(x[w.offset()]), cf) : g, pivot);
      }
      return r;
    });
  }
}

// visit_values for the plain passes: the thread's sums start from zero.
template <Pass P, bool kWrite, typename scalar_t, typename Walker>
__device__ __forceinline__ RunSums visit_values(const PassArgs& a, Walker walker, int64_t count,
                                                const GradInputCoeffs<typename Storage<scalar_t>::acc_t>& cf,
                                                typename Storage<scalar_t>::acc_t p_dy,
                                                typename Storage<scalar_t>::acc_t p_dx) {
  RunSums run;
  SampleSums unused;
  visit_values_into<P, kWrite, false, scalar_t>(a, walker, count, cf, p_dy, p_dx, run, unused);
  return run;
}

// The part of the reduction a per-sample block owns: samples [n0, n1), positions [h0, h1) of each.
struct SampleRegion {
  int64_t n0, n1, h0, h1;
  int part;
};

__device__ __forceinline__ SampleRegion sample_region(const PassArgs& a, int slice) {
  SampleRegion r;
  if (a.parts == 1) {
    r.n0 = static_cast<int64_t>(slice) * a.samples;
    r.n1 = r.n0 + a.samples < a.p.N ? r.n0 + a.samples : a.p.N;
    r.part = 0;
  } else {
    r.n0 = slice / a.parts;
    r.n1 = r.n0 + 1;
    r.part = slice % a.parts;
  }
  r.h0 = static_cast<int64_t>(r.part) * a.part_len;
  r.h1 = r.h0 + a.part_len < a.p.HW ? r.h0 + a.part_len : a.p.HW;
  return r;
}

// Per-sample passes: the samples of the region in rounds of TY / G (one per group); adds the
// thread's sums over all its samples to `run`, and writes (or stages) each sample's.
template <Pass P, bool kWrite, bool kChannelsLast, typename scalar_t, typename SharedSums>
__device__ void visit_samples(const PassArgs& a, const SampleRegion& rg, int64_t c, bool active, int TX,
                              int ty, int TY, const GradInputCoeffs<typename Storage<scalar_t>::acc_t>& cf,
                              typename Storage<scalar_t>::acc_t p_dy, typename Storage<scalar_t>::acc_t p_dx,
                              RunSums& run, SharedSums& smem) {
  using acc_t = typename Storage<scalar_t>::acc_t;
  const int64_t N = a.p.N, C = a.p.C, HW = a.p.HW;
  const int G = a.group, groups = TY / G, g = ty / G, r = ty % G;
  const int64_t first = rg.h0 + r;
  const int64_t count = first < rg.h1 ? (rg.h1 - first + G - 1) / G : 0;
  const int64_t rounds = (rg.n1 - rg.n0 + groups - 1) / groups;
  for (int64_t k = 0; k < rounds; ++k) {
    const int64_t n = rg.n0 + k * groups + g;
    const bool mine = active && n < rg.n1;
    SampleSums sample;
    if (mine && count > 0) {
      const RowWalker w = kChannelsLast ? RowWalker{(n * HW + first) * C + c, static_cast<int64_t>(G) * C}
                                        : RowWalker{(n * C + c) * HW + first, G};
      visit_values_into<P, kWrite, true, scalar_t>(a, w, count, cf, p_dy, p_dx, run, sample);
    }
    const SampleSums s = group_sum(sample, G * TX, TX, smem);
    if (r == 0 && mine) {
      if (a.parts == 1) {
        // grad_weight's term as finish_grad_output forms grad_weight: the sum times invstd in double.
        acc_t* out = static_cast<acc_t*>(a.p.per_sample);
        const double invstd = static_cast<const acc_t*>(a.p.invstd)[c];
        out[n * C + c] = static_cast<acc_t>(s.dy);
        out[(N + n) * C + c] = static_cast<acc_t>(s.dy_xmu * invstd);
      } else {
        double* staged = a.staged + ((c * N + n) * a.parts + rg.part) * 2;
        staged[0] = s.dy;
        staged[1] = s.dy_xmu;
      }
    }
  }
}

template <Pass P, bool kWrite, bool kChannelsLast, bool kPerSample, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2) bn_pass_kernel(PassArgs a) {
  using S = Storage<scalar_t>;
  using acc_t = typename S::acc_t;
  GS_SHARED_ARRAY(smem, kThreads / kWarp * kWarp, RunSums);
  const int TX = kChannelsLast ? a.tile : 1;
  const int tx = kChannelsLast ? threadIdx.x : 0;
  const int ty = kChannelsLast ? threadIdx.y : threadIdx.x;
  const int TY = kChannelsLast ? blockDim.y : blockDim.x;
  const int slice = kChannelsLast ? blockIdx.y : blockIdx.x;
  // NCHW: channels beyond the grid's y limit continue along z.
  const int64_t c = kChannelsLast ? static_cast<int64_t>(blockIdx.x) * TX + tx
                                  : static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y;
  if (!kChannelsLast && c >= a.p.C) return;  // the whole block
  // channels_last lanes past C take part in the block's reduction with nothing to add.
  const bool active = c < a.p.C;
  const int64_t C = a.p.C, HW = a.p.HW;
  // The reduction range of this block: [begin, end) values (NCHW) or rows (channels_last); in
  // per-sample passes its region (the range's bounds are then unused).
  const int64_t begin = static_cast<int64_t>(slice) * a.slice;
  const int64_t end = begin + a.slice < a.M ? begin + a.slice : a.M;
  const int64_t first = begin + ty;
  const int64_t count = first < end ? (end - first + TY - 1) / TY : 0;
  SampleRegion rg{};
  if constexpr (kPerSample) rg = sample_region(a, slice);

  RunSums run;
  GradInputCoeffs<acc_t> cf{};
  acc_t p_dy = 0, p_dx = 0;
  if (active) {
    cf = pass_coeffs<P, acc_t>(a, c);
    // The pivots: every thread of the channel reads the same first values of the block's slice.
    auto at = [&](int64_t j) { return kChannelsLast ? j * C + c : (j / HW) * C * HW + c * HW + j % HW; };
    const scalar_t* dy = static_cast<const scalar_t*>(a.p.grad_output);
    const scalar_t* x = static_cast<const scalar_t*>(a.p.input);
    PivotSamples sample_dy, sample_dx;
    // Per-sample passes: the first values of the region, in (n, hw) order.
    const int64_t span = kPerSample ? (rg.n1 - rg.n0) * (rg.h1 - rg.h0) : end - begin;
    for (int64_t i = 0; i < span && i < kPivotSamples; ++i) {
      const int64_t j =
          kPerSample ? (rg.n0 + i / (rg.h1 - rg.h0)) * HW + rg.h0 + i % (rg.h1 - rg.h0) : begin + i;
      const acc_t g = S::load(dy[at(j)]);
      sample_dy.add(g);
      if (P == Pass::kGradInputTrain || P == Pass::kEvalFused) {
        sample_dx.add(stored_grad_input<P, scalar_t>(g, S::load(x[at(j)]), cf));
      }
    }
    p_dy = sample_dy.pivot<acc_t>(Moments<double>{0, 0, 0});
    p_dx = sample_dx.pivot<acc_t>(Moments<double>{0, 0, 0});
    if (!kPerSample && count > 0) {
      if (kChannelsLast) {
        run = visit_values<P, kWrite, scalar_t>(a, RowWalker{first * C + c, static_cast<int64_t>(TY) * C},
                                                count, cf, p_dy, p_dx);
      } else {
        const NchwWalker w{first / HW, first % HW, HW, C * HW, c * HW, TY / HW, TY % HW};
        run = visit_values<P, kWrite, scalar_t>(a, w, count, cf, p_dy, p_dx);
      }
    }
  }
  if constexpr (kPerSample) {
    GS_SHARED_ARRAY(sample_smem, kThreads / kWarp * kWarp, SampleSums);
    visit_samples<P, kWrite, kChannelsLast, scalar_t>(a, rg, c, active, TX, ty, TY, cf, p_dy, p_dx, run,
                                                      sample_smem);
  }
  const RunSums total = block_sum(run, TX, smem);
  if (ty == 0 && active) {
    Partial out;
    fold_run(out, total, p_dy, p_dx);
    a.partials[c * a.slices + slice] = out;
  }
}

// ---- finishing per channel: one warp merges the partials of one channel in double -------------
// What a finish kernel writes (bit flags): dy stats; grad_weight, grad_bias and the constants of
// dx (train); dx stats. Train: the first two after the reduction, then dx stats; eval: all
// three (its single pass measured everything); channel_moments: dy stats.
enum Finish : int { kDyStats = 1, kGradsAndCoeffs = 2, kDxStats = 4 };

struct FinishArgs {
  BnBackwardProblem p;
  const Partial* partials;  // [C][slices]
  int slices;
  void* coeffs;  // out (train, after the reduction): [3][C] scale, mean_dy, k in acc_t
  // Per-sample passes whose samples span `parts` blocks: [C][N][parts] x {sum dy, sum dy*(x-mean)},
  // added in part order into per_sample by the finish of the grads (nullptr otherwise).
  const double* staged;
  int parts;
};

__device__ __forceinline__ Moments<double> shfl_down(const Moments<double>& m, int delta) {
  return {__shfl_down_sync(0xffffffffu, m.n, delta), __shfl_down_sync(0xffffffffu, m.mean, delta),
          __shfl_down_sync(0xffffffffu, m.m2, delta)};
}

template <int kWhat, typename acc_t>
__global__ void __launch_bounds__(kThreads) finish_kernel(FinishArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (c >= a.p.C) return;  // whole warps exit together
  Partial total;
  for (int s = lane; s < a.slices; s += kWarp) total = merge_partials(total, a.partials[c * a.slices + s]);
  for (int delta = kWarp / 2; delta > 0; delta >>= 1) {
    Partial other;
    other.dy = shfl_down(total.dy, delta);
    other.dx = shfl_down(total.dx, delta);
    other.nonfinite_dy = __shfl_down_sync(0xffffffffu, total.nonfinite_dy, delta);
    other.nonfinite_dx = __shfl_down_sync(0xffffffffu, total.nonfinite_dx, delta);
    other.sum_dy = __shfl_down_sync(0xffffffffu, total.sum_dy, delta);
    other.sum_dy_xmu = __shfl_down_sync(0xffffffffu, total.sum_dy_xmu, delta);
    total = merge_partials(total, other);
  }
  if ((kWhat & kGradsAndCoeffs) && a.staged) {
    const int64_t N = a.p.N;
    const double invstd = static_cast<const acc_t*>(a.p.invstd)[c];
    acc_t* out = static_cast<acc_t*>(a.p.per_sample);
    for (int64_t n = lane; n < N; n += kWarp) {
      const double* parts = a.staged + (c * N + n) * a.parts * 2;
      SampleSums s;
      for (int q = 0; q < a.parts; ++q) {
        s.dy += parts[2 * q];
        s.dy_xmu += parts[2 * q + 1];
      }
      out[n * a.p.C + c] = static_cast<acc_t>(s.dy);
      out[(N + n) * a.p.C + c] = static_cast<acc_t>(s.dy_xmu * invstd);
    }
  }
  if (lane != 0) return;
  if (kWhat & kDyStats) {
    BnBackwardProblem p = a.p;
    if (!(kWhat & kGradsAndCoeffs)) p.moments_only = true;  // statistics only
    const GradInputCoeffs<acc_t> g = finish_grad_output<acc_t>(p, total, c);
    if ((kWhat & kGradsAndCoeffs) && a.p.train) {
      acc_t* k = static_cast<acc_t*>(a.coeffs);
      k[c] = g.scale;
      k[a.p.C + c] = g.mean_dy;
      k[2 * a.p.C + c] = g.k;
    }
  }
  if (kWhat & kDxStats) finish_grad_input(a.p, total, c);
}

// ---- host side ---------------------------------------------------------------------------------
struct Plan {
  bool channels_last;
  int tile;       // channels_last: TX
  int rows;       // threads along the reduction in a block (TY, or 512 for NCHW)
  int64_t tiles;  // channel tiles (NCHW: C)
  int slices;
  int64_t slice;  // values or rows per block
  // Per-sample plans (make_sample_plan); a plain plan has samples = 0.
  int64_t samples = 0;   // samples per block
  int64_t part_len = 0;  // positions per block of one sample (HW when parts == 1)
  int parts = 1;         // blocks per sample (> 1 only with one sample per block)
  int group = 0;         // thread rows per sample group
};

Plan make_plan(const BnBackwardProblem& p, int num_sms) {
  Plan plan;
  plan.channels_last = p.channels_last;
  const int64_t M = p.N * p.HW;
  if (p.channels_last) {
    int tile = 1;
    while (tile < kWarp && tile < p.C) tile *= 2;
    plan.tile = tile;
    plan.rows = kThreads / tile;
    plan.tiles = (p.C + tile - 1) / tile;
  } else {
    plan.tile = 1;
    plan.rows = kThreads;
    plan.tiles = p.C;
  }
  // Enough blocks for 4 per multiprocessor, but at least 32 values per thread, and within the
  // grid's y limit (channels_last) or x limit (NCHW, generous).
  const int64_t wanted = std::max<int64_t>(1, (4LL * num_sms + plan.tiles - 1) / plan.tiles);
  const int64_t useful = std::max<int64_t>(1, M / (static_cast<int64_t>(plan.rows) * 32));
  int64_t slices = std::min<int64_t>(std::min(wanted, useful), kMaxGridY);
  plan.slice = (M + slices - 1) / slices;
  plan.slices = static_cast<int>((M + plan.slice - 1) / plan.slice);
  return plan;
}

// The plan of a pass that also forms per-sample sums: the plain plan's number of blocks per
// channel tile (so the same parallelism), with whole samples per block, or, when there are fewer
// samples than blocks, each sample cut into equal parts of its positions (at most the plain
// count of blocks in all, so the grid limits hold). The groups: as many as the block has samples
// (a power of two, rounds of one sample per group), of at least 32 rows (NCHW: coalesced reads
// along hw; fewer when a sample has fewer positions) or 1 row (channels_last).
Plan make_sample_plan(const BnBackwardProblem& p, Plan plan) {
  const int64_t blocks = plan.slices;
  if (blocks <= p.N) {
    plan.samples = (p.N + blocks - 1) / blocks;
    plan.parts = 1;
    plan.part_len = p.HW;
    plan.slices = static_cast<int>((p.N + plan.samples - 1) / plan.samples);
  } else {
    const int64_t parts = std::min<int64_t>(blocks / p.N, p.HW);
    plan.samples = 1;
    plan.part_len = (p.HW + parts - 1) / parts;
    plan.parts = static_cast<int>((p.HW + plan.part_len - 1) / plan.part_len);
    plan.slices = static_cast<int>(p.N * plan.parts);
  }
  int64_t min_group = 1;
  if (!p.channels_last) {
    while (min_group < kWarp && min_group < plan.part_len) min_group *= 2;
  }
  int groups = 1;
  while (groups * 2 <= plan.samples && plan.rows / (groups * 2) >= min_group) groups *= 2;
  plan.group = plan.rows / groups;
  return plan;
}

// Whether the passes that read dy form per-sample sums.
bool wants_per_sample(const BnBackwardProblem& p) { return p.per_sample != nullptr && !p.moments_only; }

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

size_t acc_size(ScalarKind k) { return k == ScalarKind::Double ? sizeof(double) : sizeof(float); }

template <Pass P, bool kWrite, bool kPerSample, typename scalar_t>
cudaError_t launch_pass(const Plan& plan, const PassArgs& args, cudaStream_t stream) {
  if (plan.channels_last) {
    const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.slices));
    const dim3 block(plan.tile, plan.rows);
    GS_LAUNCH(grid, block, 0, stream, bn_pass_kernel<P, kWrite, true, kPerSample, scalar_t>)(args);
  } else {
    const unsigned channels_y = static_cast<unsigned>(std::min<int64_t>(plan.tiles, kMaxGridY));
    const dim3 grid(static_cast<unsigned>(plan.slices), channels_y,
                    static_cast<unsigned>((plan.tiles + channels_y - 1) / channels_y));
    GS_LAUNCH(grid, kThreads, 0, stream, bn_pass_kernel<P, kWrite, false, kPerSample, scalar_t>)(args);
  }
  return cudaGetLastError();
}

// The pass that reads dy (train reduction or eval), with per-sample sums when they are wanted.
template <Pass P, bool kWrite, typename scalar_t>
cudaError_t launch_first_pass(const Plan& plan, const PassArgs& args, cudaStream_t stream) {
  return plan.samples > 0 ? launch_pass<P, kWrite, true, scalar_t>(plan, args, stream)
                          : launch_pass<P, kWrite, false, scalar_t>(plan, args, stream);
}

template <int kWhat, typename acc_t>
cudaError_t launch_finish(const FinishArgs& args, cudaStream_t stream) {
  constexpr int kChannelsPerBlock = kThreads / kWarp;
  const int64_t blocks = (args.p.C + kChannelsPerBlock - 1) / kChannelsPerBlock;
  GS_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, finish_kernel<kWhat, acc_t>)(args);
  return cudaGetLastError();
}

// The workspace: [C][slices] partials (the larger count of the two plans), [3][C] constants of
// dx in acc_t, and, when per-sample sums span several blocks, their staged parts.
struct Workspace {
  size_t coeffs, staged, bytes;
};

Workspace workspace_layout(const BnBackwardProblem& p, const Plan& plan, const Plan& first) {
  Workspace w;
  const int slices = std::max(plan.slices, first.slices);
  w.coeffs = align16(sizeof(Partial) * p.C * slices);
  w.bytes = w.coeffs + 3 * p.C * acc_size(p.dtype);
  w.staged = align16(w.bytes);
  if (first.parts > 1) w.bytes = w.staged + sizeof(double) * 2 * p.C * p.N * first.parts;
  return w;
}

template <typename scalar_t, bool kWrite>
cudaError_t run(const BnBackwardProblem& p, void* workspace, int num_sms, cudaStream_t stream) {
  using acc_t = typename Storage<scalar_t>::acc_t;
  const Plan plan = make_plan(p, num_sms);
  // The pass that reads dy (the train reduction, or eval's only pass) forms per-sample sums.
  const Plan first = wants_per_sample(p) ? make_sample_plan(p, plan) : plan;
  const Workspace layout = workspace_layout(p, plan, first);
  char* ws = static_cast<char*>(workspace);
  Partial* partials = reinterpret_cast<Partial*>(ws);
  void* coeffs = ws + layout.coeffs;
  double* staged = first.parts > 1 ? reinterpret_cast<double*>(ws + layout.staged) : nullptr;

  const int64_t M = p.N * p.HW;
  const PassArgs pass{p, M, plan.slice, plan.slices, plan.tile, coeffs, partials, 0, 0, 1, 0, nullptr};
  const FinishArgs fin{p, partials, plan.slices, coeffs, nullptr, 1};
  const PassArgs pass1{p,           M,        first.slice,   first.slices,   first.tile,
                       coeffs,      partials, first.samples, first.part_len, first.parts,
                       first.group, staged};
  const FinishArgs fin1{p, partials, first.slices, coeffs, staged, first.parts};
  constexpr int kEvalFinish = kDyStats | kGradsAndCoeffs | kDxStats;
  constexpr int kReductionFinish = kDyStats | kGradsAndCoeffs;
  cudaError_t err;
  if (p.moments_only) {
    if ((err = launch_pass<Pass::kMoments, false, false, scalar_t>(plan, pass, stream))) return err;
    return launch_finish<kDyStats, acc_t>(fin, stream);
  }
  if (!p.train) {
    if ((err = launch_first_pass<Pass::kEvalFused, kWrite, scalar_t>(first, pass1, stream))) return err;
    return launch_finish<kEvalFinish, acc_t>(fin1, stream);
  }
  if ((err = launch_first_pass<Pass::kReduceGradOutput, false, scalar_t>(first, pass1, stream))) return err;
  if ((err = launch_finish<kReductionFinish, acc_t>(fin1, stream))) return err;
  if ((err = launch_pass<Pass::kGradInputTrain, kWrite, false, scalar_t>(plan, pass, stream))) return err;
  return launch_finish<kDxStats, acc_t>(fin, stream);
}

template <typename scalar_t>
cudaError_t run_maybe_write(const BnBackwardProblem& p, void* ws, int sms, cudaStream_t stream) {
  return p.grad_input ? run<scalar_t, true>(p, ws, sms, stream) : run<scalar_t, false>(p, ws, sms, stream);
}

}  // namespace

size_t bn_backward_stats_workspace_bytes(const BnBackwardProblem& p, int num_sms) {
  const Plan plan = make_plan(p, num_sms);
  return workspace_layout(p, plan, wants_per_sample(p) ? make_sample_plan(p, plan) : plan).bytes;
}

cudaError_t launch_bn_backward_stats(const BnBackwardProblem& p, void* workspace, int num_sms,
                                     cudaStream_t stream) {
  if (p.C == 0 || p.N * p.HW == 0) return cudaSuccess;
  switch (p.dtype) {
    case ScalarKind::Float:
      return run_maybe_write<float>(p, workspace, num_sms, stream);
    case ScalarKind::Double:
      return run_maybe_write<double>(p, workspace, num_sms, stream);
    case ScalarKind::Half:
      return run_maybe_write<__half>(p, workspace, num_sms, stream);
    case ScalarKind::BFloat16:
      return run_maybe_write<__nv_bfloat16>(p, workspace, num_sms, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace gradstats
