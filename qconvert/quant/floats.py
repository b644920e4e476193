"""F32, F16 and BF16 rows: what ``ggml_quantize_chunk`` does for the float types, vectorised in numpy.

All functions map f32[...] <-> u8[..., 4 or 2] element-wise (little-endian), so the caller's row shape is kept.
"""

from __future__ import annotations

import numpy as np


def quantize_f32(x: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(x, dtype=np.float32).view(np.uint8)


def quantize_f16(x: np.ndarray) -> np.ndarray:
    """IEEE round-half-to-even; NaN becomes ggml's canonical ``sign | 0x7E00`` (numpy would keep its payload)."""
    with np.errstate(over="ignore"):  # |x| >= 65520 becomes inf, as in C
        h = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        h[nan] = (x.view(np.uint32)[nan] >> 16 & 0x8000) | 0x7E00
    return h.view(np.uint8)


def quantize_bf16(x: np.ndarray) -> np.ndarray:
    """ggml's ``fp32 -> bf16``: round the upper 16 bits half to even; NaN is kept, forced quiet (| 0x40)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    r = u >> 16  # in place from here on: this runs over whole tensors
    r &= 1
    r += 0x7FFF
    r += u  # uint32 wraps as C's does
    r >>= 16
    h = r.astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        h[nan] = (u[nan] >> 16) | 0x40
    return h.view(np.uint8)


def dequantize_f32(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.float32)


def dequantize_f16(data: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(data).view(np.float16).astype(np.float32)


def dequantize_bf16(data: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(data).view(np.uint16).astype(np.uint32) << 16
    return u.view(np.float32)
