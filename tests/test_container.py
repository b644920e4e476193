"""GGUF container and safetensors reader contracts, checked against independent parsers (gguf-py, safetensors)."""

from __future__ import annotations

import json
import os
import struct

import numpy as np
import pytest

from qconvert.constants import GGMLType, ValueType
from qconvert.errors import CheckpointError
from qconvert.gguf.reader import read_gguf
from qconvert.gguf.writer import GGUFWriter
from qconvert.io.safetensors import SafetensorsCheckpoint

gguf = pytest.importorskip("gguf", reason="gguf-py is the independent GGUF parser for these tests")
safetensors_numpy = pytest.importorskip("safetensors.numpy")


def _write_sample(path):
    rng = np.random.default_rng(0)
    w = GGUFWriter(path)
    w.add("general.architecture", ValueType.STRING, "qwen2")
    w.add("qwen2.block_count", ValueType.UINT32, 3)
    w.add("qwen2.rope.freq_base", ValueType.FLOAT32, 1e6)
    w.add("tokenizer.ggml.tokens", ValueType.ARRAY, ["a", "Ġb", "<|im_end|>", "中文"], ValueType.STRING)
    w.add("tokenizer.ggml.token_type", ValueType.ARRAY, [1, 1, 3, 1], ValueType.INT32)
    w.add("tokenizer.ggml.add_bos_token", ValueType.BOOL, False)
    a = rng.standard_normal((3, 64)).astype(np.float32)
    b = rng.standard_normal(7).astype(np.float16)
    w.add_tensor_info("a.weight", a.shape, GGMLType.F32)
    w.add_tensor_info("b.bias", b.shape, GGMLType.F16)
    w.write_header()
    w.write_tensor("a.weight", a)
    w.write_tensor("b.bias", b)
    w.close()
    return a, b


def test_gguf_round_trip_matches_gguf_py(tmp_path):
    path = tmp_path / "x.gguf"
    a, b = _write_sample(path)
    ref = gguf.GGUFReader(path)
    assert ref.fields["general.architecture"].contents() == "qwen2"
    assert ref.fields["qwen2.block_count"].contents() == 3
    assert ref.fields["tokenizer.ggml.tokens"].contents() == ["a", "Ġb", "<|im_end|>", "中文"]
    assert ref.fields["tokenizer.ggml.token_type"].contents() == [1, 1, 3, 1]
    assert ref.fields["tokenizer.ggml.add_bos_token"].contents() is False
    tensors = {t.name: t for t in ref.tensors}
    np.testing.assert_array_equal(tensors["a.weight"].data, a)
    np.testing.assert_array_equal(tensors["b.bias"].data, b)
    assert list(tensors["a.weight"].shape) == [64, 3]  # GGUF ne is the reversed numpy shape
    ours = read_gguf(path)
    assert ours.metadata["tokenizer.ggml.tokens"][3] == "中文"
    assert ours.tensors["a.weight"].shape == (3, 64)
    np.testing.assert_array_equal(ours.read_tensor_bytes("a.weight").view(np.float32).reshape(3, 64), a)
    assert ours.data_start % 32 == 0 and ours.tensors["b.bias"].offset % 32 == 0


def test_writer_rejects_bad_calls_before_writing(tmp_path):
    w = GGUFWriter(tmp_path / "y.gguf")
    w.add("k", ValueType.UINT32, 1)
    with pytest.raises(ValueError, match="duplicate metadata key"):
        w.add("k", ValueType.UINT32, 2)
    with pytest.raises(ValueError, match="not a multiple of its block size"):
        w.add_tensor_info("t", (4, 896), GGMLType.Q4_K)  # 896 is not a multiple of 256
    w.add_tensor_info("t", (4, 896), GGMLType.Q4_0)
    with pytest.raises(ValueError, match="duplicate tensor"):
        w.add_tensor_info("t", (4, 32), GGMLType.F32)
    w.add_tensor_info("u", (2,), GGMLType.F32)
    with pytest.raises(RuntimeError, match="cannot write tensor"):
        w.write_tensor("t", np.zeros(4 * 28 * 18, np.uint8))
    assert not (tmp_path / "y.gguf").exists()
    w.write_header()
    with pytest.raises(RuntimeError, match="out of order"):
        w.write_tensor("u", np.zeros(2, np.float32))
    with pytest.raises(ValueError, match="needs"):
        w.write_tensor("t", np.zeros(10, np.uint8))
    w.abort()


