"""Whole-file contracts against llama.cpp's own converter, ``convert_hf_to_gguf.py`` (the converter oracle tier).

The byte-identity tests in test_gguf_llamacpp.py feed ``llama_model_quantize`` a BF16 GGUF that qconvert wrote, so
they cannot see a difference in the conversion half: metadata keys and values, tokenizer arrays, tensor names and
order. Here llama.cpp's converter (from the llama-cpp-python 0.3.36 sdist, run in its own venv) converts the same
checkpoint, and whole files are compared byte for byte:

1. float: qconvert's F16 / BF16 / F32 export == ``convert_hf_to_gguf.py --outtype f16 / bf16 / f32``;
2. quantized: qconvert's direct Q8_0, Q4_K_M, ... export == the converter's lossless output (``--outtype auto``:
   the checkpoint's own 16-bit type) + llama.cpp's ``llama_model_quantize``, what a llama-quantize user runs.

The checkpoint directories get Qwen-style names and a Qwen-style README.md, so the model-card heuristics
(``general.name`` / basename / size label / license / base model / tags) are part of the contract.

The fixtures' tokenizers are synthetic: their pre-tokenizer hash is not in the converter's table, so for them,
and only for them, the converter's ``get_vocab_base_pre`` is patched to return "qwen2" (the pre-tokenizer they do
use; qconvert checks its regex). The real checkpoint (``~/.cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied`` or
QCONVERT_REAL_MODEL) runs through the unpatched converter.

Run by scripts/test-converter.sh, which sets QCONVERT_CONVERTER (the extracted llama.cpp tree: convert_hf_to_gguf.py,
conversion/, gguf-py/) and QCONVERT_CONVERTER_PYTHON (its venv's python). Skipped when they are unset.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from qconvert.gguf.export import export_gguf
from qconvert.gguf.plan import get_preset
from qconvert.gguf.reader import read_gguf

CONVERTER = os.environ.get("QCONVERT_CONVERTER")
CONVERTER_PYTHON = os.environ.get("QCONVERT_CONVERTER_PYTHON")
pytestmark = pytest.mark.skipif(
    not (CONVERTER and CONVERTER_PYTHON),
    reason="converter oracle tier: run scripts/test-converter.sh (sets QCONVERT_CONVERTER, QCONVERT_CONVERTER_PYTHON)",
)
llamacpp = pytest.importorskip("qconvert.runtimes.llamacpp")
pytest.importorskip("llama_cpp_py_sync", reason="llama.cpp binding (llama-cpp-py-sync) runs llama_model_quantize")

FIXTURES = ["tiny-tied", "tiny-untied", "tiny-fallback", "tiny-80"]
QUANT_PRESETS = ["Q8_0", "Q4_K_M", "Q5_K_M", "Q2_K", "Q4_0"]
# tiny-80 only where its 70B-class rules show (attn_v bump, ffn_down fallback); other presets repeat tiny-untied
QUANT_CASES = [(f, p) for f in FIXTURES for p in QUANT_PRESETS if f != "tiny-80" or p in ("Q4_K_M", "Q2_K")]
REAL_CANDIDATES = [Path(os.environ["QCONVERT_REAL_MODEL"])] if os.environ.get("QCONVERT_REAL_MODEL") else [
    Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied",
]
REAL = next((p for p in REAL_CANDIDATES if (p / "config.json").exists()), None)
needs_real = pytest.mark.skipif(REAL is None, reason="no real checkpoint: run ../shared/tools/real-model.sh")

# A model card in the shape of Qwen2.5-Coder's (YAML front matter, then prose).
QWEN_README = """---
license: apache-2.0
license_link: https://huggingface.co/Qwen/Qwen2.5-Coder-1.5B/blob/main/LICENSE
language:
- en
base_model:
- Qwen/Qwen2.5-1.5B
pipeline_tag: text-generation
library_name: transformers
tags:
- code
- qwen
- qwen-coder
- codeqwen
---

