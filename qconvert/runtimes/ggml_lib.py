"""llama.cpp's own quantizer, through ctypes on the ``libggml-base`` that ``llama-cpp-py-sync`` ships.

This is the oracle for qconvert's kernels: ``ggml_quantize(qtype, x)`` runs ``ggml_quantize_chunk`` with no
importance matrix, i.e. exactly the ``quantize_row_*_ref`` functions ``llama-quantize`` uses (with
``imatrix=`` the ``quantize_row_*_impl`` functions of ``llama-quantize --imatrix``), and
``ggml_dequantize`` runs the ``dequantize_row_*`` functions llama.cpp uses when it loads a file.

The library is the copy ``qconvert.runtimes.native`` loads (shared with libllama; see there for glibc < 2.38).
"""

from __future__ import annotations

import ctypes
import threading

import numpy as np

from qconvert.constants import GGMLType
from qconvert.errors import QuantTypeError
from qconvert.runtimes.native import ggml_base

_LOCK = threading.Lock()
_STATE: dict[str, ctypes.CDLL] = {}

# dequantize_row_<name>(const void * x, float * y, int64_t k) for the quantized types; row converters otherwise.
_DEQUANT_SYMBOL = {t: f"dequantize_row_{t.label}" for t in GGMLType if t.is_quantized}
_DEQUANT_SYMBOL |= {GGMLType.F16: "ggml_fp16_to_fp32_row", GGMLType.BF16: "ggml_bf16_to_fp32_row"}


def _lib() -> ctypes.CDLL:
    """The loaded library with argument types declared, loaded once per process."""
    with _LOCK:
        if "lib" not in _STATE:
            _STATE["lib"] = _declare(ggml_base())
        return _STATE["lib"]


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_row_size.restype = ctypes.c_size_t
    lib.ggml_row_size.argtypes = [ctypes.c_int, ctypes.c_int64]
    for name in _DEQUANT_SYMBOL.values():
        getattr(lib, name).argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64]
    return lib


def ggml_quantize(qtype: GGMLType, x: np.ndarray, imatrix: np.ndarray | None = None) -> np.ndarray:
    """llama.cpp's quantization of ``x`` f32[rows, cols] -> u8[rows, row_bytes(cols)] (single-threaded C).

    ``imatrix`` f32[cols] (per-column mean of x² over calibration tokens) is passed to ``ggml_quantize_chunk``
    as its quant weights, as ``llama-quantize --imatrix`` does; None runs the reference quantizers.
    """
    lib = _lib()
    x = np.ascontiguousarray(x, dtype=np.float32)
    rows, cols = x.shape
    if cols % qtype.block_size:
        raise QuantTypeError(f"{qtype.name} needs rows of a multiple of {qtype.block_size} weights, got {cols}")
    qw = None
    if imatrix is not None:
        imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
        if imatrix.shape != (cols,):
            raise ValueError(f"imatrix must be f32[{cols}], got {imatrix.shape}")
        qw = imatrix.ctypes.data
    out = np.zeros((rows, qtype.row_bytes(cols)), dtype=np.uint8)
    lib.ggml_quantize_init(int(qtype))
    n = lib.ggml_quantize_chunk(int(qtype), x.ctypes.data, out.ctypes.data, 0, rows, cols, qw)
    assert n == out.size, (n, out.size)
    return out


def ggml_dequantize(qtype: GGMLType, data: np.ndarray, cols: int) -> np.ndarray:
    """llama.cpp's dequantization: ``data`` u8[rows, row_bytes(cols)] -> f32[rows, cols]."""
    data = np.ascontiguousarray(data, dtype=np.uint8)
    rows = data.shape[0]
    if data.shape[1:] != (qtype.row_bytes(cols),):
        raise ValueError(f"{qtype.name}: data shape {data.shape} does not hold rows of {cols} weights")
    if qtype == GGMLType.F32:
        return data.view(np.float32).reshape(rows, cols).copy()
    out = np.empty((rows, cols), dtype=np.float32)
    getattr(_lib(), _DEQUANT_SYMBOL[qtype])(data.ctypes.data, out.ctypes.data, rows * cols)
    return out
