"""Importance-matrix Q4_0, Q4_1, Q5_0, Q5_1: ports of ggml's ``quantize_row_q*_impl`` with quant_weights.

Unlike the K-quants these need a whole row: the weights are qw·sqrt(σ² + x²) with σ² = Σx²/n_per_row over
the row. So the kernels ``quantize_q*_imatrix(x, qw, out, first, end)`` take ``x`` f32[rows, cols], ``qw``
f32[cols], ``out`` u8[rows, row_bytes] and fill rows first..end-1, without the GIL. The 32-blocks of a row go
side by side into lanes and are fitted at once: Q4_0/Q5_0 x ≈ d·(L − nmax) with ``make_qx_quants`` (nmax
8/16), Q4_1/Q5_1 x ≈ d·L + m with ``make_qkx3_quants`` (= ``ksearch.make_qkx2_quants`` with weights).
"""

from __future__ import annotations

import numpy as np

from qconvert.quant.cfloat import f32, jit, put_f16
from qconvert.quant.ksearch import make_qkx2_quants
from qconvert.quant.ksearch_weighted import make_qx_quants_lanes
from qconvert.quant.legacy import _put_u32


@jit
def _row_weights(xr: np.ndarray, qw: np.ndarray, w: np.ndarray) -> None:
    """w = qw·sqrt(σ² + x²) for the whole row, σ² = Σx²/n (C's sequential sum)."""
    sum_x2 = f32(0.0)
    for v in xr:
        sum_x2 += v * v
    sigma2 = sum_x2 / f32(xr.shape[0])
    for j in range(xr.shape[0]):
        w[j] = qw[j] * np.sqrt(sigma2 + xr[j] * xr[j])


@jit
def _pack_nibbles(L: np.ndarray, ob: np.ndarray, pos: int) -> None:
    for j in range(16):
        ob[pos + j] = ((L[j] & 0xF) | ((L[j + 16] & 0xF) << 4)) & 0xFF


@jit
def _high_bits(L: np.ndarray) -> int:
    qh = 0
    for j in range(16):
        qh |= ((L[j] & 0x10) >> 4) << j
        qh |= ((L[j + 16] & 0x10) >> 4) << (j + 16)
    return qh


@jit
def _row_lanes(xr: np.ndarray, w: np.ndarray, xt: np.ndarray, wt: np.ndarray) -> None:
    """Block ib of the row goes to lane ib: xt[i, ib] = xr[32·ib + i], and the same for the weights."""
    for ib in range(xt.shape[1]):
        for i in range(32):
            xt[i, ib] = xr[32 * ib + i]
            wt[i, ib] = w[32 * ib + i]


@jit
def _symmetric_rows(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int, nmax: int) -> None:
    """Q4_0/Q5_0: all blocks of a row side by side in lanes, fitted at once by the vectorised search."""
    cols = x.shape[1]
    nb = cols // 32
    bb = out.shape[1] // nb
    w = np.empty(cols, np.float32)
    xt = np.empty((32, nb), np.float32)
    wt = np.empty((32, nb), np.float32)
    L = np.empty((32, nb), np.int32)
    Lb = np.empty(32, np.int32)
    for r in range(first, end):
        _row_weights(x[r], qw, w)
        _row_lanes(x[r], w, xt, wt)
        d = make_qx_quants_lanes(xt, wt, nmax, L)
        for ib in range(nb):
            ob = out[r, bb * ib:bb * ib + bb]
            put_f16(ob, 0, d[ib])
            for i in range(32):
                Lb[i] = L[i, ib]
            if nmax == 8:
                _pack_nibbles(Lb, ob, 2)
            else:
                _put_u32(ob, 2, _high_bits(Lb))
                _pack_nibbles(Lb, ob, 6)


@jit
def _asymmetric_rows(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int, nmax: int) -> None:
    """Q4_1/Q5_1: all blocks of a row side by side in lanes, fitted at once by the vectorised search."""
    cols = x.shape[1]
    nb = cols // 32
    bb = out.shape[1] // nb
    w = np.empty(cols, np.float32)
    xt = np.empty((32, nb), np.float32)
    wt = np.empty((32, nb), np.float32)
    L = np.empty((32, nb), np.int32)
    Lb = np.empty(32, np.int32)
    for r in range(first, end):
        _row_weights(x[r], qw, w)
        _row_lanes(x[r], w, xt, wt)
        # make_qkx2_quants is C's make_qkx3_quants with weights given (the two differ only without weights)
        d, the_min = make_qkx2_quants(xt, wt, nmax, f32(-0.9), f32(0.05), 36, False, L)
        for ib in range(nb):
            ob = out[r, bb * ib:bb * ib + bb]
            put_f16(ob, 0, d[ib])
            put_f16(ob, 2, -the_min[ib])
            for i in range(32):
                Lb[i] = L[i, ib]
            if nmax == 15:
                _pack_nibbles(Lb, ob, 4)
            else:
                _put_u32(ob, 4, _high_bits(Lb))
                _pack_nibbles(Lb, ob, 8)


@jit(nogil=True)
def quantize_q4_0_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    _symmetric_rows(x, qw, out, first, end, 8)


@jit(nogil=True)
def quantize_q5_0_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    _symmetric_rows(x, qw, out, first, end, 16)


@jit(nogil=True)
def quantize_q4_1_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    _asymmetric_rows(x, qw, out, first, end, 15)


@jit(nogil=True)
def quantize_q5_1_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    _asymmetric_rows(x, qw, out, first, end, 31)
