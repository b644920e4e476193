"""Issue 16, first part: ``qconvert gguf --optimize`` (error-feedback codes in llama.cpp's types and sizes).

Oracles: ggml's block layouts (format facts from ggml-common.h, written out below), ``dequantize_rows`` (equal to
llama.cpp's ``dequantize_row_*``, tests/test_quant_kernels.py), and llama.cpp itself running both files on the
project's held-out text (``qconvert verify``'s llama.cpp runner).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from qconvert.cli import main
from qconvert.constants import GGMLType
from qconvert.quant import dequantize_rows, quantize_rows
from qconvert.quant.feedback import (
    CODEBOOK_TYPES,
    SCALAR_TYPES,
    block_grid,
    code_layout,
    encode_with_block_feedback,
    encode_with_feedback,
)

# ---------------------------------------------------------------- where the codes live


def test_learned_code_bits_are_ggmls_block_layouts() -> None:
    """block_q4_0 = {fp16 d; u8 qs[16]}: weight j < 16 is the low nibble of qs[j], weight j + 16 the high one;
    block_q8_0 = {fp16 d; i8 qs[32]}; block_q4_K = {fp16 d, dmin; u8 scales[12]; u8 qs[128]}: in each 64-weight
    chunk l, weight 64 l + j (j < 32) is the low nibble of qs[32 l + j] and 64 l + 32 + j its high nibble."""
    q40 = code_layout(GGMLType.Q4_0)
    want = np.array([[(2 + j % 16) * 8 + 4 * (j // 16) + k for k in range(4)] for j in range(32)])
    assert np.array_equal(q40.bits, want) and not q40.signed and (q40.lo, q40.hi) == (0, 15)
    q80 = code_layout(GGMLType.Q8_0)
    assert np.array_equal(q80.bits, np.array([[(2 + j) * 8 + k for k in range(8)] for j in range(32)]))
    assert q80.signed and (q80.lo, q80.hi) == (-128, 127)
    q4k = code_layout(GGMLType.Q4_K)
    want = np.array([[(16 + 32 * (p // 64) + p % 32) * 8 + 4 * ((p % 64) // 32) + k for k in range(4)]
                     for p in range(256)])
    assert np.array_equal(q4k.bits, want)
    assert all(code_layout(t).levels is None for t in (GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.Q4_K))


def test_learned_iq4_codes_are_ggmls_layout_and_gguf_pys_table() -> None:
    """block_iq4_nl = {fp16 d; u8 qs[16]}: weight j < 16 is the low nibble of qs[j], weight j + 16 the high one;
    block_iq4_xs = {fp16 d; u16 scales_h; u8 scales_l[4]; u8 qs[128]}: in sub-block ib, weight 32 ib + j is a nibble
    of qs[16 ib + j % 16] (low for j < 16). A code indexes gguf-py's ``IQ4_NL.kvalues``: the learned levels are
    that table, as (k[n] - k[0]) / (k[1] - k[0])."""
    from gguf.quants import IQ4_NL

    k = np.array(IQ4_NL.kvalues, np.float64)
    for qtype, offset in ((GGMLType.IQ4_NL, 2), (GGMLType.IQ4_XS, 8)):
        layout = code_layout(qtype)
        want = np.array([[(offset + 16 * (p // 32) + p % 16) * 8 + 4 * ((p % 32) // 16) + b for b in range(4)]
                         for p in range(qtype.block_size)])
        assert np.array_equal(layout.bits, want), qtype.name
        assert not layout.signed and (layout.lo, layout.hi) == (0, 15)
        np.testing.assert_allclose(layout.levels, (k - k[0]) / (k[1] - k[0]), rtol=1e-6)


@pytest.mark.parametrize("qtype", sorted(SCALAR_TYPES, key=lambda t: t.name))
def test_any_codes_decode_as_base_plus_step_times_code(qtype: GGMLType) -> None:
    """For llama.cpp's scales of real blocks, codes written anywhere in [lo, hi] decode (llama.cpp's decoder) to
    base + step · level(code) — exactly base + step · code for the affine types — and read back as written."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((16, qtype.block_size * 4)) * np.exp(rng.standard_normal((16, 1)))).astype(np.float32)
    data = quantize_rows(qtype, x)
    layout = code_layout(qtype)
    blocks = data.reshape(-1, qtype.block_bytes)
    base, step = block_grid(qtype, blocks, layout)
    codes = rng.integers(layout.lo, layout.hi + 1, size=(blocks.shape[0], qtype.block_size))
    written = layout.write(blocks, codes)
    assert np.array_equal(layout.read(written), codes)
    assert np.array_equal(layout.read(blocks), layout.read(layout.write(blocks, layout.read(blocks))))
    decoded = dequantize_rows(qtype, written.reshape(data.shape), x.shape[1]).reshape(blocks.shape[0], -1)
    if layout.levels is None:
        np.testing.assert_array_equal(decoded, (base + step * codes).astype(np.float32))
    else:  # d · scale · kvalues[code] in float32: the level form agrees to float32 rounding
        np.testing.assert_allclose(decoded, base + step * layout.levels[codes - layout.lo], rtol=1e-6,
                                   atol=1e-6 * float(np.abs(decoded).max()))
    # the scale bytes are untouched: only code bits differ
    assert np.array_equal(layout.clear(written), layout.clear(blocks))


