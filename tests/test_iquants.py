"""Numerical contracts of the I-quant kernels IQ4_NL, IQ4_XS (``qconvert.quant.iquants``), IQ3_XXS and IQ3_S
(``qconvert.quant.iq3``), IQ2_XXS, IQ2_XS, IQ2_S (``qconvert.quant.iq2``), IQ1_S and IQ1_M
(``qconvert.quant.iq1``).

1. Format facts: the 16 non-linear levels equal gguf-py's table; block sizes equal gguf-py's and ggml's; the
   IQ3/IQ2 grids read from gguf-py pack to the codes of ggml's ``kgrid_256``/``kgrid_512``/``kgrid_2bit_*``.
2. Byte identity with an importance matrix: ``quantize_rows(qtype, x, imatrix)`` equals llama.cpp's
   ``ggml_quantize_chunk(..., imatrix)`` on every adversarial weight distribution of ``test_quant_kernels`` and
   every imatrix of ``test_quant_imatrix`` (zero columns, 1e12 range, constant), and for any thread split.
   (Without an imatrix the IQ4 contract is in ``test_quant_kernels``, where they are in ALL_TYPES; the grid
   types' is here, as llama.cpp aborts on some non-finite weights for them: qconvert refuses exactly those,
   tested against the abort in a child process.)
3. Independent decode: gguf-py's ``gguf.quants.dequantize`` reads the bytes back to the values llama.cpp
   decodes, and within each type's error envelope of the float weights.
4. Purpose: the imatrix lowers the imatrix-weighted error; NaN weights never reach a file.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from qconvert.constants import IQ4_NL_VALUES, GGMLType
from qconvert.quant import dequantize_rows, quantize_rows

if importlib.util.find_spec("llama_cpp_py_sync") is None:
    pytest.skip("llama.cpp's library (pip install llama-cpp-py-sync) is the oracle of these tests",
                allow_module_level=True)
gguf = pytest.importorskip("gguf", reason="gguf-py is the independent decoder")
gguf_quants = pytest.importorskip("gguf.quants", reason="gguf-py is the independent decoder")

from qconvert.runtimes import ggml_lib
from tests.test_quant_imatrix import IMATRICES
from tests.test_quant_kernels import DISTRIBUTIONS, ROW_LENGTHS, _assert_same_blocks

I_TYPES = [GGMLType.IQ4_NL, GGMLType.IQ4_XS]
GRID_TYPES = [GGMLType.IQ3_XXS, GGMLType.IQ3_S, GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S,  # grid searches
              GGMLType.IQ1_S, GGMLType.IQ1_M]
IMATRIX_ONLY = [GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ1_S]  # llama.cpp asserts when it gets no imatrix
PLAIN_TYPES = [t for t in I_TYPES + GRID_TYPES if t not in IMATRIX_ONLY]
# (type, distribution, with imatrix) where llama.cpp's quantizer asserts: NaN distances leave no grid neighbour,
# or a NaN scale fails ``scale >= 0`` (with an imatrix, Inf weights make σ² and every weight infinite), or
# IQ2_XXS/IQ2_XS/IQ1_S get no imatrix, or (IQ2_XXS) an Inf leaves a level its grid does not have. Found one by one
# against the C library, on the inputs of test_grid_types_refuse_what_llama_cpp_aborts_on; everything else,
# NaN and Inf included, gives equal bytes (IQ2_XXS's make_qp_quants start copes with NaN).
_T = GGMLType
ABORTS = {(t, d, m) for t in (_T.IQ3_XXS, _T.IQ3_S, _T.IQ2_S) for d in ("nan_sprinkled", "finite_bits")
          for m in (False, True)} | {(_T.IQ2_XS, d, True) for d in ("nan_sprinkled", "finite_bits", "inf_sprinkled")} | {
    (_T.IQ3_XXS, "inf_sprinkled", True), (_T.IQ3_S, "inf_sprinkled", True), (_T.IQ3_S, "inf_sprinkled", False),
    (_T.IQ2_S, "inf_sprinkled", True), (_T.IQ2_S, "inf_sprinkled", False),
    (_T.IQ2_XXS, "inf_sprinkled", True), (_T.IQ2_XXS, "normal", False), (_T.IQ2_XS, "normal", False),
    (_T.IQ1_S, "normal", False), (_T.IQ1_M, "inf_sprinkled", False), (_T.IQ1_M, "finite_bits", False)}


def test_levels_and_layouts_match_gguf_py() -> None:
    assert tuple(gguf_quants.IQ4_NL.kvalues) == IQ4_NL_VALUES
    for qtype in I_TYPES + GRID_TYPES:
        assert gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(int(qtype))] == (qtype.block_size,
                                                                                  qtype.block_bytes)
        assert gguf.GGMLQuantizationType(int(qtype)).name == qtype.name


def test_iq3_xxs_grid_matches_ggml() -> None:
    from qconvert.quant.iq3 import grid_tables

    levels, kmap, start, neighbours = grid_tables()
    codes = (levels.astype(np.int64) << (3 * np.arange(4))).sum(axis=1)
    # the first and last entries of kgrid_256 in ggml-quants.c (iq3xs_init_impl), typed in from the source
    assert codes[:12].tolist() == [0, 2, 4, 9, 11, 15, 16, 18, 25, 34, 59, 61]
    assert codes[-5:].tolist() == [3873, 3904, 3906, 3924, 3992]
    assert (kmap >= 0).sum() == 256 and np.all(np.diff(codes) > 0)
    assert np.all(neighbours[start[kmap < 0]] > 0)  # every off-grid point has neighbours
    levels, kmap, start, neighbours = grid_tables(512)
    codes = (levels.astype(np.int64) << (3 * np.arange(4))).sum(axis=1)
    assert codes[:12].tolist() == [0, 1, 2, 5, 7, 8, 9, 10, 12, 14, 16, 17]  # kgrid_512
    assert codes[-5:].tolist() == [3922, 3938, 3970, 3993, 4032]
    assert (kmap >= 0).sum() == 512 and np.all(neighbours[start[kmap < 0]] > 0)


def test_iq2_s_grid_matches_ggml() -> None:
    from qconvert.quant.iq2 import grid_tables

    levels, kmap, start, neighbours = grid_tables()
    codes = (levels.astype(np.int64) << (2 * np.arange(8))).sum(axis=1)
    assert codes[:10].tolist() == [0, 2, 5, 8, 10, 17, 20, 22, 25, 32]  # kgrid_2bit_1024 in ggml-quants.c
    assert codes[-4:].tolist() == [43554, 43560, 43656, 43690]
    assert (kmap >= 0).sum() == 1024 and np.all(neighbours[start[kmap < 0]] > 0)
    for kind, first, last in ((0, [0, 2, 5, 8, 10, 17, 20, 32, 34, 40], [42008, 43088, 43268]),  # kgrid_2bit_256
                              (1, [0, 2, 5, 8, 10, 17, 20, 22, 25, 32], [43562, 43665, 43690])):  # kgrid_2bit_512
        levels, kmap, start, neighbours = grid_tables(kind)
        codes = (levels.astype(np.int64) << (2 * np.arange(8))).sum(axis=1)
        assert codes[:10].tolist() == first and codes[-3:].tolist() == last
        assert np.all(neighbours[start[kmap < 0]] > 0)
    levels, kmap, start, neighbours = grid_tables(3)  # IQ1_S / IQ1_M: kgrid_1bit_2048
    codes = (levels.astype(np.int64) << (2 * np.arange(8))).sum(axis=1)
    assert codes[:10].tolist() == [0, 2, 5, 8, 10, 17, 21, 32, 34, 40] and codes[-3:].tolist() == [43682, 43688, 43690]
    assert (kmap >= 0).sum() == 2048 and np.all(neighbours[start[kmap < 0]] > 0)


@pytest.mark.parametrize("qtype", [t for t in GRID_TYPES if t not in IMATRIX_ONLY], ids=lambda t: t.name)
def test_grid_quantize_is_byte_identical_to_llama_cpp(qtype: GGMLType) -> None:
    for d, dist in enumerate(DISTRIBUTIONS):
        if (qtype, dist, False) in ABORTS:
            continue
        for i, cols in enumerate(ROW_LENGTHS[qtype.block_size]):
            x = DISTRIBUTIONS[dist](np.random.default_rng(1000 * i + d), ((16, 24, 8)[i], cols))
            _assert_same_blocks(qtype, quantize_rows(qtype, x), ggml_lib.ggml_quantize(qtype, x), f"{dist} {x.shape}")


def test_iq3_s_writes_over_all_zero_sub_blocks_as_llama_cpp_does() -> None:
    """C advances IQ3_S's qs/signs pointers only past sub-blocks that are not all zero, so the next sub-block's
    indices land in the zero one's place; the bytes must still match (and decode as C decodes them)."""
    x = np.random.default_rng(3).standard_normal((4, 512)).astype(np.float32)
    x[0, 0:32] = 0  # first sub-block
    x[1, 96:160] = 0  # two in the middle
    x[2, 224:256] = 0  # the last of a super-block
    data = quantize_rows(GGMLType.IQ3_S, x)
    _assert_same_blocks(GGMLType.IQ3_S, data, ggml_lib.ggml_quantize(GGMLType.IQ3_S, x), "zero sub-blocks")
    np.testing.assert_array_equal(dequantize_rows(GGMLType.IQ3_S, data, 512),
                                  ggml_lib.ggml_dequantize(GGMLType.IQ3_S, data, 512))


