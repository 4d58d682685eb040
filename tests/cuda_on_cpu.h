// CUDA's device-side language on the CPU, for the tests: enough of it to compile
// larq_landmarks/runtime/csrc/kernels.cu with g++ and run its kernels, unchanged, on a machine
// without a GPU (tests/cuda_on_cpu.py builds and drives it).
//
// A block's threads are coroutines on one OS thread: each starts on its own stack once a launch
// by ucontext (makecontext, setcontext) and runs the kernel block after block, switching with
// _setjmp / _longjmp, which, unlike swapcontext, save and restore no signal mask: a switch is no
// system call. The scheduler always resumes the lowest-numbered runnable thread (or the highest,
// `order` < 0), so a thread runs ahead of the others until it reaches a barrier: a missing
// __syncthreads shows up as a read of another thread's data before it was written.
// Warp-synchronous operations (__ballot_sync, __shfl_xor_sync, the 1-bit m16n8k256 MMA) exchange
// values between the 32 lanes of a warp through a barrier of the warp; they need all 32 lanes
// (full masks, as the kernels use them), and a warp with an exited lane reaching one is an error.
// Shared memory (`__shared__` variables, placed in one section) is filled with a poison byte
// before every block, as a GPU leaves it undefined. A read through a pointer argument past its
// array's end lands on a guard page (the Python side places arrays so): the fault is caught and
// reported as an error of the launch.
#pragma once
#include <algorithm>
#include <cmath>
#include <csetjmp>
#include <csignal>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <string>
#include <vector>
#include <ucontext.h>

struct cuda_on_cpu_dim3 {
  unsigned x = 0, y = 0, z = 0;
};
struct uint2 {
  unsigned x, y;
};
struct uint4 {
  unsigned x, y, z, w;
};
struct float4 {
  float x, y, z, w;
};
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }

inline cuda_on_cpu_dim3 threadIdx, blockIdx, blockDim, gridDim;

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ static __attribute__((section("cuda_on_cpu_shared")))
#define LARQ_LANDMARKS_CUDA_ON_CPU 1

inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline int __popcll(unsigned long long v) { return __builtin_popcountll(v); }
inline int __ffsll(long long v) { return __builtin_ffsll(v); }
inline float __fmul_rn(float a, float b) {
  volatile float r = a * b;  // rounded on its own, never contracted into an FMA
  return r;
}
inline float __fadd_rn(float a, float b) {
  volatile float r = a + b;
  return r;
}
inline float __fdiv_rn(float a, float b) {
  volatile float r = a / b;
  return r;
}
inline float __int_as_float(int v) {
  float f;
  std::memcpy(&f, &v, 4);
  return f;
}

