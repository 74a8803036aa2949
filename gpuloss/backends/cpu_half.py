"""float16 / bfloat16 <-> float32 conversions for the cpu backend, as parallel Numba loops on the bits.

NumPy converts float16 one element at a time in C (about 7 ns per element on
the 2-core benchmark machine, 20x a copy) and ml_dtypes' bfloat16 -> float32 is
slower still, so a float16 cross entropy on [4096, 32000] spent most of its time
casting. These loops work on the integer views and vectorise; each converts
exactly as NumPy / ml_dtypes do (round to nearest even, overflow to inf, NaN
kept a NaN of the same sign, subnormals exact), which tests/test_cpu_half.py
checks on every 16-bit pattern and on edge and random float32 values.

The bit layouts: IEEE 754 binary16 (1 sign, 5 exponent bits biased by 15, 10
mantissa bits) and bfloat16 (the top half of a binary32: 8 exponent bits, 7
mantissa bits).
"""
from __future__ import annotations

import platform

import numpy as np
from llvmlite import ir
from numba import njit, prange, types
from numba.extending import intrinsic

from .cpu_math import float32_to_int32_bits, int32_bits_to_float32

# Below this many elements NumPy's own cast is as fast as waking the threads.
PARALLEL_MIN = 1 << 16

_F32_TO_F16_OVERFLOW = np.uint32(0x477FF000)
_TWO_POW_M24 = np.float32(2.0 ** -24)  # |x| >= 65520 rounds to inf (65504 is the largest half)
_F32_SMALLEST_HALF_NORMAL = np.uint32(0x38800000)  # 2**-14


@njit(inline="always")
def f16_bits_from_f32(bits):
    """binary16 bits of the float32 with bits ``bits`` (uint32), rounded to nearest even.

    Every case is computed and one selected, with no branch, so a loop over it vectorises
    (the branchy form cost 1.3 ns per element, 10x a copy).
    """
    sign = np.uint16((bits >> np.uint32(16)) & np.uint32(0x8000))
    mag = bits & np.uint32(0x7FFFFFFF)
    # Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
    odd = (mag >> np.uint32(13)) & np.uint32(1)
    normal = (mag - np.uint32(0x38000000) + np.uint32(0x0FFF) + odd) >> np.uint32(13)
    # Subnormal: a half subnormal counts steps of 2**-24: |x| * 2**24 = (1.m) * 2**(e - 126), rounded
    # to nearest even (may reach 0x400, the smallest normal: the right encoding). The shift is
    # clamped to [14, 31]; from 25 up the result is 0, as it must be below 2**-25.
    e = mag >> np.uint32(23)
    shift = np.uint32(126) - min(e, np.uint32(112))
    shift = min(shift, np.uint32(31))
    full = np.uint32(0x800000) | (mag & np.uint32(0x7FFFFF))
    q = full >> shift
    r = full & ((np.uint32(1) << shift) - np.uint32(1))
    half = np.uint32(1) << (shift - np.uint32(1))
    up = (r > half) | ((r == half) & ((q & np.uint32(1)) != np.uint32(0)))
    subnormal = q + np.uint32(up)
    special = np.uint32(0x7E00) if mag > np.uint32(0x7F800000) else np.uint32(0x7C00)  # NaN made quiet, or inf
    out = normal if mag >= _F32_SMALLEST_HALF_NORMAL else subnormal
    out = np.uint32(0x7C00) if mag >= _F32_TO_F16_OVERFLOW else out
    out = special if mag >= np.uint32(0x7F800000) else out
    return sign | np.uint16(out)


@njit(inline="always")
def f32_bits_from_f16(h):
    """float32 bits (uint32) of the binary16 pattern h (uint16), exact; branch-free like the above."""
    h32 = np.uint32(h)
    sign = (h32 & np.uint32(0x8000)) << np.uint32(16)
    exp = (h32 >> np.uint32(10)) & np.uint32(0x1F)
    mant = h32 & np.uint32(0x3FF)
    normal = ((exp + np.uint32(112)) << np.uint32(23)) | (mant << np.uint32(13))
    # Subnormal or zero (exp 0): mant * 2**-24, exact in float32 arithmetic.
    subnormal = np.uint32(float32_to_int32_bits(np.float32(mant) * _TWO_POW_M24))
    out = normal
    out = subnormal if exp == np.uint32(0) else out
    out = (np.uint32(0x7F800000) | (mant << np.uint32(13))) if exp == np.uint32(0x1F) else out
    return sign | out


