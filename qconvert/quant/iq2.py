"""IQ2_XXS (2.06 bits per weight), IQ2_XS (2.31) and IQ2_S (2.56): ports of ggml's
``quantize_row_iq2_{xxs,xs,s}_impl`` and of their grid set-up ``iq2xs_init_impl``.

All three store 8-weight groups as an index into a grid of 8-tuples of levels l in 0..2 (magnitude 2l + 1 when
quantizing, ``IQ2_MAGNITUDES[l]`` when decoding) plus the group's signs, and a 4-bit scale s per sub-block
against one fp16 super-block ``d`` (scale d·(0.5 + s)·0.25):

* IQ2_XXS: 256 grid points, 32-weight sub-blocks. Per sub-block two u32: four 8-bit indices, then four 7-bit
  sign masks (the 8th sign makes the parity even) and s at bits 28..31. Layout: d, u32[16] (66 bytes).
* IQ2_XS: 512 points, 16-weight sub-blocks. Per group a u16: 9-bit index | 7-bit sign mask << 9; then two
  4-bit scales per byte. Layout: d, u16[32], scales[8] (74 bytes).
* IQ2_S: 1024 points, 16-weight sub-blocks, all 8 signs stored. Layout: d, qs[64] (the low index bytes of the
  32 groups, then their sign bytes), qh[8] (2 high index bits per group), scales[8] (82 bytes).

The search per sub-block is the one of ``qconvert.quant.iq3`` for 8-weight groups: |x| (IQ2_XXS/IQ2_XS: the
least important sign kept when the negatives are odd), inverse scales (5 + 0.1·is)/max (IQ2_XXS: around the
``make_qp_quants`` fit, is in −6..6; else is in −9..9), levels rounded and clamped to 0..2, an off-grid
8-tuple replaced by the best of its nearest grid points (those at the 2 smallest distances, IQ2_S: the
smallest), the scale with the best Σ(w·x·q)²/Σ(w·q²) kept and the groups refitted at it. Weights are
``qw·sqrt(σ² + x²)`` with an importance matrix (σ² = Σx²/256, IQ2_S 2·Σx²/256); IQ2_XXS and IQ2_XS cannot be
made without one (llama.cpp asserts), IQ2_S uses σ²/4 + x².

Tables: the grids come from gguf-py's ``IQ2_XXS`` / ``IQ2_XS`` / ``IQ2_S`` (format facts, packed as ggml's
``kgrid_2bit_*``); the maps from level 8-tuples to grid points and the neighbour lists are derived here, as
``iq2xs_init_impl`` derives them, on first use.
"""

from __future__ import annotations

import functools

import numpy as np

from qconvert.errors import QuantTypeError
from qconvert.quant.cfloat import f32, jit, nearest_int, put_f16
from qconvert.quant.ksearch_weighted import make_qp_quants

_KMAX = 3  # levels per coordinate
_KMAP_SIZE = 43692  # every 8-tuple of levels 0..2 packs (2 bits each) below this
XXS, XS, S, IQ1 = 0, 1, 2, 3  # the three types, as the kernels take them; IQ1: the IQ1_S/IQ1_M grid (iq1.py)
_NAMES = ("IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ1_S")
_NWANT = (2, 2, 1, 3)  # neighbours: grid points at this many of the smallest distances
_EPS = (f32(1e-15), f32(1e-15), f32(1e-8))  # GROUP_MAX_EPS, GROUP_MAX_EPS, GROUP_MAX_EPS_IQ2_S
_FUDGE = (f32(1.0), f32(1.0), f32(0.9875))  # d = max_scale/31 · this
# Decoding magnitudes of levels 0..2 (ggml's iq2*_grid bytes; gguf-py's grid_map).
IQ2_MAGNITUDES = (8, 25, 43)


