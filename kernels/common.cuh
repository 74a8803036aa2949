// common.cuh — device helpers shared by every kernels/*.cu file.
//
// What it provides (functions and types in namespace gl, macros GPULOSS_*):
//   * GPULOSS_REGISTER(entry)      no-op under NVRTC; the emulator uses it to
//                                  register each extern "C" __global__ entry
//   * GPULOSS_DYNAMIC_SHARED(T, p)  `T* p` over the launch's dynamic shared memory
//   * int8_t ... uint64_t, index_t fixed-width integers without <cstdint>
//   * bit casts and constants       +inf, -inf, quiet NaN built from bits
//   * f16_t / bf16_t                float16 / bfloat16 storage (16-bit words)
//                                  with IEEE round-to-nearest-even conversions
//   * storage<T>, acc_t<T>          the typed load/store layer over
//                                  float, double, f16_t, bf16_t
//   * warp_reduce / block_reduce    sum, max (NaN-propagating) and online-softmax
//                                  state, fixed butterfly/tree order: deterministic
//   * SoftmaxState                  online softmax (max, sum) pairs,
//                                  Milakov & Gimelshein 2018 (arXiv 1805.02867)
//   * GPULOSS_FOR_EACH_STORAGE(X)   stamps one template into _f32/_f64/_f16/_bf16
//
// Why no toolkit headers: every .cu file is compiled by NVRTC 12 and 13
// (CuPy RawModule, `gpuloss kernels`) with only kernels/ on the include path,
// and by g++ through kernels/emulator for the emulated backend.
// cuda_fp16.h / cuda_bf16.h / <cstdint> / <math.h> are not there under NVRTC
// without a CUDA toolkit, so half and bfloat16 are plain 16-bit words
// converted with bit operations, constants are built from bits (INFINITY
// needs math.h), and integer types are declared here.
//
// Requirements the reductions put on a launch: 1-D blocks whose blockDim.x is
// a multiple of 32 (at most 1024); every thread of the block calls
// block_reduce (it contains __syncthreads).
#ifndef GPULOSS_COMMON_CUH
#define GPULOSS_COMMON_CUH

// The emulator defines this before including us, to record entry points in a
// table it can launch by name; for NVRTC the extern "C" name is enough.
#ifndef GPULOSS_REGISTER
#define GPULOSS_REGISTER(name)
#endif

// Dynamic shared memory (the launch's shared_mem bytes), as `T* name`. One
// raw byte array serves every T: `extern __shared__ T name[]` with different
// T in two template instances of one module is a redeclaration error. The
// emulator defines its own form.
#ifndef GPULOSS_DYNAMIC_SHARED
#define GPULOSS_DYNAMIC_SHARED(T, name)                          \
  extern __shared__ __align__(16) unsigned char gpuloss_dynamic_smem_[]; \
  T* name = reinterpret_cast<T*>(gpuloss_dynamic_smem_)
#endif

// Device code vs host code (the emulator and host tests). NVRTC always
// defines __CUDA_ARCH__; g++ never does.
#if defined(__CUDA_ARCH__)
#define GPULOSS_DEVICE_CODE 1
#else
#define GPULOSS_DEVICE_CODE 0
#endif

#define GPULOSS_DEVICE __device__ __forceinline__

// `#pragma unroll` for NVRTC; g++ (the emulator) would warn about an unknown pragma.
#if GPULOSS_DEVICE_CODE
#define GPULOSS_UNROLL _Pragma("unroll")
#else
#define GPULOSS_UNROLL
#endif

// ---------------------------------------------------------------------------
// Fixed-width integers. NVRTC has no <cstdint>; the host compiler does, and
// re-declaring its typedefs with other spellings (long vs long long) clashes.
#if defined(__CUDACC_RTC__)
typedef signed char int8_t;
typedef unsigned char uint8_t;
typedef short int16_t;
typedef unsigned short uint16_t;
typedef int int32_t;
typedef unsigned int uint32_t;
typedef long long int64_t;
typedef unsigned long long uint64_t;
#else
#include <cstdint>
#endif

