// launcher.cpp — registry and launch entry point of the emulated backend.
//
// Built into the same shared library as the kernels (see emulated.py):
//   g++ -std=c++20 -O2 -pthread -shared -fPIC -fvisibility=hidden -x c++ \
//       -include cuda_emulator.h <wrapped kernels/*.cu> launcher.cpp -o emu.so
// The C entry points below are the library's only exported symbols.
//
// A launch runs on one OS thread per CUDA thread of a block (a pool kept
// between launches); those threads run every block of the grid in order
// (x fastest, then y, then z), meeting at the end of each block. All bookkeeping of the running block (barrier,
// warp rounds, exits) sits under one mutex, which keeps it exact enough to
// tell a deadlock from slow progress; released threads wake on a futex word
// (std::atomic::wait) rather than a condition variable, so that 256 of them
// do not queue for that mutex one by one after every barrier (3x faster).
#include "cuda_emulator.h"

#include <bit>
#include <cstdio>
#include <memory>
#include <new>
#include <pthread.h>
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
      // Backs up the linker (g++ keeps extern "C" names external even inside
      // the unnamed namespace each .cu is wrapped in): by-name launch must
      // never be ambiguous.
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

  int barrier(int predicate) {
    std::unique_lock<std::mutex> lk(m_);
    if (aborted_) throw KernelAbort{};
    ++bar_arrived_;
    bar_count_ += predicate ? 1u : 0u;
    if (bar_arrived_ == live_) {
      complete_barrier();
      return (int)bar_result_;
    }
    const unsigned gen = bar_gen_.load(std::memory_order_relaxed);
    ++bar_waiters_;
    ++blocked_;
    check_deadlock();
    if (aborted_) throw KernelAbort{};
    // Wait on the generation word without the lock: a condition variable
    // would make every released thread re-take m_ in turn, which costs more
    // than the barrier itself with hundreds of threads.
    lk.unlock();
    wait_for_change(bar_gen_, gen);
    if (aborted_) throw KernelAbort{};
    // Published before bar_gen_ moved (release/acquire), and stable until this
    // thread arrives at the next barrier, which cannot complete without it.
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
      r->waiters = 0;
    }
    r->arrived |= me;
    r->slot[ctx.lane] = mine;
    if (round_complete(w, *r)) {
      complete_round(*r);
      return read_round(*r, all, /*locked=*/true);
    }
    const unsigned seq = r->seq.load(std::memory_order_relaxed);
    ++r->waiters;
    ++blocked_;
    check_deadlock();
    if (aborted_) throw KernelAbort{};
    lk.unlock();  // as in barrier(): released lanes must not queue for m_
    wait_for_change(r->seq, seq);
    if (aborted_) throw KernelAbort{};
    return read_round(*r, all, /*locked=*/false);
  }

  unsigned live_lanes() {
    std::lock_guard<std::mutex> lk(m_);
    return warps_[ctx.warp].live;
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
        if (r.in_use && !r.done && round_complete(w, r)) complete_round(r);
      if (bar_arrived_ != 0 && bar_arrived_ == live_) complete_barrier();
      check_deadlock();
    }
    if (live_ == 0) {
      // Decided once for everyone: a thread still waking up from this
      // hand-over must not read an abort that happens in the next block,
      // or it would skip a block the others are waiting in.
      go_on_ = !aborted_;
      reset_block();
      block_gen_.fetch_add(1, std::memory_order_release);
      block_gen_.notify_all();
    } else {
      const unsigned gen = block_gen_.load(std::memory_order_relaxed);
      lk.unlock();
      wait_for_change(block_gen_, gen);
    }
    return go_on_;  // stable: the next hand-over cannot happen without this thread
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
    unsigned waiters = 0;             // blocked lanes (released together at completion)
    std::atomic<unsigned> unread{0};  // lanes yet to copy the result out, once done
    std::atomic<unsigned> seq{0};     // moves at completion (or abort): what waiters wait on
    uint64_t slot[32] = {};
  };

  struct Warp {
    uint32_t lanes = 0;  // lanes that exist (the last warp may be partial)
    uint32_t live = 0;   // lanes that have not left the block
    Round rounds[32];
  };

  // Slots and `arrived` were published before seq moved, and stay put until
  // the last reader frees the round.
  unsigned read_round(Round& r, uint64_t* all, bool locked) {
    std::memcpy(all, r.slot, sizeof(r.slot));
    const unsigned took_part = r.arrived;
    if (r.unread.fetch_sub(1, std::memory_order_acq_rel) == 1) {
      if (locked) {
        r.in_use = false;
      } else {
        std::lock_guard<std::mutex> lk(m_);
        r.in_use = false;
      }
    }
    return took_part;
  }

  static std::string hex(uint32_t v) {
    char buf[16];
    std::snprintf(buf, sizeof buf, "0x%08x", v);
    return buf;
  }

  static void wait_for_change(std::atomic<unsigned>& word, unsigned old) {
    while (word.load(std::memory_order_acquire) == old) word.wait(old, std::memory_order_acquire);
  }

  static bool round_complete(const Warp& w, const Round& r) {
    const uint32_t need = r.mask & w.live;
    return (r.arrived & need) == need;
  }

  void complete_round(Round& r) {
    r.done = true;
    r.unread.store((unsigned)std::popcount(r.arrived), std::memory_order_relaxed);
    blocked_ -= r.waiters;
    r.waiters = 0;
    r.seq.fetch_add(1, std::memory_order_release);
    r.seq.notify_all();
  }

  void complete_barrier() {
    bar_result_ = bar_count_;
    bar_count_ = 0;
    bar_arrived_ = 0;
    blocked_ -= bar_waiters_;
    bar_waiters_ = 0;
    bar_gen_.fetch_add(1, std::memory_order_release);
    bar_gen_.notify_all();
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
    // Moving the barrier word wakes its waiters, which then see aborted_.
    bar_gen_.fetch_add(1, std::memory_order_release);
    bar_gen_.notify_all();
    for (unsigned i = 0; i < nwarps_; ++i)
      for (Round& r : warps_[i].rounds)
        if (r.in_use && !r.done) {
          r.seq.fetch_add(1, std::memory_order_release);
          r.seq.notify_all();
        }
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
  const unsigned n_, nwarps_;
  const char* kernel_;
  std::unique_ptr<Warp[]> warps_;
  unsigned live_ = 0, blocked_ = 0;
  unsigned bar_arrived_ = 0, bar_count_ = 0, bar_result_ = 0, bar_waiters_ = 0;
  // 32-bit words: std::atomic<unsigned>::wait is a bare futex in libstdc++.
  std::atomic<unsigned> bar_gen_{0}, block_gen_{0};
  bool go_on_ = true;
  std::atomic<bool> aborted_{false};  // also read by waiters that hold no lock
  std::string error_;
};

