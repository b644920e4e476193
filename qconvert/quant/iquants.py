"""The non-linear 4-bit I-quants IQ4_NL (32-weight blocks) and IQ4_XS (256-weight super-blocks).

Ports of ggml's ``quantize_iq4_nl`` / ``quantize_iq4_xs`` (both go through ``quantize_row_iq4_nl_impl`` with
``ntry = 7``; ``ggml_quantize_chunk`` takes that path with and without an importance matrix). A weight is
stored as a 4-bit index into the 16 levels ``IQ4_NL_VALUES`` (-127..113), times a block scale:

* IQ4_NL: one fp16 scale per 32 weights. Block layout: d, qs[16].
* IQ4_XS: per 32-weight sub-block a 6-bit signed scale l in -32..31 (``d·l``), one fp16 ``d`` per 256 weights.
  Block layout: d, scales_h u16 (2 high bits of each sub-block scale), scales_l[4] (4 low bits), qs[128].

In both, qs byte 16·i + j holds the index of weight 32·i + j (low nibble) and of weight 32·i + 16 + j.

The scale search of one 32-weight sub-block: start with d = max/127 (``max`` the signed value of largest
magnitude), fit d by weighted least squares to the indices it gives, then try 15 more inverse scales
(itry − 127)/max, itry in −7..7, and keep the one with the best Σ(w·q·x)²/Σ(w·q²). Weights are x² without an
importance matrix, ``qw·sqrt(σ² + x²)`` with one (σ² = 2·Σx²/n over the super-block).

Kernels ``quantize_iq4_*(x, out, first, end)`` take ``x`` f32[nb, block] and fill ``out`` u8[nb,
block_bytes] for blocks first..end-1 without the GIL; the ``*_imatrix`` kernels take ``qw`` f32[row blocks,
block] too (block b uses ``qw[b % len(qw)]``). Every float operation follows C's order in float32.
"""

from __future__ import annotations

import numpy as np

from qconvert.constants import IQ4_NL_VALUES
from qconvert.quant.cfloat import f32, jit, nearest_int, put_f16

_VALUES = np.array(IQ4_NL_VALUES, dtype=np.float32)  # the levels as C's int8 -> float conversions give them
_NTRY = 7
_GROUP_MAX_EPS = f32(1e-15)


@jit
def best_index(values: np.ndarray, x: np.float32) -> int:
    """``best_index_int8``: the index of the level nearest to ``x``, ties to the upper level.

    C bisects for the bracket values[ml] <= x < values[ml + 1]; since the levels are sorted, ml is also the
    number of inner levels k = 1..n-2 with ``not x < values[k]``, which this counts without branches (a NaN
    counts every level, ending at the top level as C's bisection does). The last comparison is C's.
    """
    n = values.shape[0]
    if x <= values[0]:
        return 0
    if x >= values[n - 1]:
        return n - 1
    ml = 0
    for k in range(1, n - 1):
        ml += not x < values[k]
    return ml if x - values[ml] < values[ml + 1] - x else ml + 1


@jit
def _sums(xb: np.ndarray, w: np.ndarray, inv: np.float32, values: np.ndarray, L: np.ndarray,
          store: bool) -> tuple[np.float32, np.float32]:
    """Σ w·q·x and Σ w·q² for the levels q nearest to inv·x (sequential float32 sums, C's order)."""
    sumqx = f32(0.0)
    sumq2 = f32(0.0)
    for j in range(xb.shape[0]):
        idx = best_index(values, inv * xb[j])
        if store:
            L[j] = idx
        q = values[idx]
        sumqx += w[j] * q * xb[j]
        sumq2 += w[j] * q * q
    return sumqx, sumq2


@jit
def _block_scale(xb: np.ndarray, w: np.ndarray, values: np.ndarray, L: np.ndarray) -> np.float32:
    """The scale of one 32-weight sub-block (0 for an all-zero one): the first least-squares fit, then the 15
    trial inverse scales around 127/max. ``L`` gets the first fit's indices."""
    amax = f32(0.0)
    vmax = f32(0.0)
    for v in xb:
        if abs(v) > amax:
            amax = abs(v)
            vmax = v
    if amax < _GROUP_MAX_EPS:
        return f32(0.0)
    d = -vmax / values[0]
    sumqx, sumq2 = _sums(xb, w, f32(1.0) / d, values, L, True)
    d = sumqx / sumq2 if sumq2 > 0 else f32(0.0)
    best = d * sumqx
    for itry in range(-_NTRY, _NTRY + 1):
        inv = (f32(itry) + values[0]) / vmax
        sumqx, sumq2 = _sums(xb, w, inv, values, L, False)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            d = sumqx / sumq2
            best = d * sumqx
    return d


@jit
def _weights(xs: np.ndarray, qw: np.ndarray, has_qw: bool, w: np.ndarray) -> None:
    """w = qw·sqrt(σ² + x²), σ² = 2·Σx²/n over the whole super-block ``xs``; without ``qw``, w = x²."""
    n = xs.shape[0]
    if not has_qw:
        for j in range(n):
            w[j] = xs[j] * xs[j]
        return
    sigma2 = f32(0.0)
    for v in xs:
        sigma2 += v * v
    sigma2 *= f32(2.0) / f32(n)
    for j in range(n):
        w[j] = qw[j] * np.sqrt(sigma2 + xs[j] * xs[j])


