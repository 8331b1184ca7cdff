// Small kernels with one fault each, written as CUDA through ../cuda/emulatable.h, so that the
// tests can show that the emulator reports the fault (tests/test_cuda_emu.py).
#include <memory>
#include <stdexcept>
#include <string>

#include "../cuda/emulatable.h"

namespace gs_emu {
namespace {

// Every thread writes cells[0] between the same two barriers.
__global__ void racy_kernel(int* out) {
  GS_SHARED_ARRAY(cells, 64, int);
  cells[threadIdx.x % 64] = 1;
  __syncthreads();
  cells[0] = static_cast<int>(threadIdx.x);
  __syncthreads();
  out[threadIdx.x] = cells[0];
}

// Thread 5 returns before the barrier the others wait at.
__global__ void barrier_skipped_kernel(int* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[threadIdx.x] = 1;
}

// Lane 31 returns; the others shuffle with a full mask.
__global__ void shuffle_exited_lane_kernel(int* out) {
  if (threadIdx.x == 31) return;
  out[threadIdx.x] = __shfl_down_sync(0xffffffffu, static_cast<int>(threadIdx.x), 1);
}

// Thread 0 reads one element past the end of a shared array.
__global__ void shared_out_of_range_kernel(int* out) {
  GS_SHARED_ARRAY(cells, 64, int);
  cells[threadIdx.x] = 1;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = cells[64];
}

// Every thread reads its right neighbour's element of a 64-element global buffer: thread 63 reads
// one past the end. The emulator does not check global memory; AddressSanitizer does
// (GRADSTATS_EMU_SANITIZE=1), and aborts the process with a heap-buffer-overflow report.
__global__ void global_out_of_range_kernel(const int* in, int* out) {
  out[threadIdx.x] = in[threadIdx.x + 1];
}

}  // namespace

// Runs one faulty kernel on a block of 64 threads; throws with the emulator's report.
void run_faulty_kernel(const std::string& which) {
  int out[64] = {};
  take_error_message();
  take_last_error();
  if (which == "shared_race") {
    GS_LAUNCH(1, 64, 0, nullptr, racy_kernel)(out);
  } else if (which == "barrier_skipped") {
    GS_LAUNCH(1, 64, 0, nullptr, barrier_skipped_kernel)(out);
  } else if (which == "shuffle_exited_lane") {
    GS_LAUNCH(1, 64, 0, nullptr, shuffle_exited_lane_kernel)(out);
  } else if (which == "shared_out_of_range") {
    GS_LAUNCH(1, 64, 0, nullptr, shared_out_of_range_kernel)(out);
  } else if (which == "global_out_of_range") {
    // On the heap, as device memory from the caching allocator is: ASan guards its ends.
    const std::unique_ptr<int[]> in(new int[64]());
    GS_LAUNCH(1, 64, 0, nullptr, global_out_of_range_kernel)(in.get(), out);
  } else {
    throw std::invalid_argument("no faulty kernel named " + which);
  }
  if (take_last_error() != cudaSuccess) throw std::runtime_error(take_error_message());
}

}  // namespace gs_emu