def test_codebook_types_are_refused_with_the_reason() -> None:
    from qconvert.errors import QuantTypeError

    for qtype in (GGMLType.IQ3_S, GGMLType.IQ2_XS, GGMLType.IQ1_M):
        with pytest.raises(QuantTypeError, match="codebook of weight vectors"):
            code_layout(qtype)


# ---------------------------------------------------------------- error feedback, as a pure function


def _correlated_inputs(cols: int, n: int, seed: int) -> torch.Tensor:
    """Activations with a decaying spectrum and uneven channel scales (what real linear inputs look like)."""
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(cols, cols, generator=torch.Generator().manual_seed(0)))
    M = (Q * torch.logspace(0, -2, cols)) @ Q.T
    scale = torch.exp(torch.randn(cols, generator=torch.Generator().manual_seed(1)))
    return (torch.randn(n, cols, generator=g) @ M) * scale


@pytest.mark.parametrize("qtype", [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q4_0,
                                   GGMLType.Q5_1, GGMLType.Q8_0, GGMLType.IQ4_NL, GGMLType.IQ4_XS])
def test_feedback_lowers_the_output_error_on_unseen_inputs(qtype: GGMLType) -> None:
    """Fitted on one sample of inputs, judged on another: the output error ‖(Ŵ - W) Xᵀ‖² of the feedback codes
    is well below llama.cpp's, with and without the importance matrix (measured ~0.3-0.4x)."""
    from qconvert.int4.gptq import GPTQConfig, add_to_hessian, inverse_hessian_factor

    cols = 512
    X, X_test = _correlated_inputs(cols, 2048, 2), _correlated_inputs(cols, 2048, 3)
    W = torch.randn(64, cols, generator=torch.Generator().manual_seed(4)) * 0.05
    U, _ = inverse_hessian_factor(add_to_hessian(None, 0, X)[0], GPTQConfig())
    imatrix = X.pow(2).mean(0).numpy().astype(np.float32)

    def error(data: np.ndarray) -> float:
        return float(((torch.from_numpy(dequantize_rows(qtype, data, cols)) - W) @ X_test.T).pow(2).mean())

    for im in (None, imatrix):
        plain = quantize_rows(qtype, W.numpy(), im)
        fed = encode_with_feedback(qtype, W.numpy(), U, im)
        assert fed.shape == plain.shape and fed.dtype == np.uint8
        assert error(fed) < 0.7 * error(plain), (qtype.name, im is not None, error(fed), error(plain))


@pytest.mark.parametrize("qtype", sorted(CODEBOOK_TYPES, key=lambda t: t.name))
def test_block_feedback_lowers_the_output_error_of_the_codebook_types(qtype: GGMLType) -> None:
    """The codebook I-quants keep llama.cpp's codes per block, fed between blocks: on unseen inputs the output error
    is well below llama.cpp's own encoding with the same importance matrix (measured 0.54-0.69x on 4 blocks).
    For a type with one code per weight the column-by-column feedback does better still (Q4_K, IQ4_XS)."""
    from qconvert.int4.gptq import GPTQConfig, add_to_hessian, inverse_hessian_factor

    cols = 1024
    X, X_test = _correlated_inputs(cols, 2048, 2), _correlated_inputs(cols, 2048, 3)
    W = torch.randn(32, cols, generator=torch.Generator().manual_seed(4)) * 0.05
    U, _ = inverse_hessian_factor(add_to_hessian(None, 0, X)[0], GPTQConfig())
    imatrix = X.pow(2).mean(0).numpy().astype(np.float32)

    def error(t: GGMLType, data: np.ndarray) -> float:
        return float(((torch.from_numpy(dequantize_rows(t, data, cols)) - W) @ X_test.T).pow(2).mean())

    plain = quantize_rows(qtype, W.numpy(), imatrix)
    fed = encode_with_block_feedback(qtype, W.numpy(), U, imatrix)
    assert fed.shape == plain.shape and fed.dtype == np.uint8
    assert error(qtype, fed) < 0.75 * error(qtype, plain), (error(qtype, fed), error(qtype, plain))
    if qtype == GGMLType.IQ3_S:
        for t in (GGMLType.Q4_K, GGMLType.IQ4_XS):
            per_block = error(t, encode_with_block_feedback(t, W.numpy(), U, imatrix))
            assert error(t, encode_with_feedback(t, W.numpy(), U, imatrix)) < per_block < \
                error(t, quantize_rows(t, W.numpy(), imatrix))