# Qwen2.5-Coder (a qconvert test fixture)
"""

# Runs the converter as `python convert_hf_to_gguf.py ARGS`; with PATCH=1 the pre-tokenizer lookup answers "qwen2".
_RUNNER = """
import runpy, sys
tree, patch = sys.argv[1], sys.argv[2] == "1"
sys.path.insert(0, tree)
if patch:  # synthetic fixture tokenizers only: their hash is unknown to the converter's table
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "qwen2"
sys.argv = [tree + "/convert_hf_to_gguf.py", *sys.argv[3:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert_with_llamacpp(model_dir: Path, out: Path, outtype: str, *, patch_pre: bool) -> Path:
    """``convert_hf_to_gguf.py model_dir --outtype outtype --outfile out`` in the converter's venv."""
    assert CONVERTER and CONVERTER_PYTHON
    cmd = [CONVERTER_PYTHON, "-c", _RUNNER, CONVERTER, "1" if patch_pre else "0", str(model_dir),
           "--outtype", outtype, "--outfile", str(out)]
    run = subprocess.run(cmd, check=False, capture_output=True, text=True)
    if run.returncode != 0:
        pytest.fail(f"convert_hf_to_gguf.py failed on {model_dir} ({outtype}):\n{run.stderr[-3000:]}")
    return out


def first_difference(ours_path: Path, ref_path: Path) -> str | None:
    """None when the files are equal, else the first metadata key or tensor that differs, in words."""
    ours, ref = read_gguf(ours_path), read_gguf(ref_path)
    for i, (a, b) in enumerate(zip(ours.metadata, ref.metadata)):
        if a != b:
            return f"metadata key #{i}: qconvert has {a!r} where llama.cpp has {b!r}"
        va, vb = ours.metadata[a], ref.metadata[b]
        if ours.value_types[a] != ref.value_types[b]:
            return f"metadata {a}: type {ours.value_types[a].name} vs llama.cpp {ref.value_types[b].name}"
        if va != vb:
            if isinstance(va, list) and isinstance(vb, list) and len(va) == len(vb):
                j = next(j for j, (x, y) in enumerate(zip(va, vb)) if x != y)
                return f"metadata {a}[{j}]: qconvert {va[j]!r} vs llama.cpp {vb[j]!r}"
            return f"metadata {a}: qconvert {str(va)[:200]!r} vs llama.cpp {str(vb)[:200]!r}"
    if len(ours.metadata) != len(ref.metadata):
        n = min(len(ours.metadata), len(ref.metadata))
        return (f"metadata: only qconvert has {list(ours.metadata)[n:]}, only llama.cpp has {list(ref.metadata)[n:]}")
    if list(ours.tensors) != list(ref.tensors):
        i = next((i for i, (a, b) in enumerate(zip(ours.tensors, ref.tensors)) if a != b), None)
        if i is None:
            return f"tensor count: qconvert {len(ours.tensors)} vs llama.cpp {len(ref.tensors)}"
        return f"tensor #{i}: qconvert {list(ours.tensors)[i]!r} vs llama.cpp {list(ref.tensors)[i]!r}"
    for name, t in ref.tensors.items():
        mine = ours.tensors[name]
        if (mine.type, mine.shape) != (t.type, t.shape):
            return f"tensor {name}: qconvert {mine.type.name}{list(mine.shape)} vs llama.cpp {t.type.name}{list(t.shape)}"
        a, b = ours.read_tensor_bytes(name), ref.read_tensor_bytes(name)
        if not np.array_equal(a, b):
            return f"tensor {name} ({t.type.name}): {int(np.count_nonzero(a != b))} of {a.size} bytes differ"
    if ours_path.read_bytes() != ref_path.read_bytes():
        return "metadata and tensors agree but the files differ (alignment, offsets or padding)"
    return None


def assert_same_file(ours: Path, ref: Path, what: str) -> None:
    diff = first_difference(ours, ref)
    assert diff is None, f"{what}: {diff}"


def _checkpoint_as(src: Path, dest: Path, readme: str | None = QWEN_README) -> Path:
    """``src``'s files under the directory name ``dest`` (links, no copies), with a model card."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file() and f.name != "README.md":
            (dest / f.name).symlink_to(f.resolve())
    if readme is not None:
        (dest / "README.md").write_text(readme, encoding="utf-8")
    return dest


@pytest.fixture(scope="module")
def named_fixture(model_dir, tmp_path_factory) -> Callable[[str], Path]:
    """``named_fixture("tiny-tied")`` -> the fixture as a directory ``qwen2.5-coder-tiny-tied`` with a Qwen card."""
    root = tmp_path_factory.mktemp("named")
    made: dict[str, Path] = {}

    def get(name: str) -> Path:
        if name not in made:
            made[name] = _checkpoint_as(model_dir(name), root / f"qwen2.5-coder-{name}")
        return made[name]

    return get


@pytest.fixture(scope="module")
def llamacpp_gguf(tmp_path_factory) -> Callable[..., Path]:
    """``llamacpp_gguf(dir, "f16", patch_pre=True)`` -> the converter's output, converted once per module."""
    root = tmp_path_factory.mktemp("llamacpp")
    made: dict[tuple[Path, str], Path] = {}

    def get(src: Path, outtype: str, *, patch_pre: bool) -> Path:
        if (src, outtype) not in made:
            made[src, outtype] = convert_with_llamacpp(src, root / f"{src.name}-{outtype}.gguf", outtype,
                                                       patch_pre=patch_pre)
        return made[src, outtype]

    return get


# ---------------------------------------------------------------- the project's fixtures (pre-tokenizer patched)

@pytest.mark.parametrize("outtype", ["f16", "bf16", "f32"])
@pytest.mark.parametrize("fixture", FIXTURES)
def test_float_export_equals_llamacpp_converter(tmp_path, named_fixture, llamacpp_gguf, fixture, outtype):
    src = named_fixture(fixture)
    ours = tmp_path / "ours.gguf"
    export_gguf(src, ours, outtype.upper())
    ref = llamacpp_gguf(src, outtype, patch_pre=True)
    assert_same_file(ours, ref, f"{fixture} {outtype} (converter patched: pre-tokenizer 'qwen2')")


@pytest.mark.parametrize(("fixture", "preset"), QUANT_CASES)
def test_quantized_export_equals_converter_plus_llama_quantize(tmp_path, named_fixture, llamacpp_gguf, fixture,
                                                               preset):
    src = named_fixture(fixture)
    ours = tmp_path / "ours.gguf"
    export_gguf(src, ours, preset)
    ref = tmp_path / "llama.gguf"
    llamacpp.llama_quantize(llamacpp_gguf(src, "auto", patch_pre=True), ref, int(get_preset(preset).file_type))
    assert_same_file(ours, ref, f"{fixture} {preset} (converter patched: pre-tokenizer 'qwen2')")


def test_hub_snapshot_is_named_like_its_repo(tmp_path, model_dir, llamacpp_gguf):
    """A hub-cache snapshot (a commit-hash directory) resolved from ``Qwen/Qwen2.5-Coder-1.5B-Instruct``: the
    same file as the converter writes for the same files downloaded with ``--local-dir Qwen2.5-Coder-1.5B-Instruct``.
    The generation config carries Qwen's sampling settings (``repetition_penalty`` included)."""
    import json

    gen = json.loads((model_dir("tiny-tied") / "generation_config.json").read_text())
    gen |= {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    snapshot = _checkpoint_as(model_dir("tiny-tied"), tmp_path / "snapshots" / "4a5d1f7b9c")
    (snapshot / "generation_config.json").unlink()
    (snapshot / "generation_config.json").write_text(json.dumps(gen))
    local = _checkpoint_as(snapshot, tmp_path / "Qwen2.5-Coder-1.5B-Instruct", readme=QWEN_README)
    ours = tmp_path / "ours.gguf"
    export_gguf(snapshot, ours, "BF16", model_name="Qwen/Qwen2.5-Coder-1.5B-Instruct")
    assert_same_file(ours, llamacpp_gguf(local, "bf16", patch_pre=True), "hub snapshot vs --local-dir download")
    md = read_gguf(ours).metadata
    assert md["general.sampling.penalty_repeat"] == pytest.approx(1.05)


# ---------------------------------------------------------------- the real checkpoint (converter unpatched)

@needs_real
@pytest.mark.parametrize("outtype", ["f16", "bf16"])
def test_real_float_export_equals_llamacpp_converter(tmp_path, llamacpp_gguf, outtype):
    ours = tmp_path / "ours.gguf"
    export_gguf(REAL, ours, outtype.upper())
    assert_same_file(ours, llamacpp_gguf(REAL, outtype, patch_pre=False), f"{REAL.name} {outtype} (unpatched)")


@needs_real
@pytest.mark.parametrize("preset", ["Q4_K_M", "Q8_0"])
def test_real_quantized_export_equals_converter_plus_llama_quantize(tmp_path, llamacpp_gguf, preset):
    ours = tmp_path / "ours.gguf"
    export_gguf(REAL, ours, preset)
    ref = tmp_path / "llama.gguf"
    llamacpp.llama_quantize(llamacpp_gguf(REAL, "auto", patch_pre=False), ref, int(get_preset(preset).file_type))
    assert_same_file(ours, ref, f"{REAL.name} {preset} (unpatched converter + llama_model_quantize)")
