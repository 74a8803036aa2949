// launcher.cpp — registry and launch entry point of the emulated backend.
//
// Built into the same shared library as the kernels (see emulated.py):
//   g++ -std=c++20 -O2 -pthread -shared -fPIC -fvisibility=hidden -x c++ \
//       -include cuda_emulator.h <wrapped kernels/*.cu> launcher.cpp -o emu.so
// The C entry points below are the library's only exported symbols.
//
// A launch creates one OS thread per CUDA thread of a block; those threads
// run every block of the grid in order (x fastest, then y, then z), meeting
// at the end of each block. BlockSync is the one lock of a launch: every
// barrier, warp exchange and block hand-over passes through it, which keeps
// the bookkeeping exact enough to tell a deadlock from slow progress.
#include "cuda_emulator.h"

#include <bit>
#include <cstdio>
#include <memory>
#include <new>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#define GPULOSS_EMU_EXPORT extern "C" __attribute__((visibility("default")))

namespace gpuloss_emu {

// ---------------------------------------------------------------------------
// Registry (filled by static initialisers when the library is loaded).
std::vector<KernelEntry>& registry() {
  static std::vector<KernelEntry> entries;
  return entries;
}

static std::string& registry_errors() {
  static std::string errors;
  return errors;
}

int register_kernel(const char* name, const char* file, void* fn, Invoker invoke, std::string signature) {
  for (const KernelEntry& e : registry()) {
    if (e.name == name) {
      // Each .cu is compiled in its own unnamed namespace, so a duplicate
      // extern "C" name links fine; launching by name would be ambiguous.
      registry_errors() += "kernel " + std::string(name) + " is defined twice: in " + e.file + " and in " + file + "\n";
      return 0;
    }
  }
  registry().push_back(KernelEntry{name, file, fn, invoke, std::move(signature)});
  return 1;
}

// ---------------------------------------------------------------------------
// BlockSync: state of the running block, guarded by m_.
//
// "blocked_" counts threads waiting for something no running thread has done
// yet. Whoever completes a barrier or a warp round subtracts the threads it
// released, so when blocked_ == live_ nothing can ever change again: every
// live thread is parked and none is on its way to release another. That is a
// deadlock on the GPU too (or undefined behaviour), and it is reported.
class BlockSync {
 public:
  BlockSync(unsigned nthreads, const char* kernel)
      : n_(nthreads), nwarps_((nthreads + 31) / 32), kernel_(kernel), warps_(new Warp[(nthreads + 31) / 32]) {
    reset_block();
  }

  // The start gate: workers wait here until every thread of the pool exists,
  // so a failed thread creation can abandon the launch before any block runs.
  bool wait_start() {
    std::unique_lock<std::mutex> lk(m_);
    block_cv_.wait(lk, [&] { return started_; });
    return !aborted_;
  }
  void open_start(const std::string& failure) {
    std::lock_guard<std::mutex> lk(m_);
    if (!failure.empty()) abort_locked(failure);
    started_ = true;
    block_cv_.notify_all();
  }

  int barrier(int predicate) {
    std::unique_lock<std::mutex> lk(m_);
    if (aborted_) throw KernelAbort{};
    ++bar_arrived_;
    bar_count_ += predicate ? 1u : 0u;
    if (bar_arrived_ == live_) {
      complete_barrier();
    } else {
      const uint64_t gen = bar_gen_;
      ++bar_waiters_;
      ++blocked_;
      check_deadlock();
      block_cv_.wait(lk, [&] { return aborted_ || bar_gen_ != gen; });
      if (bar_gen_ == gen) throw KernelAbort{};
    }
    // Stable until this thread arrives at the next barrier, which cannot
    // complete without it.
    return (int)bar_result_;
  }

