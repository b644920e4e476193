"""Hostile GGUF files: qconvert refuses each with a clear error (exit 2) and never hangs or lets llama.cpp abort.

Each hostile file is a valid GGUF written by qconvert (the tiny-tied fixture, BF16) with one field changed: in
place at its byte offset for the container fields, or re-written through ``GGUFWriter`` for metadata values.
``qconvert verify`` runs in a child process with a timeout: a GGUF with ``block_count = 0`` once reached llama.cpp,
whose assert forked gdb onto the process and hung it for 14 minutes. A seeded fuzz loop checks that any damage to
a header ends in a clean parse or a ``CheckpointError``, in bounded memory and time.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from qconvert.cli import main
from qconvert.constants import GGMLType, ValueType
from qconvert.errors import CheckpointError
from qconvert.gguf.reader import read_gguf
from qconvert.gguf.writer import GGUFWriter

ROOT = Path(__file__).resolve().parents[1]


def _field(raw: bytes, name: str) -> int:
    """Byte offset just past the one GGUF string ``name`` (a metadata key or tensor name) in the header."""
    enc = name.encode()
    needle = struct.pack("<Q", len(enc)) + enc
    assert raw.count(needle) == 1, f"{name!r} is not unique in the header"
    return raw.index(needle) + len(needle)


def _patch(raw: bytes, at: int, fmt: str, value: object) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, at, value)
    return bytes(out)


def _tensor_fields(raw: bytes, name: str) -> tuple[int, int, int]:
    """(offset of n_dims, offset of the type id, offset of the data offset) of tensor ``name``'s info."""
    at = _field(raw, name)
    (n_dims,) = struct.unpack_from("<I", raw, at)
    type_at = at + 4 + 8 * n_dims
    return at, type_at, type_at + 4


def _rewrite(src: Path, dst: Path, changes: dict[str, tuple[ValueType, object]]) -> Path:
    """Copy ``src`` through GGUFWriter with some metadata values replaced or added (key -> (type, value))."""
    g = read_gguf(src)
    w = GGUFWriter(dst)
    for key, value in g.metadata.items():
        vtype, new = changes.get(key, (g.value_types[key], value))
        w.add(key, vtype, new, g.elem_types.get(key))
    for key, (vtype, value) in changes.items():
        if key not in g.metadata:
            w.add(key, vtype, value)
    for t in g.tensors.values():
        w.add_tensor_info(t.name, t.shape, t.type)
    w.write_header()
    for name in g.tensors:
        w.write_tensor(name, g.read_tensor_bytes(name))
    w.close()
    return dst


def _in_place(edit: Callable[[bytes], bytes]) -> Callable[[Path, Path], Path]:
    def make(src: Path, dst: Path) -> Path:
        dst.write_bytes(edit(src.read_bytes()))
        return dst
    return make


def _kv(key: str, vtype: ValueType, value: object) -> Callable[[Path, Path], Path]:
    return lambda src, dst: _rewrite(src, dst, {key: (vtype, value)})


def _array_len(raw: bytes) -> bytes:  # tokenizer.ggml.tokens: type u32, element type u32, then the length u64
    return _patch(raw, _field(raw, "tokenizer.ggml.tokens") + 8, "<Q", 2**60)


def _nested(raw: bytes) -> bytes:
    return _patch(raw, _field(raw, "tokenizer.ggml.tokens") + 4, "<I", ValueType.ARRAY)


def _offset(raw: bytes, value: int) -> bytes:
    return _patch(raw, _tensor_fields(raw, "blk.1.ffn_norm.weight")[2], "<Q", value)


def _row(raw: bytes) -> bytes:  # attn_k.bias has 128 weights per row, Q4_K blocks hold 256
    return _patch(raw, _tensor_fields(raw, "blk.0.attn_k.bias")[1], "<I", GGMLType.Q4_K)


def _dim0(raw: bytes) -> bytes:
    return _patch(raw, _tensor_fields(raw, "blk.0.ffn_up.weight")[0] + 4, "<Q", 0)