@pytest.mark.parametrize(("qtype", "dist", "with_imatrix"), sorted(ABORTS, key=str),
                         ids=lambda v: getattr(v, "name", str(v)))
def test_grid_types_refuse_what_llama_cpp_aborts_on(qtype: GGMLType, dist: str, with_imatrix: bool) -> None:
    """llama.cpp's grid searches assert (kill the process) on these inputs, and IQ2_XXS/IQ2_XS on a missing
    importance matrix; qconvert raises a QuantTypeError for the same input. The oracle runs in a child
    process."""
    import subprocess
    import sys

    from qconvert.errors import QuantTypeError

    rng = np.random.default_rng(100 * list(DISTRIBUTIONS).index(dist) + len("chi2"))  # as the imatrix test's
    x = DISTRIBUTIONS[dist](rng, (16, 256))
    im = IMATRICES["chi2"](rng, 256) if with_imatrix else None
    with pytest.raises(QuantTypeError, match="NaN|without an importance matrix"):
        quantize_rows(qtype, x, im)
    code = ("import sys, numpy as np; from qconvert.constants import GGMLType; from qconvert.runtimes import ggml_lib; "
            "a = np.frombuffer(sys.stdin.buffer.read(), np.float32); x, im = a[:4096].reshape(16, 256), a[4096:]; "
            f"ggml_lib.ggml_quantize(GGMLType.{qtype.name}, x, im if im.size else None)")
    payload = x.tobytes() + (b"" if im is None else im.tobytes())
    child = subprocess.run([sys.executable, "-c", code], input=payload, capture_output=True, timeout=120, check=False)
    # GGML_ASSERT(...), or GGML_ABORT("fatal error") after "Oops: found point ... not on grid"
    assert child.returncode != 0 and (b"GGML_ASSERT" in child.stderr or b"fatal error" in child.stderr), child.stderr[-500:]