  // A round is one execution of a warp intrinsic by the live lanes of its
  // mask. Rounds of different masks may be pending at once (lanes 0-15 in a
  // full-warp __syncwarp while lanes 16-31 finish a shuffle of their own);
  // a lane joins the pending round of its mask, or opens one.
  unsigned warp_exchange(unsigned mask, uint64_t mine, uint64_t* all) {
    std::unique_lock<std::mutex> lk(m_);
    if (aborted_) throw KernelAbort{};
    Warp& w = warps_[ctx.warp];
    const uint32_t me = 1u << ctx.lane;
    mask |= me;  // the caller is always part of its own mask (CUDA requires it)
    Round* r = nullptr;
    for (Round& c : w.rounds)
      if (c.in_use && !c.done && c.mask == mask) { r = &c; break; }
    if (!r) {
      // Each lane is in at most one round (pending, or done and not yet read
      // by it), so 32 rounds per warp always leave one free.
      for (Round& c : w.rounds)
        if (!c.in_use) { r = &c; break; }
      r->in_use = true;
      r->done = false;
      r->mask = mask;
      r->arrived = 0;
      r->waiters = r->unread = 0;
    }
    r->arrived |= me;
    r->slot[ctx.lane] = mine;
    if (round_complete(w, *r)) {
      complete_round(w, *r);
    } else {
      ++r->waiters;
      ++blocked_;
      check_deadlock();
      w.cv.wait(lk, [&] { return aborted_ || r->done; });
      if (!r->done) throw KernelAbort{};
    }
    std::memcpy(all, r->slot, sizeof(r->slot));
    const unsigned took_part = r->arrived;
    if (--r->unread == 0) r->in_use = false;
    return took_part;
  }

  // The calling thread has left the current block (returned or unwound).
  // Returns false when the launch is abandoned.
  bool finish_block() {
    std::unique_lock<std::mutex> lk(m_);
    Warp& w = warps_[ctx.warp];
    w.live &= ~(1u << ctx.lane);
    --live_;
    if (!aborted_) {
      // An exited thread stops counting (as on the GPU): its departure may be
      // the last thing a barrier or a warp round was waiting for.
      for (Round& r : w.rounds)
        if (r.in_use && !r.done && round_complete(w, r)) complete_round(w, r);
      if (bar_arrived_ != 0 && bar_arrived_ == live_) complete_barrier();
      check_deadlock();
    }
    if (live_ == 0) {
      reset_block();
      ++block_gen_;
      block_cv_.notify_all();
    } else {
      const uint64_t gen = block_gen_;
      block_cv_.wait(lk, [&] { return block_gen_ != gen; });
    }
    return !aborted_;
  }

  void abort(const std::string& why) {
    std::lock_guard<std::mutex> lk(m_);
    abort_locked(why);
  }

  bool aborted() {
    std::lock_guard<std::mutex> lk(m_);
    return aborted_;
  }
  std::string error() {
    std::lock_guard<std::mutex> lk(m_);
    return error_;
  }

  static std::string where() {
    return "block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
           std::to_string(blockIdx.z) + ") thread (" + std::to_string(threadIdx.x) + "," +
           std::to_string(threadIdx.y) + "," + std::to_string(threadIdx.z) + ")";
  }

 private:
  struct Round {
    bool in_use = false;
    bool done = false;
    uint32_t mask = 0;
    uint32_t arrived = 0;  // lanes that joined; after completion, the lanes that took part
    unsigned waiters = 0;  // blocked lanes (released together at completion)
    unsigned unread = 0;   // lanes yet to copy the result out, once done
    uint64_t slot[32] = {};
  };

  struct Warp {
    std::condition_variable cv;
    uint32_t lanes = 0;  // lanes that exist (the last warp may be partial)
    uint32_t live = 0;   // lanes that have not left the block
    Round rounds[32];
  };

  static std::string hex(uint32_t v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
  }

  static bool round_complete(const Warp& w, const Round& r) {
    const uint32_t need = r.mask & w.live;
    return (r.arrived & need) == need;
  }

  void complete_round(Warp& w, Round& r) {
    r.done = true;
    r.unread = (unsigned)std::popcount(r.arrived);
    blocked_ -= r.waiters;
    r.waiters = 0;
    w.cv.notify_all();
  }

  void complete_barrier() {
    bar_result_ = bar_count_;
    bar_count_ = 0;
    bar_arrived_ = 0;
    ++bar_gen_;
    blocked_ -= bar_waiters_;
    bar_waiters_ = 0;
    block_cv_.notify_all();
  }