namespace gl {

static_assert(sizeof(int64_t) == 8 && sizeof(uint16_t) == 2, "fixed-width typedefs are wrong");

// 64-bit element indices everywhere an offset is N*C-shaped: 16384 rows of a
// 262144-class vocabulary is 2^32 elements, past int32 (and a signed
// overflow is undefined behaviour, so it would not even wrap predictably).
// Signed, so `i - 1` and differences behave; per-row column indices may stay
// int32 since C itself fits (docs/api.md §3.2: C <= 262144).
typedef int64_t index_t;

// Enumerators, not constexpr variables: NVRTC emits a namespace-scope
// constexpr as a .global symbol in every module.
enum : int {
  kWarpSize = 32,
  kMaxWarps = 32,  // 1024 threads / 32: size of block_reduce scratch
};
enum : unsigned int { kFullMask = 0xffffffffu };

// ---------------------------------------------------------------------------
// Bit casts. Device: the CUDA intrinsics (single moves). Host: the builtin
// that g++ >= 11 and clang provide, which is exact and has no aliasing UB.
GPULOSS_DEVICE uint32_t float_to_bits(float f) {
#if GPULOSS_DEVICE_CODE
  return __float_as_uint(f);
#else
  return __builtin_bit_cast(uint32_t, f);
#endif
}
GPULOSS_DEVICE float float_from_bits(uint32_t u) {
#if GPULOSS_DEVICE_CODE
  return __uint_as_float(u);
#else
  return __builtin_bit_cast(float, u);
#endif
}
GPULOSS_DEVICE uint64_t double_to_bits(double d) {
#if GPULOSS_DEVICE_CODE
  return (uint64_t)__double_as_longlong(d);
#else
  return __builtin_bit_cast(uint64_t, d);
#endif
}
GPULOSS_DEVICE double double_from_bits(uint64_t u) {
#if GPULOSS_DEVICE_CODE
  return __longlong_as_double((long long)u);
#else
  return __builtin_bit_cast(double, u);
#endif
}

// Constants from bits: INFINITY / NAN live in math.h, which NVRTC lacks.
template <class A> GPULOSS_DEVICE A pos_inf();
template <class A> GPULOSS_DEVICE A neg_inf();
template <class A> GPULOSS_DEVICE A quiet_nan();
template <> GPULOSS_DEVICE float pos_inf<float>() { return float_from_bits(0x7f800000u); }
template <> GPULOSS_DEVICE float neg_inf<float>() { return float_from_bits(0xff800000u); }
template <> GPULOSS_DEVICE float quiet_nan<float>() { return float_from_bits(0x7fffffffu); }
template <> GPULOSS_DEVICE double pos_inf<double>() { return double_from_bits(0x7ff0000000000000ull); }
template <> GPULOSS_DEVICE double neg_inf<double>() { return double_from_bits(0xfff0000000000000ull); }
template <> GPULOSS_DEVICE double quiet_nan<double>() { return double_from_bits(0x7fffffffffffffffull); }

// x != x: no header needed; valid because nothing here is built with
// -ffast-math / finite-math-only (which would fold it to false).
template <class A> GPULOSS_DEVICE bool is_nan(A x) { return x != x; }

// ---------------------------------------------------------------------------
// float16 / bfloat16 as 16-bit words.
//
// NaN convention: conversions return the canonical NaN (f32 0x7fffffff, f16
// 0x7fff, bf16 0x7fff), sign and payload dropped. That is what the GPU's cvt
// instructions are documented to produce and what CUDA's own host fallbacks
// emulate, so the inline-PTX path and the bit path agree on every input;
// selftest_convert_check (tests/kernels/selftest.cu, run by tests/test_nvrtc.py
// on a GPU) verifies it bitwise.
// bf16 -> f32 is a plain shift on both paths, so it keeps payloads.
// Everything else is IEEE 754 round-to-nearest-even, with subnormals kept
// (no flush to zero) and overflow to infinity.

struct f16_t { uint16_t bits; };
struct bf16_t { uint16_t bits; };

// The bit paths (the *_soft functions) run on host and device alike; the
// public names below pick the cvt instruction on the device where one exists.
GPULOSS_DEVICE float half_bits_to_float_soft(uint16_t h) {
  const uint32_t sign = (uint32_t)(h & 0x8000u) << 16;
  uint32_t exp = (h >> 10) & 0x1fu;
  uint32_t man = h & 0x3ffu;
  if (exp == 0x1fu) return float_from_bits(man ? 0x7fffffffu : (sign | 0x7f800000u));
  if (exp == 0) {
    if (man == 0) return float_from_bits(sign);
    // Subnormal half m * 2^-24: shift the leading 1 up to the implicit bit
    // position; each shift lowers the exponent (starts at 1 - 15 + 127 = 113).
    exp = 113;
    while ((man & 0x400u) == 0) { man <<= 1; --exp; }
    return float_from_bits(sign | (exp << 23) | ((man & 0x3ffu) << 13));
  }
  return float_from_bits(sign | ((exp + (127 - 15)) << 23) | (man << 13));
}

GPULOSS_DEVICE uint16_t float_to_half_bits_soft(float f) {
  const uint32_t x = float_to_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u;
  const uint32_t ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return 0x7fffu;                 // NaN
  // 65520 = 65504 (largest half) + half an ulp (16): ties round to the even
  // neighbour, which is infinity, so everything from 65520 up overflows.
  if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u);
  if (ax >= 0x38800000u) {                              // >= 2^-14: normal half
    // Rebias the exponent (127 -> 15), then drop 13 mantissa bits with
    // round-to-nearest-even: add 0xfff plus the bit that decides the tie.
    // A carry out of the mantissa correctly bumps the exponent.
    const uint32_t r = ax - ((127u - 15u) << 23);
    return (uint16_t)(sign | ((r + 0xfffu + ((r >> 13) & 1u)) >> 13));
  }
  // Subnormal half m * 2^-24 (or zero). 2^-25 itself is a tie that goes to
  // the even neighbour 0, so only strictly larger magnitudes can round up.
  if (ax <= 0x33000000u) return (uint16_t)sign;
  const uint32_t exp = ax >> 23;                        // 102 ... 112 here
  const uint32_t man = (ax & 0x7fffffu) | 0x800000u;
  const uint32_t shift = 126u - exp;                    // value * 2^24 = man >> shift
  uint32_t m = man >> shift;
  const uint32_t rem = man & ((1u << shift) - 1u);
  const uint32_t half = 1u << (shift - 1u);
  if (rem > half || (rem == half && (m & 1u))) ++m;     // m == 0x400 is the smallest normal: right
  return (uint16_t)(sign | m);
}

