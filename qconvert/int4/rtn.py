"""Group-wise uniform quantization: the grid every int4 format shares, and round-to-nearest (RTN) on it.

A weight ``W f32[out, in]`` is cut into groups of ``group_size`` consecutive input columns (``-1``: one group per
row). Each (row, group) gets a scale ``s`` and an integer zero point ``z``; a weight is stored as the unsigned
code ``q = clamp(round(w / s) + z, 0, 2^bits - 1)`` and read back as ``s * (q - z)``. This is the convention of
IST-DASLab's ``quant.py``, AutoGPTQ, GPTQModel and AutoAWQ (see ``reference/gptq-awq-onnx-anchor.md`` §2.1, §3.1):

* **sym**: ``s = 2·max|w| / (2^bits - 1)``, ``z = 2^(bits-1)`` (8 for 4-bit). "Symmetric" still stores unsigned
  codes around zero point 8; it is not signed int4. The top code is one step short, so ``+max|w|`` is clipped by
  half a step, as in every GPTQ implementation.
* **asym**: the range ``[min(w.min, 0), max(w.max, 0)]`` (always containing 0, so ``z`` lands in
  ``[0, 2^bits - 1]``), ``s = range / (2^bits - 1)``, ``z = round(-min / s)``. ``min_zero=1`` forbids ``z = 0``
  (GPTQ v1 checkpoints store ``z - 1`` and cannot hold -1); such groups get ``s = max / (2^bits - 1 - 1)``, ``z = 1``.

Scales are rounded to float16 *before* the codes are chosen: both checkpoint formats store fp16 scales, so the
values an algorithm sees while it quantizes (GPTQ's error feedback, AWQ's search) are the values a loader will
multiply by. All math is float32 on the device of the input.

``QuantizedLinear`` is what every algorithm here returns and every packer in ``formats`` takes: unpacked codes,
scales, zero points and ``g_idx`` (the group of each input column, not monotone after GPTQ act-order).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

import torch

from qconvert.errors import QuantTypeError

SUPPORTED_BITS = (2, 3, 4, 8)
SUPPORTED_GROUP_SIZES = (32, 64, 128, -1)  # vLLM/Marlin's list; -1 = one group per output row
SCALE_DTYPE = torch.float16  # what GPTQ and AWQ checkpoints store
_MIN_SCALE = 1e-6  # a group of zeros still gets a positive (fp16-subnormal) scale


def check_scheme(bits: int, group_size: int, in_features: int, where: str = "this layer") -> None:
    """Raise ``QuantTypeError`` unless ``bits``/``group_size`` are supported and the groups tile ``in_features``."""
    if bits not in SUPPORTED_BITS:
        raise QuantTypeError(f"{bits}-bit quantization is not supported for {where}; use bits in {SUPPORTED_BITS} "
                             "(4 is the only width vLLM, transformers and GPTQModel all load).")
    if group_size not in SUPPORTED_GROUP_SIZES:
        raise QuantTypeError(f"group size {group_size} is not supported for {where}; use one of "
                             f"{SUPPORTED_GROUP_SIZES} (128 is the standard; -1 means one group per row).")
    if group_size > 0 and in_features % group_size:
        raise QuantTypeError(f"{where} has {in_features} input columns, not a multiple of group size {group_size}; "
                             "choose a group size that divides it (32 or 64), or -1 for per-row scales.")


def n_groups(in_features: int, group_size: int) -> int:
    """Groups per row: ``in_features / group_size``, or 1 for ``group_size == -1``."""
    return 1 if group_size == -1 else in_features // group_size


@dataclass(frozen=True, eq=False)
class QuantizedLinear:
    """One quantized ``nn.Linear`` weight, unpacked. ``W[n, k] ≈ scales[n, g_idx[k]] * (codes[n, k] - zeros[n, g_idx[k]])``.

    codes   uint8 [out, in]       unsigned codes in ``[0, 2^bits - 1]``, original column order
    scales  f32   [out, groups]   values exactly representable in float16
    zeros   uint8 [out, groups]   integer zero points (the true ``z``, not GPTQ v1's ``z - 1``)
    g_idx   int32 [in]            group of each input column
    info    diagnostics of the algorithm that made it (GPTQ: ``damp_percent``, ``loss``; the held-out guard's
            ``kept`` and errors)
    """

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    g_idx: torch.Tensor
    bits: int
    group_size: int
    sym: bool
    info: Mapping[str, float | str] = field(default_factory=lambda: MappingProxyType({}))

    @property
    def shape(self) -> tuple[int, int]:
        """``(out_features, in_features)`` of the original weight."""
        return tuple(self.codes.shape)  # type: ignore[return-value]

    @property
    def act_order(self) -> bool:
        """True when ``g_idx`` is not ``k // group_size`` (GPTQ desc_act without static groups)."""
        return not torch.equal(self.g_idx, default_g_idx(self.shape[1], self.group_size, self.g_idx.device))

    def dequantize(self) -> torch.Tensor:
        """The weight the checkpoint represents, f32 [out, in]."""
        g = self.g_idx.long()
        return self.scales[:, g] * (self.codes.float() - self.zeros[:, g].float())


def default_g_idx(in_features: int, group_size: int, device: torch.device | str | None = None) -> torch.Tensor:
    """int32 [in]: ``k // group_size`` (all zeros for ``group_size == -1``)."""
    k = torch.arange(in_features, dtype=torch.int32, device=device)
    return torch.zeros_like(k) if group_size == -1 else k // group_size


def range_params(xmin: torch.Tensor, xmax: torch.Tensor, bits: int, sym: bool, min_zero: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scale (f32, fp16-representable) and zero point (f32, integral) for value ranges ``[xmin, xmax]``, elementwise."""
    maxq = 2**bits - 1
    xmin, xmax = xmin.clamp(max=0), xmax.clamp(min=0)  # the grid always contains 0 exactly
    if sym:
        amax = torch.maximum(-xmin, xmax)
        scale = _round_scale(2 * amax / maxq)
        return scale, torch.full_like(scale, 2 ** (bits - 1))
    scale = (xmax - xmin) / maxq
    # z would round to 0 but the format needs z >= min_zero: spread [0, xmax] over the codes above min_zero
    low = -xmin / scale.clamp(min=_MIN_SCALE) < min_zero - 0.5
    scale = _round_scale(torch.where(low, xmax / (maxq - min_zero), scale))
    zero = torch.round(-xmin / scale).clamp(min_zero, maxq)
    return scale, zero


def _round_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.clamp(min=_MIN_SCALE).to(SCALE_DTYPE).float()


def group_params(w: torch.Tensor, bits: int, group_size: int, sym: bool, min_zero: int = 0
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Scales and zero points of every group of ``w`` f32 [out, in]: two f32 [out, groups] tensors."""
    out, k = w.shape
    wg = w.reshape(out, n_groups(k, group_size), -1)  # [out, in] -> [out, groups, group_size]
    return range_params(wg.amin(-1), wg.amax(-1), bits, sym, min_zero)


def quantize_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Codes ``clamp(round(w / scale) + zero, 0, 2^bits - 1)`` as f32 (``scale``/``zero`` broadcast against ``w``)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, 2**bits - 1)


def fake_quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, bits: int) -> torch.Tensor:
    """Quantize and dequantize in one step: ``scale * (codes - zero)``, f32 shaped like ``w``."""
    return scale * (quantize_codes(w, scale, zero, bits) - zero)


