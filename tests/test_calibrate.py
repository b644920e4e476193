"""Numerical contracts of the calibration driver (qconvert.calibration.quantize), its data (qconvert.calibset), its model
forward (qconvert.model.qwen2) and the ``qconvert gptq`` / ``qconvert awq`` commands, on the trained demo fixture.

* Forward: qconvert's Qwen2 forward reproduces transformers' float32 logits within 1e-4 (absolute).
* Driver: the GPTQ checkpoint written by the CLI, dequantized and run in our forward, has a lower held-out
  perplexity than round-to-nearest at the same bits/group size (same driver, method "rtn").
* CLI: writes ``<name>-gptq-int4/`` with weights, configs, tokenizer and a model card recording the token count;
  bad inputs fail with a clear message, exit != 0 and no output directory.
* Oracle (only where gptqmodel + optimum are installed): transformers loads the CLI output and its logits match
  our dequantized forward.
"""

from __future__ import annotations

import json
import math
import re
import shutil
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from model_helpers import forward, perplexity, quantized_weights

from qconvert.calibration.quantize import (
    DeviceError,
    calibrate,
    resolve_device,
)
from qconvert.calibset import (
    CalibrationDataError,
    builtin_documents,
    load_calibration,
    render_chatml,
)
from qconvert.cli import main
from qconvert.int4 import GPTQConfig, dequantize_gptq

CALIB_SAMPLES, CALIB_SEQLEN = 8, 128  # 1,024 tokens: enough for a 256-wide model, a few seconds per layer


@pytest.fixture(scope="module")
def demo(model_dir) -> Path:
    return model_dir("demo")


@pytest.fixture(scope="module")
def demo_config(demo) -> dict:
    return json.loads((demo / "config.json").read_text())


@pytest.fixture(scope="module")
def eval_ids(demo) -> torch.Tensor:
    from qconvert.fixtures.corpus import eval_text
    from qconvert.fixtures.models import FIXTURES
    from qconvert.fixtures.train import encode

    return encode(eval_text(), FIXTURES["demo"])[:2048]


@pytest.fixture(scope="module")
def gptq_out(demo, calib_txt, tmp_path_factory) -> Path:
    """``qconvert gptq --model <demo>`` once for the module (the slow part: ~30 s on 2 cores)."""
    out = tmp_path_factory.mktemp("gptq-out")
    rc = main(["gptq", "--model", str(demo), "--calib", str(calib_txt), "--calib-samples", str(CALIB_SAMPLES),
               "--calib-seqlen", str(CALIB_SEQLEN), "--device", "cpu", "--out-dir", str(out), "--quiet"])
    assert rc == 0
    return out / f"{demo.name}-gptq-int4"


