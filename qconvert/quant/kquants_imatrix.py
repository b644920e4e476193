"""Importance-matrix K-quants Q2_K..Q6_K: ports of ggml's ``quantize_row_q*_K_impl`` with quant_weights.

Quantizers ``quantize_q*_k_imatrix(x, qw, out, first, end)`` take ``x`` f32[nblocks, 256], ``qw`` f32[row
blocks, 256] (the imatrix of one row, cut in super-blocks: block b uses ``qw[b % len(qw)]``) and fill ``out``
u8[nblocks, block_bytes] for blocks first..end-1 without the GIL. As in ``kquants``, chunks of ``CHUNK``
super-blocks go into lanes for the sub-block search (C's ``make_qkx3_quants`` with weights is
``ksearch.make_qkx2_quants`` operation for operation); the super-block scale fits run per super-block:
  Q4_K/Q5_K: weights qw·sqrt(σ² + x²) (σ² = 2·Σx²/256), ``make_qkx3_quants`` per 32-sub-block, then the
             sub-block scales and mins by ``make_qp_quants`` weighted by the sub-block weight sums;
  Q6_K:      ``make_qx_quants`` per 16-sub-block weighted by qw itself, then the same packing as without;
  Q3_K:      weights qw·sqrt(σ² + x²) (σ² = 2·Σx²/256), ``make_qx_quants`` per 16-sub-block (nmax 4), and the
             16 scales by ``make_qx_quants`` (nmax 32) weighted by the sub-block weight sums;
  Q2_K:      weights qw·sqrt(σ² + x²) (σ² = Σx²/256), ``make_qkx3_quants`` per 16-sub-block (nmax 3), and the
             scales and mins by ``make_qp_quants`` (nmax 15) weighted by the sub-block weight sums.
"""

from __future__ import annotations

import numpy as np

from qconvert.constants import QK_K
from qconvert.quant.cfloat import f32, jit, put_f16
from qconvert.quant.kquants import (
    CHUNK,
    _from_lanes,
    _pack_2bit,
    _pack_q4_k,
    _pack_q5_k,
    _q3_k_scale,
    _q6_k_block,
    _requantize,
    _scale_min_k4,
)
from qconvert.quant.ksearch import make_qkx2_quants
from qconvert.quant.ksearch_weighted import (
    make_qp_quants,
    make_qx_quants_lanes,
    make_qx_quants_w,
)


