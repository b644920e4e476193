"""The 32-weight block types Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: ports of ggml's ``quantize_row_*_ref``.

Quantizers ``quantize_q*(x, out, first, end)`` take ``x`` f32[nblocks, 32] and fill ``out`` u8[nblocks,
block_bytes] for blocks first..end-1, without the GIL (callers run ranges on threads); the weights of one
block go in C's order. Dequantizers are numpy, f32 in C's operation order.
Block layouts (``ggml-common.h``): Q8_0 = d, qs i8[32]; Q4_0 = d, qs[16]; Q4_1 = d, m, qs[16];
Q5_0 = d, qh u32, qs[16]; Q5_1 = d, m, qh u32, qs[16]. A qs byte j holds weight j (low nibble) and j+16.
"""

from __future__ import annotations

import numpy as np

from qconvert.quant.cfloat import c_int, c_int8, f32, jit, put_f16, roundf

_FLT_MAX = 3.4028234663852886e38


@jit
def _signed_absmax(x: np.ndarray) -> np.float32:
    """The value with the largest magnitude, keeping its sign; the first one wins ties."""
    amax = f32(0.0)
    vmax = f32(0.0)
    for v in x:
        if amax < abs(v):
            amax = abs(v)
            vmax = v
    return vmax


@jit
def _min_max(x: np.ndarray) -> tuple[np.float32, np.float32]:
    lo = f32(_FLT_MAX)
    hi = f32(-_FLT_MAX)
    for v in x:  # C's order and NaN behaviour; min()/max() would differ on NaN
        if v < lo:  # noqa: PLR1730
            lo = v
        if v > hi:  # noqa: PLR1730
            hi = v
    return lo, hi


@jit
def _inverse(d: np.float32) -> np.float32:
    return f32(1.0) / d if d != 0 else f32(0.0)


@jit
def _put_u32(out: np.ndarray, pos: int, v: int) -> None:
    for k in range(4):
        out[pos + k] = (v >> (8 * k)) & 0xFF


@jit(nogil=True)
def quantize_q8_0(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """d = amax/127, q = roundf(x·(1/d)) (half away from zero)."""
    for b in range(first, end):
        xb, ob = x[b], out[b]
        amax = f32(0.0)
        for v in xb:
            amax = amax if amax > abs(v) else abs(v)  # noqa: FURB136  (C's ternary: max() differs on NaN)
        d = amax / f32(127.0)
        inv = _inverse(d)
        put_f16(ob, 0, d)
        for j in range(32):
            ob[2 + j] = c_int(roundf(xb[j] * inv)) & 0xFF


@jit(nogil=True)
def quantize_q4_0(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """d = max/-8 for the signed absmax; q = min(15, (int8)(x/d + 8.5)), truncating."""
    for b in range(first, end):
        xb, ob = x[b], out[b]
        d = _signed_absmax(xb) / f32(-8.0)
        inv = _inverse(d)
        put_f16(ob, 0, d)
        for j in range(16):
            q0 = min(15, c_int8(xb[j] * inv + f32(8.5))) & 0xFF
            q1 = min(15, c_int8(xb[16 + j] * inv + f32(8.5))) & 0xFF
            ob[2 + j] = (q0 | (q1 << 4)) & 0xFF


@jit(nogil=True)
def quantize_q4_1(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """d = (max-min)/15, m = min; q = min(15, (int8)((x-min)/d + 0.5))."""
    for b in range(first, end):
        xb, ob = x[b], out[b]
        lo, hi = _min_max(xb)
        d = (hi - lo) / f32(15.0)
        inv = _inverse(d)
        put_f16(ob, 0, d)
        put_f16(ob, 2, lo)
        for j in range(16):
            q0 = min(15, c_int8((xb[j] - lo) * inv + f32(0.5))) & 0xFF
            q1 = min(15, c_int8((xb[16 + j] - lo) * inv + f32(0.5))) & 0xFF
            ob[4 + j] = (q0 | (q1 << 4)) & 0xFF


@jit(nogil=True)
def quantize_q5_0(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """d = max/-16 for the signed absmax; q = min(31, (int8)(x/d + 16.5)); bit 4 of weight j -> qh bit j."""
    for b in range(first, end):
        xb, ob = x[b], out[b]
        d = _signed_absmax(xb) / f32(-16.0)
        inv = _inverse(d)
        put_f16(ob, 0, d)
        qh = 0
        for j in range(16):
            q0 = min(31, c_int8(xb[j] * inv + f32(16.5))) & 0xFF
            q1 = min(31, c_int8(xb[16 + j] * inv + f32(16.5))) & 0xFF
            ob[6 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
            qh |= ((q0 & 0x10) >> 4) << j
            qh |= ((q1 & 0x10) >> 4) << (j + 16)
        _put_u32(ob, 2, qh)


@jit(nogil=True)
def quantize_q5_1(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """d = (max-min)/31, m = min; q = (uint8)((x-min)/d + 0.5), no clamp (as in C)."""
    for b in range(first, end):
        xb, ob = x[b], out[b]
        lo, hi = _min_max(xb)
        d = (hi - lo) / f32(31.0)
        inv = _inverse(d)
        put_f16(ob, 0, d)
        put_f16(ob, 2, lo)
        qh = 0
        for j in range(16):
            q0 = c_int((xb[j] - lo) * inv + f32(0.5)) & 0xFF
            q1 = c_int((xb[16 + j] - lo) * inv + f32(0.5)) & 0xFF
            ob[8 + j] = (q0 & 0xF) | ((q1 & 0xF) << 4)
            qh |= ((q0 & 0x10) >> 4) << j
            qh |= ((q1 & 0x10) >> 4) << (j + 16)
        _put_u32(ob, 4, qh)


# ---- dequantizers: numpy, blocks [nb, block_bytes] -> f32[nb, 32] ----

def f16_field(blocks: np.ndarray, pos: int) -> np.ndarray:
    """The fp16 at byte ``pos`` of every block, as f32[nb, 1] for broadcasting."""
    return blocks[:, pos:pos + 2].view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """qs u8[nb, 16] -> u8[nb, 32]: low nibbles are weights 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0xF, qs >> 4], axis=1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """qh u8[nb, 4] (a little-endian u32) -> u8[nb, 32]: bit j, moved to 0x10, for weight j."""
    return (np.unpackbits(qh, axis=1, bitorder="little") << 4).astype(np.uint8)


def dequantize_q8_0(blocks: np.ndarray) -> np.ndarray:
    return blocks[:, 2:].view(np.int8).astype(np.float32) * f16_field(blocks, 0)


def dequantize_q4_0(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 2:]).astype(np.float32) - np.float32(8)
    return q * f16_field(blocks, 0)


def dequantize_q4_1(blocks: np.ndarray) -> np.ndarray:
    q = _nibbles(blocks[:, 4:]).astype(np.float32)
    return q * f16_field(blocks, 0) + f16_field(blocks, 2)


def dequantize_q5_0(blocks: np.ndarray) -> np.ndarray:
    q = (_nibbles(blocks[:, 6:]) | _high_bits(blocks[:, 2:6])).astype(np.float32) - np.float32(16)
    return q * f16_field(blocks, 0)


def dequantize_q5_1(blocks: np.ndarray) -> np.ndarray:
    q = (_nibbles(blocks[:, 8:]) | _high_bits(blocks[:, 4:8])).astype(np.float32)
    return q * f16_field(blocks, 0) + f16_field(blocks, 2)
