// The emulator's run time: fibers for the threads of a block, the barrier, the warp exchange
// behind shuffles, shared-memory race detection and error reporting (see emulator.h).
#include "emulator.h"

#include <pthread.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <memory>

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

namespace gs_emu {
namespace {

constexpr unsigned kWarp = 32;
constexpr unsigned kMaxThreads = 1024;
// Enough for the kernels' frames (a few KB) with a wide margin; ASan's redzones need more.
#if defined(__SANITIZE_ADDRESS__)
constexpr size_t kStackBytes = 1 << 20;
#else
constexpr size_t kStackBytes = 256 << 10;
#endif

Launch g_launch;
cudaError_t g_last_error = cudaSuccess;
std::string g_message;

// ---- context switch ---------------------------------------------------------------------------
// A switch saves the callee-saved registers on the current stack, stores the stack pointer in
// *save and continues on the stack `to`. No signal mask is saved (swapcontext would make a
// system call per switch, and a block of 512 threads switches ~50 times per thread).
#if defined(__x86_64__)
extern "C" void gs_emu_switch(void** save, void* to);
asm(R"(
  .text
  .globl gs_emu_switch
  .type gs_emu_switch, @function
gs_emu_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size gs_emu_switch, .-gs_emu_switch
)");
#endif

void* g_main_sp = nullptr;  // the launcher's stack while a block runs
void (*g_body)(void*) = nullptr;
void* g_ctx = nullptr;
std::vector<std::unique_ptr<Fiber>> g_fibers;

#if defined(__SANITIZE_ADDRESS__)
const void* g_main_bottom = nullptr;
size_t g_main_size = 0;
#endif

#if !defined(__x86_64__)
ucontext_t g_main_uc;
std::vector<ucontext_t> g_uc;
#endif

// Warp exchange: the values of one shuffle of each lane, double-buffered by the parity of the
// lane's shuffle count (a lane can only reuse a buffer after every lane has read it).
struct Warp {
  uint64_t value[2][kWarp];
  unsigned arrived[2];
  unsigned present;  // lanes that exist (the last warp of a block may be partial)
  unsigned exited;   // lanes whose thread has returned
  const char* op;    // the last shuffle's name, for reports
};
std::vector<Warp> g_warps;

void fiber_entry();
std::string thread_name(int linear);

// Switches from the running context (a fiber, or the launcher when from == nullptr) to fiber
// `to` (the launcher when to == nullptr).
void switch_to(Fiber* from, Fiber* to) {
  Launch& L = g_launch;
  L.current = to;
#if defined(__SANITIZE_ADDRESS__)
  // AddressSanitizer must know which stack is current; a finished fiber keeps no fake stack.
  void* fake = nullptr;
  const bool finished = from && from->state == Fiber::kDone;
  __sanitizer_start_switch_fiber(finished ? nullptr : &fake, to ? to->stack : g_main_bottom,
                                 to ? to->stack_size : g_main_size);
#endif
#if defined(__x86_64__)
  gs_emu_switch(from ? &from->sp : &g_main_sp, to ? to->sp : g_main_sp);
#else
  swapcontext(from ? &g_uc[from->linear] : &g_main_uc, to ? &g_uc[to->linear] : &g_main_uc);
#endif
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#endif
}

// Prepares fiber f to start at fiber_entry on its own stack.
void reset(Fiber& f) {
#if defined(__x86_64__)
  // Stack at entry, as if fiber_entry had been called: 16-byte aligned top, a null return
  // address, fiber_entry for gs_emu_switch's `ret`, and six zeroed callee-saved registers.
  uintptr_t top = (reinterpret_cast<uintptr_t>(f.stack) + f.stack_size) & ~uintptr_t(15);
  void** sp = reinterpret_cast<void**>(top);
  *--sp = nullptr;
  *--sp = reinterpret_cast<void*>(&fiber_entry);
  for (int i = 0; i < 6; ++i) *--sp = nullptr;
  f.sp = sp;
#else
  ucontext_t& uc = g_uc[f.linear];
  getcontext(&uc);
  uc.uc_stack.ss_sp = f.stack;
  uc.uc_stack.ss_size = f.stack_size;
  uc.uc_link = nullptr;
  makecontext(&uc, &fiber_entry, 0);
#endif
  f.state = Fiber::kReady;
  f.shuffle_parity = 0;
  f.shared_decls = 0;
}

Fiber& fiber(unsigned i) {
  while (g_fibers.size() <= i) {
    auto f = std::make_unique<Fiber>();
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* mem = mmap(nullptr, kStackBytes + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) {
      std::perror("cuda emulator: mmap of a thread stack");
      std::abort();
    }
    mprotect(mem, page, PROT_NONE);  // a guard page: a stack overflow faults instead of corrupting
    f->stack = static_cast<char*>(mem) + page;
    f->stack_size = kStackBytes;
    f->linear = static_cast<unsigned>(g_fibers.size());
    g_fibers.push_back(std::move(f));
  }
#if !defined(__x86_64__)
  if (g_uc.size() < g_fibers.size()) g_uc.resize(g_fibers.size());
#endif
  return *g_fibers[i];
}

// Hands over to the next thread of the block that can run, in round-robin order, or back to
// the launcher when none can (the block is done, or deadlocked).
void yield() {
  Launch& L = g_launch;
  Fiber* from = L.current;
  for (unsigned k = 1; k <= L.threads; ++k) {
    Fiber& f = *g_fibers[(from->linear + k) % L.threads];
    if (f.state == Fiber::kReady) {
      if (&f != from) switch_to(from, &f);
      return;
    }
  }
  switch_to(from, nullptr);
}

void fiber_entry() {
#if defined(__SANITIZE_ADDRESS__)
  __sanitizer_finish_switch_fiber(nullptr, nullptr, nullptr);
#endif
  g_body(g_ctx);
  Launch& L = g_launch;
  Fiber& f = self();
  f.state = Fiber::kDone;
  Warp& w = g_warps[f.linear / kWarp];
  w.exited |= 1u << (f.linear % kWarp);
  if (w.arrived[0] | w.arrived[1]) {  // lanes wait in a shuffle that counts on this one
    report(std::string(w.op) + ": the mask names lane " + std::to_string(f.linear % kWarp) +
           ", which has exited (" + thread_name(f.linear) + ")");
    for (unsigned l = 0; l < kWarp; ++l) {
      Fiber& other = *g_fibers[f.linear - f.linear % kWarp + l];
      if ((w.present >> l & 1u) && other.state == Fiber::kAtWarpSync) other.state = Fiber::kReady;
    }
    w.arrived[0] = w.arrived[1] = 0;
  }
  --L.live;
  if (L.arrived > 0) {
    report("thread (" + std::to_string(f.idx.x) + "," + std::to_string(f.idx.y) + "," +
           std::to_string(f.idx.z) + ") exited while other threads of its block wait at __syncthreads()");
    if (L.arrived == L.live) {  // release them, so the block can finish and report
      L.arrived = 0;
      ++L.epoch;
      for (unsigned i = 0; i < L.threads; ++i) {
        if (g_fibers[i]->state == Fiber::kAtBarrier) g_fibers[i]->state = Fiber::kReady;
      }
    }
  }
  yield();
  std::abort();  // a finished fiber is never resumed
}

std::string kernel_and_block() {
  const Launch& L = g_launch;
  return std::string(" in kernel ") + L.kernel + ", block (" + std::to_string(L.block_idx.x) + "," +
         std::to_string(L.block_idx.y) + "," + std::to_string(L.block_idx.z) + ")";
}

std::string thread_name(int linear) {
  const Launch& L = g_launch;
  const unsigned x = linear % L.block.x, y = (linear / L.block.x) % L.block.y,
                 z = linear / (L.block.x * L.block.y);
  return "thread (" + std::to_string(x) + "," + std::to_string(y) + "," + std::to_string(z) + ")";
}

}  // namespace

Launch& launch_state() { return g_launch; }

void report(const std::string& message) {
  if (g_message.empty()) g_message = message + kernel_and_block();
  g_last_error = cudaErrorLaunchFailure;
}

cudaError_t take_last_error() {
  const cudaError_t e = g_last_error;
  g_last_error = cudaSuccess;
  return e;
}

std::string take_error_message() {
  std::string m;
  m.swap(g_message);
  return m;
}

void syncthreads() {
  Launch& L = g_launch;
  Fiber& f = self();
  if (++L.arrived == L.live) {
    L.arrived = 0;
    ++L.epoch;
    for (unsigned i = 0; i < L.threads; ++i) {
      if (g_fibers[i]->state == Fiber::kAtBarrier) g_fibers[i]->state = Fiber::kReady;
    }
    return;
  }
  f.state = Fiber::kAtBarrier;
  yield();
}

uint64_t warp_exchange(unsigned mask, uint64_t bits, int offset, int width, const char* op) {
  Launch& L = g_launch;
  Fiber& f = self();
  const unsigned lane = f.linear % kWarp, base = f.linear - lane;
  auto where = [&] { return std::string(op) + " by " + thread_name(f.linear); };
  if (!(mask >> lane & 1u)) report(where() + ": the mask leaves out the calling lane");
  Warp& w = g_warps[f.linear / kWarp];
  if (const unsigned absent = mask & ~(w.present & ~w.exited)) {
    for (unsigned l = 0; l < kWarp; ++l) {
      if (absent >> l & 1u) {
        report(where() + ": the mask names lane " + std::to_string(l) + ", which " +
               (base + l >= L.threads ? "does not exist" : "has exited"));
      }
    }
    mask &= ~absent;
  }
  w.op = op;
  const unsigned parity = f.shuffle_parity;
  f.shuffle_parity ^= 1u;
  w.value[parity][lane] = bits;
  w.arrived[parity] |= 1u << lane;
  if ((w.arrived[parity] & mask) == mask) {
    w.arrived[parity] = 0;
    for (unsigned l = 0; l < kWarp; ++l) {
      if ((mask >> l & 1u) && g_fibers[base + l]->state == Fiber::kAtWarpSync) {
        g_fibers[base + l]->state = Fiber::kReady;
      }
    }
  } else {
    f.state = Fiber::kAtWarpSync;
    yield();
  }
  // Source lane within the lane's segment of `width` lanes; out of the segment: its own value.
  const int segment_lane = static_cast<int>(lane) % width;
  const int src_in_segment = segment_lane + offset;
  if (src_in_segment < 0 || src_in_segment >= width) return bits;
  const unsigned src = lane - segment_lane + src_in_segment;
  if (!(mask >> src & 1u)) {
    report(where() + ": source lane " + std::to_string(src) + " is not in the mask");
    return bits;
  }
  return w.value[parity][src];
}

SharedSlot& shared_slot(const char* name, size_t bytes, size_t count) {
  Launch& L = g_launch;
  Fiber& f = self();
  const unsigned k = f.shared_decls++;
  if (k >= L.shared.size()) {
    L.shared.emplace_back();
    SharedSlot& s = L.shared.back();
    s.name = name;
    // Shared memory starts undefined: fill it with a pattern that makes unwritten reads show.
    s.bytes.assign(bytes, 0xFF);
    s.shadow.assign(count, Access{});
  }
  return L.shared[k];
}

void check_shared_access(SharedSlot& slot, size_t index, size_t count, bool write) {
  const Launch& L = g_launch;
  const int t = static_cast<int>(self().linear);
  auto what = [&] {
    return std::string("shared array '") + slot.name + "' element " + std::to_string(index);
  };
  if (index >= count) {
    report(thread_name(t) + (write ? " writes" : " reads") + " out of range: " + what() + " of " +
           std::to_string(count));
    return;
  }
  Access& a = slot.shadow[index];
  if (a.epoch != L.epoch) a = Access{L.epoch, -1, -1, false};
  if (write) {
    if (a.writer >= 0 && a.writer != t) {
      report("race on " + what() + ": written by " + thread_name(a.writer) + " and " + thread_name(t) +
             " with no __syncthreads() between");
    } else if (a.many_readers || (a.reader >= 0 && a.reader != t)) {
      const std::string reader = a.reader != t ? thread_name(a.reader) : "other threads";
      report("race on " + what() + ": " + thread_name(t) + " writes it after " + reader +
             " read it, with no __syncthreads() between");
    }
    a.writer = t;
  } else {
    if (a.writer >= 0 && a.writer != t) {
      report("race on " + what() + ": " + thread_name(t) + " reads it after " + thread_name(a.writer) +
             " wrote it, with no __syncthreads() between");
    }
    if (a.reader < 0) {
      a.reader = t;
    } else if (a.reader != t) {
      a.many_readers = true;
    }
  }
}

void run_grid(const char* kernel, dim3 grid, dim3 block, void (*body)(void*), void* ctx) {
  Launch& L = g_launch;
  L.kernel = kernel;
  L.grid = grid;
  L.block = block;
  L.block_idx = dim3(0, 0, 0);
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > kMaxThreads || block.z > 64 || grid.x == 0 || grid.y == 0 || grid.z == 0 ||
      grid.y > 65535 || grid.z > 65535) {
    if (g_message.empty()) {
      g_message = std::string("invalid launch configuration of kernel ") + kernel + ": grid (" +
                  std::to_string(grid.x) + "," + std::to_string(grid.y) + "," + std::to_string(grid.z) +
                  "), block (" + std::to_string(block.x) + "," + std::to_string(block.y) + "," +
                  std::to_string(block.z) + ")";
    }
    g_last_error = cudaErrorInvalidConfiguration;
    return;
  }
  L.threads = static_cast<unsigned>(threads);
  fiber(L.threads - 1);
#if defined(__SANITIZE_ADDRESS__)
  pthread_attr_t attr;
  pthread_getattr_np(pthread_self(), &attr);
  void* main_bottom = nullptr;
  pthread_attr_getstack(&attr, &main_bottom, &g_main_size);
  pthread_attr_destroy(&attr);
  g_main_bottom = main_bottom;
#endif
  g_warps.resize((L.threads + kWarp - 1) / kWarp);
  g_body = body;
  g_ctx = ctx;
  for (unsigned bz = 0; bz < grid.z; ++bz) {
    for (unsigned by = 0; by < grid.y; ++by) {
      for (unsigned bx = 0; bx < grid.x; ++bx) {
        L.block_idx = dim3(bx, by, bz);
        L.shared.clear();
        L.live = L.threads;
        L.arrived = 0;
        ++L.epoch;
        for (size_t i = 0; i < g_warps.size(); ++i) {
          Warp& w = g_warps[i];
          w.arrived[0] = w.arrived[1] = w.exited = 0;
          const unsigned lanes = std::min<unsigned>(kWarp, L.threads - static_cast<unsigned>(i) * kWarp);
          w.present = lanes == kWarp ? ~0u : (1u << lanes) - 1u;
        }
        for (unsigned i = 0; i < L.threads; ++i) {
          Fiber& f = *g_fibers[i];
          f.idx = dim3(i % block.x, (i / block.x) % block.y, i / (block.x * block.y));
          reset(f);
        }
        switch_to(nullptr, g_fibers[0].get());
        if (L.live != 0) {
          report("deadlock: " + std::to_string(L.live) +
                 " threads wait at a __syncthreads() or shuffle that the others never reach");
          return;  // the waiting fibers are abandoned; their stacks are reset by the next launch
        }
      }
    }
  }
}

}  // namespace gs_emu
