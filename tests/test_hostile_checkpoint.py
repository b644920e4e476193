"""Hostile checkpoints: every damaged safetensors header or config.json is refused with a CheckpointError that
names the problem, before any work; the CLI exits 2 without a traceback and writes nothing.

Each case edits a copy of the ``tiny-tied`` fixture in tmp_path (the cached fixture is never touched). The fuzz
test feeds thousands of seeded mutations of a valid header to the reader: a clean parse or a CheckpointError,
nothing else (no IndexError, TypeError, RecursionError, hang).
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import struct
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from qconvert.cli import main
from qconvert.errors import CheckpointError
from qconvert.fixtures import fixture_path
from qconvert.io.safetensors import SafetensorsCheckpoint, SafetensorsStreamWriter
from qconvert.registry import read_model_config

DEEP = 100_000  # far past Python's recursion limit: json.loads raises RecursionError on it


@pytest.fixture
def model(tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(fixture_path("tiny-tied"), dst)
    return dst


def _split(path: Path) -> tuple[dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write_header(model: Path, header: dict[str, Any] | bytes, tail: bytes = b"") -> None:
    """Replace the header of model.safetensors (a dict, or raw JSON bytes), keeping its data section."""
    f = model / "model.safetensors"
    _, data = _split(f)
    raw = header if isinstance(header, bytes) else json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data + tail)


def _edit_header(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        header, _ = _split(model / "model.safetensors")
        edit(header)
        _write_header(model, header)
    return apply


def _by_offset(header: dict[str, Any], i: int) -> dict[str, Any]:
    """The i-th tensor entry in data order."""
    entries = sorted((v for k, v in header.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    return entries[i]


def _shift(i: int, delta: int) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        e = _by_offset(header, i)
        e["data_offsets"] = [e["data_offsets"][0] + delta, e["data_offsets"][1] + delta]
    return edit


def _alias(header: dict[str, Any]) -> None:
    """Point layer 1's up_proj at layer 0's bytes: two tensors read the same data."""
    header["model.layers.1.mlp.up_proj.weight"]["data_offsets"] = header["model.layers.0.mlp.up_proj.weight"]["data_offsets"]


def _set(field: str, value: Any, name: str = "model.layers.0.mlp.up_proj.weight") -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header[name][field] = value
    return edit


def _replace_entry(value: Any) -> Callable[[dict[str, Any]], None]:
    def edit(header: dict[str, Any]) -> None:
        header["model.norm.weight"] = value
    return edit


def _drop_offsets(header: dict[str, Any]) -> None:
    del header["model.norm.weight"]["data_offsets"]


def _raw_header(make: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    """Edit the header's JSON text (for what json.dumps cannot write: duplicates, deep nesting)."""
    def apply(model: Path) -> None:
        header, _ = _split(model / "model.safetensors")
        _write_header(model, make(json.dumps(header, separators=(",", ":")).encode()))
    return apply


def _duplicate(text: bytes) -> bytes:
    """A second entry named like the first tensor, at the end: json.loads would keep it and hide the first."""
    first = b'"model.embed_tokens.weight":'
    start = text.index(first)
    end = text.index(b"}", start) + 1
    return text[:-1] + b"," + text[start:end] + b"}"


def _trailing(model: Path) -> None:
    header, _ = _split(model / "model.safetensors")
    _write_header(model, header, tail=b"\0" * 16)


