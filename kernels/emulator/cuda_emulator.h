// cuda_emulator.h — the CUDA execution model on host threads (docs/design.md §5).
//
// Force-included (g++ -include) before every kernels/*.cu when the emulated
// backend builds them, so CUDA C written for NVRTC (no toolkit headers)
// compiles unchanged with
//   g++ -std=c++20 -O2 -pthread -shared -fPIC -x c++ -include cuda_emulator.h
// gpuloss/backends/emulated.py drives that build; launcher.cpp holds the
// registry and the launch entry point.
//
// Model. One OS thread per CUDA thread: blockDim threads (kept in a pool
// between launches) run the grid's blocks one after another, so a block's
// __shared__ variables can be plain statics (one block is alive at a time,
// launches are serialised). The bookkeeping of every synchronisation of a
// block (__syncthreads, the warp intrinsics, the end of a block) sits under
// one mutex per launch, which buys three things std::barrier cannot give:
//   * warp intrinsics honour their mask (lanes outside it do not take part);
//   * a thread that returns early simply stops counting, as on the GPU;
//   * a block in which every live thread waits for something no other thread
//     will ever do (divergent __syncthreads, a shuffle whose mask names a lane
//     parked at a barrier) is reported as a launch error instead of hanging.
// ThreadSanitizer sees every hand-over as a pthread mutex, so the only races
// it can report are the kernel's own (tests/kernels/racy.cu proves that).
//
// Not emulated: dynamic `extern __shared__` (use GPULOSS_DYNAMIC_SHARED),
// inline PTX (guard it with GPULOSS_EMULATOR or __CUDA_ARCH__, which is not
// defined here), cooperative groups, synchronisation between blocks, textures.
#ifndef GPULOSS_CUDA_EMULATOR_H
#define GPULOSS_CUDA_EMULATOR_H

#define GPULOSS_EMULATOR 1

// Kernel files are compiled inside an unnamed namespace (emulated.py wraps
// each one, so that, as with one NVRTC module per file, helpers of the same
// name in two files never merge). A system header first included from there
// would land in that namespace, so everything a kernel could want is
// included here, up front; later #includes of these are no-ops.
#include <atomic>
#include <bit>
#include <cfloat>
#include <climits>
#include <cmath>
#include <condition_variable>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <math.h>
#include <mutex>
#include <stdint.h>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

// ---------------------------------------------------------------------------
// Qualifiers.
#define __global__
#define __device__
#define __host__
#define __constant__
#define __managed__
#define __forceinline__ inline
#define __noinline__ __attribute__((noinline))
#define __align__(n) __attribute__((aligned(n)))
#define __launch_bounds__(...)
// static: one object per block would be exact, but only one block runs at a
// time, so one object per program is indistinguishable (except that it is not
// re-poisoned between blocks: never rely on shared memory starting at zero).
#define __shared__ static

// Hidden visibility keeps the registry and the thread context private to
// each built library: otherwise g++ marks the statics of inline functions
// STB_GNU_UNIQUE and the dynamic linker merges them across two emulator
// libraries loaded in one process (say, a plain and a test build).
#pragma GCC visibility push(hidden)

// ---------------------------------------------------------------------------
// Vector types (NVRTC builtins), with CUDA's alignments so reinterpret_cast
// vector loads keep their meaning.
#define GPULOSS_EMU_VEC2(T, N, A) \
  struct __attribute__((aligned(A))) N##2 { T x, y; }; \
  inline constexpr N##2 make_##N##2(T x, T y) { return N##2{x, y}; }
#define GPULOSS_EMU_VEC3(T, N) \
  struct N##3 { T x, y, z; }; \
  inline constexpr N##3 make_##N##3(T x, T y, T z) { return N##3{x, y, z}; }
#define GPULOSS_EMU_VEC4(T, N, A) \
  struct __attribute__((aligned(A))) N##4 { T x, y, z, w; }; \
  inline constexpr N##4 make_##N##4(T x, T y, T z, T w) { return N##4{x, y, z, w}; }