  void check_deadlock() {
    if (aborted_ || live_ == 0 || blocked_ != live_) return;
    std::string msg = "deadlock in block (" + std::to_string(blockIdx.x) + "," + std::to_string(blockIdx.y) + "," +
                      std::to_string(blockIdx.z) + "): every live thread waits for another that never comes (";
    msg += std::to_string(bar_arrived_) + " at __syncthreads";
    for (unsigned i = 0; i < nwarps_; ++i) {
      const Warp& w = warps_[i];
      for (const Round& r : w.rounds)
        if (r.in_use && !r.done)
          msg += "; warp " + std::to_string(i) + ": lanes " + hex(r.arrived) + " in a warp intrinsic with mask " +
                 hex(r.mask) + " (live lanes " + hex(w.live) + ")";
    }
    msg += "; " + std::to_string(n_ - live_) + " of " + std::to_string(n_) +
           " threads exited). A __syncthreads() or *_sync() call that not every live thread reaches is "
           "undefined on the GPU";
    abort_locked(msg);
  }

  void abort_locked(const std::string& why) {
    if (!aborted_) {
      aborted_ = true;
      error_ = why;
    }
    block_cv_.notify_all();
    for (unsigned i = 0; i < nwarps_; ++i) warps_[i].cv.notify_all();
  }

  void reset_block() {
    live_ = n_;
    blocked_ = 0;
    bar_arrived_ = bar_count_ = bar_waiters_ = 0;
    for (unsigned i = 0; i < nwarps_; ++i) {
      Warp& w = warps_[i];
      const unsigned nl = (i + 1) * 32 <= n_ ? 32u : n_ - i * 32;
      w.lanes = nl == 32 ? 0xffffffffu : ((1u << nl) - 1u);
      w.live = w.lanes;
      for (Round& r : w.rounds) r.in_use = false;
    }
  }

  std::mutex m_;
  std::condition_variable block_cv_;  // __syncthreads, block hand-over, start gate
  const unsigned n_, nwarps_;
  const char* kernel_;
  std::unique_ptr<Warp[]> warps_;
  unsigned live_ = 0, blocked_ = 0;
  unsigned bar_arrived_ = 0, bar_count_ = 0, bar_result_ = 0, bar_waiters_ = 0;
  uint64_t bar_gen_ = 0, block_gen_ = 0;
  bool started_ = false, aborted_ = false;
  std::string error_;
};

int block_barrier(int predicate) { return ctx.sync->barrier(predicate); }

unsigned warp_exchange(unsigned mask, uint64_t mine, uint64_t* all) {
  return ctx.sync->warp_exchange(mask, mine, all);
}

void trap(const char* why) {
  ctx.sync->abort(std::string(why) + " in " + BlockSync::where());
  throw KernelAbort{};
}

static void* g_dynamic_shared = nullptr;  // set before the pool starts
void* dynamic_shared() { return g_dynamic_shared; }

static std::mutex& launch_mutex() {
  static std::mutex m;
  return m;
}

static std::string& last_error() {
  thread_local std::string error;  // per calling thread: Python threads never see each other's
  return error;
}

static int fail(int code, const std::string& msg) {
  last_error() = msg;
  return code;
}

static void run_worker(BlockSync& sync, const KernelEntry& entry, void** args, unsigned t, dim3 grid, dim3 block) {
  ctx.sync = &sync;
  ctx.tid = t;
  ctx.lane = t % 32;
  ctx.warp = t / 32;
  threadIdx = uint3{t % block.x, (t / block.x) % block.y, t / (block.x * block.y)};
  blockDim = block;
  gridDim = grid;
  if (sync.wait_start()) {
    const uint64_t nblocks = (uint64_t)grid.x * grid.y * grid.z;
    for (uint64_t b = 0; b < nblocks; ++b) {
      blockIdx = uint3{(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y), (unsigned)(b / ((uint64_t)grid.x * grid.y))};
      try {
        entry.invoke(entry.fn, args);
      } catch (const KernelAbort&) {
      } catch (const std::exception& e) {
        sync.abort("C++ exception in " + BlockSync::where() + ": " + e.what());
      } catch (...) {
        sync.abort("unknown C++ exception in " + BlockSync::where());
      }
      if (!sync.finish_block()) break;
    }
  }
  ctx = ThreadCtx{};
}

}  // namespace gpuloss_emu

