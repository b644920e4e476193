"""Dequantizers of the K-quants, in numpy: u8[nb, block_bytes] -> f32[nb, 256].

Each reproduces ggml's ``dequantize_row_q*_K`` value for value: the sub-block factor is formed first
(``d * sc``, ``dmin * m``), then ``factor * q - offset``, all in float32, as the C expressions evaluate.
"""

from __future__ import annotations

import numpy as np

from qconvert.constants import QK_K
from qconvert.quant.legacy import f16_field

_SHIFTS_2BIT = (2 * np.arange(4, dtype=np.uint8)).reshape(1, 1, 4, 1)


def _crumbs(qs: np.ndarray) -> np.ndarray:
    """qs u8[nb, 64] -> levels u8[nb, 256] in 0..3: weight 128h + 32k + l is bits 2k.. of byte 32h + l."""
    return ((qs.reshape(-1, 2, 1, 32) >> _SHIFTS_2BIT) & 3).reshape(-1, QK_K)


def _bits_by_32(bits: np.ndarray) -> np.ndarray:
    """bits u8[nb, 32] -> u8[nb, 256] in 0..1: weight e reads bit e // 32 of byte e % 32."""
    return np.unpackbits(bits, axis=1, bitorder="little").reshape(-1, 32, 8).transpose(0, 2, 1).reshape(-1, QK_K)


def _per_sub_block(factor: np.ndarray, q: np.ndarray, offset: np.ndarray | None = None) -> np.ndarray:
    """factor f32[nb, S] · q f32[nb, 256] (− offset f32[nb, S]), with S sub-blocks of 256/S weights."""
    y = factor[:, :, None] * q.reshape(factor.shape[0], factor.shape[1], -1)
    if offset is not None:
        y = y - offset[:, :, None]
    return y.reshape(-1, QK_K)


def dequantize_q2_k(blocks: np.ndarray) -> np.ndarray:
    sc = blocks[:, 0:16]
    dl = f16_field(blocks, 80) * (sc & 0xF).astype(np.float32)
    ml = f16_field(blocks, 82) * (sc >> 4).astype(np.float32)
    return _per_sub_block(dl, _crumbs(blocks[:, 16:80]).astype(np.float32), ml)


def dequantize_q3_k(blocks: np.ndarray) -> np.ndarray:
    sc = blocks[:, 96:108]
    j = np.arange(16)
    low = np.where(j < 8, sc[:, j % 8] & 0xF, sc[:, j % 8] >> 4)
    high = (sc[:, 8 + j % 4] >> (2 * (j // 4)).astype(np.uint8)) & 3
    scale = (low | (high << 4)).astype(np.float32) - np.float32(32)
    missing_high = 1 - _bits_by_32(blocks[:, 0:32]).astype(np.int8)  # C subtracts 4 when the hmask bit is 0
    q = _crumbs(blocks[:, 32:96]).astype(np.int8) - 4 * missing_high
    return _per_sub_block(f16_field(blocks, 108) * scale, q.astype(np.float32))


def _k4_factors(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(d·scale, dmin·min) f32[nb, 8] of Q4_K/Q5_K: ``get_scale_min_k4`` for all 8 sub-blocks."""
    q = blocks[:, 4:16]
    s = np.concatenate([q[:, 0:4] & 63, (q[:, 8:12] & 0xF) | ((q[:, 0:4] >> 6) << 4)], axis=1)
    m = np.concatenate([q[:, 4:8] & 63, (q[:, 8:12] >> 4) | ((q[:, 4:8] >> 6) << 4)], axis=1)
    return f16_field(blocks, 0) * s.astype(np.float32), f16_field(blocks, 2) * m.astype(np.float32)


def _k4_nibbles(qs: np.ndarray) -> np.ndarray:
    """qs u8[nb, 128] -> u8[nb, 256]: byte 32c + l holds weights 64c + l (low) and 64c + 32 + l (high)."""
    q = qs.reshape(-1, 4, 1, 32)
    return np.concatenate([q & 0xF, q >> 4], axis=2).reshape(-1, QK_K)


def dequantize_q4_k(blocks: np.ndarray) -> np.ndarray:
    d, m = _k4_factors(blocks)
    return _per_sub_block(d, _k4_nibbles(blocks[:, 16:144]).astype(np.float32), m)


def dequantize_q5_k(blocks: np.ndarray) -> np.ndarray:
    d, m = _k4_factors(blocks)
    q = _k4_nibbles(blocks[:, 48:176]) | (_bits_by_32(blocks[:, 16:48]) << 4)
    return _per_sub_block(d, q.astype(np.float32), m)


def dequantize_q6_k(blocks: np.ndarray) -> np.ndarray:
    ql = blocks[:, 0:128].reshape(-1, 2, 2, 32)  # [nb, half, first/second 32 bytes, l]
    low = np.concatenate([ql & 0xF, ql >> 4], axis=2)  # [nb, half, quarter 0..3, l]
    high = (blocks[:, 128:192].reshape(-1, 2, 1, 32) >> _SHIFTS_2BIT) & 3
    q = (low | (high << 4)).reshape(-1, QK_K).astype(np.float32) - np.float32(32)
    dsc = f16_field(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)
    return _per_sub_block(dsc, q)
