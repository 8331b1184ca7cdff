// CUDA kernels of gradstats::bn_backward_stats (contract: ../ops.cpp). No PyTorch headers, so this
// file compiles in seconds; ops_cuda.cpp is the glue.
//
// Work decomposition, both layouts: a block owns one channel tile and one slice of the values
// along the reduction (N*H*W). NCHW: a 1-D block of 512 threads, all on one channel, walking the
// channel's (n, hw) positions in memory order. channels_last ([N*H*W][C]): a 2-D block of
// TX channels x TY rows (TX = 32 for wide C so a warp reads 128 contiguous bytes). The grid has
// enough slices per channel to fill the GPU even when C is small.
//
// Kernels (train):  1. reduce       dy, x -> per-block partials (sum dy, sum dy*(x-mean), dy moments)
//                   2. finish(dy)   partials -> per channel: grad_weight, grad_bias, dy stats, dx constants
//                   3. grad_input   dy, x -> dx, per-block dx moments
//                   4. finish(dx)   partials -> dx stats
//         (eval):   1. fused        dy, x -> dx and every partial;  2. finish(both)
//         (channel_moments): 1. moments of one tensor;  2. finish(its stats)
// Memory passes are those of PyTorch's own backward; the finish kernels touch O(C * slices) bytes.
//
// Precision: per thread, values accumulate in acc_t (float; double for double) around a pivot for
// at most kThreadChunk values, then fold into moments; threads merge with warp shuffles and shared
// memory in acc_t; blocks merge in double in the finish kernels. sum(dy) and sum(dy*(x-mean)) are
// summed directly (their rounding matches a plain sum whatever the pivot). NaNs and infinities are
// counted and left out of the moments (the CPU does the same through a re-read of the rare chunk
// that has them; here the per-value test costs nothing against memory).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>

#include "../bn_backward_stats.h"
#include "../bn_stats_math.h"
#include "emulatable.h"
#include "launch.h"

namespace gradstats {
namespace cuda {
namespace {

constexpr int kThreads = 512;
constexpr int kWarp = 32;
constexpr int kThreadChunk = 256;  // values per thread around one pivot before folding
constexpr int kUnroll = 4;         // loads in flight per thread

enum class Pass { kReduceGradOutput, kGradInputTrain, kEvalFused, kMoments };

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

// ---- per-thread and per-block statistics ------------------------------------------------------
// Moments of the finite values of a stream, accumulated as shifted sums in chunks of
// kThreadChunk, and the count of its NaNs and infinities (which the moments leave out).
template <typename acc_t>
struct StreamMoments {
  Moments<acc_t> folded{acc_t(0), acc_t(0), acc_t(0)};
  acc_t pivot = 0, s1 = 0, s2 = 0;
  int count = 0;
  int64_t nonfinite = 0;

