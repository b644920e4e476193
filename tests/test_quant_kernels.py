"""Numerical contracts of qconvert's ggml kernels against llama.cpp's own C library (the oracle).

1. Byte identity: ``quantize_rows`` equals ``ggml_quantize_chunk`` (no imatrix) for every type, on inputs
   chosen to hit the exactness traps: rounding ties, heavy tails, outliers, flat and all-zero sub-blocks,
   magnitudes whose fp16 scales are subnormal or zero, and values whose scales overflow fp16.
2. Round trip: ``dequantize_rows`` equals llama.cpp's ``dequantize_row_*`` on the same bytes, bit for bit.
3. Error bounds: the relative RMS error of each type on Gaussian weights stays within its known envelope.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numba
import numpy as np
import pytest

from qconvert.constants import GGMLType
from qconvert.errors import QuantTypeError, RuntimeMissingError
from qconvert.quant import SUPPORTED_TYPES, dequantize_rows, quantize_rows

if importlib.util.find_spec("llama_cpp_py_sync") is None:
    pytest.skip("llama.cpp's library (pip install llama-cpp-py-sync) is the oracle of these tests",
                allow_module_level=True)

from qconvert.runtimes import ggml_lib

K_TYPES = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K]
LEGACY_TYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0]
FLOAT_TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.BF16]
I_TYPES = [GGMLType.IQ4_NL, GGMLType.IQ4_XS]  # their imatrix paths and gguf-py decoding: tests/test_iquants.py
GRID_TYPES = [GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S,
              GGMLType.IQ1_S, GGMLType.IQ1_M]  # llama.cpp aborts on NaN input for these: tested in test_iquants
ALL_TYPES = K_TYPES + LEGACY_TYPES + FLOAT_TYPES + I_TYPES


def _bf16_rounded(x: np.ndarray) -> np.ndarray:
    """Round to bf16 (nearest even) and back: what a bf16 checkpoint holds."""
    u = x.view(np.uint32)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def _one_outlier(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(0.02)
    x[np.arange(shape[0]), rng.integers(0, shape[1], shape[0])] = rng.choice([-40.0, 40.0], shape[0])
    return x


def _sparse(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Mostly zeros: many all-zero and flat sub-blocks next to normal ones."""
    x = rng.standard_normal(shape).astype(np.float32)
    return np.where(rng.random(shape) < 0.9, np.float32(0), x).astype(np.float32)


def _sprinkle(rng: np.random.Generator, shape: tuple[int, int], value: float) -> np.ndarray:
    x = rng.standard_normal(shape).astype(np.float32) * np.float32(0.02)
    x[rng.random(shape) < 0.003] = value
    return x


def _finite_bits(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """Uniformly random float32 bit patterns: magnitudes from 1e-45 to 3e38, subnormals, overflow to inf.

    NaNs are zeroed: with non-canonical NaN payloads the K-quant bytes depend on which payload the x86 add
    propagates, a compiler detail neither side controls (and NaN weights are a bug upstream anyway).
    """
    x = rng.integers(0, 2**32, shape, dtype=np.uint64).astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), np.float32(0), x).astype(np.float32)


