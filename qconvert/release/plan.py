"""From a recipe to the (model, format) matrix: one ``Job`` per artifact, with its name, path and settings.

Everything here is cheap (no weights are read beyond config.json and the tokenizer): resolving the model,
hashing its files, tokenizing the calibration and evaluation text, and the checks that need the model's
shapes. So a recipe that cannot work fails before the first calibration forward.
"""

from __future__ import annotations

import fnmatch
import json
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from qconvert import __version__
from qconvert.release.manifest import sha256_file, sha256_json
from qconvert.release.recipe import (
    FormatEntry,
    ModelEntry,
    Recipe,
    RecipeError,
)


@dataclass(frozen=True, eq=False)
class Job:
    """One artifact: ``id`` is ``<model slug>/<artifact name>`` (what --only matches and the manifest keys)."""

    model: ModelEntry
    fmt: FormatEntry
    preset: str | None  # GGUF preset; None for other kinds
    name: str  # artifact directory name
    rel: str  # path relative to the release directory

    @property
    def id(self) -> str:
        return f"{self.model.slug}/{self.name}"

    @property
    def label(self) -> str:
        return f"{self.fmt.kind} {self.preset}" if self.preset else self.fmt.id

    def settings(self) -> dict[str, Any]:
        s = dict(self.fmt.settings)
        if self.preset is not None:
            s.pop("presets", None)
            s["preset"] = self.preset
        return {"kind": self.fmt.kind, **s}

    @property
    def needs_stats(self) -> bool:
        s = self.fmt.settings
        return (self.fmt.kind == "gguf" and (s.get("imatrix", False) or s.get("optimize", False)
                                             or "target_bpw" in s)) or \
            (self.fmt.kind == "gptq" and s.get("from_stats", True))

    @property
    def needs_calibration(self) -> bool:
        s = self.fmt.settings
        return self.needs_stats or self.fmt.kind in ("gptq", "awq") or \
            (self.fmt.kind == "onnx" and s.get("algo", "rtn") != "rtn" and "from" not in s) or \
            (self.fmt.kind == "w8a8" and (s.get("weights", "rtn") == "gptq" or "smooth" in s))


def artifact_name(model: ModelEntry, fmt: FormatEntry, preset: str | None) -> str:
    """Qwen's names: ``qwen2.5-7b-instruct-gguf-q4_k_m``, ``-gptq-int4``, ``-awq``, ``-onnx-int4``; ``-w8a8``."""
    from qconvert.pipelines.int4 import output_dir_name, w8a8_output_name

    if fmt.kind == "gguf":
        assert preset is not None
        bpw = f"-{fmt.settings['target_bpw']:g}bpw" if "target_bpw" in fmt.settings else ""
        return f"{model.slug}-gguf-{preset.lower()}{bpw}" + ("-optimized" if fmt.settings.get("optimize") else "")
    if fmt.kind in ("gptq", "awq"):
        return output_dir_name(model.name, fmt.kind, fmt.settings.get("bits", 4), fmt.settings.get("format"))
    if fmt.kind == "w8a8":
        return w8a8_output_name(model.name)
    return f"{model.slug}-onnx-{fmt.settings.get('precision', 'int4')}"


def expand(recipe: Recipe) -> list[Job]:
    """Every (model, format[, preset]) of the recipe, in recipe order (a format's sources come before it)."""
    from qconvert.gguf.plan import get_preset

    jobs = []
    for model in recipe.models:
        for fmt in recipe.formats:
            presets = [get_preset(p).name for p in fmt.settings["presets"]] if fmt.kind == "gguf" else [None]
            for preset in presets:
                name = artifact_name(model, fmt, preset)
                rel = name if recipe.output["layout"] == "flat" else f"{model.slug}/{name}"
                jobs.append(Job(model, fmt, preset, name, rel))
    seen: dict[str, Job] = {}
    for job in jobs:
        if job.id in seen:
            raise recipe.error("formats", job.fmt.index, None, f"formats {seen[job.id].fmt.id!r} and {job.fmt.id!r} "
                               f"both produce {job.id}; give them different settings")
        seen[job.id] = job
    return jobs


def select(jobs: list[Job], pattern: str | None) -> list[Job]:
    """``--only``: shell patterns, comma-separated, matched against the id, the artifact name, the format id, the
    kind and the preset (``--only '*q4_k_m*'``, ``--only gptq-int4``, ``--only 'qwen2.5-7b-instruct/*'``)."""
    if not pattern:
        return jobs
    pats = [p.strip() for p in pattern.split(",") if p.strip()]

    def hit(job: Job) -> bool:
        keys = [job.id, job.name, job.fmt.id, job.fmt.kind, (job.preset or "").lower()]
        return any(fnmatch.fnmatchcase(k.lower(), p.lower()) for p in pats for k in keys)

    return [j for j in jobs if hit(j)]


# -- the source checkpoint --------------------------------------------------------------------------------------

@dataclass
class Source:
    """A resolved checkpoint and its identity: revision and the sha256 of every file."""

    entry: ModelEntry
    path: Path
    repo_id: str | None
    revision: str | None
    files: dict[str, dict[str, Any]]
    license: str
    config: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"ref": self.entry.ref if not Path(self.entry.ref).is_absolute() else self.path.name,
                "name": self.entry.name, "repo_id": self.repo_id, "revision": self.revision, "files": self.files,
                "license": self.license}


# ``fixture = NAME`` models: NAME -> checkpoint directory, raising KeyError for an unknown NAME. The release
# library knows no fixtures; its caller provides them (the CLI: the demo command's models).
FixtureLocator = Callable[[str], Path]