@pytest.mark.parametrize("imatrix", list(IMATRICES))
@pytest.mark.parametrize("qtype", I_TYPES + GRID_TYPES, ids=lambda t: t.name)
def test_imatrix_quantize_is_byte_identical_to_llama_cpp(qtype: GGMLType, imatrix: str) -> None:
    for d, dist in enumerate(DISTRIBUTIONS):
        if (qtype, dist, True) in ABORTS:
            continue
        for i, cols in enumerate(ROW_LENGTHS[qtype.block_size]):
            rng = np.random.default_rng(100 * d + 10 * i + len(imatrix))
            x = DISTRIBUTIONS[dist](rng, ((16, 24, 8)[i], cols))
            im = IMATRICES[imatrix](rng, cols)
            _assert_same_blocks(qtype, quantize_rows(qtype, x, im), ggml_lib.ggml_quantize(qtype, x, im),
                                f"{dist} x, {imatrix} imatrix {x.shape}")


@pytest.mark.parametrize("qtype", I_TYPES + GRID_TYPES, ids=lambda t: t.name)
def test_bytes_do_not_depend_on_the_thread_split(qtype: GGMLType) -> None:
    """Enough rows for several threads: each range must pick the right imatrix slice for its blocks."""
    import numba

    rng = np.random.default_rng(9)
    cols = ROW_LENGTHS[qtype.block_size][2]
    x = DISTRIBUTIONS["student_t3"](rng, (160, cols))
    im = IMATRICES["chi2"](rng, cols)
    before = numba.get_num_threads()
    try:
        for threads in {1, numba.config.NUMBA_NUM_THREADS}:
            numba.set_num_threads(threads)
            for m in (im,) if qtype in IMATRIX_ONLY else (None, im):
                _assert_same_blocks(qtype, quantize_rows(qtype, x, m), ggml_lib.ggml_quantize(qtype, x, m),
                                    f"{threads} threads, imatrix {m is not None}")
    finally:
        numba.set_num_threads(before)