# case -> (how to make it from the valid file, words the error message must contain)
CASES: dict[str, tuple[Callable[[Path, Path], Path], str]] = {
    "block_count_0": (_kv("qwen2.block_count", ValueType.UINT32, 0), "qwen2.block_count is 0"),
    "block_count_mismatch": (_kv("qwen2.block_count", ValueType.UINT32, 5), "block_count is 5, but the file holds"),
    "context_length_0": (_kv("qwen2.context_length", ValueType.UINT32, 0), "qwen2.context_length is 0"),
    "token_type_short": (_kv("tokenizer.ggml.token_type", ValueType.ARRAY, [1, 1]), "per token (2304)"),
    "string_length": (_in_place(lambda raw: _patch(raw, _field(raw, "general.architecture") + 4, "<Q", 10**9)),
                      "needs at least 1000000000 bytes"),
    "heads_not_dividing": (_kv("qwen2.attention.head_count", ValueType.UINT32, 3), "not divisible"),
    "alignment_0": (_kv("general.alignment", ValueType.UINT32, 0), "general.alignment is 0, not a power of two"),
    "alignment_3": (_kv("general.alignment", ValueType.UINT32, 3), "general.alignment is 3, not a power of two"),
    "alignment_string": (_kv("general.alignment", ValueType.STRING, "32"), "general.alignment is a STRING"),
    "tensor_count": (_in_place(lambda raw: _patch(raw, 8, "<Q", 10**12)), "the tensor count is 1000000000000"),
    "kv_count": (_in_place(lambda raw: _patch(raw, 16, "<Q", 2**62)), "the metadata key count is"),
    "array_length": (_in_place(_array_len), "2^30"),
    "nested_array": (_in_place(_nested), "array of arrays"),
    "unknown_value_type": (_in_place(lambda raw: _patch(raw, _field(raw, "qwen2.block_count"), "<I", 99)),
                           "unknown value type 99"),
    "offset_outside": (_in_place(lambda raw: _offset(raw, 1 << 40)), "ends past the end of the file"),
    "offset_misaligned": (_in_place(lambda raw: _offset(raw, 32 * 1000 + 1)), "not a multiple of the alignment 32"),
    "offset_overlap": (_in_place(lambda raw: _offset(raw, 0)), "overlap"),
    "row_not_whole_blocks": (_in_place(_row), "not a multiple of Q4_K's block size 256"),
    "dim_0": (_in_place(_dim0), "has a dimension of 0"),
    "n_dims_0": (_in_place(lambda raw: _patch(raw, _tensor_fields(raw, "output_norm.weight")[0], "<I", 0)),
                 "has 0 dimensions"),
    "duplicate_token": (lambda src, dst: _rewrite(src, dst, {"tokenizer.ggml.tokens": (
        ValueType.ARRAY, ["!", *read_gguf(src).metadata["tokenizer.ggml.tokens"][1:-1], "!"])}), "twice"),
}


@pytest.fixture(scope="module")
def hostile(float_gguf, tmp_path_factory) -> dict[str, Path]:
    src = float_gguf("tiny-tied", "BF16")
    root = tmp_path_factory.mktemp("hostile")
    return {case: make(src, root / f"{case}.gguf") for case, (make, _) in CASES.items()}


def test_the_valid_source_parses(float_gguf):
    g = read_gguf(float_gguf("tiny-tied", "BF16"))
    assert g.metadata["qwen2.block_count"] == 2 and "blk.1.ffn_norm.weight" in g.tensors


@pytest.mark.parametrize("case", list(CASES))
def test_reader_refuses(hostile, case):
    with pytest.raises(CheckpointError, match="Re-create"):
        read_gguf(hostile[case])


@pytest.mark.parametrize("case", list(CASES))
def test_info_exits_2_naming_the_problem(hostile, case, capsys):
    assert main(["info", str(hostile[case])]) == 2
    err = capsys.readouterr().err
    assert CASES[case][1] in err and "Traceback" not in err, err


# Runs in a child process: `qconvert verify` and the llama.cpp entry points on every hostile file.
VERIFY_ALL = textwrap.dedent("""
    import contextlib, io, json, sys
    from pathlib import Path
    from qconvert.cli import main
    from qconvert.errors import CheckpointError
    from qconvert.runtimes import llamacpp
    files, reference = json.loads(sys.argv[1]), sys.argv[2]
    out = {}
    for case, path in files.items():
        err = io.StringIO()
        with contextlib.redirect_stderr(err):
            rc = main(["verify", path, "--reference", reference])
        refused = []
        for load in (lambda: llamacpp.LlamaCppModel(Path(path), vocab_only=True),
                     lambda: llamacpp.llama_quantize(Path(path), Path(path + ".q"), 7)):
            try:
                load()
            except CheckpointError as e:
                refused.append(str(e))
        out[case] = [rc, err.getvalue(), refused]
    print(json.dumps(out))
""")


@pytest.fixture(scope="module")
def verified(hostile, model_dir) -> dict[str, list]:
    files = {case: str(path) for case, path in hostile.items()}
    proc = subprocess.run([sys.executable, "-c", VERIFY_ALL, json.dumps(files), str(model_dir("tiny-tied"))],
                          check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.splitlines()[-1])


@pytest.mark.parametrize("case", list(CASES))
def test_verify_exits_2_and_llamacpp_never_sees_the_file(verified, case):
    rc, err, refused = verified[case]
    assert rc == 2 and CASES[case][1] in err and "Traceback" not in err, err
    assert len(refused) == 2 and all(CASES[case][1] in e for e in refused), refused


ABORT = textwrap.dedent("""
    import ctypes, sys
    from pathlib import Path
    from qconvert.io.atomic import atomic_output
    from qconvert.runtimes.native import ggml_base
    abort = ggml_base().ggml_abort
    abort.argtypes = [ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p]
    with atomic_output(Path(sys.argv[1])) as tmp:
        tmp.write_bytes(b"half a file")
        print(tmp, flush=True)
        abort(b"ggml.c", 1, b"GGML_ASSERT(n_layer > 0) failed")
""")


