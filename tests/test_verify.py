"""Verification contracts (``qconvert.verify``, ``qconvert verify``, ``qconvert.testing``).

1. The metrics equal a direct float64 full-softmax computation; the top-K KL estimate is a lower bound of the
   full KL and within a stated bound of it.
2. The method: the reference's PPL equals an independent transformers cross-entropy over the same scored
   positions; llama.cpp running a float GGUF reproduces it (ΔPPL ~ 0, KL ~ 1e-8).
3. Gates: correct GGUF/GPTQ artifacts pass the default thresholds, deliberately damaged ones (block scales x1.5
   in one tensor / one layer) fail them; baselines catch regressions; the pytest helper asserts in one line.
4. Bad input fails with a clear error before any expensive work.

All on the trained ``demo`` fixture, windows of 128 tokens (63 scored positions each).
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from qconvert.errors import (
    CheckpointError,
    QConvertError,
    RuntimeMissingError,
    TokenizerError,
)
from qconvert.verify import (
    ArtifactResult,
    EvalTextError,
    VerifyError,
    build_reference,
    check,
    compare_baseline,
    default_thresholds,
    eval_tokens,
    metrics,
    read_baseline,
    verify_artifact,
    write_baseline,
    write_report,
)
from qconvert.verify.tokens import tokens_sha256

CTX, CHUNKS = 128, 6


@pytest.fixture(scope="module")
def demo(model_dir) -> Path:
    return model_dir("demo")


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("verify-cache")


@pytest.fixture(scope="module")
def tokens(demo):
    return eval_tokens(demo)


@pytest.fixture(scope="module")
def ref(demo, tokens, cache):
    return build_reference(demo, tokens, ctx=CTX, chunks=CHUNKS, cache_dir=cache, progress=False)


@pytest.fixture(scope="module")
def gguf(demo, tmp_path_factory):
    from qconvert.gguf.export import export_gguf

    root, made = tmp_path_factory.mktemp("verify-gguf"), {}

    def get(preset: str) -> Path:
        if preset not in made:
            made[preset] = root / f"demo-{preset.lower()}.gguf"
            export_gguf(demo, made[preset], preset)
        return made[preset]
    return get


@pytest.fixture(scope="module")
def int4(demo, tmp_path_factory):
    """4-bit g128 checkpoints of demo: ``rtn`` (round-to-nearest, written in the GPTQ v1 format: fast), ``gptq``
    and ``awq`` (calibrated on 8 x 128 tokens of the built-in set: slow tests only)."""
    from qconvert.calibration.quantize import CalibrationSettings
    from qconvert.calibset import load_calibration
    from qconvert.int4 import AWQConfig, GPTQConfig
    from qconvert.pipelines.int4 import write_int4

    root, made = tmp_path_factory.mktemp("verify-int4"), {}
    calib = load_calibration("builtin", demo, chat=False, n_samples=8, seq_len=128)

    def get(method: str) -> Path:
        if method not in made:
            cfg = AWQConfig() if method == "awq" else GPTQConfig()
            made[method] = root / f"demo-{method}"
            write_int4(demo, "demo", made[method], method, cfg, calib, CalibrationSettings(), evaluate=False)
        return made[method]
    return get


# ---------------------------------------------------------------- text and tokens


def _lines(text: str) -> set[str]:
    return {ln.strip() for ln in text.splitlines() if len(ln.strip()) >= 25}


def test_eval_text_shares_no_line_with_the_calibration_set():
    from qconvert.calibset import builtin_documents, render
    from qconvert.verify.tokens import default_text

    calib = render(builtin_documents(), chat=True, eos="<|endoftext|>")
    shared = _lines(default_text()) & _lines(calib)
    assert not shared, f"evaluation and calibration texts share lines: {sorted(shared)[:3]}"


def test_tokens_are_hashed_and_sourced(demo, tokens, tmp_path):
    assert tokens.source == "qconvert-eval-v1" and tokens.ids.dtype == np.int32 and tokens.n_tokens > 5000
    assert tokens.sha256 == tokens_sha256(tokens.ids) == eval_tokens(demo).sha256
    f = tmp_path / "t.txt"
    f.write_text("Hello world. 你好。 def f(x): return x\n", encoding="utf-8")
    other = eval_tokens(demo, text_file=f)
    assert other.source == "file:t.txt" and other.sha256 != tokens.sha256


# ---------------------------------------------------------------- metrics


def _direct(ref_logits: np.ndarray, art_logits: np.ndarray, targets: np.ndarray) -> dict[str, np.ndarray]:
    """The definitions, over the full vocabulary, in float64."""
    def logp(x):
        x = x.astype(np.float64)
        return x - np.log(np.exp(x - x.max(1, keepdims=True)).sum(1, keepdims=True)) - x.max(1, keepdims=True)
    lp, lq = logp(ref_logits), logp(art_logits)
    n = len(targets)
    top5 = [len(set(np.argsort(-ref_logits[i])[:5]) & set(np.argsort(-art_logits[i])[:5])) / 5 for i in range(n)]
    return {"nll": -lq[np.arange(n), targets], "kl": (np.exp(lp) * (lp - lq)).sum(1),
            "top1": (ref_logits.argmax(1) == art_logits.argmax(1)).astype(float), "top5": np.array(top5)}


@pytest.mark.parametrize("vocab", [48, 3000])
def test_metrics_equal_a_float64_full_softmax(vocab):
    """V=48 < K: the cache holds the whole distribution, so KL is exact. V=3000 (tail mass ~0.8): the sampled
    tail term makes the estimate unbiased; its mean over 200 positions is within 3% of the full KL."""
    rng = np.random.default_rng(0)
    ref_logits = (rng.standard_normal((200, vocab)) * 3).astype(np.float32)
    art_logits = ref_logits + (rng.standard_normal(ref_logits.shape) * 0.3).astype(np.float32)
    targets = rng.integers(0, vocab, 200)
    s = metrics.compare(torch.from_numpy(art_logits), torch.from_numpy(targets), metrics.summarize(torch.from_numpy(ref_logits)))
    want = _direct(ref_logits, art_logits, targets)
    np.testing.assert_allclose(s.nll, want["nll"], rtol=0, atol=2e-5)
    np.testing.assert_array_equal(s.top1, want["top1"])
    np.testing.assert_array_equal(s.top5, want["top5"])
    np.testing.assert_allclose(metrics.full_kl(ref_logits, art_logits), want["kl"], rtol=1e-10)
    topk = np.sort(np.argsort(-ref_logits, 1)[:, :metrics.TOP_K], 1)
    d = np.abs(np.take_along_axis(art_logits - ref_logits, topk, 1).astype(np.float64))
    np.testing.assert_allclose(s.abs_dlogit_max, d.max(1), atol=2e-5)
    if vocab <= metrics.TOP_K:
        np.testing.assert_allclose(s.kl, want["kl"], rtol=1e-3, atol=2e-6)
    else:
        assert abs(s.kl.mean() / want["kl"].mean() - 1) < 0.03, (s.kl.mean(), want["kl"].mean())


# ---------------------------------------------------------------- the reference and llama.cpp on the same windows


def test_reference_ppl_equals_direct_cross_entropy(demo, ref):
    """An independent computation: transformers logits of every position, cross-entropy over ctx/2 .. ctx-2."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    ids = torch.from_numpy(ref.windows.astype(np.int64))
    with torch.no_grad():
        logits = model(ids).logits.double()
    first = CTX // 2
    nll = torch.nn.functional.cross_entropy(logits[:, first:-1].reshape(-1, logits.shape[-1]),
                                            ids[:, first + 1:].reshape(-1))
    assert ref.n_scored == CTX - 1 - first == 63 and ref.windows.shape == (CHUNKS, CTX)
    assert ref.ppl == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_reference_is_cached_on_disk(demo, tokens, ref, cache):
    again = build_reference(demo, tokens, ctx=CTX, chunks=CHUNKS, cache_dir=cache, progress=False)
    assert again.meta["cache"] == ref.meta["cache"] and Path(again.meta["cache"]).parent == cache
    np.testing.assert_array_equal(again.topk.ids, ref.topk.ids)
    np.testing.assert_array_equal(again.target_logp, ref.target_logp)
    other = build_reference(demo, tokens, ctx=CTX, chunks=CHUNKS - 1, cache_dir=cache, progress=False)
    assert other.meta["cache"] != ref.meta["cache"]
    sub = ref.subset(CHUNKS - 1)  # the first windows of a longer run are exactly a shorter run
    for f in ("ids", "logp", "lse", "log_tail", "tail_ids", "tail_logp"):
        np.testing.assert_array_equal(getattr(sub.topk, f), getattr(other.topk, f))
    np.testing.assert_array_equal(sub.target_logp, other.target_logp)
    assert sub.ppl == other.ppl