# Round trip of N(0, 1) weights, 64 x 1536, measured (the same for llama.cpp's bytes): relative RMS error 0.0761
# (IQ4_NL) and 0.0766 (IQ4_XS) plain, 0.0815 / 0.0818 with a 1e-2..1e2 imatrix (which trades error on
# unimportant columns); Q4_0 at the same 4.5 bits measures 0.086. Worst weight of a 32-block over the block's
# absolute max: 0.116 / 0.124 plain. Half the widest level gap, (113 - 89)/2/127 = 0.094 of amax, is
# the floor; the search may shrink the scale and clip the extreme levels, and IQ4_XS rounds sub-block scales
# to 6 bits, hence the 0.14 bound.
# IQ3_XXS (3.06 bits): 0.213 plain, 0.249 with the imatrix; IQ3_S (3.44 bits): 0.166 / 0.164 (Q3_K, also 3.44
# bits: 0.151 / 0.165); IQ2_S (2.56 bits): 0.265 / 0.297; with the imatrix only, IQ2_XS (2.31) 0.376, IQ2_XXS
# (2.06) 0.508, IQ1_S (1.56) 0.566; IQ1_M (1.75) 0.581 plain, 0.551 with the imatrix.
RMSE_BOUND = {(GGMLType.IQ4_NL, False): 0.085, (GGMLType.IQ4_XS, False): 0.085,
              (GGMLType.IQ4_NL, True): 0.09, (GGMLType.IQ4_XS, True): 0.09,
              (GGMLType.IQ3_XXS, False): 0.235, (GGMLType.IQ3_XXS, True): 0.275,
              (GGMLType.IQ3_S, False): 0.185, (GGMLType.IQ3_S, True): 0.185,
              (GGMLType.IQ2_S, False): 0.29, (GGMLType.IQ2_S, True): 0.325,
              (GGMLType.IQ2_XS, True): 0.41, (GGMLType.IQ2_XXS, True): 0.56, (GGMLType.IQ1_S, True): 0.62,
              (GGMLType.IQ1_M, False): 0.64, (GGMLType.IQ1_M, True): 0.61}
BLOCK_MAX_ERROR = 0.14


