"""The K-quants Q2_K..Q6_K (256-weight super-blocks): ports of ggml's ``quantize_row_q*_K_ref``.

Quantizers ``quantize_q*_k(x, out, first, end)`` take ``x`` f32[nblocks, 256] and fill ``out`` u8[nblocks,
block_bytes] for super-blocks first..end-1, without the GIL (callers run ranges on threads). They go through
the range in chunks of ``CHUNK`` super-blocks. Per chunk:
  1. the sub-blocks go side by side into lanes and the scale search (``ksearch``) fits them all at once;
  2. per super-block, the sub-block scales are quantized against one fp16 super-scale, and the weights are
     re-quantized with the scales *as stored* (fp16-rounded), exactly as C does;
  3. the levels are packed into the byte layout (``constants.TYPE_LAYOUT``; the anchor note, section 2.1).
Dequantizers live in ``kdequant``.
"""

from __future__ import annotations

import numpy as np

from qconvert.constants import QK_K
from qconvert.quant.cfloat import f32, jit, nearest_int, put_f16
from qconvert.quant.ksearch import (
    GROUP_MAX_EPS,
    make_q3_quants,
    make_qkx2_quants,
    make_qx_quants,
)

CHUNK = 8  # super-blocks per task: 64 lanes of 32 weights or 128 lanes of 16


@jit
def _to_lanes(x: np.ndarray, b0: int, nblk: int, n: int) -> np.ndarray:
    """Super-blocks x[b0:b0+nblk] -> f32[n, nblk·256/n]; lane b·(256/n) + j is sub-block j of block b."""
    per = QK_K // n
    xt = np.empty((n, nblk * per), np.float32)
    for b in range(nblk):
        for j in range(per):
            for i in range(n):
                xt[i, b * per + j] = x[b0 + b, j * n + i]
    return xt


@jit
def _from_lanes(L: np.ndarray, nblk: int) -> np.ndarray:
    """Inverse of ``_to_lanes`` for levels: i32[n, S] -> i32[nblk, 256]."""
    n = L.shape[0]
    per = QK_K // n
    out = np.empty((nblk, QK_K), np.int32)
    for b in range(nblk):
        for j in range(per):
            for i in range(n):
                out[b, j * n + i] = L[i, b * per + j]
    return out


@jit
def _requantize(x: np.ndarray, d: np.float32, dm: np.float32, lo: int, hi: int, L: np.ndarray) -> None:
    """L = clamp(nearest_int((x + dm)/d), lo, hi) − lo: levels from the stored scales, shifted to be >= 0.

    C divides by d here (it does not multiply by 1/d), so this does too.
    """
    for i in range(x.shape[0]):
        L[i] = max(lo, min(hi, nearest_int((x[i] + dm) / d))) - lo


@jit
def _pack_2bit(L: np.ndarray, qs: np.ndarray) -> None:
    """L[256] in 0..3 -> qs[64]: weight 128h + 32k + l goes to byte 32h + l, bits 2k..2k+1."""
    for h in range(2):
        for l in range(32):
            base = 128 * h + l
            qs[32 * h + l] = L[base] | (L[base + 32] << 2) | (L[base + 64] << 4) | (L[base + 96] << 6)


@jit
def _max_positive(v: np.ndarray) -> np.float32:
    """max(0, v...) with C's strict ``>`` updates."""
    m = f32(0.0)
    for a in v:
        m = a if a > m else m  # noqa: FURB136  (C's ternary: max() differs on NaN)
    return m


# ---- Q2_K: 16 sub-blocks of 16, 4-bit scale and min each; bytes scales[16] qs[64] d dmin ----