#define GPULOSS_EMU_VECS(T, N, A2, A4) GPULOSS_EMU_VEC2(T, N, A2) GPULOSS_EMU_VEC3(T, N) GPULOSS_EMU_VEC4(T, N, A4)
GPULOSS_EMU_VECS(signed char, char, 2, 4)
GPULOSS_EMU_VECS(unsigned char, uchar, 2, 4)
GPULOSS_EMU_VECS(short, short, 4, 8)
GPULOSS_EMU_VECS(unsigned short, ushort, 4, 8)
GPULOSS_EMU_VECS(int, int, 8, 16)
GPULOSS_EMU_VECS(unsigned int, uint, 8, 16)
GPULOSS_EMU_VECS(float, float, 8, 16)
GPULOSS_EMU_VECS(long long, longlong, 16, 16)
GPULOSS_EMU_VECS(unsigned long long, ulonglong, 16, 16)
GPULOSS_EMU_VECS(double, double, 16, 16)
#undef GPULOSS_EMU_VECS
#undef GPULOSS_EMU_VEC2
#undef GPULOSS_EMU_VEC3
#undef GPULOSS_EMU_VEC4

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int vx = 1, unsigned int vy = 1, unsigned int vz = 1) : x(vx), y(vy), z(vz) {}
  constexpr dim3(uint3 v) : x(v.x), y(v.y), z(v.z) {}
  constexpr operator uint3() const { return uint3{x, y, z}; }
};

// The built-in variables: per OS thread, set by the launcher before each
// block. Constant-initialised, so reading them needs no TLS init guard.
inline thread_local uint3 threadIdx{0, 0, 0};
inline thread_local uint3 blockIdx{0, 0, 0};
inline thread_local dim3 blockDim{1, 1, 1};
inline thread_local dim3 gridDim{1, 1, 1};
constexpr int warpSize = 32;

// ---------------------------------------------------------------------------
// The runtime behind the intrinsics (its code is in launcher.cpp).
namespace gpuloss_emu {

// Unwinds an emulated thread when its launch is being abandoned (deadlock,
// __trap, an exception in another thread). Kernels must not catch (...).
struct KernelAbort {};

// Block-level synchronisation of one launch; see launcher.cpp.
class BlockSync;

struct ThreadCtx {
  BlockSync* sync = nullptr;
  unsigned tid = 0;   // linear thread index in the block
  unsigned lane = 0;  // tid % 32
  unsigned warp = 0;  // tid / 32
};
inline thread_local ThreadCtx ctx;

// All three return after the whole group (block / mask's live lanes) arrived.
int block_barrier(int predicate);  // number of live threads whose predicate was nonzero
// Publishes `mine`, waits for the mask's live lanes, copies every lane's value
// into all[32]; returns the lanes that took part.
unsigned warp_exchange(unsigned mask, uint64_t mine, uint64_t* all);
unsigned warp_live_mask();  // lanes of the caller's warp that have not exited
[[noreturn]] void trap(const char* why);
void* dynamic_shared();

template <class T> inline uint64_t to_bits(T v) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "warp intrinsics move values of at most 8 bytes");
  uint64_t u = 0;
  std::memcpy(&u, &v, sizeof(T));
  return u;
}
template <class T> inline T from_bits(uint64_t u) {
  T v;
  std::memcpy(&v, &u, sizeof(T));
  return v;
}

// Lane `src` inside the caller's segment of `width` lanes, or -1 for "keep my
// own value" (the documented result when the source is out of the segment).
template <class T> inline T shuffle(unsigned mask, T var, int src) {
  uint64_t all[32];
  const unsigned took_part = warp_exchange(mask, to_bits(var), all);
  // A source lane that exited or is outside the mask has no defined value on
  // the GPU; returning the caller's own keeps the emulator deterministic.
  if (src < 0 || src > 31 || !((took_part >> src) & 1u)) return var;
  return from_bits<T>(all[src]);
}

// ---------------------------------------------------------------------------
// Kernel registry: GPULOSS_REGISTER(entry) records a trampoline that unpacks
// cuLaunchKernel-style arguments (args[i] points at parameter i's value).
using Invoker = void (*)(void* fn, void** args);

struct KernelEntry {
  std::string name;
  std::string file;
  void* fn;
  Invoker invoke;
  std::string signature;  // one token per parameter, see param_token
};