def test_truncated_gguf_is_reported(tmp_path):
    path = tmp_path / "x.gguf"
    _write_sample(path)
    raw = path.read_bytes()
    (tmp_path / "cut.gguf").write_bytes(raw[: len(raw) - 40])
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf(tmp_path / "cut.gguf")
    (tmp_path / "head.gguf").write_bytes(raw[:50])
    with pytest.raises(CheckpointError, match="truncated"):
        read_gguf(tmp_path / "head.gguf")
    (tmp_path / "not.gguf").write_bytes(b"PK\x03\x04" + raw[4:])
    with pytest.raises(CheckpointError, match="not a GGUF"):
        read_gguf(tmp_path / "not.gguf")


def _save_checkpoint(d, tensors, shards=1):
    d.mkdir(parents=True, exist_ok=True)
    names = sorted(tensors)
    if shards == 1:
        safetensors_numpy.save_file(tensors, d / "model.safetensors")
        return
    weight_map = {}
    for s in range(shards):
        part = {n: tensors[n] for n in names[s::shards]}
        fname = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        safetensors_numpy.save_file(part, d / fname)
        weight_map |= {n: fname for n in part}
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def test_reader_sharded_dtypes_and_bf16(tmp_path):
    rng = np.random.default_rng(1)
    x32 = rng.standard_normal((5, 8)).astype(np.float32)
    x16 = rng.standard_normal((4,)).astype(np.float16)
    bf_bits = (x32.view(np.uint32) >> 16).astype(np.uint16)  # bf16 bit patterns (truncated f32)
    d = tmp_path / "m"
    _save_checkpoint(d, {"a": x32, "b": x16, "c": bf_bits}, shards=2)
    # safetensors.numpy cannot write bf16: rewrite the header of the shard holding "c" with dtype BF16
    for f in d.glob("*.safetensors"):
        raw = f.read_bytes()
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        if "c" in header:
            header["c"]["dtype"] = "BF16"
            new = json.dumps(header, separators=(",", ":")).encode()
            new += b" " * (-(8 + len(new)) % 8)
            f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    ck = SafetensorsCheckpoint(d)
    assert sorted(ck.names()) == ["a", "b", "c"]
    np.testing.assert_array_equal(ck.read_f32("a"), x32)
    np.testing.assert_array_equal(ck.read_f32("b"), x16.astype(np.float32))
    np.testing.assert_array_equal(ck.read_f32("c"), (bf_bits.astype(np.uint32) << 16).view(np.float32))


@pytest.mark.parametrize("damage", ["truncate_data", "huge_header", "bad_json", "missing_shard", "pickle_only", "dtype"])
def test_reader_refuses_damaged_checkpoints(tmp_path, damage):
    d = tmp_path / "m"
    _save_checkpoint(d, {"a": np.ones((64, 64), np.float32), "b": np.ones(3, np.float32)}, shards=2 if damage == "missing_shard" else 1)
    f = next(d.glob("*.safetensors"))
    raw = f.read_bytes()
    expected = {"truncate_data": "truncated", "huge_header": "truncated", "bad_json": "not valid JSON",
                "missing_shard": "missing", "pickle_only": "pickle", "dtype": "dtype I64"}[damage]
    if damage == "truncate_data":
        f.write_bytes(raw[:-100])
    elif damage == "huge_header":
        f.write_bytes(struct.pack("<Q", len(raw) * 2) + raw[8:])
    elif damage == "bad_json":
        f.write_bytes(raw[:8] + b"{" * 10 + raw[18:])
    elif damage == "missing_shard":
        f.unlink()
    elif damage == "pickle_only":
        f.unlink()
        (d / "pytorch_model.bin").write_bytes(b"not even a pickle")
    elif damage == "dtype":
        (n,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8:8 + n])
        header["a"]["dtype"] = "I64"
        new = json.dumps(header, separators=(",", ":")).encode()
        f.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])
    with pytest.raises(CheckpointError, match=expected):
        SafetensorsCheckpoint(d)


