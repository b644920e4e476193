"""Issue 20: the held-out guard keeps GPTQ's / AWQ's result only where it beats round-to-nearest on held-out windows.

The held-out errors here are computed independently of the guard's Hessian shortcut: the finished quantized model
is run on the held-out window (``tests.model_helpers``' whole-model forward), each linear's actual input is captured
with the forward hook, and the squared output error ``‖(Ŵ - W) xᵀ‖²`` is summed directly.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from qconvert.calibration.quantize import CalibrationSettings, calibrate
from qconvert.calibration.stats import CalibrationStats, collect_stats, quantize_from_stats
from qconvert.cli import main
from qconvert.errors import QuantTypeError
from qconvert.int4 import AWQConfig, GPTQConfig, add_to_hessian, gptq, rtn
from qconvert.int4.guard import fit_hessian, holdout_count, reconstruction_error
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.model import qwen2
from qconvert.model.dims import Qwen2Dims
from qconvert.registry import read_model_config
from tests.model_helpers import forward, quantized_weights

# ---------------------------------------------------------------- pure functions


@pytest.mark.parametrize(("n", "fraction", "expected"), [(2, 0.25, 1), (4, 0.25, 1), (8, 0.25, 2), (32, 0.25, 8),
                                                           (10, 0.5, 5), (3, 0.01, 1)])
def test_holdout_count(n: int, fraction: float, expected: int) -> None:
    assert holdout_count(n, fraction) == expected


@pytest.mark.parametrize(("n", "fraction", "message"), [(1, 0.25, "at least 2 calibration windows"),
                                                        (8, 0.0, r"in \(0, 0.5\]"), (8, 0.6, r"in \(0, 0.5\]"),
                                                        (8, math.nan, r"in \(0, 0.5\]"), (8, -0.1, r"in \(0, 0.5\]")])
def test_holdout_count_refuses(n: int, fraction: float, message: str) -> None:
    with pytest.raises(QuantTypeError, match=message):
        holdout_count(n, fraction)


def test_reconstruction_error_is_the_output_error() -> None:
    """tr(Δ H Δᵀ) with the GPTQ Hessian H = 2/n Σ x xᵀ equals 2/n ‖Δ Xᵀ‖², summed directly."""
    g = torch.Generator().manual_seed(0)
    W, W_hat = torch.randn(70, 48, generator=g), torch.randn(70, 48, generator=g)
    X = torch.randn(3, 11, 48, generator=g)
    H, n = add_to_hessian(None, 0, X[:1])
    H, n = add_to_hessian(H, n, X[1:])
    direct = 2 / n * float(((W_hat - W) @ X.reshape(-1, 48).T).pow(2).sum())
    assert reconstruction_error(W, W_hat, H) == pytest.approx(direct, rel=1e-4)


def test_gptq_overfits_few_tokens_and_the_guard_choice_catches_it() -> None:
    """A linear with 256 correlated inputs fitted on 24 tokens: GPTQ beats round-to-nearest on those tokens but
    loses on 512 fresh tokens of the same distribution — the case the guard exists for."""
    g = torch.Generator().manual_seed(1)
    k = 256
    mix = torch.randn(k, k, generator=g) / math.sqrt(k) + torch.eye(k) * 0.3
    X_fit, X_out = torch.randn(24, k, generator=g) @ mix, torch.randn(512, k, generator=g) @ mix
    W = torch.randn(96, k, generator=g) * 0.05
    q = gptq(W, add_to_hessian(None, 0, X_fit)[0], GPTQConfig(group_size=128)).dequantize()
    r = rtn(W, 4, 128, True).dequantize()

    def err(W_hat: torch.Tensor, X: torch.Tensor) -> float:
        return float(((W_hat - W) @ X.T).pow(2).sum())

    assert err(q, X_fit) < err(r, X_fit)  # in-sample GPTQ wins ...
    assert err(q, X_out) > err(r, X_out)  # ... and overfits: worse than round-to-nearest on unseen tokens
    H_out = add_to_hessian(None, 0, X_out)[0]
    assert reconstruction_error(W, q, H_out) > reconstruction_error(W, r, H_out)  # the guard's measure agrees


# ---------------------------------------------------------------- the driver, on the trained fixture


def _calibration(model: Path, n: int, t: int) -> torch.Tensor:
    from qconvert.calibset import load_calibration

    return load_calibration("builtin", model, chat=False, n_samples=n, seq_len=t, seed=0).ids


def _run(model: Path, ids: torch.Tensor, method: str, cfg: GPTQConfig | AWQConfig, holdout: float | None,
         check_model: bool = False):
    """Calibrate into dicts; the model-level check is off unless asked for (these tests judge the per-linear and
    per-layer decisions, which a model-level fallback would replace)."""
    linears, floats = {}, {}
    report = calibrate(model, ids, method, cfg, linears.__setitem__, floats.__setitem__, CalibrationSettings(),
                       holdout=holdout, check_model=check_model)
    return linears, floats, report


def _heldout_errors(model: Path, linears, window: torch.Tensor, float_inputs: bool = False
                    ) -> dict[str, tuple[float, float]]:
    """(error of the quantized linear, error of round-to-nearest of the float weight in the same format) per GPTQ
    linear, on the inputs each linear actually sees when the quantized model (``float_inputs``: the float model)
    runs ``window`` [1, t]."""
    config = read_model_config(model)
    ckpt = SafetensorsCheckpoint(model)
    weights = quantized_weights(model, {} if float_inputs else linears)
    dims = Qwen2Dims.from_config(config)
    rope = qwen2.rope_tables(dims, window.shape[1], torch.device("cpu"), torch.float32)
    h = qwen2.embed(weights["model.embed_tokens.weight"], window)
    out: dict[str, tuple[float, float]] = {}
    for i in range(int(config["num_hidden_layers"])):
        prefix = f"model.layers.{i}."
        seen: dict[str, torch.Tensor] = {}
        p = {n[len(prefix):]: t for n, t in weights.items() if n.startswith(prefix)}
        def capture(name: str, x: torch.Tensor, seen: dict[str, torch.Tensor] = seen) -> None:
            seen[name] = x.reshape(-1, x.shape[-1])

        with torch.no_grad():
            h = qwen2.decoder_layer(p, h, dims, rope, capture)
        for name, x in seen.items():
            module = prefix + name
            q = linears[module]
            W = torch.from_numpy(ckpt.read_f32(f"{module}.weight"))
            r = rtn(W, q.bits, q.group_size, q.sym).dequantize()
            out[module] = (float(((q.dequantize() - W) @ x.T).pow(2).sum()), float(((r - W) @ x.T).pow(2).sum()))
    return out


@pytest.fixture(scope="module")
def demo(model_dir) -> Path:
    return model_dir("demo")


def test_gptq_guard_never_worse_than_rtn_on_the_heldout_window(demo: Path) -> None:
    """Too few calibration tokens (2 windows of 4): without the guard, GPTQ fitted on the first window is worse
    than round-to-nearest on the second for some linears; with the guard (the same window held out) no linear is."""
    ids = _calibration(demo, 2, 4)
    unguarded, _, _ = _run(demo, ids[:1], "gptq", GPTQConfig(), None)
    before = _heldout_errors(demo, unguarded, ids[1:])
    worse = [m for m, (e_q, e_r) in before.items() if e_q > e_r * (1 + 1e-6)]
    assert worse, "the setting must make GPTQ overfit somewhere, or this test proves nothing"

    guarded, _, report = _run(demo, ids, "gptq", GPTQConfig(), 0.25)
    assert report.holdout == 1 and report.kept.get("rtn", 0) >= 1 and report.kept.get("gptq", 0) >= 1, report.kept
    after = _heldout_errors(demo, guarded, ids[1:])
    assert all(e_q <= e_r * (1 + 1e-4) for e_q, e_r in after.values()), \
        {m: v for m, v in after.items() if v[0] > v[1] * (1 + 1e-4)}
    ckpt = SafetensorsCheckpoint(demo)
    for module, q in guarded.items():  # a linear the guard gave to round-to-nearest is exactly RTN of the float W
        if q.info["kept"] == "rtn":
            expected = rtn(torch.from_numpy(ckpt.read_f32(f"{module}.weight")), 4, 128, True)
            assert torch.equal(q.codes, expected.codes) and torch.equal(q.scales, expected.scales)
        assert q.info["heldout_error"] >= 0 and q.info["rtn_heldout_error"] >= 0


def test_the_guard_off_keeps_every_gptq_result(demo: Path) -> None:
    linears, _, report = _run(demo, _calibration(demo, 2, 4), "gptq", GPTQConfig(), None)
    assert report.holdout == 0 and report.kept == {"gptq": len(linears)}
    assert "off" in report.guard_summary()
    # 8 tokens cannot span any input site: each note says so, and that nothing falls back
    assert report.rank_warnings and all("guard is off" in w for w in report.rank_warnings), report.rank_warnings


def test_statistics_split_their_hessians_and_gptq_from_them_is_guarded(demo: Path, tmp_path: Path) -> None:
    """``collect_stats(holdout=)`` keeps the held-out windows' Hessian beside the whole one; the fitted windows'
    Hessian recovered from the two equals a separate pass over those windows alone, and GPTQ from the statistics
    (float-model inputs, no forward) is then not worse than round-to-nearest on the held-out window for any linear,
    while GPTQ fitted on the same window without the guard is, for some."""
    ids = _calibration(demo, 2, 4)
    path = tmp_path / "stats.safetensors"
    collect_stats(demo, ids, path=path, holdout=0.25)
    stats = CalibrationStats.load(path)
    fit_only, out_only = collect_stats(demo, ids[:1]), collect_stats(demo, ids[1:])
    assert stats.holdout_windows == 1
    assert torch.equal(stats.heldout_ids, ids[1:])  # the held-out windows' text, for a model-level check
    assert torch.equal(collect_stats(demo, ids, holdout=0.25).heldout_ids, ids[1:]) and fit_only.heldout_ids is None
    for key, site in stats.sites.items():
        assert site.n_tokens == 8 and site.n_heldout == out_only.sites[key].n_tokens == 4
        torch.testing.assert_close(site.heldout_hessian, out_only.sites[key].hessian, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fit_hessian(site.hessian, 8, site.heldout_hessian, 4), fit_only.sites[key].hessian,
                                   rtol=1e-4, atol=1e-4)

    guarded: dict = {}
    kept = quantize_from_stats(demo, stats, GPTQConfig(), guarded.__setitem__)
    assert kept.get("rtn", 0) >= 1 and sum(kept.values()) == len(guarded), kept
    after = _heldout_errors(demo, guarded, ids[1:], float_inputs=True)
    assert all(e_q <= e_r * (1 + 1e-4) for e_q, e_r in after.values()), \
        {m: v for m, v in after.items() if v[0] > v[1] * (1 + 1e-4)}
    unguarded: dict = {}
    assert quantize_from_stats(demo, fit_only, GPTQConfig(), unguarded.__setitem__) == {"gptq": len(unguarded)}
    before = _heldout_errors(demo, unguarded, ids[1:], float_inputs=True)
    assert any(e_q > e_r * (1 + 1e-6) for e_q, e_r in before.values()), "GPTQ must overfit here, or this proves nothing"
    off: dict = {}  # guard=False reads the same file as plain statistics: GPTQ on all windows' Hessian
    assert quantize_from_stats(demo, stats, GPTQConfig(), off.__setitem__, guard=False) == {"gptq": len(off)}


def test_gptq_cli_guards_from_the_statistics_it_saved(demo: Path, tmp_path: Path, capsys) -> None:
    stats_file = tmp_path / "stats.safetensors"
    base = ["gptq", "--model", str(demo), "--device", "cpu", "--quiet", "--no-eval", "--calib-samples", "2",
            "--calib-seqlen", "4"]
    assert main([*base, "--save-stats", str(stats_file), "--out-dir", str(tmp_path / "a")]) == 0
    assert CalibrationStats.load(stats_file).holdout_windows == 1
    assert main([*base, "--stats", str(stats_file), "--out-dir", str(tmp_path / "b")]) == 0
    card = (tmp_path / "b" / f"{demo.name}-gptq-int4" / "README.md").read_text()
    assert "held-out guard: the last 1 of 2 calibration windows" in card, card
    assert main([*base, "--stats", str(stats_file), "--no-guard", "--out-dir", str(tmp_path / "c")]) == 0
    assert "held-out guard: off" in (tmp_path / "c" / f"{demo.name}-gptq-int4" / "README.md").read_text()


def test_awq_guard_layer_output_not_worse_than_zero_point_rtn(demo: Path) -> None:
    """AWQ with the guard: on the held-out window, each decoder layer of the result (fed the quantized model's own
    activations) is at least as close to the float layer as zero-point round-to-nearest of the float weights."""
    ids = _calibration(demo, 4, 16)
    linears, floats, report = _run(demo, ids, "awq", AWQConfig(), 0.25)
    assert report.holdout == 1 and sum(report.kept.values()) == len(linears)
    assert "the last 1 of 4 calibration windows" in report.guard_summary()
    config = read_model_config(demo)
    ckpt = SafetensorsCheckpoint(demo)
    quant = quantized_weights(demo, linears, floats)
    floatw = quantized_weights(demo, {})
    base = quantized_weights(demo, {m: rtn(torch.from_numpy(ckpt.read_f32(f"{m}.weight")), 4, 128, False)
                                    for m in linears})
    dims = Qwen2Dims.from_config(config)
    window = ids[3:]
    rope = qwen2.rope_tables(dims, window.shape[1], torch.device("cpu"), torch.float32)
    h = qwen2.embed(quant["model.embed_tokens.weight"], window)

    def layer(weights, i, x):
        prefix = f"model.layers.{i}."
        with torch.no_grad():
            return qwen2.decoder_layer({n[len(prefix):]: t for n, t in weights.items() if n.startswith(prefix)},
                                       x, dims, rope)

    for i in range(int(config["num_hidden_layers"])):
        ref, got, rtn_out = layer(floatw, i, h), layer(quant, i, h), layer(base, i, h)
        assert float((got - ref).pow(2).mean()) <= float((rtn_out - ref).pow(2).mean()) * (1 + 1e-4), i
        h = got
    for module, q in linears.items():
        if q.info["kept"] == "rtn":  # a fallen-back layer: zero-point RTN of the float weight, norms untouched
            expected = rtn(torch.from_numpy(ckpt.read_f32(f"{module}.weight")), 4, 128, False)
            assert torch.equal(q.codes, expected.codes)
            assert not any(n.startswith(module.rsplit(".", 2)[0] + ".") for n in floats)


# ---------------------------------------------------------------- the model-level check


def _scores(model: Path, weights: dict[str, torch.Tensor], window: torch.Tensor) -> tuple[float, float]:
    """(mean KL to the float model, mean next-token NLL) over positions 0 .. t-2 of ``window`` [n, t], by a
    whole-model forward held in memory and torch's own kl_div / cross_entropy."""
    config = read_model_config(model)
    with torch.no_grad():
        ref = forward(quantized_weights(model, {}), window, config)[:, :-1].reshape(-1, int(config["vocab_size"]))
        got = forward(weights, window, config)[:, :-1].reshape(-1, int(config["vocab_size"]))
    kl = torch.nn.functional.kl_div(torch.log_softmax(got.double(), -1), torch.log_softmax(ref.double(), -1),
                                    log_target=True, reduction="batchmean")
    nll = torch.nn.functional.cross_entropy(got.double(), window[:, 1:].reshape(-1))
    return float(kl), float(nll)


