"""The verify pipeline: artifacts in their own runtimes against the float reference, with pass/fail gates.

    reference (dir | hub id | size) ──> eval_tokens ──> build_reference (once, cached)
        ──> per artifact x runtime: verify_artifact ──> thresholds (check) ──> baseline (compare_baseline)

Every check that can fail on bad input (artifact kinds, truncated files, baseline file, device, text) runs
before the reference pass; vocabulary checks run per artifact before its runtime loads.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qconvert.verify import ArtifactResult, BaselineTolerance, EvalTokens, Reference

GPTQMODEL_SKIPPED = ("gptqmodel path skipped: gptqmodel is not importable here (it lives in .venv-oracle); "
                     "the qconvert-dequant path ran")


@dataclass
class Verification:
    """What one ``verify_artifacts`` run measured and decided."""

    reference_dir: Path
    tokens: EvalTokens
    reference: Reference
    results: list[ArtifactResult]
    status: list[str]  # one per result: "PASS" or "FAIL: why; why"
    regressions: dict[str, list[str]] | None  # baseline key -> why it regressed (empty: ok); None without baseline
    notes: list[str] = field(default_factory=list)

    @property
    def failed(self) -> bool:
        return any(s != "PASS" for s in self.status) or any((self.regressions or {}).values())


def reference_dir(reference: str | Path, variant: str = "instruct") -> Path:
    """A checkpoint directory, a hub repo id, or a Qwen2.5 size (with ``variant``), resolved to a local directory."""
    from qconvert.family import SIZES, hub_id
    from qconvert.resolve import resolve_model

    ref = hub_id(str(reference), variant) if str(reference) in SIZES else str(reference)
    return resolve_model(ref).path


def runtimes(kind: str, wanted: Sequence[str] | None, notes: list[str]) -> list[str]:
    """The runtimes ``kind`` runs in (restricted to ``wanted``); a skipped optional runtime adds a note."""
    from qconvert.verify.artifacts import DEFAULT_RUNTIME, gptqmodel_available, runtimes_for

    known = set(DEFAULT_RUNTIME.values()) | {"gptqmodel"}
    unknown = sorted(set(wanted or ()) - known)
    if unknown:
        from qconvert.verify.reference import VerifyError

        raise VerifyError(f"unknown --runtime {', '.join(unknown)}; the runtimes are {', '.join(sorted(known))}.")
    names = [r for r in runtimes_for(kind) if not wanted or r in wanted]
    if "gptqmodel" in names and not gptqmodel_available():
        names.remove("gptqmodel")
        if wanted and "gptqmodel" in wanted:
            from qconvert.errors import RuntimeMissingError
            from qconvert.verify.artifacts import ORACLE_HINT

            raise RuntimeMissingError(ORACLE_HINT)
        notes.append(GPTQMODEL_SKIPPED)
    return names


def verify_artifacts(artifacts: Sequence[Path], reference: str | Path, *, variant: str = "instruct",
                     device: str = "cpu", ref_dtype: str | None = None, text_file: Path | None = None,
                     dataset: str | None = None, ctx: int = 512, chunks: int | None = None,
                     runtime: Sequence[str] | None = None, max_dppl: float | None = None,
                     max_kl: float | None = None, baseline: Path | None = None,
                     tolerance: BaselineTolerance | None = None, cache_dir: Path | None = None,
                     progress: bool = True,
                     on_reference: Callable[[Path, Reference, EvalTokens], None] | None = None) -> Verification:
    """Score every artifact (a .gguf, an .onnx model, a GPTQ/AWQ/float directory) against ``reference``.

    The text (``text_file``, a hub ``dataset`` such as wikitext2, or the built-in held-out text) is tokenized
    once with the reference's tokenizer and cut into windows of ``ctx`` tokens (at most ``chunks``); the
    reference runs once (cached in ``cache_dir``). Gates: ``max_dppl`` (percent) and ``max_kl`` (nats), else
    defaults by model size and bits per weight; ``baseline`` compares with a stored run within ``tolerance``.
    ``on_reference(reference_dir, reference, tokens)`` is called once the reference is ready, before the
    artifacts run.
    """
    from qconvert.verify import (
        BaselineTolerance,
        build_reference,
        check,
        compare_baseline,
        detect,
        eval_tokens,
        read_baseline,
        thresholds_for,
        verify_artifact,
    )
    from qconvert.verify.reference import resolve_device
    from qconvert.verify.thresholds import validate_limit
    from qconvert.verify.tokens import dataset_text

    validate_limit("max_dppl_pct", max_dppl)
    validate_limit("max_kl", max_kl)
    device = resolve_device(device)
    arts = [detect(a) for a in artifacts]  # bad files fail before the reference pass
    for art in arts:  # an unknown --runtime name is refused before any work
        runtimes(art.kind, runtime, [])
    stored = read_baseline(baseline) if baseline is not None else None
    ref_dir = reference_dir(reference, variant)
    tokens = eval_tokens(ref_dir, text=dataset_text(dataset) if dataset else None, text_file=text_file)
    if dataset:
        tokens = type(tokens)(tokens.ids, tokens.sha256, f"dataset:{dataset}")
    ref = build_reference(ref_dir, tokens, ctx=ctx, chunks=chunks, device=device, cache_dir=cache_dir,
                          dtype=ref_dtype, progress=progress)
    if on_reference is not None:
        on_reference(ref_dir, ref, tokens)
    notes: list[str] = []
    results = [verify_artifact(art.path, ref, device=device, runtime=rt, progress=progress)
               for art in arts for rt in runtimes(art.kind, runtime, notes)]
    status = []
    for r in results:
        why = check(r, thresholds_for(r, max_dppl, max_kl))
        status.append("FAIL: " + "; ".join(why) if why else "PASS")
    regressions = None
    if stored is not None:
        regressions = compare_baseline(results, stored, tolerance or BaselineTolerance())
    return Verification(ref_dir, tokens, ref, results, status, regressions,
                        notes + [n for r in results for n in r.notes])