def dequantized_checkpoint(demo: Path, out: Path) -> dict[str, torch.Tensor]:
    """The float demo weights with every linear replaced by the dequantized packed tensors of GPTQ output ``out``."""
    from safetensors.torch import load_file

    packed = load_file(out / "model.safetensors")
    weights = quantized_weights(demo, {})
    for name in packed:
        if name.endswith(".qweight"):
            module = name.removesuffix(".qweight")
            t = {k: packed[f"{module}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}
            weights[f"{module}.weight"] = dequantize_gptq(t, 4).float()
    return weights


# -- forward ----------------------------------------------------------------------------------------------------

def _streamed(model: Path, config: dict, ids: torch.Tensor, dtype: torch.dtype, first: int = 0) -> torch.Tensor:
    """The driver's streamed logits (what verify's reference and dequant runner use) for windows ``ids``."""
    from qconvert.calibration.driver import CalibrationSettings, streamed_logits
    from qconvert.io.safetensors import SafetensorsCheckpoint

    return torch.stack(list(streamed_logits(SafetensorsCheckpoint(model), config, ids, first,
                                            CalibrationSettings("cpu", dtype, 1))))


@pytest.mark.parametrize("name", ["demo", "tiny-untied"])
def test_streamed_forward_matches_transformers(model_dir, eval_ids, name: str) -> None:
    """transformers is the oracle for the one forward every scoring path streams (verify's reference included)."""
    transformers = pytest.importorskip("transformers")
    path = model_dir(name)
    config = json.loads((path / "config.json").read_text())
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = eval_ids[:192].reshape(2, 96) % int(config["vocab_size"])
    with torch.no_grad():
        want = model(ids).logits
    got = _streamed(path, config, ids, torch.float32)
    assert got.shape == (2, 95, int(config["vocab_size"]))
    assert torch.allclose(got, want[:, :-1], atol=1e-4, rtol=0), (got - want[:, :-1]).abs().max()
    tail = _streamed(path, config, ids, torch.float32, first=48)  # the scored half only, as verify asks
    assert torch.equal(tail, got[:, 48:])


def test_bf16_streamed_forward_stays_close(demo, demo_config, eval_ids) -> None:
    """The CUDA path's compute dtype, run on the CPU: finite and close to float32."""
    ids = eval_ids[:128].unsqueeze(0)
    f32 = _streamed(demo, demo_config, ids, torch.float32)
    bf16 = _streamed(demo, demo_config, ids, torch.bfloat16)
    assert torch.isfinite(bf16).all()
    assert (bf16 - f32).abs().max() < 0.1 * f32.abs().max()


# -- calibration data -------------------------------------------------------------------------------------------

SCRIPTS = {"Han": ("\u4e00", "\u9fff"), "Cyrillic": ("\u0400", "\u04ff"), "Arabic": ("\u0600", "\u06ff"),
           "Devanagari": ("\u0900", "\u097f"), "Thai": ("\u0e00", "\u0e7f"), "Hangul": ("\uac00", "\ud7a3"),
           "Hiragana": ("\u3040", "\u309f"), "Hebrew": ("\u0590", "\u05ff"), "Greek": ("\u0370", "\u03ff")}


def test_builtin_set_is_natural_multilingual_text_with_code_and_math() -> None:
    docs = builtin_documents()
    assert docs == builtin_documents()
    assert len(docs) >= 150 and all(req and body and "\n### " not in body for req, body in docs)
    text = "".join(a for _, a in docs)
    for script, (lo, hi) in SCRIPTS.items():
        assert sum(lo <= c <= hi for c in text) > 200, f"too little {script} text"
    for marker in ("```python", "```rust", "```go", "```sql", "```cpp", "\\frac", "\\int", "é", "ñ", "ü", "ệ"):
        assert marker in text, marker
    # natural text, not templates: few repeated sentences
    sentences = [x.strip() for x in re.split(r"[.。!?！？]\s*", text) if len(x.strip()) > 40]
    assert len(set(sentences)) > 0.98 * len(sentences)


def test_sampling_is_seeded_and_chat_rendering_is_chatml(demo) -> None:
    a = load_calibration("builtin", demo, chat=False, n_samples=4, seq_len=64, seed=1)
    b = load_calibration("builtin", demo, chat=False, n_samples=4, seq_len=64, seed=1)
    c = load_calibration("builtin", demo, chat=False, n_samples=4, seq_len=64, seed=2)
    assert torch.equal(a.ids, b.ids) and not torch.equal(a.ids, c.ids)
    assert a.ids.shape == (4, 64) and a.n_tokens == 256
    chat = load_calibration("builtin", demo, chat=True, n_samples=2, seq_len=64)
    assert chat.n_source_tokens > a.n_source_tokens
    assert render_chatml("hi", "hello").endswith("<|im_start|>assistant\nhello<|im_end|>\n")


def test_jsonl_source(demo, tmp_path: Path) -> None:
    path = tmp_path / "c.jsonl"
    path.write_text("\n".join(json.dumps({"text": f"line {i} of the calibration text."}) for i in range(50)))
    cal = load_calibration(str(path), demo, chat=False, n_samples=2, seq_len=32)
    assert cal.n_documents == 50 and cal.ids.shape == (2, 32)


@pytest.mark.parametrize("source, needle", [("wikitext2", "local .txt"), ("hf:allenai/c4", "local .txt"),
                                            ("missing.txt", "does not exist")])
def test_unusable_sources_say_why(demo, source: str, needle: str) -> None:
    with pytest.raises(CalibrationDataError, match=needle):
        load_calibration(source, demo, chat=False)


def test_hub_dataset_names_load_through_datasets(demo, monkeypatch) -> None:
    """With a `datasets` package present (a stand-in module here: CI has no network), the short names map to the
    right repo/config/split and only the text column's non-empty rows are used."""
    import sys
    import types

    calls = []

    class FakeDataset:
        column_names = ("text",)

        def __getitem__(self, col):
            return ["", "  ", "The engineer repaired the bridge. " * 40, "工程师修好了那座桥。" * 40]

    fake = types.SimpleNamespace(load_dataset=lambda path, name, split, data_files: calls.append(
        (path, name, split, data_files)) or FakeDataset())
    monkeypatch.setitem(sys.modules, "datasets", fake)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    cal = load_calibration("wikitext2", demo, chat=False, n_samples=2, seq_len=32)
    assert calls[-1] == ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", None)
    assert cal.n_documents == 2
    load_calibration("hf:someone/texts:validation", demo, chat=False, n_samples=1, seq_len=16)
    assert calls[-1] == ("someone/texts", None, "validation", None)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(CalibrationDataError, match="HF_HUB_OFFLINE"):
        load_calibration("c4", demo, chat=False)


# -- chat or raw calibration text: decided by the checkpoint's files ------------------------------------------------

# A chat template in another format than ChatML, written for these tests: it uses what real templates use
# (namespace, loop variables, filters, tojson of non-ASCII text, {% generation %}, raise_exception, special tokens,
# indented block tags that trim_blocks/lstrip_blocks must remove).
OTHER_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(system="Answer briefly.") %}
{% for m in messages %}
    {% if m['role'] == 'system' %}
        {% set ns.system = m['content'] %}
    {% elif m['role'] == 'user' %}
[USER {{ loop.index }}] {{ ns.system }} | {{ m['content'] }}
    {% elif m['role'] == 'assistant' %}
{% generation %}[ANSWER] {{ m['content'] | trim }}{{ eos_token }}{% endgeneration %}
        {% if not loop.last %}

        {% endif %}
    {% else %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}[ANSWER]{% endif %}
meta: {{ {'n': messages | length, 'lang': '中文'} | tojson }}
"""


def _tokenizer_dir(demo: Path, dest: Path, template: str | None, jinja_file: str | None = None,
                   bos: str | None = None) -> Path:
    """The demo's tokenizer files in ``dest`` (all that calibration text needs of a checkpoint), its
    tokenizer_config.json chat template replaced (None: removed), optionally with a chat_template.jinja file."""
    dest.mkdir(parents=True)
    shutil.copy2(demo / "tokenizer.json", dest / "tokenizer.json")
    config = json.loads((demo / "tokenizer_config.json").read_text(encoding="utf-8"))
    del config["chat_template"]
    config |= {"chat_template": template} if template is not None else {}
    config |= {"bos_token": bos} if bos is not None else {}
    (dest / "tokenizer_config.json").write_text(json.dumps(config, ensure_ascii=False), encoding="utf-8")
    if jinja_file is not None:
        (dest / "chat_template.jinja").write_text(jinja_file, encoding="utf-8")
    return dest


@pytest.mark.parametrize("where", ["fixture", "config", "jinja-file"])
def test_chat_text_is_rendered_by_the_checkpoints_template_as_transformers_renders_it(demo, tmp_path: Path,
                                                                                     where: str) -> None:
    """transformers' ``apply_chat_template(messages, tokenize=False)`` is the oracle, for the fixtures' ChatML
    template and for another format given in tokenizer_config.json or in chat_template.jinja (which wins)."""
    transformers = pytest.importorskip("transformers")
    from qconvert.calibset import chat_template, render

    if where == "fixture":
        ckpt = demo
    elif where == "config":
        ckpt = _tokenizer_dir(demo, tmp_path / "ckpt", OTHER_TEMPLATE, bos="<|endoftext|>")
    else:
        chatml = json.loads((demo / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
        ckpt = _tokenizer_dir(demo, tmp_path / "ckpt", chatml, jinja_file=OTHER_TEMPLATE)
    tok = transformers.AutoTokenizer.from_pretrained(ckpt)
    template = chat_template(ckpt)
    docs = [*builtin_documents()[::25], (None, "A document without a request.  ")]
    want = "".join(tok.apply_chat_template([{"role": "user", "content": request or "Continue the text."},
                                            {"role": "assistant", "content": answer}], tokenize=False)
                   for request, answer in docs)
    assert render(docs, chat=True, eos="<|endoftext|>", template=template) == want
    assert ("<|im_start|>" in want) == (where == "fixture")
    talk = [{"role": "system", "content": "Be exact."}, {"role": "user", "content": "2+2? 二加二？"},
            {"role": "assistant", "content": "4"}, {"role": "user", "content": "And 3+3?"}]
    assert template.render(talk, add_generation_prompt=True) == tok.apply_chat_template(
        talk, tokenize=False, add_generation_prompt=True)


def test_chat_or_raw_is_decided_by_the_checkpoint_not_its_name(demo, tmp_path: Path) -> None:
    """auto: a chat template means chat; "instruct" in a name without one means nothing, nor does "base"."""
    import argparse

    from qconvert.calibset import CalibrationSet, uses_chat
    from qconvert.commands.calibargs import calibration_from_args

    chatml = json.loads((demo / "tokenizer_config.json").read_text(encoding="utf-8"))["chat_template"]
    instruct = _tokenizer_dir(demo, tmp_path / "Qwen2.5-7B-Instruct", None)
    base = _tokenizer_dir(demo, tmp_path / "Qwen2.5-7B-base", chatml)
    other = _tokenizer_dir(demo, tmp_path / "other-instruct", OTHER_TEMPLATE)
    assert not uses_chat(instruct) and uses_chat(base) and uses_chat(other)
    assert uses_chat(instruct, "chat") and not uses_chat(base, "raw")

    def calib(ckpt: Path, fmt: str = "auto") -> CalibrationSet:
        args = argparse.Namespace(calib="builtin", calib_format=fmt, calib_samples=2, calib_seqlen=32, seed=0)
        return calibration_from_args(args, ckpt, ckpt.name)

    raw, chat, forced, templated = calib(instruct), calib(base), calib(instruct, "chat"), calib(other)
    assert not raw.chat and chat.chat and forced.chat and templated.chat
    assert "(raw," in raw.describe() and "ChatML-rendered" in chat.describe()
    assert "chat-template-rendered" in templated.describe()
    # forced chat on a checkpoint without a template: Qwen2.5's ChatML (its default system prompt included)
    assert forced.n_source_tokens > chat.n_source_tokens > raw.n_source_tokens
    (instruct / "chat_template.jinja").write_text("{% for m in messages %}{{ m['content'] }", encoding="utf-8")
    with pytest.raises(CalibrationDataError, match="not valid Jinja.*--calib-format raw"):
        calib(instruct)


# -- driver -----------------------------------------------------------------------------------------------------

def kl_to_float(demo: Path, config: dict, weights: dict[str, torch.Tensor], ids: torch.Tensor) -> float:
    """Mean over tokens of KL(float model || quantized model) of the next-token distributions."""
    with torch.no_grad():
        ref = forward(quantized_weights(demo, {}), ids, config).log_softmax(-1)
        got = forward(weights, ids, config).log_softmax(-1)
    return float((ref.exp() * (ref - got)).sum(-1).mean())


def test_true_sequential_hessians_match_transformers_hooks(demo, eval_ids) -> None:
    """Layer 0 of the driver's GPTQ == ``gptq(W, H)`` with H from forward hooks on transformers' own model.

    Group by group (q/k/v -> o -> gate/up -> down) the HF model's earlier linears are replaced by the driver's
    dequantized results, so each group's Hessian sees the quantized earlier groups, as true-sequential GPTQ must;
    this also checks the driver's early-stopping forwards and the Hessian shared by linears with one input.
    """
    transformers = pytest.importorskip("transformers")
    from qconvert.int4 import add_to_hessian, gptq
    from qconvert.registry import spec_for_config

    ids = eval_ids[:1024].reshape(4, 256)
    got: dict = {}
    calibrate(demo, ids, "gptq", GPTQConfig(), got.__setitem__)
    model = transformers.AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    layer = model.model.layers[0]
    for group in spec_for_config(json.loads((demo / "config.json").read_text())).sequential:
        inputs: dict = {}
        hooks = [layer.get_submodule(n).register_forward_pre_hook(
            lambda m, a, n=n, seen=inputs: seen.setdefault(n, []).append(a[0].detach().clone())) for n in group]
        with torch.no_grad():
            model(ids)
        for hk in hooks:
            hk.remove()
        for n in group:
            H = add_to_hessian(None, 0, torch.cat(inputs[n]))[0]
            want = gptq(layer.get_submodule(n).weight.detach().float(), H, GPTQConfig())
            mine = got[f"model.layers.0.{n}"]
            assert (mine.codes != want.codes).float().mean() < 1e-3, n
            assert torch.allclose(mine.dequantize(), want.dequantize(), atol=1e-5 + 1e-3 * want.scales.max()), n
            with torch.no_grad():
                layer.get_submodule(n).weight.copy_(mine.dequantize())


def test_gptq_beats_rtn_on_held_out_text(demo, demo_config, eval_ids, gptq_out, calib_txt) -> None:
    """The CLI's checkpoint, dequantized from its packed tensors, vs RTN of the same scheme (same driver).

    At 4 bits the demo's held-out PPL moves by < 1 % (float 46.31, RTN 46.62, GPTQ 46.29 measured: GPTQ can land
    below float by noise), so the main contract is the KL to the float model: GPTQ's is ~1/3 of RTN's.
    """
    cal = load_calibration(str(calib_txt), demo, chat=False, n_samples=CALIB_SAMPLES, seq_len=CALIB_SEQLEN)
    rtn_linears: dict = {}
    calibrate(demo, cal.ids, "rtn", GPTQConfig(), rtn_linears.__setitem__)
    gptq_weights = dequantized_checkpoint(demo, gptq_out)
    assert len(rtn_linears) == 7 * 4
    rtn_weights = quantized_weights(demo, rtn_linears)
    ppl_rtn, ppl_gptq = perplexity(rtn_weights, demo_config, eval_ids), perplexity(gptq_weights, demo_config, eval_ids)
    batch = eval_ids.reshape(8, 256)
    kl_rtn = kl_to_float(demo, demo_config, rtn_weights, batch)
    kl_gptq = kl_to_float(demo, demo_config, gptq_weights, batch)
    print(f"held-out PPL RTN {ppl_rtn:.3f} GPTQ {ppl_gptq:.3f}; KL to float RTN {kl_rtn:.5f} GPTQ {kl_gptq:.5f}")
    assert ppl_gptq < ppl_rtn
    assert kl_gptq < 0.6 * kl_rtn


# -- CLI --------------------------------------------------------------------------------------------------------

def test_cli_writes_the_expected_directory(gptq_out: Path) -> None:
    names = {p.name for p in gptq_out.iterdir()}
    assert {"config.json", "quantize_config.json", "README.md", "tokenizer.json", "model.safetensors"} <= names
    config = json.loads((gptq_out / "config.json").read_text())
    assert config["quantization_config"]["bits"] == 4 and config["quantization_config"]["desc_act"] is False
    assert config["quantization_config"]["sym"] is True and config["quantization_config"]["group_size"] == 128
    card = (gptq_out / "README.md").read_text()
    assert f"{CALIB_SAMPLES * CALIB_SEQLEN:,}" in card and "GPTQ" in card
    assert not list(gptq_out.parent.glob(".*partial*"))


def test_gguf_from_a_gptq_checkpoint_says_use_the_float_one(gptq_out: Path, tmp_path: Path, capsys) -> None:
    rc = main(["gguf", "--model", str(gptq_out), "--type", "Q8_0", "--out-dir", str(tmp_path), "--quiet"])
    assert rc != 0 and "already quantized (gptq)" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


@pytest.mark.slow
def test_pad_intermediate_keeps_the_model_and_pads_with_zeros(demo, tmp_path: Path) -> None:
    """--pad-intermediate (Qwen's vLLM tensor-parallel recipe): 768 -> 1024 zero rows/columns. gate/up see the same
    inputs, so their real rows are bit-identical; down_proj's extra inputs are dead columns (zero weights), and its
    real columns differ only through GPTQ's damping (a fraction of the mean Hessian diagonal, dead columns
    counting 1 as in the reference GPTQ), which moves codes but not the size of the quantization error."""
    from safetensors.torch import load_file

    from qconvert.io.safetensors import SafetensorsCheckpoint

    outs = []
    for pad in (False, True):
        out = tmp_path / ("pad" if pad else "plain")
        argv = ["gptq", "--model", str(demo), "--calib-samples", "2", "--calib-seqlen", "64", "--device", "cpu",
                "--out-dir", str(out), "--quiet", "--no-eval"] + (["--pad-intermediate"] if pad else [])
        assert main(argv) == 0
        outs.append(out / f"{demo.name}-gptq-int4")
    plain, padded = outs
    assert json.loads((padded / "config.json").read_text())["intermediate_size"] == 1024
    a, b = load_file(plain / "model.safetensors"), load_file(padded / "model.safetensors")
    src = SafetensorsCheckpoint(demo)
    for i in range(4):
        m = f"model.layers.{i}.mlp"
        for proj in ("gate_proj", "up_proj", "down_proj"):
            wa = dequantize_gptq({k: a[f"{m}.{proj}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, 4)
            wb = dequantize_gptq({k: b[f"{m}.{proj}.{k}"] for k in ("qweight", "qzeros", "scales", "g_idx")}, 4)
            if proj == "down_proj":
                assert wb.shape == (256, 1024) and not wb[:, 768:].any(), (i, proj)
                wb = wb[:, :768]
            else:
                assert wb.shape == (1024, 256) and not wb[768:].any(), (i, proj)
                wb = wb[:768]
            if i == 0 and proj != "down_proj":  # the same float inputs and the same Hessian
                assert torch.equal(wb, wa), proj
            w = torch.from_numpy(src.read_f32(f"{m}.{proj}.weight"))
            err_plain, err_pad = (wa - w).norm().item(), (wb - w).norm().item()
            assert abs(err_pad - err_plain) < 0.1 * err_plain, (i, proj, err_plain, err_pad)


def test_model_card_quality_is_qconvert_verify_and_matches_transformers(demo, gptq_out: Path, tmp_path: Path,
                                                                      capsys) -> None:
    """One quality definition: the card states what `qconvert verify` measures for the same artifact, text and
    ctx (same digits); and those figures equal transformers run on the float weights and on the checkpoint's
    dequantized weights, scored on the same positions (ctx/2 .. ctx-2 of each window)."""
    transformers = pytest.importorskip("transformers")
    from qconvert.quality import CARD_CHUNKS, CARD_CTX, describe
    from qconvert.verify import ArtifactResult, eval_tokens

    card = (gptq_out / "README.md").read_text()
    out = tmp_path / "verify.json"
    rc = main(["verify", str(gptq_out), "--reference", str(demo), "--ctx", str(CARD_CTX), "--chunks",
               str(CARD_CHUNKS), "--json", str(out), "--max-dppl", "100", "--max-kl", "10"])
    capsys.readouterr()
    assert rc == 0
    r = ArtifactResult.from_dict(json.loads(out.read_text())["results"][0])
    assert "## Measured quality" in card and describe(r) in card, (describe(r), card)

    ids = torch.from_numpy(eval_tokens(demo).ids[:CARD_CHUNKS * CARD_CTX].astype("int64")).reshape(CARD_CHUNKS, -1)

    def run(weights: dict | None) -> torch.Tensor:
        model = transformers.AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
        if weights is not None:
            model.load_state_dict({k: v for k, v in weights.items() if k in model.state_dict()}, strict=False)
        with torch.no_grad():
            return torch.log_softmax(model(ids).logits.double(), -1)[:, CARD_CTX // 2:-1]

    lf, lq = run(None), run(dequantized_checkpoint(demo, gptq_out))
    tgt = ids[:, CARD_CTX // 2 + 1:, None]
    ppl = [math.exp(-lp.gather(2, tgt).mean().item()) for lp in (lf, lq)]
    kl = (lf.exp() * (lf - lq)).sum(-1).mean().item()
    top1 = (lf.argmax(-1) == lq.argmax(-1)).double().mean().item()
    assert r.n_scored == CARD_CHUNKS * (CARD_CTX // 2 - 1)
    assert r.ppl_ref == pytest.approx(ppl[0], rel=1e-4) and r.ppl == pytest.approx(ppl[1], rel=1e-4)
    assert r.kl_mean == pytest.approx(kl, rel=5e-2, abs=1e-5) and r.top1 == pytest.approx(top1, abs=2e-3)
    assert r.ppl != r.ppl_ref


def test_gptq_cli_group_aware_writes_the_plain_layout(demo, tmp_path: Path) -> None:
    """--group-aware: natural g_idx and desc_act false (what every loader takes), recorded in meta and the card."""
    rc = main(["gptq", "--model", str(demo), "--group-aware", "--group-size", "64", "--calib-samples", "4",
               "--calib-seqlen", "64", "--device", "cpu", "--out-dir", str(tmp_path), "--quiet"])
    assert rc == 0
    out = tmp_path / f"{demo.name}-gptq-int4"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["desc_act"] is False and qcfg["meta"]["act_group_aware"] is True
    assert "group-aware reordering" in (out / "README.md").read_text()
    from safetensors.torch import load_file

    g_idx = load_file(out / "model.safetensors")["model.layers.0.mlp.down_proj.g_idx"]
    assert torch.equal(g_idx, torch.arange(g_idx.numel(), dtype=torch.int32) // 64)
    with pytest.raises(SystemExit) as e:  # argparse: the three orders are mutually exclusive
        main(["gptq", "--model", str(demo), "--group-aware", "--act-order", "--out-dir", str(tmp_path)])
    assert e.value.code == 2


def test_awq_cli_writes_a_gemm_checkpoint(demo, tmp_path: Path) -> None:
    """A tiny AWQ run (256 builtin ChatML tokens, ~15 s): directory name, AWQ config, rescaled norms, model card."""
    rc = main(["awq", "--model", str(demo), "--calib-samples", "4", "--calib-seqlen", "64", "--calib-format", "chat",
               "--search-samples", "2", "--clip-all", "--device", "cpu", "--out-dir", str(tmp_path), "--quiet"])
    assert rc == 0
    out = tmp_path / f"{demo.name}-awq"
    qcfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qcfg["quant_method"] == "awq" and qcfg["version"] == "gemm" and qcfg["zero_point"] is True
    from safetensors.torch import load_file

    tensors = load_file(out / "model.safetensors")
    assert tensors["model.layers.0.mlp.down_proj.qweight"].shape == (768, 256 // 8)
    source = quantized_weights(demo, {})["model.layers.0.input_layernorm.weight"].half()
    assert not torch.equal(tensors["model.layers.0.input_layernorm.weight"], source)  # AWQ folded 1/s into it
    card = (out / "README.md").read_text()
    assert "ChatML-rendered" in card
    search = next(line for line in card.splitlines() if line.startswith("| AWQ search |"))
    assert "on 2 samples" in search and "every linear" in search  # --search-samples, --clip-all


def test_awq_search_samples_limits_only_the_grid_forwards(demo, eval_ids) -> None:
    """``search_samples = n`` (all samples) is the default run exactly; fewer samples change the chosen scales."""
    from qconvert.int4 import AWQConfig

    ids = eval_ids[:256].reshape(4, 64)
    runs = {}
    for k in (0, 4, 1):
        got: dict = {}
        calibrate(demo, ids, "awq", AWQConfig(n_grid=5, clip_grid=5, search_samples=k), got.__setitem__,
                  lambda name, t: None)
        runs[k] = {name: q.dequantize() for name, q in got.items()}
    assert all(torch.equal(w, runs[4][name]) for name, w in runs[0].items())
    assert not all(torch.equal(w, runs[1][name]) for name, w in runs[0].items())
    from qconvert.errors import QuantTypeError

    with pytest.raises(QuantTypeError, match="search_samples"):
        AWQConfig(search_samples=-1)


def test_awq_clip_all_also_clips_q_and_k(demo, eval_ids) -> None:
    """AutoAWQ leaves q/k unclipped (their error passes through the softmax); ``clip_all`` searches them too.

    With no scale search (``n_grid=0``: only s = 1), layer 0's q/k are then plain zero-point RTN of the checkpoint's
    weights by default, and differ from it with ``clip_all``; the clipped groups' ranges only shrink.
    """
    from qconvert.int4 import AWQConfig, rtn

    ids = eval_ids[:256].reshape(4, 64)
    weights = quantized_weights(demo, {})
    runs = {}
    for clip_all in (False, True):
        got: dict = {}
        calibrate(demo, ids, "awq", AWQConfig(n_grid=0, clip_all=clip_all), got.__setitem__, lambda n, t: None)
        runs[clip_all] = got
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.k_proj"):
        plain = rtn(weights[f"{name}.weight"].float(), 4, 128, sym=False)
        assert torch.equal(runs[False][name].codes, plain.codes)
        assert not torch.equal(runs[True][name].codes, plain.codes)
        assert (runs[True][name].scales <= plain.scales).all()
    v = "model.layers.0.self_attn.v_proj"  # clipped either way: same result
    assert torch.equal(runs[False][v].codes, runs[True][v].codes)


def _fails_cleanly(capsys, tmp_path: Path, argv: list[str], needle: str) -> None:
    out = tmp_path / "out"
    rc = main([*argv, "--out-dir", str(out), "--quiet", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc != 0 and needle in err, err
    assert not out.exists() or not any(out.iterdir())


def test_bad_bits_fails_cleanly(demo, capsys, tmp_path: Path) -> None:
    _fails_cleanly(capsys, tmp_path, ["gptq", "--model", str(demo), "--bits", "5"], "bits")


def test_short_text_fails_cleanly(demo, capsys, tmp_path: Path) -> None:
    short = tmp_path / "short.txt"
    short.write_text("only a few words")
    _fails_cleanly(capsys, tmp_path, ["gptq", "--model", str(demo), "--calib", str(short)], "fewer than one sample")


def test_group_size_not_dividing_fails_cleanly(demo, capsys, tmp_path: Path) -> None:
    odd = tmp_path / "odd"
    shutil.copytree(demo, odd)
    config = json.loads((odd / "config.json").read_text())
    config["intermediate_size"] = 800  # down_proj in-dim 800 is not a multiple of 128
    (odd / "config.json").write_text(json.dumps(config))
    _fails_cleanly(capsys, tmp_path, ["gptq", "--model", str(odd)], "down_proj")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_gpu_fails_cleanly(demo, capsys, tmp_path: Path) -> None:
    with pytest.raises(DeviceError, match="no CUDA GPU"):
        resolve_device("cuda")
    out = tmp_path / "out"
    rc = main(["awq", "--model", str(demo), "--device", "cuda", "--out-dir", str(out), "--quiet"])
    assert rc != 0 and "--device cpu" in capsys.readouterr().err
    assert not out.exists()


def test_existing_output_is_kept_without_force(demo, gptq_out, capsys) -> None:
    rc = main(["gptq", "--model", str(demo), "--out-dir", str(gptq_out.parent), "--device", "cpu", "--quiet"])
    assert rc != 0 and "--force" in capsys.readouterr().err


# -- oracle -----------------------------------------------------------------------------------------------------

def test_transformers_loads_the_cli_output(demo, demo_config, eval_ids, gptq_out) -> None:
    pytest.importorskip("gptqmodel")
    pytest.importorskip("optimum")
    from transformers import AutoModelForCausalLM

    weights = dequantized_checkpoint(demo, gptq_out)
    ids = eval_ids[:64].unsqueeze(0)
    model = AutoModelForCausalLM.from_pretrained(gptq_out, dtype=torch.float16).eval()
    with torch.no_grad():
        got = model(ids).logits.float()
    want = forward({n: t.half().float() for n, t in weights.items()}, ids, demo_config)
    # fp16 activations in the loader vs f32 here: agree to a few 1e-2 on logits of magnitude ~10
    assert (got - want).abs().max() < 0.1, (got - want).abs().max()


@pytest.mark.slow
def test_awq_beats_rtn_on_held_out_text(demo, demo_config, eval_ids, calib_txt) -> None:
    """AWQ through the driver (~10 s on an idle 2-core machine, ~90 s on a busy one): measured KL to float 0.0012 vs RTN 0.0023 (g128, 4-bit)."""
    from qconvert.int4 import AWQConfig

    cal = load_calibration(str(calib_txt), demo, chat=False, n_samples=CALIB_SAMPLES, seq_len=CALIB_SEQLEN)
    rtn_linears: dict = {}
    calibrate(demo, cal.ids, "rtn", GPTQConfig(sym=False), rtn_linears.__setitem__)
    awq_linears: dict = {}
    awq_floats: dict = {}
    calibrate(demo, cal.ids, "awq", AWQConfig(), awq_linears.__setitem__, awq_floats.__setitem__)
    assert any(n.endswith("input_layernorm.weight") for n in awq_floats)
    batch = eval_ids.reshape(8, 256)
    kl_rtn = kl_to_float(demo, demo_config, quantized_weights(demo, rtn_linears), batch)
    kl_awq = kl_to_float(demo, demo_config, quantized_weights(demo, awq_linears, awq_floats), batch)
    assert kl_awq < kl_rtn


def test_gptq_and_awq_options_are_one_table_for_the_cli_and_recipes() -> None:
    """Every option name is a ``qconvert gptq/awq`` dest and a recipe key, and sets its config field."""
    import dataclasses

    from qconvert.cli import build_parser
    from qconvert.commands.int4 import _config
    from qconvert.int4 import AWQConfig, GPTQConfig
    from qconvert.int4.options import AWQ_OPTIONS, GPTQ_OPTIONS, int4_config
    from qconvert.release.recipe import FORMAT_KEYS

    for method, table, cls in (("gptq", GPTQ_OPTIONS, GPTQConfig), ("awq", AWQ_OPTIONS, AWQConfig)):
        assert set(table) <= set(FORMAT_KEYS[method]), method
        assert set(table.values()) <= {f.name for f in dataclasses.fields(cls)}, method
        assert int4_config(method, {}) == cls() == int4_config(method, dict.fromkeys(table))  # None: the default
    cli_dests = set(vars(build_parser().parse_args(["gptq", "--model", "m"])))
    assert set(GPTQ_OPTIONS) <= cli_dests
    assert set(AWQ_OPTIONS) <= set(vars(build_parser().parse_args(["awq", "--model", "m"]))) | {"n_grid", "clip_grid"}
    changed = int4_config("gptq", {"bits": 8, "group_size": 64, "sym": False, "act_order": True,
                                   "static_groups": True, "damp": 0.05})
    assert (changed.bits, changed.group_size, changed.sym, changed.desc_act, changed.static_groups,
            changed.damp_percent) == (8, 64, False, True, True, 0.05)
    assert int4_config("gptq", {"group_aware": True}).group_aware is True
    awq = int4_config("awq", {"group_size": 64, "n_grid": 10, "clip_grid": 5, "search_samples": 3, "clip_all": True})
    assert (awq.group_size, awq.n_grid, awq.clip_grid, awq.search_samples, awq.clip_all) == (64, 10, 5, 3, True)
    assert _config(build_parser().parse_args(["awq", "--model", "m", "--clip-all"])).clip_all is True


def test_gptq_cli_sym_and_asym() -> None:
    from qconvert.cli import build_parser
    from qconvert.commands.int4 import _config

    parse = build_parser().parse_args
    assert _config(parse(["gptq", "--model", "m"])).sym is True
    assert _config(parse(["gptq", "--model", "m", "--asym"])).sym is False
    assert _config(parse(["gptq", "--model", "m", "--bits", "8", "--damp", "0.05"])).damp_percent == 0.05


@pytest.mark.parametrize("command", ["gptq", "w8a8"])
def test_a_failed_quality_measurement_leaves_nothing_under_the_final_name(demo, capsys, tmp_path: Path, monkeypatch,
                                                                          command: str) -> None:
    """The model card's quality is measured on the completed checkpoint before it is moved into place, so when the
    measurement fails (here: the evaluation runtime raises) the command fails and no directory is published."""
    import qconvert.quality
    from qconvert.verify import VerifyError

    seen: list[Path] = []

    def broken(source_dir: Path, artifact: Path, **kwargs: object) -> None:
        seen.append(Path(artifact))
        assert (Path(artifact) / "config.json").exists()  # a whole checkpoint, under its temporary name
        raise VerifyError("the evaluation runtime failed (planted)")

    monkeypatch.setattr(qconvert.quality, "measure", broken)
    extra = ["--calib-samples", "2", "--calib-seqlen", "64"] if command == "gptq" else []
    _fails_cleanly(capsys, tmp_path, [command, "--model", str(demo), *extra], "planted")
    assert seen and not seen[0].exists()