@pytest.mark.parametrize(("method", "cfg", "n", "t"), [("gptq", GPTQConfig(), 2, 4), ("awq", AWQConfig(), 4, 16)])
def test_model_check_scores_both_models_on_the_heldout_windows(demo: Path, method: str, cfg, n: int, t: int,
                                                               monkeypatch) -> None:
    """The check's KL and NLL are those of the whole quantized model (the method's, as handed on before any
    restart) and of round-to-nearest of every float weight, on the held-out window; the kept one is handed on."""
    monkeypatch.setattr("qconvert.calibration.quantize.SCORE_ROWS", 2)  # positions scored in pieces, one left over
    ids = _calibration(demo, n, t)
    linears: dict = {}
    floats: dict = {}
    before: list[tuple[dict, dict]] = []

    def restart() -> None:
        before.append((dict(linears), dict(floats)))
        linears.clear()
        floats.clear()

    report = calibrate(demo, ids, method, cfg, linears.__setitem__, floats.__setitem__, holdout=0.25,
                       on_restart=restart)
    check = report.model_check
    assert check is not None and check.positions == t - 1
    method_model = before[0] if before else (linears, floats)
    assert len(before) == int(check.kept == "rtn")
    ckpt = SafetensorsCheckpoint(demo)
    base = {m: rtn(torch.from_numpy(ckpt.read_f32(f"{m}.weight")), 4, 128, method == "gptq") for m in linears}
    kl, nll = _scores(demo, quantized_weights(demo, *method_model), ids[-1:])
    base_kl, base_nll = _scores(demo, quantized_weights(demo, base), ids[-1:])
    assert math.isclose(check.kl, kl, rel_tol=2e-3) and math.isclose(check.nll, nll, rel_tol=1e-4), (check, kl, nll)
    assert math.isclose(check.base_kl, base_kl, rel_tol=2e-3) and math.isclose(check.base_nll, base_nll, rel_tol=1e-4)
    if check.kept == "rtn":  # what was handed on last is round-to-nearest of every float weight, norms untouched
        assert report.kept == {"rtn": len(base)} and "round-to-nearest" in report.guard_summary()
        for m, q in base.items():
            assert torch.equal(linears[m].codes, q.codes) and torch.equal(linears[m].scales, q.scales)
        assert all(torch.equal(floats[n].float(), torch.from_numpy(ckpt.read_f32(n))) for n in floats)
        assert set(floats) == set(before[0][1])
    else:
        assert kl <= base_kl * (1 + 2e-3) and report.kept.get(method, 0) > 0