def _host_converts_half() -> bool:
    """Whether LLVM turns half <-> float conversions into instructions here: x86 with F16C (every
    x86-64 core since 2012), or AArch64. Elsewhere it would call a runtime library that Numba's
    JIT may not link."""
    machine = platform.machine().lower()
    if machine in ("aarch64", "arm64"):
        return True
    if machine in ("x86_64", "amd64"):
        import llvmlite.binding as llvm
        return bool(llvm.get_host_cpu_features().get("f16c", False))
    return False


# F16C's vcvtph2ps / vcvtps2ph convert 8 values per instruction, exactly and with IEEE round to
# nearest even (MXCSR's mode, nearest unless a program changed it); the bit arithmetic above
# runs in 64-bit lanes (Numba widens integer arithmetic), 1.3-1.8 ns per element.
HARDWARE_HALF = _host_converts_half()


@intrinsic
def _f32_from_f16_hw(typingctx, h):
    sig = types.float32(types.uint16)

    def codegen(context, builder, signature, args):
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return sig, codegen


@intrinsic
def _f16_bits_from_f32_hw(typingctx, v):
    sig = types.uint16(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return sig, codegen


@njit(inline="always")
def _f32_from_f16_bits(h):
    return int32_bits_to_float32(np.int32(f32_bits_from_f16(h)))


@njit(inline="always")
def _f16_bits_from_f32_bits(v):
    return f16_bits_from_f32(np.uint32(float32_to_int32_bits(v)))


# float32 value of a binary16 pattern, and the binary16 pattern of a float32: the same results
# either way (tests/test_cpu_half.py checks both against NumPy), the instructions where there are.
f32_from_f16 = _f32_from_f16_hw if HARDWARE_HALF else _f32_from_f16_bits
f16_from_f32 = _f16_bits_from_f32_hw if HARDWARE_HALF else _f16_bits_from_f32_bits


@njit(inline="always")
def bf16_bits_from_f32(bits):
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it a (quiet) NaN
        return np.uint16((bits >> np.uint32(16)) | np.uint32(0x0040))
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    return np.uint16((bits + np.uint32(0x7FFF) + odd) >> np.uint32(16))


@njit(parallel=True, cache=True, error_model="numpy")
def _f32_to_f16(src, dst):
    for i in prange(src.size):
        dst[i] = f16_from_f32(src[i])


@njit(parallel=True, cache=True, error_model="numpy")
def _f16_to_f32(src, dst):
    for i in prange(src.size):
        dst[i] = f32_from_f16(src[i])


@njit(parallel=True, cache=True, error_model="numpy")
def _f32_to_bf16(src_bits, dst):
    for i in prange(src_bits.size):
        dst[i] = bf16_bits_from_f32(src_bits[i])


@njit(parallel=True, cache=True, error_model="numpy")
def _bf16_to_f32(src, dst):
    for i in prange(src.size):
        dst[i] = np.uint32(src[i]) << np.uint32(16)


def _is_half(dtype) -> bool:
    return np.dtype(dtype) == np.float16 or getattr(np.dtype(dtype), "name", "") == "bfloat16"


def cast(a: np.ndarray, dtype) -> np.ndarray:
    """``a.astype(dtype, copy=False)`` (C order), fast for float32 <-> float16 / bfloat16.

    Any other pair, or a small array, goes to NumPy. The result never shares
    memory with ``a`` unless the dtype already matches.
    """
    dtype = np.dtype(dtype)
    if a.dtype == dtype:
        return a
    pair = (a.dtype == np.float32 and _is_half(dtype)) or (dtype == np.float32 and _is_half(a.dtype))
    if not pair or a.size < PARALLEL_MIN:
        return a.astype(dtype)
    src = np.ascontiguousarray(a).reshape(-1)
    out = np.empty(a.shape, dtype)
    dst = out.reshape(-1)
    if a.dtype == np.float32:
        if dtype == np.float16:
            _f32_to_f16(src, dst.view(np.uint16))
        else:
            _f32_to_bf16(src.view(np.uint32), dst.view(np.uint16))
    elif a.dtype == np.float16:
        _f16_to_f32(src.view(np.uint16), dst)
    else:
        _bf16_to_f32(src.view(np.uint16), dst.view(np.uint32))
    return out
