"""``qconvert info`` reports what gguf-py (an independent parser) reads from the same file."""

from __future__ import annotations

from collections import Counter

import pytest

from qconvert.cli import main

gguf = pytest.importorskip("gguf")


def test_info_on_gguf_matches_gguf_py(tmp_path, model_dir, capsys):
    out = tmp_path / "m.gguf"
    assert main(["gguf", "--model", str(model_dir("tiny-fallback")), "--type", "Q5_K_M", "--output", str(out), "--quiet"]) == 0
    capsys.readouterr()
    assert main(["info", str(out), "--tensors"]) == 0
    text = capsys.readouterr().out
    ref = gguf.GGUFReader(out)
    counts = Counter(gguf.GGMLQuantizationType(t.tensor_type).name for t in ref.tensors)
    for type_name, n in counts.items():
        assert f"{n}x {type_name}" in text
    n_weights = sum(int(t.n_elements) for t in ref.tensors)
    assert f"{n_weights:,} weights" in text
    assert "MOSTLY_Q5_K_M" in text and "architecture qwen2" in text
    for t in ref.tensors:
        assert t.name in text


def test_info_on_checkpoint(model_dir, capsys):
    assert main(["info", str(model_dir("tiny-untied"))]) == 0
    text = capsys.readouterr().out
    assert "Qwen2ForCausalLM -> GGUF architecture qwen2" in text and "BF16" in text and "tied embeddings: False" in text
