"""Calibration statistics (qconvert.calibration.stats) and their consumers: the GGUF importance matrix and GPTQ --stats.

* Oracle for the statistics: transformers' Qwen2ForCausalLM (float32) with forward hooks on its nn.Linear
  modules; Σx², 2/N XᵀX and mean |x| of every linear's input must equal ours.
* Oracle for the importance matrix: llama.cpp's llama_model_quantize given the imatrix file qconvert wrote must
  produce the same bytes as ``qconvert gguf --calib`` (which never reads that file back), and the importance
  matrix must lower Q2_K's divergence from the float model in llama.cpp.
* GPTQ --stats: layer 0's q/k/v (which see float inputs in both modes) are bit-identical to the true-sequential
  run; the whole checkpoint stays close to it on held-out text.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from model_helpers import perplexity, quantized_weights

from qconvert.calibration.quantize import CalibrationError, CalibrationSettings, calibrate
from qconvert.calibration.stats import CalibrationStats, collect_stats, quantize_from_stats
from qconvert.cli import main
from qconvert.errors import CheckpointError
from qconvert.int4 import GPTQConfig

SAMPLES, SEQLEN = 8, 128


@pytest.fixture(scope="module")
def demo(model_dir) -> Path:
    return model_dir("demo")


@pytest.fixture(scope="module")
def calib_ids(demo) -> torch.Tensor:
    from qconvert.calibset import load_calibration

    return load_calibration("builtin", demo, chat=False, n_samples=SAMPLES, seq_len=SEQLEN, seed=0).ids


@pytest.fixture(scope="module")
def stats(demo, calib_ids) -> CalibrationStats:
    return collect_stats(demo, calib_ids, source="builtin test")


def _transformers_inputs(demo: Path, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Every nn.Linear's input rows [N, in] (float64) from transformers' own forward."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(demo, dtype=torch.float32).eval()
    seen: dict[str, list[torch.Tensor]] = {}
    hooks = [m.register_forward_hook(lambda mod, args, out, name=name: seen.setdefault(name, []).append(
        args[0].detach().reshape(-1, args[0].shape[-1]).double()))
        for name, m in model.named_modules() if isinstance(m, torch.nn.Linear) and name != "lm_head"]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    return {n: torch.cat(xs) for n, xs in seen.items()}


def test_statistics_match_transformers_hooks(demo, calib_ids, stats) -> None:
    xs = _transformers_inputs(demo, calib_ids)
    assert set(xs) == set(stats.linears), "a linear is missing or extra"
    for module, x in xs.items():
        s = stats.site(module)
        assert s.n_tokens == x.shape[0] == SAMPLES * SEQLEN
        sq = (x ** 2).sum(0)
        assert torch.allclose(s.sum_sq, sq, rtol=2e-4, atol=1e-6 * sq.max().item()), module
        H = (2.0 / x.shape[0]) * x.T @ x
        assert (s.hessian.double() - H).abs().max() <= 2e-4 * H.abs().max(), module
        assert torch.allclose(s.mean_abs.double(), x.abs().mean(0), rtol=2e-4, atol=1e-7), module


def test_save_load_round_trip_and_bad_files(stats, tmp_path: Path) -> None:
    f = tmp_path / "stats.safetensors"
    stats.save(f)
    back = CalibrationStats.load(f)
    assert back.linears == stats.linears and back.source == stats.source
    assert back.tokens_sha256 == stats.tokens_sha256
    for k, s in stats.sites.items():
        assert torch.equal(back.sites[k].hessian, s.hessian) and torch.equal(back.sites[k].sum_sq, s.sum_sq)
        assert back.sites[k].n_tokens == s.n_tokens
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}      ")
    with pytest.raises(CheckpointError, match="--save-stats"):
        CalibrationStats.load(bad)
    with pytest.raises(CheckpointError, match="does not exist"):
        CalibrationStats.load(tmp_path / "missing.safetensors")


def test_streamed_collection_holds_no_hessian_and_equals_the_in_memory_pass(demo, calib_ids, stats,
                                                                           tmp_path: Path) -> None:
    """``collect_stats(path=...)`` writes each layer as it finishes and keeps no Hessian in memory; same numbers."""
    from safetensors import safe_open

    f = tmp_path / "streamed.safetensors"
    streamed = collect_stats(demo, calib_ids, source="builtin test", path=f)
    assert all(site._hessian is None for site in streamed.sites.values())  # read back on demand only
    with safe_open(str(f), "pt") as st:  # the safetensors library itself reads our streamed header
        assert len(list(st.keys())) == 3 * len(stats.sites)
    back = CalibrationStats.load(f)
    for k, s in stats.sites.items():
        assert torch.equal(streamed.sites[k].hessian, s.hessian) and torch.equal(back.sites[k].hessian, s.hessian)
        assert torch.equal(back.sites[k].sum_sq, s.sum_sq) and torch.equal(back.sites[k].mean_abs, s.mean_abs)
    assert back.linears == stats.linears and back.tokens_sha256 == stats.tokens_sha256
    from qconvert.errors import OutputError

    with pytest.raises(OutputError, match="exists"):
        collect_stats(demo, calib_ids, path=f)  # never overwritten without force


def test_imatrix_only_pass_skips_hessians(demo, calib_ids, stats) -> None:
    light = collect_stats(demo, calib_ids, hessians=False)
    for name, m in stats.imatrix().items():
        assert np.array_equal(light.imatrix()[name], m)
    with pytest.raises(CalibrationError, match="without GPTQ Hessians"):
        light.hessian(next(iter(light.linears)))


def test_stream_writer_checks_order_and_shapes(tmp_path: Path) -> None:
    from qconvert.io.safetensors import SafetensorsStreamWriter

    w = SafetensorsStreamWriter(tmp_path / "x.safetensors", {"a": ("F32", (2, 3)), "b": ("F64", (4,))})
    with pytest.raises(ValueError, match="out of order"):
        w.write("b", np.zeros(4))
    with pytest.raises(ValueError, match="declared"):
        w.write("a", np.zeros((3, 2), np.float32))
    w.write("a", np.arange(6, dtype=np.float32).reshape(2, 3))
    with pytest.raises(ValueError, match="never written"):
        w.finish({})
    w.write("b", np.ones(4))
    w.finish({"k": "v"})
    from safetensors.numpy import load_file

    got = load_file(str(tmp_path / "x.safetensors"))
    assert np.array_equal(got["a"], np.arange(6, dtype=np.float32).reshape(2, 3)) and np.array_equal(got["b"], np.ones(4))


def test_statistics_from_another_model_are_refused(stats, model_dir) -> None:
    with pytest.raises(CalibrationError, match="another model"):
        stats.check_model(model_dir("tiny-fallback"))


@pytest.fixture(scope="module")
def calibrated_gguf(demo, calib_txt, tmp_path_factory) -> tuple[Path, Path, Path]:
    """``qconvert gguf --type Q2_K --calib <demo training text> --save-imatrix --save-stats`` once for the module."""
    out = tmp_path_factory.mktemp("gguf-calib")
    rc = main(["gguf", "--model", str(demo), "--type", "Q2_K", "--calib", str(calib_txt), "--calib-samples", str(SAMPLES),
               "--calib-seqlen", str(SEQLEN), "--device", "cpu", "--save-imatrix", str(out / "imatrix.gguf"),
               "--save-stats", str(out / "stats.safetensors"), "--out-dir", str(out), "--quiet"])
    assert rc == 0
    return out / f"{demo.name}-q2_k.gguf", out / "imatrix.gguf", out / "stats.safetensors"


def test_gguf_calib_bytes_equal_llama_quantize_with_the_written_imatrix(demo, calibrated_gguf, tmp_path) -> None:
    from qconvert.gguf.export import export_gguf
    from qconvert.gguf.imatrix import read_imatrix
    from qconvert.gguf.plan import get_preset
    from qconvert.runtimes import llamacpp

    ours, imatrix_file, _ = calibrated_gguf
    im = read_imatrix(imatrix_file)
    assert len(im) == 4 * 7, "one entry per decoder linear"
    ref, bf16 = tmp_path / "ref.gguf", tmp_path / "bf16.gguf"
    export_gguf(demo, bf16, "BF16", model_name=demo.name)  # the same general.name as the CLI's output
    llamacpp.llama_quantize(bf16, ref, int(get_preset("Q2_K").file_type), imatrix=im)
    assert ours.read_bytes() == ref.read_bytes()


def test_gguf_from_saved_stats_is_the_same_file(demo, calibrated_gguf, tmp_path) -> None:
    ours, _, stats_file = calibrated_gguf
    rc = main(["gguf", "--model", str(demo), "--type", "Q2_K", "--stats", str(stats_file), "--out-dir", str(tmp_path),
               "--quiet"])
    assert rc == 0
    assert (tmp_path / ours.name).read_bytes() == ours.read_bytes()


def _kl_in_llamacpp(path: Path, ref_logits: np.ndarray, ids: list[int]) -> float:
    from qconvert.runtimes.llamacpp import LlamaCppModel

    with LlamaCppModel(path, n_ctx=len(ids)) as m:
        q = m.logits(ids).astype(np.float64)
    p = ref_logits.astype(np.float64)
    lp = p - np.log(np.exp(p - p.max(1, keepdims=True)).sum(1, keepdims=True)) - p.max(1, keepdims=True)
    lq = q - np.log(np.exp(q - q.max(1, keepdims=True)).sum(1, keepdims=True)) - q.max(1, keepdims=True)
    return float((np.exp(lp) * (lp - lq)).sum(1).mean())


def test_importance_matrix_lowers_q2_k_divergence(demo, calibrated_gguf, float_gguf, tmp_path) -> None:
    from qconvert.fixtures.corpus import eval_text
    from qconvert.fixtures.models import FIXTURES
    from qconvert.fixtures.train import encode
    from qconvert.gguf.export import export_gguf
    from qconvert.runtimes.llamacpp import LlamaCppModel

    ids = encode(eval_text(), FIXTURES["demo"])[:512].tolist()
    with LlamaCppModel(float_gguf("demo", "F32"), n_ctx=len(ids)) as m:
        ref = m.logits(ids)
    plain = tmp_path / "plain.gguf"
    export_gguf(demo, plain, "Q2_K")
    kl_plain = _kl_in_llamacpp(plain, ref, ids)
    kl_imatrix = _kl_in_llamacpp(calibrated_gguf[0], ref, ids)
    assert kl_imatrix < 0.95 * kl_plain, (kl_imatrix, kl_plain)


def test_gptq_from_stats_equals_true_sequential_where_inputs_are_float(demo, calib_ids, stats) -> None:
    cfg = GPTQConfig(bits=4, group_size=128)
    seq: dict = {}
    from_stats: dict = {}
    calibrate(demo, calib_ids, "gptq", cfg, seq.__setitem__, settings=CalibrationSettings())
    quantize_from_stats(demo, stats, cfg, from_stats.__setitem__)
    assert set(seq) == set(from_stats)
    for sub in ("q_proj", "k_proj", "v_proj"):  # layer 0's first group sees the float embeddings in both runs
        a, b = seq[f"model.layers.0.self_attn.{sub}"], from_stats[f"model.layers.0.self_attn.{sub}"]
        assert torch.equal(a.codes, b.codes) and torch.equal(a.scales, b.scales), sub
    assert not torch.equal(seq["model.layers.3.mlp.down_proj"].codes, from_stats["model.layers.3.mlp.down_proj"].codes)
    from qconvert.fixtures.corpus import eval_text
    from qconvert.fixtures.models import FIXTURES
    from qconvert.fixtures.train import encode

    config = json.loads((demo / "config.json").read_text())
    ev = encode(eval_text(), FIXTURES["demo"])[:2048]
    base = perplexity(quantized_weights(demo, {}), config, ev)
    p_seq = perplexity(quantized_weights(demo, seq), config, ev)
    p_stats = perplexity(quantized_weights(demo, from_stats), config, ev)
    # same order of loss: at 4-bit g128 the demo model loses ~0.1%, so both stay within 0.5% of the float model
    # (a from-stats GPTQ that went wrong, e.g. Hessians of the wrong site, loses several percent)
    assert abs(p_seq / base - 1) < 5e-3 and abs(p_stats / base - 1) < 5e-3, (base, p_seq, p_stats)


def test_gptq_cli_with_stats_and_awq_refuses_them(demo, calibrated_gguf, tmp_path, capsys) -> None:
    stats_file = calibrated_gguf[2]
    rc = main(["gptq", "--model", str(demo), "--stats", str(stats_file), "--device", "cpu", "--out-dir",
               str(tmp_path), "--quiet"])
    assert rc == 0
    out = tmp_path / f"{demo.name}-gptq-int4"
    card = (out / "README.md").read_text()
    assert "saved statistics" in card and f"{SAMPLES * SEQLEN:,}" in card
    rc = main(["awq", "--model", str(demo), "--stats", str(stats_file), "--device", "cpu", "--out-dir",
               str(tmp_path / "awq"), "--quiet"])
    assert rc != 0 and "AWQ searches its scales" in capsys.readouterr().err
    assert not (tmp_path / "awq").exists() or not any((tmp_path / "awq").iterdir())


def test_gguf_option_conflicts_fail_cleanly(demo, calibrated_gguf, tmp_path, capsys) -> None:
    _, imatrix_file, _stats_file = calibrated_gguf
    for argv, needle in (
        (["--imatrix", str(imatrix_file), "--calib", "builtin"], "use one of them"),
        (["--save-stats", str(tmp_path / "s.safetensors")], "needs --calib"),
        (["--save-imatrix", str(tmp_path / "i.gguf")], "needs --calib"),
    ):
        rc = main(["gguf", "--model", str(demo), "--type", "Q4_K_M", "--out-dir", str(tmp_path), "--quiet", *argv])
        assert rc != 0 and needle in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf"))