@pytest.mark.parametrize("shard", ["../outside.safetensors", "/etc/passwd", "sub/../../outside.safetensors"])
def test_index_shards_must_stay_inside_the_model_directory(tmp_path, shard):
    """A hostile index must not make qconvert open files outside the checkpoint (no path traversal)."""
    d = tmp_path / "model"
    d.mkdir()
    (tmp_path / "outside.safetensors").write_bytes(b"x")
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"a": shard}}))
    with pytest.raises(CheckpointError, match="outside"):
        SafetensorsCheckpoint(d)


def test_shards_that_are_symlinks_out_of_the_directory_are_fine(model_dir, tmp_path):
    """A Hugging Face cache snapshot holds symlinks into ../../blobs/: the names are inside, the targets are not."""
    src = model_dir("tiny-untied")
    snap = tmp_path / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).symlink_to(f)
    ck = SafetensorsCheckpoint(snap)
    assert sorted(ck.names()) == sorted(SafetensorsCheckpoint(src).names())


def test_a_fifo_named_model_safetensors_is_refused_not_waited_on(tmp_path):
    """Opening a FIFO for reading blocks until a writer comes: the reader must refuse it without opening it."""
    d = tmp_path / "model"
    d.mkdir()
    os.mkfifo(d / "model.safetensors")
    with pytest.raises(CheckpointError, match="not a regular file"):
        SafetensorsCheckpoint(d)


def test_model_card_metadata_from_qwen_style_readme(tmp_path):
    """The general.* keys llama.cpp's converter derives from a Qwen repo id and its model card."""
    from qconvert.gguf.metadata import model_card_metadata

    (tmp_path / "README.md").write_text(
        "---\nlicense: apache-2.0\nlicense_link: https://huggingface.co/Qwen/Qwen2.5-1.5B-Instruct/blob/main/LICENSE\n"
        "language:\n- en\npipeline_tag: text-generation\nbase_model: Qwen/Qwen2.5-1.5B\ntags:\n- chat\n---\n\n# Qwen2.5\n")
    kv = {k.key: k.value for k in model_card_metadata("Qwen/Qwen2.5-1.5B-Instruct", tmp_path, 1_543_714_304)}
    assert kv["general.name"] == "Qwen2.5 1.5B Instruct"
    assert (kv["general.basename"], kv["general.size_label"], kv["general.finetune"]) == ("Qwen2.5", "1.5B", "Instruct")
    assert kv["general.license"] == "apache-2.0" and kv["general.license.link"].endswith("/LICENSE")
    assert kv["general.base_model.count"] == 1 and kv["general.base_model.0.organization"] == "Qwen"
    assert kv["general.base_model.0.repo_url"] == "https://huggingface.co/Qwen/Qwen2.5-1.5B"
    # llama.cpp's converter (gguf-py's Metadata) appends the card's pipeline_tag to its tags; the converter tier
    # (tests/test_converter_oracle.py) checks whole files against the converter itself
    assert kv["general.tags"] == ["chat", "text-generation"] and kv["general.languages"] == ["en"]
    no_card = {k.key: k.value for k in model_card_metadata("my-finetune", tmp_path / "none", 1_543_714_304)}
    assert no_card["general.size_label"] == "1.5B"  # from the parameter count when the name has none
