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
  for the Elementary Functions", 1980), then e**r by a degree-6 minimax
  polynomial (5.5e-9 relative, a tenth of a float32 ulp), then 2**k built in
  the exponent bits.  Measured max relative error over [-87, 0]: see
  tests/test_cpu_math.py, which checks it.
* ``log_f32``: log x for any float32.  x = 2**k m with m in [sqrt(1/2),
  sqrt(2)), then log m = 2 atanh(f) with f = (m - 1) / (m + 1), |f| < 0.172,
  by its odd series (truncation < 3e-10 relative); k ln2 added in
  the two parts above.  Subnormals are scaled by 2**25 first; 0, negatives,
  inf and NaN give -inf, NaN, inf and NaN as IEEE log does.  Measured max
  relative error: 2.2e-7 over every float32 exponent.
* ``log1p_f32``: log(1 + v) for any float32: the same series on v itself
  when 1 + v is in [sqrt(1/2), sqrt(2)] (a tiny v keeps its digits), else
  log_f32(1 + v).  Measured max relative error 2.6e-7 (1 + v rounds
  just outside the series' range).
* ``log1p_unit``: log(1 + u) for u in [0, 1], the softplus of sigmoid cross
  entropy (u = e**-|x|): 2 atanh(u / (2 + u)), |f| <= 1/3, the same series.
  No cancellation at tiny u (f is u/2 to one rounding).  Measured max
  relative error 2.3e-7.
"""
from __future__ import annotations

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

from . import _numba_cache  # noqa: F401  (cache freshness over all cpu*.py, before any kernel exists)


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
def fma(typingctx, a, b, c):
    """a * b + c rounded once (llvm.fma): spelled out where results must not depend on whether
    LLVM contracts a multiply and an add, which can differ between two loops inlining the same code."""
    sig = a(a, b, c)

    def codegen(context, builder, signature, args):
        ty = args[0].type
        fn = builder.module.declare_intrinsic("llvm.fma", [ty], ir.FunctionType(ty, [ty, ty, ty]))
        return builder.call(fn, args)

    return sig, codegen


@intrinsic
def int32_bits_to_float32(typingctx, bits):
    """Reinterpret an int32 bit pattern as float32 (no conversion)."""
    sig = types.float32(types.int32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return sig, codegen


@intrinsic
def float32_to_int32_bits(typingctx, x):
    """The int32 bit pattern of a float32 (no conversion)."""
    sig = types.int32(types.float32)

    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.IntType(32))

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
# e**r = 1 + r + r**2 (E2 + r (E3 + ... + r E6)) on |r| <= ln2/2: the degree-6 polynomial of least maximum
# relative error (Remez exchange, run in float64 for this note; 4.3e-9, 5.5e-9 with float32 coefficients,
# below a tenth of a float32 ulp).  One multiply-add fewer than the degree-7 Taylor polynomial, and closer.
E2, E3, E4, E5, E6 = (F32(0.4999999813118623), F32(0.1666650606733187), F32(0.04166709015850953),
                      F32(0.00837026267340343), F32(0.0013893402850791998))


@njit(inline="always")
def exp_nonpositive(t):
    """e**t for float32 t <= 0: -inf (and anything below EXP_FLOOR) gives 0, NaN gives NaN.

    Also right for 0 < t < 88 (2**k stays a normal float32); no caller passes such t.  One
    comparison clamps (a single max instruction): a second clamp at 0 made LLVM merge both into
    seven mask operations per vector.
    """
    tc = t if t > EXP_FLOOR else EXP_FLOOR  # NaN -> EXP_FLOOR here; restored by (t - t) below
    k = np.floor(fma(tc, LOG2E, HALF))
    r = fma(-k, LN2_HI, tc)
    r = fma(-k, LN2_LO, r)
    p = fma(E6, r, E5)
    p = fma(p, r, E4)
    p = fma(p, r, E3)
    p = fma(p, r, E2)
    p = fma(p, r, ONE)
    p = fma(p, r, ONE)
    scale = int32_bits_to_float32((np.int32(k) + np.int32(127)) << np.int32(23))  # 2**k, k in [-126, 127]
    e = p * scale
    # t - t is 0, or NaN for a NaN t: a NaN logit reaches the row sum, where the caller sees it.
    return ZERO if t <= EXP_FLOOR else e + (t - t)


INF = F32(np.inf)
NAN = F32(np.nan)
TWO = F32(2.0)
SQRT2 = F32(1.4142135623730951)
SQRT2_MINUS_ONE = F32(0.4142135623730951)
SQRT_HALF_MINUS_ONE = F32(-0.2928932188134524)
SMALLEST_NORMAL = F32(np.finfo(np.float32).tiny)
TWO_POW_25 = F32(2.0 ** 25)
# Below this log1p(v) = v - v**2 / 2 rounds to v in float32.
TINY = F32(2.0 ** -30)
# 2 / (2j + 1): 2 atanh(f) = f * sum_j A_j f**(2j), the odd series of the logarithm.
A1, A3, A5, A7, A9, A11, A13, A15, A17 = (F32(2 / (2 * j + 1)) for j in range(9))


@njit(inline="always")
def _two_atanh(f):
    """2 atanh(f) = log((1 + f) / (1 - f)) for |f| <= 1/3: the odd series to f**17 (the callers'
    arguments keep its truncation below 3e-10 relative)."""
    z = f * f
    p = A17
    p = p * z + A15
    p = p * z + A13
    p = p * z + A11
    p = p * z + A9
    p = p * z + A7
    p = p * z + A5
    p = p * z + A3
    p = p * z + A1
    return f * p


@njit(inline="always")
def _log_near_one(v):
    """log(1 + v) for 1 + v in [sqrt(1/2), sqrt(2)]: 2 atanh(f), f = v / (2 + v), |f| < 0.172."""
    return _two_atanh(v / (TWO + v))


@njit(inline="always")
def log_f32(x):
    """Natural log of a float32 (see the module docstring); vectorisable: selects, no branches."""
    subnormal = x < SMALLEST_NORMAL
    xs = x * TWO_POW_25 if subnormal else x
    bits = float32_to_int32_bits(xs)
    k = ((bits >> np.int32(23)) & np.int32(0xFF)) - np.int32(127)
    k = k - np.int32(25) if subnormal else k
    m = int32_bits_to_float32((bits & np.int32(0x007FFFFF)) | np.int32(0x3F800000))  # [1, 2)
    high = m > SQRT2
    m = m * HALF if high else m
    k = k + np.int32(1) if high else k
    kf = F32(k)
    r = kf * LN2_HI + (_log_near_one(m - ONE) + kf * LN2_LO)
    finite_positive = (x > ZERO) & (x < INF)
    special = -INF if x == ZERO else (INF if x == INF else NAN)  # NaN, and any x < 0, give NaN
    return r if finite_positive else special


@njit(inline="always")
def log1p_f32(v):
    """log(1 + v) for any float32 v: the series directly near 0 (no rounding of 1 + v, so a tiny v keeps
    its digits), log_f32(1 + v) elsewhere (no cancellation there); vectorisable."""
    near = (v > SQRT_HALF_MINUS_ONE) & (v < SQRT2_MINUS_ONE)
    tiny = abs(v) < TINY  # log1p(v) = v to float32 precision; v / (2 + v) would lose a subnormal v
    return v if tiny else (_log_near_one(v) if near else log_f32(ONE + v))


@njit(inline="always")
def log1p_unit(u):
    """log(1 + u) for float32 u in [0, 1] (NaN passes through); vectorisable."""
    # log1p(u) = u to float32 precision below TINY (and u / (2 + u) would lose a subnormal u)
    return u if u < TINY else _two_atanh(u / (TWO + u))