@jit
def _q2_k_block(x: np.ndarray, out: np.ndarray, scales: np.ndarray, mins: np.ndarray, L: np.ndarray) -> None:
    max_scale = _max_positive(scales)
    max_min = _max_positive(mins)
    sc = out[0:16]
    sc[:] = 0
    d = put_f16(out, 80, max_scale / f32(15.0) if max_scale > 0 else f32(0.0))
    if max_scale > 0:
        iscale = f32(15.0) / max_scale
        for j in range(16):
            sc[j] = nearest_int(iscale * scales[j]) & 0xFF
    dmin = put_f16(out, 82, max_min / f32(15.0) if max_min > 0 else f32(0.0))
    if max_min > 0:
        iscale = f32(15.0) / max_min
        for j in range(16):
            sc[j] = (np.int64(sc[j]) | (nearest_int(iscale * mins[j]) << 4)) & 0xFF
    for j in range(16):
        s = np.int64(sc[j])
        dj = d * f32(s & 0xF)
        if dj != 0:
            _requantize(x[16 * j:16 * j + 16], dj, dmin * f32(s >> 4), 0, 3, L[16 * j:16 * j + 16])
    _pack_2bit(L, out[16:80])


@jit(nogil=True)
def quantize_q2_k(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    for b0 in range(first, end, CHUNK):
        nblk = min(CHUNK, end - b0)
        xt = _to_lanes(x, b0, nblk, 16)
        L = np.empty(xt.shape, np.int32)
        scales, mins = make_qkx2_quants(xt, np.abs(xt), 3, f32(-0.5), f32(0.1), 15, True, L)
        Lb = _from_lanes(L, nblk)
        for b in range(nblk):
            _q2_k_block(x[b0 + b], out[b0 + b], scales[16 * b:16 * b + 16], mins[16 * b:16 * b + 16], Lb[b])


# ---- Q3_K: 16 sub-blocks of 16, signed 6-bit scales; bytes hmask[32] qs[64] scales[12] d ----

@jit
def _q3_k_scale(sc: np.ndarray, j: int) -> int:
    """Sub-block j's 6-bit scale minus 32: low 4 bits in a nibble of byte j % 8, high 2 bits in byte 8 + j % 4."""
    low = np.int64(sc[j]) & 0xF if j < 8 else np.int64(sc[j - 8]) >> 4
    return (low | ((np.int64(sc[8 + j % 4]) >> (2 * (j // 4))) & 3) << 4) - 32  # type: ignore[return-value]  # a C int, see cfloat._Jit


@jit
def _q3_k_scales(out: np.ndarray, scales: np.ndarray) -> np.float32:
    """Quantize the 16 sub-block scales to signed 6 bits against the one of largest magnitude; returns d."""
    max_scale = f32(0.0)
    amax = f32(0.0)
    for s in scales:
        max_scale = s if abs(s) > amax else max_scale
        amax = abs(s) if abs(s) > amax else amax  # noqa: FURB136  (C's ternary: max() differs on NaN)
    sc = out[96:108]
    sc[:] = 0
    if max_scale == 0:
        return put_f16(out, 108, f32(0.0))
    iscale = f32(-32.0) / max_scale
    for j in range(16):
        l8 = nearest_int(iscale * scales[j]) & 0xFF  # C stores it in an int8_t first
        l = max(-32, min(31, l8 - 256 if l8 > 127 else l8)) + 32
        if j < 8:
            sc[j] = l & 0xF
        else:
            sc[j - 8] |= (l & 0xF) << 4
        sc[j % 4 + 8] |= (l >> 4) << (2 * (j // 4))
    return put_f16(out, 108, f32(1.0) / iscale)


@jit
def _q3_k_block(x: np.ndarray, out: np.ndarray, scales: np.ndarray, L: np.ndarray) -> None:
    d = _q3_k_scales(out, scales)
    for j in range(16):
        dj = d * f32(_q3_k_scale(out[96:108], j))
        if dj != 0:
            _requantize(x[16 * j:16 * j + 16], dj, f32(0.0), -4, 3, L[16 * j:16 * j + 16])
    hmask = out[0:32]
    hmask[:] = 0
    for j in range(QK_K):  # bit 2 of level j (0..7) goes to bit j // 32 of byte j % 32; branch-free on purpose
        hmask[j % 32] |= (L[j] >> 2) << (j // 32)
        L[j] &= 3
    _pack_2bit(L, out[32:96])


@jit(nogil=True)
def quantize_q3_k(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    for b0 in range(first, end, CHUNK):
        nblk = min(CHUNK, end - b0)
        xt = _to_lanes(x, b0, nblk, 16)
        L = np.empty(xt.shape, np.int32)
        scales = make_q3_quants(xt, 4, L)
        Lb = _from_lanes(L, nblk)
        for b in range(nblk):
            _q3_k_block(x[b0 + b], out[b0 + b], scales[16 * b:16 * b + 16], Lb[b])


# ---- Q4_K / Q5_K: 8 sub-blocks of 32, 6-bit scale and min each; bytes d dmin scales[12] (qh[32]) qs[128] ----

@jit
def _scale_min_k4(sc: np.ndarray, j: int) -> tuple[int, int]:
    """``get_scale_min_k4``: sub-block j's 6-bit (scale, min) from the 12 packed bytes."""
    a, b, c = np.int64(sc[j - 4 if j >= 4 else j]), np.int64(sc[j]), np.int64(sc[j + 4])
    if j < 4:
        return b & 63, c & 63  # type: ignore[return-value]  # a C int, see cfloat._Jit
    return (c & 0xF) | ((a >> 6) << 4), (c >> 4) | ((b >> 6) << 4)  # type: ignore[return-value]  # a C int, see cfloat._Jit


@jit
def _qkx_search(x: np.ndarray, b0: int, nblk: int, nmax: int, rmin: np.float32, nstep: int
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q4_K/Q5_K sub-block fits for a chunk, weights w = sqrt(Σx²/32) + |x|: (scales, mins, levels i32[nblk, 256])."""
    xt = _to_lanes(x, b0, nblk, 32)
    S = xt.shape[1]
    sum_x2 = np.zeros(S, np.float32)
    for i in range(32):
        for s in range(S):
            sum_x2[s] += xt[i, s] * xt[i, s]
    av_x = np.sqrt(sum_x2 / f32(32.0))
    wt = np.empty_like(xt)
    for i in range(32):
        for s in range(S):
            wt[i, s] = av_x[s] + abs(xt[i, s])
    L = np.empty(xt.shape, np.int32)
    scales, mins = make_qkx2_quants(xt, wt, nmax, rmin, f32(0.1), nstep, False, L)
    return scales, mins, _from_lanes(L, nblk)


@jit
def _qkx_block(x: np.ndarray, out: np.ndarray, scales: np.ndarray, mins: np.ndarray, nmax: int,
               L: np.ndarray) -> None:
    """Shared Q4_K/Q5_K part: d, dmin and the 12 scale bytes of ``out``; re-quantize L[256] to 0..nmax."""
    max_scale = _max_positive(scales)
    max_min = _max_positive(mins)
    inv_scale = f32(63.0) / max_scale if max_scale > 0 else f32(0.0)
    inv_min = f32(63.0) / max_min if max_min > 0 else f32(0.0)
    sc = out[4:16]
    sc[:] = 0
    for j in range(8):
        ls = min(63, nearest_int(inv_scale * scales[j]) & 0xFF)  # C stores into uint8_t, then MIN(63, .)
        lm = min(63, nearest_int(inv_min * mins[j]) & 0xFF)
        if j < 4:
            sc[j] |= ls
            sc[j + 4] |= lm
        else:
            sc[j + 4] = (ls & 0xF) | ((lm & 0xF) << 4)
            sc[j - 4] |= (ls >> 4) << 6
            sc[j] |= (lm >> 4) << 6
    d = put_f16(out, 0, max_scale / f32(63.0))
    dmin = put_f16(out, 2, max_min / f32(63.0))
    for j in range(8):
        s, m = _scale_min_k4(sc, j)
        dj = d * f32(s)
        if dj != 0:
            _requantize(x[32 * j:32 * j + 32], dj, dmin * f32(m), 0, nmax, L[32 * j:32 * j + 32])


@jit
def _pack_q4_k(L: np.ndarray, out: np.ndarray) -> None:
    for c in range(4):  # byte 32c + l = weight 64c + l (low nibble) | weight 64c + 32 + l (high nibble)
        for l in range(32):
            out[16 + 32 * c + l] = L[64 * c + l] | (L[64 * c + 32 + l] << 4)


@jit
def _pack_q5_k(L: np.ndarray, out: np.ndarray) -> None:
    qh = out[16:48]
    qh[:] = 0
    for c in range(4):  # low nibbles as Q4_K; bit 4 of weight e goes to bit e // 32 of qh[e % 32]
        for l in range(32):
            lo, hi = L[64 * c + l], L[64 * c + 32 + l]
            qh[l] |= ((lo >> 4) << (2 * c)) | ((hi >> 4) << (2 * c + 1))
            out[48 + 32 * c + l] = (lo & 0xF) | ((hi & 0xF) << 4)


@jit(nogil=True)
def quantize_q4_k(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    for b0 in range(first, end, CHUNK):
        nblk = min(CHUNK, end - b0)
        scales, mins, Lb = _qkx_search(x, b0, nblk, 15, f32(-1.0), 20)
        for b in range(nblk):
            _qkx_block(x[b0 + b], out[b0 + b], scales[8 * b:8 * b + 8], mins[8 * b:8 * b + 8], 15, Lb[b])
            _pack_q4_k(Lb[b], out[b0 + b])


@jit(nogil=True)
def quantize_q5_k(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    # a copy of quantize_q4_k on purpose: literal nmax/rmin/nstep let LLVM specialise the search (~1.5x faster)
    for b0 in range(first, end, CHUNK):
        nblk = min(CHUNK, end - b0)
        scales, mins, Lb = _qkx_search(x, b0, nblk, 31, f32(-0.5), 15)
        for b in range(nblk):
            _qkx_block(x[b0 + b], out[b0 + b], scales[8 * b:8 * b + 8], mins[8 * b:8 * b + 8], 31, Lb[b])
            _pack_q5_k(Lb[b], out[b0 + b])


# ---- Q6_K: 16 sub-blocks of 16, int8 scales; bytes ql[128] qh[64] scales[16] d ----

@jit
def _q6_k_block(x: np.ndarray, out: np.ndarray, scales: np.ndarray, L: np.ndarray) -> None:
    max_scale = f32(0.0)
    max_abs = f32(0.0)
    for s in scales:
        max_scale = s if abs(s) > max_abs else max_scale
        max_abs = abs(s) if abs(s) > max_abs else max_abs  # noqa: FURB136  (C's ternary: max() differs on NaN)
    out[:] = 0
    if max_abs < f32(GROUP_MAX_EPS):
        return  # an all-zero block is all-zero bytes, d included
    iscale = f32(-128.0) / max_scale
    d = put_f16(out, 208, f32(1.0) / iscale)
    for j in range(16):
        s = min(127, nearest_int(iscale * scales[j])) & 0xFF  # stored as int8
        out[192 + j] = s
        dj = d * f32(s - 256 if s > 127 else s)
        if dj != 0:
            _requantize(x[16 * j:16 * j + 16], dj, f32(0.0), -32, 31, L[16 * j:16 * j + 16])
    for h in range(2):  # per 128-half: ql[64h + l], ql[64h + 32 + l] low nibbles; qh[32h + l] 2-bit highs
        for l in range(32):
            q1, q2, q3, q4 = L[128 * h + l], L[128 * h + l + 32], L[128 * h + l + 64], L[128 * h + l + 96]
            out[64 * h + l] = (q1 & 0xF) | ((q3 & 0xF) << 4)
            out[64 * h + l + 32] = (q2 & 0xF) | ((q4 & 0xF) << 4)
            out[128 + 32 * h + l] = (q1 >> 4) | ((q2 >> 4) << 2) | ((q3 >> 4) << 4) | ((q4 >> 4) << 6)


@jit(nogil=True)
def quantize_q6_k(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    for b0 in range(first, end, CHUNK):
        nblk = min(CHUNK, end - b0)
        xt = _to_lanes(x, b0, nblk, 16)
        L = np.empty(xt.shape, np.int32)
        scales = make_qx_quants(xt, 32, L)
        Lb = _from_lanes(L, nblk)
        for b in range(nblk):
            _q6_k_block(x[b0 + b], out[b0 + b], scales[16 * b:16 * b + 16], Lb[b])