namespace cuda_on_cpu {

constexpr int kStackBytes = 256 * 1024;
constexpr unsigned kFullMask = 0xffffffffu;

struct Barrier {
  int arrived = 0;
  long generation = 0;
};

// A cp.async copy: issued by a thread, carried out at its next wait (cuda_on_cpu_copy_async_wait),
// so that data read before the wait is shared memory's old contents, as it may be on a GPU.
struct Copy {
  void* dst;
  const void* src;
  int bytes, src_bytes;  // src_bytes < bytes: the rest is zeros
};

struct Thread {
  ucontext_t context;  // where it starts
  jmp_buf resume;      // where it continues, once started
  bool started = false;
  std::vector<char> stack;
  std::vector<Copy> copies;  // issued, not yet waited for
  bool exited = false;
  const Barrier* waiting = nullptr;  // blocked until this barrier's generation passes `waiting_for`
  long waiting_for = 0;
};

struct Warp {
  Barrier barrier;
  int live = 32;
  unsigned values[32][10];  // what each lane hands to a warp-synchronous operation
};

struct Block {
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  Barrier barrier;
  int live = 0;
  int current = -1;
  jmp_buf scheduler;
  // the threads a barrier released since the scheduler last looked (first > last: none), so that
  // it need not look again at the threads it found waiting before
  int released_first = 1, released_last = 0;
};

inline Block block;
inline std::string error;  // empty while the launch goes well
inline void (*kernel_body)() = nullptr;
inline sigjmp_buf fault_return;
inline volatile sig_atomic_t in_kernel = 0;

extern "C" char __start_cuda_on_cpu_shared[] __attribute__((weak));
extern "C" char __stop_cuda_on_cpu_shared[] __attribute__((weak));

// The running thread hands control back to the scheduler; `resumable`: it continues here when
// the scheduler picks it again.
inline void yield(bool resumable) {
  if (!resumable || _setjmp(block.threads[block.current].resume) == 0) _longjmp(block.scheduler, 1);
}

inline void fail(const std::string& message) {
  if (error.empty()) error = message;
  yield(false);  // never resumed
}

inline std::string where() {
  return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
         std::to_string(blockIdx.z) + ") thread " + std::to_string(threadIdx.x);
}

// Lets the threads waiting at `barrier` (the block's, or the running thread's warp's) go on.
inline void release(Barrier& barrier) {
  barrier.arrived = 0;
  ++barrier.generation;
  const bool whole_block = &barrier == &block.barrier;
  const int first = whole_block ? 0 : block.current / 32 * 32;
  const int last = whole_block ? int(block.threads.size()) - 1 : first + 31;
  if (block.released_first > block.released_last) {
    block.released_first = first, block.released_last = last;
  } else {
    block.released_first = std::min(block.released_first, first);
    block.released_last = std::max(block.released_last, last);
  }
}

// Arrive at `barrier` of `participants` threads and wait for the others.
inline void wait_at(Barrier& barrier, int participants) {
  Thread& self = block.threads[block.current];
  const long generation = barrier.generation;
  if (++barrier.arrived >= participants) {
    release(barrier);
    return;
  }
  self.waiting = &barrier;
  self.waiting_for = generation;
  yield(true);
}

inline Warp& my_warp(unsigned mask, const char* what) {
  Warp& warp = block.warps[block.current / 32];
  if (mask != kFullMask) fail(std::string(what) + " with a partial mask is not emulated (" + where() + ")");
  if (warp.live != 32) fail(std::string(what) + " in a warp with exited lanes (" + where() + ")");
  return warp;
}

// Every lane deposits `count` words, waits for its warp, runs `combine` on all lanes' words, and
// waits again so that no lane overwrites its words before the others have read them.
template <class F>
inline void warp_exchange(unsigned mask, const char* what, const unsigned* mine, int count, F combine) {
  Warp& warp = my_warp(mask, what);
  const int lane = block.current % 32;
  std::memcpy(warp.values[lane], mine, count * sizeof(unsigned));
  wait_at(warp.barrier, 32);
  combine(warp.values, lane);
  wait_at(warp.barrier, 32);
}

// A thread's life in a launch: the kernel for one block after another (the scheduler resumes it
// for the next block), so that it starts on its stack once per launch, not once per block.
inline void entry() {
  for (;;) {
    kernel_body();
    Thread& self = block.threads[block.current];
    if (!self.copies.empty())
      fail(std::to_string(self.copies.size()) + " cp.async copies never waited for (" + where() + ")");
    self.exited = true;
    --block.live;
    --block.warps[block.current / 32].live;
    // an exited thread no longer holds back a __syncthreads
    if (block.barrier.arrived > 0 && block.barrier.arrived >= block.live) release(block.barrier);
    yield(true);
  }
}

inline void on_fault(int signal_number) {
  if (!in_kernel) {
    std::signal(signal_number, SIG_DFL);
    std::raise(signal_number);
    return;
  }
  siglongjmp(fault_return, 1);
}

// Runs the whole grid; returns 0, or 1 with `error` set. `order` >= 0: the lowest-numbered
// runnable thread goes first, < 0: the highest.
inline int run_grid(const int* grid, const int* block_dim, void (*body)(), int order) {
  error.clear();
  kernel_body = body;
  gridDim = {unsigned(grid[0]), unsigned(grid[1]), unsigned(grid[2])};
  blockDim = {unsigned(block_dim[0]), unsigned(block_dim[1]), unsigned(block_dim[2])};
  const int threads = block_dim[0] * block_dim[1] * block_dim[2];
  if (block_dim[1] != 1 || block_dim[2] != 1 || threads % 32 != 0 || threads > 1024) {
    error = "blocks of " + std::to_string(threads) + " threads in x only, a multiple of 32, are emulated";
    return 1;
  }
  block.threads.resize(threads);
  for (Thread& t : block.threads) {
    if (t.stack.empty()) t.stack.resize(kStackBytes);
    t.started = false;
    getcontext(&t.context);
    t.context.uc_stack.ss_sp = t.stack.data();
    t.context.uc_stack.ss_size = t.stack.size();
    t.context.uc_link = nullptr;
    makecontext(&t.context, entry, 0);
  }
  struct sigaction action = {}, old_segv = {}, old_bus = {};
  action.sa_handler = on_fault;
  action.sa_flags = SA_ONSTACK;
  sigaction(SIGSEGV, &action, &old_segv);
  sigaction(SIGBUS, &action, &old_bus);
  std::vector<char> signal_stack(64 * 1024);
  stack_t alternate = {}, old_alternate = {};
  alternate.ss_sp = signal_stack.data();
  alternate.ss_size = signal_stack.size();
  sigaltstack(&alternate, &old_alternate);
  if (sigsetjmp(fault_return, 1)) {
    in_kernel = 0;
    error = "memory fault (a read or write outside the arrays) in " + where();
  }
  for (unsigned bz = 0; bz < gridDim.z && error.empty(); ++bz)
    for (unsigned by = 0; by < gridDim.y && error.empty(); ++by)
      for (unsigned bx = 0; bx < gridDim.x && error.empty(); ++bx) {
        blockIdx = {bx, by, bz};
        if (__start_cuda_on_cpu_shared != __stop_cuda_on_cpu_shared)
          std::memset(__start_cuda_on_cpu_shared, 0xA5, __stop_cuda_on_cpu_shared - __start_cuda_on_cpu_shared);
        block.warps.assign(threads / 32, Warp());
        block.barrier = Barrier();
        block.live = threads;
        for (int i = 0; i < threads; ++i) {
          Thread& t = block.threads[i];
          t.exited = false;
          t.waiting = nullptr;
          t.copies.clear();
        }
        // threads are looked at in order k (thread k, or threads - 1 - k where `order` < 0); the
        // ones before `start` were found waiting or exited, and no barrier has released them since
        int start = 0;
        block.released_first = 1, block.released_last = 0;
        while (block.live > 0 && error.empty()) {
          int next = -1;
          for (int k = start; k < threads; ++k) {
            const int i = order >= 0 ? k : threads - 1 - k;
            Thread& t = block.threads[i];
            if (t.exited) continue;
            if (t.waiting && t.waiting->generation == t.waiting_for) continue;
            next = i;
            break;
          }
          if (next < 0) {
            if (start > 0) {  // a deadlock is only called after looking at every thread
              start = 0;
              continue;
            }
            error = "deadlock: every live thread waits at a barrier (block " + std::to_string(bx) + ")";
            break;
          }
          block.threads[next].waiting = nullptr;
          block.current = next;
          threadIdx = {unsigned(next), 0, 0};
          in_kernel = 1;
          if (_setjmp(block.scheduler) == 0) {
            Thread& t = block.threads[next];
            if (t.started) _longjmp(t.resume, 1);
            t.started = true;
            setcontext(&t.context);
          }
          in_kernel = 0;
          // `next` now waits or has exited: look on after it, or from the first thread released
          start = order >= 0 ? next + 1 : threads - next;
          if (block.released_first <= block.released_last) {
            start = std::min(start, order >= 0 ? block.released_first : threads - 1 - block.released_last);
            block.released_first = 1, block.released_last = 0;
          }
        }
      }
  sigaltstack(&old_alternate, nullptr);
  sigaction(SIGSEGV, &old_segv, nullptr);
  sigaction(SIGBUS, &old_bus, nullptr);
  return error.empty() ? 0 : 1;
}

}  // namespace cuda_on_cpu

