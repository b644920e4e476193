"""IQ3_XXS (3.06 bits per weight) and IQ3_S (3.44): ports of ggml's ``quantize_row_iq3_xxs_impl`` and
``quantize_row_iq3_s_impl`` and of their grid set-up ``iq3xs_init_impl``.

Both cut a 256-weight super-block in eight 32-weight sub-blocks of eight 4-weight groups. A group stores the
index of a grid point, a 4-tuple of levels l in 0..7 (magnitude 2l + 1 when quantizing), and the weights' signs
separately; a sub-block stores a 4-bit scale s against one fp16 super-block ``d``.

* IQ3_XXS: 256 grid points. Per sub-block: eight 1-byte indices and a u32 holding four 7-bit sign masks (the
  8th sign of each 8 makes the parity even) and s at bits 28..31; scale d·(0.5 + s)·0.5; decoded magnitudes
  ``IQ3_XXS_MAGNITUDES[l]``. Layout: d, indices[64], scales and signs u32[8] (98 bytes).
* IQ3_S: 512 grid points (9-bit indices: low bytes in qs, high bits in qh), all 8 signs stored, scale
  d·(1 + 2s). Layout: d, qs[64], qh[8], signs[32], scales[4] (110 bytes). Like C, the qs and signs of a
  sub-block that is all zero are not skipped over: the next sub-block's are written in their place.

The search, per sub-block: take |x| (IQ3_XXS: keep the least important sign when the negatives are odd), try
inverse scales (15 + 0.2·is)/max (is in −15..15 for IQ3_XXS, −9..9 for IQ3_S); round every 4 weights to
levels, and when that 4-tuple is not a grid point, take the best of its nearest grid points (``neighbours``:
those at the 2 (IQ3_XXS) or 3 (IQ3_S) smallest distances, in C's tie order). Keep the scale with the best
Σ(w·x·q)²/Σ(w·q²); refit at it the off-grid groups (IQ3_S: all groups, and all when no try improved). Weights
are x² without an importance matrix, ``qw·sqrt(σ² + x²)`` with one.

Tables: the grids come from gguf-py's ``IQ3_XXS`` / ``IQ3_S`` (format facts); the map from the 4096 level
4-tuples to grid points and the neighbour lists are derived here, as ``iq3xs_init_impl`` derives them, on
first use.
"""

from __future__ import annotations

import functools

import numpy as np

from qconvert.errors import QuantTypeError
from qconvert.quant.cfloat import f32, jit, nearest_int, put_f16

_KMAX = 8  # levels per coordinate
_GROUP_MAX_EPS = f32(1e-8)  # GROUP_MAX_EPS_IQ3_XXS
_FUDGE_XXS = f32(1.0125)  # d is stored as max_scale/31 times this ("small improvement via this fudge factor")
_FUDGE_S = f32(1.033)
OK, FLAT, ABORT = 0, 1, 2  # how a sub-block's search ended