def test_a_llamacpp_abort_is_a_clean_exit_2(tmp_path):
    """The last line of defence: an assert qconvert does not pre-check ends the process at once (no gdb attached:
    ``GGML_NO_BACKTRACE``) with exit 2, a message, and no partial output or lock file left behind."""
    pytest.importorskip("llama_cpp_py_sync", reason="llama.cpp binding (llama-cpp-py-sync)")
    final = tmp_path / "out.gguf"
    proc = subprocess.run([sys.executable, "-c", ABORT, str(final)], check=False, capture_output=True, text=True,
                          timeout=60, cwd=ROOT)
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "llama.cpp stopped on an internal check: ggml.c:1: GGML_ASSERT(n_layer > 0) failed" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    partial = Path(proc.stdout.split()[0])
    assert partial.name.startswith(".out.gguf.partial-")  # the script really had a temporary open
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


def _small_gguf(path: Path) -> Path:
    """A complete qwen2 GGUF of about 1.5 kB: every header field is a likely target of a random edit."""
    w = GGUFWriter(path)
    w.add("general.architecture", ValueType.STRING, "qwen2")
    for key, value in (("block_count", 1), ("context_length", 128), ("embedding_length", 32),
                       ("feed_forward_length", 64), ("attention.head_count", 2), ("attention.head_count_kv", 1)):
        w.add(f"qwen2.{key}", ValueType.UINT32, value)
    w.add("qwen2.rope.freq_base", ValueType.FLOAT32, 1e6)
    w.add("tokenizer.ggml.tokens", ValueType.ARRAY, ["a", "b", "ab", "<|im_end|>"], ValueType.STRING)
    w.add("tokenizer.ggml.token_type", ValueType.ARRAY, [1, 1, 1, 3], ValueType.INT32)
    w.add("tokenizer.ggml.scores", ValueType.ARRAY, [0.0, -1.0, -2.0, 0.0], ValueType.FLOAT32)
    shapes = {"token_embd.weight": ((4, 32), GGMLType.F16), "blk.0.attn_q.weight": ((32, 32), GGMLType.Q8_0),
              "blk.0.attn_norm.weight": ((32,), GGMLType.F32)}
    for name, (shape, gtype) in shapes.items():
        w.add_tensor_info(name, shape, gtype)
    w.write_header()
    for name, info in w.tensors.items():
        w.write_tensor(name, np.zeros(info.nbytes, np.uint8))
    w.close()
    return path


FUZZ = textwrap.dedent("""
    import json, re, resource, sys
    import numpy as np
    from pathlib import Path
    from qconvert.errors import CheckpointError
    from qconvert.gguf.reader import read_gguf
    src, work, n, head = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    vm = int(re.search(r"VmSize:\\s+(\\d+) kB", Path("/proc/self/status").read_text())[1]) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + (256 << 20), resource.RLIM_INFINITY))  # 256 MiB over now
    raw = np.frombuffer(src.read_bytes(), np.uint8)
    rng = np.random.default_rng(18)
    outcomes = {"parsed": 0, "refused": 0}
    for i in range(n):
        data = raw.copy()
        if i % 8 == 7:
            data = data[: rng.integers(0, len(data))]
        else:
            for _ in range(rng.integers(1, 5)):
                at = int(rng.integers(0, head - 8))  # header bytes only: the tensor data is opaque
                if rng.random() < 0.5:
                    data[at] = rng.integers(0, 256)
                else:  # a random 64-bit count or length
                    data[at:at + 8] = np.frombuffer(rng.integers(0, 2**63, dtype=np.int64).tobytes(), np.uint8)
        work.write_bytes(data.tobytes())
        try:
            read_gguf(work)
            outcomes["parsed"] += 1
        except CheckpointError:
            outcomes["refused"] += 1
    print(json.dumps(outcomes))
""")


def test_fuzzed_headers_parse_or_are_refused(tmp_path):
    """Seeded random byte edits and truncations of a small GGUF: every outcome is a parse or a CheckpointError
    (any other exception, a hang or an allocation past 256 MiB fails the child process)."""
    src = _small_gguf(tmp_path / "small.gguf")
    g = read_gguf(src)
    assert g.tensors["blk.0.attn_q.weight"].type == GGMLType.Q8_0
    shm = Path("/dev/shm")  # 3000 rewrites of one small file: seconds on a busy disk, a fraction of one in RAM
    with tempfile.TemporaryDirectory(dir=shm if shm.is_dir() and os.access(shm, os.W_OK) else tmp_path) as work:
        proc = subprocess.run([sys.executable, "-c", FUZZ, str(src), f"{work}/fuzz.gguf", "3000", str(g.data_start)],
                              check=False, capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    outcomes = json.loads(proc.stdout.splitlines()[-1])
    assert outcomes["refused"] > 2000 and sum(outcomes.values()) == 3000, outcomes