def test_f32_gguf_in_llamacpp_reproduces_the_reference(ref, gguf):
    """Measured: ΔPPL ~2e-6 %, KL ~2e-8, top-1 100%, max |Δlogit| ~5e-3."""
    r = verify_artifact(gguf("F32"), ref, progress=False)
    assert (r.kind, r.runtime, r.format) == ("gguf", "llama.cpp", "F32")
    assert r.ppl == pytest.approx(ref.ppl, rel=1e-4)
    assert abs(r.dppl_pct) < 1e-2 and r.kl_mean < 1e-6 and r.kl_p99 < 1e-5
    assert r.top1 >= 0.995 and r.top5 >= 0.995 and r.max_abs_dlogit < 0.05
    assert r.bits_per_weight == 32.0 and r.size_bytes == gguf("F32").stat().st_size
    assert r.tokens_per_s > 0 and r.tokens_sha256 == ref.tokens_sha256 and r.n_scored == CHUNKS * 63


def test_cached_kl_is_within_five_percent_of_full_kl(ref, gguf):
    """On real logits (Q4_K_M in llama.cpp vs transformers), the cached estimate vs the full-vocabulary KL.

    Measured on 126 positions: within ~1-2%; the top-64 terms alone (no tail samples) give only ~52%."""
    from qconvert.verify.artifacts import LlamaCppRunner, hf_scored_logits, load_hf

    model = load_hf(ref.reference_dir, "cpu", torch.float32)
    runner = LlamaCppRunner(gguf("Q4_K_M"), CTX)
    try:
        est, full = [], []
        for w in range(2):
            art = runner.window(ref.windows[w], ref.first)
            full.append(metrics.full_kl(hf_scored_logits(model, ref.windows[w], ref.first, "cpu").numpy(), art.numpy()))
            est.append(metrics.compare(art, torch.from_numpy(ref.targets(w)), ref.window_topk(w)).kl)
    finally:
        runner.close()
    est, full = np.concatenate(est), np.concatenate(full)
    assert abs(est.mean() / full.mean() - 1) < 0.05, f"cached KL {est.mean():.3e} vs full {full.mean():.3e}"