# ---------------------------------------------------------------- the command, in llama.cpp


@pytest.fixture(scope="module")
def demo(model_dir) -> Path:
    return model_dir("demo")


@pytest.fixture(scope="module")
def stats_file(demo, tmp_path_factory) -> Path:
    """One statistics pass (with the held-out split) on 8 x 128 built-in calibration tokens, saved by the command."""
    out = tmp_path_factory.mktemp("opt-stats")
    path = out / "stats.safetensors"
    assert main(["gguf", "--model", str(demo), "--type", "Q4_K_M", "--calib", "builtin", "--calib-samples", "8",
                 "--calib-seqlen", "128", "--save-stats", str(path), "--optimize", "--quiet",
                 "--output", str(out / "first.gguf")]) == 0
    return path


def test_hessians_are_the_files_and_a_shared_input_site_is_read_once(stats_file, monkeypatch) -> None:
    from qconvert.calibration.stats import CalibrationStats, SiteStats
    from qconvert.gguf.optimize import stats_hessians

    stats = CalibrationStats.load(stats_file)
    reads: list[int] = []
    plain = SiteStats.hessian.fget
    monkeypatch.setattr(SiteStats, "hessian", property(lambda site: reads.append(id(site)) or plain(site)))
    get = stats_hessians(stats)
    names = [f"model.layers.0.self_attn.{p}_proj.weight" for p in "qkv"] + ["model.layers.0.self_attn.o_proj.weight"]
    got = [get(n) for n in names]
    assert len(reads) == 2  # q, k and v: one site; o: another
    assert got[0].inverse_factor(0.01) is got[2].inverse_factor(0.01)  # GPTQ's factor: once per site too
    for name, h in zip(names, got):
        site = stats.site(name.removesuffix(".weight"))
        assert h.heldout is not None and torch.equal(h.heldout, site.heldout_hessian)
        assert h.fit.shape == site.hessian.shape and not torch.equal(h.fit, site.hessian)  # the other windows'
    assert get("model.embed_tokens.weight") is None


def _make(demo: Path, stats_file: Path, out: Path, preset: str, optimize: bool) -> Path:
    path = out / f"{preset}-{'opt' if optimize else 'plain'}.gguf"
    assert main(["gguf", "--model", str(demo), "--type", preset, "--stats", str(stats_file), "--quiet",
                 "--output", str(path), *(["--optimize"] if optimize else [])]) == 0
    return path


@pytest.mark.parametrize("preset", ["Q3_K_M", "Q4_K_M", "IQ4_XS", "IQ3_M"])
def test_optimized_file_is_llamacpps_size_and_closer_to_the_float_model_in_llamacpp(demo, stats_file, tmp_path,
                                                                                    preset: str) -> None:
    """Against llama.cpp's own imatrix encoding from the same calibration tokens: the same tensors, types and
    data sizes; in llama.cpp on held-out text a lower mean KL to the float model; the same inputs give the same
    bytes."""
    from qconvert.gguf.reader import read_gguf
    from qconvert.verify import build_reference, eval_tokens, verify_artifact

    plain, opt = _make(demo, stats_file, tmp_path, preset, False), _make(demo, stats_file, tmp_path, preset, True)
    g_plain, g_opt = read_gguf(plain), read_gguf(opt)
    assert [(n, t.type, t.nbytes) for n, t in g_plain.tensors.items()] == \
        [(n, t.type, t.nbytes) for n, t in g_opt.tensors.items()]
    changed = [n for n in g_opt.tensors if not np.array_equal(g_opt.read_tensor_bytes(n), g_plain.read_tensor_bytes(n))]
    assert changed and all(n.startswith("blk.") for n in changed), changed
    assert "error-feedback" in g_opt.metadata["qconvert.optimize"] and "qconvert.optimize" not in g_plain.metadata
    ref = build_reference(demo, eval_tokens(demo), ctx=128, chunks=6, progress=False)
    r_plain, r_opt = verify_artifact(plain, ref, progress=False), verify_artifact(opt, ref, progress=False)
    assert r_opt.runtime == "llama.cpp" and r_opt.format == preset
    print(f"{preset}: KL llama.cpp imatrix {r_plain.kl_mean:.5f}, optimized {r_opt.kl_mean:.5f}; "
          f"PPL {r_plain.ppl:.3f} vs {r_opt.ppl:.3f}")
    assert r_opt.kl_mean < r_plain.kl_mean
    again = _make(demo, stats_file, tmp_path / "again", preset, True) if (tmp_path / "again").mkdir() is None else None
    assert again is not None and again.read_bytes() == opt.read_bytes()


