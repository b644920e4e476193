"""manifest.json: what a release holds, keyed so that a rerun redoes only what changed.

The manifest is deterministic: sorted keys, no timestamps, paths relative to the release directory, metrics
rounded to 6 significant digits. Wall times go to ``timings.json`` beside it (excluded from every comparison).
It is rewritten atomically after each finished artifact, so a killed run leaves a valid manifest of the
artifacts that are complete.

An artifact's ``key`` is the sha256 of everything its bytes and metrics depend on: the qconvert version, the
source checkpoint's file hashes, the format settings, the calibration and evaluation token hashes, the
thresholds, and the keys of artifacts it is built from (ONNX int4 from GPTQ).
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from qconvert.errors import OutputError, QConvertError
from qconvert.io.atomic import atomic_output

FORMAT = "qconvert-release-manifest/1"
MANIFEST = "manifest.json"
TIMINGS = "timings.json"
WORK_DIR = ".qconvert-release"  # per-model caches (statistics, reference); not part of the release


class SourceChangedError(QConvertError):
    """The source checkpoint differs from the one earlier artifacts of this release were made from."""


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_json(value: Any) -> str:
    return hashlib.sha256(canonical(value).encode()).hexdigest()


def canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def file_table(root: Path, files: Iterable[Path]) -> dict[str, dict[str, Any]]:
    """Relative path -> {sha256, size} for ``files`` under ``root``, sorted by path."""
    return {p.relative_to(root).as_posix(): {"sha256": sha256_file(p), "size": p.stat().st_size}
            for p in sorted(files)}


def tree_files(root: Path) -> list[Path]:
    """Every regular file under ``root`` (a directory or a single file), hidden temporaries excluded."""
    if root.is_file():
        return [root]
    return sorted(p for p in root.rglob("*") if p.is_file() and not p.name.startswith("."))


def round_metrics(value: Any) -> Any:
    """Floats to 6 significant digits, recursively: runtimes differ in the last bits across thread counts."""
    if isinstance(value, float):
        return float(f"{value:.6g}")
    if isinstance(value, dict):
        return {k: round_metrics(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [round_metrics(v) for v in value]
    return value


class Manifest:
    """The release's manifest.json in memory: ``models`` (per source) and ``artifacts`` (per artifact id)."""

    def __init__(self, root: Path, data: dict[str, Any] | None = None) -> None:
        self.root = root
        self.data = data or {"format": FORMAT, "release": {}, "models": {}, "artifacts": {}}
        self.timings: dict[str, Any] = {}

    @classmethod
    def load(cls, root: Path) -> Manifest:
        path = root / MANIFEST
        if not path.exists():
            return cls(root)
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OutputError(f"{path} is not valid JSON ({e}); it was not written by qconvert release. Remove it "
                              "or choose another --out.") from None
        if data.get("format") != FORMAT:
            raise OutputError(f"{path} has format {data.get('format')!r}, not {FORMAT!r}; choose another --out.")
        m = cls(root, data)
        timings = root / TIMINGS
        if timings.exists():
            m.timings = json.loads(timings.read_text())
        return m

    def check_source(self, slug: str, source: dict[str, Any]) -> None:
        """Refuse to add artifacts of a checkpoint whose files differ from those already in this release."""
        old = self.data["models"].get(slug)
        if old is None or old["files"] == source["files"]:
            return
        changed = sorted(n for n in set(old["files"]) | set(source["files"])
                         if old["files"].get(n) != source["files"].get(n))
        raise SourceChangedError(
            f"the source checkpoint of {slug} changed since {self.root / MANIFEST} was written ({', '.join(changed[:4])} "
            "differ by sha256). Artifacts from two different checkpoints would be mixed in one release. Restore the "
            "original checkpoint, or start a new release in another --out directory.")

    def up_to_date(self, artifact_id: str, key: str) -> bool:
        """True when the entry has this key and every file it lists is present with its size and sha256."""
        entry = self.data["artifacts"].get(artifact_id)
        if entry is None or entry.get("key") != key:
            return False
        for rel, f in entry["files"].items():
            p = self.root / rel
            if not p.is_file() or p.stat().st_size != f["size"] or sha256_file(p) != f["sha256"]:
                return False
        return True

    def save(self) -> None:
        """Atomic rewrite of manifest.json (and timings.json); a full disk leaves the previous manifest intact."""
        self.data["artifacts"] = dict(sorted(self.data["artifacts"].items()))
        self.data["models"] = dict(sorted(self.data["models"].items()))
        for name, value in ((MANIFEST, self.data), (TIMINGS, self.timings)):
            with atomic_output(self.root / name, force=True) as tmp:
                tmp.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n")

    def failures(self) -> list[str]:
        return [f"{aid}: {'; '.join(e['failures'])}" for aid, e in self.data["artifacts"].items() if not e["passed"]]


def remove_stale_partials(root: Path) -> None:
    """Delete temporaries a killed run left (``.NAME.partial*``); final names are never partial."""
    import shutil

    if not root.exists():
        return
    for p in root.rglob(".*.partial*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.exists():
            p.unlink()


def replace_path(tmp: Path, final: Path) -> None:
    """Move a finished file or directory ``tmp`` to ``final``, replacing an older one without a gap of nothing."""
    import shutil

    final.parent.mkdir(parents=True, exist_ok=True)
    if final.is_dir():
        old = final.with_name(f".{final.name}.partial-old-{os.getpid()}")
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old)
    else:
        os.replace(tmp, final)