def test_model_check_rule_and_its_standard_error() -> None:
    """KL decides; the NLL vetoes only when worse by more than one standard error of its block means."""
    from qconvert.int4.guard import ModelCheck, block_standard_error

    assert ModelCheck("awq", 0.09, 3.00, 0.10, 2.99, 0.02, 1022).kept == "awq"  # NLL worse, within noise
    assert ModelCheck("awq", 0.09, 3.05, 0.10, 2.99, 0.02, 1022).kept == "rtn"  # NLL worse by 3 SE
    assert ModelCheck("gptq", 0.11, 2.90, 0.10, 2.99, 0.02, 1022).kept == "rtn"  # KL worse
    assert ModelCheck("gptq", 0.09, 9.0, 0.10, 2.0, math.inf, 15).kept == "gptq"  # too few positions for the NLL
    # two windows of 128 positions = 4 blocks of 64 with means 1, 2, 3, 4 -> std 1.29099, SE 0.645497
    diff = torch.cat([torch.full((64,), v, dtype=torch.float64) for v in (1.0, 2.0, 3.0, 4.0)]).reshape(2, 128)
    assert math.isclose(block_standard_error(diff), math.sqrt(5 / 3) / 2, rel_tol=1e-9)
    assert block_standard_error(torch.ones(1, 100)) == math.inf  # one block: no spread to measure