@pytest.mark.parametrize(("extra", "message"), [
    ([], "--optimize and --target-size work from the calibration Hessians"),
    (["--imatrix", "x.gguf"], "an imatrix file holds only their diagonals"),
])
def test_optimize_without_hessians_is_a_clear_error(demo, tmp_path, capsys, extra: list[str], message: str) -> None:
    if extra:
        (tmp_path / "x.gguf").write_bytes(b"GGUF")
        extra = ["--imatrix", str(tmp_path / "x.gguf")]
    rc = main(["gguf", "--model", str(demo), "--type", "Q4_K_M", "--optimize", "--quiet",
               "--output", str(tmp_path / "out.gguf"), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "Traceback" not in err, err
    assert not (tmp_path / "out.gguf").exists() and not list(tmp_path.glob(".*"))


# ---------------------------------------------------------------- --target-size


def _random_cost_tables(seed: int, top_preset: int):
    """200 random budget problems: (trial, matrices, fixed bytes, budget in the possible range); presets drawn from
    the ladder's positions 1 .. top_preset - 1."""
    from qconvert.gguf.budget import MatrixCosts

    rng = np.random.default_rng(seed)
    ladder = (GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K, GGMLType.Q8_0)
    for trial in range(200):
        mats = []
        for i in range(int(rng.integers(2, 12))):
            size = int(rng.integers(1, 20)) * 1000
            nbytes = {t: size * (k + 2) for k, t in enumerate(ladder)}
            base = float(rng.uniform(0.1, 10))
            cost = {t: base * 0.3 ** k * float(rng.uniform(0.8, 1.2)) for k, t in enumerate(ladder)}
            mats.append(MatrixCosts(f"m{i}", ladder[int(rng.integers(1, top_preset))], nbytes, cost))
        fixed = 5000
        lo = fixed + sum(min(m.nbytes.values()) for m in mats)
        hi = fixed + sum(max(m.nbytes.values()) for m in mats)
        yield trial, mats, fixed, int(rng.integers(lo, hi + 1))


def test_budget_choice_fits_and_never_loses_to_a_preset_that_fits() -> None:
    """Random cost tables: the choice never exceeds the budget, is at least as good as the preset's assignment
    whenever that fits, and uses the budget (no single upgrade that fits and helps is left)."""
    from qconvert.gguf.budget import choose

    for trial, mats, fixed, budget in _random_cost_tables(0, 4):
        c = choose(mats, fixed, budget)
        used = fixed + sum(m.nbytes[c.types[m.name]] for m in mats)
        assert used == c.total_bytes <= budget, trial
        preset_bytes = fixed + sum(m.nbytes[m.preset_type] for m in mats)
        if preset_bytes <= budget:
            assert c.cost <= sum(m.cost[m.preset_type] for m in mats) + 1e-12, trial
        for m in mats:  # no single change that still fits would lower the cost
            for t in m.nbytes:
                if used - m.nbytes[c.types[m.name]] + m.nbytes[t] <= budget:
                    assert m.cost[t] >= m.cost[c.types[m.name]] - 1e-12 or c.kept_preset, (trial, m.name, t)


def test_steps_from_the_preset_fit_change_little_and_leave_no_helpful_upgrade() -> None:
    """``anchored`` on random cost tables: the result fits; where the preset fits it is never worse than the
    preset and differs only by upgrades; no single upgrade that fits and helps is left; and on a hand-made table
    it frees the bytes where they cost least."""
    from qconvert.gguf.budget import MatrixCosts, anchored

    for trial, mats, fixed, budget in _random_cost_tables(1, 5):
        c = anchored(mats, fixed, budget)
        used = fixed + sum(m.nbytes[c.types[m.name]] for m in mats)
        assert used == c.total_bytes <= budget, trial
        preset_bytes = fixed + sum(m.nbytes[m.preset_type] for m in mats)
        if preset_bytes <= budget:
            assert c.cost <= sum(m.cost[m.preset_type] for m in mats) + 1e-12, trial
            assert all(m.nbytes[c.types[m.name]] >= m.nbytes[m.preset_type] for m in mats), trial
        for m in mats:
            for t in m.nbytes:
                if m.nbytes[t] > m.nbytes[c.types[m.name]] and used - m.nbytes[c.types[m.name]] + m.nbytes[t] <= budget:
                    assert m.cost[t] >= m.cost[c.types[m.name]], (trial, m.name, t)
    q2, q4, q6 = GGMLType.Q2_K, GGMLType.Q4_K, GGMLType.Q6_K
    cheap = MatrixCosts("cheap", q4, {q2: 100, q4: 200, q6: 300}, {q2: 1.1, q4: 1.0, q6: 0.99})  # 0.001 per byte
    dear = MatrixCosts("dear", q4, {q2: 100, q4: 200, q6: 300}, {q2: 9.0, q4: 1.0, q6: 0.5})
    c = anchored([cheap, dear], 0, 390)  # the preset (400 bytes) is 10 over: free them where it costs least
    assert c.types == {"cheap": q2, "dear": q4} and c.total_bytes == 300 and not c.kept_preset
    c = anchored([cheap, dear], 0, 500)  # 100 bytes to spend: where they save most
    assert c.types == {"cheap": q4, "dear": q6} and c.total_bytes == 500
    assert anchored([cheap, dear], 0, 450).kept_preset


def test_budget_outside_the_possible_sizes_is_refused_with_the_range() -> None:
    from qconvert.errors import UsageError
    from qconvert.gguf.budget import MatrixCosts, choose

    m = MatrixCosts("m", GGMLType.Q4_K, {GGMLType.Q2_K: 100, GGMLType.Q8_0: 400}, {GGMLType.Q2_K: 2.0, GGMLType.Q8_0: 0.1})
    with pytest.raises(UsageError, match=r"range from 0.00 MB to 0.00 MB \(raise"):
        choose([m], 10, 50)
    with pytest.raises(UsageError, match="lower --target-size"):
        choose([m], 10, 1000)


@pytest.fixture(scope="module")
def q3(demo, stats_file, tmp_path_factory) -> Path:
    """llama.cpp's Q3_K_M with the importance matrix of the shared statistics (qconvert's byte-identical encoder)."""
    return _make(demo, stats_file, tmp_path_factory.mktemp("q3"), "Q3_K_M", False)


@pytest.mark.parametrize("optimize", [False, True])
def test_target_size_of_q3_k_m_is_met_and_closer_to_the_float_model_in_llamacpp(demo, stats_file, q3, tmp_path,
                                                                                 optimize: bool) -> None:
    """A budget equal to Q3_K_M's file: the file is not larger, has the same tensors (types chosen per decoder
    matrix), records the budget, and in llama.cpp its KL to the float model is below Q3_K_M's (measured on the
    demo, AMX CPU, with the model-level check: 0.00173 -> 0.00093, with --optimize 0.00047); the same inputs give
    the same bytes."""
    from qconvert.gguf.reader import read_gguf
    from qconvert.verify import build_reference, eval_tokens, verify_artifact

    size = q3.stat().st_size
    args = ["gguf", "--model", str(demo), "--type", "Q3_K_M", "--stats", str(stats_file), "--quiet",
            "--target-size", repr(size / 1e9), *(["--optimize"] if optimize else [])]
    out = tmp_path / "budget.gguf"
    assert main([*args, "--output", str(out)]) == 0
    assert out.stat().st_size <= size
    g, g3 = read_gguf(out), read_gguf(q3)
    assert list(g.tensors) == list(g3.tensors) and "qconvert.budget" in g.metadata
    assert {n: t.type for n, t in g.tensors.items() if not n.startswith("blk.")} == \
        {n: t.type for n, t in g3.tensors.items() if not n.startswith("blk.")}
    assert any(g.tensors[n].type != g3.tensors[n].type for n in g.tensors)
    ref = build_reference(demo, eval_tokens(demo), ctx=128, chunks=6, progress=False)
    r, r3 = verify_artifact(out, ref, progress=False), verify_artifact(q3, ref, progress=False)
    print(f"Q3_K_M {size} B KL {r3.kl_mean:.5f}; budget{' + optimize' if optimize else ''} "
          f"{out.stat().st_size} B KL {r.kl_mean:.5f}")
    assert r.kl_mean < r3.kl_mean
    again = tmp_path / "again.gguf"
    assert main([*args, "--output", str(again)]) == 0 and again.read_bytes() == out.read_bytes()


def test_target_size_of_an_iquant_preset_can_only_match_or_beat_it_in_llamacpp(demo, stats_file, tmp_path,
                                                                                 capsys) -> None:
    """An I-quant preset's own types compete in the budget (IQ3_M: IQ3_S beside the K-quants; they are not on the
    K-quant ladder): a budget equal to IQ3_M's file gives a file no larger that is either IQ3_M's own, byte for
    byte, or closer to the float model in llama.cpp; the model-level check ran."""
    from qconvert.gguf.reader import read_gguf
    from qconvert.verify import build_reference, eval_tokens, verify_artifact

    iq3 = _make(demo, stats_file, tmp_path, "IQ3_M", False)
    assert GGMLType.IQ3_S in {t.type for t in read_gguf(iq3).tensors.values()}
    out = tmp_path / "budget.gguf"
    capsys.readouterr()
    assert main(["gguf", "--model", str(demo), "--type", "IQ3_M", "--stats", str(stats_file), "--quiet",
                 "--target-size", repr(iq3.stat().st_size / 1e9), "--output", str(out)]) == 0
    said = capsys.readouterr()
    assert "model-level check" in said.out + said.err, said
    assert out.stat().st_size <= iq3.stat().st_size
    if out.read_bytes() != iq3.read_bytes():
        ref = build_reference(demo, eval_tokens(demo), ctx=128, chunks=6, progress=False)
        r, r_iq3 = verify_artifact(out, ref, progress=False), verify_artifact(iq3, ref, progress=False)
        print(f"IQ3_M KL {r_iq3.kl_mean:.5f}; budget KL {r.kl_mean:.5f}")
        assert r.kl_mean < r_iq3.kl_mean


def test_budget_candidates_include_the_presets_own_type() -> None:
    from qconvert.gguf.budget import K_LADDER, measure

    rng = np.random.default_rng(0)
    W = rng.standard_normal((8, 512)).astype(np.float32)
    H = torch.eye(512)
    m = measure("m", W, H, GGMLType.IQ3_S, np.ones(512, np.float32))
    assert set(m.nbytes) == {*K_LADDER, GGMLType.IQ3_S} and set(m.cost) == set(m.nbytes)
    assert m.nbytes[GGMLType.IQ3_S] == 8 * GGMLType.IQ3_S.row_bytes(512)
    assert m.cost[GGMLType.Q2_K] > m.cost[GGMLType.IQ3_S] > m.cost[GGMLType.Q8_0]


def test_a_second_scoring_reuses_the_float_states_and_scores_the_same(demo, stats_file) -> None:
    """The budget check's second pass takes the first pass's float final states instead of running the float
    layers again: the scores are bit for bit those of a fresh pass."""
    from qconvert.calibration.stats import CalibrationStats
    from qconvert.gguf.budget_check import score_mixtures
    from qconvert.io.safetensors import SafetensorsCheckpoint

    ids = CalibrationStats.load(stats_file).heldout_ids
    assert ids is not None
    names = [n for n in SafetensorsCheckpoint(demo).names() if n.startswith("model.layers.") and n.endswith("proj.weight")]
    mixtures = [dict.fromkeys(names, GGMLType.Q3_K), {n: GGMLType.Q2_K for n in names if "mlp" in n}]
    kl, nll, states = score_mixtures(demo, mixtures, {}, ids)
    kl2, nll2, states2 = score_mixtures(demo, mixtures[::-1], {}, ids, float_states=states)
    assert states2 is states and kl.shape == (2, *ids.shape[:1], ids.shape[1] - 1)
    assert torch.equal(kl2, kl.flip(0)) and torch.equal(nll2, nll.flip(0))
    assert float(kl[0].mean()) > 0 and float(kl[1].mean()) > 0 and not torch.equal(kl[0], kl[1])


def _decoded_file(demo: Path, path: Path) -> dict[str, torch.Tensor]:
    """The float model (HF names) with every decoder matrix replaced by the file's, decoded by gguf-py."""
    import gguf

    from qconvert.registry import QWEN2
    from tests.model_helpers import quantized_weights

    w = quantized_weights(demo, {})
    hf = {QWEN2.name_map.gguf_name(n): n for n in w if n.startswith("model.layers.") and n.endswith("proj.weight")}
    for t in gguf.GGUFReader(str(path)).tensors:
        if t.name in hf:
            decoded = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
            w[hf[t.name]] = torch.from_numpy(decoded.reshape(w[hf[t.name]].shape))
    return w


def _kl_nll(demo: Path, weights: dict[str, torch.Tensor], window: torch.Tensor) -> tuple[float, float]:
    """Mean KL to the float model and next-token NLL over positions 0 .. t-2: whole-model forwards in memory."""
    from qconvert.registry import read_model_config
    from tests.model_helpers import forward, quantized_weights

    config = read_model_config(demo)
    vocab = int(config["vocab_size"])
    with torch.no_grad():
        ref = forward(quantized_weights(demo, {}), window, config)[:, :-1].reshape(-1, vocab)
        got = forward(weights, window, config)[:, :-1].reshape(-1, vocab)
    kl = torch.nn.functional.kl_div(torch.log_softmax(got.double(), -1), torch.log_softmax(ref.double(), -1),
                                    log_target=True, reduction="batchmean")
    return float(kl), float(torch.nn.functional.cross_entropy(got.double(), window[:, 1:].reshape(-1)))


def test_a_budget_choice_worse_than_the_preset_on_held_out_windows_gives_the_presets_file(
        demo, stats_file, q3, tmp_path, monkeypatch, capsys) -> None:
    """A planted bad choice (Q3_K_M's mixture with every ffn_down and attn_v at the cheapest type: smaller, so it
    fits): the model-level check scores exactly the two files' mixtures (whole-model forwards of the weights
    gguf-py decodes from them, on the statistics' held-out windows, give the same KL and NLL) and finds it worse,
    so ``--target-size`` of Q3_K_M's size writes Q3_K_M's own file, byte for byte, and says why."""
    import re

    from qconvert.calibration.stats import CalibrationStats
    from qconvert.gguf import budget
    from qconvert.gguf.budget import candidates
    from qconvert.gguf.budget_check import check_budget
    from qconvert.gguf.export import PlanOptions, export_gguf
    from qconvert.gguf.reader import read_gguf
    from qconvert.io.safetensors import SafetensorsCheckpoint
    from qconvert.registry import QWEN2

    stats = CalibrationStats.load(stats_file)
    ids = stats.heldout_ids
    assert ids is not None and tuple(ids.shape) == (stats.holdout_windows, 128)
    from_gguf = {QWEN2.name_map.gguf_name(h): h for h in SafetensorsCheckpoint(demo).names()
                 if h.startswith("model.layers.") and h.endswith("proj.weight")}
    cols = {g: SafetensorsCheckpoint(demo).read_f32(h).shape[1] for g, h in from_gguf.items()}
    preset = {n: t.type for n, t in read_gguf(q3).tensors.items() if n in from_gguf}
    planted = {n: candidates(cols[n])[0] if re.search("ffn_down|attn_v", n) else t for n, t in preset.items()}
    assert len(preset) == len(from_gguf) and any(planted[n] != preset[n] for n in preset)
    imatrix = stats.imatrix()
    bad = tmp_path / "planted.gguf"
    export_gguf(demo, bad, "Q3_K_M", imatrix=imatrix,
                options=PlanOptions(tensor_types=tuple((f"^{re.escape(n)}$", t) for n, t in planted.items())))
    assert bad.stat().st_size < q3.stat().st_size
    check = check_budget(demo, "Q3_K_M", {from_gguf[g]: t for g, t in preset.items()},
                         {from_gguf[g]: t for g, t in planted.items()},
                         {from_gguf[g]: v for g, v in imatrix.items() if g in from_gguf}, ids)
    kl3, nll3 = _kl_nll(demo, _decoded_file(demo, q3), ids)
    kl_bad, nll_bad = _kl_nll(demo, _decoded_file(demo, bad), ids)
    assert math.isclose(check.preset_kl, kl3, rel_tol=2e-3) and math.isclose(check.preset_nll, nll3, rel_tol=1e-4)
    assert math.isclose(check.kl, kl_bad, rel_tol=2e-3) and math.isclose(check.nll, nll_bad, rel_tol=1e-4)
    assert check.positions == ids.numel() - len(ids) and kl_bad > kl3 and not check.better

    real_choose = budget.choose

    def planted_choose(matrices, fixed, size, preset_fixed=None):  # the budget's choices, replaced by the bad one
        c = real_choose(matrices, fixed, size, preset_fixed)
        by_name = {m.name: m for m in matrices}
        used = fixed + sum(m.nbytes[planted[m.name]] for m in matrices)
        return budget.BudgetChoice({n: planted[n] for n in by_name}, used,
                                   sum(m.cost[planted[m.name]] for m in matrices), c.preset_cost, c.preset_bytes, False)

    monkeypatch.setattr("qconvert.gguf.budget_check.choose", planted_choose)  # every choice it tries
    monkeypatch.setattr("qconvert.gguf.budget_check.anchored", planted_choose)
    out = tmp_path / "budget.gguf"
    assert main(["gguf", "--model", str(demo), "--type", "Q3_K_M", "--stats", str(stats_file), "--quiet",
                 "--target-size", repr(q3.stat().st_size / 1e9), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "not closer to the float model, so the file is Q3_K_M's own" in err, err
    assert f"budget (by output error) KL {check.kl:.5f} vs Q3_K_M's {check.preset_kl:.5f}" in err
    assert out.read_bytes() == q3.read_bytes()


def test_a_budget_from_statistics_without_held_out_windows_says_it_is_unchecked(demo, q3, tmp_path, capsys) -> None:
    """Statistics collected without the held-out split (no held-out windows to judge on): the budget's choice is
    written as the proxy made it, and the command says it was not checked and how to get the check."""
    from qconvert.calibration.stats import CalibrationStats, collect_stats
    from qconvert.calibset import load_calibration
    from qconvert.gguf.reader import read_gguf

    calib = load_calibration("builtin", demo, chat=False, n_samples=4, seq_len=64, seed=0)
    plain = tmp_path / "plain-stats.safetensors"
    collect_stats(demo, calib.ids, path=plain)
    assert CalibrationStats.load(plain).heldout_ids is None
    out = tmp_path / "budget.gguf"
    assert main(["gguf", "--model", str(demo), "--type", "Q3_K_M", "--stats", str(plain), "--quiet",
                 "--target-size", repr(q3.stat().st_size / 1e9), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "was not checked against Q3_K_M's; recollect them with --calib SOURCE --save-stats FILE --optimize" in err
    assert "model-level check" not in err and "checked against" not in read_gguf(out).metadata["qconvert.budget"]


def test_target_size_bad_values_and_dry_run(demo, stats_file, tmp_path, capsys) -> None:
    base = ["gguf", "--model", str(demo), "--type", "Q4_K_M", "--stats", str(stats_file), "--quiet"]
    for target, message in (("0.0001", "is not possible for this model"), ("5", "is not possible for this model"),
                            ("-1", "must be a positive number")):
        rc = main([*base, "--target-size", target, "--output", str(tmp_path / "x.gguf")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
    assert main([*base, "--target-size", "0.0023", "--dry-run"]) == 0
    out = capsys.readouterr()
    assert "--target-size 0.0023 GB: predicted file" in out.err and "blk.0.ffn_down.weight" in out.out
    assert list(tmp_path.iterdir()) == []


def _tensor_bpw(path: Path) -> float:
    import math

    from qconvert.gguf.reader import read_gguf

    tensors = read_gguf(path).tensors.values()
    return 8 * sum(t.nbytes for t in tensors) / sum(math.prod(t.shape) for t in tensors)


def test_target_bpw_is_met_in_tensor_data_and_recorded(demo, stats_file, q3, tmp_path, capsys) -> None:
    """--target-bpw a little under Q3_K_M's: the tensor data stays within the bits per weight asked (the file is
    smaller than Q3_K_M's), the record says so; bad values and both budgets at once are refused, nothing written."""
    from qconvert.gguf.reader import read_gguf

    want = round(_tensor_bpw(q3) - 0.2, 2)
    base = ["gguf", "--model", str(demo), "--type", "Q3_K_M", "--stats", str(stats_file), "--quiet"]
    out = tmp_path / "bpw.gguf"
    assert main([*base, "--target-bpw", str(want), "--output", str(out)]) == 0
    got = _tensor_bpw(out)
    assert want - 0.05 < got <= want and out.stat().st_size < q3.stat().st_size
    assert f"at most {want} bits per weight" in read_gguf(out).metadata["qconvert.budget"]
    assert f"--target-bpw {want} bpw: predicted file" in capsys.readouterr().err
    for value, message in (("0", "must be a number of bits per weight above 0"),
                           ("1", "is not possible for this model")):
        rc = main([*base, "--target-bpw", value, "--output", str(tmp_path / "x.gguf")])
        err = capsys.readouterr().err
        assert rc == 2 and message in err and "Traceback" not in err, err
    with pytest.raises(SystemExit) as exit_:
        main([*base, "--target-bpw", "4", "--target-size", "0.002", "--output", str(tmp_path / "x.gguf")])
    assert exit_.value.code == 2 and "not allowed with argument" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bpw.gguf"]
