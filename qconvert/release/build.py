"""The two kinds of work a release runs, as plain functions an executor can call in-process or as Ray tasks.

    prepare_model(...)  -> ModelContext   once per model: calibration statistics (one float pass shared by GPTQ
                                          and the GGUF importance matrix) and the verification reference
    build_artifact(...) -> dict           once per artifact: build in a hidden sibling, verify in its own
                                          runtime, write the model card, hash, rename into place

AWQ runs its own calibration pass on the shared calibration tokens: its scale search needs each layer's
activations themselves (and the outputs of the already-scaled layers), which the statistics do not hold.
"""

from __future__ import annotations

import errno
import math
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from qconvert.constants import DEFAULT_HOLDOUT
from qconvert.errors import OutputError, QConvertError
from qconvert.release.manifest import file_table, round_metrics, tree_files

if TYPE_CHECKING:
    from qconvert.calibset import CalibrationSet
    from qconvert.release.plan import Job, Source
    from qconvert.release.recipe import Recipe


class FormatUnavailableError(QConvertError):
    """A format the recipe asks for is not available in this build of qconvert."""


# ArtifactResult fields that are stable across runs and machines (timings and paths go to timings.json).
METRIC_FIELDS = ("ppl", "ppl_ref", "dppl", "dppl_pct", "kl_mean", "kl_p99", "top1", "top5", "max_abs_dlogit",
                 "mean_abs_dlogit", "bits_per_weight", "size_bytes", "tokens_sha256", "runtime", "format", "ctx",
                 "n_windows", "n_scored", "n_params")


@dataclass
class ModelContext:
    """What every artifact of one model shares; small enough for Ray's object store (statistics stay on disk)."""

    source: Source
    calib: CalibrationSet | None
    calib_info: dict[str, Any] | None
    eval_info: dict[str, Any]
    stats_path: Path | None
    reference: Any  # qconvert.verify.Reference
    work_dir: Path
    seconds: dict[str, float]


def set_threads(n: int) -> None:
    """Same thread count in every executor: float reductions (and so GPTQ's rounding) depend on it."""
    import numba
    import torch

    torch.set_num_threads(n)
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))  # type: ignore[attr-defined]  # numba's stubs omit its config values


def settings_for(recipe: Recipe) -> Any:
    from qconvert.calibration.quantize import CalibrationSettings, resolve_device, resolve_dtype

    device = resolve_device(recipe.release["device"])
    return CalibrationSettings(device, resolve_dtype("auto", device), recipe.calibration["batch_size"])


def prepare_model(recipe: Recipe, source: Source, calib: CalibrationSet | None, calib_info: dict[str, Any] | None,
                  eval_tokens: Any, work_dir: Path, need_stats: bool, *, verbose: bool = True) -> ModelContext:
    """The shared passes of one model: statistics (when a pending artifact needs them) and the reference."""
    from qconvert.verify import build_reference

    set_threads(recipe.release["threads"])
    settings = settings_for(recipe)
    work_dir.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}
    stats_path = None
    if need_stats:
        assert calib is not None and calib_info is not None
        # the held-out split (and its token ids, the budget check's text) is part of the name: statistics from an
        # older release are not reused
        stats_path = work_dir / f"stats-{calib_info['sha256'][:16]}-holdout{DEFAULT_HOLDOUT}-ids.safetensors"
        if not stats_path.is_file():
            from qconvert.calibration.stats import collect_stats

            start = time.perf_counter()
            stats = collect_stats(source.path, calib.ids, settings, source=calib.describe(), path=stats_path,
                                  force=True, holdout=DEFAULT_HOLDOUT if len(calib.ids) > 1 else None)  # streamed layer by layer; Hessians read
            # back when GPTQ needs them, with the held-out windows' own for the guard
            seconds["statistics"] = time.perf_counter() - start
            _STATS[str(stats_path)] = stats
    start = time.perf_counter()
    ev = recipe.evaluation
    reference = build_reference(source.path, eval_tokens, ctx=ev["ctx"], chunks=ev.get("chunks"),
                                device=settings.device, cache_dir=work_dir, progress=False)
    seconds["reference"] = time.perf_counter() - start
    eval_info = {"source": eval_tokens.source, "sha256": eval_tokens.sha256, "n_tokens": eval_tokens.n_tokens,
                 "ctx": ev["ctx"], "windows": len(reference.windows)}
    if verbose:
        print(f"[{source.entry.slug}] calibration/reference ready ({', '.join(f'{k} {v:.1f} s' for k, v in seconds.items())})",
              flush=True)
    return ModelContext(source, calib, calib_info, eval_info, stats_path, reference, work_dir, seconds)


_STATS: dict[str, Any] = {}  # in-process reuse of loaded statistics (local executor)


def _stats(ctx: ModelContext) -> Any:
    from qconvert.calibration.stats import CalibrationStats

    assert ctx.stats_path is not None
    key = str(ctx.stats_path)
    if key not in _STATS:
        _STATS[key] = CalibrationStats.load(ctx.stats_path)
    return _STATS[key]