@functools.cache
def grid_tables(grid_size: int = 256) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(levels i8[grid_size, 4], kmap i32[4096], neighbour_start i32[4096], neighbours i32[...]) of the
    IQ3_XXS (``grid_size`` 256) or IQ3_S (512) grid.

    ``levels[g]``: the 4 levels of grid point g. ``kmap[u]``: the grid point whose levels pack (3 bits each,
    coordinate i at bit 3i) to u, or −1. For u not on the grid, ``neighbours[start[u]]`` is a count n and the
    next n entries are grid points, sorted by (squared distance of 2l + 1 magnitudes, index), covering the 2
    (256) or 3 (512) smallest distances.
    """
    import gguf.quants

    source = {256: gguf.quants.IQ3_XXS, 512: gguf.quants.IQ3_S}[grid_size]
    nwant = 2 if grid_size == 256 else 3
    if source.grid_hex is None:
        raise RuntimeError(f"this gguf-py carries no {source.__name__} grid; qconvert is tested with gguf==0.19.0")
    packed = np.frombuffer(bytes.fromhex(source.grid_hex.decode()), dtype="<u2")
    levels = ((packed[:, None].astype(np.int32) >> (4 * np.arange(4))) & 0xF).astype(np.int8)  # nibble = level
    codes = (levels.astype(np.int32) << (3 * np.arange(4))).sum(axis=1)
    kmap = np.full(8**4, -1, np.int32)
    kmap[codes] = np.arange(len(codes), dtype=np.int32)
    all_levels = (np.arange(8**4)[:, None] >> (3 * np.arange(4))) & 7  # [4096, 4]
    d2 = (((2 * all_levels[:, None, :] + 1) - (2 * levels[None, :, :].astype(np.int64) + 1)) ** 2).sum(axis=2)
    start = np.full(8**4, -1, np.int32)
    flat: list[int] = []
    for u in np.flatnonzero(kmap < 0):
        order = np.lexsort((np.arange(len(codes)), d2[u]))  # by distance, then index: C's qsort comparator
        keep = d2[u][order] <= np.unique(d2[u])[nwant - 1]  # the nwant smallest distances
        start[u] = len(flat)
        flat += [int(keep.sum()), *order[keep].tolist()]
    return levels, kmap, start, np.array(flat, np.int32)


@functools.cache
def _magnitudes(grid_size: int) -> np.ndarray:
    """f32[grid_size, 4]: 2l + 1 of every grid coordinate, as the search compares them."""
    return (2 * grid_tables(grid_size)[0].astype(np.float32) + 1).astype(np.float32)


@jit
def _best_neighbour(neighbours: np.ndarray, pos: int, levels: np.ndarray, mags: np.ndarray, xval: np.ndarray,
                    w: np.ndarray, scale: np.float32, L: np.ndarray, k4: int) -> int:
    """``iq3_find_best_neighbour`` for the group at k4..k4+3: the listed grid point with the least
    Σ w·(scale·q − x)², first one on ties; writes its levels to L[k4:k4+4]. Returns −1 when no distance
    compares (NaN), where C asserts."""
    best_d2 = f32(3.4028234663852886e38)
    best = -1
    for j in range(1, neighbours[pos] + 1):
        g = neighbours[pos + j]
        d2 = f32(0.0)
        for i in range(4):
            diff = scale * mags[g, i] - xval[k4 + i]
            d2 += w[k4 + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            best = g
    if best >= 0:
        for i in range(4):
            L[k4 + i] = levels[best, i]
    return best


@jit
def _signs(xb: np.ndarray, weight: np.ndarray, xval: np.ndarray, block_signs: np.ndarray, even: bool) -> None:
    """xval = |x| and the sign masks of each 8; with ``even`` (IQ3_XXS), the sign of the least important
    weight is kept in xval when the negatives are odd, and the masks keep 7 bits."""
    for k in range(4):
        nflip = 0
        s = 0
        for i in range(8):
            v = xb[8 * k + i]
            if v >= 0:
                xval[8 * k + i] = v
            else:
                xval[8 * k + i] = -v
                nflip += 1
                s |= 1 << i
        if not even:
            block_signs[k] = s
            continue
        if nflip % 2:
            imin = 0
            vmin = weight[8 * k] * xb[8 * k] * xb[8 * k]
            for i in range(1, 8):
                ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                if ax < vmin:
                    vmin = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        block_signs[k] = s & 127


@jit
def _round_groups(xval: np.ndarray, waux: np.ndarray, inv: np.float32, scale: np.float32, tables: tuple,
                  L: np.ndarray, on_grid: np.ndarray, only_off_grid: bool) -> bool:
    """Levels of the eight 4-groups at inverse scale ``inv``; off-grid groups take their best neighbour at
    ``scale``. With ``only_off_grid``, groups already on the grid are left alone. False if C would assert."""
    levels, kmap, start, neighbours, mags = tables
    for k in range(8):
        if only_off_grid and on_grid[k]:
            continue
        u = 0
        for i in range(4):
            lv = max(0, min(_KMAX - 1, nearest_int(f32(0.5) * (inv * xval[4 * k + i] - f32(1.0)))))
            L[4 * k + i] = lv
            u |= lv << (3 * i)
        g = kmap[u]
        if not only_off_grid:
            on_grid[k] = g >= 0
        if g < 0:
            g = _best_neighbour(neighbours, start[u], levels, mags, xval, waux, scale, L, 4 * k)
            if g < 0:
                return False
        elif only_off_grid:
            for i in range(4):
                L[4 * k + i] = levels[g, i]
    return True


@jit
def _fit(weight: np.ndarray, xval: np.ndarray, L: np.ndarray) -> tuple[np.float32, np.float32]:
    sumqx = f32(0.0)
    sumq2 = f32(0.0)
    for i in range(32):
        q = f32(2 * L[i] + 1)
        sumqx += weight[i] * xval[i] * q
        sumq2 += weight[i] * q * q
    return sumqx, sumq2


@jit
def _sub_block(xb: np.ndarray, weight: np.ndarray, tables: tuple, L: np.ndarray, block_signs: np.ndarray,
               work: np.ndarray, laux: np.ndarray, flags: np.ndarray, xxs: bool) -> tuple[np.float32, int]:
    """(scale >= 0, status) and levels L[32] of one 32-weight sub-block of IQ3_XXS (``xxs``) or IQ3_S; status
    FLAT for a sub-block C skips (max below 1e-8 for IQ3_XXS, 0 for IQ3_S), ABORT where C asserts
    (non-finite input), else OK."""
    xval, waux = work[0], work[1]  # |x| (IQ3_XXS: with the parity sign), sqrt of the weights
    on_grid, on_grid_aux = flags[0], flags[1]
    on_grid[:] = xxs  # IQ3_S starts "off grid": with no improving try, every group is refitted
    for i in range(32):
        waux[i] = np.sqrt(weight[i])
    _signs(xb, weight, xval, block_signs, xxs)
    vmax = xval[0]
    for i in range(1, 32):
        vmax = vmax if vmax > xval[i] else xval[i]  # noqa: FURB136  (C's MAX: max() differs on NaN)
    L[:] = 0
    if (vmax < _GROUP_MAX_EPS) if xxs else not vmax:
        return f32(0.0), FLAT
    best = f32(0.0)
    scale = vmax / f32(2 * _KMAX - 1)
    n_try = 15 if xxs else 9
    for is_ in range(-n_try, n_try + 1):
        inv = (f32(2 * _KMAX - 1) + f32(is_) * f32(0.2)) / vmax
        if not _round_groups(xval, waux, inv, f32(1.0) / inv, tables, laux, on_grid_aux, False):
            return f32(0.0), ABORT
        sumqx, sumq2 = _fit(weight, xval, laux)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = laux
            on_grid[:] = on_grid_aux
    if not on_grid.all() and scale > 0:
        if not xxs:
            on_grid[:] = False  # IQ3_S refits every group, not only the off-grid ones
        if not _round_groups(xval, waux, f32(1.0) / scale, scale, tables, L, on_grid, True):
            return f32(0.0), ABORT
        sumqx, sumq2 = _fit(weight, xval, L)
        if sumq2 > 0:
            scale = sumqx / sumq2
    if scale < 0:  # "should never happen": flip the scale and every sign
        scale = -scale
        for k in range(4):
            block_signs[k] = (~block_signs[k]) & (127 if xxs else 255)
    return scale, OK


@jit
def _iq3_xxs_block(x: np.ndarray, qw: np.ndarray, has_qw: bool, ob: np.ndarray, tables: tuple,
                   work: np.ndarray, iwork: np.ndarray, flags: np.ndarray) -> bool:
    """One IQ3_XXS super-block into ob[98]; False where C would abort (non-finite input).

    ``work`` f32[3, 32], ``iwork`` i64[4, 32], ``flags`` bool[2, 8]: scratch, reused across blocks."""
    kmap = tables[1]
    ob[:] = 0
    sumx2 = f32(0.0)
    for v in x:
        sumx2 += v * v
    sigma2 = f32(2.0) * sumx2 / f32(256.0)
    weight = work[2]
    L, laux, block_signs, packed = iwork[0], iwork[1], iwork[2, :4], iwork[3, :8]
    packed[:] = 0
    scales = np.zeros(8, np.float32)
    max_scale = f32(0.0)
    for ib in range(8):
        xb = x[32 * ib:32 * ib + 32]
        for i in range(32):
            weight[i] = qw[32 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i]) if has_qw else xb[i] * xb[i]
        scale, status = _sub_block(xb, weight, tables, L, block_signs, work, laux, flags, True)
        if status == ABORT or not scale >= 0:  # C: GGML_ASSERT(scale >= 0), which a NaN scale fails
            return False
        if status == FLAT:  # C leaves its indices and signs at 0, its scale at 0
            continue
        for k in range(8):
            u = L[4 * k] | (L[4 * k + 1] << 3) | (L[4 * k + 2] << 6) | (L[4 * k + 3] << 9)
            if kmap[u] < 0:
                return False  # C: "Oops: found point not on grid", abort
            ob[2 + 8 * ib + k] = kmap[u]
        packed[ib] = block_signs[0] | (block_signs[1] << 7) | (block_signs[2] << 14) | (block_signs[3] << 21)
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale  # noqa: FURB136  (C's MAX)
    if not max_scale:
        ob[:] = 0
        return True
    d = max_scale / f32(31.0)
    put_f16(ob, 0, d * _FUDGE_XXS)
    inv = f32(1.0) / d
    for ib in range(8):
        s = max(0, min(15, nearest_int(f32(0.5) * (inv * scales[ib] - f32(1.0)))))
        v = packed[ib] | (s << 28)
        for b in range(4):
            ob[66 + 4 * ib + b] = (v >> (8 * b)) & 0xFF
    return True


@jit
def _iq3_s_block(x: np.ndarray, qw: np.ndarray, has_qw: bool, ob: np.ndarray, tables: tuple,
                 work: np.ndarray, iwork: np.ndarray, flags: np.ndarray) -> bool:
    """One IQ3_S super-block into ob[110]; False where C would abort (non-finite input). Scratch as for
    ``_iq3_xxs_block``. Offsets: d 0, qs 2, qh 66, signs 74, scales 106."""
    kmap = tables[1]
    ob[:] = 0
    sumx2 = f32(0.0)
    for v in x:
        sumx2 += v * v
    sigma2 = f32(2.0) * sumx2 / f32(256.0)
    weight = work[2]
    L, laux, block_signs = iwork[0], iwork[1], iwork[2, :4]
    scales = np.zeros(8, np.float32)
    max_scale = f32(0.0)
    qs = 2  # C advances its qs and signs pointers only past sub-blocks that are not all zero
    signs = 74
    for ib in range(8):
        xb = x[32 * ib:32 * ib + 32]
        for i in range(32):
            weight[i] = qw[32 * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i]) if has_qw else xb[i] * xb[i]
        scale, status = _sub_block(xb, weight, tables, L, block_signs, work, laux, flags, False)
        if status == ABORT or not scale >= 0:  # C: GGML_ASSERT(scale >= 0), which a NaN scale fails
            return False
        if status == FLAT:
            continue
        for k in range(8):
            u = L[4 * k] | (L[4 * k + 1] << 3) | (L[4 * k + 2] << 6) | (L[4 * k + 3] << 9)
            g = kmap[u]
            if g < 0:
                return False  # C: "Oops: found point not on grid", abort
            ob[qs + k] = g & 255
            ob[66 + ib] |= (g >> 8) << k
        qs += 8
        for k in range(4):
            ob[signs + k] = block_signs[k]
        signs += 4
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale  # noqa: FURB136  (C's MAX)
    if not max_scale:
        return True  # d stays 0 (what was written stays too, as in C)
    d = max_scale / f32(31.0)
    put_f16(ob, 0, d * _FUDGE_S)
    inv = f32(1.0) / d
    for ib in range(0, 8, 2):
        s1 = max(0, min(15, nearest_int(f32(0.5) * (inv * scales[ib] - f32(1.0)))))
        s2 = max(0, min(15, nearest_int(f32(0.5) * (inv * scales[ib + 1] - f32(1.0)))))
        ob[106 + ib // 2] = s1 | (s2 << 4)
    return True


@jit(nogil=True)
def _quantize(x: np.ndarray, qw: np.ndarray, has_qw: bool, out: np.ndarray, first: int, end: int,
              tables: tuple, xxs: bool) -> int:
    """Blocks first..end-1 of IQ3_XXS (``xxs``) or IQ3_S; returns the first block C would abort on, or −1."""
    work = np.empty((3, 32), np.float32)
    iwork = np.empty((4, 32), np.int64)
    flags = np.empty((2, 8), np.bool_)
    for b in range(first, end):
        if xxs:
            ok = _iq3_xxs_block(x[b], qw[b % qw.shape[0]], has_qw, out[b], tables, work, iwork, flags)
        else:
            ok = _iq3_s_block(x[b], qw[b % qw.shape[0]], has_qw, out[b], tables, work, iwork, flags)
        if not ok:
            return b
    return -1


def _run(x: np.ndarray, qw: np.ndarray | None, out: np.ndarray, first: int, end: int, xxs: bool) -> None:
    weights = np.zeros((1, 256), np.float32) if qw is None else qw
    size = 256 if xxs else 512
    bad = _quantize(x, weights, qw is not None, out, first, end, (*grid_tables(size), _magnitudes(size)), xxs)
    if bad >= 0:
        raise QuantTypeError(f"{'IQ3_XXS' if xxs else 'IQ3_S'}: super-block {bad} has NaN (or Inf) weights that "
                             "llama.cpp's quantizer aborts on (GGML_ASSERT in its grid search); the tensor is "
                             "damaged, fix it first")


def quantize_iq3_xxs(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """x f32[nb, 256] -> out u8[nb, 98] for blocks first..end-1 (no importance matrix: weights x²)."""
    _run(x, None, out, first, end, True)


def quantize_iq3_xxs_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """As ``quantize_iq3_xxs`` with the importance matrix qw f32[row blocks, 256] (block b uses qw[b % len])."""
    _run(x, qw, out, first, end, True)


def quantize_iq3_s(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """x f32[nb, 256] -> out u8[nb, 110] for blocks first..end-1 (no importance matrix: weights x²)."""
    _run(x, None, out, first, end, False)


def quantize_iq3_s_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """As ``quantize_iq3_s`` with the importance matrix qw f32[row blocks, 256] (block b uses qw[b % len])."""
    _run(x, qw, out, first, end, False)


# Decoding magnitudes of levels 0..7 (ggml's iq3xxs_grid bytes; gguf-py's IQ3_XXS.grid_map).
IQ3_XXS_MAGNITUDES = (4, 12, 20, 28, 36, 44, 52, 62)


def dequantize_iq3_xxs(blocks: np.ndarray) -> np.ndarray:
    """u8[nb, 98] -> f32[nb, 256], in C's order: (d·(0.5 + s)·0.5)·magnitude·sign."""
    nb = blocks.shape[0]
    levels = grid_tables()[0]
    d = blocks[:, :2].view(np.float16).astype(np.float32)  # [nb, 1]
    sas = blocks[:, 66:98].copy().view("<u4").astype(np.int64)  # [nb, 8]
    db = d * (np.float32(0.5) + (sas >> 28).astype(np.float32)) * np.float32(0.5)  # [nb, 8]
    mags = np.array(IQ3_XXS_MAGNITUDES, np.float32)[levels[blocks[:, 2:66].astype(np.int64)]]  # [nb, 64, 4]
    mags = mags.reshape(nb, 8, 32)
    signs7 = (sas[:, :, None] >> (7 * np.arange(4))) & 127  # [nb, 8, 4]
    parity = np.zeros_like(signs7)
    for b in range(7):
        parity ^= (signs7 >> b) & 1
    signs8 = signs7 | (parity << 7)
    neg = ((signs8[..., None] >> np.arange(8)) & 1).reshape(nb, 8, 32).astype(bool)
    y = db[:, :, None] * mags
    return np.where(neg, -y, y).reshape(nb, 256).astype(np.float32)


def dequantize_iq3_s(blocks: np.ndarray) -> np.ndarray:
    """u8[nb, 110] -> f32[nb, 256], in C's order: (d·(1 + 2s))·(2l + 1)·sign."""
    nb = blocks.shape[0]
    levels = grid_tables(512)[0]
    d = blocks[:, :2].view(np.float16).astype(np.float32)  # [nb, 1]
    s = blocks[:, 106:110, None] >> np.array([0, 4], np.uint8)  # [nb, 4, 2]: sub-block 2i low, 2i + 1 high
    db = d * (1 + 2 * (s.reshape(nb, 8) & 0xF)).astype(np.float32)  # [nb, 8]
    high = (blocks[:, 66:74, None] >> np.arange(8, dtype=np.uint8)) & 1  # [nb, 8 sub-blocks, 8 groups]
    index = blocks[:, 2:66].astype(np.int64) | (high.reshape(nb, 64).astype(np.int64) << 8)
    mags = (2 * levels[index].astype(np.float32) + 1).reshape(nb, 8, 32)
    neg = ((blocks[:, 74:106, None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(nb, 8, 32).astype(bool)
    y = db[:, :, None] * mags
    return np.where(neg, -y, y).reshape(nb, 256).astype(np.float32)
