"""GPTQ (Frantar et al., arXiv 2210.17323) as a pure function: ``gptq(W, H, cfg) -> QuantizedLinear``.

GPTQ quantizes a linear layer's weight ``W f32[out, in]`` one input column at a time and, after each column,
spreads that column's rounding error over the columns not yet quantized so that the layer's *output* on the
calibration inputs moves as little as possible. The only statistic it needs is the Hessian of that output error,
``H = 2/n · Σ x xᵀ`` over the n calibration tokens x (f32 [in, in]); ``add_to_hessian`` accumulates it batch by
batch, as a forward hook on the linear would (IST-DASLab ``gptq.py`` ``add_batch``).

Steps (IST-DASLab gptq @ 2d65066, ``reference/gptq-awq-onnx-anchor.md`` §4.1):

1. dead columns (``H[d, d] == 0``: the input is always zero) get ``H[d, d] = 1`` and ``W[:, d] = 0``;
2. ``static_groups``: every group's scale and zero point are fixed up front from the original W, so act-order
   does not change which columns share a group (``g_idx`` stays ``k // group_size``);
3. ``desc_act`` (act-order): columns are processed in order of decreasing ``H[k, k]``; without static groups a
   group is a run of ``group_size`` columns *in that order*, so ``g_idx`` is not monotone;
   ``group_aware`` (group-aware reordering, Gafni et al., arXiv 2505.14638; GPTQModel's ``act_group_aware``):
   act-order that keeps every group whole: groups in order of decreasing ``max H[k, k]``, the columns inside a
   group in order of decreasing ``H[k, k]``. A group's columns stay one run, so its parameters still come from
   its already-updated weights, and the checkpoint is the plain layout (``g_idx = k // group_size``,
   ``desc_act`` false) that every loader takes;
4. damping ``H += damp · mean(diag H) · I``; ``Hinv`` = upper Cholesky factor of ``H⁻¹`` (float64). When the
   Cholesky fails, ``damp`` grows by ``damp_auto_increment`` up to ``damp_retries`` times (GPTQModel's remedy),
   then ``HessianError`` says what to change;
5. lazy batch updates: inside a block of ``block_size`` columns, column i is quantized, its error
   ``(w - q) / Hinv[i, i]`` updates the rest of the block immediately; the columns after the block get the whole
   block's error in one matmul. A group's parameters are computed when its first column comes up, from the
   already-updated weights.

The function runs on whatever device ``W`` and ``H`` share and moves nothing; statistics and updates are float32,
the Cholesky float64 (a 29568² float64 Hessian is 7 GB: set ``cholesky_fp64=False`` to halve that).
``true_sequential`` (quantize q/k/v, then o on the quantized q/k/v's outputs, ...) is the calibration driver's job;
the flag is carried here only so it can be written into ``quantization_config``.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType

import torch

from qconvert.errors import QConvertError, QuantTypeError
from qconvert.int4.rtn import (
    QuantizedLinear,
    check_scheme,
    default_g_idx,
    group_params,
    n_groups,
    quantize_codes,
)


class HessianError(QConvertError):
    """The layer's Hessian cannot be inverted: non-finite calibration statistics, or not positive definite even
    after the damping retries."""


@dataclass(frozen=True)
class GPTQConfig:
    """GPTQ settings; defaults are the configuration every loader accepts (4-bit, g128, sym, no act-order)."""

    bits: int = 4
    group_size: int = 128
    sym: bool = True
    desc_act: bool = False
    static_groups: bool = False
    damp_percent: float = 0.01
    damp_auto_increment: float = 0.01
    damp_retries: int = 10
    block_size: int = 128
    true_sequential: bool = True  # metadata for quantization_config; the driver decides the order
    cholesky_fp64: bool = True
    group_aware: bool = False  # act-order inside whole groups (layout unchanged: g_idx = k // group_size)

    def __post_init__(self) -> None:
        check_scheme(self.bits, self.group_size, max(self.group_size, 1), "GPTQ")
        if not 0 < self.damp_percent < 1:
            raise QuantTypeError(f"damp_percent {self.damp_percent} must be in (0, 1); 0.01 is the usual value.")
        if self.damp_retries < 0 or self.damp_auto_increment <= 0:
            raise QuantTypeError("damp_retries must be >= 0 and damp_auto_increment > 0 (e.g. 10 and 0.01).")
        if self.group_aware and (self.desc_act or self.static_groups or self.group_size == -1):
            raise QuantTypeError("group-aware reordering is act-order within groups: it needs a group size and "
                                 "cannot be combined with --act-order or --static-groups; pick one of the three.")
        if self.block_size <= 0 or (self.group_size > 0 and self.block_size % self.group_size):
            raise QuantTypeError(f"GPTQ block size {self.block_size} must be a positive multiple of the group size "
                                 f"{self.group_size}; use 128.")

    @property
    def min_zero(self) -> int:
        """Smallest zero point: 1 for asym, because GPTQ v1 checkpoints store ``z - 1`` (see ``rtn``)."""
        return 0 if self.sym else 1


def add_to_hessian(H: torch.Tensor | None, n_seen: int, x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Fold a batch of layer inputs ``x [..., in]`` into the running ``H = 2/n Σ x xᵀ``; returns ``(H, n)``.

    ``H`` is f32 [in, in] on ``x``'s device (``None`` to start). Keeping the running *mean* (not the sum) keeps
    the magnitudes of H independent of the number of calibration tokens.
    """
    x = x.reshape(-1, x.shape[-1]).float()
    n = n_seen + x.shape[0]
    if H is None:
        return (x.T @ x) * (2.0 / n), n
    return torch.addmm(H, x.T, x, beta=n_seen / n, alpha=2.0 / n), n