std::vector<KernelEntry>& registry();
int register_kernel(const char* name, const char* file, void* fn, Invoker invoke, std::string signature);

template <class T> struct is_emu_vector : std::false_type {};
#define GPULOSS_EMU_ISVEC(N) \
  template <> struct is_emu_vector<N##2> : std::true_type {}; \
  template <> struct is_emu_vector<N##3> : std::true_type {}; \
  template <> struct is_emu_vector<N##4> : std::true_type {};
GPULOSS_EMU_ISVEC(char) GPULOSS_EMU_ISVEC(uchar) GPULOSS_EMU_ISVEC(short) GPULOSS_EMU_ISVEC(ushort)
GPULOSS_EMU_ISVEC(int) GPULOSS_EMU_ISVEC(uint) GPULOSS_EMU_ISVEC(float) GPULOSS_EMU_ISVEC(longlong)
GPULOSS_EMU_ISVEC(ulonglong) GPULOSS_EMU_ISVEC(double)
#undef GPULOSS_EMU_ISVEC

// How the Python side checks an argument against parameter type T:
//   "i4" "u8" "f4" "b1" ...  scalar: NumPy kind letter + size, must match exactly
//   "*f4" "*V2"              pointer: the array's itemsize must equal the size
//   "*"                      pointer to void/bytes/pointers/vectors: any array
//   "V12"                    a struct by value (only a NumPy void scalar of that size)
template <class T> inline std::string scalar_token() {
  using U = std::remove_cv_t<T>;
  if constexpr (std::is_same_v<U, bool>) return "b1";
  else if constexpr (std::is_floating_point_v<U>) return "f" + std::to_string(sizeof(U));
  else if constexpr (std::is_integral_v<U> && std::is_signed_v<U>) return "i" + std::to_string(sizeof(U));
  else if constexpr (std::is_integral_v<U>) return "u" + std::to_string(sizeof(U));
  else return "V" + std::to_string(sizeof(U));
}
template <class T> inline std::string param_token() {
  using P = std::remove_cv_t<T>;
  if constexpr (std::is_pointer_v<P>) {
    using E = std::remove_cv_t<std::remove_pointer_t<P>>;
    // Byte pointers and vector pointers are how kernels view raw or
    // reinterpreted memory: any element size is legitimate for them.
    if constexpr (std::is_void_v<E> || std::is_pointer_v<E> || std::is_function_v<E> || sizeof(E) == 1 ||
                  is_emu_vector<E>::value)
      return "*";
    else
      return "*" + scalar_token<E>();
  } else {
    return scalar_token<P>();
  }
}

template <class... P, std::size_t... I>
inline void invoke_unpacked(void (*f)(P...), void** args, std::index_sequence<I...>) {
  f(*static_cast<std::remove_cv_t<P>*>(args[I])...);
}
template <class... P> inline void invoke(void* fn, void** args) {
  invoke_unpacked(reinterpret_cast<void (*)(P...)>(fn), args, std::index_sequence_for<P...>{});
}
template <class... P> inline int register_entry(const char* name, const char* file, void (*f)(P...)) {
  std::string sig;
  ((sig += (sig.empty() ? "" : ","), sig += param_token<P>()), ...);
  return register_kernel(name, file, reinterpret_cast<void*>(f), &invoke<P...>, std::move(sig));
}

}  // namespace gpuloss_emu

// One registration object per entry point; a complete declaration, so
// stamping macros may chain it without a semicolon (an extra one is harmless).
#define GPULOSS_REGISTER(name) \
  [[maybe_unused]] static const int gpuloss_emu_registered_##name = ::gpuloss_emu::register_entry(#name, __FILE__, &name);

// Dynamic shared memory (the launch's shared_mem bytes, 16-byte aligned).
// Under NVRTC the same line must read `extern __shared__ T name[]`; kernels
// spell it GPULOSS_DYNAMIC_SHARED(T, name) and common.cuh supplies that form.
#define GPULOSS_DYNAMIC_SHARED(T, name) T* name = static_cast<T*>(::gpuloss_emu::dynamic_shared())

