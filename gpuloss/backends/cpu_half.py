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

import numpy as np
from numba import njit, prange

# Below this many elements NumPy's own cast is as fast as waking the threads.
PARALLEL_MIN = 1 << 16

_F32_TO_F16_OVERFLOW = np.uint32(0x477FF000)  # |x| >= 65520 rounds to inf (65504 is the largest half)
_F32_SMALLEST_HALF_NORMAL = np.uint32(0x38800000)  # 2**-14


@njit(inline="always")
def _f16_bits_from_f32(bits):
    sign = np.uint16((bits >> np.uint32(16)) & np.uint32(0x8000))
    mag = bits & np.uint32(0x7FFFFFFF)
    if mag >= np.uint32(0x7F800000):  # inf, or NaN (made quiet, as NumPy does)
        return sign | (np.uint16(0x7E00) if mag > np.uint32(0x7F800000) else np.uint16(0x7C00))
    if mag >= _F32_TO_F16_OVERFLOW:
        return sign | np.uint16(0x7C00)
    if mag < _F32_SMALLEST_HALF_NORMAL:
        # A half subnormal counts steps of 2**-24: |x| * 2**24 = (1.m) * 2**(e - 126), rounded to
        # nearest even. Below 2**-25 (biased exponent <= 101) that is 0.
        e = mag >> np.uint32(23)
        if e <= np.uint32(101):
            return sign
        full = np.uint32(0x800000) | (mag & np.uint32(0x7FFFFF))
        shift = np.uint32(126) - e  # 14 .. 24
        q = full >> shift
        r = full & ((np.uint32(1) << shift) - np.uint32(1))
        half = np.uint32(1) << (shift - np.uint32(1))
        if r > half or (r == half and (q & np.uint32(1)) != 0):
            q += np.uint32(1)  # may reach 0x400: the smallest normal, which is the right encoding
        return sign | np.uint16(q)
    # Normal: rebias the exponent (127 -> 15) and round the 13 dropped mantissa bits to nearest even.
    odd = (mag >> np.uint32(13)) & np.uint32(1)
    rounded = mag - np.uint32(0x38000000) + np.uint32(0x0FFF) + odd
    return sign | np.uint16(rounded >> np.uint32(13))


@njit(inline="always")
def _bf16_bits_from_f32(bits):
    if (bits & np.uint32(0x7FFFFFFF)) > np.uint32(0x7F800000):  # NaN: keep it a (quiet) NaN
        return np.uint16((bits >> np.uint32(16)) | np.uint32(0x0040))
    odd = (bits >> np.uint32(16)) & np.uint32(1)
    return np.uint16((bits + np.uint32(0x7FFF) + odd) >> np.uint32(16))


@njit(parallel=True, cache=True, error_model="numpy")
def _f32_to_f16(src_bits, dst):
    for i in prange(src_bits.size):
        dst[i] = _f16_bits_from_f32(src_bits[i])


# float16 -> float32 by table: 65536 entries (256 KiB, cache-resident), filled once from NumPy's own
# conversion, so it is exact by construction; a gather beats the branches of the bit arithmetic.
_F16_TO_F32_BITS = np.arange(65536, dtype=np.uint16).view(np.float16).astype(np.float32).view(np.uint32)


@njit(parallel=True, cache=True, error_model="numpy")
def _f16_to_f32(src, dst, table):
    for i in prange(src.size):
        dst[i] = table[src[i]]


@njit(parallel=True, cache=True, error_model="numpy")
def _f32_to_bf16(src_bits, dst):
    for i in prange(src_bits.size):
        dst[i] = _bf16_bits_from_f32(src_bits[i])


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
        bits = src.view(np.uint32)
        if dtype == np.float16:
            _f32_to_f16(bits, dst.view(np.uint16))
        else:
            _f32_to_bf16(bits, dst.view(np.uint16))
    elif a.dtype == np.float16:
        _f16_to_f32(src.view(np.uint16), dst.view(np.uint32), _F16_TO_F32_BITS)
    else:
        _bf16_to_f32(src.view(np.uint16), dst.view(np.uint32))
    return out