def test_gptq_with_too_few_tokens_falls_back_to_rtn_for_the_whole_model(demo: Path, tmp_path: Path) -> None:
    """2 windows of 4 tokens: GPTQ's model is further from the float model on the held-out window than symmetric
    round-to-nearest, so the command writes round-to-nearest everywhere (the writer restarts), and says so."""
    from qconvert.int4.formats import dequantized_tensors

    assert main(["gptq", "--model", str(demo), "--device", "cpu", "--quiet", "--no-eval", "--calib-samples", "2",
                 "--calib-seqlen", "4", "--out-dir", str(tmp_path)]) == 0
    out = tmp_path / f"{demo.name}-gptq-int4"
    card = (out / "README.md").read_text()
    assert "model-level check" in card and "every linear is round-to-nearest" in card, card
    src, ckpt = SafetensorsCheckpoint(demo), SafetensorsCheckpoint(out)
    qcfg = read_model_config(out)["quantization_config"]
    config = read_model_config(demo)
    for i in range(int(config["num_hidden_layers"])):
        got = dequantized_tensors(ckpt, f"model.layers.{i}.", qcfg, "cpu")
        for name in ("self_attn.q_proj", "mlp.down_proj"):
            expected = rtn(torch.from_numpy(src.read_f32(f"model.layers.{i}.{name}.weight")), 4, 128, True)
            torch.testing.assert_close(got[f"{name}.weight"].float(), expected.dequantize().float(), rtol=0, atol=1e-3)


# ---------------------------------------------------------------- the command line


@pytest.mark.parametrize(("extra", "message"), [(["--holdout", "0.7"], "must be <= 0.5"),
                                                (["--holdout", "0"], "must be > 0"),
                                                (["--calib-samples", "1"], "at least 2 calibration windows")])
def test_bad_holdout_is_a_clear_error(demo: Path, tmp_path: Path, capsys, extra: list[str], message: str) -> None:
    try:
        rc = main(["gptq", "--model", str(demo), "--out-dir", str(tmp_path), "--device", "cpu", "--quiet",
                   "--no-eval", "--calib-seqlen", "16", *extra])
    except SystemExit as e:  # argparse refuses a bad number before the command runs
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
