// The CUDA built-ins the kernels of csrc/cuda use, for compiling them with the host C++ compiler
// and running them on the CPU (tests only: scripts/cuda_emulator.sh). Included through
// ../cuda/emulatable.h when GRADSTATS_CUDA_EMU is defined.
//
// Execution model: a launch runs its blocks one after another; within a block every thread is a
// fiber with its own stack, and a thread runs until it reaches a barrier (__syncthreads, or the
// warp-wide exchange of a shuffle), where it hands over to the next thread. So all threads of a
// block make progress concurrently up to each barrier, as on a GPU, in a fixed order (results are
// reproducible).
//
// Checks, each reported as a launch failure whose message names the kernel:
//   - shared memory races: two threads touching the same element of a shared array between two
//     __syncthreads(), at least one of them writing (arrays declared with GS_SHARED_ARRAY);
//     out-of-range indices into shared arrays;
//   - shuffles whose mask leaves out the calling lane or names a lane that has exited or does not
//     exist, or whose source lane is not in the mask;
//   - __syncthreads() that not every thread of the block reaches (a thread exits while others
//     wait), and deadlocks;
//   - invalid launch configurations (empty grid, more than 1024 threads, grid.y or grid.z > 65535).
// Out-of-range global memory accesses are left to AddressSanitizer (GRADSTATS_EMU_SANITIZE=1).
#pragma once

#include <cuda_runtime.h>  // dim3, cudaError_t, cudaStream_t; __global__ and friends compile away

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <deque>
#include <string>
#include <tuple>
#include <type_traits>
#include <vector>

using std::isfinite;  // device code calls it unqualified

namespace gs_emu {

// The state of one emulated thread.
struct Fiber {
  void* sp = nullptr;  // saved stack pointer while switched out
  char* stack = nullptr;
  size_t stack_size = 0;
  dim3 idx;
  unsigned linear = 0;  // threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z)
  enum State { kReady, kAtBarrier, kAtWarpSync, kDone } state = kReady;
  unsigned shuffle_parity = 0;
  unsigned shared_decls = 0;  // shared arrays declared so far in this block
};

// Per-element record of the accesses to a shared array since the last barrier.
struct Access {
  uint64_t epoch = 0;
  int writer = -1;
  int reader = -1;
  bool many_readers = false;
};

struct SharedSlot {
  std::vector<unsigned char> bytes;
  std::vector<Access> shadow;
  const char* name = nullptr;
};

struct Launch {
  const char* kernel = "";
  dim3 grid, block, block_idx;
  unsigned threads = 0, live = 0, arrived = 0;
  uint64_t epoch = 1;  // advances at every barrier and every block
  Fiber* current = nullptr;
  // A deque: a kernel's later shared arrays must not move the slots of its earlier ones, which
  // the SharedArray objects of the threads point to.
  std::deque<SharedSlot> shared;
};

Launch& launch_state();
inline Fiber& self() { return *launch_state().current; }

void syncthreads();
uint64_t warp_exchange(unsigned mask, uint64_t bits, int src_lane_offset, int width, const char* op);
void report(const std::string& message);
void check_shared_access(SharedSlot& slot, size_t index, size_t count, bool write);
SharedSlot& shared_slot(const char* name, size_t bytes, size_t count);

// The error of the last launch (cudaSuccess if none), cleared by reading, as cudaGetLastError.
cudaError_t take_last_error();
// The message of the first failure since the last call, and clears it.
std::string take_error_message();

// Runs body() as every thread of every block of a grid.
void run_grid(const char* kernel, dim3 grid, dim3 block, void (*body)(void*), void* ctx);

// A shared array as the kernels see it: indexing checks the range and records each access.
template <typename T>
class SharedArray {
 public:
  class Element {
   public:
    Element(SharedArray* a, size_t i) : a_(a), i_(i) {}
    operator T() const {
      check_shared_access(*a_->slot_, i_, a_->count_, false);
      return a_->data()[i_ < a_->count_ ? i_ : 0];
    }
    Element& operator=(const T& v) {
      check_shared_access(*a_->slot_, i_, a_->count_, true);
      if (i_ < a_->count_) a_->data()[i_] = v;
      return *this;
    }
    Element& operator=(const Element& other) { return *this = static_cast<T>(other); }

   private:
    SharedArray* a_;
    size_t i_;
  };
  SharedArray(SharedSlot* slot, size_t count) : slot_(slot), count_(count) {}
  Element operator[](size_t i) { return Element(this, i); }

 private:
  T* data() { return reinterpret_cast<T*>(slot_->bytes.data()); }
  SharedSlot* slot_;
  size_t count_;
};

template <typename T>
SharedArray<T> shared_array(const char* name, size_t count) {
  static_assert(std::is_trivially_copyable<T>::value, "shared arrays hold plain data");
  return SharedArray<T>(&shared_slot(name, sizeof(T) * count, count), count);
}

template <typename T>
T shuffle(unsigned mask, T var, int offset, int width, const char* op) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffles move up to 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_exchange(mask, bits, offset, width, op);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// kernel<<<grid, block, 0, stream>>>(args...) for the emulator.
template <typename... Params>
struct Launcher {
  const char* name;
  dim3 grid, block;
  void (*kernel)(Params...);
  template <typename... Args>
  void operator()(Args&&... args) const {
    struct Ctx {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...> params;
    } ctx{kernel, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    run_grid(
        name, grid, block,
        [](void* p) {
          Ctx& c = *static_cast<Ctx*>(p);
          std::apply(c.kernel, c.params);  // each thread gets its own copy of by-value parameters
        },
        &ctx);
  }
};

template <typename... Params>
Launcher<Params...> launcher(const char* name, dim3 grid, dim3 block, void (*kernel)(Params...)) {
  return Launcher<Params...>{name, grid, block, kernel};
}

}  // namespace gs_emu

#define threadIdx (::gs_emu::self().idx)
#define blockIdx (::gs_emu::launch_state().block_idx)
#define blockDim (::gs_emu::launch_state().block)
#define gridDim (::gs_emu::launch_state().grid)
#define __syncthreads() ::gs_emu::syncthreads()
#define __launch_bounds__(...)
#define cudaGetLastError() ::gs_emu::take_last_error()

template <typename T>
inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = 32) {
  return ::gs_emu::shuffle(mask, var, static_cast<int>(delta), width, "__shfl_down_sync");
}

// The emulated forms of the two things plain CUDA cannot express on the host (see
// ../cuda/emulatable.h).
#define GS_SHARED_ARRAY(name, count, ...) auto name = ::gs_emu::shared_array<__VA_ARGS__>(#name, count)
#define GS_LAUNCH(grid, block, smem, stream, ...) ::gs_emu::launcher(#__VA_ARGS__, grid, block, __VA_ARGS__)