@pytest.mark.parametrize(("qtype", "with_imatrix"), sorted(RMSE_BOUND, key=str), ids=lambda v: getattr(v, "name", str(v)))
def test_gguf_py_decodes_within_the_type_error(qtype: GGMLType, with_imatrix: bool) -> None:
    """gguf-py's decoder (written independently of llama.cpp's C and of qconvert) gives exactly llama.cpp's
    values for our bytes, and they are within the type's error envelope of the float weights."""
    rng = np.random.default_rng(17)
    x = rng.standard_normal((64, 1536)).astype(np.float32)
    im = (10.0 ** rng.uniform(-2, 2, 1536)).astype(np.float32) if with_imatrix else None
    data = quantize_rows(qtype, x, im)
    ours = gguf_quants.dequantize(data, gguf.GGMLQuantizationType(int(qtype)))
    np.testing.assert_array_equal(ours.view(np.uint32), ggml_lib.ggml_dequantize(qtype, data, 1536).view(np.uint32))
    np.testing.assert_array_equal(ours.view(np.uint32), dequantize_rows(qtype, data, 1536).view(np.uint32))
    rel_rmse = float(np.sqrt(np.mean((ours - x) ** 2)) / np.sqrt(np.mean(x**2)))
    assert rel_rmse <= RMSE_BOUND[qtype, with_imatrix], f"{qtype.name}: relative RMSE {rel_rmse:.4g}"
    if not with_imatrix and qtype in I_TYPES:
        err = np.abs(ours - x).reshape(-1, 32).max(axis=1) / np.abs(x).reshape(-1, 32).max(axis=1)
        assert err.max() <= BLOCK_MAX_ERROR, f"{qtype.name}: a block's worst weight is off by {err.max():.3f} amax"


@pytest.mark.parametrize("qtype", PLAIN_TYPES, ids=lambda t: t.name)
def test_imatrix_lowers_the_weighted_error(qtype: GGMLType) -> None:
    """Σ imatrix·(y − x)² is what the imatrix asks to minimise: on average it beats the plain quantization."""
    rng = np.random.default_rng(21)
    x = rng.standard_normal((64, 1536)).astype(np.float32)
    im = (10.0 ** rng.uniform(-2, 2, 1536)).astype(np.float32)

    def weighted_error(data: np.ndarray) -> float:
        return float(np.mean(im * (dequantize_rows(qtype, data, 1536) - x) ** 2))

    plain, weighted = weighted_error(quantize_rows(qtype, x)), weighted_error(quantize_rows(qtype, x, im))
    assert weighted < 0.97 * plain, f"{qtype.name}: weighted error {weighted:.4g} vs plain {plain:.4g}"


def test_all_zero_blocks_decode_to_zero() -> None:
    """A zero block stores d = +0 (IQ4_NL) or −0 (IQ4_XS: d = −max/32), and level 1·0 everywhere."""
    x = np.zeros((2, 256), np.float32)
    nl, xs = quantize_rows(GGMLType.IQ4_NL, x), quantize_rows(GGMLType.IQ4_XS, x)
    assert nl.reshape(-1, 18)[:, :2].tolist() == [[0, 0]] * 16 and (nl.reshape(-1, 18)[:, 2:] == 0x88).all()
    assert xs.reshape(-1, 136)[:, :2].tolist() == [[0, 0x80]] * 2
    assert not dequantize_rows(GGMLType.IQ4_XS, xs, 256).any()


def test_nan_weights_are_refused_before_a_file_is_written(tmp_path, model_dir) -> None:
    """The kernels reproduce C's bytes even for NaN (test_quant_kernels' nan_sprinkled), but those bytes are
    garbage: the exporter refuses NaN weights with a message, and leaves no output."""
    import shutil

    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    from qconvert.errors import CheckpointError
    from qconvert.gguf.export import export_gguf

    bad = tmp_path / "bad"
    shutil.copytree(model_dir("tiny-tied"), bad)
    shard = next(bad.glob("*.safetensors"))
    tensors = load_file(shard)
    name = next(n for n in tensors if n.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = torch.nan
    save_file(tensors, shard, metadata={"format": "pt"})
    out = tmp_path / "out.gguf"
    with pytest.raises(CheckpointError, match="NaN or Inf"):
        export_gguf(bad, out, "IQ4_XS")
    assert not out.exists()