@jit
def _lane_weights(x: np.ndarray, qw: np.ndarray, b0: int, nblk: int, n: int, sigma: float
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Super-blocks b0..b0+nblk in lanes of n (as ``kquants._to_lanes``) with their weights qw·sqrt(σ² + x²).

    σ² = sigma·Σx²/256 per super-block (sigma 1 or 2), or the weights are qw itself when sigma is 0; returns
    (xt, wt, sw), sw[s] the sequential sum of lane s's weights.
    """
    per = QK_K // n
    S = nblk * per
    xt = np.empty((n, S), np.float32)
    wt = np.empty((n, S), np.float32)
    for b in range(nblk):
        xb = x[b0 + b]
        wb = qw[(b0 + b) % qw.shape[0]]
        sum_x2 = f32(0.0)
        for v in xb:
            sum_x2 += v * v
        sigma2 = (f32(2.0) * sum_x2 if sigma == 2 else sum_x2) / f32(QK_K)
        for j in range(per):
            for i in range(n):
                v = xb[j * n + i]
                xt[i, b * per + j] = v
                wt[i, b * per + j] = wb[j * n + i] * np.sqrt(sigma2 + v * v) if sigma != 0 else wb[j * n + i]
    sw = np.zeros(S, np.float32)
    for i in range(n):
        for s in range(S):
            sw[s] += wt[i, s]
    return xt, wt, sw


@jit
def _qkx_imatrix_block(x: np.ndarray, out: np.ndarray, scales: np.ndarray, mins: np.ndarray, sw: np.ndarray,
                       nmax: int, clamp63: bool, L: np.ndarray) -> None:
    """Q4_K/Q5_K's shared part: fill d, dmin and the 12 scale bytes of ``out``; re-quantize L[256]."""
    Ls = np.empty(8, np.int32)
    Lm = np.empty(8, np.int32)
    d_block = make_qp_quants(scales, 63, Ls, sw)
    m_block = make_qp_quants(mins, 63, Lm, sw)
    sc = out[4:16]
    sc[:] = 0
    for j in range(8):
        ls = min(63, Ls[j]) if clamp63 else Ls[j]
        lm = min(63, Lm[j]) if clamp63 else Lm[j]
        if j < 4:
            sc[j] = ls & 0xFF
            sc[j + 4] = lm & 0xFF
        else:
            sc[j + 4] = ((ls & 0xF) | ((lm & 0xF) << 4)) & 0xFF
            sc[j - 4] |= ((ls >> 4) << 6) & 0xFF
            sc[j] |= ((lm >> 4) << 6) & 0xFF
    d = put_f16(out, 0, d_block)
    dmin = put_f16(out, 2, m_block)
    for j in range(8):
        s, m = _scale_min_k4(sc, j)
        dj = d * f32(s)
        if dj != 0:
            _requantize(x[32 * j:32 * j + 32], dj, dmin * f32(m), 0, nmax, L[32 * j:32 * j + 32])


@jit(nogil=True)
def quantize_q4_k_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    for b0 in range(first, end, CHUNK):
        nblk = min(CHUNK, end - b0)
        xt, wt, sw = _lane_weights(x, qw, b0, nblk, 32, 2)
        L = np.empty(xt.shape, np.int32)
        scales, mins = make_qkx2_quants(xt, wt, 15, f32(-0.9), f32(0.05), 36, False, L)  # = make_qkx3_quants
        Lb = _from_lanes(L, nblk)
        for b in range(nblk):
            k = slice(8 * b, 8 * b + 8)
            _qkx_imatrix_block(x[b0 + b], out[b0 + b], scales[k], mins[k], sw[k], 15, False, Lb[b])
            _pack_q4_k(Lb[b], out[b0 + b])


@jit(nogil=True)
def quantize_q5_k_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    # a copy of quantize_q4_k_imatrix on purpose: literal nmax lets LLVM specialise the search
    for b0 in range(first, end, CHUNK):
        nblk = min(CHUNK, end - b0)
        xt, wt, sw = _lane_weights(x, qw, b0, nblk, 32, 2)
        L = np.empty(xt.shape, np.int32)
        scales, mins = make_qkx2_quants(xt, wt, 31, f32(-0.9), f32(0.05), 36, False, L)
        Lb = _from_lanes(L, nblk)
        for b in range(nblk):
            k = slice(8 * b, 8 * b + 8)
            _qkx_imatrix_block(x[b0 + b], out[b0 + b], scales[k], mins[k], sw[k], 31, True, Lb[b])
            _pack_q5_k(Lb[b], out[b0 + b])


@jit(nogil=True)
def quantize_q6_k_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    for b0 in range(first, end, CHUNK):
        nblk = min(CHUNK, end - b0)
        xt, wt, _ = _lane_weights(x, qw, b0, nblk, 16, 0)
        L = np.empty(xt.shape, np.int32)
        scales = make_qx_quants_lanes(xt, wt, 32, L)
        Lb = _from_lanes(L, nblk)
        for b in range(nblk):
            _q6_k_block(x[b0 + b], out[b0 + b], scales[16 * b:16 * b + 16], Lb[b])


@jit(nogil=True)
def quantize_q3_k_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    Ls = np.empty(16, np.int32)
    for b0 in range(first, end, CHUNK):
        nblk = min(CHUNK, end - b0)
        xt, wt, sw_all = _lane_weights(x, qw, b0, nblk, 16, 2)
        L = np.empty(xt.shape, np.int32)
        scales_all = make_qx_quants_lanes(xt, wt, 4, L)
        Lb = _from_lanes(L, nblk)
        for b in range(nblk):
            _q3_k_imatrix_block(x[b0 + b], out[b0 + b], scales_all[16 * b:16 * b + 16], sw_all[16 * b:16 * b + 16],
                                Ls, Lb[b])


@jit
def _q3_k_imatrix_block(xb: np.ndarray, ob: np.ndarray, scales: np.ndarray, sw: np.ndarray, Ls: np.ndarray,
                        L: np.ndarray) -> None:
    """Q3_K after the sub-block search: the 16 scales as signed 6 bits (weighted by sw), hmask, qs, d."""
    d_block = make_qx_quants_w(scales, 32, Ls, sw)
    sc = ob[96:108]
    sc[:] = 0
    for j in range(16):
        l = Ls[j]
        if j < 8:
            sc[j] = l & 0xF
        else:
            sc[j - 8] |= (l & 0xF) << 4
        sc[j % 4 + 8] |= ((l >> 4) << (2 * (j // 4))) & 0xFF
    d = put_f16(ob, 108, d_block)
    for j in range(16):
        dj = d * f32(_q3_k_scale(sc, j))
        if dj != 0:
            _requantize(xb[16 * j:16 * j + 16], dj, f32(0.0), -4, 3, L[16 * j:16 * j + 16])
    hmask = ob[0:32]
    hmask[:] = 0
    for j in range(QK_K):  # bit 2 of level j (0..7) goes to bit j // 32 of byte j % 32
        hmask[j % 32] |= (L[j] >> 2) << (j // 32)
        L[j] &= 3
    _pack_2bit(L, ob[32:96])


@jit(nogil=True)
def quantize_q2_k_imatrix(x: np.ndarray, qw: np.ndarray, out: np.ndarray, first: int, end: int) -> None:
    Ls = np.empty(16, np.int32)
    Lm = np.empty(16, np.int32)
    for b0 in range(first, end, CHUNK):
        nblk = min(CHUNK, end - b0)
        xt, wt, sw = _lane_weights(x, qw, b0, nblk, 16, 1)
        L = np.empty(xt.shape, np.int32)
        scales, mins = make_qkx2_quants(xt, wt, 3, f32(-0.9), f32(0.05), 36, False, L)  # = make_qkx3_quants
        Lb = _from_lanes(L, nblk)
        for b in range(nblk):
            xb, ob, Lk = x[b0 + b], out[b0 + b], Lb[b]
            k = slice(16 * b, 16 * b + 16)
            dm = put_f16(ob, 80, make_qp_quants(scales[k], 15, Ls, sw[k]))
            mm = put_f16(ob, 82, make_qp_quants(mins[k], 15, Lm, sw[k]))
            for j in range(16):
                ob[j] = (Ls[j] | (Lm[j] << 4)) & 0xFF
            for j in range(16):
                s = np.int64(ob[j])
                dj = dm * f32(s & 0xF)
                if dj != 0:
                    _requantize(xb[16 * j:16 * j + 16], dj, mm * f32(s >> 4), 0, 3, Lk[16 * j:16 * j + 16])
            _pack_2bit(Lk, ob[16:80])