  __device__ __forceinline__ void add(acc_t v) {
    if (!isfinite(v)) {
      ++nonfinite;
      return;
    }
    if (count == 0) pivot = folded.n > acc_t(0) ? folded.mean : v;
    const acc_t d = v - pivot;
    s1 += d;
    s2 += d * d;
    if (++count == kThreadChunk) fold();
  }
  __device__ __forceinline__ void fold() {
    folded = merge_moments(folded, moments_from_shifted_sums(acc_t(count), pivot, s1, s2));
    s1 = s2 = acc_t(0);
    count = 0;
  }
};

// What a thread, then a block, contributes for its channel.
template <typename acc_t>
struct Stats {
  Moments<acc_t> dy, dx;
  acc_t sum_dy, sum_dy_xmu;
  long long nonfinite_dy, nonfinite_dx;
};

template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> merge_stats(const Stats<acc_t>& a, const Stats<acc_t>& b) {
  return {merge_moments(a.dy, b.dy),   merge_moments(a.dx, b.dx),       a.sum_dy + b.sum_dy,
          a.sum_dy_xmu + b.sum_dy_xmu, a.nonfinite_dy + b.nonfinite_dy, a.nonfinite_dx + b.nonfinite_dx};
}

template <typename T>
__device__ __forceinline__ Moments<T> shfl_down(const Moments<T>& m, int delta) {
  return {__shfl_down_sync(0xffffffffu, m.n, delta), __shfl_down_sync(0xffffffffu, m.mean, delta),
          __shfl_down_sync(0xffffffffu, m.m2, delta)};
}

template <typename acc_t>
__device__ __forceinline__ Stats<acc_t> shfl_down(const Stats<acc_t>& s, int delta) {
  return {shfl_down(s.dy, delta),
          shfl_down(s.dx, delta),
          __shfl_down_sync(0xffffffffu, s.sum_dy, delta),
          __shfl_down_sync(0xffffffffu, s.sum_dy_xmu, delta),
          __shfl_down_sync(0xffffffffu, s.nonfinite_dy, delta),
          __shfl_down_sync(0xffffffffu, s.nonfinite_dx, delta)};
}

// Block partial result, in double: the finish kernels merge them per channel.
struct Partial {
  Moments<double> dy, dx;
  double sum_dy, sum_dy_xmu;
  double nonfinite_dy, nonfinite_dx;
};

// Reduces over the TY threads of each of the TX columns of a (TX, TY) block (TX a power of two
// <= 32; thread id = ty * TX + tx). The result for column tx is returned to thread (tx, 0).
// Lanes of one warp with the same tx merge through shuffles, warps through shared memory.
template <typename acc_t, typename SharedStats>
__device__ Stats<acc_t> block_reduce(Stats<acc_t> v, int tx, int TX, SharedStats& smem) {
  for (int delta = kWarp / 2; delta >= TX; delta >>= 1) {
    v = merge_stats(v, shfl_down(v, delta));
  }
  const int tid = threadIdx.y * blockDim.x + threadIdx.x;
  const int warp = tid / kWarp, lane = tid % kWarp;
  const int warps = (blockDim.x * blockDim.y + kWarp - 1) / kWarp;
  // After the shuffles lanes 0..TX-1 of each warp hold that warp's column results.
  if (lane < TX) smem[warp * TX + lane] = v;
  __syncthreads();
  if (tid < TX) {
    v = smem[tid];
    for (int w = 1; w < warps; ++w) v = merge_stats(v, static_cast<Stats<acc_t>>(smem[w * TX + tid]));
  }
  __syncthreads();  // smem is reused by the caller's next channel
  return v;
}

// ---- the pass kernel --------------------------------------------------------------------------
struct PassArgs {
  const void* grad_output;
  const void* input;
  void* grad_input;  // nullptr: do not write dx
  int64_t C, HW, M;  // M = N * HW values per channel
  int64_t slice;     // values (NCHW) or rows (channels_last) per block along the reduction
  int slices;        // blocks per channel tile along the reduction
  int tile;          // channels_last: TX channels per block
  const void* mean;
  const void* invstd;
  const void* weight;  // nullptr: affine=False
  const void* coeffs;  // train grad_input pass: [3][C] scale, mean_dy, k from the finish kernel
  Partial* partials;   // out: [C][slices]
};

template <Pass P, typename acc_t>
__device__ __forceinline__ GradInputCoeffs<acc_t> channel_coeffs(const PassArgs& a, int64_t c) {
  GradInputCoeffs<acc_t> cf{acc_t(0), acc_t(0), acc_t(0), acc_t(0)};
  if (P == Pass::kMoments) return cf;  // no parameters: mean etc. are null
  cf.mean = static_cast<const acc_t*>(a.mean)[c];
  if (P == Pass::kGradInputTrain) {
    const acc_t* k = static_cast<const acc_t*>(a.coeffs);
    cf.scale = k[c];
    cf.mean_dy = k[a.C + c];
    cf.k = k[2 * a.C + c];
  } else if (P == Pass::kEvalFused) {
    const acc_t* invstd = static_cast<const acc_t*>(a.invstd);
    const acc_t* weight = static_cast<const acc_t*>(a.weight);
    cf.scale = (weight ? weight[c] : acc_t(1)) * invstd[c];
  }
  return cf;
}

// Visits the `count` offsets off0, off0 + step, ... of one channel (step handled by Walker) and
// accumulates into a thread's Stats; loads of kUnroll values are issued before they are used.
template <Pass P, bool kWrite, typename scalar_t, typename acc_t, typename Walker>
__device__ __forceinline__ void visit_values(const PassArgs& a, Walker walker, int64_t count,
                                             const GradInputCoeffs<acc_t>& cf, StreamMoments<acc_t>& m_dy,
                                             StreamMoments<acc_t>& m_dx, acc_t& sum_dy, acc_t& sum_dy_xmu) {
  using S = Storage<scalar_t>;
  const scalar_t* __restrict__ dy = static_cast<const scalar_t*>(a.grad_output);
  const scalar_t* __restrict__ x = static_cast<const scalar_t*>(a.input);
  scalar_t* __restrict__ dx = static_cast<scalar_t*>(a.grad_input);
  for (int64_t i = 0; i < count; i += kUnroll) {
    int64_t off[kUnroll];
    scalar_t dy_v[kUnroll], x_v[kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      off[u] = walker.offset();
      walker.advance();
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u < count) {
        dy_v[u] = dy[off[u]];
        if (P != Pass::kMoments) x_v[u] = x[off[u]];
      }
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      if (i + u >= count) break;
      const acc_t g = S::load(dy_v[u]);
      if (P == Pass::kMoments) {
        m_dy.add(g);
        continue;
      }
      const acc_t xv = S::load(x_v[u]);
      if (P != Pass::kGradInputTrain) {
        sum_dy += g;
        sum_dy_xmu += g * (xv - cf.mean);
        m_dy.add(g);
      }
      if (P != Pass::kReduceGradOutput) {
        const acc_t exact = P == Pass::kEvalFused
                                ? grad_input_eval(g, cf.scale)
                                : grad_input_train(g, xv, cf.mean, cf.scale, cf.mean_dy, cf.k);
        const scalar_t stored = S::store(exact);
        if (kWrite) dx[off[u]] = stored;
        m_dx.add(S::load(stored));  // statistics of dx as returned
      }
    }
  }
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

template <Pass P, bool kWrite, bool kChannelsLast, typename scalar_t>
__global__ void __launch_bounds__(kThreads, 2) bn_pass_kernel(PassArgs a) {
  using acc_t = typename Storage<scalar_t>::acc_t;
  GS_SHARED_ARRAY(smem, kThreads / kWarp * kWarp, Stats<acc_t>);
  const int TX = kChannelsLast ? a.tile : 1;
  const int tx = kChannelsLast ? threadIdx.x : 0;
  const int ty = kChannelsLast ? threadIdx.y : threadIdx.x;
  const int TY = kChannelsLast ? blockDim.y : blockDim.x;
  const int slice = kChannelsLast ? blockIdx.y : blockIdx.x;
  // The reduction range of this block: [begin, end) values (NCHW) or rows (channels_last).
  const int64_t begin = static_cast<int64_t>(slice) * a.slice;
  const int64_t end = begin + a.slice < a.M ? begin + a.slice : a.M;
  const int64_t first = begin + ty;
  const int64_t count = first < end ? (end - first + TY - 1) / TY : 0;

  // Statistics of channel c over this block's slice, reduced to one Partial. Every thread takes
  // part (block_reduce synchronises); `active` is false for channels_last lanes past C.
  auto process_channel = [&](int64_t c, bool active) {
    StreamMoments<acc_t> m_dy, m_dx;
    acc_t sum_dy = 0, sum_dy_xmu = 0;
    if (active && count > 0) {
      const GradInputCoeffs<acc_t> cf = channel_coeffs<P, acc_t>(a, c);
      if (kChannelsLast) {
        RowWalker w{first * a.C + c, static_cast<int64_t>(TY) * a.C};
        visit_values<P, kWrite, scalar_t>(a, w, count, cf, m_dy, m_dx, sum_dy, sum_dy_xmu);
      } else {
        NchwWalker w{first / a.HW, first % a.HW, a.HW, a.C * a.HW, c * a.HW, TY / a.HW, TY % a.HW};
        visit_values<P, kWrite, scalar_t>(a, w, count, cf, m_dy, m_dx, sum_dy, sum_dy_xmu);
      }
    }
    m_dy.fold();
    m_dx.fold();
    const Stats<acc_t> total = block_reduce(
        Stats<acc_t>{m_dy.folded, m_dx.folded, sum_dy, sum_dy_xmu, m_dy.nonfinite, m_dx.nonfinite}, tx, TX,
        smem);
    if (ty == 0 && active) {
      Partial& out = a.partials[c * a.slices + slice];
      out.dy = {double(total.dy.n), double(total.dy.mean), double(total.dy.m2)};
      out.dx = {double(total.dx.n), double(total.dx.mean), double(total.dx.m2)};
      out.sum_dy = double(total.sum_dy);
      out.sum_dy_xmu = double(total.sum_dy_xmu);
      out.nonfinite_dy = double(total.nonfinite_dy);
      out.nonfinite_dx = double(total.nonfinite_dx);
    }
  };
  if (kChannelsLast) {
    const int64_t c = static_cast<int64_t>(blockIdx.x) * TX + tx;
    process_channel(c, c < a.C);
  } else {
    // gridDim.y is capped at 65535, so NCHW blocks may visit several channels.
    for (int64_t c = blockIdx.y; c < a.C; c += gridDim.y) process_channel(c, true);
  }
}

// ---- finishing per channel: one warp merges the partials of one channel in double -------------
struct FinishArgs {
  const Partial* partials;  // [C][slices]
  int64_t C;
  int slices;
  double m;  // values per channel
  bool train;
  const void* mean;
  const void* invstd;
  const void* weight;
  void* coeffs;  // out (train, after the reduction): [3][C] scale, mean_dy, k in acc_t
  void* grad_weight;
  void* grad_bias;
  double* stats;  // [2][4][C]
};

__device__ __forceinline__ Partial merge_partial(const Partial& a, const Partial& b) {
  return {merge_moments(a.dy, b.dy),   merge_moments(a.dx, b.dx),       a.sum_dy + b.sum_dy,
          a.sum_dy_xmu + b.sum_dy_xmu, a.nonfinite_dy + b.nonfinite_dy, a.nonfinite_dx + b.nonfinite_dx};
}

// What a finish kernel writes (bit flags): dy stats; grad_weight, grad_bias and the constants of
// dx (train); dx stats. Train: the first two after the reduction, then dx stats; eval: all
// three (its single pass measured everything); channel_moments: dy stats.
enum Finish : int { kDyStats = 1, kGradsAndCoeffs = 2, kDxStats = 4 };

template <int kWhat, typename acc_t>
__global__ void __launch_bounds__(kThreads) finish_kernel(FinishArgs a) {
  const int lane = threadIdx.x % kWarp;
  const int64_t c = static_cast<int64_t>(blockIdx.x) * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  if (c >= a.C) return;  // whole warps exit together
  Partial total{{0, 0, 0}, {0, 0, 0}, 0, 0, 0, 0};
  for (int s = lane; s < a.slices; s += kWarp) {
    total = merge_partial(total, a.partials[c * a.slices + s]);
  }
  for (int delta = kWarp / 2; delta > 0; delta >>= 1) {
    Partial other{shfl_down(total.dy, delta),
                  shfl_down(total.dx, delta),
                  __shfl_down_sync(0xffffffffu, total.sum_dy, delta),
                  __shfl_down_sync(0xffffffffu, total.sum_dy_xmu, delta),
                  __shfl_down_sync(0xffffffffu, total.nonfinite_dy, delta),
                  __shfl_down_sync(0xffffffffu, total.nonfinite_dx, delta)};
    total = merge_partial(total, other);
  }
  if (lane != 0) return;
  if (kWhat & kDyStats) {
    store_stats(a.stats, kGradOutput, a.C, c, total.dy, total.nonfinite_dy);
  }
  if (kWhat & kGradsAndCoeffs) {
    const acc_t* mean = static_cast<const acc_t*>(a.mean);
    const acc_t* invstd = static_cast<const acc_t*>(a.invstd);
    const acc_t* weight = static_cast<const acc_t*>(a.weight);
    static_cast<acc_t*>(a.grad_bias)[c] = static_cast<acc_t>(total.sum_dy);
    static_cast<acc_t*>(a.grad_weight)[c] =
        static_cast<acc_t>(total.sum_dy_xmu * static_cast<double>(invstd[c]));
    if (a.train) {
      // In double, rounded once to acc_t, as on the CPU.
      const GradInputCoeffs<double> g = grad_input_coeffs<double>(
          true, a.m, total.sum_dy, total.sum_dy_xmu, mean[c], invstd[c], weight ? weight[c] : 1.0);
      acc_t* k = static_cast<acc_t*>(a.coeffs);
      k[c] = static_cast<acc_t>(g.scale);
      k[a.C + c] = static_cast<acc_t>(g.mean_dy);
      k[2 * a.C + c] = static_cast<acc_t>(g.k);
    }
  }
  if (kWhat & kDxStats) {
    store_stats(a.stats, kGradInput, a.C, c, total.dx, total.nonfinite_dx);
  }
}

// ---- host side ---------------------------------------------------------------------------------
struct Plan {
  bool channels_last;
  int tile;       // channels_last: TX
  int rows;       // threads along the reduction in a block (TY, or 512 for NCHW)
  int64_t tiles;  // channel tiles (NCHW: C)
  int slices;
  int64_t slice;  // values or rows per block
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
  // grid's y limit of 65535 (channels_last) or x limit (NCHW, generous).
  const int64_t wanted = std::max<int64_t>(1, (4LL * num_sms + plan.tiles - 1) / plan.tiles);
  const int64_t useful = std::max<int64_t>(1, M / (static_cast<int64_t>(plan.rows) * 32));
  int64_t slices = std::min<int64_t>(std::min(wanted, useful), 65535);
  plan.slice = (M + slices - 1) / slices;
  plan.slices = static_cast<int>((M + plan.slice - 1) / plan.slice);
  return plan;
}

size_t align16(size_t n) { return (n + 15) / 16 * 16; }

size_t acc_size(ScalarKind k) { return k == ScalarKind::Double ? sizeof(double) : sizeof(float); }

template <Pass P, bool kWrite, typename scalar_t>
cudaError_t launch_pass(const Plan& plan, const PassArgs& args, cudaStream_t stream) {
  if (plan.channels_last) {
    const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.slices));
    const dim3 block(plan.tile, plan.rows);
    GS_LAUNCH(grid, block, 0, stream, bn_pass_kernel<P, kWrite, true, scalar_t>)(args);
  } else {
    const unsigned channels_y = static_cast<unsigned>(std::min<int64_t>(plan.tiles, 65535));
    const dim3 grid(static_cast<unsigned>(plan.slices), channels_y);
    GS_LAUNCH(grid, kThreads, 0, stream, bn_pass_kernel<P, kWrite, false, scalar_t>)(args);
  }
  return cudaGetLastError();
}

template <int kWhat, typename acc_t>
cudaError_t launch_finish(const FinishArgs& args, cudaStream_t stream) {
  constexpr int kChannelsPerBlock = kThreads / kWarp;
  const int64_t blocks = (args.C + kChannelsPerBlock - 1) / kChannelsPerBlock;
  GS_LAUNCH(static_cast<unsigned>(blocks), kThreads, 0, stream, finish_kernel<kWhat, acc_t>)(args);
  return cudaGetLastError();
}

template <typename scalar_t, bool kWrite>
cudaError_t run(const BnBackwardProblem& p, void* workspace, int num_sms, cudaStream_t stream) {
  using acc_t = typename Storage<scalar_t>::acc_t;
  const Plan plan = make_plan(p, num_sms);
  char* ws = static_cast<char*>(workspace);
  Partial* partials = reinterpret_cast<Partial*>(ws);
  void* coeffs = ws + align16(sizeof(Partial) * p.C * plan.slices);

  PassArgs pass{p.grad_output, p.input,   p.grad_input, p.C,      p.HW,     p.N * p.HW, plan.slice,
                plan.slices,   plan.tile, p.mean,       p.invstd, p.weight, coeffs,     partials};
  FinishArgs fin{partials, p.C,           plan.slices, static_cast<double>(p.N) * static_cast<double>(p.HW),
                 p.train,  p.mean,        p.invstd,    p.weight,
                 coeffs,   p.grad_weight, p.grad_bias, p.stats};
  cudaError_t err;
  if (p.moments_only) {
    if ((err = launch_pass<Pass::kMoments, false, scalar_t>(plan, pass, stream))) return err;
    return launch_finish<kDyStats, acc_t>(fin, stream);
  }
  if (!p.train) {
    if ((err = launch_pass<Pass::kEvalFused, kWrite, scalar_t>(plan, pass, stream))) return err;
    return launch_finish < kDyStats | kGradsAndCoeffs | kDxStats, acc_t > (fin, stream);
  }
  if ((err = launch_pass<Pass::kReduceGradOutput, false, scalar_t>(plan, pass, stream))) return err;
  if ((err = launch_finish < kDyStats | kGradsAndCoeffs, acc_t > (fin, stream))) return err;
  if ((err = launch_pass<Pass::kGradInputTrain, kWrite, scalar_t>(plan, pass, stream))) return err;
  return launch_finish<kDxStats, acc_t>(fin, stream);
}

template <typename scalar_t>
cudaError_t run_maybe_write(const BnBackwardProblem& p, void* ws, int sms, cudaStream_t stream) {
  return p.grad_input ? run<scalar_t, true>(p, ws, sms, stream) : run<scalar_t, false>(p, ws, sms, stream);
}

}  // namespace

size_t bn_backward_stats_workspace_bytes(const BnBackwardProblem& p, int num_sms) {
  const Plan plan = make_plan(p, num_sms);
  return align16(sizeof(Partial) * p.C * plan.slices) + 3 * p.C * acc_size(p.dtype);
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