def fake_quantize_groups(w: torch.Tensor, bits: int, group_size: int, sym: bool, min_zero: int = 0) -> torch.Tensor:
    """RTN's reconstruction of ``w`` f32 [out, in] (AWQ's search loss needs only this)."""
    scale, zero = group_params(w, bits, group_size, sym, min_zero)
    wg = w.reshape(*scale.shape, -1)  # [out, groups, group_size]
    return fake_quantize(wg, scale[..., None], zero[..., None], bits).reshape(w.shape)


def rtn(w: torch.Tensor, bits: int = 4, group_size: int = 128, sym: bool = True, min_zero: int = 0
        ) -> QuantizedLinear:
    """Round-to-nearest quantization of ``w`` f32 [out, in]: the baseline GPTQ and AWQ must beat.

    ``min_zero=1`` for asymmetric weights bound for a GPTQ v1 checkpoint (see the module docstring).
    """
    check_scheme(bits, group_size, w.shape[1], "rtn")
    w = w.float()
    scale, zero = group_params(w, bits, group_size, sym, min_zero)
    g_idx = default_g_idx(w.shape[1], group_size, w.device)
    codes = quantize_codes(w, scale[:, g_idx.long()], zero[:, g_idx.long()], bits)
    return QuantizedLinear(codes.to(torch.uint8), scale, zero.to(torch.uint8), g_idx, bits, group_size, sym)
