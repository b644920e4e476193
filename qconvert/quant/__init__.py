"""ggml tensor encodings, byte-identical to llama.cpp's reference quantizers.

    quantize_rows(qtype, x f32[rows, cols], imatrix f32[cols] | None = None) -> u8[rows, qtype.row_bytes(cols)]
    dequantize_rows(qtype, data u8[rows, row_bytes], cols) -> f32[rows, cols]

``quantize_rows`` reproduces ``ggml_quantize_chunk`` byte for byte, with no importance matrix (what
``llama-quantize`` runs without ``--imatrix``) or with one (``--imatrix``: kernels in ``kquants_imatrix`` and
``legacy_imatrix``, searches in ``ksearch_weighted``); ``dequantize_rows`` reproduces ``dequantize_row_*``
value for value.
Quantized types run as numba kernels (no GIL), split over ``numba.get_num_threads()`` threads by block ranges,
so ``numba.set_num_threads`` controls the parallelism.
Where each type lives: ``floats`` (F32, F16, BF16), ``legacy`` (Q4_0..Q8_0), ``kquants`` (Q2_K..Q6_K, with
their scale searches in ``ksearch`` and decoders in ``kdequant``), ``iquants`` (IQ4_NL, IQ4_XS), ``iq3``
(IQ3_XXS, IQ3_S), ``iq2`` (IQ2_XXS, IQ2_XS, IQ2_S), ``iq1`` (IQ1_S, IQ1_M); C's float quirks are in ``cfloat``;
``jitcache`` keeps numba's kernel cache in step with all of these sources.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from types import MappingProxyType

import numba
import numpy as np

from qconvert.constants import GGMLType
from qconvert.errors import QuantTypeError
from qconvert.quant import (
    floats,
    iq1,
    iq2,
    iq3,
    iquants,
    jitcache,
    kdequant,
    kquants,
    kquants_imatrix,
    legacy,
    legacy_imatrix,
)

jitcache.drop_stale_cache()  # before any kernel is loaded from numba's cache (it loads lazily, on first call)

__all__ = ["SUPPORTED_TYPES", "dequantize_rows", "quantize_rows"]

Decoder = Callable[[np.ndarray], np.ndarray]
# Block kernels: quantize(x f32[nb, block], out u8[nb, block_bytes], first, end) fills blocks first..end-1;
# dequantize u8[nb, bytes] -> f32[nb, block].
_BLOCK_KERNELS: MappingProxyType[GGMLType, tuple[Callable[..., None], Decoder]] = \
    MappingProxyType({
        GGMLType.Q4_0: (legacy.quantize_q4_0, legacy.dequantize_q4_0),
        GGMLType.Q4_1: (legacy.quantize_q4_1, legacy.dequantize_q4_1),
        GGMLType.Q5_0: (legacy.quantize_q5_0, legacy.dequantize_q5_0),
        GGMLType.Q5_1: (legacy.quantize_q5_1, legacy.dequantize_q5_1),
        GGMLType.Q8_0: (legacy.quantize_q8_0, legacy.dequantize_q8_0),
        GGMLType.Q2_K: (kquants.quantize_q2_k, kdequant.dequantize_q2_k),
        GGMLType.Q3_K: (kquants.quantize_q3_k, kdequant.dequantize_q3_k),
        GGMLType.Q4_K: (kquants.quantize_q4_k, kdequant.dequantize_q4_k),
        GGMLType.Q5_K: (kquants.quantize_q5_k, kdequant.dequantize_q5_k),
        GGMLType.Q6_K: (kquants.quantize_q6_k, kdequant.dequantize_q6_k),
        GGMLType.IQ4_NL: (iquants.quantize_iq4_nl, iquants.dequantize_iq4_nl),
        GGMLType.IQ4_XS: (iquants.quantize_iq4_xs, iquants.dequantize_iq4_xs),
        GGMLType.IQ3_XXS: (iq3.quantize_iq3_xxs, iq3.dequantize_iq3_xxs),
        GGMLType.IQ3_S: (iq3.quantize_iq3_s, iq3.dequantize_iq3_s),
        GGMLType.IQ2_S: (iq2.quantize_iq2_s, iq2.dequantize_iq2_s),
        GGMLType.IQ2_XS: (iq2.quantize_iq2_xs, iq2.dequantize_iq2_xs),  # plain: refused, needs an imatrix
        GGMLType.IQ2_XXS: (iq2.quantize_iq2_xxs, iq2.dequantize_iq2_xxs),  # plain: refused, needs an imatrix
        GGMLType.IQ1_S: (iq1.quantize_iq1_s, iq1.dequantize_iq1_s),  # plain: refused, needs an imatrix
        GGMLType.IQ1_M: (iq1.quantize_iq1_m, iq1.dequantize_iq1_m),
    })
# Element-wise float encodings: f32[...] -> u8[..., bytes] and back.
_FLOAT_CODECS: MappingProxyType[GGMLType, tuple[Callable[[np.ndarray], np.ndarray], Decoder]] = \
    MappingProxyType({
        GGMLType.F32: (floats.quantize_f32, floats.dequantize_f32),
        GGMLType.F16: (floats.quantize_f16, floats.dequantize_f16),
        GGMLType.BF16: (floats.quantize_bf16, floats.dequantize_bf16),
    })
# Importance-matrix kernels: quantize(x, qw, out, first, end). K-quants and I-quants work on their blocks
# (x f32[nb, block], qw f32[row blocks, block]); the legacy types on whole rows (x f32[rows, cols],
# qw f32[cols]), as their weights depend on the row's mean square.
_IMATRIX_BLOCK_KERNELS: MappingProxyType[GGMLType, Callable[..., None]] = MappingProxyType({
    GGMLType.Q2_K: kquants_imatrix.quantize_q2_k_imatrix,
    GGMLType.Q3_K: kquants_imatrix.quantize_q3_k_imatrix,
    GGMLType.Q4_K: kquants_imatrix.quantize_q4_k_imatrix,
    GGMLType.Q5_K: kquants_imatrix.quantize_q5_k_imatrix,
    GGMLType.Q6_K: kquants_imatrix.quantize_q6_k_imatrix,
    GGMLType.IQ4_NL: iquants.quantize_iq4_nl_imatrix,
    GGMLType.IQ4_XS: iquants.quantize_iq4_xs_imatrix,
    GGMLType.IQ3_XXS: iq3.quantize_iq3_xxs_imatrix,
    GGMLType.IQ3_S: iq3.quantize_iq3_s_imatrix,
    GGMLType.IQ2_S: iq2.quantize_iq2_s_imatrix,
    GGMLType.IQ2_XS: iq2.quantize_iq2_xs_imatrix,
    GGMLType.IQ2_XXS: iq2.quantize_iq2_xxs_imatrix,
    GGMLType.IQ1_S: iq1.quantize_iq1_s_imatrix,
    GGMLType.IQ1_M: iq1.quantize_iq1_m_imatrix,
})
_IMATRIX_ROW_KERNELS: MappingProxyType[GGMLType, Callable[..., None]] = MappingProxyType({
    GGMLType.Q4_0: legacy_imatrix.quantize_q4_0_imatrix,
    GGMLType.Q4_1: legacy_imatrix.quantize_q4_1_imatrix,
    GGMLType.Q5_0: legacy_imatrix.quantize_q5_0_imatrix,
    GGMLType.Q5_1: legacy_imatrix.quantize_q5_1_imatrix,
})
# Types whose llama.cpp quantizer ignores the importance matrix.
_IMATRIX_IGNORED = frozenset({GGMLType.F32, GGMLType.F16, GGMLType.BF16, GGMLType.Q8_0})
SUPPORTED_TYPES: frozenset[GGMLType] = frozenset(_BLOCK_KERNELS) | frozenset(_FLOAT_CODECS)
_MIN_BLOCKS_PER_THREAD = 64  # below this a thread costs more than it saves
_ALIGN = kquants.CHUNK  # ranges start at multiples of the K-quant chunk so chunks stay whole


def _run_blocks(kernel: Callable[..., None], x: np.ndarray, out: np.ndarray) -> None:
    """Run ``kernel`` over all blocks, split in contiguous ranges over numba's thread count.

    The kernels release the GIL, so Python threads run them in parallel; this is one call per thread, with
    no per-row Python work. (A numba ``prange`` wrapper would do the same but costs seconds of extra compile
    per type.)
    """
    nb = x.shape[0]
    threads = min(numba.get_num_threads(), nb // _MIN_BLOCKS_PER_THREAD)
    if threads <= 1:
        kernel(x, out, 0, nb)
        return
    step = -(-nb // threads // _ALIGN) * _ALIGN
    with ThreadPoolExecutor(threads) as pool:
        for f in [pool.submit(kernel, x, out, b, min(nb, b + step)) for b in range(0, nb, step)]:
            f.result()


def _check(qtype: GGMLType | int, cols: int) -> GGMLType:
    """``qtype`` as a supported GGMLType, after checking that rows of ``cols`` weights fit its blocks."""
    if qtype not in SUPPORTED_TYPES:
        names = ", ".join(sorted(t.name for t in SUPPORTED_TYPES))
        raise QuantTypeError(f"qconvert cannot encode ggml type {getattr(qtype, 'name', qtype)}; "
                             f"choose one of: {names}")
    qtype = GGMLType(qtype)
    if cols % qtype.block_size:
        raise QuantTypeError(
            f"rows of {cols} weights cannot be stored as {qtype.name}: its blocks hold {qtype.block_size} "
            f"weights and {cols} is not a multiple of {qtype.block_size}; pick a type with a block size that "
            f"divides {cols} (llama.cpp falls back Q4_K->Q5_0, Q5_K->Q5_1, Q6_K->Q8_0, Q2_K/Q3_K->Q4_0, "
            "IQ4_XS and the IQ3/IQ2/IQ1 types->IQ4_NL)")
    return qtype


def quantize_rows(qtype: GGMLType | int, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """Encode ``x`` f32[rows, cols] as ggml ``qtype``: u8[rows, qtype.row_bytes(cols)].

    Byte-identical to llama.cpp's ``ggml_quantize_chunk(qtype, x, ..., imatrix)``. ``x`` must be float32
    (convert bf16/f16 sources to f32 first; that is exact). ``imatrix`` f32[cols] is the importance matrix of
    ``llama-quantize --imatrix`` (per-column mean of x² over calibration tokens); None (the default) runs the
    reference quantizers. F32/F16/BF16/Q8_0 ignore it, as llama.cpp does. Raises ``QuantTypeError`` when
    ``qtype`` is not supported or ``cols`` is not a multiple of its block size.
    """
    if x.ndim != 2 or x.dtype != np.float32:
        raise TypeError(f"quantize_rows wants a float32 [rows, cols] array, got {x.dtype} {x.shape}")
    rows, cols = x.shape
    qtype = _check(qtype, cols)
    x = np.ascontiguousarray(x)
    if imatrix is not None and qtype not in _IMATRIX_IGNORED:
        return _quantize_imatrix(qtype, x, imatrix)
    if qtype in _FLOAT_CODECS:
        return _FLOAT_CODECS[qtype][0](x).reshape(rows, qtype.row_bytes(cols))
    out = np.empty((rows, qtype.row_bytes(cols)), dtype=np.uint8)
    _run_blocks(_BLOCK_KERNELS[qtype][0], x.reshape(-1, qtype.block_size), out.reshape(-1, qtype.block_bytes))
    return out


def _quantize_imatrix(qtype: GGMLType, x: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    rows, cols = x.shape
    imatrix = np.asarray(imatrix)
    if imatrix.shape != (cols,) or imatrix.dtype != np.float32:
        raise TypeError(f"quantize_rows wants the imatrix as float32 [{cols}] (one weight per column), got "
                        f"{imatrix.dtype} {imatrix.shape}")
    imatrix = np.ascontiguousarray(imatrix)
    out = np.empty((rows, qtype.row_bytes(cols)), dtype=np.uint8)
    if qtype in _IMATRIX_BLOCK_KERNELS:
        kernel = _IMATRIX_BLOCK_KERNELS[qtype]
        qw = imatrix.reshape(-1, qtype.block_size)
        xb, ob = x.reshape(-1, qtype.block_size), out.reshape(-1, qtype.block_bytes)
    elif qtype in _IMATRIX_ROW_KERNELS:
        kernel = _IMATRIX_ROW_KERNELS[qtype]
        qw, xb, ob = imatrix, x, out
    else:
        raise QuantTypeError(f"imatrix quantization of {qtype.name} is not implemented yet; quantize it "
                             f"without an imatrix (imatrix=None)")
    _run_blocks(lambda xs, outs, first, end: kernel(xs, qw, outs, first, end), xb, ob)
    return out


def dequantize_rows(qtype: GGMLType | int, data: np.ndarray, cols: int) -> np.ndarray:
    """Decode ``data`` u8[rows, qtype.row_bytes(cols)] to f32[rows, cols], as llama.cpp's ``dequantize_row_*``."""
    qtype = _check(qtype, cols)
    if data.ndim != 2 or data.dtype != np.uint8 or data.shape[1] != qtype.row_bytes(cols):
        raise TypeError(f"dequantize_rows wants uint8 [rows, {qtype.row_bytes(cols)}] for {cols} {qtype.name} "
                        f"weights per row, got {data.dtype} {data.shape}")
    rows = data.shape[0]
    data = np.ascontiguousarray(data)
    if qtype in _FLOAT_CODECS:
        return _FLOAT_CODECS[qtype][1](data).reshape(rows, cols)
    with np.errstate(all="ignore"):  # inf/nan scales (from inf or huge inputs) decode to inf/nan, as in C
        y = _BLOCK_KERNELS[qtype][1](data.reshape(-1, qtype.block_bytes))
    return np.ascontiguousarray(y, dtype=np.float32).reshape(rows, cols)
