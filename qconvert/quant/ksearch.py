"""The per-sub-block scale searches of the K-quants, ported from ``ggml-quants.c`` to run many sub-blocks at once.

Layout: ``xt`` f32[n, S] holds S independent sub-blocks of n weights side by side, one per *lane* (column).
Every lane runs exactly the float32 operation sequence of the C function for its own sub-block; the loops
over lanes are innermost, so LLVM vectorizes across sub-blocks while each sub-block's sums stay sequential
over its elements (C's order). C's data-dependent ``if``s become per-lane selects.

Level arrays ``L`` i32[n, S] come back in C's encoding (offset by nmax for the symmetric searches).
"""

from __future__ import annotations

import numpy as np

from qconvert.quant.cfloat import f32, jit, nearest_level

GROUP_MAX_EPS = 1e-15  # below this absmax a sub-block counts as all zero


@jit
def _level(iscale: np.float32, v: np.float32, mn: np.float32, nmax: int) -> np.float32:
    """The asymmetric level C computes, clamp(nearest_int(iscale·(v − min)), 0, nmax), as a float32."""
    return nearest_level(iscale * (v - mn), f32(0.0), f32(nmax))


@jit
def _signed_absmax(xt: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per lane (absmax, the value that has it); the first strict maximum wins, as in C."""
    amax = np.zeros(xt.shape[1], np.float32)
    vmax = np.zeros(xt.shape[1], np.float32)
    for i in range(xt.shape[0]):
        for s in range(xt.shape[1]):
            a = abs(xt[i, s])
            vmax[s] = xt[i, s] if a > amax[s] else vmax[s]
            amax[s] = a if a > amax[s] else amax[s]  # noqa: FURB136  (C's ternary: max() differs on NaN)
    return amax, vmax


@jit
def _weighted_errors(xt: np.ndarray, wt: np.ndarray, iscale: np.ndarray, lmin: np.ndarray, nmax: int,
                     scale: np.ndarray, mn: np.ndarray, use_mad: bool) -> np.ndarray:
    """Per lane Σ w·|scale·l + min − x| (use_mad) or Σ w·(scale·l + min − x)², l = _level(iscale, x, lmin).

    C keeps the levels it just made; recomputing them from the same (iscale, min) gives the same integers.
    """
    err = np.zeros(xt.shape[1], np.float32)
    for i in range(xt.shape[0]):
        for s in range(xt.shape[1]):
            diff = scale[s] * _level(iscale[s], xt[i, s], lmin[s], nmax) + mn[s] - xt[i, s]
            diff = abs(diff) if use_mad else diff * diff
            err[s] += wt[i, s] * diff
    return err


@jit
def _qkx2_fit(xt: np.ndarray, wt: np.ndarray, iscale: np.ndarray, mn: np.ndarray, nmax: int,
              sum_w: np.ndarray, sum_x: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Weighted least squares (scale, min) for the levels at ``iscale``; also returns D (the fit is valid if > 0)."""
    S = xt.shape[1]
    sum_l = np.zeros(S, np.float32)
    sum_l2 = np.zeros(S, np.float32)
    sum_xl = np.zeros(S, np.float32)
    for i in range(xt.shape[0]):
        for s in range(S):
            fl = _level(iscale[s], xt[i, s], mn[s], nmax)
            wl = wt[i, s] * fl
            sum_l[s] += wl
            sum_l2[s] += wl * fl
            sum_xl[s] += wl * xt[i, s]
    D = sum_w * sum_l2 - sum_l * sum_l
    this_scale = (sum_w * sum_xl - sum_x * sum_l) / D
    this_min = (sum_l2 * sum_x - sum_l * sum_xl) / D
    for s in range(S):  # a positive min is not allowed: fit the scale alone
        this_scale[s] = sum_xl[s] / sum_l2[s] if this_min[s] > 0 else this_scale[s]
        this_min[s] = f32(0.0) if this_min[s] > 0 else this_min[s]
    return this_scale, this_min, D


@jit
def make_qkx2_quants(xt: np.ndarray, wt: np.ndarray, nmax: int, rmin: np.float32, rdelta: np.float32, nstep: int,
                     use_mad: bool, L: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Asymmetric weighted fit x ≈ scale·L − min, L in [0, nmax]; returns (scale f32[S], min f32[S] >= 0).

    Tries iscale = (nmax + rmin + rdelta·is)/(max − min) for is = 0..nstep and keeps the (scale, min) of the
    lowest weighted error. ``min`` is the current best, updated when a candidate wins, and later candidates
    are computed from it (C does this; missing it changes half the blocks). The winning levels are recomputed
    at the end from the (iscale, min) that produced them. A flat sub-block (max == min) gets L = 0, scale 0.
    """
    n, S = xt.shape
    mn = xt[0].copy()
    mx = xt[0].copy()
    sum_w = wt[0].copy()
    sum_x = sum_w * xt[0]
    for i in range(1, n):
        for s in range(S):
            mn[s] = xt[i, s] if xt[i, s] < mn[s] else mn[s]  # noqa: FURB136  (C's ternary: max() differs on NaN)
            mx[s] = xt[i, s] if xt[i, s] > mx[s] else mx[s]  # noqa: FURB136  (C's ternary: max() differs on NaN)
            sum_w[s] += wt[i, s]
            sum_x[s] += wt[i, s] * xt[i, s]
    for s in range(S):
        mn[s] = f32(0.0) if mn[s] > 0 else mn[s]
    flat = mx == mn
    best_iscale = f32(nmax) / (mx - mn)
    best_lmin = mn.copy()
    scale = f32(1.0) / best_iscale
    best_error = _weighted_errors(xt, wt, best_iscale, best_lmin, nmax, scale, mn, use_mad)
    for step in range(nstep + 1):
        iscale = (rmin + rdelta * f32(step) + f32(nmax)) / (mx - mn)
        this_scale, this_min, D = _qkx2_fit(xt, wt, iscale, mn, nmax, sum_w, sum_x)
        err = _weighted_errors(xt, wt, iscale, mn, nmax, this_scale, this_min, use_mad)
        for s in range(S):
            win = (D[s] > 0) & (err[s] < best_error[s])
            best_error[s] = err[s] if win else best_error[s]
            best_iscale[s] = iscale[s] if win else best_iscale[s]
            best_lmin[s] = mn[s] if win else best_lmin[s]
            scale[s] = this_scale[s] if win else scale[s]
            mn[s] = this_min[s] if win else mn[s]
    for i in range(n):
        for s in range(S):
            L[i, s] = 0 if flat[s] else np.int32(_level(best_iscale[s], xt[i, s], best_lmin[s], nmax))
    for s in range(S):
        scale[s] = f32(0.0) if flat[s] else scale[s]
    return scale, -mn


@jit
def _qx_sums(xt: np.ndarray, iscale: np.ndarray, nmax: int) -> tuple[np.ndarray, np.ndarray]:
    """Per lane (Σ w·x·l, Σ w·l²) with w = x² and l = clamp(nearest_int(iscale·x), −nmax, nmax−1)."""
    sumlx = np.zeros(xt.shape[1], np.float32)
    suml2 = np.zeros(xt.shape[1], np.float32)
    for i in range(xt.shape[0]):
        for s in range(xt.shape[1]):
            x = xt[i, s]
            fl = nearest_level(iscale[s] * x, f32(-nmax), f32(nmax - 1))
            w = x * x
            sumlx[s] += w * x * fl
            suml2[s] += w * fl * fl
    return sumlx, suml2


@jit
def make_qx_quants(xt: np.ndarray, nmax: int, L: np.ndarray) -> np.ndarray:
    """Symmetric fit x ≈ scale·(L − nmax), L in [0, 2·nmax), weights x² (C's rmse_type 1, no quant weights).

    Starts from iscale = −nmax/max (max: the signed value of largest magnitude), tries −(nmax + 0.1·is)/max
    for is = −9..9 and keeps the candidate that maximises (Σw·x·l)²/Σw·l². Returns scale f32[S]; an all-zero
    sub-block gets L = 0 and scale 0.
    """
    n, S = xt.shape
    amax, vmax = _signed_absmax(xt)
    best_iscale = f32(-nmax) / vmax
    sumlx, suml2 = _qx_sums(xt, best_iscale, nmax)
    scale = np.zeros(S, np.float32)
    for s in range(S):
        scale[s] = sumlx[s] / suml2[s] if suml2[s] != 0 else f32(0.0)
    best = scale * sumlx
    for step in range(-9, 10):
        if step == 0:
            continue
        iscale = -(f32(nmax) + f32(0.1) * f32(step)) / vmax
        sumlx, suml2 = _qx_sums(xt, iscale, nmax)
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


@jit
def make_q3_quants(xt: np.ndarray, nmax: int, L: np.ndarray) -> np.ndarray:
    """Symmetric fit with L in [0, 2·nmax) by coordinate descent, weights x² (``make_q3_quants``, do_rmse).

    Starts from iscale = −nmax/max; each of 5 sweeps moves single levels where that raises (Σw·x·l)²/Σw·l².
    C stops after a sweep that changes nothing; the next sweep would change nothing either, so lanes keep
    sweeping until none changes (or 5 sweeps) with the same result. Returns scale f32[S]; an all-zero
    sub-block gets L = 0 and scale 0.
    """
    n, S = xt.shape
    amax, vmax = _signed_absmax(xt)
    iscale = f32(-nmax) / vmax
    lv = np.empty((n, S), np.float32)  # the signed levels, as floats: the sweep then vectorizes without ints
    sumlx = np.zeros(S, np.float32)
    suml2 = np.zeros(S, np.float32)
    for i in range(n):
        for s in range(S):
            fl = nearest_level(iscale[s] * xt[i, s], f32(-nmax), f32(nmax - 1))
            lv[i, s] = fl
            w = xt[i, s] * xt[i, s]
            sumlx[s] += w * xt[i, s] * fl
            suml2[s] += w * fl * fl
    for _ in range(5):
        changed = False
        for i in range(n):
            for s in range(S):
                x = xt[i, s]
                w = x * x
                fl = lv[i, s]
                slx = sumlx[s] - w * x * fl
                sl2 = suml2[s] - w * fl * fl
                fn = nearest_level(x * sl2 / slx, f32(-nmax), f32(nmax - 1))
                slx_new = slx + w * x * fn
                sl2_new = sl2 + w * fn * fn
                take = (slx > 0) & (fn != fl) & (sl2_new > 0) & \
                    (slx_new * slx_new * suml2[s] > sumlx[s] * sumlx[s] * sl2_new)
                lv[i, s] = fn if take else fl
                sumlx[s] = slx_new if take else sumlx[s]
                suml2[s] = sl2_new if take else suml2[s]
                changed |= take
        if not changed:
            break
    zero = amax < f32(GROUP_MAX_EPS)
    for i in range(n):
        for s in range(S):
            L[i, s] = 0 if zero[s] else np.int32(lv[i, s]) + nmax
    scale = np.zeros(S, np.float32)
    for s in range(S):
        scale[s] = f32(0.0) if zero[s] or not suml2[s] > 0 else sumlx[s] / suml2[s]
    return scale