// ---------------------------------------------------------------------------
// Synchronisation and warp intrinsics.
inline void __syncthreads() { gpuloss_emu::block_barrier(1); }
inline int __syncthreads_count(int p) { return gpuloss_emu::block_barrier(p != 0); }
inline int __syncthreads_and(int p) {
  // Each thread counts itself once, so "all" means count == live threads;
  // a second barrier would be needed to learn that number, so ask for the
  // complement instead: AND(p) == !OR(!p).
  return gpuloss_emu::block_barrier(p == 0) == 0;
}
inline int __syncthreads_or(int p) { return gpuloss_emu::block_barrier(p != 0) != 0; }
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  uint64_t all[32];
  gpuloss_emu::warp_exchange(mask, 0, all);
}
inline unsigned __activemask() {
  // The lanes that have not exited: without a notion of converged threads
  // this is the closest answer (the one a convergent warp gives on the GPU).
  // It does not synchronise, as on the GPU.
  return gpuloss_emu::warp_live_mask();
}
inline void __threadfence() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_block() { std::atomic_thread_fence(std::memory_order_seq_cst); }
inline void __threadfence_system() { std::atomic_thread_fence(std::memory_order_seq_cst); }
[[noreturn]] inline void __trap() { gpuloss_emu::trap("__trap() called"); }
[[noreturn]] inline void __brkpt() { gpuloss_emu::trap("__brkpt() called"); }
inline void __nanosleep(unsigned) {}

// Shuffles, with CUDA's segment rules for width < 32 (width a power of two).
template <class T> inline T __shfl_sync(unsigned mask, T var, int src_lane, int width = warpSize) {
  const int lane = (int)gpuloss_emu::ctx.lane;
  const int base = lane & ~(width - 1);
  return gpuloss_emu::shuffle(mask, var, base + (src_lane & (width - 1)));
}
template <class T> inline T __shfl_up_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  const int lane = (int)gpuloss_emu::ctx.lane;
  const int in_seg = lane & (width - 1);
  return gpuloss_emu::shuffle(mask, var, in_seg >= (int)delta ? lane - (int)delta : -1);
}
template <class T> inline T __shfl_down_sync(unsigned mask, T var, unsigned delta, int width = warpSize) {
  const int lane = (int)gpuloss_emu::ctx.lane;
  const int in_seg = lane & (width - 1);
  return gpuloss_emu::shuffle(mask, var, in_seg + (int)delta < width ? lane + (int)delta : -1);
}
template <class T> inline T __shfl_xor_sync(unsigned mask, T var, int lane_mask, int width = warpSize) {
  const int lane = (int)gpuloss_emu::ctx.lane;
  const int src = lane ^ lane_mask;
  // A later segment is out of reach (own value); earlier ones are readable.
  const int seg_end = (lane & ~(width - 1)) + width;
  return gpuloss_emu::shuffle(mask, var, src < seg_end ? src : -1);
}

inline unsigned __ballot_sync(unsigned mask, int predicate) {
  uint64_t all[32];
  const unsigned took_part = gpuloss_emu::warp_exchange(mask, predicate != 0, all);
  unsigned ballot = 0;
  for (int l = 0; l < 32; ++l)
    if (((took_part >> l) & 1u) && all[l]) ballot |= 1u << l;
  return ballot;
}
inline int __any_sync(unsigned mask, int predicate) { return __ballot_sync(mask, predicate) != 0; }
inline int __all_sync(unsigned mask, int predicate) {
  uint64_t all[32];
  const unsigned took_part = gpuloss_emu::warp_exchange(mask, predicate != 0, all);
  for (int l = 0; l < 32; ++l)
    if (((took_part >> l) & 1u) && !all[l]) return 0;
  return 1;
}
// sm_80 warp reductions over 32-bit integers.
#define GPULOSS_EMU_WARP_REDUCE(NAME, T, INIT, COMBINE) \
  inline T NAME(unsigned mask, T value) { \
    uint64_t all[32]; \
    const unsigned took_part = gpuloss_emu::warp_exchange(mask, gpuloss_emu::to_bits(value), all); \
    T acc = INIT; \
    for (int l = 0; l < 32; ++l) \
      if ((took_part >> l) & 1u) { const T v = gpuloss_emu::from_bits<T>(all[l]); acc = COMBINE; } \
    return acc; \
  }
