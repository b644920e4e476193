"""Run a recipe: plan every artifact, skip the ones already done, build the rest locally or as Ray tasks.

    recipe -> jobs (model x format) -> per model: resolve + hash + tokens (driver, cheap)
           -> pending jobs -> per model: prepare_model (statistics + reference, once)
           -> per artifact: build_artifact (build, verify, card, rename) -> manifest entry, saved at once

Both executors call the same two functions with the same thread count, so they write the same bytes.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qconvert import __version__
from qconvert.errors import OutputError, UsageError
from qconvert.release.build import ModelContext, build_artifact, prepare_model
from qconvert.release.manifest import (
    WORK_DIR,
    Manifest,
    remove_stale_partials,
    sha256_file,
)
from qconvert.release.plan import (
    FixtureLocator,
    Job,
    Source,
    check_job,
    expand,
    job_key,
    resolve_source,
    select,
)
from qconvert.release.recipe import Recipe, load_recipe

EXECUTORS = ("local", "ray")


@dataclass
class Outcome:
    manifest: Manifest
    built: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def failures(self) -> list[str]:
        return self.manifest.failures()


@dataclass
class _ModelInputs:
    source: Source
    calib: Any
    calib_info: dict[str, Any] | None
    eval_tokens: Any


def run_release(recipe_path: str | Path, out: Path, *, only: str | None = None, executor: str = "local",
                resume: bool = False, ray_address: str | None = None, ray_init: dict[str, Any] | None = None,
                verbose: bool = True, fixtures: FixtureLocator | None = None) -> Outcome:
    """Make every artifact of the recipe (or those ``only`` selects) under ``out``; see the module docstring.

    An existing release directory is continued only with ``resume`` (artifacts whose manifest entry has the same
    key and intact files are kept) or ``only`` (the selected artifacts are rebuilt, the others kept).
    ``fixtures`` maps the recipe's ``fixture = NAME`` models to checkpoint directories (KeyError: unknown name);
    ``qconvert release`` passes the demo command's models.
    """
    start = time.perf_counter()
    if executor not in EXECUTORS:
        raise UsageError(f"unknown executor {executor!r}; use local or ray.")
    recipe = load_recipe(recipe_path)
    jobs = expand(recipe)
    selected = _with_sources(select(jobs, only), jobs)
    if not selected:
        raise UsageError(f"--only {only!r} matches none of this recipe's artifacts: "
                         f"{', '.join(j.id for j in jobs[:8])}{' ...' if len(jobs) > 8 else ''}")
    out = Path(out)
    _check_out(out, resume, only)
    with _lock(out):
        return _run(recipe, jobs, selected, out, only, executor, resume, ray_address, ray_init, verbose, start,
                    fixtures)


@contextlib.contextmanager
def _lock(out: Path) -> Iterator[None]:
    """One run per release directory: a second one would delete the first one's temporaries."""
    import fcntl

    (out / WORK_DIR).mkdir(exist_ok=True)
    with open(out / WORK_DIR / "lock", "w") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputError(f"another qconvert release is running in {out}; wait for it or choose another --out.") \
                from None
        yield