# name -> (rng, (rows, cols)) -> f32[rows, cols]
DISTRIBUTIONS: dict[str, Callable[[np.random.Generator, tuple[int, int]], np.ndarray]] = {
    "normal": lambda rng, s: rng.standard_normal(s).astype(np.float32) * np.float32(0.02),
    "student_t3": lambda rng, s: rng.standard_t(3, s).astype(np.float32),
    "bf16_rounded": lambda rng, s: _bf16_rounded(rng.standard_normal(s).astype(np.float32) * np.float32(0.05)),
    "half_steps": lambda rng, s: (rng.integers(-40, 41, s) * 0.5).astype(np.float32),  # rounding ties
    "zeros": lambda rng, s: np.zeros(s, np.float32),
    "constant": lambda rng, s: np.full(s, 0.37, np.float32),
    "negative_constant": lambda rng, s: np.full(s, -1.25, np.float32),
    "one_outlier": _one_outlier,
    "sparse": _sparse,
    "negative_only": lambda rng, s: -np.abs(rng.standard_normal(s)).astype(np.float32),
    "positive_only": lambda rng, s: np.abs(rng.standard_normal(s)).astype(np.float32) + np.float32(1),
    "tiny_1e-6": lambda rng, s: rng.standard_normal(s).astype(np.float32) * np.float32(1e-6),  # fp16-subnormal d
    "tiny_1e-9": lambda rng, s: rng.standard_normal(s).astype(np.float32) * np.float32(1e-9),  # d rounds to 0
    "subnormal_f32": lambda rng, s: rng.standard_normal(s).astype(np.float32) * np.float32(1e-39),
    "huge_1e6": lambda rng, s: rng.standard_normal(s).astype(np.float32) * np.float32(1e6),  # d overflows fp16
    "inf_sprinkled": lambda rng, s: _sprinkle(rng, s, np.inf),
    "nan_sprinkled": lambda rng, s: _sprinkle(rng, s, np.nan),  # the canonical NaN; see _finite_bits
    "finite_bits": lambda rng, s: _finite_bits(rng, s),
}
ROW_LENGTHS = {256: [256, 512, 1536], 32: [32, 96, 896], 1: [32, 96, 896]}  # by block size


def _input(dist: str, rows: int, cols: int, seed: int) -> np.ndarray:
    return DISTRIBUTIONS[dist](np.random.default_rng(seed), (rows, cols))


def _assert_same_blocks(qtype: GGMLType, ours: np.ndarray, ref: np.ndarray, what: str) -> None:
    assert ours.shape == ref.shape, f"{what}: shape {ours.shape} vs llama.cpp {ref.shape}"
    unit = qtype.block_bytes
    bad = np.flatnonzero((ours.reshape(-1, unit) != ref.reshape(-1, unit)).any(axis=1))
    if bad.size:
        pytest.fail(f"{what}: {bad.size} of {ours.size // unit} {qtype.name} blocks differ from llama.cpp "
                    f"(first: block {bad[0]}, ours {ours.reshape(-1, unit)[bad[0]].tolist()}, "
                    f"llama.cpp {ref.reshape(-1, unit)[bad[0]].tolist()})")


@pytest.mark.parametrize("dist", list(DISTRIBUTIONS))
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_quantize_is_byte_identical_to_llama_cpp(qtype: GGMLType, dist: str) -> None:
    for i, cols in enumerate(ROW_LENGTHS[qtype.block_size]):
        rows = (64, 200, 96)[i]
        x = _input(dist, rows, cols, seed=1000 * i + len(dist))
        _assert_same_blocks(qtype, quantize_rows(qtype, x), ggml_lib.ggml_quantize(qtype, x), f"{dist} {x.shape}")


@pytest.mark.parametrize("dist", ["normal", "student_t3", "sparse", "one_outlier", "tiny_1e-6", "huge_1e6"])
@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_dequantize_matches_llama_cpp_bit_for_bit(qtype: GGMLType, dist: str) -> None:
    cols = ROW_LENGTHS[qtype.block_size][1]
    data = quantize_rows(qtype, _input(dist, 128, cols, seed=7))
    ours, ref = dequantize_rows(qtype, data, cols), ggml_lib.ggml_dequantize(qtype, data, cols)
    assert ours.dtype == np.float32 and ours.shape == ref.shape
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))


@pytest.mark.parametrize("qtype", [GGMLType.Q4_K, GGMLType.Q6_K, GGMLType.Q8_0], ids=lambda t: t.name)
def test_thread_count_does_not_change_bytes(qtype: GGMLType) -> None:
    x = _input("student_t3", 512, 512, seed=3)
    ref = ggml_lib.ggml_quantize(qtype, x)
    before = numba.get_num_threads()
    try:
        for threads in {1, numba.config.NUMBA_NUM_THREADS}:
            numba.set_num_threads(threads)
            _assert_same_blocks(qtype, quantize_rows(qtype, x), ref, f"{threads} threads")
    finally:
        numba.set_num_threads(before)


