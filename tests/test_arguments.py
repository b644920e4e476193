"""Issue 18, "Arguments": every numeric option is validated by argparse, every output path is checked before any
model work, a binary --calib file is refused, and free-space messages never say "0.00 GiB"."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from qconvert.cli import main
from qconvert.commands.argtypes import check_output_path, output_file
from qconvert.errors import OutputError
from qconvert.fixtures import fixture_path


@pytest.fixture(scope="module")
def model() -> str:
    return str(fixture_path("tiny-tied"))


def _base(cmd: str, model: str, out: Path) -> list[str]:
    if cmd == "verify":
        return ["verify", str(out / "missing.gguf"), "--reference", model, "--quiet"]
    argv = [cmd, "--model", model, "--out-dir", str(out), "--quiet"]
    if cmd == "onnx":
        argv += ["--precision", "int4"]
    if cmd != "gguf":
        argv += ["--device", "cpu"]
    return argv


BIG = str(2**70)
CALIB = [("--calib-samples", "0"), ("--calib-samples", str(10**9)), ("--calib-samples", "x"),
         ("--calib-seqlen", "1"), ("--calib-seqlen", "-5"), ("--seed", "-1"), ("--seed", BIG),
         ("--batch-size", "0"), ("--batch-size", "-3"), ("--batch-size", BIG)]
NUMERIC = [
    *[(cmd, opt, bad) for cmd in ("gguf", "gptq", "awq", "onnx") for opt, bad in CALIB],
    ("gguf", "--bits", "0"), ("gguf", "--bits", "99"),
    ("gptq", "--bits", "0"), ("gptq", "--bits", "99"),
    ("gptq", "--group-size", "0"), ("gptq", "--group-size", "-2"), ("awq", "--group-size", "0"),
    ("gptq", "--damp", "0"), ("gptq", "--damp", "1.5"), ("gptq", "--damp", "nan"),
    ("awq", "--search-samples", "-1"), ("awq", "--search-samples", str(10**9)),
    ("onnx", "--block-size", "0"), ("onnx", "--block-size", "48"),
    ("verify", "--ctx", "0"), ("verify", "--ctx", "1"), ("verify", "--ctx", BIG),
    ("verify", "--chunks", "0"), ("verify", "--chunks", BIG),
    ("verify", "--max-dppl", "x"), ("verify", "--max-kl", "1e"),  # range: qconvert.verify's gate check (test_verify)
    ("verify", "--baseline-tol-dppl", "pct"), ("verify", "--baseline-tol-kl", ""),
]


@pytest.mark.parametrize(("cmd", "option", "bad"), NUMERIC)
def test_bad_number_is_an_argparse_error(model: str, tmp_path: Path, capsys, cmd: str, option: str,
                                         bad: str) -> None:
    with pytest.raises(SystemExit) as e:  # argparse: before the command runs at all
        main([*_base(cmd, model, tmp_path), f"{option}={bad}"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert f"qconvert {cmd}: error: argument {option}" in err and "Traceback" not in err, err
    assert not any(tmp_path.iterdir())


def test_message_names_the_limit(model: str, tmp_path: Path, capsys) -> None:
    with pytest.raises(SystemExit):
        main([*_base("gptq", model, tmp_path), "--batch-size", "0"])
    assert "argument --batch-size: must be >= 1 (got 0)" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*_base("gptq", model, tmp_path), "--calib-samples", str(10**9)])
    assert "must be <= 100000" in capsys.readouterr().err


def test_good_numbers_still_parse() -> None:
    from qconvert.cli import build_parser

    args = build_parser().parse_args(["gptq", "--size", "0.5b", "--group-size", "-1", "--seed", str(2**32 - 1),
                                      "--damp", "0.05", "--calib-samples", "100000", "--batch-size", "1"])
    assert (args.group_size, args.seed, args.damp, args.calib_samples) == (-1, 2**32 - 1, 0.05, 100000)
    args = build_parser().parse_args(["verify", "a.gguf", "--reference", "0.5b", "--max-dppl", "0", "--ctx", "2"])
    assert args.max_dppl == 0.0 and args.ctx == 2


OUTPUTS = [("gguf", "--save-imatrix", "imatrix.gguf"), ("gguf", "--save-stats", "stats.pt"),
           ("gptq", "--save-stats", "stats.pt"), ("awq", "--save-stats", "stats.pt"),
           ("verify", "--json", "v.json"), ("verify", "--report", "report"),
           ("verify", "--write-baseline", "baseline.json"), ("verify", "--cache-dir", "cache")]


def _unwritable(tmp_path: Path) -> Path:
    """A directory under which nothing can be created: read-only, or (as root, who ignores modes) a plain file."""
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root
        ro.chmod(0o755)
        blocker = tmp_path / "file"
        blocker.write_text("")
        return blocker
    return ro


@pytest.mark.parametrize(("cmd", "option", "name"), OUTPUTS)
def test_unwritable_output_fails_before_model_work(model: str, tmp_path: Path, capsys, monkeypatch, cmd: str,
                                                   option: str, name: str) -> None:
    from qconvert.io import safetensors

    def no_model_work(*args: object, **kwargs: object) -> None:
        raise AssertionError("the model's weights were opened before the output paths were checked")

    monkeypatch.setattr(safetensors.SafetensorsCheckpoint, "__init__", no_model_work)
    bad = _unwritable(tmp_path) / name
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    try:
        rc = main([*_base(cmd, model, out), option, str(bad)])
    finally:
        (tmp_path / "ro").chmod(0o755)
    err = capsys.readouterr().err
    assert rc == 2 and option in err and "Traceback" not in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == before and not out.exists()
    assert not bad.exists()


def test_output_path_kinds(tmp_path: Path) -> None:
    (tmp_path / "d").mkdir()
    (tmp_path / "f").write_text("")
    with pytest.raises(OutputError, match="is a directory"):
        check_output_path(tmp_path / "d", option="--json")
    with pytest.raises(OutputError, match="not a directory"):
        check_output_path(tmp_path / "f", option="--report", directory=True)
    check_output_path(tmp_path / "new" / "deeper" / "x.json", option="--json")  # creatable: fine
    check_output_path(tmp_path / "f", option="--json")  # an existing file may be replaced
    assert not (tmp_path / "new").exists()  # the check creates nothing


@pytest.mark.parametrize("payload", [b"text\x00with a NUL byte\n" * 50, b"\xff\xfe\x00\x01binary" * 50])
def test_binary_calib_file_is_refused(model: str, tmp_path: Path, capsys, payload: bytes) -> None:
    from qconvert.calibset import CalibrationDataError, load_calibration

    calib = tmp_path / "data.txt"
    calib.write_bytes(payload)
    with pytest.raises(CalibrationDataError, match="not UTF-8 text"):
        load_calibration(str(calib), Path(model), chat=False)
    out = tmp_path / "out"
    rc = main(["gguf", "--model", model, "--calib", str(calib), "--type", "Q8_0", "--out-dir", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "not UTF-8 text" in err and "Traceback" not in err, err
    assert not out.exists() or not list(out.glob("*.gguf"))


def test_free_space_message_uses_a_readable_unit(tmp_path: Path, monkeypatch) -> None:
    import shutil

    from qconvert.io import atomic

    monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9, 1000))  # type: ignore[attr-defined]
    with pytest.raises(OutputError) as e:
        atomic.check_free_space(tmp_path / "x.gguf", 3 * 2**20)
    msg = str(e.value)
    assert "3.00 MiB" in msg and "1000 bytes" in msg and "0.00 GiB" not in msg
    assert atomic.format_size(5000) == "4.88 KiB" and atomic.format_size(2**31) == "2.00 GiB"


def test_output_file_rules(tmp_path: Path) -> None:
    """--output is its own path; a trailing '/' or an existing directory takes the default name; never with --out-dir."""
    (tmp_path / "existing").mkdir()
    assert output_file(None, None, "a.gguf") == Path("a.gguf")
    assert output_file(None, tmp_path, "a.gguf") == tmp_path / "a.gguf"
    assert output_file(str(tmp_path / "x.gguf"), None, "a.gguf") == tmp_path / "x.gguf"
    assert output_file(f"{tmp_path}/new/", None, "a.gguf") == tmp_path / "new" / "a.gguf"
    assert output_file(str(tmp_path / "existing"), None, "a.gguf") == tmp_path / "existing" / "a.gguf"
    with pytest.raises(OutputError, match="both given.*give one of them"):
        output_file("x.gguf", tmp_path, "a.gguf")
    with pytest.raises(OutputError, match="empty"):
        output_file("", None, "a.gguf")


def test_gguf_output_directory_and_conflict(model: str, tmp_path: Path, capsys) -> None:
    """``--output DIR/`` writes the default name inside DIR (created); ``--output`` with ``--out-dir`` exits 2
    and writes nothing."""
    rc = main(["gguf", "--model", model, "--bits", "8", "--output", f"{tmp_path}/made/", "--quiet"])
    assert rc == 0
    made = [p.name for p in (tmp_path / "made").iterdir()]
    assert len(made) == 1 and made[0].endswith("-q8_0.gguf") and Path(model).name in made[0], made
    capsys.readouterr()
    rc = main(["gguf", "--model", model, "--bits", "8", "--output", str(tmp_path / "x.gguf"),
               "--out-dir", str(tmp_path / "other"), "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "give one of them" in err and "Traceback" not in err, err
    assert not (tmp_path / "x.gguf").exists() and not (tmp_path / "other").exists()


@pytest.mark.parametrize("cmd", ["gguf", "gptq", "awq", "w8a8", "onnx", "verify", "release", "info",
                                 "convert-format", "demo"])
def test_every_help_renders(cmd: str, capsys) -> None:
    """--help exits 0 and prints plain text (a stray % in a help string makes argparse print its internals)."""
    with pytest.raises(SystemExit) as e:
        main([cmd, "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "option_strings" not in out and f"qconvert {cmd}" in out, out[-500:]
