// common.cuh — device helpers shared by every kernels/*.cu file.
//
// What it provides (all in namespace gl, all header-only):
//   * GPULOSS_REGISTER(entry)      no-op under NVRTC; the emulator uses it to
//                                  register each extern "C" __global__ entry
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
// Why no toolkit headers: every .cu file is compiled three ways — by NVRTC
// (CuPy RawModule, `gpuloss kernels`) with only kernels/ on the include path,
// by NVRTC 12 and 13 alike, and by g++ through kernels/emulator for the
// emulated backend. cuda_fp16.h / cuda_bf16.h / <cstdint> / <math.h> are not
// available under NVRTC without a CUDA toolkit, so half and bfloat16 are
// plain 16-bit words converted with bit operations, constants are built from
// bits (INFINITY needs math.h), and integer types are declared here.
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

// Device code vs host code (the emulator and host tests). NVRTC always
// defines __CUDA_ARCH__; g++ never does.
#if defined(__CUDA_ARCH__)
#define GPULOSS_DEVICE_CODE 1
#else
#define GPULOSS_DEVICE_CODE 0
#endif

#define GPULOSS_DEVICE __device__ __forceinline__

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
// int32 since C itself fits (SPEC: C <= 262144).
typedef int64_t index_t;

constexpr int kWarpSize = 32;
constexpr unsigned int kFullMask = 0xffffffffu;
constexpr int kMaxWarps = 32;  // 1024 threads / 32: size of block_reduce scratch

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

template <class A> GPULOSS_DEVICE bool is_nan(A x) { return x != x; }

// ---------------------------------------------------------------------------
// float16 / bfloat16 as 16-bit words.
//
// NaN convention: conversions return the canonical NaN (f32 0x7fffffff, f16
// 0x7fff, bf16 0x7fff), sign and payload dropped. That is what the GPU's cvt
// instructions produce (and what CUDA's own host fallbacks emulate), so the
// inline-PTX path and the bit path below agree on every input. bf16 -> f32 is
// a plain shift on both paths, so it keeps payloads.
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