int block_barrier(int predicate) { return ctx.sync->barrier(predicate); }

unsigned warp_exchange(unsigned mask, uint64_t mine, uint64_t* all) {
  return ctx.sync->warp_exchange(mask, mine, all);
}

unsigned warp_live_mask() { return ctx.sync->live_lanes(); }

void trap(const char* why) {
  ctx.sync->abort(std::string(why) + " in " + BlockSync::where());
  throw KernelAbort{};
}

static void* g_dynamic_shared = nullptr;  // set before a launch's job is posted
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
  ctx = ThreadCtx{};
}

// The OS threads outlive launches: starting 256 of them costs about 20 ms,
// more than a small launch itself. Thread t plays CUDA thread t of every
// launch that has more than t threads and is parked otherwise. The pool is
// never destroyed (a joinable std::thread destructor would terminate; process
// exit reaps parked threads) and is forgotten in a fork()ed child, which
// inherits none of its threads.
struct Job {
  BlockSync* sync = nullptr;
  const KernelEntry* entry = nullptr;
  void** args = nullptr;
  dim3 grid, block;
  unsigned nthreads = 0;
};

class Pool {
 public:
  // Runs `job` on threads 0..nthreads-1 and returns when all are done; or
  // returns why the threads could not be started (nothing ran then).
  std::string run(const Job& job) {
    try {
      while (threads_.size() < job.nthreads) {
        const unsigned t = (unsigned)threads_.size();
        const uint64_t seen = gen_;  // only the launching thread changes gen_
        threads_.emplace_back([this, t, seen] { loop(t, seen); });
      }
    } catch (const std::system_error& e) {
      return "could not start " + std::to_string(job.nthreads) + " threads: " + e.what();
    }
    std::unique_lock<std::mutex> lk(m_);
    job_ = job;
    remaining_ = job.nthreads;
    ++gen_;
    go_cv_.notify_all();
    done_cv_.wait(lk, [&] { return remaining_ == 0; });
    return "";
  }

 private:
  void loop(unsigned t, uint64_t seen) {
    for (;;) {
      Job job;
      {
        std::unique_lock<std::mutex> lk(m_);
        go_cv_.wait(lk, [&] { return gen_ != seen; });
        seen = gen_;
        job = job_;
      }
      if (t >= job.nthreads) continue;
      run_worker(*job.sync, *job.entry, job.args, t, job.grid, job.block);
      std::lock_guard<std::mutex> lk(m_);
      if (--remaining_ == 0) done_cv_.notify_one();
    }
  }

  std::mutex m_;
  std::condition_variable go_cv_, done_cv_;
  std::vector<std::thread> threads_;
  Job job_;
  uint64_t gen_ = 0;
  unsigned remaining_ = 0;
};

static Pool* g_pool = nullptr;  // guarded by launch_mutex()

static Pool& pool() {
  if (!g_pool) {
    g_pool = new Pool;
    // Leak, not destroy: the child's copy refers to threads it does not have.
    pthread_atfork(nullptr, nullptr, [] { g_pool = nullptr; });
  }
  return *g_pool;
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

  // Allocated with the aligned operator new[], so freed with the aligned delete[]
  // (a plain delete[] is a new-delete-type-mismatch under AddressSanitizer).
  struct AlignedDelete {
    void operator()(std::byte* p) const { ::operator delete[](p, std::align_val_t(16)); }
  };
  std::unique_ptr<std::byte[], AlignedDelete> dyn;
  if (shared_mem) dyn.reset(new (std::align_val_t(16)) std::byte[shared_mem]);
  g_dynamic_shared = dyn.get();

  BlockSync sync((unsigned)nthreads, entry->name.c_str());
  Job job;
  job.sync = &sync;
  job.entry = entry;
  job.args = args;
  job.grid = dim3(gx, gy, gz);
  job.block = dim3(bx, by, bz);
  job.nthreads = (unsigned)nthreads;
  const std::string failure = pool().run(job);
  g_dynamic_shared = nullptr;
  if (!failure.empty()) return fail(3, entry->name + ": " + failure);
  std::fflush(stdout);  // kernel printf output lands before Python's next line
  if (sync.aborted()) return fail(3, entry->name + ": " + sync.error());
  return 0;
}

GPULOSS_EMU_EXPORT int gpuloss_emu_launch(const char* name, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                          unsigned by, unsigned bz, void** args) {
  return gpuloss_emu_launch_ex(name, gx, gy, gz, bx, by, bz, 0, args);
}