@functools.cache
def grid_tables(kind: int = S) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(levels i8[grid, 8], kmap i32[43692], neighbour_start i32[43692], neighbours i32[...]) of IQ2_XXS (256
    points), IQ2_XS (512), IQ2_S (1024) or IQ1_S/IQ1_M (2048), as in ``qconvert.quant.iq3.grid_tables``: for an 8-tuple u (level i
    at bits 2i) not on the grid, ``neighbours[start[u]]`` counts the grid points at the ``_NWANT`` smallest
    squared distances of the 2l + 1 magnitudes, which follow by distance, then index (C's qsort order)."""
    import gguf.quants

    source = getattr(gguf.quants, _NAMES[kind])
    if source.grid_hex is None:
        raise RuntimeError(f"this gguf-py carries no {_NAMES[kind]} grid; qconvert is tested with gguf==0.19.0")
    codes = np.frombuffer(bytes.fromhex(source.grid_hex.decode()), dtype="<u2").astype(np.int64)
    levels = ((codes[:, None] >> (2 * np.arange(8))) & 3).astype(np.int8)
    kmap = np.full(_KMAP_SIZE, -1, np.int32)
    kmap[codes] = np.arange(len(codes), dtype=np.int32)
    grid = (2 * levels.astype(np.int32) + 1)  # [1024, 8]
    off = np.flatnonzero(kmap < 0)
    start = np.full(_KMAP_SIZE, -1, np.int32)
    lists: list[np.ndarray] = []
    pos = 0
    for chunk in np.array_split(off, max(1, len(off) // 2048)):
        p = 2 * ((chunk[:, None] >> (2 * np.arange(8))) & 3).astype(np.int32) + 1  # [c, 8]
        d2 = (p * p).sum(1)[:, None] + (grid * grid).sum(1)[None, :] - 2 * p @ grid.T  # exact in int32
        limit = d2.min(axis=1, keepdims=True)
        for _ in range(_NWANT[kind] - 1):  # the next larger distance
            limit = np.where(d2 > limit, d2, np.iinfo(np.int32).max).min(axis=1, keepdims=True)
        for u, row, lim in zip(chunk, d2, limit[:, 0]):
            keep = np.flatnonzero(row <= lim)
            idx = keep[np.lexsort((keep, row[keep]))].astype(np.int32)  # by distance, then index
            start[u] = pos
            lists.append(np.concatenate([np.array([len(idx)], np.int32), idx]))
            pos += 1 + len(idx)
    return levels, kmap, start, np.concatenate(lists)


@functools.cache
def _magnitudes(kind: int) -> np.ndarray:
    """f32[grid, 8]: 2l + 1 of every grid coordinate, as the search compares them."""
    return (2 * grid_tables(kind)[0].astype(np.float32) + 1).astype(np.float32)


@jit
def _best_neighbour(neighbours: np.ndarray, pos: int, levels: np.ndarray, mags: np.ndarray, xval: np.ndarray,
                    w: np.ndarray, scale: np.float32, L: np.ndarray, k8: int) -> int:
    """``iq2_find_best_neighbour`` for the group at k8..k8+7 (first one on ties); −1 where C asserts."""
    best_d2 = f32(3.4028234663852886e38)
    best = -1
    for j in range(1, neighbours[pos] + 1):
        g = neighbours[pos + j]
        d2 = f32(0.0)
        for i in range(8):
            diff = scale * mags[g, i] - xval[k8 + i]
            d2 += w[k8 + i] * diff * diff
        if d2 < best_d2:
            best_d2 = d2
            best = g
    if best >= 0:
        for i in range(8):
            L[k8 + i] = levels[best, i]
    return best


@jit
def _round_groups(xval: np.ndarray, waux: np.ndarray, inv: np.float32, scale: np.float32, tables: tuple,
                  L: np.ndarray, on_grid: np.ndarray, refit: bool, grid_levels: bool) -> bool:
    """Levels of the 8-groups of one sub-block (L.size // 8 of them) at inverse scale ``inv``; off-grid groups
    take their best neighbour at ``scale``. With ``refit``, groups marked on the grid are left alone; with
    ``grid_levels``, L is reread from the grid point (IQ2_XXS's refit). False where C would assert."""
    levels, kmap, start, neighbours, mags = tables
    for k in range(L.shape[0] // 8):
        if refit and on_grid[k]:
            continue
        u = 0
        for i in range(8):
            lv = max(0, min(_KMAX - 1, nearest_int(f32(0.5) * (inv * xval[8 * k + i] - f32(1.0)))))
            L[8 * k + i] = lv
            u |= lv << (2 * i)
        g = kmap[u]
        if not refit:
            on_grid[k] = g >= 0
        if g < 0:
            g = _best_neighbour(neighbours, start[u], levels, mags, xval, waux, scale, L, 8 * k)
            if g < 0:
                return False
        if grid_levels:
            for i in range(8):
                L[8 * k + i] = levels[g, i]
    return True


@jit
def _fit(weight: np.ndarray, xval: np.ndarray, L: np.ndarray) -> tuple[np.float32, np.float32]:
    sumqx = f32(0.0)
    sumq2 = f32(0.0)
    for i in range(L.shape[0]):
        q = f32(2 * L[i] + 1)
        sumqx += weight[i] * xval[i] * q
        sumq2 += weight[i] * q * q
    return sumqx, sumq2


@jit
def _signs(xb: np.ndarray, weight: np.ndarray, xval: np.ndarray, signs: np.ndarray, even: bool) -> None:
    """xval = |x| and the sign mask of each 8; with ``even`` the least important weight keeps its sign in xval
    when the negatives are odd, and the masks keep 7 bits."""
    for k in range(xb.shape[0] // 8):
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
        if even and nflip % 2:
            imin = 0
            vmin = weight[8 * k] * xb[8 * k] * xb[8 * k]
            for i in range(1, 8):
                ax = weight[8 * k + i] * xb[8 * k + i] * xb[8 * k + i]
                if ax < vmin:
                    vmin = ax
                    imin = i
            xval[8 * k + imin] = -xval[8 * k + imin]
            s ^= 1 << imin
        signs[k] = s & 127 if even else s


@jit
def _sub_block(kind: int, xb: np.ndarray, weight: np.ndarray, tables: tuple, L: np.ndarray, signs: np.ndarray,
               work: np.ndarray, laux: np.ndarray, flags: np.ndarray, qp: np.ndarray) -> tuple[np.float32, int]:
    """(scale, status) and levels L[n] of one n-weight sub-block (n = 32 for IQ2_XXS, else 16); status 1 for a
    sub-block C skips as flat, 2 where C asserts, else 0."""
    n = xb.shape[0]
    xval, waux = work[0, :n], work[1, :n]
    on_grid, on_grid_aux = flags[0], flags[1]
    on_grid[:] = True
    for i in range(n):
        waux[i] = np.sqrt(weight[i])
    _signs(xb, weight, xval, signs, kind != S)
    vmax = xval[0]
    for i in range(1, n):
        vmax = vmax if vmax > xval[i] else xval[i]  # noqa: FURB136  (C's MAX: max() differs on NaN)
    L[:] = 0
    if vmax < _EPS[kind]:
        return f32(0.0), 1
    best = f32(0.0)
    if kind == XXS:
        scale = make_qp_quants(xval, _KMAX + 1, qp, weight)  # C passes L as the levels buffer; refit below
        for i in range(n):
            L[i] = qp[i]
        top = scale * f32(_KMAX)  # eff_max
        if top <= 0:
            L[:] = 0
            return f32(0.0), 1
        n_try = 6
    else:
        scale = vmax / f32(2 * _KMAX - 1)
        top = vmax
        n_try = 9
    for is_ in range(-n_try, n_try + 1):
        inv = (f32(2 * _KMAX - 1) + f32(is_) * f32(0.1)) / top
        if not _round_groups(xval, waux, inv, f32(1.0) / inv, tables, laux, on_grid_aux, False, False):
            return f32(0.0), 2
        sumqx, sumq2 = _fit(weight, xval, laux)
        if sumq2 > 0 and sumqx * sumqx > best * sumq2:
            scale = sumqx / sumq2
            best = scale * sumqx
            L[:] = laux
            on_grid[:] = on_grid_aux
    if kind == XXS:
        on_grid[:] = False  # IQ2_XXS refits every group, from the grid point
    if not on_grid[: n // 8].all() and scale > 0:
        if not _round_groups(xval, waux, f32(1.0) / scale, scale, tables, L, on_grid, True, kind == XXS):
            return f32(0.0), 2
        sumqx, sumq2 = _fit(weight, xval, L)
        if sumq2 > 0:
            scale = sumqx / sumq2
    if scale < 0:  # "should never happen": flip the scale and every sign
        scale = -scale
        for k in range(n // 8):
            signs[k] = (~signs[k]) & (255 if kind == S else 127)
    return scale, 0


@jit
def _grid_index(kmap: np.ndarray, L: np.ndarray, k: int) -> int:
    u = 0
    for i in range(8):
        u |= L[8 * k + i] << (2 * i)
    return kmap[u]


@jit
def _iq2_block(kind: int, x: np.ndarray, qw: np.ndarray, has_qw: bool, ob: np.ndarray, tables: tuple,
               work: np.ndarray, iwork: np.ndarray, flags: np.ndarray, qp: np.ndarray) -> bool:
    """One super-block into ob (offsets: IQ2_XXS d 0, u32[16] 2; IQ2_XS d 0, u16[32] 2, scales 66; IQ2_S
    d 0, qs 2, signs 34, qh 66, scales 74); False where C aborts."""
    kmap = tables[1]
    ob[:] = 0
    n = 32 if kind == XXS else 16
    sumx2 = f32(0.0)
    for v in x:
        sumx2 += v * v
    sigma2 = (f32(2.0) * sumx2 if kind == S else sumx2) / f32(256.0)
    weight = work[2, :n]
    L, laux, signs = iwork[0, :n], iwork[1, :n], iwork[2, :4]
    nsub = 256 // n
    scales = np.zeros(16, np.float32)
    packed = np.zeros(8, np.int64)  # IQ2_XXS: the signs word of each sub-block
    max_scale = f32(0.0)
    for ib in range(nsub):
        xb = x[n * ib:n * ib + n]
        for i in range(n):
            weight[i] = (qw[n * ib + i] * np.sqrt(sigma2 + xb[i] * xb[i]) if has_qw
                         else f32(0.25) * sigma2 + xb[i] * xb[i])
        scale, status = _sub_block(kind, xb, weight, tables, L, signs, work, laux, flags, qp)
        if status == 2 or (status == 0 and not scale >= 0):  # C: GGML_ASSERT(scale >= 0) fails on NaN
            return False
        if status == 1:
            continue
        for k in range(n // 8):
            g = _grid_index(kmap, L, k)
            if g < 0:
                return False  # C: "Oops: found point not on grid", abort
            if kind == XXS:
                ob[2 + 8 * ib + k] = g
                packed[ib] |= signs[k] << (7 * k)
            elif kind == XS:
                v = g | (signs[k] << 9)
                ob[2 + 2 * (2 * ib + k)] = v & 0xFF
                ob[3 + 2 * (2 * ib + k)] = v >> 8
            else:
                i8 = 2 * ib + k
                ob[2 + i8] = g & 255
                ob[66 + i8 // 4] |= (g >> 8) << (2 * (i8 % 4))
                ob[34 + i8] = signs[k]
        scales[ib] = scale
        max_scale = max_scale if max_scale > scale else scale  # noqa: FURB136  (C's MAX)
    if not max_scale:
        if kind != S:
            ob[:] = 0  # C clears the indices; IQ2_S keeps what it wrote (d stays 0 in all three)
        return True
    d = max_scale / f32(31.0)
    put_f16(ob, 0, d * _FUDGE[kind] if kind == S else d)
    inv = f32(1.0) / d
    for ib in range(nsub):
        s = max(0, min(15, nearest_int(f32(0.5) * (inv * scales[ib] - f32(1.0)))))
        if kind == XXS:
            v = packed[ib] | (s << 28)
            for b in range(4):
                ob[6 + 8 * ib + b] = (v >> (8 * b)) & 0xFF
        else:
            ob[(66 if kind == XS else 74) + ib // 2] |= s << (4 * (ib % 2))
    return True


@jit(nogil=True)
def _quantize(kind: int, x: np.ndarray, qw: np.ndarray, has_qw: bool, out: np.ndarray, first: int, end: int,
              tables: tuple) -> int:
    """Blocks first..end-1; returns the first block C would abort on, or −1."""
    work = np.empty((3, 32), np.float32)
    iwork = np.empty((3, 32), np.int64)
    flags = np.empty((2, 4), np.bool_)
    qp = np.empty(32, np.uint8)
    for b in range(first, end):
        if not _iq2_block(kind, x[b], qw[b % qw.shape[0]], has_qw, out[b], tables, work, iwork, flags, qp):
            return b
    return -1


def _run(kind: int, x: np.ndarray, qw: np.ndarray | None, out: np.ndarray, first: int, end: int) -> None:
    if qw is None and kind != S:
        raise QuantTypeError(f"{_NAMES[kind]} cannot be made without an importance matrix (llama.cpp asserts on "
                             "it); pass one (qconvert gguf --calib builtin or --imatrix FILE)")
    weights = np.zeros((1, 256), np.float32) if qw is None else qw
    tables = (*grid_tables(kind), _magnitudes(kind))
    bad = _quantize(kind, x, weights, qw is not None, out, first, end, tables)
    if bad >= 0:
        raise QuantTypeError(f"{_NAMES[kind]}: super-block {bad} has NaN (or Inf) weights that llama.cpp's "
                             "quantizer aborts on (GGML_ASSERT in its grid search); the tensor is damaged, fix it "
                             "first")


def quantize_iq2_xxs(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """Refused: IQ2_XXS needs an importance matrix."""
    _run(XXS, x, None, out, first, end)


def quantize_iq2_xxs_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """x f32[nb, 256], qw f32[row blocks, 256] (block b uses qw[b % len]) -> out u8[nb, 66]."""
    _run(XXS, x, qw, out, first, end)


def quantize_iq2_xs(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """Refused: IQ2_XS needs an importance matrix."""
    _run(XS, x, None, out, first, end)


def quantize_iq2_xs_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """x f32[nb, 256], qw f32[row blocks, 256] (block b uses qw[b % len]) -> out u8[nb, 74]."""
    _run(XS, x, qw, out, first, end)


def quantize_iq2_s(x: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """x f32[nb, 256] -> out u8[nb, 82] for blocks first..end-1 (no importance matrix)."""
    _run(S, x, None, out, first, end)


def quantize_iq2_s_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    """As ``quantize_iq2_s`` with the importance matrix qw f32[row blocks, 256] (block b uses qw[b % len])."""
    _run(S, x, qw, out, first, end)


# ---- dequantizers: numpy, blocks [nb, block_bytes] -> f32[nb, 256], in C's order (db·magnitude)·sign ----

def _decode(kind: int, index: np.ndarray, neg: np.ndarray, db: np.ndarray) -> np.ndarray:
    """index i64[nb, 32 groups], neg bool[nb, 256], db f32[nb, sub-blocks] -> f32[nb, 256]."""
    nb = index.shape[0]
    mags = np.array(IQ2_MAGNITUDES, np.float32)[grid_tables(kind)[0][index]].reshape(nb, db.shape[1], -1)
    y = (db[:, :, None] * mags).reshape(nb, 256)
    return np.where(neg, -y, y).astype(np.float32)


def _even_signs(masks: np.ndarray) -> np.ndarray:
    """7-bit sign masks i64[...] -> bool[..., 8]: the 8th sign makes the count of negatives even."""
    bits = (masks[..., None] >> np.arange(7)) & 1
    return np.concatenate([bits, bits.sum(axis=-1, keepdims=True) & 1], axis=-1).astype(bool)


def _scale_nibbles(b: np.ndarray) -> np.ndarray:
    """u8[nb, 8] -> f32[nb, 16]: sub-block 2i in the low nibble of byte i, 2i + 1 in the high one."""
    return ((b[:, :, None] >> np.array([0, 4], np.uint8)) & 0xF).reshape(b.shape[0], 16).astype(np.float32)


def dequantize_iq2_xxs(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d = blocks[:, :2].view(np.float16).astype(np.float32)
    words = blocks[:, 2:66].copy().view("<u4").astype(np.int64).reshape(nb, 8, 2)
    db = d * (np.float32(0.5) + (words[:, :, 1] >> 28).astype(np.float32)) * np.float32(0.25)
    index = ((words[:, :, 0:1] >> (8 * np.arange(4))) & 0xFF).reshape(nb, 32)
    neg = _even_signs((words[:, :, 1:2] >> (7 * np.arange(4))) & 127).reshape(nb, 256)
    return _decode(XXS, index, neg, db)


def dequantize_iq2_xs(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d = blocks[:, :2].view(np.float16).astype(np.float32)
    q = blocks[:, 2:66].copy().view("<u2").astype(np.int64)  # [nb, 32]
    db = d * (np.float32(0.5) + _scale_nibbles(blocks[:, 66:74])) * np.float32(0.25)
    return _decode(XS, q & 511, _even_signs(q >> 9).reshape(nb, 256), db)


def dequantize_iq2_s(blocks: np.ndarray) -> np.ndarray:
    nb = blocks.shape[0]
    d = blocks[:, :2].view(np.float16).astype(np.float32)
    db = d * (np.float32(0.5) + _scale_nibbles(blocks[:, 74:82])) * np.float32(0.25)
    high = (blocks[:, 66:74, None] >> (2 * np.arange(4, dtype=np.uint8))) & 3  # [nb, 8, 4]: group 4i + l
    index = blocks[:, 2:34].astype(np.int64) | (high.reshape(nb, 32).astype(np.int64) << 8)
    neg = ((blocks[:, 34:66, None] >> np.arange(8, dtype=np.uint8)) & 1).reshape(nb, 256).astype(bool)
    return _decode(S, index, neg, db)