@jit
def _pack_indices(L: np.ndarray, out: np.ndarray, pos: int) -> None:
    """Indices L[n] -> n/2 bytes at out[pos:]: byte 16·i + j = L[32·i + j] | L[32·i + 16 + j] << 4."""
    for i in range(L.shape[0] // 32):
        for j in range(16):
            out[pos + 16 * i + j] = L[32 * i + j] | (L[32 * i + 16 + j] << 4)


@jit
def _iq4_nl_block(xb: np.ndarray, qw: np.ndarray, has_qw: bool, ob: np.ndarray, w: np.ndarray,
                  L: np.ndarray) -> None:
    """One IQ4_NL block: fp16 d, then the indices of x/d (re-derived from the unrounded d, as C does)."""
    _weights(xb, qw, has_qw, w)
    d = _block_scale(xb, w, _VALUES, L)
    put_f16(ob, 0, d)
    inv = f32(1.0) / d if d != 0 else f32(0.0)
    for j in range(32):
        L[j] = best_index(_VALUES, inv * xb[j])
    _pack_indices(L, ob, 2)


@jit
def _iq4_xs_block(xs: np.ndarray, qw: np.ndarray, has_qw: bool, ob: np.ndarray, w: np.ndarray,
                  L: np.ndarray, scales: np.ndarray) -> None:
    """One IQ4_XS super-block: eight sub-block scales, quantized to 6 bits against d = −(signed max)/32."""
    _weights(xs, qw, has_qw, w)
    amax_scale = f32(0.0)
    max_scale = f32(0.0)
    for ib in range(8):
        s = _block_scale(xs[32 * ib:32 * ib + 32], w[32 * ib:32 * ib + 32], _VALUES, L[32 * ib:32 * ib + 32])
        scales[ib] = s
        if abs(s) > amax_scale:
            amax_scale = abs(s)
            max_scale = s
    d = -max_scale / f32(32.0)
    put_f16(ob, 0, d)
    inv = f32(1.0) / d if d != 0 else f32(0.0)
    scales_h = 0
    for ib in range(8):
        level = max(-32, min(31, nearest_int(inv * scales[ib])))
        dl = d * f32(level)
        idl = f32(1.0) / dl if dl != 0 else f32(0.0)
        for j in range(32 * ib, 32 * ib + 32):
            L[j] = best_index(_VALUES, idl * xs[j])
        level += 32
        if ib % 2 == 0:
            ob[4 + ib // 2] = level & 0xF
        else:
            ob[4 + ib // 2] |= (level & 0xF) << 4
        scales_h |= (level >> 4) << (2 * ib)
    ob[2] = scales_h & 0xFF
    ob[3] = scales_h >> 8
    _pack_indices(L, ob, 8)


@jit(nogil=True)
def quantize_iq4_nl(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    w = np.empty(32, np.float32)
    L = np.empty(32, np.int32)
    for b in range(first, end):
        _iq4_nl_block(x[b], w, False, out[b], w, L)


@jit(nogil=True)
def quantize_iq4_nl_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    w = np.empty(32, np.float32)
    L = np.empty(32, np.int32)
    for b in range(first, end):
        _iq4_nl_block(x[b], qw[b % qw.shape[0]], True, out[b], w, L)


@jit(nogil=True)
def quantize_iq4_xs(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    w = np.empty(256, np.float32)
    L = np.empty(256, np.int32)
    scales = np.empty(8, np.float32)
    for b in range(first, end):
        _iq4_xs_block(x[b], w, False, out[b], w, L, scales)


@jit(nogil=True)
def quantize_iq4_xs_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    w = np.empty(256, np.float32)
    L = np.empty(256, np.int32)
    scales = np.empty(8, np.float32)
    for b in range(first, end):
        _iq4_xs_block(x[b], qw[b % qw.shape[0]], True, out[b], w, L, scales)


# ---- dequantizers: numpy, blocks [nb, block_bytes] -> f32[nb, block] ----

def _levels(qs: np.ndarray) -> np.ndarray:
    """qs u8[nb, n/2] -> f32[nb, n]: each 16-byte group holds 32 weights, low nibbles first."""
    nb = qs.shape[0]
    q = qs.reshape(nb, -1, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    return _VALUES[(q & 0xF).reshape(nb, -1)]


def dequantize_iq4_nl(blocks: np.ndarray) -> np.ndarray:
    d = blocks[:, :2].view(np.float16).astype(np.float32)
    return d * _levels(blocks[:, 2:])


def dequantize_iq4_xs(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d = blocks[:, :2].view(np.float16).astype(np.float32)  # [nb, 1]
    scales_h = blocks[:, 2:4].copy().view(np.uint16).astype(np.int32)  # [nb, 1]
    low = blocks[:, 4:8].reshape(nb, 4, 1) >> np.array([0, 4], np.uint8).reshape(1, 1, 2)
    high = (scales_h >> (2 * np.arange(8))) & 3  # [nb, 8]
    ls = (low.reshape(nb, 8) & 0xF).astype(np.int32) | (high << 4)
    dl = d * (ls - 32).astype(np.float32)  # [nb, 8]
    return (dl[:, :, None] * _levels(blocks[:, 8:]).reshape(nb, 8, 32)).reshape(nb, 256)