GPULOSS_EMU_WARP_REDUCE(__reduce_add_sync, unsigned, 0u, acc + v)
GPULOSS_EMU_WARP_REDUCE(__reduce_add_sync, int, 0, (int)((unsigned)acc + (unsigned)v))
GPULOSS_EMU_WARP_REDUCE(__reduce_min_sync, unsigned, UINT_MAX, v < acc ? v : acc)
GPULOSS_EMU_WARP_REDUCE(__reduce_min_sync, int, INT_MAX, v < acc ? v : acc)
GPULOSS_EMU_WARP_REDUCE(__reduce_max_sync, unsigned, 0u, v > acc ? v : acc)
GPULOSS_EMU_WARP_REDUCE(__reduce_max_sync, int, INT_MIN, v > acc ? v : acc)
GPULOSS_EMU_WARP_REDUCE(__reduce_and_sync, unsigned, ~0u, acc & v)
GPULOSS_EMU_WARP_REDUCE(__reduce_or_sync, unsigned, 0u, acc | v)
GPULOSS_EMU_WARP_REDUCE(__reduce_xor_sync, unsigned, 0u, acc ^ v)
#undef GPULOSS_EMU_WARP_REDUCE

// ---------------------------------------------------------------------------
// Atomics (device scope; every emulated thread shares one address space).
template <class T> inline std::atomic_ref<T> gpuloss_emu_atomic(T* p) { return std::atomic_ref<T>(*p); }
template <class T, class F> inline T gpuloss_emu_atomic_update(T* p, F f) {
  std::atomic_ref<T> a(*p);
  T old = a.load(std::memory_order_relaxed);
  while (!a.compare_exchange_weak(old, f(old), std::memory_order_seq_cst, std::memory_order_relaxed)) {
  }
  return old;
}
#define GPULOSS_EMU_ATOMIC_ARITH(T) \
  inline T atomicAdd(T* p, T v) { return gpuloss_emu_atomic(p).fetch_add(v); } \
  inline T atomicSub(T* p, T v) { return gpuloss_emu_atomic(p).fetch_sub(v); } \
  inline T atomicExch(T* p, T v) { return gpuloss_emu_atomic(p).exchange(v); } \
  inline T atomicMax(T* p, T v) { return gpuloss_emu_atomic_update(p, [v](T o) { return o < v ? v : o; }); } \
  inline T atomicMin(T* p, T v) { return gpuloss_emu_atomic_update(p, [v](T o) { return v < o ? v : o; }); } \
  inline T atomicAnd(T* p, T v) { return gpuloss_emu_atomic(p).fetch_and(v); } \
  inline T atomicOr(T* p, T v) { return gpuloss_emu_atomic(p).fetch_or(v); } \
  inline T atomicXor(T* p, T v) { return gpuloss_emu_atomic(p).fetch_xor(v); } \
  inline T atomicCAS(T* p, T compare, T v) { \
    gpuloss_emu_atomic(p).compare_exchange_strong(compare, v); \
    return compare; \
  }
GPULOSS_EMU_ATOMIC_ARITH(int)
GPULOSS_EMU_ATOMIC_ARITH(unsigned int)
GPULOSS_EMU_ATOMIC_ARITH(long long)
GPULOSS_EMU_ATOMIC_ARITH(unsigned long long)
#undef GPULOSS_EMU_ATOMIC_ARITH
inline float atomicAdd(float* p, float v) { return gpuloss_emu_atomic(p).fetch_add(v); }
inline double atomicAdd(double* p, double v) { return gpuloss_emu_atomic(p).fetch_add(v); }
inline float atomicExch(float* p, float v) { return gpuloss_emu_atomic(p).exchange(v); }
inline unsigned short atomicCAS(unsigned short* p, unsigned short compare, unsigned short v) {
  gpuloss_emu_atomic(p).compare_exchange_strong(compare, v);
  return compare;
}
// CUDA's wrapping counters: inc resets to 0 past `limit`, dec reloads `limit`.
inline unsigned atomicInc(unsigned* p, unsigned limit) {
  return gpuloss_emu_atomic_update(p, [limit](unsigned o) { return o >= limit ? 0u : o + 1u; });
}
inline unsigned atomicDec(unsigned* p, unsigned limit) {
  return gpuloss_emu_atomic_update(p, [limit](unsigned o) { return (o == 0u || o > limit) ? limit : o - 1u; });
}
// Block/system-scoped variants: one address space, so they are the same.
template <class T, class... A> inline auto atomicAdd_block(T* p, A... a) { return atomicAdd(p, a...); }
template <class T, class... A> inline auto atomicAdd_system(T* p, A... a) { return atomicAdd(p, a...); }
template <class T, class... A> inline auto atomicMax_block(T* p, A... a) { return atomicMax(p, a...); }
template <class T, class... A> inline auto atomicCAS_block(T* p, A... a) { return atomicCAS(p, a...); }

