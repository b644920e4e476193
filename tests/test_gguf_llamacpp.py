"""GGUF contracts against llama.cpp itself (libllama from llama-cpp-py-sync).

1. Byte identity: qconvert's one-pass export equals llama.cpp's ``llama_model_quantize`` run on qconvert's BF16
   GGUF of the same checkpoint -- every tensor's type and bytes, and (for quantized presets) the whole file.
2. llama.cpp loads what we write and its logits match the float reference (transformers) within stated bounds.
3. llama.cpp's tokenizer on our GGUF equals the Hugging Face tokenizer on a mixed sample.
"""

from __future__ import annotations

import numpy as np
import pytest

from qconvert.gguf.export import export_gguf
from qconvert.gguf.plan import get_preset
from qconvert.gguf.reader import read_gguf

llamacpp = pytest.importorskip("qconvert.runtimes.llamacpp")
pytest.importorskip("llama_cpp_py_sync", reason="llama.cpp binding (llama-cpp-py-sync) is the oracle")

QUANT_PRESETS = ["Q2_K", "Q3_K_S", "Q3_K_M", "Q3_K_L", "Q4_K_S", "Q4_K_M", "Q5_K_S", "Q5_K_M", "Q6_K",
                 "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "IQ4_NL", "IQ4_XS", "IQ3_S", "IQ3_M"]
NEEDS_IMATRIX = ("Q2_K_S", "IQ3_XS", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S")  # llama-quantize refuses them without one: tested with one, below
FAST_FIXTURES = ["tiny-tied", "tiny-untied", "tiny-fallback"]


def _assert_same_tensors(ours_path, ref_path):
    ours, ref = read_gguf(ours_path), read_gguf(ref_path)
    assert list(ours.tensors) == list(ref.tensors), "tensor order differs"
    for name, t in ref.tensors.items():
        mine = ours.tensors[name]
        assert (mine.type, mine.shape) == (t.type, t.shape), f"{name}: {mine.type.name}{mine.shape} vs llama.cpp {t.type.name}{t.shape}"
        a, b = ours.read_tensor_bytes(name), ref.read_tensor_bytes(name)
        if not np.array_equal(a, b):
            bad = int(np.count_nonzero(a != b))
            pytest.fail(f"{name} ({t.type.name}): {bad} of {a.size} bytes differ from llama.cpp")
    return ours, ref


@pytest.mark.parametrize("preset", QUANT_PRESETS)
@pytest.mark.parametrize("fixture", FAST_FIXTURES)
def test_direct_export_is_byte_identical_to_llama_quantize(tmp_path, model_dir, float_gguf, fixture, preset):
    ours = tmp_path / "ours.gguf"
    export_gguf(model_dir(fixture), ours, preset, model_name=f"qconvert/{fixture}")
    ref = tmp_path / "llama.gguf"
    llamacpp.llama_quantize(float_gguf(fixture, "BF16"), ref, int(get_preset(preset).file_type))
    _assert_same_tensors(ours, ref)
    assert ours.read_bytes() == ref.read_bytes(), "tensors agree but the files differ (metadata order or padding)"


@pytest.mark.parametrize("preset", ["Q2_K", "Q3_K_M", "Q4_K_M", "Q5_K_M", "Q6_K", "Q4_0", "IQ4_NL", "IQ4_XS", "IQ3_M"])
def test_80_layer_rules_match_llama_quantize(tmp_path, model_dir, float_gguf, preset):
    """80 layers: llama.cpp treats qwen2 as its 70B class (attn_v bump) and ffn_down rows of 288 fall back."""
    ours = tmp_path / "ours.gguf"
    export_gguf(model_dir("tiny-80"), ours, preset, model_name="qconvert/tiny-80")
    ref = tmp_path / "llama.gguf"
    llamacpp.llama_quantize(float_gguf("tiny-80", "BF16"), ref, int(get_preset(preset).file_type))
    _assert_same_tensors(ours, ref)
    assert ours.read_bytes() == ref.read_bytes()


@pytest.mark.parametrize("preset", ["F16", "F32"])
def test_float_exports_match_llama_conversion(tmp_path, model_dir, float_gguf, preset):
    """F16/F32 from the BF16 GGUF through llama.cpp equals qconvert's direct F16/F32 export, tensor by tensor."""
    ours = float_gguf("tiny-untied", preset)
    ref = tmp_path / "llama.gguf"
    llamacpp.llama_quantize(float_gguf("tiny-untied", "BF16"), ref, int(get_preset(preset).file_type))
    ours_f, ref_f = read_gguf(ours), read_gguf(ref)
    for name, t in ref_f.tensors.items():
        assert ours_f.tensors[name].type == t.type
        assert np.array_equal(ours_f.read_tensor_bytes(name), ref_f.read_tensor_bytes(name)), name


def test_export_is_deterministic(tmp_path, model_dir):
    a, b = tmp_path / "a.gguf", tmp_path / "b.gguf"
    export_gguf(model_dir("tiny-untied"), a, "Q4_K_M")
    export_gguf(model_dir("tiny-untied"), b, "Q4_K_M")
    assert a.read_bytes() == b.read_bytes()


# ---------------------------------------------------------------- llama.cpp runs what we write

def _reference_logits(model_path, ids):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def _sample_ids(model_path, n=96):
    from tokenizers import Tokenizer

    from qconvert.fixtures.corpus import eval_text

    ids = Tokenizer.from_file(str(model_path / "tokenizer.json")).encode(eval_text()).ids
    return ids[:n]


# Bounds on the relative logit error ||l - ref|| / ||ref|| (over all positions and the vocabulary) and on top-1
# agreement with the float reference (transformers, fp32), on the trained demo model, 96 held-out tokens.
# Measured (python, 2026-11-23): F32 3.8e-5, F16 1.1e-4, BF16 8.0e-4, Q8_0 3.5e-3, Q6_K 1.1e-2, Q5_K_M 9.3e-3,
# Q4_K_M 1.2e-2, Q3_K_M 1.8e-2, Q2_K 2.7e-2 (top-1 1.0 ... 0.91). The K-quant errors sit near 1e-2 because
# llama.cpp's CPU matmuls quantize activations to Q8_K. Bounds are about 2x the measured error, so a broken
# kernel or mixture fails them while thread-count noise does not.
# (max relative logit error, min top-1 agreement) on 96 positions. Top-1 moves in steps of ~1% there and is not
# monotone in bits (on an AMX/AVX-512 CPU, whose llama.cpp kernels differ: Q3_K_M 0.896, Q2_K 0.906, relative
# errors 1.5e-2 and 4.3e-2), so the relative error is the tight contract and top-1 a loose one.
LOGIT_BOUNDS = {"F32": (1e-4, 0.99), "F16": (3e-4, 0.98), "BF16": (2e-3, 0.98), "Q8_0": (8e-3, 0.97),
                "Q6_K": (2.5e-2, 0.95), "Q5_K_M": (2e-2, 0.95), "Q4_K_M": (2.5e-2, 0.94), "Q3_K_M": (4e-2, 0.85),
                "Q2_K": (6e-2, 0.8)}


@pytest.fixture(scope="module")
def demo_reference(model_dir):
    path = model_dir("demo")
    ids = _sample_ids(path)
    return path, ids, _reference_logits(path, ids)


@pytest.mark.parametrize("preset", list(LOGIT_BOUNDS))
def test_llamacpp_logits_match_reference(tmp_path, demo_reference, preset):
    path, ids, ref = demo_reference
    out = tmp_path / "demo.gguf"
    export_gguf(path, out, preset)
    with llamacpp.LlamaCppModel(out, n_ctx=128) as m:
        got = m.logits(ids)
    rel = float(np.linalg.norm(got - ref[:, : got.shape[1]]) / np.linalg.norm(ref))
    top1 = float(np.mean(got.argmax(-1) == ref.argmax(-1)))
    max_rel, min_top1 = LOGIT_BOUNDS[preset]
    assert got.shape == ref.shape
    assert rel <= max_rel, f"{preset}: relative logit error {rel:.2e} > {max_rel:.0e}"
    assert top1 >= min_top1, f"{preset}: top-1 agreement {top1:.2f} < {min_top1}"


MIXED_SAMPLE = (
    "Hello world! It's 2026, isn't it? 你好，世界。量化模型在笔记本上运行。\n"
    "def f(x):\n    return x ** 2  # square\n\t\tindent\r\n"
    "Émile's café costs €3.50 — 🚀🦙✅ 😶‍🌫️  multiple   spaces\n\n\n"
    "<|im_start|>user\nWhat is 12*7?<|im_end|>\n<|im_start|>assistant\n84<|im_end|><|endoftext|>"
    "<tool_call>{\"name\": \"f\"}</tool_call> <|fim_prefix|>a<|fim_suffix|>b<|fim_middle|>"
)


@pytest.mark.parametrize("fixture", ["demo", "tiny-fallback"])
def test_llamacpp_tokenizer_matches_hf(model_dir, float_gguf, fixture):
    from tokenizers import Tokenizer

    hf = Tokenizer.from_file(str(model_dir(fixture) / "tokenizer.json"))
    with llamacpp.LlamaCppModel(float_gguf(fixture, "BF16"), vocab_only=True) as m:
        for text in [MIXED_SAMPLE, *MIXED_SAMPLE.split("\n")]:
            want = hf.encode(text, add_special_tokens=False).ids
            got = m.tokenize(text, add_special=False, parse_special=True)
            assert got == want, f"tokenization differs on {text!r}"


def test_llamacpp_greedy_generation_matches_reference(model_dir, tmp_path):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    path = model_dir("demo")
    out = tmp_path / "demo-f32.gguf"
    export_gguf(path, out, "F32")
    prompt = _sample_ids(path, 24)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    seq = list(prompt)
    with torch.no_grad():
        for _ in range(20):  # plain greedy: no EOS stop, no generation-config surprises
            seq.append(int(model(torch.tensor([seq])).logits[0, -1].argmax()))
    ref = seq[len(prompt):]
    with llamacpp.LlamaCppModel(out, n_ctx=64) as m:
        assert m.greedy(prompt, 20) == ref


# ---------------------------------------------------------------- metadata as llama.cpp reads it

# llama.h: enum llama_token_attr is a bit set (the CFFI declaration in the wheel lost the shifts).
ATTR_UNUSED, ATTR_NORMAL, ATTR_CONTROL, ATTR_USER_DEFINED = 1 << 1, 1 << 2, 1 << 3, 1 << 4


def test_token_types_as_llama_cpp_reads_them(model_dir, float_gguf):
    """Qwen's rules: <|...|> added tokens CONTROL (FIM ones too, though not flagged special), <tool_call>
    USER_DEFINED, BPE tokens NORMAL, ids between the tokenizer and config.vocab_size UNUSED padding."""
    import json

    tok = json.loads((model_dir("demo") / "tokenizer.json").read_text())
    added = {t["content"]: t["id"] for t in tok["added_tokens"]}
    n_vocab = json.loads((model_dir("demo") / "config.json").read_text())["vocab_size"]
    with llamacpp.LlamaCppModel(float_gguf("demo", "BF16"), vocab_only=True) as m:
        attr = lambda i: m.lib.llama_vocab_get_attr(m.vocab, i)
        assert m.n_vocab == n_vocab
        for name in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|fim_prefix|>", "<|file_sep|>"):
            assert attr(added[name]) & ATTR_CONTROL, name
        for name in ("<tool_call>", "</tool_call>"):
            assert attr(added[name]) & ATTR_USER_DEFINED, name
        assert attr(5) & ATTR_NORMAL
        assert attr(n_vocab - 1) & ATTR_UNUSED
        assert m.meta("tokenizer.ggml.pre") == "qwen2"
        assert int(m.meta("tokenizer.ggml.eos_token_id")) == added["<|im_end|>"]
        assert int(m.meta("tokenizer.ggml.padding_token_id")) == added["<|endoftext|>"]
        assert m.meta("tokenizer.ggml.add_bos_token") == "false"


def test_yarn_and_eps_come_from_config(model_dir, float_gguf):
    """tiny-yarn sets rope_scaling yarn x4 and rms_norm_eps 1e-5: llama.cpp must see both."""
    with llamacpp.LlamaCppModel(float_gguf("tiny-yarn", "F32"), vocab_only=True) as m:
        assert m.meta("qwen2.rope.scaling.type") == "yarn"
        assert float(m.meta("qwen2.rope.scaling.factor")) == 4.0
        assert int(m.meta("qwen2.rope.scaling.original_context_length")) == 32768
        assert float(m.meta("qwen2.attention.layer_norm_rms_epsilon")) == pytest.approx(1e-5)
    with llamacpp.LlamaCppModel(float_gguf("tiny-tied", "F32"), vocab_only=True) as m:
        assert m.meta("qwen2.rope.scaling.type") is None  # stock Qwen2.5: no YaRN keys at all


def test_chat_template_from_jinja_file(model_dir, tmp_path):
    import json
    import shutil

    from qconvert.gguf.vocab import read_vocab

    d = tmp_path / "m"
    shutil.copytree(model_dir("tiny-tied"), d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    template = cfg.pop("chat_template")
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "chat_template.jinja").write_text(template)
    assert read_vocab(d, json.loads((d / "config.json").read_text())).chat_template == template


@pytest.mark.parametrize("preset, options", [
    ("Q4_K_M", {"pure": True}),
    ("Q5_K_M", {"output_tensor_type": "Q8_0", "token_embedding_type": "Q4_K"}),
    # IQ3_XXS needs an imatrix except on token_embd/output: the way to put it in a file without one
    ("IQ4_XS", {"output_tensor_type": "IQ3_XXS", "token_embedding_type": "IQ3_XXS"}),
    ("IQ4_NL", {"output_tensor_type": "IQ3_S", "token_embedding_type": "IQ3_S"}),
])
def test_overrides_match_llama_quantize(tmp_path, model_dir, float_gguf, preset, options):
    from qconvert.gguf.export import PlanOptions
    from qconvert.gguf.plan import parse_type

    typed = {k: (parse_type(v) if isinstance(v, str) else v) for k, v in options.items()}
    ours = tmp_path / "ours.gguf"
    export_gguf(model_dir("tiny-untied"), ours, preset, options=PlanOptions(**typed), model_name="qconvert/tiny-untied")
    ref = tmp_path / "llama.gguf"
    llamacpp.llama_quantize(float_gguf("tiny-untied", "BF16"), ref, int(get_preset(preset).file_type),
                            **{k: (int(v) if k.endswith("_type") else v) for k, v in typed.items()})
    _assert_same_tensors(ours, ref)


# ---------------------------------------------------------------- importance matrix

def _random_imatrix(model_path, seed=0):
    """Per-column mean x² for every quantizable matrix (chi²-like, a wide range, some zero columns)."""
    import json

    from qconvert.family import tensor_shapes

    rng = np.random.default_rng(seed)
    config = json.loads((model_path / "config.json").read_text())
    out = {}
    for name, shape in tensor_shapes(config):
        if len(shape) == 2 and name != "token_embd.weight":
            v = (rng.chisquare(2, shape[1]) * 10.0 ** rng.uniform(-2, 2)).astype(np.float32)
            v[rng.random(shape[1]) < 0.05] = 0.0
            out[name] = v
    return out


IMATRIX_PRESETS = ["Q4_K_M", "Q5_K_M", "Q6_K", "Q3_K_M", "Q2_K", "Q4_0", "Q5_0", "Q4_1", "Q2_K_S", "IQ4_NL", "IQ4_XS",
                   "IQ3_XS", "IQ3_S", "IQ3_M", "IQ3_XXS", "IQ2_M", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M", "IQ1_S"]


@pytest.mark.parametrize("preset", IMATRIX_PRESETS)
@pytest.mark.parametrize("fixture", ["tiny-untied", "tiny-fallback"])
def test_imatrix_export_is_byte_identical_to_llama_quantize(tmp_path, model_dir, float_gguf, fixture, preset):
    """With the same importance matrix, qconvert's bytes equal llama_model_quantize's (weighted K-quant and
    I-quant search, the has-imatrix mixture rules such as Q4_1 ffn_down in the first layers of Q4_0, or no Q5_K
    ffn_down in IQ4_XS), on a clean fixture and on the hidden-320 one whose rows fall back."""
    from qconvert.gguf.imatrix import read_imatrix, write_imatrix

    if fixture == "tiny-fallback" and not (preset.startswith("IQ") or preset in ("Q2_K_S", "Q4_K_M")):
        pytest.skip("the fallback fixture runs for the I-quant presets, Q2_K_S and one K-quant preset")
    path = model_dir(fixture)
    im = _random_imatrix(path)
    f = tmp_path / "imatrix.gguf"
    write_imatrix(f, {k: v * 7 for k, v in im.items()}, {k: 7 for k in im}, datasets=["test"], chunk_count=1, chunk_size=7)
    loaded = read_imatrix(f)
    assert all(np.allclose(loaded[k], im[k], rtol=1e-6) for k in im)
    ours = tmp_path / "ours.gguf"
    export_gguf(path, ours, preset, imatrix=loaded, model_name=f"qconvert/{fixture}")
    ref = tmp_path / "llama.gguf"
    llamacpp.llama_quantize(float_gguf(fixture, "BF16"), ref, int(get_preset(preset).file_type), imatrix=loaded)
    _assert_same_tensors(ours, ref)
    assert ours.read_bytes() == ref.read_bytes(), "tensors agree but the files differ (metadata order or padding)"
    if preset in NEEDS_IMATRIX:
        return  # no plain file to compare with: see test_imatrix_required_presets_are_refused_without_one
    plain = tmp_path / "plain.gguf"
    export_gguf(path, plain, preset, model_name=f"qconvert/{fixture}")
    assert plain.read_bytes() != ours.read_bytes(), "the imatrix changed nothing: it was not used"


@pytest.mark.parametrize("preset", NEEDS_IMATRIX)
def test_imatrix_required_presets_are_refused_without_one(tmp_path, model_dir, float_gguf, preset):
    """The presets that need an importance matrix, without one: llama.cpp refuses them, and so does qconvert, before
    writing anything, with a message that says how to get one; with an imatrix lacking one of the tensors, both
    refuse too."""
    from qconvert.errors import CheckpointError, QuantTypeError

    ref = tmp_path / "llama.gguf"
    with pytest.raises(CheckpointError, match="requires an imatrix"):
        llamacpp.llama_quantize(float_gguf("tiny-untied", "BF16"), ref, int(get_preset(preset).file_type))
    ours = tmp_path / "ours.gguf"
    with pytest.raises(QuantTypeError, match="--calib builtin.*--imatrix FILE"):
        export_gguf(model_dir("tiny-untied"), ours, preset)
    im = _random_imatrix(model_dir("tiny-untied"))
    del im["blk.1.attn_q.weight"]
    with pytest.raises(CheckpointError, match="Missing importance matrix for tensor blk.1.attn_q.weight"):
        llamacpp.llama_quantize(float_gguf("tiny-untied", "BF16"), ref, int(get_preset(preset).file_type), imatrix=im)
    with pytest.raises(QuantTypeError, match="no entry for 1 tensor.*blk.1.attn_q.weight"):
        export_gguf(model_dir("tiny-untied"), ours, preset, imatrix=im)
    # libllama leaves a partial file when it refuses; the oracle wrapper removes it, qconvert writes none
    assert list(tmp_path.iterdir()) == []
    assert export_gguf(model_dir("tiny-untied"), None, preset).plan.warnings()[-1].endswith("will require an imatrix!")


@pytest.mark.parametrize("qtype", ["IQ3_XXS", "IQ3_S"])
def test_iq3_with_imatrix_matches_llama_quantize(tmp_path, model_dir, float_gguf, qtype):
    """IQ3 output and token_embd (the IQ3 tensors llama-quantize allows outside the IQ3 presets, which
    qconvert does not offer yet) in an IQ4_XS file, with an importance matrix: whole-file byte identity."""
    from qconvert.constants import GGMLType
    from qconvert.gguf.export import PlanOptions

    path = model_dir("tiny-untied")
    im = _random_imatrix(path)
    t = GGMLType[qtype]
    ours = tmp_path / "ours.gguf"
    export_gguf(path, ours, "IQ4_XS", options=PlanOptions(output_tensor_type=t, token_embedding_type=t), imatrix=im,
                model_name="qconvert/tiny-untied")
    ref = tmp_path / "llama.gguf"
    llamacpp.llama_quantize(float_gguf("tiny-untied", "BF16"), ref, int(get_preset("IQ4_XS").file_type),
                            output_tensor_type=int(t), token_embedding_type=int(t), imatrix=im)
    _assert_same_tensors(ours, ref)
    assert read_gguf(ours).tensors["output.weight"].type == t
    assert ours.read_bytes() == ref.read_bytes()