def test_reference_directory_verified_against_itself_is_exact(demo, ref):
    r = verify_artifact(demo, ref, progress=False)
    assert r.kind == "hf" and r.runtime == "transformers"
    assert abs(r.dppl_pct) < 1e-4 and abs(r.kl_mean) < 1e-7 and r.top1 == 1.0


# ---------------------------------------------------------------- gates: correct passes, damaged fails


def _damage_q80(src: Path, dst: Path, tensor: str, factor: float = 1.5) -> None:
    """Multiply every Q8_0 block scale (the fp16 before each block's 32 int8) of ``tensor`` by ``factor``."""
    from qconvert.constants import GGMLType
    from qconvert.gguf.reader import read_gguf

    g = read_gguf(src)
    t = g.tensors[tensor]
    assert t.type == GGMLType.Q8_0
    raw = bytearray(src.read_bytes())
    start = g.data_start + t.offset
    blocks = np.frombuffer(raw, dtype=np.uint8, count=t.nbytes, offset=start).reshape(-1, 34).copy()
    d = blocks[:, :2].copy().view(np.float16)
    blocks[:, :2] = (d.astype(np.float32) * factor).astype(np.float16).view(np.uint8).reshape(-1, 2)
    raw[start:start + t.nbytes] = blocks.tobytes()
    dst.write_bytes(bytes(raw))


def _damage_gptq(src: Path, dst: Path, layer: int, factor: float = 1.5) -> None:
    """Multiply the fp16 scales of every linear in one decoder layer by ``factor``."""
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(f)
        for name in tensors:
            if name.startswith(f"model.layers.{layer}.") and name.endswith(".scales"):
                tensors[name] = (tensors[name].astype(np.float32) * factor).astype(np.float16)
        save_file(tensors, f, metadata={"format": "pt"})


