"""The GGUF contracts on a real trained Qwen2.5-architecture checkpoint, when one has been built locally.

``../shared/tools/real-model.sh`` (QCONVERT_TIE=1 for the tied layout of the published 0.5B) writes it to
``~/.cache/qconvert-real/hf/``; set QCONVERT_REAL_MODEL to point elsewhere. Skipped when absent.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from qconvert.gguf.export import export_gguf
from qconvert.gguf.plan import get_preset
from qconvert.gguf.reader import read_gguf

llamacpp = pytest.importorskip("qconvert.runtimes.llamacpp")

CANDIDATES = [Path(os.environ["QCONVERT_REAL_MODEL"])] if os.environ.get("QCONVERT_REAL_MODEL") else [
    Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied",
    Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b",
]
REAL = next((p for p in CANDIDATES if (p / "config.json").exists()), None)
pytestmark = pytest.mark.skipif(REAL is None, reason="no real checkpoint: run ../shared/tools/real-model.sh to build one")


@pytest.fixture(scope="module")
def real_f16(tmp_path_factory):
    out = tmp_path_factory.mktemp("real") / "f16.gguf"
    export_gguf(REAL, out, "F16")
    yield out
    out.unlink()  # 1 GB: gone as soon as this module is done, whatever pytest keeps of its temporary dirs


def _check_identical(tmp_path, real_f16, preset):
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    export_gguf(REAL, ours, preset)
    llamacpp.llama_quantize(real_f16, ref, int(get_preset(preset).file_type))
    try:
        a, b = read_gguf(ours), read_gguf(ref)
        assert list(a.tensors) == list(b.tensors)
        for name, t in b.tensors.items():
            assert a.tensors[name].type == t.type, name
            assert np.array_equal(a.read_tensor_bytes(name), b.read_tensor_bytes(name)), name
    finally:
        ours.unlink()
        ref.unlink()


def test_real_q8_0_equals_llama_quantize(tmp_path, real_f16):
    _check_identical(tmp_path, real_f16, "Q8_0")


@pytest.mark.slow
def test_real_q4_k_m_equals_llama_quantize(tmp_path, real_f16):
    _check_identical(tmp_path, real_f16, "Q4_K_M")


def test_real_tokenizer_matches_hf(real_f16):
    from test_gguf_llamacpp import MIXED_SAMPLE
    from tokenizers import Tokenizer

    from qconvert.fixtures.corpus import eval_text

    hf = Tokenizer.from_file(str(REAL / "tokenizer.json"))
    with llamacpp.LlamaCppModel(real_f16, vocab_only=True) as m:
        for text in (MIXED_SAMPLE, eval_text()):
            assert m.tokenize(text) == hf.encode(text, add_special_tokens=False).ids