def _run(recipe: Recipe, jobs: list[Job], selected: list[Job], out: Path, only: str | None, executor: str,
         resume: bool, ray_address: str | None, ray_init: dict[str, Any] | None, verbose: bool,
         start: float, fixtures: FixtureLocator | None) -> Outcome:
    remove_stale_partials(out)
    manifest = Manifest.load(out)
    inputs = {}
    for job in selected:  # every check before any heavy work
        if job.model.slug not in inputs:
            inputs[job.model.slug] = _model_inputs(recipe, job, jobs, out, manifest, fixtures)
        check_job(recipe, job, inputs[job.model.slug].source.config)
    keys = _keys(recipe, selected, inputs)
    pending = [j for j in selected if not (resume and manifest.up_to_date(j.id, keys[j.id]))]
    outcome = Outcome(manifest, skipped=[j.id for j in selected if j not in pending])
    if verbose and outcome.skipped:
        print(f"up to date, kept: {', '.join(outcome.skipped)}", flush=True)
    _record_release(recipe, manifest, inputs)
    manifest.save()
    run = _run_local if executor == "local" else _run_ray
    try:
        run(recipe, pending, inputs, keys, out, manifest, outcome, verbose, ray_address=ray_address,
            ray_init=ray_init or {})
    finally:
        outcome.seconds = time.perf_counter() - start
        manifest.timings.setdefault("runs", []).append({
            "executor": executor, "seconds": round(outcome.seconds, 3), "built": outcome.built,
            "skipped": outcome.skipped, "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
        manifest.save()
    from qconvert.release.report import write_report

    write_report(out, manifest.data, manifest.timings)
    return outcome


def _check_out(out: Path, resume: bool, only: str | None) -> None:
    from qconvert.release.manifest import MANIFEST

    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file; give a directory for the release.")
    if (out / MANIFEST).exists() and not (resume or only):
        raise OutputError(f"{out} already holds a release ({MANIFEST}); pass --resume to continue it (up-to-date "
                          "artifacts are kept, the rest is built), --only PATTERN to rebuild some artifacts, or "
                          "choose a new --out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"cannot create {out}: {e.strerror}; choose a writable --out.") from None
    if not os.access(out, os.W_OK | os.X_OK):
        raise OutputError(f"{out} is not writable; choose a writable --out.")


def _with_sources(selected: list[Job], jobs: list[Job]) -> list[Job]:
    """Add the GPTQ artifact an ONNX ``from`` format is built from, when --only left it out."""
    need = {(j.model.slug, j.fmt.settings["from"]) for j in selected if "from" in j.fmt.settings}
    return [j for j in jobs if j in selected or (j.model.slug, j.fmt.id) in need]


def _model_inputs(recipe: Recipe, job: Job, jobs: list[Job], out: Path, manifest: Manifest,
                  fixtures: FixtureLocator | None) -> _ModelInputs:
    """Resolve and hash the model, tokenize calibration (when any of its artifacts, selected or not, uses it:
    the manifest's model entry must not depend on --only) and evaluation text."""
    from qconvert.calibset import load_calibration, uses_chat
    from qconvert.tokenhash import tokens_sha256
    from qconvert.verify import eval_tokens

    source = resolve_source(recipe, job.model, out / WORK_DIR / job.model.slug, fixtures)
    manifest.check_source(job.model.slug, source.to_dict())
    calib = calib_info = None
    if any(j.needs_calibration for j in jobs if j.model.slug == job.model.slug):
        c = recipe.calibration
        chat = uses_chat(source.path, c["format"])  # the checkpoint's chat template decides "auto"
        local = recipe.path.parent / c["source"]  # a .txt/.jsonl named relative to the recipe
        calib = load_calibration(str(local) if local.is_file() else c["source"], source.path, chat=chat,
                                 n_samples=c["samples"], seq_len=c["seq_len"], seed=recipe.release["seed"])
        calib_info = {"source": c["source"], "description": calib.describe(), "sha256": tokens_sha256(calib.ids),
                      "n_samples": c["samples"], "seq_len": c["seq_len"], "seed": recipe.release["seed"],
                      "chat": chat}
    ev = recipe.evaluation
    text_file = recipe.path.parent / ev["text_file"] if "text_file" in ev else None  # relative to the recipe
    tokens = eval_tokens(source.path, text=ev.get("text"), text_file=text_file)
    return _ModelInputs(source, calib, calib_info, tokens)


def _keys(recipe: Recipe, selected: list[Job], inputs: dict[str, _ModelInputs]) -> dict[str, str]:
    keys: dict[str, str] = {}
    by_fmt = {(j.model.slug, j.fmt.id): j for j in selected}
    for job in selected:  # recipe order: a source format's key exists before its users'
        mi = inputs[job.model.slug]
        dep = by_fmt.get((job.model.slug, job.fmt.settings.get("from", "")))
        deps = {dep.fmt.id: keys[dep.id]} if dep is not None else {}
        keys[job.id] = job_key(job, mi.source, mi.calib_info["sha256"] if mi.calib_info else None,
                               mi.eval_tokens.sha256, recipe, deps)
    return keys


def _record_release(recipe: Recipe, manifest: Manifest, inputs: dict[str, _ModelInputs]) -> None:
    manifest.data["release"] = {
        "name": recipe.release["name"], "recipe": recipe.path.name, "recipe_sha256": sha256_file(recipe.path),
        "qconvert_version": __version__, "threads": recipe.release["threads"], "device": recipe.release["device"],
        "seed": recipe.release["seed"], "calibration": recipe.calibration, "evaluation": recipe.evaluation,
        "thresholds": recipe.thresholds, "output": recipe.output,
    }
    for slug, mi in inputs.items():
        manifest.data["models"][slug] = {
            **mi.source.to_dict(), "calibration": mi.calib_info,
            "evaluation": {"source": mi.eval_tokens.source, "sha256": mi.eval_tokens.sha256,
                           "n_tokens": mi.eval_tokens.n_tokens},
        }


def _record(manifest: Manifest, outcome: Outcome, job_id: str, entry: dict[str, Any]) -> None:
    manifest.timings.setdefault("artifacts", {})[job_id] = entry.pop("_timing")
    manifest.data["artifacts"][job_id] = entry
    manifest.save()
    outcome.built.append(job_id)


def _deps(job: Job, jobs: list[Job], out: Path) -> dict[str, Path]:
    """The final paths of the artifacts ``job`` is built from (ONNX ``from`` a GPTQ format of the same model)."""
    src = job.fmt.settings.get("from")
    dep = next((j for j in jobs if j.model.slug == job.model.slug and j.fmt.id == src), None) if src else None
    return {str(src): out / dep.rel} if dep is not None else {}


def _prepare_args(recipe: Recipe, mi: _ModelInputs, pending: list[Job], out: Path) -> tuple:
    slug = mi.source.entry.slug
    need_stats = any(j.needs_stats for j in pending if j.model.slug == slug)
    return recipe, mi.source, mi.calib, mi.calib_info, mi.eval_tokens, out / WORK_DIR / slug, need_stats


def _run_local(recipe: Recipe, pending: list[Job], inputs: dict[str, _ModelInputs], keys: dict[str, str], out: Path,
               manifest: Manifest, outcome: Outcome, verbose: bool, **_: Any) -> None:
    all_jobs = expand(recipe)
    for slug, mi in inputs.items():
        jobs = [j for j in pending if j.model.slug == slug]
        if not jobs:
            continue
        ctx = prepare_model(*_prepare_args(recipe, mi, pending, out), verbose=verbose)
        _model_timing(manifest, slug, ctx)
        for job in jobs:
            entry = build_artifact(recipe, job, ctx, keys[job.id], out, _deps(job, all_jobs, out), verbose=verbose)
            _record(manifest, outcome, job.id, entry)


def _model_timing(manifest: Manifest, slug: str, ctx: ModelContext) -> None:
    manifest.timings.setdefault("models", {})[slug] = {k: round(v, 3) for k, v in ctx.seconds.items()}


# -- Ray ---------------------------------------------------------------------------------------------------------

def _ray_build(recipe: Recipe, job: Job, ctx: ModelContext, key: str, out: Path, deps: dict[str, Path],
               verbose: bool, *after: Any) -> dict[str, Any]:
    """A Ray task: ``after`` are the entries of the artifacts this one reads (Ray waits for them)."""
    return build_artifact(recipe, job, ctx, key, out, deps, verbose=verbose)


def _run_ray(recipe: Recipe, pending: list[Job], inputs: dict[str, _ModelInputs], keys: dict[str, str], out: Path,
             manifest: Manifest, outcome: Outcome, verbose: bool, *, ray_address: str | None,
             ray_init: dict[str, Any]) -> None:
    """Each model's shared passes and each artifact as Ray tasks with resource requests.

    Calibration (statistics, AWQ, GPTQ, the reference) asks for a GPU when the cluster has one; GGUF K-quants and
    ONNX ask for ``threads`` CPUs. The statistics are shared through the output directory (a file per model:
    GPTQ Hessians grow to tens of GB, too big for the object store); the model context with the reference
    summary goes through the object store once per model. On a multi-node cluster ``--out`` must be a shared
    filesystem path mounted at the same place on every node.
    """
    if not pending:
        return
    try:
        import ray
    except ImportError:
        raise UsageError("--executor ray needs ray (pip install 'qconvert[ray]'); or use --executor local.") from None
    if not ray.is_initialized():
        ray.init(address=ray_address, log_to_driver=verbose, **ray_init)
    threads = recipe.release["threads"]
    gpus = ray.cluster_resources().get("GPU", 0) > 0 and recipe.release["device"] != "cpu"
    prepare = ray.remote(prepare_model)
    build = ray.remote(_ray_build)
    all_jobs = expand(recipe)
    ctx_refs: dict[str, Any] = {}
    refs: dict[str, Any] = {}
    for job in pending:
        slug = job.model.slug
        if slug not in ctx_refs:
            ctx_refs[slug] = prepare.options(num_cpus=threads, num_gpus=1 if gpus else 0).remote(
                *_prepare_args(recipe, inputs[slug], pending, out), verbose=verbose)  # type: ignore[call-arg]  # ray's stubs type remote() by position only
        calibrates = job.fmt.kind in ("gptq", "awq") or (job.fmt.kind == "w8a8" and job.needs_calibration)
        opts = {"num_cpus": threads, "num_gpus": 1 if gpus and calibrates else 0}
        after = [refs[d.id] for d in pending if d.model.slug == slug and d.fmt.id == job.fmt.settings.get("from")]
        refs[job.id] = build.options(**opts).remote(recipe, job, ctx_refs[slug], keys[job.id], out,
                                                   _deps(job, all_jobs, out), verbose, *after)
    waiting = {ref: job_id for job_id, ref in refs.items()}
    error: BaseException | None = None
    while waiting:
        done, _ = ray.wait(list(waiting), num_returns=1)
        job_id = waiting.pop(done[0])
        try:
            _record(manifest, outcome, job_id, ray.get(done[0]))
        except ray.exceptions.RayTaskError as e:  # keep the artifacts that did finish, then report the first error
            error = error or e.as_instanceof_cause()
    for slug, ref in ctx_refs.items():
        try:
            _model_timing(manifest, slug, ray.get(ref))
        except ray.exceptions.RayTaskError as e:
            error = error or e.as_instanceof_cause()
    if error is not None:
        raise error


def summary(outcome: Outcome) -> str:
    arts = outcome.manifest.data["artifacts"]
    return (f"{len(outcome.built)} built, {len(outcome.skipped)} up to date; {len(arts)} artifacts in the manifest, "
            f"{sum(not e['passed'] for e in arts.values())} failing their thresholds ({outcome.seconds:.1f} s)")