def _gate(r: ArtifactResult) -> list[str]:
    return check(r, default_thresholds(r.n_params, r.kind, r.bits_per_weight))


def test_q8_0_passes_and_damaged_q8_0_fails(ref, gguf, tmp_path):
    """Measured: Q8_0 ΔPPL +0.004%, KL 3e-5 (gate 0.5%, 0.0023); blk.0.attn_v with its scales x1.5: ΔPPL +1.0%."""
    good = verify_artifact(gguf("Q8_0"), ref, progress=False)
    assert _gate(good) == [], good
    bad_path = tmp_path / "damaged-q8_0.gguf"
    _damage_q80(gguf("Q8_0"), bad_path, "blk.0.attn_v.weight")
    bad = verify_artifact(bad_path, ref, progress=False)
    assert bad.kl_mean > 10 * good.kl_mean
    assert _gate(bad), f"damaged Q8_0 passed: ΔPPL {bad.dppl_pct:+.3f}%, KL {bad.kl_mean:.5f}"


def test_q4_k_m_passes(ref, gguf):
    seen: dict[int, np.ndarray] = {}
    r = verify_artifact(gguf("Q4_K_M"), ref, progress=False, on_scored=lambda w, st: seen.setdefault(w, st.nll))
    assert 4.5 < r.bits_per_weight < 5.5 and r.format == "Q4_K_M"
    assert _gate(r) == [] and r.top1 > 0.9
    # on_scored hands out every window's per-position NLL once: together they are the perplexity reported
    assert sorted(seen) == list(range(CHUNKS)) and all(v.shape == (ref.n_scored,) for v in seen.values())
    assert r.ppl == pytest.approx(math.exp(float(np.concatenate(list(seen.values())).mean())), rel=1e-9)


def test_gptq_format_passes_and_damaged_one_fails(ref, int4, tmp_path):
    """Measured (bfloat16 dequantized forward, AMX CPU): ΔPPL -0.03%, KL 0.0028 (gate 13.7%, 0.123); layer 0's
    scales x2: ΔPPL +23.7%, KL 0.204. (x1.5 gave +12.2% there: too close to the gate to tell damage apart.)"""
    good = verify_artifact(int4("rtn"), ref, progress=False)
    assert (good.kind, good.runtime, good.format) == ("gptq", "qconvert-dequant", "int4-g128")
    assert 4.0 < good.bits_per_weight < 4.5
    assert _gate(good) == [], good
    _damage_gptq(int4("rtn"), tmp_path / "damaged", layer=0, factor=2.0)
    bad = verify_artifact(tmp_path / "damaged", ref, progress=False)
    assert _gate(bad), f"damaged GPTQ passed: ΔPPL {bad.dppl_pct:+.3f}%, KL {bad.kl_mean:.5f}"


@pytest.mark.slow
@pytest.mark.parametrize("method", ["gptq", "awq"])
def test_calibrated_int4_passes(ref, int4, method):
    r = verify_artifact(int4(method), ref, progress=False)
    assert r.kind == method and _gate(r) == [], r


def test_gptqmodel_path_is_skipped_or_agrees(ref, int4):
    from qconvert.verify.artifacts import gptqmodel_available

    if not gptqmodel_available():
        with pytest.raises(RuntimeMissingError, match="gptqmodel|GPTQModel"):
            verify_artifact(int4("rtn"), ref, runtime="gptqmodel", progress=False)
        return
    # the same weights through GPTQModel's kernel and through qconvert's dequantized forward agree. Measured on an
    # AMX CPU (both bf16): ΔPPL -0.05% vs -0.03%, KL 0.00292 vs 0.00280, top-1 0.939 vs 0.931 (an absolute top-1
    # bound of 0.95, met on the previous machine, would fail both paths here)
    ours = verify_artifact(int4("rtn"), ref, progress=False)
    kernel = verify_artifact(int4("rtn"), ref, runtime="gptqmodel", progress=False)
    assert abs(kernel.dppl_pct - ours.dppl_pct) < 0.5
    assert abs(kernel.kl_mean - ours.kl_mean) < 0.2 * ours.kl_mean and abs(kernel.top1 - ours.top1) < 0.03
    assert _gate(kernel) == [], kernel