# -- builders: each writes the artifact into ``out`` (a directory that does not exist yet) -------------------------

def _build_gguf(ctx: ModelContext, job: Job, out: Path, settings: Any, deps: dict[str, Path]) -> Path:
    from qconvert.gguf.export import PlanOptions, export_gguf
    from qconvert.gguf.plan import parse_type
    from qconvert.pipelines.gguf import output_name

    s = job.fmt.settings
    opts = PlanOptions(pure=s.get("pure", False),
                       output_tensor_type=parse_type(s["output_tensor_type"]) if "output_tensor_type" in s else None,
                       token_embedding_type=parse_type(s["token_embedding_type"]) if "token_embedding_type" in s
                       else None)
    optimize = s.get("optimize", False)  # error-feedback codes (qconvert.gguf.optimize); uses the imatrix too
    imatrix = _stats(ctx).imatrix() if s.get("imatrix", False) or optimize else None
    hessians, note = None, ""
    if optimize:
        from qconvert.gguf.optimize import optimize_note, stats_hessians

        hessians, note = stats_hessians(_stats(ctx)), optimize_note(_stats(ctx).source)
    extra: list = []
    if "target_bpw" in s:  # each decoder matrix's type chosen for the budget (qconvert.gguf.budget)
        from qconvert.gguf.export import OPTIMIZE_KEY
        from qconvert.gguf.metadata import KV, V
        from qconvert.pipelines.gguf import budget_plan

        stats = _stats(ctx)
        imatrix = stats.imatrix() if imatrix is None else imatrix
        bp = budget_plan(ctx.source.path, job.preset or "", opts, stats, imatrix, bpw=s["target_bpw"],
                         model_name=job.model.name, more_metadata=[KV(OPTIMIZE_KEY, V.STRING, note)] if optimize else [],
                         settings=settings)
        opts, extra = bp.options, bp.metadata
    out.mkdir()
    path = out / output_name(job.model.name, job.preset or "")
    export_gguf(ctx.source.path, path, job.preset or "", options=opts, model_name=job.model.name, imatrix=imatrix,
                hessians=hessians, optimize_note=note, extra_metadata=extra)
    return path


def _build_int4(ctx: ModelContext, job: Job, out: Path, settings: Any, deps: dict[str, Path]) -> Path:
    from qconvert.int4.options import int4_config
    from qconvert.pipelines.int4 import write_int4

    cfg = int4_config(job.fmt.kind, job.fmt.settings)
    stats = _stats(ctx) if job.needs_stats else None
    write_int4(ctx.source.path, job.model.name, out, job.fmt.kind, cfg, ctx.calib, settings, stats=stats,
               evaluate=False, layout=job.fmt.settings.get("format"))
    (out / "README.md").unlink(missing_ok=True)  # its card records wall times; the release writes its own
    return out


def _build_onnx(ctx: ModelContext, job: Job, out: Path, settings: Any, deps: dict[str, Path]) -> Path:
    try:
        from qconvert.onnx_export import export_onnx
    except ImportError as e:
        raise FormatUnavailableError(f"ONNX export is not available in this build ({e}); remove the onnx format from "
                                     "the recipe or install qconvert with the onnx extra.") from None
    s = job.fmt.settings
    from_dir = deps.get(s["from"]) if "from" in s else None
    calibrated = s.get("precision", "int4") in ("int4", "int8") and from_dir is None and s.get("algo", "rtn") != "rtn"
    tables = {k: s[k] for k in ("accuracy_level", "table_bits", "table_block_size", "attention",
                                           "mixed_precision") if k in s}  # else the exporter's
    out.mkdir()
    made = export_onnx(ctx.source.path, out, precision=s.get("precision", "int4"), algo=s.get("algo", "rtn"),
                       from_dir=from_dir, block_size=s.get("block_size"),
                       calib=ctx.calib if calibrated else None, settings=settings if calibrated else None,
                       model_name=job.model.name, quantize_embedding=not s.get("keep_embedding_float", False),
                       **tables)
    (made / "README.md").unlink(missing_ok=True)  # its card records wall times; the release writes its own
    return made


def _build_w8a8(ctx: ModelContext, job: Job, out: Path, settings: Any, deps: dict[str, Path]) -> Path:
    from qconvert.pipelines.int4 import write_w8a8

    s = job.fmt.settings
    write_w8a8(ctx.source.path, job.model.name, out, s.get("weights", "rtn"),
               ctx.calib if job.needs_calibration else None, settings, alpha=s.get("smooth"),
               damp=s.get("damp", 0.01), evaluate=False)
    (out / "README.md").unlink(missing_ok=True)  # its card records wall times; the release writes its own
    return out


BUILDERS = {"gguf": _build_gguf, "gptq": _build_int4, "awq": _build_int4, "onnx": _build_onnx, "w8a8": _build_w8a8}


# -- one artifact --------------------------------------------------------------------------------------------------

