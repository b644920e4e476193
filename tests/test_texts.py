"""Contracts of the texts qconvert ships (qconvert.texts, the top-level calib/ directory).

* The evaluation text is frozen: the file equals what the fixtures' corpus generator made (byte for byte, so
  published perplexities and token hashes stay valid), its sha256 is the recorded one, and a damaged or missing
  file is an error that says how to restore it.
* Packaging: the wheel holds calib/ as ``qconvert/calibdata/`` (and no top-level ``calib``), and the texts read
  the same from the wheel, from an editable install and from a source checkout that is not installed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from qconvert import texts
from qconvert.texts import (
    CALIBRATION_FILES,
    EVALUATION_FILE,
    EVALUATION_SHA256,
    TextDataError,
    calibration_documents,
    evaluation_text,
)

REPO = Path(__file__).resolve().parent.parent


def test_evaluation_text_is_the_frozen_held_out_split() -> None:
    from qconvert.fixtures.corpus import eval_text, generated_eval_text
    from qconvert.verify.tokens import default_text

    frozen = (REPO / "calib" / Path(*EVALUATION_FILE)).read_bytes()
    assert hashlib.sha256(frozen).hexdigest() == EVALUATION_SHA256
    assert evaluation_text().encode("utf-8") == frozen  # read as bytes: no newline translation
    assert generated_eval_text() == evaluation_text() == eval_text() == default_text()


def test_calibration_documents_come_from_calib() -> None:
    docs = calibration_documents()
    assert len(docs) == 198 and all(request and answer for request, answer in docs)
    first = (REPO / "calib" / CALIBRATION_FILES[0]).read_text(encoding="utf-8")
    assert first.startswith(f"### {docs[0][0]}\n")


@pytest.mark.parametrize("damage, needle", [("edit", "is damaged: its sha256 is"), ("delete", "is missing")])
def test_a_damaged_evaluation_text_says_how_to_restore_it(damage: str, needle: str, tmp_path: Path,
                                                         monkeypatch) -> None:
    root = tmp_path / "calib"
    shutil.copytree(REPO / "calib", root)
    path = root / Path(*EVALUATION_FILE)
    if damage == "edit":
        path.write_bytes(path.read_bytes().replace(b"\n", b"\r\n", 1))  # one byte more: what a CRLF checkout does
    else:
        path.unlink()
    monkeypatch.setattr(texts, "texts_root", lambda: root)
    evaluation_text.cache_clear()
    try:
        with pytest.raises(TextDataError, match=needle) as e:
            evaluation_text()
        assert "git checkout -- calib/" in str(e.value) and "reinstall" in str(e.value).lower()
    finally:
        evaluation_text.cache_clear()


# -- packaging ----------------------------------------------------------------------------------------------------

# Run with -S (no site-packages: only the stdlib and the sys.path given) from outside the source tree.
PROBE = """
import importlib.util, json, sys
for p in {paths!r}:
    __import__("site").addsitedir(p) if p.endswith("site-packages") else sys.path.insert(0, p)
from qconvert import texts
spec = importlib.util.find_spec("qconvert.calibdata")
print(json.dumps({{"root": str(texts.texts_root()), "package": spec.origin if spec else None,
                  "eval": len(texts.evaluation_text()), "docs": len(texts.calibration_documents())}}))
"""


def _probe(paths: list[str], cwd: Path) -> dict:
    out = subprocess.run([sys.executable, "-S", "-c", PROBE.format(paths=paths)], cwd=cwd, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout)


def _source_copy(dest: Path) -> Path:
    """What a wheel is built from: pyproject.toml, README.md, qconvert/ and calib/ (no caches, no egg-info)."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    for name in ("qconvert", "calib"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    return dest


def _pip(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args, "--no-deps",
                    "--no-build-isolation"], check=True, capture_output=True)


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    pytest.importorskip("setuptools", reason="builds without isolation use the environment's setuptools (offline)")
    return _source_copy(tmp_path_factory.mktemp("source"))


def test_wheel_ships_calib_inside_qconvert_and_no_top_level_calib(source: Path, tmp_path: Path) -> None:
    _pip("wheel", "-w", str(tmp_path / "dist"), str(source))
    (wheel,) = (tmp_path / "dist").glob("qconvert-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        top_level = next(z.read(n) for n in names if n.endswith(".dist-info/top_level.txt")).decode().split()
        z.extractall(tmp_path / "site")
    assert top_level == ["qconvert"]
    assert not {n for n in names if n.split("/")[0] not in ("qconvert", wheel.name.split("-py3")[0] + ".dist-info")}
    data = {"qconvert/calibdata/__init__.py", "qconvert/calibdata/eval/qconvert-eval-v1.txt"}
    assert data | {f"qconvert/calibdata/{name}" for name in CALIBRATION_FILES} <= names
    packages = {p.parent.relative_to(source).as_posix() for p in (source / "qconvert").rglob("__init__.py")}
    missing = {p for p in packages if f"{p}/__init__.py" not in names}
    assert not missing, (f"packages missing from the wheel: {sorted(missing)}; add them to [tool.setuptools] "
                         "packages in pyproject.toml")
    got = _probe([str(tmp_path / "site")], cwd=tmp_path)  # installing a pure wheel = unpacking it
    assert got["root"] == str(tmp_path / "site" / "qconvert" / "calibdata")
    assert got["package"] == got["root"] + "/__init__.py"
    assert got["eval"] == len(evaluation_text()) and got["docs"] == len(calibration_documents())


def test_editable_install_and_source_checkout_read_calib(source: Path, tmp_path: Path) -> None:
    # --ignore-installed: without it pip uninstalls the qconvert of the environment running the tests first
    _pip("install", "--ignore-installed", "--prefix", str(tmp_path / "prefix"), "-e", str(source))
    (site,) = (tmp_path / "prefix").glob("lib/python*/site-packages")
    editable = _probe([str(site)], cwd=tmp_path)
    assert editable["package"] == str(source / "calib" / "__init__.py")  # the package-dir mapping, not a fallback
    checkout = _probe([str(source)], cwd=tmp_path)  # PYTHONPATH=<checkout>, nothing installed
    assert checkout["package"] is None and checkout["root"] == str(source / "calib")
    for got in (editable, checkout):
        assert got["eval"] == len(evaluation_text()) and got["docs"] == len(calibration_documents())
