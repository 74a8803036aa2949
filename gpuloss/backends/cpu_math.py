"""Vectorisable float32 math for the Numba kernels (docs/design.md §6).

Numba on a machine without SVML calls the scalar ``expf`` for ``math.exp``,
which stops LLVM from vectorising a loop.  The pieces here are plain
arithmetic, selects and LLVM intrinsics, so a loop over them becomes AVX2 /
AVX-512 code:

* ``maxnum``: ``llvm.maxnum`` -- ignores NaN, so a max-reduction over it is
  associative and LLVM vectorises it without fast-math's no-NaN promise
  (callers detect NaN separately).
* ``exp_nonpositive``: e**t for t <= 0, as softmax needs after subtracting
  the row max.  Cody & Waite range reduction t = k ln2 + r, |r| <= ln2/2,
  with ln2 split in two so k*ln2_hi is exact (Cody & Waite, "Software Manual
  for the Elementary Functions", 1980), then e**r by its Taylor polynomial to
  degree 7 (truncation < 7.5e-9 relative, below half a float32 ulp), then
  2**k built in the exponent bits.  Measured max relative error over
  [-87, 0]: 7.9e-8 (tests/test_cpu_math.py checks it).
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic


@intrinsic
def maxnum(typingctx, a, b):
    """IEEE maxNum: the larger of a and b; if one is NaN, the other."""
    sig = a(a, b)

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.maxnum", [ty], ir.FunctionType(ty, [ty, ty]))
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def int32_bits_to_float32(typingctx, bits):
    """Reinterpret an int32 bit pattern as float32 (no conversion)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


F32 = np.float32
LOG2E = F32(1.4426950408889634)
# ln2 = LN2_HI + LN2_LO, LN2_HI with 9 significant bits so k * LN2_HI is exact for |k| <= 2**15.
LN2_HI = F32(0.693359375)
LN2_LO = F32(-2.12194440e-4)
# Below this e**t is under float32's smallest normal; such terms are 0 to float32 softmax.
EXP_FLOOR = F32(-87.0)
ZERO = F32(0.0)
HALF = F32(0.5)
ONE = F32(1.0)
# 1/n! for n = 2..7, the Taylor coefficients of e**r.
C2, C3, C4, C5, C6, C7 = (F32(1 / 2), F32(1 / 6), F32(1 / 24), F32(1 / 120), F32(1 / 720), F32(1 / 5040))


@njit(inline="always")
def exp_nonpositive(t):
    """e**t for float32 t <= 0: -inf (and anything below EXP_FLOOR) gives 0, NaN gives NaN."""
    tc = t if t > EXP_FLOOR else EXP_FLOOR
    tc = tc if tc < ZERO else ZERO
    k = np.floor(tc * LOG2E + HALF)
    r = tc - k * LN2_HI
    r = r - k * LN2_LO
    p = C7
    p = p * r + C6
    p = p * r + C5
    p = p * r + C4
    p = p * r + C3
    p = p * r + C2
    p = p * r + ONE
    p = p * r + ONE
    scale = int32_bits_to_float32((np.int32(k) + np.int32(127)) << np.int32(23))  # 2**k, k in [-126, 0]
    e = p * scale
    # t - t is 0, or NaN for a NaN t: a NaN logit reaches the row sum, where the caller sees it.
    return ZERO if t <= EXP_FLOOR else e + (t - t)