inline void __syncthreads() { cuda_on_cpu::wait_at(cuda_on_cpu::block.barrier, cuda_on_cpu::block.live); }

// A vector access must be aligned to its size on a GPU (a misaligned one faults there).
inline void cuda_on_cpu_check_aligned(const void* p, int bytes, const char* what) {
  if (reinterpret_cast<uintptr_t>(p) % bytes != 0)
    cuda_on_cpu::fail(std::string(what) + " at an address not aligned to " + std::to_string(bytes) + " bytes (" +
                      cuda_on_cpu::where() + ")");
}

inline void __trap() { cuda_on_cpu::fail("__trap() in " + cuda_on_cpu::where()); }

// cp.async.ca.shared.global [dst], [src], bytes, src_bytes: aligned to `bytes` as on a GPU, done at the wait.
inline void cuda_on_cpu_copy_async(void* dst, const void* src, int bytes, int src_bytes) {
  cuda_on_cpu_check_aligned(dst, bytes, "cp.async destination");
  cuda_on_cpu_check_aligned(src, bytes, "cp.async source");
  cuda_on_cpu::block.threads[cuda_on_cpu::block.current].copies.push_back({dst, src, bytes, src_bytes});
}

// cp.async.wait_all: this thread's copies land (a source outside its array faults here).
inline void cuda_on_cpu_copy_async_wait() {
  auto& copies = cuda_on_cpu::block.threads[cuda_on_cpu::block.current].copies;
  for (const cuda_on_cpu::Copy& copy : copies) {
    std::memset(copy.dst, 0, copy.bytes);
    std::memcpy(copy.dst, copy.src, copy.src_bytes);
  }
  copies.clear();
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  unsigned result = 0;
  const unsigned mine = predicate != 0;
  cuda_on_cpu::warp_exchange(mask, "__ballot_sync", &mine, 1, [&](unsigned (*all)[10], int) {
    for (int lane = 0; lane < 32; ++lane) result |= (all[lane][0] & 1u) << lane;
  });
  return result;
}

