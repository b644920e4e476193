"""IQ1_S (1.56 bits per weight) and IQ1_M (1.75): ports of ggml's ``quantize_row_iq1_{s,m}_impl``.

A 256-weight super-block has eight 32-weight sub-blocks of four 8-weight groups. A group stores an 11-bit index
into a grid of 2048 points, 8-tuples of levels l in 0..2 that decode to l − 1 + δ (δ = ±1/8, one sign per
sub-block); a sub-block stores a 3-bit scale s (scale d·(2s + 1)) and the sign of δ. Layout: d, qs[32] (low
index bytes), qh u16[8] (per sub-block: 3 high index bits per group, s at bits 12..14, δ < 0 at bit 15):
50 bytes.

The search per sub-block is exact for 3 values: sort the weights (C's ``qsort``, which glibc 2.36 implements as
a stable top-down merge sort, ported as such so that ties and NaNs land where C puts them), take prefix sums of
w·x and w, and try every pair of split points i1 <= i2 for both signs of δ, keeping the best Σ(w·x·q)²/Σ(w·q²).
4-tuples of levels off the grid take the grid point among their neighbours (the 3 smallest distances) with the
least weighted distance, and the scale is refitted. Needs an importance matrix (llama.cpp asserts without one):
weights are ``qw·sqrt(σ² + x²)``, σ² = 2·Σx²/256.

IQ1_M: sixteen 16-weight sub-blocks of two groups, each group with its own sign of δ (the split search tries
the four sign pairs at once, from prefix sums kept per half), a 3-bit scale per sub-block, and the super-block
scale refitted to the stored levels and hidden in the top nibbles of the four scale words. Layout: qs[32],
qh[16] (per sub-block: 3 high index bits and the δ sign of each group), scales u16[4] (56 bytes, no d field).
Without an importance matrix its weights are x².
"""

from __future__ import annotations

import functools

import numpy as np

from qconvert.errors import QuantTypeError
from qconvert.quant.cfloat import f32, jit, nearest_int, put_f16
from qconvert.quant.iq2 import IQ1, grid_tables

_DELTA = f32(0.125)  # IQ1S_DELTA (= IQ1M_DELTA)
_GROUP_MAX_EPS = f32(1e-12)  # GROUP_MAX_EPS_IQ1_S
_GROUP_MAX_EPS_M = f32(1e-7)  # GROUP_MAX_EPS_IQ1_M
_FUDGE_M = f32(1.1125)
_MASKS_M = (0x00, 0x80, 0x08, 0x88)  # qh bits of the δ signs for sign pairs (+,+), (+,-), (-,+), (-,-)
_FUDGE = f32(1.125)  # d = max_scale/15 · this ("another fudge factor")
_FLT_MAX = f32(3.4028234663852886e38)


@functools.cache
def _tables() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    return grid_tables(IQ1)


@jit
def _merge_sort(keys: np.ndarray, idx: np.ndarray, tmp_k: np.ndarray, tmp_i: np.ndarray) -> None:
    """glibc 2.36 ``msort_with_tmp`` on (key, index) pairs by key: halves n//2 and n − n//2 sorted recursively,
    then merged taking the left element while ``not left > right`` (C's comparator returns <= 0; a NaN compares
    equal). For n a power of two (32 here) the recursion's halves are exactly the runs of a bottom-up merge
    sort, which this does (numba cannot cache recursive functions)."""
    n = keys.shape[0]
    width = 1
    while width < n:
        for lo in range(0, n, 2 * width):
            a, b, t = lo, lo + width, 0
            n1, n2 = width, width
            while n1 > 0 and n2 > 0:
                if not keys[a] > keys[b]:  # cmp(a, b) <= 0: a < b, or equal, or unordered (NaN)
                    tmp_k[t] = keys[a]
                    tmp_i[t] = idx[a]
                    a += 1
                    n1 -= 1
                else:
                    tmp_k[t] = keys[b]
                    tmp_i[t] = idx[b]
                    b += 1
                    n2 -= 1
                t += 1
            while n1 > 0:
                tmp_k[t] = keys[a]
                tmp_i[t] = idx[a]
                a += 1
                n1 -= 1
                t += 1
            for j in range(t):  # the rest of the right half is already in place
                keys[lo + j] = tmp_k[j]
                idx[lo + j] = tmp_i[j]
        width *= 2