using namespace gpuloss_emu;

GPULOSS_EMU_EXPORT int gpuloss_emu_abi_version() { return 1; }

GPULOSS_EMU_EXPORT int gpuloss_emu_kernel_count() { return (int)registry().size(); }

GPULOSS_EMU_EXPORT const char* gpuloss_emu_kernel_name(int i) {
  return i >= 0 && i < (int)registry().size() ? registry()[i].name.c_str() : nullptr;
}

GPULOSS_EMU_EXPORT const char* gpuloss_emu_kernel_signature(int i) {
  return i >= 0 && i < (int)registry().size() ? registry()[i].signature.c_str() : nullptr;
}

GPULOSS_EMU_EXPORT const char* gpuloss_emu_registry_error() { return registry_errors().c_str(); }

GPULOSS_EMU_EXPORT const char* gpuloss_emu_last_error() { return last_error().c_str(); }

// Like cuLaunchKernel: args[i] points at the value of parameter i. Returns 0,
// or nonzero with gpuloss_emu_last_error() saying why.
GPULOSS_EMU_EXPORT int gpuloss_emu_launch_ex(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                             unsigned by, unsigned bz, unsigned long long shared_mem, void** args) {
  std::lock_guard<std::mutex> serial(launch_mutex());
  last_error().clear();
  if (!registry_errors().empty()) return fail(1, registry_errors());
  const KernelEntry* entry = nullptr;
  for (const KernelEntry& e : registry())
    if (name && e.name == name) entry = &e;
  if (!entry) return fail(1, std::string("no kernel named '") + (name ? name : "(null)") + "' is registered");
  // CUDA's limits (compute capability 7.0 and later).
  const unsigned long long nthreads = (unsigned long long)bx * by * bz;
  if (bx == 0 || by == 0 || bz == 0 || bx > 1024 || by > 1024 || bz > 64 || nthreads > 1024)
    return fail(2, "invalid block (" + std::to_string(bx) + "," + std::to_string(by) + "," + std::to_string(bz) +
                       "): each dimension at least 1, x and y at most 1024, z at most 64, at most 1024 threads");
  if (gx == 0 || gy == 0 || gz == 0 || gx > 2147483647u || gy > 65535u || gz > 65535u)
    return fail(2, "invalid grid (" + std::to_string(gx) + "," + std::to_string(gy) + "," + std::to_string(gz) +
                       "): x in [1, 2^31-1], y and z in [1, 65535]");
  if (shared_mem > 227ull * 1024)
    return fail(2, "shared_mem " + std::to_string(shared_mem) + " bytes exceeds the 227 KiB a block can have");

  std::unique_ptr<std::byte[]> dyn;
  if (shared_mem) dyn.reset(new (std::align_val_t(16)) std::byte[shared_mem]);
  g_dynamic_shared = dyn.get();

  BlockSync sync((unsigned)nthreads, entry->name.c_str());
  std::vector<std::thread> pool;
  pool.reserve(nthreads);
  std::string failure;
  const dim3 grid(gx, gy, gz), block(bx, by, bz);
  try {
    for (unsigned t = 0; t < nthreads; ++t)
      pool.emplace_back(run_worker, std::ref(sync), std::cref(*entry), args, t, grid, block);
  } catch (const std::system_error& e) {
    failure = "could not start " + std::to_string(nthreads) + " threads: " + e.what();
  }
  sync.open_start(failure);
  for (std::thread& th : pool) th.join();
  g_dynamic_shared = nullptr;
  std::fflush(stdout);  // kernel printf output lands before Python's next line
  if (sync.aborted()) return fail(3, entry->name + ": " + sync.error());
  return 0;
}

GPULOSS_EMU_EXPORT int gpuloss_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                          unsigned by, unsigned bz, void** args) {
  return gpuloss_emu_launch_ex(name, gx, gy, gz, bx, by, bz, 0, args);
}