def test_default_thresholds_shrink_with_size_and_bits():
    t = default_thresholds
    assert t(int(72e9), "gguf", 5.0).max_dppl_pct < t(int(0.5e9), "gguf", 5.0).max_dppl_pct
    assert t(int(0.5e9), "gguf", 8.5).max_dppl_pct < t(int(0.5e9), "gguf", 4.5).max_dppl_pct
    assert t(int(0.5e9), "gguf", 4.5).max_kl < t(int(0.5e9), "gguf", 3.0).max_kl
    assert t(int(1e9), "hf", 16).max_dppl_pct == 0.5


# ---------------------------------------------------------------- baselines, JSON, report, the pytest helper


def test_baseline_round_trip_and_regression(ref, gguf, tmp_path):
    r = verify_artifact(gguf("Q8_0"), ref, progress=False)
    assert ArtifactResult.from_dict(json.loads(json.dumps(r.to_dict()))) == r
    write_baseline([r], tmp_path / "b.json")
    base = read_baseline(tmp_path / "b.json")
    assert compare_baseline([r], base) == {r.key: []}
    worse = ArtifactResult.from_dict(r.to_dict() | {"dppl_pct": r.dppl_pct + 1.0, "kl_mean": r.kl_mean * 3 + 1e-3})
    assert len(compare_baseline([worse], base)[r.key]) == 2
    other = ArtifactResult.from_dict(r.to_dict() | {"tokens_sha256": "0" * 64})
    with pytest.raises(VerifyError, match="other tokens"):
        compare_baseline([other], base)


