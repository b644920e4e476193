"""Verification: each artifact in its own runtime against the float reference, on the same token ids.

    tokens = eval_tokens(reference_dir)                       # tokenized once, sha256 recorded
    ref = build_reference(reference_dir, tokens, ctx=512)     # one reference pass, cached on disk
    result = verify_artifact(Path("model-q4_k_m.gguf"), ref)  # PPL, ΔPPL, KL, top-1/5, |Δlogit|, bpw, tok/s
    check(result, default_thresholds(ref.n_params, result.kind, result.bits_per_weight))  # [] = pass

Data flows one way: tokens -> reference summary -> per-artifact comparison -> thresholds/baseline -> report.
"""

from qconvert.verify.artifacts import detect, runtimes_for, verify_artifact
from qconvert.verify.reference import Reference, VerifyError, build_reference
from qconvert.verify.report import format_table, write_json, write_report
from qconvert.verify.result import ArtifactResult
from qconvert.verify.thresholds import (
    BaselineTolerance,
    Thresholds,
    check,
    compare_baseline,
    default_thresholds,
    read_baseline,
    thresholds_for,
    write_baseline,
)
from qconvert.verify.tokens import EvalTextError, EvalTokens, eval_tokens

__all__ = [
    "ArtifactResult",
    "BaselineTolerance",
    "EvalTextError",
    "EvalTokens",
    "Reference",
    "Thresholds",
    "VerifyError",
    "build_reference",
    "check",
    "compare_baseline",
    "default_thresholds",
    "detect",
    "eval_tokens",
    "format_table",
    "read_baseline",
    "runtimes_for",
    "thresholds_for",
    "verify_artifact",
    "write_baseline",
    "write_json",
    "write_report",
]