inline int __shfl_xor_sync(unsigned mask, int value, int lane_mask) {
  int result = 0;
  const unsigned mine = unsigned(value);
  cuda_on_cpu::warp_exchange(mask, "__shfl_xor_sync", &mine, 1, [&](unsigned (*all)[10], int lane) {
    result = int(all[(lane ^ lane_mask) & 31][0]);
  });
  return result;
}

// mma.sync.aligned.m16n8k256.row.col.s32.b1.b1.s32.and.popc, D = C + popc(A & B), with the
// fragments as the PTX ISA lays them out (lane = 4 * group + t): a0 = A[group][32t..32t+31],
// a1 = A[group + 8][same bits], a2 and a3 the same rows at bits 128 + 32t..; b0 = B[32t..][group],
// b1 = B[128 + 32t..][group]; c0, c1 = D[group][2t, 2t + 1], c2, c3 = D[group + 8][2t, 2t + 1].
inline void cuda_on_cpu_mma_m16n8k256_and_popc(int* c, const unsigned* a, unsigned b0, unsigned b1) {
  const unsigned mine[6] = {a[0], a[1], a[2], a[3], b0, b1};
  int d[4];
  cuda_on_cpu::warp_exchange(cuda_on_cpu::kFullMask, "mma.sync", mine, 6, [&](unsigned (*all)[10], int lane) {
    const int group = lane / 4, t = lane % 4;
    for (int r = 0; r < 4; ++r) {
      const int row = group + (r >= 2 ? 8 : 0), column = 2 * t + (r & 1);
      int sum = 0;
      for (int word = 0; word < 8; ++word) {  // the 256 bits as 8 words: 4 lanes x 2 halves
        const int holder = word % 4, half = word / 4;
        const unsigned a_word = all[4 * (row % 8) + holder][(row >= 8 ? 1 : 0) + 2 * half];
        const unsigned b_word = all[4 * column + holder][4 + half];
        sum += __builtin_popcount(a_word & b_word);
      }
      d[r] = c[r] + sum;
    }
  });
  for (int r = 0; r < 4; ++r) c[r] = d[r];
}