def build_artifact(recipe: Recipe, job: Job, ctx: ModelContext, key: str, root: Path,
                   deps: dict[str, Path] | None = None, *, verbose: bool = True) -> dict[str, Any]:
    """Build, verify, describe and publish one artifact; returns its manifest entry (plus ``_timing``).

    The artifact is made in ``root/<parent>/.<name>.partial-<pid>/`` and renamed to its final name only when
    its files, verification and model card are complete.
    """
    from qconvert.release.manifest import replace_path

    set_threads(recipe.release["threads"])
    settings = settings_for(recipe)
    final = root / job.rel
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = final.parent / f".{final.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    start = time.perf_counter()
    try:
        try:
            built = BUILDERS[job.fmt.kind](ctx, job, staging / "out", settings, deps or {})
            t_build = time.perf_counter() - start
            result = _verify(built, ctx, job, settings)
        except OSError as e:
            if e.errno == errno.ENOSPC:
                raise OutputError(f"no space left on the device while building {job.id}; nothing was written under "
                                  f"its name and the manifest still lists the artifacts completed before. Free some "
                                  f"space in {root} (or choose another --out) and rerun with --resume.") from e
            raise
        art_dir = built if built.is_dir() else built.parent
        entry = _entry(recipe, job, ctx, key, result)
        data_files = {p.relative_to(art_dir).as_posix(): p for p in tree_files(art_dir) if p.name != "README.md"}
        entry["files"] = {f"{job.rel}/{k}": v for k, v in file_table(art_dir, data_files.values()).items()}
        (art_dir / "README.md").write_text(_card(recipe, job, ctx, entry), encoding="utf-8")
        entry["files"][f"{job.rel}/README.md"] = file_table(art_dir, [art_dir / "README.md"])["README.md"]
        entry["files"] = dict(sorted(entry["files"].items()))
        if art_dir.name != final.name:
            os.replace(art_dir, staging / final.name)
            art_dir = staging / final.name
        replace_path(art_dir, final)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    seconds = time.perf_counter() - start
    entry["_timing"] = {"build_s": round(t_build, 3), "total_s": round(seconds, 3),
                        "tokens_per_s": round(result.tokens_per_s, 1) if result is not None else None}
    if verbose:
        verdict = "PASS" if entry["passed"] else "FAIL: " + "; ".join(entry["failures"])
        print(f"[{job.id}] built and verified in {seconds:.1f} s: {verdict}", flush=True)
    return entry


def _card(recipe: Recipe, job: Job, ctx: ModelContext, entry: dict[str, Any]) -> str:
    """README.md of the artifact: ``qconvert.card.release_card`` fed from the recipe, the source and ``entry``."""
    from qconvert.card import release_card

    return release_card(entry, model_name=job.model.name, artifact=job.name, license=ctx.source.license,
                        quantized_by=recipe.release["quantized_by"], tags=recipe.release["tags"],
                        release_name=recipe.release["name"], repo_id=ctx.source.repo_id,
                        revision=ctx.source.revision)


def _verify(built: Path, ctx: ModelContext, job: Job, settings: Any) -> Any:
    from qconvert.verify import verify_artifact

    name = built.name if built.is_file() else job.name
    return verify_artifact(built, ctx.reference, device=settings.device, name=name, progress=False)


def _entry(recipe: Recipe, job: Job, ctx: ModelContext, key: str, result: Any) -> dict[str, Any]:
    from qconvert.release.plan import thresholds_of
    from qconvert.verify import check, thresholds_for

    limits = thresholds_of(recipe, job)
    th = thresholds_for(result, limits.get("max_dppl_pct"), limits.get("max_kl"))
    failures = check(result, th)
    min_top1 = limits.get("min_top1")
    if min_top1 is not None and not result.top1 >= min_top1:
        failures.append(f"top-1 agreement {result.top1:.4f} < {min_top1:.4f}")
    metrics = {f: getattr(result, f) for f in METRIC_FIELDS}
    for f, v in metrics.items():
        if isinstance(v, float) and not math.isfinite(v):
            metrics[f] = str(v)
    return round_metrics({
        "model": job.model.slug, "kind": job.fmt.kind, "format_id": job.fmt.id, "path": job.rel, "key": key,
        "settings": job.settings(), "calibration": ctx.calib_info if job.needs_calibration else None,
        "statistics": "shared float pass" if job.needs_stats else
        (f"own {job.fmt.kind.upper()} pass on the shared calibration tokens" if job.fmt.kind in ("gptq", "awq")
         else "own pass on the shared calibration tokens" if job.needs_calibration else None),
        "evaluation": ctx.eval_info, "metrics": metrics, "bits_per_weight": result.bits_per_weight,
        "size_bytes": result.size_bytes,
        "thresholds": {"max_dppl_pct": th.max_dppl_pct, "max_kl": th.max_kl,
                       **({"min_top1": min_top1} if min_top1 is not None else {})},
        "passed": not failures, "failures": failures,
    })