# Relative RMS error bound on N(0, 1) weights: measured value (llama.cpp and qconvert agree) plus ~15 %.
RMSE_BOUNDS = {
    GGMLType.F32: 0.0, GGMLType.F16: 2.4e-4, GGMLType.BF16: 1.9e-3, GGMLType.Q8_0: 0.0062,
    GGMLType.Q6_K: 0.0205, GGMLType.Q5_1: 0.044, GGMLType.Q5_0: 0.049, GGMLType.Q5_K: 0.042,
    GGMLType.Q4_1: 0.090, GGMLType.Q4_0: 0.099, GGMLType.Q4_K: 0.082, GGMLType.Q3_K: 0.174, GGMLType.Q2_K: 0.34,
    GGMLType.IQ4_NL: 0.088, GGMLType.IQ4_XS: 0.088,  # measured 0.0761 / 0.0767
}


@pytest.mark.parametrize("qtype", ALL_TYPES, ids=lambda t: t.name)
def test_round_trip_error_is_within_the_type_envelope(qtype: GGMLType) -> None:
    x = np.random.default_rng(11).standard_normal((64, 1536)).astype(np.float32)
    y = dequantize_rows(qtype, quantize_rows(qtype, x), x.shape[1])
    rel_rmse = float(np.sqrt(np.mean((y - x) ** 2)) / np.sqrt(np.mean(x**2)))
    assert rel_rmse <= RMSE_BOUNDS[qtype], f"{qtype.name}: relative RMSE {rel_rmse:.4g} > {RMSE_BOUNDS[qtype]}"


def test_q8_0_error_is_about_half_a_step() -> None:
    """|x − q·d| <= d/2, plus 127·2⁻¹¹·d because q is computed with d before its fp16 rounding."""
    x = np.random.default_rng(5).standard_normal((32, 896)).astype(np.float32)
    data = quantize_rows(GGMLType.Q8_0, x)
    d = data.reshape(-1, 34)[:, :2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    err = np.abs(dequantize_rows(GGMLType.Q8_0, data, 896) - x).reshape(-1, 32)
    assert np.all(err <= (0.5 + 127 / 2048) * d)


def test_supported_types_are_the_promised_ones() -> None:
    assert set(ALL_TYPES + GRID_TYPES) == SUPPORTED_TYPES


@pytest.mark.parametrize(("qtype", "cols"), [(GGMLType.Q5_K, 896), (GGMLType.Q4_0, 100)])
def test_row_length_not_a_multiple_of_the_block_is_refused(qtype: GGMLType, cols: int) -> None:
    with pytest.raises(QuantTypeError, match=f"not a multiple of {qtype.block_size}"):
        quantize_rows(qtype, np.zeros((2, cols), np.float32))
    with pytest.raises(QuantTypeError, match="not a multiple"):
        dequantize_rows(qtype, np.zeros((2, 1), np.uint8), cols)


def test_unsupported_type_is_refused_with_the_choices() -> None:
    with pytest.raises(QuantTypeError, match="choose one of: .*Q5_K"):
        quantize_rows(34, np.zeros((1, 32), np.float32))  # 34 = TQ1_0 in ggml.h


def test_wrong_dtype_is_refused() -> None:
    with pytest.raises(TypeError, match="float32"):
        quantize_rows(GGMLType.Q8_0, np.zeros((1, 32), np.float64))


def test_missing_oracle_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    from qconvert.runtimes import native

    with pytest.raises(RuntimeMissingError, match="pip install"):
        native.package_dir()


def test_jit_cache_is_dropped_when_any_kernel_source_changes(tmp_path) -> None:
    from qconvert.quant.jitcache import drop_stale_cache

    (tmp_path / "a.py").write_text("x = 1\n")
    cache = tmp_path / "__pycache__"
    cache.mkdir()
    assert drop_stale_cache(tmp_path)  # first sight: no stamp yet
    (cache / "a.f-1.py311.nbi").write_bytes(b"index")
    assert not drop_stale_cache(tmp_path) and (cache / "a.f-1.py311.nbi").exists()
    (tmp_path / "a.py").write_text("x = 22\n")  # a helper changed: kernels compiled against it are stale
    assert drop_stale_cache(tmp_path) and not (cache / "a.f-1.py311.nbi").exists()