GPULOSS_DEVICE float bf16_bits_to_float_soft(uint16_t b) {
  return float_from_bits((uint32_t)b << 16);            // bf16 is the top half of an f32
}

GPULOSS_DEVICE uint16_t float_to_bf16_bits_soft(float f) {
  const uint32_t x = float_to_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return 0x7fffu;  // NaN (before rounding can make it inf)
  // Round-to-nearest-even on the low 16 bits; overflow carries into inf.
  return (uint16_t)((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

GPULOSS_DEVICE float half_bits_to_float(uint16_t h) {
#if GPULOSS_DEVICE_CODE
  float f;
  asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
  return f;
#else
  return half_bits_to_float_soft(h);
#endif
}

GPULOSS_DEVICE uint16_t float_to_half_bits(float f) {
#if GPULOSS_DEVICE_CODE
  uint16_t h;
  asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
  return h;
#else
  return float_to_half_bits_soft(f);
#endif
}

GPULOSS_DEVICE float bf16_bits_to_float(uint16_t b) { return bf16_bits_to_float_soft(b); }

GPULOSS_DEVICE uint16_t float_to_bf16_bits(float f) {
#if GPULOSS_DEVICE_CODE && __CUDA_ARCH__ >= 800   // cvt to bf16 is an sm_80 instruction
  uint16_t b;
  asm("cvt.rn.bf16.f32 %0, %1;" : "=h"(b) : "f"(f));
  return b;
#else
  return float_to_bf16_bits_soft(f);
#endif
}

// double -> float rounded to odd (truncate, then set the last bit if anything
// was dropped). Rounding that to 16 bits is then exactly the direct
// double -> 16-bit round-to-nearest-even: a plain double -> float -> half
// path rounds twice and can break ties the wrong way.
GPULOSS_DEVICE float double_to_float_round_odd(double d) {
  float f = (float)d;                                   // round to nearest
  if (is_nan(d) || (double)f == d) return f;
  uint32_t bits = float_to_bits(f);
  // |f| > |d| means rounding went away from zero: step one ulp back toward
  // zero (sign-magnitude, so decrement the magnitude). inf steps to FLT_MAX.
  const double af = f < 0.0f ? -(double)f : (double)f;
  const double ad = d < 0.0 ? -d : d;
  if (af > ad) bits -= 1u;
  return float_from_bits(bits | 1u);
}

// ---------------------------------------------------------------------------
// Typed load/store layer: kernels are templates over the storage type T and
// compute in acc_t<T>: float for 16/32-bit storage, double for double (docs/api.md §3.1).
// f16_t / bf16_t are one-word structs, so a pointer to them has the layout of
// a CuPy/NumPy float16 (or bfloat16) array.
template <class T> struct storage;

template <> struct storage<float> {
  typedef float acc;
  static GPULOSS_DEVICE float to_float(float v) { return v; }
  static GPULOSS_DEVICE double to_double(float v) { return (double)v; }
  static GPULOSS_DEVICE float from_float(float v) { return v; }
  static GPULOSS_DEVICE float from_double(double v) { return (float)v; }
  static GPULOSS_DEVICE acc to_acc(float v) { return v; }
  static GPULOSS_DEVICE float from_acc(acc v) { return v; }
};

template <> struct storage<double> {
  typedef double acc;
  static GPULOSS_DEVICE float to_float(double v) { return (float)v; }
  static GPULOSS_DEVICE double to_double(double v) { return v; }
  static GPULOSS_DEVICE double from_float(float v) { return (double)v; }
  static GPULOSS_DEVICE double from_double(double v) { return v; }
  static GPULOSS_DEVICE acc to_acc(double v) { return v; }
  static GPULOSS_DEVICE double from_acc(acc v) { return v; }
};

template <> struct storage<f16_t> {
  typedef float acc;
  static GPULOSS_DEVICE float to_float(f16_t v) { return half_bits_to_float(v.bits); }
  static GPULOSS_DEVICE double to_double(f16_t v) { return (double)half_bits_to_float(v.bits); }
  static GPULOSS_DEVICE f16_t from_float(float v) { f16_t r; r.bits = float_to_half_bits(v); return r; }
  static GPULOSS_DEVICE f16_t from_double(double v) {
    f16_t r; r.bits = float_to_half_bits(double_to_float_round_odd(v)); return r;
  }
  static GPULOSS_DEVICE acc to_acc(f16_t v) { return to_float(v); }
  static GPULOSS_DEVICE f16_t from_acc(acc v) { return from_float(v); }
};

template <> struct storage<bf16_t> {
  typedef float acc;
  static GPULOSS_DEVICE float to_float(bf16_t v) { return bf16_bits_to_float(v.bits); }
  static GPULOSS_DEVICE double to_double(bf16_t v) { return (double)bf16_bits_to_float(v.bits); }
  static GPULOSS_DEVICE bf16_t from_float(float v) { bf16_t r; r.bits = float_to_bf16_bits(v); return r; }
  static GPULOSS_DEVICE bf16_t from_double(double v) {
    bf16_t r; r.bits = float_to_bf16_bits(double_to_float_round_odd(v)); return r;
  }
  static GPULOSS_DEVICE acc to_acc(bf16_t v) { return to_float(v); }
  static GPULOSS_DEVICE bf16_t from_acc(acc v) { return from_float(v); }
};

template <class T> using acc_t = typename storage<T>::acc;

template <class T> GPULOSS_DEVICE float load_as_float(const T* p, index_t i) { return storage<T>::to_float(p[i]); }
template <class T> GPULOSS_DEVICE double load_as_double(const T* p, index_t i) { return storage<T>::to_double(p[i]); }
template <class T> GPULOSS_DEVICE acc_t<T> load_as_acc(const T* p, index_t i) { return storage<T>::to_acc(p[i]); }
template <class T> GPULOSS_DEVICE void store_from_float(T* p, index_t i, float v) { p[i] = storage<T>::from_float(v); }
template <class T> GPULOSS_DEVICE void store_from_double(T* p, index_t i, double v) { p[i] = storage<T>::from_double(v); }
template <class T> GPULOSS_DEVICE void store_from_acc(T* p, index_t i, acc_t<T> v) { p[i] = storage<T>::from_acc(v); }

// ---------------------------------------------------------------------------
// Math in the accumulation type: gl::exp(x) is expf for float and exp for
// double, so a template never silently computes a float in double (slow) or
// a double in float (wrong). The ::functions are NVRTC builtins / <cmath>.
GPULOSS_DEVICE float exp(float x) { return ::expf(x); }
GPULOSS_DEVICE double exp(double x) { return ::exp(x); }
GPULOSS_DEVICE float log(float x) { return ::logf(x); }
GPULOSS_DEVICE double log(double x) { return ::log(x); }
GPULOSS_DEVICE float log1p(float x) { return ::log1pf(x); }
GPULOSS_DEVICE double log1p(double x) { return ::log1p(x); }
GPULOSS_DEVICE float tanh(float x) { return ::tanhf(x); }
GPULOSS_DEVICE double tanh(double x) { return ::tanh(x); }

// max that propagates NaN (fmaxf drops it): docs/api.md §3.4 wants a NaN in a row to
// reach that row's loss, never a silent number.
template <class A> GPULOSS_DEVICE A max_nan(A a, A b) { return (a > b || is_nan(a)) ? a : b; }
template <class A> GPULOSS_DEVICE A min_nan(A a, A b) { return (a < b || is_nan(a)) ? a : b; }

// ---------------------------------------------------------------------------
// Online softmax (Milakov & Gimelshein 2018, arXiv 1805.02867: Algorithm 3,
// the online normalizer, and the associative operator they give for running
// it in parallel): one pass keeps the running max and the sum of
// exp(x - max); two partial states (m1, s1), (m2, s2) combine as
// m = max(m1, m2), s = s1 * exp(m1 - m) + s2 * exp(m2 - m).
// Infinities: a part whose max equals the total max is scaled by exactly 1
// instead of exp(m_i - m). For finite maxima that is the same number
// (exp(0) == 1); for a row of -inf (masked classes) or a +inf logit it avoids
// exp(-inf - -inf) = exp(inf - inf) = NaN. The state is an aggregate so it
// can live in __shared__ memory.
template <class A> struct SoftmaxState {
  A max;  // running maximum (-inf when nothing seen)
  A sum;  // sum of exp(x - max) over the elements seen
};

template <class A> GPULOSS_DEVICE SoftmaxState<A> softmax_empty() {
  SoftmaxState<A> st; st.max = neg_inf<A>(); st.sum = A(0); return st;
}

// exp(m_part - m_total), taken as 1 when they are equal (infinities).
template <class A> GPULOSS_DEVICE A softmax_scale(A m_part, A m_total) {
  return m_part == m_total ? A(1) : gl::exp(m_part - m_total);
}

// Add one element: one exp per element, not two (the branch picks which
// side gets rescaled). A NaN element makes max and sum NaN.
template <class A> GPULOSS_DEVICE void softmax_update(SoftmaxState<A>& st, A x) {
  if (x > st.max) {
    st.sum = st.sum * softmax_scale(st.max, x) + A(1);
    st.max = x;
  } else if (!is_nan(x)) {
    st.sum += softmax_scale(x, st.max);
  } else {
    st.max = x;
    st.sum = x;
  }
}

// softmax_update, also keeping rest = the sum over the elements with `counted`
// (every class but the target) under the same running max: a confident row's
// tiny loss is then log1p(rest), exact (xent.cu, vocab_parallel.cu).
template <class A>
GPULOSS_DEVICE void softmax_update_rest(SoftmaxState<A>& st, A& rest, A x, bool counted) {
  if (x > st.max) {
    const A scale = softmax_scale(st.max, x);
    st.sum = st.sum * scale + A(1);
    rest = rest * scale + (counted ? A(1) : A(0));
    st.max = x;
  } else if (!is_nan(x)) {
    const A e = softmax_scale(x, st.max);
    st.sum += e;
    if (counted) rest += e;
  } else {
    st.max = x;
    st.sum = x;
    rest = x;
  }
}

template <class A> GPULOSS_DEVICE SoftmaxState<A> softmax_combine(SoftmaxState<A> a, SoftmaxState<A> b) {
  SoftmaxState<A> r;
  r.max = max_nan(a.max, b.max);
  r.sum = a.sum * softmax_scale(a.max, r.max) + b.sum * softmax_scale(b.max, r.max);
  return r;
}

// log(sum_i exp(x_i)): -inf for an empty or all -inf row, +inf with a +inf
// element, NaN with a NaN element.
template <class A> GPULOSS_DEVICE A softmax_logsumexp(SoftmaxState<A> st) { return st.max + gl::log(st.sum); }

// ---------------------------------------------------------------------------
// Warp and block reductions.
//
// Determinism (docs/api.md §3.3): the butterfly pairs lanes in a fixed pattern, and
// both partners evaluate op(lower lane's value, upper lane's value), so every
// lane ends with bitwise the same result even for a non-commutative combine
// (softmax_combine is not bitwise symmetric once a*b + c*d is contracted to
// an fma). The block step reduces the per-warp results in warp order. The
// result depends on blockDim.x, so launchers must pick it from the shape
// only, never from timing.
struct SumOp {
  template <class V> GPULOSS_DEVICE V operator()(V a, V b) const { return a + b; }
};
struct MaxOp {
  template <class V> GPULOSS_DEVICE V operator()(V a, V b) const { return max_nan(a, b); }
};
struct SoftmaxOp {
  template <class A> GPULOSS_DEVICE SoftmaxState<A> operator()(SoftmaxState<A> a, SoftmaxState<A> b) const {
    return softmax_combine(a, b);
  }
};

GPULOSS_DEVICE float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(kFullMask, v, lane_mask); }
GPULOSS_DEVICE double shfl_xor(double v, int lane_mask) { return __shfl_xor_sync(kFullMask, v, lane_mask); }
GPULOSS_DEVICE int shfl_xor(int v, int lane_mask) { return __shfl_xor_sync(kFullMask, v, lane_mask); }
GPULOSS_DEVICE unsigned int shfl_xor(unsigned int v, int lane_mask) { return __shfl_xor_sync(kFullMask, v, lane_mask); }
GPULOSS_DEVICE long long shfl_xor(long long v, int lane_mask) { return __shfl_xor_sync(kFullMask, v, lane_mask); }
template <class A> GPULOSS_DEVICE SoftmaxState<A> shfl_xor(SoftmaxState<A> st, int lane_mask) {
  st.max = shfl_xor(st.max, lane_mask);
  st.sum = shfl_xor(st.sum, lane_mask);
  return st;
}

GPULOSS_DEVICE int lane_id() { return (int)(threadIdx.x & (kWarpSize - 1)); }
GPULOSS_DEVICE int warp_id() { return (int)(threadIdx.x / kWarpSize); }

// Reduce over groups of `width` consecutive lanes (a power of two <= 32;
// 32 = the whole warp). Every lane of the warp must call it (full mask);
// every lane of a group receives the group's result.
template <class V, class Op> GPULOSS_DEVICE V warp_reduce(V v, Op op, int width = kWarpSize) {
  const int lane = lane_id();
  GPULOSS_UNROLL
  for (int offset = kWarpSize / 2; offset > 0; offset >>= 1) {
    if (offset < width) {
      const V other = shfl_xor(v, offset);
      v = (lane & offset) ? op(other, v) : op(v, other);
    }
  }
  return v;
}

template <class V> GPULOSS_DEVICE V warp_reduce_sum(V v, int width = kWarpSize) { return warp_reduce(v, SumOp(), width); }
template <class V> GPULOSS_DEVICE V warp_reduce_max(V v, int width = kWarpSize) { return warp_reduce(v, MaxOp(), width); }
template <class A> GPULOSS_DEVICE SoftmaxState<A> warp_reduce_softmax(SoftmaxState<A> st, int width = kWarpSize) {
  return warp_reduce(st, SoftmaxOp(), width);
}

// Whole-block reduction; every thread of the block must call it and every
// thread receives the result. `scratch` is __shared__ storage for kMaxWarps
// values (callers declare `__shared__ V scratch[gl::kMaxWarps]`); it may be
// reused as soon as this returns. `identity` pads the warps that do not exist.
template <class V, class Op> GPULOSS_DEVICE V block_reduce(V v, V* scratch, Op op, V identity) {
  const int lane = lane_id();
  const int nwarps = (int)((blockDim.x + kWarpSize - 1) / kWarpSize);
  v = warp_reduce(v, op);
  if (lane == 0) scratch[warp_id()] = v;
  __syncthreads();
  // Every warp repeats the last level over the same values in the same
  // order: all threads get the result without a broadcast round trip.
  v = warp_reduce(lane < nwarps ? scratch[lane] : identity, op);
  __syncthreads();
  return v;
}

template <class V> GPULOSS_DEVICE V block_reduce_sum(V v, V* scratch) { return block_reduce(v, scratch, SumOp(), V(0)); }
template <class V> GPULOSS_DEVICE V block_reduce_max(V v, V* scratch) { return block_reduce(v, scratch, MaxOp(), neg_inf<V>()); }
template <class A> GPULOSS_DEVICE SoftmaxState<A> block_reduce_softmax(SoftmaxState<A> st, SoftmaxState<A>* scratch) {
  return block_reduce(st, scratch, SoftmaxOp(), softmax_empty<A>());
}

// ---------------------------------------------------------------------------
// One launch, one result: the "last block done" finish (CUDA C++ Programming
// Guide, memory fence functions, and its threadFenceReduction sample). Every
// block writes its float64 partial(s) to global memory, then takes a ticket
// from a counter; the block that draws ticket gridDim.x - 1 knows every other
// block's partials are visible (each block fenced before taking its ticket)
// and finishes the launch: it adds the partials with block_sum_partials, in a
// fixed order, so the result does not depend on which block came last, and
// sets the counter back to 0 (release_ticket), so the next launch, or the
// replay of a captured CUDA graph, finds it at 0 without a memset launch.
// The counter must not be shared with a kernel running at the same time
// (gpuloss/backends/launch.py keeps one set per stream). Every thread of
// every block must call last_block_done (it contains __syncthreads).
GPULOSS_DEVICE bool last_block_done(unsigned int* ticket) {
  __shared__ unsigned int is_last;
  __threadfence();  // this thread's partial writes reach device scope before the ticket is taken
  __syncthreads();
  if (threadIdx.x == 0) is_last = atomicAdd(ticket, 1u) == gridDim.x - 1u ? 1u : 0u;
  __syncthreads();
  const bool last = is_last != 0u;
  __syncthreads();  // is_last may be reused by the next call in this block
  if (last) __threadfence();
  return last;
}

// Called by the last block once it is done with the counter.
GPULOSS_DEVICE void release_ticket(unsigned int* ticket) {
  if (threadIdx.x == 0) *(volatile unsigned int*)ticket = 0u;
}

// Sum of p[0, n) by the whole block, in a fixed order (thread-strided, then
// the fixed tree of block_reduce). Volatile loads: other blocks of this launch
// wrote p, so the values must come from L2, never from a stale L1 line.
GPULOSS_DEVICE double block_sum_partials(const double* p, index_t n) {
  __shared__ double scratch[kMaxWarps];
  const volatile double* vp = p;
  double acc = 0.0;
  for (index_t i = threadIdx.x; i < n; i += blockDim.x) acc += vp[i];
  return block_reduce_sum(acc, scratch);
}

// ---------------------------------------------------------------------------
// Launch geometry in 64-bit: blockIdx.x * blockDim.x is computed in 32 bits
// by default and wraps past 2^32 threads.
GPULOSS_DEVICE index_t global_thread_id() { return (index_t)blockIdx.x * (index_t)blockDim.x + (index_t)threadIdx.x; }
GPULOSS_DEVICE index_t grid_stride() { return (index_t)gridDim.x * (index_t)blockDim.x; }

}  // namespace gl

// One template, four entry points: X(suffix, storage type) for each storage
// type. A kernel file defines, on one logical line,
//   #define STAMP(sfx, T) extern "C" __global__ void op_fwd_##sfx(const T* x) { op_fwd<T>(x); } GPULOSS_REGISTER(op_fwd_##sfx);
// then writes GPULOSS_FOR_EACH_STORAGE(STAMP) to get op_fwd_f32, _f64, _f16, _bf16
// (see tests/kernels/selftest.cu).
#define GPULOSS_FOR_EACH_STORAGE(X) X(f32, float) X(f64, double) X(f16, gl::f16_t) X(bf16, gl::bf16_t)

#endif  // GPULOSS_COMMON_CUH