// ---------------------------------------------------------------------------
// Math: <cmath> supplies expf, logf, log1pf, fmaxf, isnan, ... in the global
// namespace. The fast-math intrinsics map to the accurate functions: results
// agree with the GPU's __expf only to its stated error, never bitwise.
inline float __expf(float x) { return ::expf(x); }
inline float __exp10f(float x) { return ::powf(10.0f, x); }
inline float __logf(float x) { return ::logf(x); }
inline float __log2f(float x) { return ::log2f(x); }
inline float __log10f(float x) { return ::log10f(x); }
inline float __powf(float x, float y) { return ::powf(x, y); }
inline float __sinf(float x) { return ::sinf(x); }
inline float __cosf(float x) { return ::cosf(x); }
inline float __tanf(float x) { return ::tanf(x); }
inline float __fdividef(float x, float y) { return x / y; }
inline float fdividef(float x, float y) { return x / y; }
inline float __saturatef(float x) { return x != x ? 0.0f : (x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x)); }
inline float rsqrtf(float x) { return 1.0f / ::sqrtf(x); }
inline double rsqrt(double x) { return 1.0 / ::sqrt(x); }
inline float rcbrtf(float x) { return 1.0f / ::cbrtf(x); }
inline float exp10f(float x) { return ::powf(10.0f, x); }
inline double exp10(double x) { return ::pow(10.0, x); }
inline float __frsqrt_rn(float x) { return 1.0f / ::sqrtf(x); }
inline float __fsqrt_rn(float x) { return ::sqrtf(x); }
inline double __dsqrt_rn(double x) { return ::sqrt(x); }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return ::fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __fma_rn(double a, double b, double c) { return ::fma(a, b, c); }
inline void sincosf(float x, float* s, float* c) { *s = ::sinf(x); *c = ::cosf(x); }
inline void __sincosf(float x, float* s, float* c) { *s = ::sinf(x); *c = ::cosf(x); }

// Reinterpretation and conversion.
inline float __int_as_float(int v) { return std::bit_cast<float>(v); }
inline int __float_as_int(float v) { return std::bit_cast<int>(v); }
inline float __uint_as_float(unsigned v) { return std::bit_cast<float>(v); }
inline unsigned __float_as_uint(float v) { return std::bit_cast<unsigned>(v); }
inline double __longlong_as_double(long long v) { return std::bit_cast<double>(v); }
inline long long __double_as_longlong(double v) { return std::bit_cast<long long>(v); }
inline int __double2hiint(double v) { return (int)(std::bit_cast<unsigned long long>(v) >> 32); }
inline int __double2loint(double v) { return (int)(std::bit_cast<unsigned long long>(v) & 0xffffffffu); }
inline double __hiloint2double(int hi, int lo) {
  return std::bit_cast<double>(((unsigned long long)(unsigned)hi << 32) | (unsigned)lo);
}
inline int __float2int_rn(float x) { return (int)::nearbyintf(x); }
inline int __float2int_rz(float x) { return (int)x; }
inline int __float2int_rd(float x) { return (int)::floorf(x); }
inline int __float2int_ru(float x) { return (int)::ceilf(x); }
inline unsigned __float2uint_rn(float x) { return (unsigned)::nearbyintf(x); }
inline unsigned __float2uint_rz(float x) { return (unsigned)x; }
inline long long __float2ll_rn(float x) { return (long long)::nearbyintf(x); }
inline long long __float2ll_rz(float x) { return (long long)x; }
inline int __double2int_rn(double x) { return (int)::nearbyint(x); }
inline int __double2int_rz(double x) { return (int)x; }
inline long long __double2ll_rn(double x) { return (long long)::nearbyint(x); }
inline float __double2float_rn(double x) { return (float)x; }
inline float __int2float_rn(int x) { return (float)x; }
inline float __uint2float_rn(unsigned x) { return (float)x; }
inline float __ll2float_rn(long long x) { return (float)x; }
inline double __int2double_rn(int x) { return (double)x; }
inline double __ll2double_rn(long long x) { return (double)x; }

