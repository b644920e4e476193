"""Pass/fail gates: default thresholds by model size and bits, explicit ones, and regression against a baseline.

The defaults are sanity gates, not targets: about twice the quality loss a correct quantizer shows at that
model size and bit width, so a broken kernel, a wrong scale or a damaged tensor fails while normal quantization
passes. They come from Qwen2's published llama-perplexity table (reference/gguf-anchor.md §4):

    expected ΔPPL%(b) at 0.5B  ~ exp(6.6 - 1.1 b)   b = bits per weight of the decoder matrices
                                 (Q4_K_M at 0.5B: b ~ 5.5, +1.65%;  Q2_K: b ~ 3.3, +10.8%;  Q8_0: +0.13%)
    size factor                  (n_params / 0.5e9) ** -0.25, clamped to [0.25, 1]
                                 (72B loses ~0.3x of 0.5B: Q4_K_M +0.5% vs +1.65%; below 0.5B as 0.5B)
    max ΔPPL%  = max(0.5, 2 x size factor x expected)
    max KL     = max(0.002, 2 x 0.012 x (size factor x expected) ** 0.85)
                 (KL vs ΔPPL% as in llama.cpp's Llama-3-8B table: Q4_K_M +2.8% <-> 0.031, Q2_K +56% <-> 0.45)

A baseline gate is tighter: a stored result of the same artifact on the same tokens, and a tolerance on how much
worse ΔPPL% and KL may get.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from qconvert.verify.reference import VerifyError
from qconvert.verify.result import ArtifactResult

REFERENCE_PARAMS = 0.5e9
SIZE_EXPONENT = 0.25
SIZE_CLAMP = (0.25, 1.0)
MARGIN = 2.0
FLOOR_DPPL_PCT, FLOOR_KL = 0.5, 0.002
KL_PER_PCT, KL_EXPONENT = 0.012, 0.85
BASELINE_VERSION = 1


# every gate value a user can set, and its valid range: a NaN or negative limit would pass (or fail) everything
LIMITS = {"max_dppl_pct": (0.0, math.inf), "max_kl": (0.0, math.inf), "min_top1": (0.0, 1.0),
          "baseline_tol_dppl": (0.0, math.inf), "baseline_tol_kl": (0.0, math.inf), "kl_abs": (0.0, math.inf)}


def validate_limit(name: str, value: object) -> None:
    """Refuse a gate value that is not a finite number in its range (``LIMITS``); None means "the default"."""
    if value is None:
        return
    low, high = LIMITS[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        where = f"between {low:g} and {high:g}" if math.isfinite(high) else f">= {low:g}"
        raise VerifyError(f"{name} = {value!r} is not a usable gate: give a finite number {where} (NaN would let "
                          "every artifact pass, a negative limit fail every one).")


@dataclass(frozen=True)
class Thresholds:
    """An artifact fails when its ΔPPL% exceeds ``max_dppl_pct`` or its mean KL exceeds ``max_kl``."""

    max_dppl_pct: float
    max_kl: float

    def __post_init__(self) -> None:
        validate_limit("max_dppl_pct", self.max_dppl_pct)
        validate_limit("max_kl", self.max_kl)


def expected_dppl_pct(n_params: int, bits_per_weight: float) -> float:
    """The ΔPPL% a correct quantizer shows at this size and bit width (the fit in the module docstring)."""
    size = (max(n_params, 1) / REFERENCE_PARAMS) ** -SIZE_EXPONENT
    size = min(max(size, SIZE_CLAMP[0]), SIZE_CLAMP[1])
    return size * math.exp(6.6 - 1.1 * bits_per_weight)


def default_thresholds(n_params: int, kind: str, bits_per_weight: float) -> Thresholds:
    """Default gate for an artifact of ``kind`` with ``bits_per_weight`` bits in its decoder matrices.

    ``kind`` matters only for float artifacts (``hf``, or 16-bit and more), which get the floors: a float copy
    should agree with the reference up to rounding.
    """
    if kind == "hf" or bits_per_weight >= 15.5:
        return Thresholds(FLOOR_DPPL_PCT, FLOOR_KL)
    e = expected_dppl_pct(n_params, bits_per_weight)
    return Thresholds(max(FLOOR_DPPL_PCT, MARGIN * e), max(FLOOR_KL, MARGIN * KL_PER_PCT * e ** KL_EXPONENT))


def thresholds_for(result: ArtifactResult, max_dppl_pct: float | None = None, max_kl: float | None = None) -> Thresholds:
    """The defaults for ``result`` with any explicit limit replacing its default."""
    d = default_thresholds(result.n_params, result.kind, result.bits_per_weight)
    return Thresholds(d.max_dppl_pct if max_dppl_pct is None else max_dppl_pct, d.max_kl if max_kl is None else max_kl)


def check(result: ArtifactResult, thresholds: Thresholds) -> list[str]:
    """Why ``result`` fails ``thresholds`` (empty: it passes)."""
    out = []
    if not math.isfinite(result.ppl) or result.dppl_pct > thresholds.max_dppl_pct:
        out.append(f"ΔPPL {result.dppl_pct:+.3f}% > {thresholds.max_dppl_pct:.3f}%")
    if not math.isfinite(result.kl_mean) or result.kl_mean > thresholds.max_kl:
        out.append(f"mean KL {result.kl_mean:.5f} > {thresholds.max_kl:.5f}")
    return out


# ------------------------------------------------------------------------------------------------------------
# baselines


@dataclass(frozen=True)
class BaselineTolerance:
    """How much worse than the baseline is still a pass: ΔPPL in percentage points, KL relative plus absolute."""

    dppl_pct: float = 0.25
    kl_rel: float = 0.10
    kl_abs: float = 1e-4

    def __post_init__(self) -> None:
        validate_limit("baseline_tol_dppl", self.dppl_pct)
        validate_limit("baseline_tol_kl", self.kl_rel)
        validate_limit("kl_abs", self.kl_abs)


def write_baseline(results: Sequence[ArtifactResult], path: Path) -> None:
    data = {"qconvert_verify_baseline": BASELINE_VERSION, "results": [r.to_dict() for r in results]}
    path = Path(path)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")
    tmp.replace(path)


def read_baseline(path: Path) -> list[ArtifactResult]:
    path = Path(path)
    if not path.is_file():
        raise VerifyError(f"baseline {path} does not exist; record one with qconvert verify ... --write-baseline {path}.")
    try:
        data = json.loads(path.read_text())
        return [ArtifactResult.from_dict(d) for d in data["results"]]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise VerifyError(f"{path} is not a qconvert verify baseline ({type(e).__name__}: {e}); re-record it with "
                          "--write-baseline.") from None


def compare_baseline(results: Sequence[ArtifactResult], baseline: Sequence[ArtifactResult],
                     tol: BaselineTolerance = BaselineTolerance()) -> dict[str, list[str]]:
    """Per result key, why it regressed against the baseline entry of the same key (empty list: no regression).

    A result with no baseline entry is reported as such; a baseline measured on other tokens or another context
    is an error, since its numbers cannot be compared.
    """
    by_key = {b.key: b for b in baseline}
    out: dict[str, list[str]] = {}
    for r in results:
        b = by_key.get(r.key)
        if b is None:
            out[r.key] = [f"no baseline entry for {r.key} (baseline has: {', '.join(by_key) or 'nothing'})"]
            continue
        if (b.tokens_sha256, b.ctx) != (r.tokens_sha256, r.ctx):
            raise VerifyError(f"the baseline for {r.key} was measured on other tokens or context (sha256 "
                              f"{b.tokens_sha256[:12]}…, ctx {b.ctx}) than this run ({r.tokens_sha256[:12]}…, ctx "
                              f"{r.ctx}); use the same --text/--dataset and --ctx, or re-record the baseline.")
        why = []
        if r.dppl_pct > b.dppl_pct + tol.dppl_pct:
            why.append(f"ΔPPL {r.dppl_pct:+.3f}% vs baseline {b.dppl_pct:+.3f}% (tolerance +{tol.dppl_pct} points)")
        if r.kl_mean > b.kl_mean * (1 + tol.kl_rel) + tol.kl_abs:
            why.append(f"mean KL {r.kl_mean:.5f} vs baseline {b.kl_mean:.5f} (tolerance +{100 * tol.kl_rel:.0f}%)")
        out[r.key] = why
    return out
