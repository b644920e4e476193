"""The held-out guard: GPTQ and AWQ keep their result only where it beats round-to-nearest on unseen tokens.

GPTQ's error feedback and AWQ's searches fit the calibration tokens. With few tokens they can overfit: a
``down_proj`` with 4,864 inputs and a Hessian from 2,048 tokens has rank at most 2,048, so the error feedback
may move weights along directions the calibration never saw, and AWQ's clip and scale searches pick what helps
the tokens they saw. The guard splits the calibration windows (the last ``holdout_count`` windows, a
deterministic choice that the model card records), lets the algorithm see only the rest, and measures every
candidate on the held-out windows:

* the error of a linear ``W [out, in]`` with reconstruction ``Ŵ`` on inputs ``X [n, in]`` is
  ``‖(Ŵ - W) Xᵀ‖² / n = tr(Δ H Δᵀ) / 2`` with ``H = 2/n Σ x xᵀ`` (the GPTQ Hessian of the held-out tokens), so
  one held-out Hessian per input site judges any number of candidates without a forward;
* GPTQ: per linear, the GPTQ result or symmetric round-to-nearest in the same format, whichever is lower;
* AWQ: per scaling site, the searched scales or ``s = 1``; per linear, the searched clip or none; per decoder
  layer, the result or plain zero-point round-to-nearest, by the layer's output error (the calibration driver);
* both, last, on the whole model (``ModelCheck``): the held-out windows' final logits through the quantized model
  and through its round-to-nearest baseline, scored against the float model's (KL and next-token NLL). Layer
  errors need not track the model's output (AWQ on a checkpoint dequantized from a 4-bit GGUF did better per
  layer and worse per model); where the method's model is worse in either, every linear becomes round-to-nearest.

So neither method is worse than round-to-nearest on the held-out tokens, by construction, at every level the
guard decides. Pure functions; the driver (``qconvert.calibration.quantize``) decides where they run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from types import MappingProxyType

import torch

from qconvert.constants import DEFAULT_HOLDOUT, MAX_HOLDOUT
from qconvert.errors import QuantTypeError
from qconvert.int4.awq import AWQConfig
from qconvert.int4.gptq import GPTQConfig, gptq
from qconvert.int4.rtn import QuantizedLinear, rtn


def holdout_count(n_samples: int, fraction: float) -> int:
    """Windows held out of ``n_samples``: ``round(fraction · n)``, at least 1, leaving at least 1 to fit."""
    if not 0 < fraction <= MAX_HOLDOUT or not math.isfinite(fraction):
        raise QuantTypeError(f"held-out fraction {fraction} must be in (0, {MAX_HOLDOUT}]; "
                             f"{DEFAULT_HOLDOUT} is the default.")
    n_out = max(1, round(fraction * n_samples))
    if n_samples - n_out < 1:
        raise QuantTypeError(
            f"the held-out guard needs at least 2 calibration windows (one to fit, one to judge) but there "
            f"{'is' if n_samples == 1 else 'are'} {n_samples}: give more calibration text or --calib-samples >= 2, "
            "or turn the guard off with --no-guard.")
    return n_out


def reconstruction_error(W: torch.Tensor, W_hat: torch.Tensor, H: torch.Tensor) -> float:
    """``tr((Ŵ - W) H (Ŵ - W)ᵀ)``: twice the mean squared output error of ``Ŵ`` on the tokens behind ``H``.

    ``W``, ``W_hat`` [out, in]; ``H`` [in, in] from ``add_to_hessian``. Rows in chunks: peak memory stays
    about one ``[chunk, in]`` product.
    """
    total = 0.0
    for r in range(0, W.shape[0], 1024):
        d = W_hat[r:r + 1024].float() - W[r:r + 1024].float()
        total += float(((d @ H) * d).sum())
    return total


def guarded(q: QuantizedLinear, r: QuantizedLinear, W: torch.Tensor, H_out: torch.Tensor, method: str
            ) -> QuantizedLinear:
    """``q`` (the algorithm's) or ``r`` (round-to-nearest), whichever reconstructs ``W`` better on the held-out
    tokens behind ``H_out``; ``info`` records the choice (``kept``) and both errors."""
    e_q = reconstruction_error(W, q.dequantize(), H_out)
    e_r = reconstruction_error(W, r.dequantize(), H_out)
    kept = q if e_q <= e_r else r
    return replace(kept, info=MappingProxyType({**q.info, "kept": method if kept is q else "rtn",
                                                "heldout_error": e_q, "rtn_heldout_error": e_r}))


def baseline(W: torch.Tensor, cfg: GPTQConfig | AWQConfig) -> QuantizedLinear:
    """The round-to-nearest the guard judges a method against, in the method's own format: GPTQ's (symmetric
    unless ``cfg.sym`` is False), AWQ's zero-point quantizer without scales or clips."""
    if isinstance(cfg, AWQConfig):
        return rtn(W, cfg.bits, cfg.group_size, sym=False)
    return rtn(W, cfg.bits, cfg.group_size, cfg.sym, cfg.min_zero)


def guarded_gptq(W: torch.Tensor, H: torch.Tensor, H_out: torch.Tensor | None, cfg: GPTQConfig) -> QuantizedLinear:
    """GPTQ of ``W`` on the fitted tokens' Hessian ``H``; with the held-out one ``H_out``, kept only where it
    reconstructs ``W`` better than ``baseline`` does on those tokens (``guarded``)."""
    q = gptq(W, H, cfg)
    return q if H_out is None else guarded(q, baseline(W, cfg), W, H_out, "gptq")


def fit_hessian(H_all: torch.Tensor, n_all: int, H_out: torch.Tensor, n_out: int) -> torch.Tensor:
    """The Hessian of the fitted tokens alone from the one of all ``n_all`` tokens and the held-out one (``n_out``
    tokens): both are running means (``add_to_hessian``), so ``H_fit = (n_all H_all - n_out H_out) / n_fit``."""
    if not 0 < n_out < n_all:
        raise QuantTypeError(f"held-out tokens {n_out} must be between 0 and all tokens {n_all} (exclusive).")
    return (H_all.double() * n_all - H_out.double() * n_out).div(n_all - n_out).float()


def rank_shortfall(n_inputs: int, n_tokens: int) -> float:
    """How far the calibration tokens are from spanning a linear's inputs: ``inputs / tokens`` when above 1
    (the Hessian's rank is at most the token count), else 1."""
    return max(1.0, n_inputs / max(n_tokens, 1))


def windows_needed(n_inputs: int, seq_len: int, holdout: int) -> int:
    """Calibration windows of ``seq_len`` tokens for a full-rank Hessian of ``n_inputs``, plus the held-out ones."""
    return math.ceil(n_inputs / seq_len) + holdout


NLL_BLOCK = 64  # positions per block for the standard error of the NLL difference (neighbours are correlated)


def log_probs(logits: torch.Tensor) -> torch.Tensor:
    """float64 ``log softmax`` of ``logits`` [rows, vocab]: the reference side of ``position_scores``, computed once
    and scored against any number of other models."""
    return torch.log_softmax(logits.double(), dim=-1)


def position_scores(lp: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: ``KL(p ‖ softmax(logits))`` for the reference log-probabilities ``lp`` (``log_probs``) and the next
    token's ``-log softmax(logits)`` (float64).

    ``lp``, ``logits`` [rows, vocab]; ``targets`` [rows] token ids.
    """
    lq = torch.log_softmax(logits.double(), dim=-1)
    return (lp.exp() * (lp - lq)).sum(-1), -lq.gather(1, targets.long().reshape(-1, 1))[:, 0]


def block_standard_error(diff: torch.Tensor) -> float:
    """One standard error of the mean of ``diff`` [windows, positions] from the spread of its block means
    (``NLL_BLOCK`` consecutive positions of a window per block); infinite with fewer than two blocks."""
    blocks = diff.shape[1] // NLL_BLOCK
    if diff.shape[0] * blocks < 2:
        return math.inf
    means = diff[:, :blocks * NLL_BLOCK].reshape(diff.shape[0] * blocks, NLL_BLOCK).mean(1)
    return float(means.std() / math.sqrt(means.numel()))


@dataclass(frozen=True)
class ModelCheck:
    """The guard's last decision, on the whole model: the final logits of the held-out windows, through the method's
    quantized model and through its round-to-nearest baseline, against the float model's.

    ``kl`` / ``nll``: the method's mean KL to the float model and mean next-token NLL per scored position;
    ``base_*`` the same for round-to-nearest; ``nll_se`` one standard error of the NLL difference (blocks of
    ``NLL_BLOCK`` positions). The method is kept only where its KL is not above round-to-nearest's and its NLL not
    above by more than one standard error (a held-out window of a few dozen tokens cannot resolve the NLL at all:
    KL, far less noisy, decides alone there).
    """

    method: str
    kl: float
    nll: float
    base_kl: float
    base_nll: float
    nll_se: float
    positions: int

    @property
    def kept(self) -> str:
        return self.method if self.kl <= self.base_kl and self.nll - self.base_nll <= self.nll_se else "rtn"

    def summary(self) -> str:
        verdict = (f"{self.method} kept" if self.kept == self.method else
                   f"{self.method} was worse, so every linear is round-to-nearest")
        se = f" ± {self.nll_se:.4f}" if math.isfinite(self.nll_se) else ""
        return (f"model-level check on {self.positions} held-out positions: {self.method} KL {self.kl:.4f} vs "
                f"round-to-nearest {self.base_kl:.4f}, NLL {self.nll - self.base_nll:+.4f}{se} vs round-to-nearest: "
                f"{verdict}")
