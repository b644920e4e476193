"""The scale searches that take an importance matrix, ported from ``ggml-quants.c``.

``make_qp_quants`` (positive, the K-quant super-block scales) and ``make_qx_quants_w`` (symmetric,
``make_qx_quants`` with ``qw``) fit one group per call; ``make_qx_quants_lanes`` is ``make_qx_quants_w`` for
many sub-blocks side by side (lanes, as in ``ksearch``: Q3_K/Q6_K/Q4_0/Q5_0). Each runs C's float32 operation
sequence for its group; ints are converted with ``f32`` before they meet floats (numba would promote to
float64). Level arrays ``L`` are int32 holding what C stores (uint8 wrap included).
C's asymmetric ``make_qkx3_quants`` with weights is ``make_qkx2_quants`` operation for operation (they differ
only when no weights are given), so Q2_K/Q4_K/Q5_K/Q4_1/Q5_1 use ``ksearch.make_qkx2_quants``.
"""

from __future__ import annotations

import numpy as np

from qconvert.quant.cfloat import f32, jit, nearest_int, nearest_level
from qconvert.quant.ksearch import GROUP_MAX_EPS


@jit
def make_qp_quants(x: np.ndarray, nmax: int, L: np.ndarray, qw: np.ndarray) -> np.float32:
    """x ≈ scale·L, L in [0, nmax] (stored as uint8), weights qw: the K-quant super-block scale fit."""
    n = x.shape[0]
    mx = f32(0.0)
    for i in range(n):
        mx = mx if mx > x[i] else x[i]  # noqa: FURB136  (C's MAX macro)
    if mx < f32(GROUP_MAX_EPS):
        L[:n] = 0
        return f32(0.0)
    iscale = f32(nmax) / mx
    for i in range(n):
        L[i] = nearest_int(iscale * x[i]) & 0xFF
    scale = f32(1.0) / iscale
    best_mse = f32(0.0)
    for i in range(n):
        diff = x[i] - scale * f32(L[i])
        best_mse += qw[i] * diff * diff
    for step in range(-4, 5):
        if step == 0:
            continue
        iscale_is = (f32(0.1) * f32(step) + f32(nmax)) / mx
        scale_is = f32(1.0) / iscale_is
        mse = f32(0.0)
        for i in range(n):
            l = min(nmax, nearest_int(iscale_is * x[i]))
            diff = x[i] - scale_is * f32(l)
            mse += qw[i] * diff * diff
        if mse < best_mse:
            best_mse = mse
            iscale = iscale_is
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = min(nmax, nearest_int(iscale * x[i]))
        L[i] = l & 0xFF
        sumlx += qw[i] * x[i] * f32(l)
        suml2 += qw[i] * f32(l) * f32(l)
    for _ in range(5):
        n_changed = 0
        for i in range(n):
            w = qw[i]
            li = f32(L[i])
            slx = sumlx - w * x[i] * li
            sl2 = suml2 - w * li * li
            if slx > 0 and sl2 > 0:
                new_l = min(nmax, nearest_int(x[i] * sl2 / slx))
                if new_l != L[i]:
                    fn = f32(new_l)
                    slx += w * x[i] * fn
                    sl2 += w * fn * fn
                    if slx * slx * suml2 > sumlx * sumlx * sl2:
                        L[i] = new_l & 0xFF
                        sumlx = slx
                        suml2 = sl2
                        n_changed += 1
        if n_changed == 0:
            break
    return sumlx / suml2 if suml2 > 0 else f32(0.0)


@jit
def make_qx_quants_w(x: np.ndarray, nmax: int, L: np.ndarray, qw: np.ndarray) -> np.float32:
    """``make_qx_quants(n, nmax, x, L, 1, qw)``: x ≈ scale·(L − nmax), L in [0, 2·nmax), weights qw."""
    n = x.shape[0]
    vmax = f32(0.0)
    amax = f32(0.0)
    for i in range(n):
        ax = abs(x[i])
        if ax > amax:
            amax = ax
            vmax = x[i]
    if amax < f32(GROUP_MAX_EPS):
        L[:n] = 0
        return f32(0.0)
    iscale = f32(-nmax) / vmax
    sumlx = f32(0.0)
    suml2 = f32(0.0)
    for i in range(n):
        l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
        L[i] = l + nmax
        sumlx += qw[i] * x[i] * f32(l)
        suml2 += qw[i] * f32(l) * f32(l)
    scale = sumlx / suml2 if suml2 != 0 else f32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / vmax
        sumlx = f32(0.0)
        suml2 = f32(0.0)
        for i in range(n):
            l = max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            sumlx += qw[i] * x[i] * f32(l)
            suml2 += qw[i] * f32(l) * f32(l)
        if suml2 > 0 and sumlx * sumlx > best * suml2:
            for i in range(n):
                L[i] = nmax + max(-nmax, min(nmax - 1, nearest_int(iscale * x[i])))
            scale = sumlx / suml2
            best = scale * sumlx
    return scale


@jit
def _qx_sums_w(xt: np.ndarray, wt: np.ndarray, iscale: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per lane (Σ w·x·l, Σ w·l²) with l = clamp(nearest_int(iscale·x), −nmax, nmax−1)."""
    sumlx = np.zeros(xt.shape[1], np.float32)
    suml2 = np.zeros(xt.shape[1], np.float32)
    for i in range(xt.shape[0]):
        for s in range(xt.shape[1]):
            x = xt[i, s]
            w = wt[i, s]
            fl = nearest_level(iscale[s] * x, f32(-nmax), f32(nmax - 1))
            sumlx[s] += w * x * fl
            suml2[s] += w * fl * fl
    return sumlx, suml2


@jit
def make_qx_quants_lanes(xt: np.ndarray, wt: np.ndarray, nmax: int, L: np.ndarray) -> np.ndarray:
    """``make_qx_quants_w`` for S sub-blocks at once: xt, wt f32[n, S] -> scale f32[S], L i32[n, S] in [0, 2·nmax).

    Same candidates and selection as ``ksearch.make_qx_quants``, with the given weights instead of x².
    """
    n, S = xt.shape
    amax = np.zeros(S, np.float32)
    vmax = np.zeros(S, np.float32)
    for i in range(n):
        for s in range(S):
            a = abs(xt[i, s])
            vmax[s] = xt[i, s] if a > amax[s] else vmax[s]
            amax[s] = a if a > amax[s] else amax[s]  # noqa: FURB136  (C's ternary: max() differs on NaN)
    best_iscale = f32(-nmax) / vmax
    sumlx, suml2 = _qx_sums_w(xt, wt, best_iscale, nmax)
    scale = np.zeros(S, np.float32)
    for s in range(S):
        scale[s] = sumlx[s] / suml2[s] if suml2[s] != 0 else f32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / vmax
        sumlx, suml2 = _qx_sums_w(xt, wt, iscale, nmax)
        for s in range(S):
            win = (suml2[s] > 0) & (sumlx[s] * sumlx[s] > best[s] * suml2[s])
            best_iscale[s] = iscale[s] if win else best_iscale[s]
            scale[s] = sumlx[s] / suml2[s] if win else scale[s]
            best[s] = scale[s] * sumlx[s] if win else best[s]
    zero = amax < f32(GROUP_MAX_EPS)
    for i in range(n):
        for s in range(S):
            L[i, s] = 0 if zero[s] else nmax + np.int32(nearest_level(best_iscale[s] * xt[i, s], f32(-nmax),
                                                                      f32(nmax - 1)))
    for s in range(S):
        scale[s] = f32(0.0) if zero[s] else scale[s]
    return scale