// Integer intrinsics.
inline int __popc(unsigned x) { return std::popcount(x); }
inline int __popcll(unsigned long long x) { return std::popcount(x); }
inline int __clz(int x) { return std::countl_zero((unsigned)x); }
inline int __clzll(long long x) { return std::countl_zero((unsigned long long)x); }
inline int __ffs(int x) { return x == 0 ? 0 : std::countr_zero((unsigned)x) + 1; }
inline int __ffsll(long long x) { return x == 0 ? 0 : std::countr_zero((unsigned long long)x) + 1; }
inline unsigned __brev(unsigned x) {
  unsigned r = 0;
  for (int i = 0; i < 32; ++i) r |= ((x >> i) & 1u) << (31 - i);
  return r;
}
inline int __mulhi(int a, int b) { return (int)(((long long)a * (long long)b) >> 32); }
inline unsigned __umulhi(unsigned a, unsigned b) { return (unsigned)(((unsigned long long)a * b) >> 32); }
inline long long __mul64hi(long long a, long long b) { return (long long)(((__int128)a * (__int128)b) >> 64); }
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
  return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline int __mul24(int a, int b) { return a * b; }
inline unsigned __umul24(unsigned a, unsigned b) { return a * b; }
inline unsigned __funnelshift_l(unsigned lo, unsigned hi, unsigned s) {
  s &= 31u;
  return s ? (hi << s) | (lo >> (32u - s)) : hi;
}
inline unsigned __funnelshift_r(unsigned lo, unsigned hi, unsigned s) {
  s &= 31u;
  return s ? (lo >> s) | (hi << (32u - s)) : lo;
}

// min/max: CUDA overloads them for every arithmetic pair; floats go through
// fmin/fmax (a NaN operand yields the other one, as on the GPU).
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
inline auto min(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return (C)std::fmin((C)a, (C)b);
  else return (C)b < (C)a ? (C)b : (C)a;
}
template <class A, class B>
  requires(std::is_arithmetic_v<A> && std::is_arithmetic_v<B>)
inline auto max(A a, B b) {
  using C = std::common_type_t<A, B>;
  if constexpr (std::is_floating_point_v<C>) return (C)std::fmax((C)a, (C)b);
  else return (C)a < (C)b ? (C)b : (C)a;
}
inline long long llmin(long long a, long long b) { return a < b ? a : b; }
inline long long llmax(long long a, long long b) { return a < b ? b : a; }
inline unsigned umin(unsigned a, unsigned b) { return a < b ? a : b; }
inline unsigned umax(unsigned a, unsigned b) { return a < b ? b : a; }

// Cache-hinted loads and stores are plain memory operations here.
template <class T> inline T __ldg(const T* p) { return *p; }
template <class T> inline T __ldcg(const T* p) { return *p; }
template <class T> inline T __ldca(const T* p) { return *p; }
template <class T> inline T __ldcs(const T* p) { return *p; }
template <class T> inline T __ldlu(const T* p) { return *p; }
template <class T> inline T __ldcv(const T* p) { return *p; }
template <class T> inline void __stwb(T* p, T v) { *p = v; }
template <class T> inline void __stcg(T* p, T v) { *p = v; }
template <class T> inline void __stcs(T* p, T v) { *p = v; }
template <class T> inline void __stwt(T* p, T v) { *p = v; }

#pragma GCC visibility pop

#endif  // GPULOSS_CUDA_EMULATOR_H
