"""C float semantics that ggml's reference quantizers rely on, as numba scalar helpers.

Byte-exactness with ``ggml-quants.c`` depends on a few things numpy/numba do differently from C by default:

* ``nearest_int`` is not ``round()``: it adds 1.5·2²³ and reads the mantissa bits, which is round-half-to-even
  for |x| <= 4194303 and wraps bit patterns beyond that (release builds drop the assert). Large arguments
  occur for real when a fp16 scale underflows to a subnormal, so the bit trick itself is ported.
* ``roundf`` (Q8_0) rounds half away from zero.
* float -> (u)int8 casts compile to x86 ``cvttss2si``: truncation toward zero, and 0x80000000 for NaN or
  out-of-range values (the byte stored is then 0). That matters when 1/d overflows to inf for subnormal input.
* fp32 -> fp16 is IEEE round-half-to-even with overflow to inf (ggml's software path and F16C agree).

Every helper takes and returns float32 where C uses ``float``: numba promotes float32 op int64 to float64, so
callers convert ints with ``f32(...)`` before mixing them into float arithmetic.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol, TypeVar, cast, overload

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.extending import intrinsic

if TYPE_CHECKING:
    from numba.core.dispatcher import Dispatcher

f32 = np.float32

_F = TypeVar("_F", bound=Callable[..., Any])


class _Jit(Protocol):
    """The type of ``jit``: ``@jit`` or ``@jit(nogil=True)``, a dispatcher with the function's own signature.

    Kernel annotations name C types: ``np.float32`` for ``float``, ``int`` for integers (numba's int64/int32).
    numpy's stubs do not count ``np.int64`` as an ``int``, so a kernel returning one says
    ``# type: ignore[return-value]``; numba ignores annotations.
    """

    @overload
    def __call__(self, fn: _F, /) -> Dispatcher[_F]: ...
    @overload
    def __call__(self, *, nogil: bool = ...) -> Callable[[_F], Dispatcher[_F]]: ...


# Every kernel compiles with: fastmath off (no reassociation of sums, no FMA contraction: C's ggml-base has
# neither), numpy's error model (x/0.0 gives inf/nan as in C instead of raising, and no zero checks in loops),
# and an on-disk cache so the compile cost (tens of seconds) is paid once per install.
# (typed by hand: mypy cannot follow njit's overloads through functools.partial)
jit = cast(_Jit, functools.partial(njit, cache=True, error_model="numpy", fastmath=False))

_MAGIC = 12582912.0  # 1.5 * 2**23: adding it leaves the rounded integer in the low mantissa bits
_INT32_MIN = -2147483648


if TYPE_CHECKING:
    # What jitted code calls: numba passes the typing context itself (its stubs type the call as the
    # definition's signature, returning Never).
    def float_bits(v: np.float32, /) -> np.int32: ...
    def bits_float(v: np.int32, /) -> np.float32: ...
else:
    @intrinsic
    def float_bits(typingctx, v):
        """The IEEE bit pattern of a float32 as int32 (C's ``memcpy(&i, &f, 4)``); a register move, no rounding."""
        if v != types.float32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.IntType(32))

        return types.int32(types.float32), codegen


@jit
def nearest_int(fval: np.float32) -> int:
    """ggml's ``nearest_int`` exactly: add 1.5·2²³ in float32 and read the mantissa bits back as an int.

    Round half to even for |fval| <= 4194303; beyond that (and for NaN/inf) it returns the same wrapped bit
    pattern C does, which matters when a scale underflows and the quotient blows up.
    """
    i = np.int64(float_bits(fval + f32(_MAGIC)))
    return (i & 0x7FFFFF) - 0x400000  # type: ignore[return-value]  # a C int, see _Jit


@jit
def nearest_level(fval: np.float32, lo: np.float32, hi: np.float32) -> np.float32:
    """clamp(nearest_int(fval), lo, hi) as a float32 (exact: nearest_int's result is below 2**22 in size).

    Same value as the int version, but it stays in 32-bit lanes: int64 clamps do not vectorize on AVX2.
    """
    q = np.int32((np.int64(float_bits(fval + f32(_MAGIC))) & 0x7FFFFF) - 0x400000)
    return min(max(f32(q), lo), hi)


@jit
def roundf(v: np.float32) -> np.float32:
    """C ``roundf``: round half away from zero (float32 in, float32 out)."""
    t = np.trunc(v)
    if abs(v - t) >= f32(0.5):  # v - t is exact: the fractional part of a float32
        t += f32(1.0) if v > 0 else f32(-1.0)
    return t


@jit
def c_int(v: np.float32) -> int:
    """``(int)v`` as x86 ``cvttss2si`` computes it: truncate, and INT32_MIN for NaN or out of range."""
    inside = (v >= f32(-2147483648.0)) & (v < f32(2147483648.0))
    # i32, not i64: AVX2 converts 8 floats to i32 at once
    return np.int32(v) if inside else np.int32(_INT32_MIN)  # type: ignore[return-value]  # a C int, see _Jit


@jit
def c_int8(v: np.float32) -> int:
    """``(int8_t)v``: the low byte of ``c_int(v)``, sign-extended."""
    b = c_int(v) & 0xFF
    return b - 256 if b > 127 else b


if not TYPE_CHECKING:  # typed above
    @intrinsic
    def bits_float(typingctx, v):
        """The float32 whose IEEE bit pattern is the int32 ``v`` (inverse of ``float_bits``)."""
        if v != types.int32:
            return None

        def codegen(context, builder, signature, args):
            return builder.bitcast(args[0], ir.FloatType())

        return types.float32(types.int32), codegen


@jit
def f32_to_f16_bits(f: np.float32) -> int:
    """IEEE fp32 -> fp16 bit pattern, round half to even (what ``GGML_FP32_TO_FP16`` stores); NaN -> 0x7E00."""
    u = np.int64(float_bits(f)) & 0xFFFFFFFF
    sign = (u >> 16) & 0x8000
    a = u & 0x7FFFFFFF
    if a > 0x7F800000:
        return sign | 0x7E00  # type: ignore[return-value]  # a C int, see _Jit
    if a >= 0x477FF000:  # >= 65520, halfway between 65504 (max fp16) and 65536: rounds to even, i.e. to inf
        return sign | 0x7C00  # type: ignore[return-value]  # a C int, see _Jit
    if a < 0x38800000:  # below 2**-14: a subnormal fp16 in units of 2**-24 (the scaling is exact)
        return sign | int(np.rint(abs(f) * f32(16777216.0)))  # type: ignore[return-value]  # a C int, see _Jit
    h = (((a >> 23) - 112) << 10) | ((a >> 13) & 0x3FF)  # rebias the exponent 127 -> 15, keep 10 mantissa bits
    rest = a & 0x1FFF  # the 13 dropped bits: round half to even; a carry may ripple into the exponent
    return sign | (h + (rest > 0x1000 or (rest == 0x1000 and h & 1)))  # type: ignore[return-value]  # a C int, see _Jit


@jit
def f16_bits_to_f32(h: int) -> np.float32:
    """fp16 bit pattern -> float32 (exact)."""
    sign = (h & 0x8000) << 16
    e = (h >> 10) & 0x1F
    m = h & 0x3FF
    if e == 0:  # zero or subnormal: m · 2**-24, exact in float32
        v = f32(m) * f32(5.960464477539063e-08)
        return -v if sign else v
    bits = sign | ((0xFF if e == 31 else e + 112) << 23) | (m << 13)
    return bits_float(np.int32(bits - (1 << 32) if bits >= 1 << 31 else bits))


@jit
def put_f16(out: np.ndarray, pos: int, f: np.float32) -> np.float32:
    """Store ``f`` as little-endian fp16 at ``out[pos:pos+2]``; return the rounded value as float32."""
    h = f32_to_f16_bits(f)
    out[pos] = h & 0xFF
    out[pos + 1] = h >> 8
    return f16_bits_to_f32(h)
