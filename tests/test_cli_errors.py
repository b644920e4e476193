"""Bad input -> a clear error, exit code != 0, the source untouched, nothing left under the output name."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from model_helpers import tree_digest

from qconvert.cli import main


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model_dir("tiny-untied"), dst)
    return dst


def _run(args, capsys) -> tuple[int, str]:
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def _assert_failed_cleanly(code, err, out_dir: Path, *needles: str) -> None:
    assert code != 0
    assert err.splitlines()[-1].startswith("qconvert: error: "), err
    for needle in needles:
        assert needle in err, f"{needle!r} not in {err!r}"
    assert not any(out_dir.glob("*")) if out_dir.exists() else True, list(out_dir.glob("*"))


def _truncate_shard(d: Path) -> None:
    f = max(d.glob("*.safetensors"))
    f.write_bytes(f.read_bytes()[:-1000])


def _drop_architectures(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    del cfg["architectures"]
    (d / "config.json").write_text(json.dumps(cfg))


def _llama_arch(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (d / "config.json").write_text(json.dumps(cfg))


def _wrong_shape(d: Path) -> None:
    cfg = json.loads((d / "config.json").read_text())
    cfg["intermediate_size"] += 256
    (d / "config.json").write_text(json.dumps(cfg))


def _corrupt_header(d: Path) -> None:
    f = min(d.glob("*.safetensors"))
    raw = bytearray(f.read_bytes())
    raw[8:16] = b"\xff" * 8
    f.write_bytes(bytes(raw))


def _nan_weight(d: Path) -> None:
    from qconvert.io.safetensors import SafetensorsCheckpoint

    e = SafetensorsCheckpoint(d).entries["model.layers.1.mlp.up_proj.weight"]
    raw = bytearray(e.file.read_bytes())
    raw[e.start + 100:e.start + 102] = b"\xc0\x7f"  # bf16 quiet NaN
    e.file.write_bytes(bytes(raw))


DAMAGES = {
    "nan weights": (_nan_weight, ["model.layers.1.mlp.up_proj.weight", "NaN"]),
    "truncated shard": (_truncate_shard, ["truncated", "Re-download"]),
    "corrupt header": (_corrupt_header, ["not valid JSON", "re-download"]),
    "missing shard": (lambda d: min(d.glob("*.safetensors")).unlink(), ["missing", "incomplete"]),
    "no architectures": (_drop_architectures, ["architectures", "Qwen2ForCausalLM"]),
    "unsupported arch": (_llama_arch, ["LlamaForCausalLM", "supports: Qwen2ForCausalLM"]),
    "missing tokenizer": (lambda d: (d / "tokenizer.json").unlink(), ["tokenizer.json is missing", "copy tokenizer.json"]),
    "shape disagrees": (_wrong_shape, ["config.json implies", "does not belong"]),
    "pickle only": (lambda d: [f.unlink() for f in d.glob("*.safetensors*")] and (d / "pytorch_model.bin").write_bytes(b"x"),
                    ["pickle", "safe_serialization"]),
}


@pytest.mark.parametrize("damage", list(DAMAGES))
def test_damaged_checkpoint_fails_cleanly(model_copy, tmp_path, capsys, damage):
    fn, needles = DAMAGES[damage]
    fn(model_copy)
    before = tree_digest(model_copy)
    out = tmp_path / "out"
    code, err = _run(["gguf", "--model", model_copy, "--type", "Q4_K_M", "--out-dir", out], capsys)
    _assert_failed_cleanly(code, err, out, *needles)
    assert tree_digest(model_copy) == before, "the source checkpoint was modified"


@pytest.mark.parametrize("args, needles", [
    (["--bits", "7"], ["--bits 7 is not supported", "5 (Q5_K_M)"]),
    (["--type", "Q7_K"], ["unknown quantization preset", "Q5_K_M"]),
    (["--tensor-type", "attn_v"], ["REGEX=TYPE"]),
    (["--output-tensor-type", "q9_9"], ["unknown tensor type"]),
])
def test_bad_options(model_copy, tmp_path, capsys, args, needles):
    out = tmp_path / "out"
    code, err = _run(["gguf", "--model", model_copy, "--out-dir", out, *args], capsys)
    _assert_failed_cleanly(code, err, out, *needles)


def test_existing_output_is_kept_without_force(model_copy, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    target = out / "model-q8_0.gguf"
    target.write_bytes(b"precious")
    code, err = _run(["gguf", "--model", model_copy, "--type", "Q8_0", "--out-dir", out], capsys)
    assert code != 0 and "--force" in err
    assert target.read_bytes() == b"precious"
    assert _run(["gguf", "--model", model_copy, "--type", "Q8_0", "--out-dir", out, "--force", "--quiet"], capsys)[0] == 0
    assert target.read_bytes()[:4] == b"GGUF"


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], capture_output=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.decode().strip()})")


def test_unwritable_output_dir(model_copy, tmp_path, capsys):
    """A read-only filesystem: unwritable even for root (CI runs as root, so chmod would prove nothing)."""
    out = tmp_path / "ro"
    _mount_tmpfs(out, "ro,size=64k")
    try:
        code, err = _run(["gguf", "--model", model_copy, "--out-dir", out], capsys)
    finally:
        subprocess.run(["umount", str(out)], check=False)
    assert code != 0 and "not writable" in err


def test_output_dir_that_is_a_file(model_copy, tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    code, err = _run(["gguf", "--model", model_copy, "--out-dir", blocker / "sub"], capsys)
    assert code != 0 and "cannot create output directory" in err


@pytest.fixture
def tiny_filesystem(tmp_path):
    """A 256 KiB tmpfs: a real out-of-space condition (needs mount rights, as root in CI)."""
    mnt = tmp_path / "small"
    _mount_tmpfs(mnt, "size=256k")
    yield mnt
    subprocess.run(["umount", str(mnt)], check=False)


def test_too_little_space_is_refused_before_writing(model_copy, tiny_filesystem, capsys):
    code, err = _run(["gguf", "--model", model_copy, "--type", "F32", "--out-dir", tiny_filesystem, "--quiet"], capsys)
    assert code != 0 and "is free" in err and "--out-dir" in err
    assert list(tiny_filesystem.iterdir()) == []


def test_disk_full_mid_write(model_copy, tiny_filesystem, capsys, monkeypatch):
    """The space check passes (the disk fills up during the run, as when another job writes): still nothing left."""
    monkeypatch.setattr("qconvert.io.atomic.shutil.disk_usage", lambda path: shutil._ntuple_diskusage(2**40, 0, 2**40))
    code, err = _run(["gguf", "--model", model_copy, "--type", "F32", "--out-dir", tiny_filesystem, "--quiet"], capsys)
    assert code != 0 and "no space left" in err
    assert list(tiny_filesystem.iterdir()) == []


def test_ctrl_c_mid_write_leaves_nothing(model_dir, tmp_path):
    """SIGINT while the file is being written: exit 130, no file under the final name, no temporary left."""
    out = tmp_path / "out"
    # `python -m qconvert ...` with Python's own Ctrl-C handler installed first: a test runner started in the
    # background (`cmd &` in a script) ignores SIGINT, its children inherit that, and Python then installs none.
    # The child's GGUF writer sleeps 0.2 s after each tensor (patched here, from the outside) so the signal lands
    # mid-write.
    argv = ["qconvert", "gguf", "--model", str(model_dir("tiny-80")), "--type", "Q8_0", "--out-dir", str(out),
            "--quiet"]
    launcher = ("import runpy, signal, sys, time; signal.signal(signal.SIGINT, signal.default_int_handler)\n"
                "from qconvert.gguf.writer import GGUFWriter\n"
                "write = GGUFWriter.write_tensor\n"
                "def slow_write(self, *a, **k):\n"
                "    write(self, *a, **k)\n"
                "    time.sleep(0.2)\n"
                "GGUFWriter.write_tensor = slow_write\n"
                f"sys.argv = {argv!r}; runpy.run_module('qconvert', run_name='__main__', alter_sys=True)")
    proc = subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline and not list(out.glob(".*partial*")):
        time.sleep(0.05)
    partial = list(out.glob(".*partial*"))
    assert partial, "the conversion never started writing"
    header = partial[0].stat().st_size
    # signal once tensor data flows (the first tensor may compile a kernel; a loaded machine makes that slow)
    while time.time() < deadline and partial[0].exists() and partial[0].stat().st_size <= header:
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err.decode()
    assert b"interrupted" in err
    assert list(out.iterdir()) == []


def test_dry_run_from_published_shapes(capsys, tmp_path, monkeypatch):
    """--size --dry-run needs no weights: the plan and size come from the seed table (anchor: 1.5B Q5_K_M 1.125 GB)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    assert main(["gguf", "--size", "1.5b", "--bits", "5", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "predicted file size: 1.125 GB" in out
    assert main(["gguf", "--size", "0.5b", "--bits", "4", "--dry-run"]) == 0
    captured = capsys.readouterr()
    assert "144 of 290 tensor(s) required fallback quantization" in captured.err