SAFETENSORS_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "aliased offsets": (_edit_header(_alias), "overlaps"),
    "overlapping offsets": (_edit_header(_shift(3, -2)), "overlaps"),
    "gap between tensors": (_edit_header(lambda h: h.pop("model.embed_tokens.weight")), "gap of 1179648 bytes"),
    "offsets past the file": (_edit_header(_shift(-1, 8)), "truncated"),
    "offsets span the wrong size": (_edit_header(_set("shape", [512, 255])), "needs 261120 bytes but its offsets span"),
    "float shape": (_edit_header(_set("shape", [512.0, 256])), "shape [512.0, 256]"),
    "negative shape": (_edit_header(_set("shape", [-512, -256])), "non-negative integers"),
    "bool shape": (_edit_header(_set("shape", [True, 256])), "shape [True, 256]"),
    "shape not a list": (_edit_header(_set("shape", "512x256")), "shape 512x256"),
    "entry not an object": (_edit_header(_replace_entry([0, 512])), "is list, not an object"),
    "missing data_offsets": (_edit_header(_drop_offsets), "data_offsets None"),
    "one data offset": (_edit_header(_set("data_offsets", [0])), "data_offsets [0]"),
    "string data offsets": (_edit_header(_set("data_offsets", ["0", "262144"])), "data_offsets ['0', '262144']"),
    "reversed data offsets": (_edit_header(_set("data_offsets", [262144, 0])), "0 <= begin <= end"),
    "unknown dtype": (_edit_header(_set("dtype", "Q4_0")), "dtype Q4_0, which is not a safetensors dtype"),
    "dtype not a string": (_edit_header(_set("dtype", ["BF16"])), "dtype ['BF16']"),
    "NaN literal": (_edit_header(_set("shape", [float("nan"), 256])), "NaN"),
    "Infinity literal": (_edit_header(_set("data_offsets", [0, float("inf")])), "Infinity"),
    "deep nesting": (_raw_header(lambda t: t[:-1] + b',"x":' + b"[" * DEEP + b"]" * DEEP + b"}"), "too deeply"),
    "non-string metadata": (_edit_header(lambda h: h.update(__metadata__={"format": 1})), "__metadata__"),
    "metadata not an object": (_edit_header(lambda h: h.update(__metadata__=["pt"])), "__metadata__"),
    "duplicate tensor name": (_raw_header(_duplicate), "appears twice"),
    "trailing bytes": (_trailing, "16 bytes follow the last tensor"),
    "header not an object": (_raw_header(lambda t: b"[" + t + b"]"), "not a JSON object"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_reader_refuses_hostile_safetensors(model: Path, case: str) -> None:
    damage, needle = SAFETENSORS_CASES[case]
    damage(model)
    with pytest.raises(CheckpointError) as err:
        SafetensorsCheckpoint(model)
    assert needle in str(err.value), str(err.value)
    assert "re-download" in str(err.value).lower()


def _config(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        cfg = json.loads((model / "config.json").read_text())
        edit(cfg)
        (model / "config.json").write_text(json.dumps(cfg))
    return apply


def _key(key: str, value: Any) -> Callable[[Path], None]:
    return _config(lambda c: c.update({key: value}))


def _raw_config(make: Callable[[str], str]) -> Callable[[Path], None]:
    def apply(model: Path) -> None:
        (model / "config.json").write_text(make((model / "config.json").read_text()))
    return apply


CONFIG_CASES: dict[str, tuple[Callable[[Path], None], str]] = {
    "missing num_hidden_layers": (_config(lambda c: c.pop("num_hidden_layers")), "num_hidden_layers is None"),
    "string hidden_size": (_key("hidden_size", "256"), "hidden_size is '256'; it must be a positive integer"),
    "float intermediate_size": (_key("intermediate_size", 512.0), "intermediate_size is 512.0"),
    "bool heads": (_key("num_attention_heads", True), "num_attention_heads is True"),
    "zero kv heads": (_key("num_key_value_heads", 0), "num_key_value_heads is 0"),
    "negative vocab": (_key("vocab_size", -2304), "vocab_size is -2304"),
    "a billion layers": (_key("num_hidden_layers", 10**9), "num_hidden_layers is 1000000000, above the limit of 1024"),
    "absurd hidden size": (_key("hidden_size", 1 << 20), "above the limit of 65536"),
    "heads do not divide hidden": (_key("num_attention_heads", 3), "hidden_size 256 is not a multiple of"),
    "kv heads do not divide heads": (_key("num_key_value_heads", 3), "num_attention_heads 4 is not a multiple of"),
    "infinite rope_theta": (_raw_config(lambda t: t.replace('"rope_theta": 1000000.0', '"rope_theta": 1e999')),
                            "rope_theta is inf"),
    "zero rope_theta": (_key("rope_theta", 0), "rope_theta is 0"),
    "string rope_theta": (_key("rope_theta", "1e6"), "rope_theta is '1e6'"),
    "negative rms_norm_eps": (_key("rms_norm_eps", -1e-6), "rms_norm_eps is -1e-06"),
    "infinite rms_norm_eps": (_raw_config(lambda t: t.replace('"rms_norm_eps": 1e-06', '"rms_norm_eps": -1e999')),
                              "rms_norm_eps is -inf"),
    "vocab smaller than tokenizer": (_key("vocab_size", 1000), "vocab_size 1000 is smaller than the tokenizer's"),
    "architectures a string": (_key("architectures", "Qwen2ForCausalLM"), "'architectures' list"),
    "tie_word_embeddings a string": (_key("tie_word_embeddings", "yes"), "tie_word_embeddings"),
    "quantization_config a list": (_key("quantization_config", ["gptq"]), "quantization_config"),
    "zero context length": (_key("max_position_embeddings", 0), "max_position_embeddings is '0'; it must be a positive"),
    "config a FIFO": (lambda d: [(d / "config.json").unlink(), os.mkfifo(d / "config.json")], "not a regular file"),
    "NaN literal": (_raw_config(lambda t: t.replace('"rope_theta": 1000000.0', '"rope_theta": NaN')), "NaN"),
    "deep nesting": (_raw_config(lambda t: t.rstrip()[:-1] + ', "x": ' + "[" * DEEP + "]" * DEEP + "}"), "too deeply"),
    "duplicate key": (_raw_config(lambda t: t.rstrip()[:-1] + ', "vocab_size": 100}'), "'vocab_size' appears twice"),
    "not an object": (_raw_config(lambda t: "[" + t + "]"), "not a JSON object"),
}


def test_config_cases_edit_the_fixture_as_written() -> None:
    """The raw text edits above rely on the fixture's json.dumps spelling; fail loudly if it changes."""
    text = (fixture_path("tiny-tied") / "config.json").read_text()
    assert '"rope_theta": 1000000.0' in text and '"rms_norm_eps": 1e-06' in text
    read_model_config(fixture_path("tiny-tied"))


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_reader_refuses_hostile_config(model: Path, case: str) -> None:
    damage, needle = CONFIG_CASES[case]
    damage(model)
    with pytest.raises(CheckpointError) as err:
        read_model_config(model)
    assert needle in str(err.value), str(err.value)


def _listing(d: Path) -> list[str]:
    return sorted(str(p.relative_to(d)) for p in d.rglob("*")) if d.exists() else []


CASES = {"safetensors": SAFETENSORS_CASES, "config": CONFIG_CASES}
CLI_CASES = [("safetensors", "aliased offsets"), ("safetensors", "NaN literal"), ("config", "deep nesting"),
             ("config", "a billion layers"), ("config", "vocab smaller than tokenizer")]


@pytest.mark.parametrize("kind, case", CLI_CASES)
def test_gguf_cli_refuses_hostile_checkpoint(model: Path, tmp_path: Path, capsys, kind: str, case: str) -> None:
    damage, needle = CASES[kind][case]
    damage(model)
    out = tmp_path / "out"
    code = main(["gguf", "--model", str(model), "--type", "Q8_0", "--out-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err, err
    assert _listing(out) == []


@pytest.mark.parametrize("kind, case", [CLI_CASES[0], CLI_CASES[3], CLI_CASES[4]])
def test_verify_cli_refuses_hostile_reference(model: Path, tmp_path: Path, capsys, float_gguf, kind: str,
                                              case: str) -> None:
    artifact = float_gguf("tiny-tied", "Q8_0")
    damage, needle = CASES[kind][case]
    damage(model)
    out = tmp_path / "out"
    out.mkdir()
    code = main(["verify", str(artifact), "--reference", str(model), "--ctx", "32", "--chunks", "1",
                 "--cache-dir", str(out / "cache"), "--json", str(out / "v.json"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert needle in err and "Traceback" not in err, err
    assert _listing(out) == []


# ---------------------------------------------------------------- fuzz

HOSTILE_VALUES: tuple[Any, ...] = (
    None, True, False, -1, 0, 1, 7, 2**31, 2**63, 2**64 + 1, 10**40, -(2**63), 1.5, -0.0, 1e308, "", "F32", "BF16",
    "I64", "x" * 100, [], [0], [1, 2], [2, 2], [-1, 4], [0, 2**64], [1.0, 2.0], [True], [[1]], {}, {"a": 1}, [None],
)


def _small_file(path: Path) -> bytes:
    """A valid three-tensor safetensors file written by qconvert's own writer; returns its bytes."""
    w = SafetensorsStreamWriter(path, {"a": ("F32", (2, 3)), "b": ("F16", (4,)), "c": ("I32", (1, 2))}, reserve=64)
    w.write("a", np.arange(6, dtype="<f4").reshape(2, 3))
    w.write("b", np.ones(4, dtype="<f2"))
    w.write("c", np.array([[1, 2]], dtype="<i4"))
    w.finish({"format": "pt"})
    return path.read_bytes()


def _json_edit(rng: random.Random, valid: bytes) -> bytes:
    (n,) = struct.unpack("<Q", valid[:8])
    header = json.loads(valid[8:8 + n])
    name = rng.choice(list(header))
    kind = rng.randrange(5)
    if kind == 0 and isinstance(header[name], dict):
        header[name][rng.choice(["dtype", "shape", "data_offsets", "extra"])] = rng.choice(HOSTILE_VALUES)
    elif kind == 1 and isinstance(header[name], dict):
        header[name].pop(rng.choice(["dtype", "shape", "data_offsets"]), None)
    elif kind == 2:
        header[name] = rng.choice(HOSTILE_VALUES)
    elif kind == 3:
        other = rng.choice(list(header))
        header[name], header[other] = header[other], header[name]
    else:
        header[f"{name}.{rng.randrange(9)}"] = header[rng.choice(list(header))]
    raw = json.dumps(header).encode()
    if rng.random() < 0.5:  # pad to the old length (the data section stays put when the header did not grow)
        raw = raw.ljust(n)
    return struct.pack("<Q", len(raw)) + raw + valid[8 + n:]


def _mutate(rng: random.Random, valid: bytes) -> bytes:
    kind = rng.randrange(4)
    if kind == 0:  # flip a few bytes, mostly in the header
        data = bytearray(valid)
        for _ in range(rng.randint(1, 4)):
            data[rng.randrange(min(len(data), 8 + 200))] = rng.randrange(256)
        return bytes(data)
    if kind == 1:
        return valid[:rng.randrange(len(valid))]
    if kind == 2:  # a random header length
        n = rng.choice([0, 1, 2, rng.randrange(1 << 12), rng.randrange(1 << 64)])
        return struct.pack("<Q", n) + valid[8:]
    return _json_edit(rng, valid)


@contextmanager
def _deadline(seconds: float) -> Iterator[None]:
    def fire(signum: int, frame: object) -> None:
        raise TimeoutError(f"the reader took more than {seconds} s: it hangs on some input")
    previous = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _outcome(d: Path, i: int) -> str:
    try:
        ck = SafetensorsCheckpoint(d)
    except CheckpointError:
        return "refused"
    except Exception as e:  # the contract: nothing but CheckpointError escapes
        raise AssertionError(f"mutation {i}: {type(e).__name__}: {e}") from e
    for name in ck.names():  # whatever parsed must also read, with the declared shape
        assert ck.read_raw(name).shape == ck.entries[name].shape
    return "parsed"


def test_fuzzed_headers_parse_or_fail_cleanly(tmp_path: Path) -> None:
    d = tmp_path / "m"
    d.mkdir()
    f = d / "model.safetensors"
    valid = _small_file(f)
    assert sorted(SafetensorsCheckpoint(d).names()) == ["a", "b", "c"]
    rng = random.Random(18)
    outcomes = {"parsed": 0, "refused": 0}
    start = time.monotonic()
    fd = os.open(f, os.O_RDWR)
    try:
        with _deadline(60):
            for i in range(3000):
                data = _mutate(rng, valid)
                os.pwrite(fd, data, 0)  # rewrite in place: truncating to 0 and refilling is 20x slower on ext4
                os.ftruncate(fd, len(data))
                outcomes[_outcome(d, i)] += 1
    finally:
        os.close(fd)
    assert outcomes["refused"] > 1000 and outcomes["parsed"] > 10, outcomes
    assert time.monotonic() - start < 20, "3000 headers should parse in a few seconds"
