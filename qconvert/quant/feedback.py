"""Error-feedback encoding of ggml's affine block types: llama.cpp's layout and scales, codes chosen by GPTQ.

llama.cpp rounds each block on its own. Here a weight matrix ``W [rows, cols]`` (ggml rows: output features,
blocks along the input columns) is encoded block column by block column, with the calibration Hessian of its
inputs ``H [cols, cols]`` carrying each rounding error forward (GPTQ's update, ``qconvert.int4.gptq``):

    for each block column [b, b + block):
        bytes = llama.cpp's quantizer on the current (error-fed) weights  -> the scales, exactly as C picks them
        grid per weight: value = base + step · n, n in [lo, hi]            (decoded from those bytes, see below)
        for each column c: n = round((w_c - base) / step), clamped; the error feeds the columns after c
        the codes n are written into the block's code bits; the scale bytes stay llama.cpp's

The file has the same types, the same sizes and the same block structure as llama.cpp's: any llama.cpp loads it.

Where the codes live: ``code_layout`` learns it from the decoder itself. Flipping one bit of a block changes the
decoded values of one weight (a code bit) or of many (a scale bit); for every affine type (Q4_0 … Q8_0, Q2_K …
Q6_K) the change of a code bit is the weight's step times ±2^k, so each weight's code is a k-bit integer (two's
complement where the top bit's change is negative, as Q8_0's int8). The I-quants index codebooks: not affine,
not covered here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from qconvert.constants import GGMLType
from qconvert.errors import QuantTypeError
from qconvert.quant import dequantize_rows, quantize_rows

AFFINE_TYPES = frozenset({GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q5_0, GGMLType.Q5_1, GGMLType.Q8_0,
                          GGMLType.Q2_K, GGMLType.Q3_K, GGMLType.Q4_K, GGMLType.Q5_K, GGMLType.Q6_K})


@dataclass(frozen=True)
class CodeLayout:
    """Where each weight of a block keeps its code: ``bits[p, k]`` is the bit (byte·8 + bit) holding bit ``k`` of
    weight ``p``'s code (k = 0 the least significant); ``signed``: the top bit counts negative (two's complement).
    Codes run from ``lo`` to ``hi``. ``block_bytes``: the block's size."""

    bits: np.ndarray  # int64 [block, nbits]
    signed: bool
    block_bytes: int

    @property
    def lo(self) -> int:
        return -(1 << (self.bits.shape[1] - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        n = self.bits.shape[1]
        return (1 << (n - 1)) - 1 if self.signed else (1 << n) - 1

    @functools.cached_property
    def _mask(self) -> np.ndarray:
        """u8[block_bytes]: 0 on code bits, 1 elsewhere."""
        mask = np.full(self.block_bytes, 0xFF, np.uint8)
        for b in self.bits.reshape(-1):
            mask[b // 8] &= np.uint8(~(1 << int(b % 8)) & 0xFF)
        return mask

    @functools.cached_property
    def _place(self) -> np.ndarray:
        """f64[block·nbits, block_bytes]: bit k of weight p adds 2^(its bit in the byte) to its byte (bits are
        disjoint, so the sum is the OR)."""
        place = np.zeros((self.bits.size, self.block_bytes))
        flat = self.bits.reshape(-1)
        place[np.arange(flat.size), flat // 8] = 2.0 ** (flat % 8)
        return place

    def clear(self, blocks: np.ndarray) -> np.ndarray:
        """``blocks`` u8[n, block_bytes] with every code bit zero."""
        return blocks & self._mask

    def write(self, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
        """``blocks`` with their codes replaced by ``codes`` int[n, block] (in [lo, hi])."""
        nbits = self.bits.shape[1]
        u = codes.astype(np.int64) & ((1 << nbits) - 1)  # two's complement for signed codes
        on = ((u[:, :, None] >> np.arange(nbits)) & 1).reshape(u.shape[0], -1).astype(np.float64)
        return self.clear(blocks) | (on @ self._place).astype(np.uint8)

    def read(self, blocks: np.ndarray) -> np.ndarray:
        """The codes int64[n, block] stored in ``blocks``."""
        byte, bit = self.bits // 8, self.bits % 8
        u = ((blocks[:, byte] >> bit.astype(np.uint8)) & 1).astype(np.int64)  # [n, block, nbits]
        u = (u << np.arange(self.bits.shape[1])).sum(-1)
        if self.signed:
            top = 1 << (self.bits.shape[1] - 1)
            u = np.where(u >= top, u - (top << 1), u)
        return u


@functools.cache
def code_layout(qtype: GGMLType) -> CodeLayout:
    """Learn ``qtype``'s code bits by flipping each bit of a quantized block and decoding (see the module doc)."""
    if qtype not in AFFINE_TYPES:
        raise QuantTypeError(f"error-feedback encoding covers the affine types ({', '.join(sorted(t.name for t in AFFINE_TYPES))}); "
                             f"{qtype.name} indexes a codebook. Quantize it without --optimize.")
    n = qtype.block_size
    x = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
    block = quantize_rows(qtype, x)
    ref = dequantize_rows(qtype, block, n)[0].astype(np.float64)
    found: dict[int, list[tuple[int, float]]] = {}
    nbits_block = block.shape[1] * 8
    on, off = np.repeat(block, nbits_block, 0), np.repeat(block, nbits_block, 0)  # row i: bit i set / cleared
    idx = np.arange(nbits_block)
    on[idx, idx // 8] |= (1 << (idx % 8)).astype(np.uint8)
    off[idx, idx // 8] &= (~(1 << (idx % 8)) & 0xFF).astype(np.uint8)
    with np.errstate(all="ignore"):
        diff = dequantize_rows(qtype, on, n).astype(np.float64) - dequantize_rows(qtype, off, n)
    for bit in range(nbits_block):
        d = diff[bit]
        changed = np.flatnonzero(d != 0)
        if changed.size == 1 and np.isfinite(d[changed[0]]):
            found.setdefault(int(changed[0]), []).append((bit, float(d[changed[0]])))
    if len(found) != n or not np.isfinite(ref).all():
        raise QuantTypeError(f"could not learn {qtype.name}'s code bits ({len(found)} of {n} weights found); "
                             "this is a qconvert bug, please report it.")
    widths = {len(v) for v in found.values()}
    if len(widths) != 1:
        raise QuantTypeError(f"{qtype.name}: weights with different code widths {sorted(widths)}; not supported.")
    nbits = widths.pop()
    bits = np.empty((n, nbits), np.int64)
    signed = False
    for p, items in found.items():
        step = min(abs(c) for _, c in items)
        order = sorted(items, key=lambda t: abs(t[1]))
        for k, (bit, c) in enumerate(order):
            ratio = c / step * np.sign(order[0][1])
            if not np.isclose(abs(ratio), 2.0 ** k, rtol=1e-3):
                raise QuantTypeError(f"{qtype.name}: weight {p}'s code bits are not binary (ratio {ratio}).")
            if ratio < 0:
                if k != nbits - 1:
                    raise QuantTypeError(f"{qtype.name}: a negative code bit that is not the top one.")
                signed = True
            bits[p, k] = bit
    return CodeLayout(bits, signed, qtype.block_bytes)


def block_grid(qtype: GGMLType, blocks: np.ndarray, layout: CodeLayout) -> tuple[np.ndarray, np.ndarray]:
    """``(base, step)`` f32[n, block] of encoded ``blocks`` u8[n, block_bytes]: weight p decodes to
    ``base[p] + step[p] · code[p]`` for any code, the scale bytes as they are."""
    n = qtype.block_size
    zero = layout.clear(blocks)
    base = dequantize_rows(qtype, zero, n)
    one = layout.write(zero, np.ones((blocks.shape[0], n), np.int64))
    return base, dequantize_rows(qtype, one, n) - base


FEED_COLUMNS = 32  # columns fed back one by one before the rest of the block is updated at once (a K-quant sub-block)


def encode_with_feedback(qtype: GGMLType, W: np.ndarray, Hinv: torch.Tensor, imatrix: np.ndarray | None = None
                         ) -> np.ndarray:
    """``W`` f32[rows, cols] as ggml ``qtype`` bytes u8[rows, row_bytes], codes chosen with error feedback.

    ``Hinv`` f32[cols, cols]: the upper Cholesky factor of the damped inverse Hessian of the tensor's inputs
    (``qconvert.int4.gptq.inverse_hessian_factor``). Each block column's scales are llama.cpp's for the
    error-fed weights (with ``imatrix`` where llama.cpp would use one); the codes minimise the Hessian-weighted
    output error column by column. Same type, same size as ``quantize_rows``.
    """
    if qtype not in AFFINE_TYPES:
        code_layout(qtype)  # raises the explanation
    rows, cols = W.shape
    B = qtype.block_size
    if cols % B:
        raise QuantTypeError(f"rows of {cols} weights cannot be stored as {qtype.name} (blocks of {B}).")
    layout = code_layout(qtype)
    WT = torch.from_numpy(np.array(W, dtype=np.float32, copy=True).T.copy())  # [cols, rows]: a column is contiguous
    U = Hinv.float().cpu()
    out = np.empty((rows, cols // B, qtype.block_bytes), np.uint8)
    for b in range(0, cols, B):
        block = WT[b:b + B]  # [B, rows], a view: the feedback below lands in WT
        blocks = quantize_rows(qtype, np.ascontiguousarray(block.numpy().T),
                               None if imatrix is None else np.ascontiguousarray(imatrix[b:b + B]))
        base_np, step_np = block_grid(qtype, blocks, layout)
        base, step = torch.from_numpy(base_np.T.copy()), torch.from_numpy(step_np.T.copy())  # [B, rows]
        keep = torch.from_numpy(layout.read(blocks).T.astype(np.float32))
        live = step != 0
        inv = torch.where(live, 1.0 / torch.where(live, step, 1.0), 0.0)
        codes = torch.empty((B, rows), dtype=torch.float32)
        err = torch.empty((B, rows))
        Ub = U[b:b + B, b:b + B]
        for s in range(0, B, FEED_COLUMNS):  # GPTQ's lazy batch inside the block: rank-1 updates stay in L1/L2
            t = min(s + FEED_COLUMNS, B)
            for c in range(s, t):
                w = block[c]
                n = torch.where(live[c], torch.round((w - base[c]) * inv[c]), keep[c]).clamp_(layout.lo, layout.hi)
                e = (w - (base[c] + step[c] * n)) / Ub[c, c]
                if c + 1 < t:
                    block[c + 1:t].addr_(Ub[c, c + 1:t], e, alpha=-1.0)
                err[c] = e
                codes[c] = n
            if t < B:
                block[t:].addmm_(Ub[s:t, t:].T, err[s:t], alpha=-1.0)
        if b + B < cols:
            WT[b + B:] -= U[b:b + B, b + B:].T @ err
        out[:, b // B] = layout.write(blocks, codes.T.numpy().astype(np.int64))
    return out.reshape(rows, -1)