def gptq(W: torch.Tensor, H: torch.Tensor, cfg: GPTQConfig = GPTQConfig()) -> QuantizedLinear:
    """Quantize ``W`` f32 [out, in] given its input Hessian ``H`` f32 [in, in] (both on one device).

    Returns codes/scales/zeros in the original column order with ``g_idx``; ``info`` holds the damping actually
    used (``damp_percent``) and GPTQ's own loss estimate ``Σ (w - q)² / Hinv[k, k]² / 2`` (``loss``).
    """
    out, k = W.shape
    if H.shape != (k, k):
        raise QuantTypeError(f"GPTQ: Hessian shape {tuple(H.shape)} does not match weight {tuple(W.shape)}; "
                             f"H must be [in, in] = [{k}, {k}] (accumulate it from this layer's inputs).")
    if H.device != W.device:
        raise QuantTypeError(f"GPTQ: W is on {W.device} but H on {H.device}; put both on the same device.")
    check_scheme(cfg.bits, cfg.group_size, k, f"GPTQ weight [{out}, {k}]")
    W, H = W.float().clone(), H.float().clone()
    _drop_dead_columns(W, H)
    fixed = group_params(W, cfg.bits, cfg.group_size, cfg.sym, cfg.min_zero) \
        if cfg.static_groups or cfg.group_size == -1 else None
    diag = torch.diagonal(H)
    perm = (torch.argsort(diag, descending=True) if cfg.desc_act else
            group_aware_order(diag, cfg.group_size) if cfg.group_aware else torch.arange(k, device=W.device))
    W, H = W[:, perm], H[perm][:, perm]
    Hinv, damp = inverse_hessian_factor(H, cfg)
    # the group of each permuted column: fixed groups follow their original columns, and so do group-aware runs;
    # plain act-order groups are runs of the permuted order
    col_group = (default_g_idx(k, cfg.group_size, W.device).long()[perm] if fixed is not None or cfg.group_aware
                 else torch.arange(k, device=W.device) // cfg.group_size)
    codes, scales, zeros, loss = _quantize_columns(W, Hinv, cfg, fixed, col_group)
    inv = torch.argsort(perm)
    g_idx = col_group[inv].to(torch.int32)  # group of each original column
    info = MappingProxyType({"damp_percent": damp, "loss": loss})
    return QuantizedLinear(codes[:, inv].to(torch.uint8), scales, zeros.to(torch.uint8), g_idx, cfg.bits,
                           cfg.group_size, cfg.sym, info)


def group_aware_order(diag: torch.Tensor, group_size: int) -> torch.Tensor:
    """Group-aware processing order of ``k`` columns with Hessian diagonal ``diag`` [k]: whole groups, most
    important first (by their largest ``H[k, k]``), each group's columns by decreasing ``H[k, k]`` (int64 [k])."""
    by_group = diag.reshape(-1, group_size)
    inner = torch.argsort(by_group, dim=1, descending=True, stable=True)
    order = torch.argsort(by_group.amax(1), descending=True, stable=True)
    return (inner[order] + order[:, None] * group_size).reshape(-1)


def _drop_dead_columns(W: torch.Tensor, H: torch.Tensor) -> None:
    """In place: inputs that were always zero carry no information; zero their weights, make H invertible there."""
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0


def inverse_hessian_factor(H: torch.Tensor, cfg: GPTQConfig) -> tuple[torch.Tensor, float]:
    """Upper Cholesky factor of ``(H + damp·mean(diag H)·I)⁻¹`` (f32 [in, in]) and the ``damp`` that worked."""
    if not torch.isfinite(H).all():
        raise HessianError("the GPTQ Hessian contains inf/NaN: the calibration activations overflowed. Run the "
                           "calibration forward in bfloat16 or float32 (Qwen2 overflows float16), then retry.")
    Hd = H.double() if cfg.cholesky_fp64 else H.clone()
    mean_diag = torch.diagonal(Hd).mean()
    eye = torch.eye(H.shape[0], dtype=Hd.dtype, device=Hd.device)
    damp = cfg.damp_percent
    for _ in range(cfg.damp_retries + 1):
        # U is upper with UᵀU = (H + λI)⁻¹. With J the reversal, J(H + λI)J = L'L'ᵀ gives U = J L'⁻¹ J: one
        # Cholesky and one triangular solve (torch.cholesky_inverse + a second Cholesky took ~25x longer here)
        Lr, info = torch.linalg.cholesky_ex((Hd + damp * mean_diag * eye).flip(0, 1))
        if int(info) == 0:
            U = torch.linalg.solve_triangular(Lr, eye, upper=False).flip(0, 1)
            if bool(torch.isfinite(U).all()) and bool((torch.diagonal(U) > 0).all()):
                return U.float(), damp
        damp += cfg.damp_auto_increment
    raise HessianError(
        f"the GPTQ Hessian [{H.shape[0]}, {H.shape[0]}] is not positive definite even with damp_percent "
        f"{damp - cfg.damp_auto_increment:.3g} (started at {cfg.damp_percent}, {cfg.damp_retries} retries). "
        "Use more (and more varied) calibration tokens, raise --damp-percent, or check the captured inputs.")


def _quantize_columns(W: torch.Tensor, Hinv: torch.Tensor, cfg: GPTQConfig,
                      fixed: tuple[torch.Tensor, torch.Tensor] | None, col_group: torch.Tensor
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """The GPTQ sweep over the (permuted) columns of ``W``, in place.

    ``col_group`` int64 [in]: the group of each permuted column. Returns codes f32 [out, in] (permuted order),
    scales/zeros f32 [out, groups] and the loss. ``fixed``: precomputed per-group parameters (static groups or
    g = -1); otherwise a group's parameters are set at its first (permuted) column, which is every
    ``group_size``-th column because a group's columns are one run of the permuted order.
    """
    out, k = W.shape
    g, bits = cfg.group_size, cfg.bits
    groups = n_groups(k, g)
    scales = torch.zeros(out, groups, device=W.device) if fixed is None else fixed[0]
    zeros = torch.zeros(out, groups, device=W.device) if fixed is None else fixed[1]
    group_of = col_group.tolist()  # python ints: index without a device round trip per column
    codes = torch.zeros_like(W)
    loss = torch.zeros((), device=W.device)
    for i1 in range(0, k, cfg.block_size):
        i2 = min(i1 + cfg.block_size, k)
        W1, Hinv1 = W[:, i1:i2].clone(), Hinv[i1:i2, i1:i2]
        Err1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            if fixed is None and (i1 + i) % g == 0:  # first column of a group: W1[:, i:i+g] is up to date
                s, z = group_params(W1[:, i:i + g], bits, g, cfg.sym, cfg.min_zero)
                scales[:, group_of[i1 + i]], zeros[:, group_of[i1 + i]] = s[:, 0], z[:, 0]
            gi = group_of[i1 + i]
            w, d = W1[:, i], Hinv1[i, i]
            q = quantize_codes(w, scales[:, gi], zeros[:, gi], bits)
            err = (w - scales[:, gi] * (q - zeros[:, gi])) / d
            codes[:, i1 + i] = q
            loss += (err * err).sum() / 2
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return codes, scales, zeros, float(loss)