@jit
def _best_neighbour(neighbours: np.ndarray, pos: int, levels: np.ndarray, xb: np.ndarray, w: np.ndarray,
                    scale: np.float32, xx: np.ndarray, L: np.ndarray, k8: int) -> int:
    """``iq1_find_best_neighbour2`` for the group at k8: least Σ w·(scale·xx[l] − x)² over the neighbours, first
    on ties; −1 where no distance compares (C then scans the whole grid with an out-of-bounds read; refused)."""
    best_d2 = _FLT_MAX
    best = -1
    for j in range(1, neighbours[pos] + 1):
        g = neighbours[pos + j]
        d2 = f32(0.0)
        for i in range(8):
            diff = scale * xx[levels[g, i]] - xb[k8 + i]
            d2 += w[k8 + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            best = g
    if best >= 0:
        for i in range(8):
            L[k8 + i] = levels[best, i]
    return best


@jit
def _split_search(sumx: np.ndarray, sumw: np.ndarray, xp: np.ndarray, xm: np.ndarray
                  ) -> tuple[np.float32, int, int, int]:
    """The best (scale, i1, i2, shift) over the split points of the sorted sub-block, C's expressions."""
    n = sumx.shape[0] - 1
    best = -_FLT_MAX
    scale = f32(0.0)
    bi1, bi2, shift = -1, -1, 0
    for i1 in range(n + 1):
        for i2 in range(i1, n + 1):
            for sgn in range(2):
                xv = xp if sgn == 0 else xm
                sumqx = ((sumx[i1] - sumx[0]) * xv[0] + (sumx[i2] - sumx[i1]) * xv[1]
                         + (sumx[n] - sumx[i2]) * xv[2])
                sumq2 = ((sumw[i1] - sumw[0]) * xv[0] * xv[0] + (sumw[i2] - sumw[i1]) * xv[1] * xv[1]
                         + (sumw[n] - sumw[i2]) * xv[2] * xv[2])
                if sumq2 > 0 and sumqx * sumqx > best * sumq2:
                    scale = sumqx / sumq2
                    best = scale * sumqx
                    bi1, bi2, shift = i1, i2, 1 - 2 * sgn
    return scale, bi1, bi2, shift


@jit
def _iq1_s_block(x: np.ndarray, qw: np.ndarray, ob: np.ndarray, tables: tuple, xp: np.ndarray,
                 xm: np.ndarray) -> bool:
    """One IQ1_S super-block into ob[50] (d 0, qs 2, qh 34); False where C aborts."""
    levels, kmap, start, neighbours = tables
    ob[:] = 0
    sumx2 = f32(0.0)
    for v in x:
        sumx2 += v * v
    sigma2 = f32(2.0) * sumx2 / f32(256.0)
    weight = np.empty(32, np.float32)
    keys = np.empty(32, np.float32)
    idx = np.empty(32, np.int64)
    tmp_k = np.empty(32, np.float32)
    tmp_i = np.empty(32, np.int64)
    sumx = np.empty(33, np.float32)
    sumw = np.empty(33, np.float32)
    L = np.empty(32, np.int64)
    index = np.empty(4, np.int64)
    scales = np.zeros(8, np.float32)
    shifts = np.ones(8, np.int64)
    max_scale = f32(0.0)
    for ib in range(8):
        xb = x[32 * ib:32 * ib + 32]
        for i in range(32):
            weight[i] = qw[32 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i])
        vmax = abs(xb[0])
        for i in range(1, 32):
            vmax = vmax if vmax > abs(xb[i]) else abs(xb[i])  # noqa: FURB136  (C's MAX)
        if vmax < _GROUP_MAX_EPS:
            continue  # scale 0, shift +1, nothing stored
        for j in range(32):
            keys[j] = xb[j]
            idx[j] = j
        _merge_sort(keys, idx, tmp_k, tmp_i)
        sumx[0] = f32(0.0)
        sumw[0] = f32(0.0)
        for j in range(32):
            i = idx[j]
            sumx[j + 1] = sumx[j] + weight[i] * xb[i]
            sumw[j + 1] = sumw[j] + weight[i]
        scale, i1, i2, shift = _split_search(sumx, sumw, xp, xm)
        if i1 < 0 or i2 < 0 or shift == 0:
            continue
        for j in range(32):
            L[idx[j]] = 0 if j < i1 else 1 if j < i2 else 2
        if scale < 0:
            for j in range(32):
                L[j] = 2 - L[j]
            scale = -scale
            shift = -shift
        xx = xp if shift == 1 else xm
        all_on_grid = True
        for k in range(4):
            u = 0
            for j in range(8):
                u |= L[8 * k + j] << (2 * j)
            g = kmap[u]
            if g < 0:
                all_on_grid = False
                g = _best_neighbour(neighbours, start[u], levels, xb, weight, scale, xx, L, 8 * k)
                if g < 0:
                    return False
            index[k] = g
        if not all_on_grid:
            sumqx = f32(0.0)
            sumq2 = f32(0.0)
            for k in range(4):
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[levels[index[k], j]]
                    sumqx += w * q * xb[8 * k + j]
                    sumq2 += w * q * q
            if sumqx > 0 and sumq2 > 0:
                scale = sumqx / sumq2
        h = 0
        for k in range(4):
            ob[2 + 4 * ib + k] = index[k] & 255
            h |= (index[k] >> 8) << (3 * k)
        ob[34 + 2 * ib] = h & 0xFF
        ob[35 + 2 * ib] = h >> 8
        if not scale >= 0:
            return False  # C: GGML_ASSERT(scale >= 0)
        scales[ib] = scale
        shifts[ib] = shift
        max_scale = max_scale if max_scale > scale else scale  # noqa: FURB136  (C's MAX)
    if not max_scale:
        return True
    d = max_scale / f32(15.0)
    put_f16(ob, 0, d * _FUDGE)
    inv = f32(1.0) / d
    for ib in range(8):
        s = max(0, min(7, nearest_int(f32(0.5) * (inv * scales[ib] - f32(1.0)))))
        if shifts[ib] == -1:
            s |= 8
        ob[35 + 2 * ib] |= s << 4  # bits 12..15 of qh[ib]
    return True


