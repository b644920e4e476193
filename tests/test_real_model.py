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


def _first_difference(a: np.ndarray, b: np.ndarray, block_bytes: int) -> str:
    """Where two encodings of one tensor part: the first differing byte and the block it lies in."""
    if a.size != b.size:
        return f"sizes {a.size} != {b.size}"
    i = int(np.flatnonzero(a != b)[0])
    return f"first differing byte {i} (block {i // block_bytes}), {int((a != b).sum())} bytes differ"


def _check_identical(tmp_path, real_f16, preset, imatrix=None):
    """qconvert's export of REAL equals llama_model_quantize of the F16 GGUF, tensor by tensor (with the same
    importance matrix on both sides when one is given)."""
    ours, ref = tmp_path / "ours.gguf", tmp_path / "ref.gguf"
    try:
        export_gguf(REAL, ours, preset, imatrix=imatrix)
        llamacpp.llama_quantize(real_f16, ref, int(get_preset(preset).file_type), imatrix=imatrix)
        a, b = read_gguf(ours), read_gguf(ref)
        assert list(a.tensors) == list(b.tensors)
        for name, t in b.tensors.items():
            assert a.tensors[name].type == t.type, name
            x, y = a.read_tensor_bytes(name), b.read_tensor_bytes(name)
            assert np.array_equal(x, y), f"{name} ({t.type.name}): {_first_difference(x, y, t.type.block_bytes)}"
    finally:  # even when a side fails: pytest keeps the temporary dirs of failed tests
        ours.unlink(missing_ok=True)
        ref.unlink(missing_ok=True)


def test_real_q8_0_equals_llama_quantize(tmp_path, real_f16):
    _check_identical(tmp_path, real_f16, "Q8_0")


@pytest.mark.slow
def test_real_q4_k_m_equals_llama_quantize(tmp_path, real_f16):
    _check_identical(tmp_path, real_f16, "Q4_K_M")


@pytest.fixture(scope="module")
def real_imatrix():
    """The importance matrix of ``qconvert gguf --calib builtin --calib-samples 4 --calib-seqlen 512`` on REAL
    (CPU, float32, seed 0): the built-in calibration set through the same pipeline function as the CLI."""
    from qconvert.calibset import load_calibration, uses_chat
    from qconvert.pipelines.gguf import importance_matrix

    calib = load_calibration("builtin", REAL, chat=uses_chat(REAL), n_samples=4, seq_len=512, seed=0)
    found = importance_matrix(REAL, calib=calib)
    assert found is not None
    return found.imatrix


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["IQ4_XS", "IQ3_M", "IQ2_M"])
def test_real_iquants_with_calibrated_imatrix_equal_llama_quantize(tmp_path, real_f16, real_imatrix, preset):
    """I-quant presets (IQ2_M needs the imatrix) with an importance matrix from real activations: every tensor
    identical in type and bytes to llama.cpp's, given the same imatrix values."""
    _check_identical(tmp_path, real_f16, preset, imatrix=real_imatrix)


def test_real_tokenizer_matches_hf(real_f16):
    from test_gguf_llamacpp import MIXED_SAMPLE
    from tokenizers import Tokenizer

    from qconvert.fixtures.corpus import eval_text

    hf = Tokenizer.from_file(str(REAL / "tokenizer.json"))
    with llamacpp.LlamaCppModel(real_f16, vocab_only=True) as m:
        for text in (MIXED_SAMPLE, eval_text()):
            assert m.tokenize(text) == hf.encode(text, add_special_tokens=False).ids
