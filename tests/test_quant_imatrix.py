"""Importance-matrix quantization (``llama-quantize --imatrix``) against llama.cpp's own C library.

1. Byte identity: ``quantize_rows(qtype, x, imatrix)`` equals ``ggml_quantize_chunk(..., imatrix)`` for every
   type whose quantizer uses the imatrix, on several weight distributions and imatrices (with zero columns,
   with a dynamic range of 1e12, constant), row lengths as in ``test_quant_kernels``.
2. Purpose: on average the imatrix version has a lower imatrix-weighted squared error than the plain one.
3. Types that ignore the imatrix (Q8_0, floats) give the plain bytes; bad imatrix shapes are refused.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable

import numpy as np
import pytest

from qconvert.constants import GGMLType
from qconvert.quant import dequantize_rows, quantize_rows

if importlib.util.find_spec("llama_cpp_py_sync") is None:
    pytest.skip("llama.cpp's library (pip install llama-cpp-py-sync) is the oracle of these tests",
                allow_module_level=True)

from qconvert.runtimes import ggml_lib
from tests.test_quant_kernels import DISTRIBUTIONS, ROW_LENGTHS, _assert_same_blocks

IMATRIX_TYPES = [GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K,
                 GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1]
X_DISTRIBUTIONS = list(DISTRIBUTIONS)  # all of test_quant_kernels' traps: ties, outliers, inf, NaN, subnormal scales


def _with_zeros(rng: np.random.Generator, cols: int) -> np.ndarray:
    """Calibration never touched some columns (dead channels): their imatrix entries are 0."""
    im = rng.chisquare(1, cols).astype(np.float32)
    im[rng.random(cols) < 0.2] = 0
    im[:16] = 0  # a whole 16-sub-block of zero weight
    return im


# name -> (rng, cols) -> f32[cols], the per-column mean of x² over calibration tokens
IMATRICES: dict[str, Callable[[np.random.Generator, int], np.ndarray]] = {
    "chi2": lambda rng, c: rng.chisquare(1, c).astype(np.float32),
    "with_zeros": _with_zeros,
    "wide_range": lambda rng, c: (10.0 ** rng.uniform(-6, 6, c)).astype(np.float32),
    "ones": lambda rng, c: np.ones(c, np.float32),
}


@pytest.mark.parametrize("imatrix", list(IMATRICES))
@pytest.mark.parametrize("qtype", IMATRIX_TYPES, ids=lambda t: t.name)
def test_imatrix_quantize_is_byte_identical_to_llama_cpp(qtype: GGMLType, imatrix: str) -> None:
    for d, dist in enumerate(X_DISTRIBUTIONS):
        for i, cols in enumerate(ROW_LENGTHS[qtype.block_size]):
            rng = np.random.default_rng(100 * d + 10 * i + len(imatrix))
            rows = (16, 24, 8)[i]
            x = DISTRIBUTIONS[dist](rng, (rows, cols))
            im = IMATRICES[imatrix](rng, cols)
            _assert_same_blocks(qtype, quantize_rows(qtype, x, im), ggml_lib.ggml_quantize(qtype, x, im),
                                f"{dist} x, {imatrix} imatrix {x.shape}")


@pytest.mark.parametrize("qtype", IMATRIX_TYPES, ids=lambda t: t.name)
def test_imatrix_bytes_do_not_depend_on_the_thread_split(qtype: GGMLType) -> None:
    """Enough rows for several threads: each thread must pick the right imatrix slice for its blocks."""
    rng = np.random.default_rng(9)
    cols = ROW_LENGTHS[qtype.block_size][2]
    x = DISTRIBUTIONS["student_t3"](rng, (160, cols))
    im = IMATRICES["chi2"](rng, cols)
    _assert_same_blocks(qtype, quantize_rows(qtype, x, im), ggml_lib.ggml_quantize(qtype, x, im), "threads")


@pytest.mark.parametrize("qtype", IMATRIX_TYPES, ids=lambda t: t.name)
def test_imatrix_lowers_the_weighted_error(qtype: GGMLType) -> None:
    """Σ imatrix·(y − x)² is what the imatrix asks to minimise: on average it beats the plain quantization."""
    rng = np.random.default_rng(21)
    cols = 1536 if qtype.block_size == 256 else 896
    x = rng.standard_normal((64, cols)).astype(np.float32)
    im = (10.0 ** rng.uniform(-2, 2, cols)).astype(np.float32)

    def weighted_error(data: np.ndarray) -> float:
        return float(np.mean(im * (dequantize_rows(qtype, data, cols) - x) ** 2))

    plain, weighted = weighted_error(quantize_rows(qtype, x)), weighted_error(quantize_rows(qtype, x, im))
    assert weighted < 0.97 * plain, f"{qtype.name}: weighted error {weighted:.4g} vs plain {plain:.4g}"


@pytest.mark.parametrize("qtype", [GGMLType.Q8_0, GGMLType.F16, GGMLType.BF16, GGMLType.F32],
                         ids=lambda t: t.name)
def test_types_that_ignore_the_imatrix_give_the_plain_bytes(qtype: GGMLType) -> None:
    rng = np.random.default_rng(4)
    x = rng.standard_normal((8, 96)).astype(np.float32)
    im = rng.chisquare(1, 96).astype(np.float32)
    np.testing.assert_array_equal(quantize_rows(qtype, x, im), quantize_rows(qtype, x))
    np.testing.assert_array_equal(quantize_rows(qtype, x, im), ggml_lib.ggml_quantize(qtype, x, im))


def test_plain_path_is_unchanged_by_the_new_argument() -> None:
    x = np.random.default_rng(6).standard_normal((8, 512)).astype(np.float32)
    np.testing.assert_array_equal(quantize_rows(GGMLType.Q4_K, x, None), ggml_lib.ggml_quantize(GGMLType.Q4_K, x))


@pytest.mark.parametrize("imatrix", [np.ones(255, np.float32), np.ones(256, np.float64), np.ones((1, 256),
                                                                                                 np.float32)])
def test_imatrix_of_the_wrong_shape_or_dtype_is_refused(imatrix: np.ndarray) -> None:
    with pytest.raises(TypeError, match="imatrix as float32 \\[256\\]"):
        quantize_rows(GGMLType.Q4_K, np.zeros((2, 256), np.float32), imatrix)
