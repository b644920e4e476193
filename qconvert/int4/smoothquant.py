"""W8A8 INT8 as pure functions: per-token dynamic activation quantization and SmoothQuant's scale migration.

W8A8 multiplies int8 weights (one scale per output row, ``rtn(W, 8, -1)`` or GPTQ at 8 bits) by int8 activations
quantized per token at run time::

    x [..., in]  ->  s_tok = max_k |x[..., k]| / 127,   q = clamp(round(x / s_tok), -128, 127)
    y = (q @ W_qᵀ) · s_tok · s_w  (+ bias)     = linear(fake_quantize_tokens(x), dequantized W)

``fake_quantize_tokens`` is that rounding in float32, vLLM's ``scaled_int8_quant`` convention (scale ``amax/127``,
round half to even); compressed-tensors' own simulation divides by 127.5, a grid 0.4 % finer.

Activation outliers (a few channels of Qwen2's residual stream are 100x the rest) make the per-token scale large
and round every other channel to a few levels. SmoothQuant (Xiao et al., arXiv 2211.10438) migrates part of that
range into the weights, per input channel j of a site whose input comes out of an RMSNorm::

    s_j = max|X_j|^α / max_rows |W_j|^(1-α)       (α = 0.5 by default; the max over every linear reading X)
    norm gain g -> g / s,   each reading linear's column j -> W[:, j] · s_j

The function is unchanged in exact arithmetic (``awq.apply_scales`` does the folding); activations lose their
outliers and weights gain some. ``max|X_j|`` is the per-channel maximum over the calibration tokens of the float
model (smoothing is exact, so the float model's maxima are the smoothed model's maxima times s).

``SMOOTH_TABLES`` (keyed on config.json ``architectures``) names the sites: only those whose ``prev`` is an RMSNorm,
as llm-compressor's default SmoothQuant mappings for Llama-style models (v -> o and up -> down are left alone:
their ``prev`` is a linear whose output feeds attention or the SiLU gate, so no exact fold exists for both).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType

import torch

from qconvert.errors import QuantTypeError

A8_QMAX = 127  # per-token scale = max|x| / 127 (vLLM's dynamic int8 quantization)
A8_MIN, A8_MAX = -128, 127
DEFAULT_ALPHA = 0.5
MIN_SMOOTH_SCALE = 1e-5  # SmoothQuant's clamp: a channel never seen (max 0) keeps a finite scale


@dataclass(frozen=True)
class SmoothMapping:
    """One smoothing site (names relative to the decoder layer): RMSNorm ``prev`` feeds every linear in ``layers``."""

    prev: str
    layers: tuple[str, ...]


QWEN2_SMOOTH_MAPPINGS: tuple[SmoothMapping, ...] = (
    SmoothMapping("input_layernorm", ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
    SmoothMapping("post_attention_layernorm", ("mlp.gate_proj", "mlp.up_proj")),
)
SMOOTH_TABLES: Mapping[str, tuple[SmoothMapping, ...]] = MappingProxyType({"Qwen2ForCausalLM": QWEN2_SMOOTH_MAPPINGS})


def quantize_tokens(x: torch.Tensor, qmax: float = A8_QMAX) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token symmetric int8 of ``x`` [..., in]: codes int8 [..., in] and scales f32 [..., 1] = max|x| / ``qmax``
    (all-zero rows get scale 1 and codes 0). ``qmax`` 127 is vLLM's kernels' grid, 127.5 compressed-tensors'
    simulation in transformers (``calculate_qparams``: range 255 / 2)."""
    x = x.float()
    amax = x.abs().amax(-1, keepdim=True)
    scale = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    return torch.clamp(torch.round(x / scale), A8_MIN, A8_MAX).to(torch.int8), scale


def fake_quantize_tokens(x: torch.Tensor, qmax: float = A8_QMAX) -> torch.Tensor:
    """``x`` [..., in] as W8A8 kernels see it: per-token int8 codes times their scale, in ``x``'s dtype."""
    q, scale = quantize_tokens(x, qmax)
    return (q.float() * scale).to(x.dtype)


def smooth_scales(act_max: torch.Tensor, weights: Sequence[torch.Tensor], alpha: float = DEFAULT_ALPHA
                  ) -> torch.Tensor:
    """SmoothQuant's per-input-channel scales f32 [in] from ``act_max`` f32 [in] (max|X_j| over calibration tokens)
    and the weights [out_i, in] of every linear that reads X (the module docstring's formula)."""
    if not 0.0 <= alpha <= 1.0:
        raise QuantTypeError(f"SmoothQuant alpha {alpha} must be in [0, 1] (0.5 is the paper's default; larger "
                             "moves more of the activations' range into the weights).")
    w_max = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0)  # [in]
    if w_max.shape != act_max.shape:
        raise QuantTypeError(f"activation maxima have {act_max.shape[0]} channels but the weights read "
                             f"{w_max.shape[0]}; the statistics belong to another model.")
    s = act_max.float().clamp(min=MIN_SMOOTH_SCALE).pow(alpha) / w_max.clamp(min=MIN_SMOOTH_SCALE).pow(1 - alpha)
    return s.clamp(min=MIN_SMOOTH_SCALE)