def test_report_writes_markdown_and_plots(ref, gguf, tmp_path):
    rs = [verify_artifact(gguf(p), ref, progress=False) for p in ("F32", "Q8_0")]
    path = write_report(rs, tmp_path / "rep")
    text = path.read_text()
    assert "demo-q8_0.gguf" in text and ref.tokens_sha256 in text
    for png in ("dppl_vs_bpw.png", "kl_vs_bpw.png", "frontier.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:4] == b"\x89PNG"


def test_pytest_helper_asserts_in_one_line(demo, gguf, cache, tmp_path):
    from qconvert.testing import assert_quality

    r = assert_quality(gguf("Q8_0"), demo, ctx=CTX, chunks=CHUNKS, cache_dir=cache)
    assert r.dppl_pct < 0.5
    with pytest.raises(AssertionError, match="ΔPPL|KL"):
        assert_quality(gguf("Q8_0"), demo, ctx=CTX, chunks=CHUNKS, cache_dir=cache, max_kl=1e-9)


def test_cli_gates_baseline_json_report(demo, gguf, cache, tmp_path, capsys):
    from qconvert.cli import main

    bad = tmp_path / "damaged.gguf"
    _damage_q80(gguf("Q8_0"), bad, "blk.0.attn_v.weight")
    common = ["--reference", str(demo), "--ctx", str(CTX), "--chunks", "3", "--cache-dir", str(cache), "--quiet"]
    rc = main(["verify", str(gguf("Q8_0")), str(bad), *common, "--json", str(tmp_path / "v.json"),
               "--report", str(tmp_path / "rep"), "--write-baseline", str(tmp_path / "base.json")])
    out = capsys.readouterr().out
    assert rc == 1 and "PASS" in out and "FAIL" in out
    data = json.loads((tmp_path / "v.json").read_text())
    assert [r["name"] for r in data["results"]] == ["demo-q8_0.gguf", "damaged.gguf"]
    assert (tmp_path / "rep" / "report.md").is_file()
    assert main(["verify", str(gguf("Q8_0")), *common, "--baseline", str(tmp_path / "base.json")]) == 0
    # the damaged file recorded under the good file's name: a regression against the baseline
    good_name = tmp_path / "b" / "demo-q8_0.gguf"
    good_name.parent.mkdir()
    shutil.copy(bad, good_name)
    assert main(["verify", str(good_name), *common, "--baseline", str(tmp_path / "base.json"),
                 "--max-dppl", "100", "--max-kl", "10"]) == 1
    assert "REGRESSED" in capsys.readouterr().out


# ---------------------------------------------------------------- bad input


def test_file_that_is_not_what_its_extension_says(ref, tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(CheckpointError, match="GGUF magic"):
        verify_artifact(fake, ref, progress=False)
    onnx = tmp_path / "model.onnx"
    onnx.write_text("hello")
    with pytest.raises(CheckpointError, match="not an ONNX model"):
        verify_artifact(onnx, ref, progress=False)
    other = tmp_path / "weights.bin"
    other.write_bytes(b"\0" * 16)
    with pytest.raises(VerifyError, match="not a GGUF file"):
        verify_artifact(other, ref, progress=False)


def test_truncated_gguf(ref, gguf, tmp_path):
    cut = tmp_path / "cut.gguf"
    data = gguf("Q8_0").read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        verify_artifact(cut, ref, progress=False)


def _swapped_tokenizer_copy(demo: Path, dst: Path, a: int = 300, b: int = 301) -> Path:
    shutil.copytree(demo, dst)
    tok = json.loads((dst / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    ta, tb = (next(t for t, i in vocab.items() if i == k) for k in (a, b))
    vocab[ta], vocab[tb] = b, a
    (dst / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
    return dst


def test_other_vocabulary_is_refused_with_the_ids(demo, ref, tmp_path):
    from qconvert.gguf.export import export_gguf

    other = _swapped_tokenizer_copy(demo, tmp_path / "other")
    with pytest.raises(TokenizerError, match="2 token ids differ.*id 300"):
        verify_artifact(other, ref, progress=False)
    out = tmp_path / "other.gguf"
    export_gguf(other, out, "F16")
    with pytest.raises(TokenizerError, match="2 token ids differ.*id 300"):
        verify_artifact(out, ref, progress=False)


def test_context_and_text_length_errors(demo, tokens, cache):
    with pytest.raises(VerifyError, match="longer than"):
        build_reference(demo, tokens, ctx=65536, cache_dir=cache, progress=False)
    short = eval_tokens(demo, text="just a few words")
    with pytest.raises(EvalTextError, match="fewer than one window"):
        build_reference(demo, short, ctx=CTX, cache_dir=cache, progress=False)
    with pytest.raises(EvalTextError, match="empty"):
        eval_tokens(demo, text="  \n")


def test_dataset_offline_error_says_what_to_do(monkeypatch):
    from qconvert.verify.tokens import dataset_text

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(EvalTextError, match="--text FILE") as e:
        dataset_text("wikitext2")
    assert "datasets" in str(e.value)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_cuda_without_gpu_is_a_clear_error(demo, tokens, cache, capsys):
    from qconvert.cli import main

    with pytest.raises(VerifyError, match="no CUDA GPU"):
        build_reference(demo, tokens, ctx=CTX, device="cuda", cache_dir=cache, progress=False)
    assert main(["verify", str(demo), "--reference", str(demo), "--device", "cuda"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_cli_bad_artifact_exits_2_before_the_reference_pass(demo, tmp_path, capsys):
    from qconvert.cli import main

    fake = tmp_path / "x.gguf"
    fake.write_bytes(b"nope")
    assert main(["verify", str(fake), "--reference", str(demo)]) == 2
    err = capsys.readouterr().err
    assert "GGUF magic" in err and "Traceback" not in err


class _Tripwire:
    """Unpickling this calls ``_trip(path)``, which creates ``path``: proof that a pickle was loaded."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return (_trip, (self.path,))


def _trip(path: str) -> None:
    Path(path).write_text("unpickled")


@pytest.mark.parametrize("role", ["reference", "artifact"])
def test_pickle_only_checkpoints_are_refused_without_unpickling(demo, gguf, tmp_path, capsys, role):
    """A directory whose weights are a (benign, but code-running) torch.save pickle: qconvert's reader refuses it
    before transformers or torch.load can run it, as the reference and as a float artifact."""
    from qconvert.cli import main

    bad = tmp_path / "pickled"
    bad.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(demo / name, bad / name)
    marker = tmp_path / "marker"
    torch.save({"model.embed_tokens.weight": _Tripwire(str(marker))}, bad / "pytorch_model.bin")
    args = (["verify", str(gguf("Q8_0")), "--reference", str(bad)] if role == "reference" else
            ["verify", str(bad), "--reference", str(demo)])
    assert main([*args, "--ctx", str(CTX), "--chunks", "1"]) == 2
    err = capsys.readouterr().err
    assert "never unpickles" in err and "Traceback" not in err, err
    assert not marker.exists(), "the pickle was loaded"


@pytest.mark.parametrize("args, needle", [
    (["--max-dppl", "nan"], "max_dppl_pct = nan is not a usable gate"),
    (["--max-kl", "-0.5"], "max_kl = -0.5 is not a usable gate"),
    (["--max-kl", "inf"], "max_kl = inf is not a usable gate"),
    (["--baseline-tol-dppl", "nan"], "baseline_tol_dppl = nan"),
    (["--runtime", "llamacpp"], "unknown --runtime llamacpp"),
])
def test_gates_that_cannot_fail_and_unknown_runtimes_are_refused(demo, gguf, capsys, args, needle):
    """A NaN or negative limit would make every artifact pass (or fail); an unknown runtime would verify nothing.
    Refused with exit 2 before the reference pass."""
    from qconvert.cli import main

    assert main(["verify", str(gguf("Q8_0")), "--reference", str(demo), *args]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err, err


def test_errors_are_qconvert_errors():
    assert issubclass(VerifyError, QConvertError) and issubclass(EvalTextError, QConvertError)


# ---------------------------------------------------------------- ONNX (when the exporter and runtime are present)


@pytest.mark.parametrize("precision", ["fp32", "int4"])
def test_onnx_in_onnxruntime(demo, ref, tmp_path, precision):
    """fp32 reproduces the reference (KL ~1e-9); int4 (RTN, MatMulNBits block 128) has 4.25 bits per decoder
    weight and passes the default gate (measured at ctx 256: ΔPPL +0.39%, KL 0.0026)."""
    pytest.importorskip("qconvert.runtimes.onnxrt")
    export = pytest.importorskip("qconvert.onnx_export")
    pytest.importorskip("onnx")
    out = export.export_onnx(demo, tmp_path, precision=precision, model_name="demo")
    r = verify_artifact(out, ref, progress=False)
    assert (r.kind, r.runtime) == ("onnx", "onnxruntime")
    if precision == "fp32":
        assert r.bits_per_weight == 32.0
        assert abs(r.dppl_pct) < 1e-2 and r.kl_mean < 1e-5 and r.top1 > 0.99
    else:
        assert r.bits_per_weight == pytest.approx(4.25) and _gate(r) == [] and r.kl_mean > 1e-4


# ---------------------------------------------------------------- CUDA


@pytest.mark.cuda
def test_cuda_reference_and_dequant_path_agree_with_cpu(demo, tokens, ref, int4, cache):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA GPU")
    gpu = build_reference(demo, tokens, ctx=CTX, chunks=CHUNKS, device="cuda", cache_dir=cache, progress=False)
    assert gpu.meta["cpu_vs_cuda"]["kl_mean"] < 1e-3 and abs(gpu.ppl / ref.ppl - 1) < 5e-3
    cpu_r = verify_artifact(int4("rtn"), ref, progress=False)
    gpu_r = verify_artifact(int4("rtn"), ref, device="cuda", progress=False)
    assert abs(gpu_r.ppl / cpu_r.ppl - 1) < 1e-4 and gpu_r.device == "cuda"


# ---------------------------------------------------------------- the real checkpoint (slow; skipped when absent)

REAL = Path.home() / ".cache/qconvert-real/hf/qwen2.5-coder-0.5b-tied"


@pytest.mark.slow
def test_real_q8_0_passes_and_damaged_fails(tmp_path):
    """Qwen2.5-Coder-0.5B: Q8_0 passes the default gate; one attn_v with block scales x1.5 fails it."""
    from qconvert.gguf.export import export_gguf

    if not (REAL / "config.json").is_file():
        pytest.skip(f"real checkpoint {REAL} is absent")
    ref = build_reference(REAL, eval_tokens(REAL), ctx=512, chunks=16, progress=False).subset(2)  # bench's cache
    q8 = tmp_path / "real-q8_0.gguf"
    export_gguf(REAL, q8, "Q8_0")
    good = verify_artifact(q8, ref, progress=False)
    assert _gate(good) == [], good
    _damage_q80(q8, tmp_path / "damaged.gguf", "blk.3.attn_v.weight")
    bad = verify_artifact(tmp_path / "damaged.gguf", ref, progress=False)
    assert _gate(bad), f"damaged Q8_0 passed: ΔPPL {bad.dppl_pct:+.3f}%, KL {bad.kl_mean:.5f}"