def resolve_source(recipe: Recipe, entry: ModelEntry, cache_dir: Path,
                   fixtures: FixtureLocator | None = None) -> Source:
    """Resolve ``entry`` (a ``fixture = NAME`` one through ``fixtures``) and hash its files.

    Hashes are cached in ``cache_dir`` by (name, size, mtime): a rerun does not reread a 15 GB checkpoint, and
    a file that was replaced (new size or mtime) is hashed again.
    """
    from qconvert.resolve import resolve_model

    if entry.ref.startswith("fixture:"):
        path, repo_id, revision = _fixture(recipe, entry, fixtures), None, None
    else:
        resolved = resolve_model(entry.ref)
        path, repo_id, revision = resolved.path, resolved.repo_id, resolved.revision
    files = _hash_files(path, cache_dir / "source-hashes.json")
    from qconvert.registry import read_model_config

    config = read_model_config(path)
    return Source(entry, path, repo_id, revision, files, source_license(path, entry.license), config)


def _fixture(recipe: Recipe, entry: ModelEntry, fixtures: FixtureLocator | None) -> Path:
    name = entry.ref.removeprefix("fixture:")
    if fixtures is None:
        raise recipe.error("models", entry.index, "fixture", f"fixture {name!r} names a model that only the qconvert "
                           "CLI provides (`qconvert release`); from Python pass run_release(..., fixtures=...), or "
                           "name the checkpoint with path = \"DIR\"")
    try:
        return Path(fixtures(name))
    except KeyError as e:
        raise recipe.error("models", entry.index, "fixture", f"no fixture {name!r}: {e.args[0] if e.args else e}") \
            from None


def _hash_files(root: Path, cache_file: Path) -> dict[str, dict[str, Any]]:
    cache = json.loads(cache_file.read_text()) if cache_file.is_file() else {}
    out = {}
    for p in sorted(q for q in root.iterdir() if q.is_file() and not q.name.startswith(".")):
        st = p.stat()
        stamp = f"{p.resolve()}:{st.st_size}:{st.st_mtime_ns}"
        hit = cache.get(p.name)
        digest = hit["sha256"] if hit and hit.get("stamp") == stamp else sha256_file(p)
        cache[p.name] = {"stamp": stamp, "sha256": digest}
        out[p.name] = {"sha256": digest, "size": st.st_size}
    cache_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache_file.with_name(f".{cache_file.name}.partial")
    tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
    tmp.replace(cache_file)
    return out


_LICENSE = re.compile(r"^license:\s*['\"]?([^'\"\s]+)", re.MULTILINE)


def source_license(model_dir: Path, fallback: str | None) -> str:
    """The ``license:`` of the source's README front matter (Qwen: apache-2.0, or ``other`` for 3B/72B's Qwen
    license), else the recipe's ``license``, else ``other``."""
    readme = model_dir / "README.md"
    if readme.is_file():
        text = readme.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            m = _LICENSE.search(text.split("---", 2)[1])
            if m:
                return m.group(1)
    return fallback or "other"


def check_job(recipe: Recipe, job: Job, config: dict[str, Any]) -> None:
    """Model-dependent impossibilities, reported at the recipe line that asks for them."""
    from qconvert.calibration.quantize import check_model_scheme
    from qconvert.errors import QConvertError
    from qconvert.family import tensor_shapes
    from qconvert.gguf.export import PlanOptions, build_plan
    from qconvert.registry import spec_for_config

    s = job.fmt.settings
    try:
        if job.fmt.kind == "gguf" and s.get("pure", False):
            plan = build_plan(config, job.preset or "", PlanOptions(pure=True), tensor_shapes(config))
            bad = [e for e in plan.entries if e.fallback_from is not None]
            if bad:
                e = bad[0]
                assert e.fallback_from is not None
                raise recipe.error("formats", job.fmt.index, "pure", (
                    f"pure = true asks every matrix of {job.model.name} to be {e.fallback_from.label} under "
                    f"{job.preset}, but {len(bad)} tensor(s) cannot be (e.g. {e.name}: rows of {e.shape[-1]} are not "
                    f"a multiple of {e.fallback_from.block_size}; llama.cpp would fall back to {e.type.label}). "
                    "Drop pure = true to accept the fallback, or choose a preset with 32-blocks (Q4_0, Q5_0, Q8_0)"))
        elif job.fmt.kind in ("gptq", "awq"):
            from qconvert.int4.options import int4_config

            cfg = int4_config(job.fmt.kind, s)
            check_model_scheme(config, spec_for_config(config), cfg.bits, cfg.group_size)
    except RecipeError:
        raise
    except QConvertError as e:
        raise recipe.error("formats", job.fmt.index, "group_size" if "group_size" in s else None,
                           f"{job.model.name}: {e}") from None


def job_key(job: Job, source: Source, calib_sha: str | None, eval_sha: str, recipe: Recipe,
            dep_keys: dict[str, str]) -> str:
    """sha256 of everything the artifact's bytes and metrics depend on (see ``qconvert.release.manifest``)."""
    return sha256_json({
        "qconvert": __version__, "source": source.files, "name": job.model.name, "settings": job.settings(),
        "calibration": calib_sha if job.needs_calibration else None, "calibration_settings":
            recipe.calibration if job.needs_calibration else None,
        "evaluation": eval_sha, "evaluation_settings": {k: v for k, v in recipe.evaluation.items() if k != "text"},
        "thresholds": thresholds_of(recipe, job), "threads": recipe.release["threads"], "deps": dep_keys,
        "quantized_by": recipe.release["quantized_by"], "tags": recipe.release["tags"],
    })


def thresholds_of(recipe: Recipe, job: Job) -> dict[str, float]:
    """The recipe's [thresholds] with the format's [formats.thresholds] on top (absent keys: verify defaults)."""
    return {**recipe.thresholds, **job.fmt.thresholds}
