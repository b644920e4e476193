"""``qconvert gguf --optimize``: llama.cpp's types and sizes, codes chosen with the calibration Hessians.

    per quantized tensor W [rows, cols] whose input statistics exist (the decoder linears):
        H_fit, H_out = the Hessians of the fitted and of the held-out calibration windows (``collect_stats``)
        plain    = llama.cpp's encoding (``quantize_rows``, with the importance matrix where llama.cpp uses one)
        feedback = ``encode_with_feedback`` on H_fit (GPTQ's damping and Cholesky, ``inverse_hessian_factor``)
        keep whichever reconstructs W better on the held-out tokens: tr(ΔW H_out ΔWᵀ) (``reconstruction_error``)
    the codebook I-quants (IQ1/IQ2/IQ3): llama.cpp's codes per block, the error fed between blocks
        (``encode_with_block_feedback``), judged the same way
    other tensors (embeddings, norms, float types): exactly llama.cpp's

So every tensor is at least as good as llama.cpp's own on tokens the optimisation never saw, and the file has
llama.cpp's types and byte size.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from qconvert.constants import GGMLType
from qconvert.int4.gptq import GPTQConfig, inverse_hessian_factor
from qconvert.int4.guard import fit_hessian, reconstruction_error
from qconvert.quant import dequantize_rows, quantize_rows
from qconvert.quant.feedback import FEEDBACK_TYPES, SCALAR_TYPES, encode_with_block_feedback, encode_with_feedback

KEPT = ("feedback", "llama.cpp")


@dataclass(frozen=True)
class TensorHessians:
    """The Hessians of one tensor's inputs: of the fitted windows and (None without a split) of the held-out ones."""

    fit: torch.Tensor
    heldout: torch.Tensor | None
    _factors: dict[float, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)

    def inverse_factor(self, damp_percent: float) -> torch.Tensor:
        """GPTQ's upper factor of the damped inverse of ``fit`` (inputs that are always zero get a unit diagonal:
        any code is as good for them); computed once per site, which q/k/v and gate/up share."""
        if damp_percent not in self._factors:
            H = self.fit.float().clone()
            dead = torch.diagonal(H) == 0
            H[dead, dead] = 1.0
            self._factors[damp_percent] = inverse_hessian_factor(H, GPTQConfig(damp_percent=damp_percent))[0]
        return self._factors[damp_percent]


HessianSource = Callable[[str], "TensorHessians | None"]  # checkpoint tensor name -> its inputs' Hessians


def stats_hessians(stats: object) -> HessianSource:
    """The Hessians of a ``CalibrationStats`` (read on demand) by checkpoint tensor name
    (``model.layers.3.mlp.down_proj.weight``); None for tensors without statistics."""
    from qconvert.calibration.stats import CalibrationStats

    assert isinstance(stats, CalibrationStats)

    last: dict[str, TensorHessians] = {}  # q/k/v and gate/up share one input site: read and fit it once

    def get(name: str) -> TensorHessians | None:
        module = name.removesuffix(".weight")
        if module not in stats.linears:
            return None
        key = stats.linears[module]
        if key not in last:
            last.clear()  # one site at a time: memory stays one layer's Hessians
            site = stats.site(module)
            if not site.n_heldout:
                last[key] = TensorHessians(site.hessian, None)
            else:
                H_out = site.heldout_hessian
                last[key] = TensorHessians(fit_hessian(site.hessian, site.n_tokens, H_out, site.n_heldout), H_out)
        return last[key]
    return get


def optimize_note(source: str) -> str:
    """The ``qconvert.optimize`` metadata value and model-card line for Hessians collected on ``source``."""
    return (f"error-feedback codes from the GPTQ Hessians of {source}; per tensor kept only where better than "
            "llama.cpp's on held-out calibration windows")


def can_optimize(qtype: GGMLType) -> bool:
    return qtype in FEEDBACK_TYPES


def optimized_rows(qtype: GGMLType, W: np.ndarray, hessians: TensorHessians, imatrix: np.ndarray | None = None,
                   damp_percent: float = 0.01) -> tuple[np.ndarray, str]:
    """``W`` f32[rows, cols] encoded as ``qtype`` with error feedback, or llama.cpp's encoding where that does
    better on the held-out Hessian. Returns the bytes and which was kept (``KEPT``)."""
    plain = quantize_rows(qtype, W, imatrix)
    encode = encode_with_feedback if qtype in SCALAR_TYPES else encode_with_block_feedback
    fed = encode(qtype, W, hessians.inverse_factor(damp_percent), imatrix)
    if hessians.heldout is None:
        return fed, KEPT[0]
    Wt = torch.from_numpy(W)
    cols = W.shape[1]
    e_fed = reconstruction_error(Wt, torch.from_numpy(dequantize_rows(qtype, fed, cols)), hessians.heldout.float())
    e_plain = reconstruction_error(Wt, torch.from_numpy(dequantize_rows(qtype, plain, cols)), hessians.heldout.float())
    return (fed, KEPT[0]) if e_fed <= e_plain else (plain, KEPT[1])
