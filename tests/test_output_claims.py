"""One run per output name, never an output inside an input, SIGTERM cleans up like Ctrl-C (qconvert.io.atomic)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from model_helpers import tree_digest

from qconvert.cli import main
from qconvert.errors import OutputError
from qconvert.gguf.reader import read_gguf
from qconvert.io.atomic import atomic_output, claim_output


def _slow_gguf(argv: list[str], sleep: float) -> subprocess.Popen:
    """``qconvert ARGV`` in a child whose GGUF writer sleeps ``sleep`` s after each tensor (patched from outside)."""
    launcher = ("import runpy, sys, time\n"
                "from qconvert.gguf.writer import GGUFWriter\n"
                "write = GGUFWriter.write_tensor\n"
                "def slow_write(self, *a, **k):\n"
                "    write(self, *a, **k)\n"
                f"    time.sleep({sleep})\n"
                "GGUFWriter.write_tensor = slow_write\n"
                f"sys.argv = {['qconvert', *argv]!r}; runpy.run_module('qconvert', run_name='__main__', alter_sys=True)")
    return subprocess.Popen([sys.executable, "-c", launcher], stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.05)
    assert predicate(), f"{what} never happened: {proc.communicate()[1].decode() if proc.poll() is not None else ''}"


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def model_copy(model_dir, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(model_dir("tiny-tied"), dst)
    return dst


def test_two_runs_on_one_output_one_wins_the_other_fails_at_once(model_copy, tmp_path, capsys):
    out = tmp_path / "same.gguf"
    argv = ["gguf", "--model", str(model_copy), "--type", "Q8_0", "--output", str(out), "--quiet"]
    first = _slow_gguf(argv, 0.3)
    try:
        _wait_for(lambda: (tmp_path / ".same.gguf.lock").exists() and list(tmp_path.glob(".same.gguf.partial-*")),
                  first, "the first run's claim")
        for extra in ([], ["--force"]):  # --force does not take a name another live run has claimed
            start = time.perf_counter()
            assert main([*argv, *extra]) == 2
            err = capsys.readouterr().err
            assert f"another qconvert run (pid {first.pid}) is writing {out}" in err, err
            assert "wait for it or choose another output" in err
            assert time.perf_counter() - start < 30 and first.poll() is None  # refused while the first still writes
        assert not out.exists()
    finally:
        _, err = first.communicate(timeout=300)
    assert first.returncode == 0, err.decode()
    g = read_gguf(out)
    assert g.metadata["general.file_type"] == 7  # MOSTLY_Q8_0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "same.gguf"]  # no lock, no temporary left


def test_output_that_is_an_input_file_is_refused_even_with_force(model_copy, capsys):
    before = tree_digest(model_copy)
    code = main(["gguf", "--model", str(model_copy), "--type", "Q8_0", "--output", str(model_copy / "model.safetensors"),
                 "--force", "--quiet"])
    assert code == 2
    err = capsys.readouterr().err
    assert "is inside the input" in err and "outside the input" in err, err
    assert tree_digest(model_copy) == before
    assert not [p.name for p in model_copy.iterdir() if p.name.startswith(".")]  # no lock, no temporary


def test_output_through_a_symlinked_directory_is_refused(model_copy, tmp_path, capsys):
    link = tmp_path / "link"
    link.symlink_to(model_copy)
    code = main(["gguf", "--model", str(model_copy), "--type", "Q8_0", "--output", str(link / "x.gguf"), "--quiet"])
    assert code == 2 and "is inside the input" in capsys.readouterr().err
    assert not (model_copy / "x.gguf").exists()


def test_gptq_output_inside_its_source_is_refused(model_copy, capsys):
    before = tree_digest(model_copy)
    code = main(["gptq", "--model", str(model_copy), "--out-dir", str(model_copy), "--device", "cpu", "--no-eval",
                 "--quiet"])
    assert code == 2
    assert "is inside the input" in capsys.readouterr().err
    assert tree_digest(model_copy) == before
    assert not [p for p in model_copy.iterdir() if "gptq" in p.name or p.name.startswith(".")]


def test_an_output_directory_that_contains_the_input_is_refused(model_copy, tmp_path):
    from qconvert.io.atomic import StagedDirectory

    with pytest.raises(OutputError, match="contains the input"):
        StagedDirectory(tmp_path, force=True, inputs=(model_copy,))
    assert model_copy.is_dir()


def test_sigterm_mid_write_leaves_nothing(model_dir, tmp_path):
    out = tmp_path / "out"
    proc = _slow_gguf(["gguf", "--model", str(model_dir("tiny-80")), "--type", "Q8_0", "--out-dir", str(out),
                       "--quiet"], 0.2)
    _wait_for(lambda: any(p.stat().st_size > 0 for p in out.glob(".*partial*")) if out.exists() else False, proc,
              "writing")
    partial = next(out.glob(".*partial*"))
    header = partial.stat().st_size
    _wait_for(lambda: not partial.exists() or partial.stat().st_size > header, proc, "tensor data")
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err.decode()
    assert b"terminated" in err and b"Traceback" not in err
    assert list(out.iterdir()) == []


def test_temporaries_of_dead_runs_are_removed_by_the_next_run(model_copy, tmp_path, capsys):
    out = tmp_path / "x.gguf"
    dead, alive = _dead_pid(), 1  # pid 1 always runs
    stale = tmp_path / f".x.gguf.partial-{dead}"
    stale.write_bytes(b"GGUF half")
    live = tmp_path / f".x.gguf.partial-{alive}"
    live.write_bytes(b"someone else")
    other = tmp_path / f".y.gguf.partial-{dead}"  # another name's temporary: not this run's business
    other.write_bytes(b"y")
    (tmp_path / ".x.gguf.lock").write_text(f"{dead}\n")  # a lock file a killed run left: taken over
    assert main(["gguf", "--model", str(model_copy), "--type", "Q8_0", "--output", str(out), "--quiet"]) == 0
    assert not stale.exists() and live.exists() and other.exists()
    assert not (tmp_path / ".x.gguf.lock").exists()
    assert read_gguf(out).metadata["general.file_type"] == 7


def test_dead_partial_directory_is_removed_by_the_directory_writer(model_copy, tmp_path):
    from qconvert.io.atomic import StagedDirectory

    stale = tmp_path / f".q.partial-{_dead_pid()}"
    (stale / "sub").mkdir(parents=True)
    staged = StagedDirectory(tmp_path / "q", inputs=(model_copy,))
    assert not stale.exists() and staged.tmp.is_dir()
    (staged.tmp / "f").write_text("x")
    assert staged.commit() == tmp_path / "q" and (tmp_path / "q" / "f").read_text() == "x"
    assert not (tmp_path / ".q.lock").exists()


def test_a_published_directory_has_the_usual_permissions(model_copy, tmp_path):
    """safetensors writes 0600 files and tempfile makes 0700 directories: a published checkpoint is readable by
    others as the umask allows, like any file the user makes."""
    import stat
    import tempfile

    import torch
    from safetensors.torch import save_file

    from qconvert.io.atomic import StagedDirectory

    old = os.umask(0o022)
    try:
        staged = StagedDirectory(tmp_path / "q", inputs=(model_copy,))
        save_file({"w": torch.zeros(2)}, str(staged.tmp / "model.safetensors"))
        sub = Path(tempfile.mkdtemp(dir=staged.tmp))
        (sub / "x").write_text("x")
        os.chmod(sub / "x", 0o600)
        (staged.tmp / "link").symlink_to("model.safetensors")
        final = staged.commit()
    finally:
        os.umask(old)
    assert stat.S_IMODE((final / "model.safetensors").stat().st_mode) == 0o644
    assert stat.S_IMODE((final / sub.name / "x").stat().st_mode) == 0o644
    assert stat.S_IMODE((final / sub.name).stat().st_mode) == 0o755
    assert stat.S_IMODE(final.stat().st_mode) == 0o755


def test_a_file_that_appears_meanwhile_is_not_replaced(tmp_path):
    final = tmp_path / "f.bin"
    with pytest.raises(OutputError, match="appeared while it was being written"), atomic_output(final) as tmp:
        tmp.write_bytes(b"mine")
        final.write_bytes(b"theirs")  # another program, not a qconvert run (those are held off by the claim)
    assert final.read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]
    with atomic_output(final, force=True) as tmp:
        tmp.write_bytes(b"mine")
    assert final.read_bytes() == b"mine"


def test_claims_are_reentrant_in_one_thread_only(tmp_path):
    import threading

    final = tmp_path / "f.bin"
    errors: list[BaseException] = []
    with claim_output(final):
        with claim_output(final):  # a pipeline claims early, its writer claims again
            pass
        assert (tmp_path / ".f.bin.lock").read_text().strip() == str(os.getpid())

        def other() -> None:
            try:
                claim_output(final)
            except OutputError as e:
                errors.append(e)

        t = threading.Thread(target=other)
        t.start()
        t.join()
    assert len(errors) == 1 and "another thread" in str(errors[0])
    assert not (tmp_path / ".f.bin.lock").exists()
    claim_output(final).release()  # free again


def test_save_imatrix_over_the_stats_it_reads_is_refused(tmp_path):
    from qconvert.pipelines.gguf import importance_matrix

    stats = tmp_path / "stats.safetensors"
    stats.write_bytes(b"not read: refused first")
    with pytest.raises(OutputError, match="is the input"):
        importance_matrix(tmp_path / "model", stats=stats, save_imatrix=stats, force=True)
    assert stats.read_bytes() == b"not read: refused first"


def test_lock_file_names_the_holder(tmp_path):
    final = tmp_path / "f.bin"
    script = ("import time; from qconvert.io.atomic import claim_output\n"
              f"c = claim_output({str(final)!r}); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == b"held"
        with pytest.raises(OutputError, match=f"pid {holder.pid}"):
            claim_output(final)
    finally:
        holder.kill()
        holder.wait()
    claim_output(final).release()  # the kernel dropped the dead holder's lock: taken over at once
    assert json.dumps(sorted(p.name for p in tmp_path.iterdir())) == "[]"