@jit(nogil=True)
def _quantize(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int, tables: tuple) -> int:
    xp = np.array([-1.0 + _DELTA, _DELTA, 1.0 + _DELTA], np.float32)
    xm = np.array([-1.0 - _DELTA, -_DELTA, 1.0 - _DELTA], np.float32)
    for b in range(first, end):
        if not _iq1_s_block(x[b], qw[b % qw.shape[0]], out[b], tables, xp, xm):
            return b
    return -1


def quantize_iq1_s(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """Refused: IQ1_S needs an importance matrix."""
    raise QuantTypeError("IQ1_S cannot be made without an importance matrix (llama.cpp asserts on it); pass one "
                         "(qconvert gguf --calib builtin or --imatrix FILE)")


def quantize_iq1_s_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """x f32[nb, 256], qw f32[row blocks, 256] (block b uses qw[b % len]) -> out u8[nb, 50]."""
    bad = _quantize(x, qw, out, first, end, _tables())
    if bad >= 0:
        raise QuantTypeError(f"IQ1_S: super-block {bad} has NaN (or Inf) weights that llama.cpp's quantizer aborts "
                             "on (GGML_ASSERT in its grid search); the tensor is damaged, fix it first")


def dequantize_iq1_s(blocks: np.ndarray) -> np.ndarray:
    """u8[nb, 50] -> f32[nb, 256], in C's order: (d·(2s + 1))·((l − 1) + δ)."""
    nb = blocks.shape[0]
    levels = _tables()[0]
    d = blocks[:, :2].view(np.float16).astype(np.float32)  # [nb, 1]
    qh = blocks[:, 34:50].copy().view("<u2").astype(np.int64)  # [nb, 8]
    dl = d * (2 * ((qh >> 12) & 7) + 1).astype(np.float32)  # [nb, 8]
    delta = np.where(qh & 0x8000, -_DELTA, _DELTA).astype(np.float32)  # [nb, 8]
    high = (qh[:, :, None] >> (3 * np.arange(4))) & 7  # [nb, 8, 4]
    index = blocks[:, 2:34].astype(np.int64).reshape(nb, 8, 4) | (high << 8)
    q = (levels[index].astype(np.float32) - 1).reshape(nb, 8, 32) + delta[:, :, None]
    return (dl[:, :, None] * q).reshape(nb, 256).astype(np.float32)


@jit
def _split_search_m(px: np.ndarray, pw: np.ndarray, xp: np.ndarray, xm: np.ndarray
                    ) -> tuple[np.float32, int, int, int]:
    """IQ1_M's split search: the best (scale, i1, i2, k) with k the sign pair (0: ++, 1: +-, 2: -+, 3: --),
    from the per-half prefix sums px/pw f32[2, 17] (C's collapsed 3-group sums)."""
    n = px.shape[1] - 1
    txs0, txs1 = px[0, n], px[1, n]
    tws0, tws1 = pw[0, n], pw[1, n]
    p2, m2 = xp[2], xm[2]
    cp1 = xp[0] * xp[0] - xp[1] * xp[1]
    cp2 = xp[1] * xp[1] - xp[2] * xp[2]
    cm1 = xm[0] * xm[0] - xm[1] * xm[1]
    cm2 = xm[1] * xm[1] - xm[2] * xm[2]
    best = -_FLT_MAX
    scale = f32(0.0)
    bi1, bi2, bk = -1, -1, -1
    qx = np.empty(4, np.float32)
    q2 = np.empty(4, np.float32)
    for i1 in range(n + 1):
        for i2 in range(i1, n + 1):
            sx0 = px[0, i1] + px[0, i2]
            sx1 = px[1, i1] + px[1, i2]
            qx_p0, qx_m0 = txs0 * p2 - sx0, txs0 * m2 - sx0
            qx_p1, qx_m1 = txs1 * p2 - sx1, txs1 * m2 - sx1
            q2_p0 = tws0 * p2 * p2 + pw[0, i1] * cp1 + pw[0, i2] * cp2
            q2_m0 = tws0 * m2 * m2 + pw[0, i1] * cm1 + pw[0, i2] * cm2
            q2_p1 = tws1 * p2 * p2 + pw[1, i1] * cp1 + pw[1, i2] * cp2
            q2_m1 = tws1 * m2 * m2 + pw[1, i1] * cm1 + pw[1, i2] * cm2
            qx[0], qx[1], qx[2], qx[3] = qx_p0 + qx_p1, qx_p0 + qx_m1, qx_m0 + qx_p1, qx_m0 + qx_m1
            q2[0], q2[1], q2[2], q2[3] = q2_p0 + q2_p1, q2_p0 + q2_m1, q2_m0 + q2_p1, q2_m0 + q2_m1
            for k in range(4):
                if q2[k] > 0 and qx[k] * qx[k] > best * q2[k]:
                    scale = qx[k] / q2[k]
                    best = scale * qx[k]
                    bi1, bi2, bk = i1, i2, k
    return scale, bi1, bi2, bk


@jit
def _xx(k: int, pair: int, xp: np.ndarray, xm: np.ndarray) -> np.ndarray:
    """The three values of group k (0 or 1) of a sub-block with sign pair ``pair``."""
    plus = pair < 2 if k == 0 else pair % 2 == 0
    return xp if plus else xm


@jit
def _iq1_m_weights(xb: np.ndarray, qw: np.ndarray, has_qw: bool, sigma2: np.float32, weight: np.ndarray) -> None:
    for i in range(16):
        weight[i] = qw[i] * np.sqrt(sigma2 + xb[i] * xb[i]) if has_qw else xb[i] * xb[i]


@jit
def _iq1_m_block(x: np.ndarray, qw: np.ndarray, has_qw: bool, ob: np.ndarray, tables: tuple, xp: np.ndarray,
                 xm: np.ndarray) -> bool:
    """One IQ1_M super-block into ob[56] (qs 0, qh 32, scales 48); False where C aborts."""
    levels, kmap, start, neighbours = tables
    ob[:] = 0
    sumx2 = f32(0.0)
    for v in x:
        sumx2 += v * v
    sigma2 = f32(2.0) * sumx2 / f32(256.0)
    weight = np.empty(16, np.float32)
    keys = np.empty(16, np.float32)
    idx = np.empty(16, np.int64)
    tmp_k = np.empty(16, np.float32)
    tmp_i = np.empty(16, np.int64)
    px = np.empty((2, 17), np.float32)
    pw = np.empty((2, 17), np.float32)
    L = np.empty(16, np.int64)
    index = np.empty(2, np.int64)
    scales = np.zeros(16, np.float32)
    shifts = np.zeros(16, np.int64)
    max_scale = f32(0.0)
    for ib in range(16):
        xb = x[16 * ib:16 * ib + 16]
        _iq1_m_weights(xb, qw[16 * ib:16 * ib + 16], has_qw, sigma2, weight)
        vmax = abs(xb[0])
        for i in range(1, 16):
            vmax = vmax if vmax > abs(xb[i]) else abs(xb[i])  # noqa: FURB136  (C's MAX)
        if vmax < _GROUP_MAX_EPS_M:
            continue  # scale 0, sign pair 0, nothing stored
        for j in range(16):
            keys[j] = xb[j]
            idx[j] = j
        _merge_sort(keys, idx, tmp_k, tmp_i)
        px[:, 0] = f32(0.0)
        pw[:, 0] = f32(0.0)
        for j in range(16):
            i = idx[j]
            h = 0 if i < 8 else 1
            px[h, j + 1] = px[h, j] + weight[i] * xb[i]
            px[1 - h, j + 1] = px[1 - h, j]
            pw[h, j + 1] = pw[h, j] + weight[i]
            pw[1 - h, j + 1] = pw[1 - h, j]
        scale, i1, i2, pair = _split_search_m(px, pw, xp, xm)
        if i1 < 0 or i2 < 0 or pair < 0:
            continue
        for j in range(16):
            L[idx[j]] = 0 if j < i1 else 1 if j < i2 else 2
        if scale < 0:
            for j in range(16):
                L[j] = 2 - L[j]
            scale = -scale
            pair = 3 - pair
        all_on_grid = True
        for k in range(2):
            u = 0
            for j in range(8):
                u |= L[8 * k + j] << (2 * j)
            g = kmap[u]
            if g < 0:
                all_on_grid = False
                g = _best_neighbour(neighbours, start[u], levels, xb, weight, scale, _xx(k, pair, xp, xm), L, 8 * k)
                if g < 0:
                    return False
            index[k] = g
        if not all_on_grid:
            sumqx = f32(0.0)
            sumq2 = f32(0.0)
            for k in range(2):
                xx = _xx(k, pair, xp, xm)
                for j in range(8):
                    w = weight[8 * k + j]
                    q = xx[levels[index[k], j]]
                    sumqx += w * q * xb[8 * k + j]
                    sumq2 += w * q * q
            if sumqx > 0 and sumq2 > 0:
                scale = sumqx / sumq2
        ob[2 * ib] = index[0] & 255
        ob[2 * ib + 1] = index[1] & 255
        ob[32 + ib] = (index[0] >> 8) | ((index[1] >> 8) << 4)
        if not scale >= 0:
            return False  # C: GGML_ASSERT(scale >= 0)
        scales[ib] = scale
        shifts[ib] = pair
        max_scale = max_scale if max_scale > scale else scale  # noqa: FURB136  (C's MAX)
    if not max_scale:
        return True
    d = max_scale / f32(15.0)
    inv = f32(1.0) / d
    sc = np.zeros(4, np.int64)
    sumqx = f32(0.0)
    sumq2 = f32(0.0)
    for ib in range(16):  # the super-block scale, refitted to the stored levels (flat sub-blocks included)
        s = max(0, min(7, nearest_int(f32(0.5) * (inv * scales[ib] - f32(1.0)))))
        sc[ib // 4] |= s << (3 * (ib % 4))
        ob[32 + ib] |= _MASKS_M[shifts[ib]]
        xb = x[16 * ib:16 * ib + 16]
        _iq1_m_weights(xb, qw[16 * ib:16 * ib + 16], has_qw, sigma2, weight)
        for k in range(2):
            xx = _xx(k, shifts[ib], xp, xm)
            g = ob[2 * ib + k] + ((ob[32 + ib] << (8 - 4 * k)) & 0x700)
            for j in range(8):
                w = weight[8 * k + j]
                q = xx[levels[g, j]] * f32(2 * s + 1)
                sumqx += w * q * xb[8 * k + j]
                sumq2 += w * q * q
    if sumq2 > 0:
        d = sumqx / sumq2
    bits = np.empty(2, np.uint8)
    put_f16(bits, 0, d * _FUDGE_M)
    h = bits[0] | (bits[1] << 8)
    sc[0] |= (h & 0x000F) << 12
    sc[1] |= (h & 0x00F0) << 8
    sc[2] |= (h & 0x0F00) << 4
    sc[3] |= h & 0xF000
    for i in range(4):
        ob[48 + 2 * i] = sc[i] & 0xFF
        ob[49 + 2 * i] = (sc[i] >> 8) & 0xFF
    return True


@jit(nogil=True)
def _quantize_m(x: np.ndarray, qw: np.ndarray, has_qw: bool, out: np.ndarray, first: int, end: int,
                tables: tuple) -> int:
    xp = np.array([-1.0 + _DELTA, _DELTA, 1.0 + _DELTA], np.float32)
    xm = np.array([-1.0 - _DELTA, -_DELTA, 1.0 - _DELTA], np.float32)
    for b in range(first, end):
        if not _iq1_m_block(x[b], qw[b % qw.shape[0]], has_qw, out[b], tables, xp, xm):
            return b
    return -1


def _run_m(x: np.ndarray, qw: np.ndarray | None, out: np.ndarray, first: int, end: int) -> None:
    weights = np.zeros((1, 256), np.float32) if qw is None else qw
    bad = _quantize_m(x, weights, qw is not None, out, first, end, _tables())
    if bad >= 0:
        raise QuantTypeError(f"IQ1_M: super-block {bad} has NaN (or Inf) weights that llama.cpp's quantizer aborts "
                             "on (GGML_ASSERT in its grid search); the tensor is damaged, fix it first")


def quantize_iq1_m(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """x f32[nb, 256] -> out u8[nb, 56] for blocks first..end-1 (no importance matrix: weights x²)."""
    _run_m(x, None, out, first, end)


def quantize_iq1_m_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """As ``quantize_iq1_m`` with the importance matrix qw f32[row blocks, 256] (block b uses qw[b % len])."""
    _run_m(x, qw, out, first, end)


def dequantize_iq1_m(blocks: np.ndarray) -> np.ndarray:
    """u8[nb, 56] -> f32[nb, 256], in C's order: (d·(2s + 1))·((l − 1) + δ)."""
    nb = blocks.shape[0]
    levels = _tables()[0]
    sc = blocks[:, 48:56].copy().view("<u2").astype(np.int64)  # [nb, 4]
    h = (sc[:, 0] >> 12) | ((sc[:, 1] >> 8) & 0x00F0) | ((sc[:, 2] >> 4) & 0x0F00) | (sc[:, 3] & 0xF000)
    d = h.astype(np.uint16).view(np.float16).astype(np.float32)[:, None]  # [nb, 1]
    s = (sc[:, :, None] >> (3 * np.arange(4))) & 7  # [nb, 4, 4] -> sub-block 4i + j
    dl = d * (2 * s.reshape(nb, 16) + 1).astype(np.float32)  # [nb, 16]
    qh = blocks[:, 32:48].astype(np.int64)  # [nb, 16]
    high = (qh[:, :, None] >> (4 * np.arange(2))) & 7  # [nb, 16, 2]
    index = blocks[:, 0:32].astype(np.int64).reshape(nb, 16, 2) | (high << 8)
    neg = (qh[:, :, None] >> (4 * np.arange(2) + 3)) & 1  # [nb, 16, 2]
    delta = np.where(neg == 1, -_DELTA, _DELTA).astype(np.float32)
    q = (levels[index].astype(np.float32) - 1) + delta[..., None]  # [nb, 16, 2, 8]
    return (dl[:, :, None, None] * q).reshape(nb, 256).astype(np.float32)
