"""Error-feedback encoding of ggml's scalar-code block types: llama.cpp's layout and scales, codes chosen by GPTQ.

llama.cpp rounds each block on its own. Here a weight matrix ``W [rows, cols]`` (ggml rows: output features,
blocks along the input columns) is encoded block column by block column, with the calibration Hessian of its
inputs ``H [cols, cols]`` carrying each rounding error forward (GPTQ's update, ``qconvert.int4.gptq``):

    for each block column [b, b + block):
        bytes = llama.cpp's quantizer on the current (error-fed) weights  -> the scales, exactly as C picks them
        grid per weight: value = base + step · level[n], n in [lo, hi]     (decoded from those bytes, see below)
        for each column c: n = the level nearest (w_c - base) / step; the error feeds the columns after c
        the codes n are written into the block's code bits; the scale bytes stay llama.cpp's

The file has the same types, the same sizes and the same block structure as llama.cpp's: any llama.cpp loads it.

The codebook I-quants (IQ1_*, IQ2_*, IQ3_*: a code picks a vector of 4 or 8 weights, with shared sign bits) get
the feedback between blocks only (``encode_with_block_feedback``): llama.cpp's own quantizer encodes each block
column of the error-fed weights, scales and codes both, and that block's error is carried into the columns after
it — GPTQ's update for codes fixed a block at a time (one triangular solve per block), no codebook layout needed.

Where the codes live: ``code_layout`` learns it from the decoder itself. Flipping one bit of a block changes the
decoded values of one weight (a code bit) or of many (a scale bit); for every affine type (Q4_0 … Q8_0, Q2_K …
Q6_K) the change of a code bit is the weight's step times ±2^k, so each weight's code is a k-bit integer (two's
complement where the top bit's change is negative, as Q8_0's int8), and ``level[n] = n``. IQ4_NL and IQ4_XS
also give each weight its own 4 code bits, but a code indexes a non-linear table (d · scale · kvalues[n]): their
bits are taken in storage order and ``level`` is learned by decoding a block with every code set to n, checked to
be one table for every weight. The other I-quants (IQ1_*, IQ2_*, IQ3_*) index codebooks of 4- or 8-weight
vectors with shared sign bits: one code does not belong to one weight, so ``code_layout`` refuses them and they
get the block feedback above.
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
TABLE_TYPES = frozenset({GGMLType.IQ4_NL, GGMLType.IQ4_XS})  # one 4-bit index per weight into a non-linear table
SCALAR_TYPES = AFFINE_TYPES | TABLE_TYPES  # codes chosen column by column
CODEBOOK_TYPES = frozenset({GGMLType.IQ1_S, GGMLType.IQ1_M, GGMLType.IQ2_XXS, GGMLType.IQ2_XS, GGMLType.IQ2_S,
                            GGMLType.IQ3_XXS, GGMLType.IQ3_S})  # llama.cpp's codes, fed between blocks
FEEDBACK_TYPES = SCALAR_TYPES | CODEBOOK_TYPES


@dataclass(frozen=True)
class CodeLayout:
    """Where each weight of a block keeps its code: ``bits[p, k]`` is the bit (byte·8 + bit) holding bit ``k`` of
    weight ``p``'s code (k = 0 the least significant); ``signed``: the top bit counts negative (two's complement).
    Codes run from ``lo`` to ``hi``. ``block_bytes``: the block's size. ``levels`` f64[hi - lo + 1]: code n decodes
    to ``base + step · levels[n - lo]`` (``block_grid``); None for the affine types, where ``levels[n - lo] = n``."""

    bits: np.ndarray  # int64 [block, nbits]
    signed: bool
    block_bytes: int
    levels: np.ndarray | None = None

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

    def nearest(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The codes whose levels are nearest ``t`` (weights in steps from the base), and those levels."""
        if self.levels is None:
            n = torch.round(t).clamp_(self.lo, self.hi)
            return n, n
        order, mids, sorted_levels = self._sorted
        i = torch.bucketize(t, mids)
        return order[i], sorted_levels[i]

    @functools.cached_property
    def _sorted(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        assert self.levels is not None
        order = np.argsort(self.levels, kind="stable")
        lv = self.levels[order]
        return (torch.from_numpy(order + self.lo).float(), torch.from_numpy((lv[1:] + lv[:-1]) / 2).float(),
                torch.from_numpy(lv).float())

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
    if qtype not in SCALAR_TYPES:
        raise QuantTypeError(f"error-feedback encoding covers the types with one code per weight "
                             f"({', '.join(sorted(t.name for t in SCALAR_TYPES))}); {qtype.name} indexes a codebook of "
                             "weight vectors. Quantize it without --optimize.")
    n = qtype.block_size
    x = np.random.default_rng(0).standard_normal((1, n)).astype(np.float32)
    block = quantize_rows(qtype, x)
    ref = dequantize_rows(qtype, block, n)[0].astype(np.float64)
    found = _single_weight_bits(qtype, block)
    if len(found) != n or not np.isfinite(ref).all():
        raise QuantTypeError(f"could not learn {qtype.name}'s code bits ({len(found)} of {n} weights found); "
                             "this is a qconvert bug, please report it.")
    widths = {len(v) for v in found.values()}
    if len(widths) != 1:
        raise QuantTypeError(f"{qtype.name}: weights with different code widths {sorted(widths)}; not supported.")
    nbits = widths.pop()
    if qtype in TABLE_TYPES:
        bits = np.array([sorted(b for b, _ in found[p]) for p in range(n)], np.int64)  # storage order
        plain = CodeLayout(bits, False, qtype.block_bytes)
        return CodeLayout(bits, False, qtype.block_bytes, _learn_levels(qtype, plain, block))
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


def _single_weight_bits(qtype: GGMLType, block: np.ndarray) -> dict[int, list[tuple[int, float]]]:
    """Weight p -> the bits of ``block`` u8[1, block_bytes] whose flip changes weight p alone, with the change."""
    n = qtype.block_size
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
    return found


def _learn_levels(qtype: GGMLType, layout: CodeLayout, block: np.ndarray) -> np.ndarray:
    """f64[2^nbits]: code n decodes to base + step · levels[n] (levels[0] = 0, levels[1] = 1) with base and step
    per weight; checked on every weight of ``block`` (one table for all, or this type is not scalar)."""
    n, count = qtype.block_size, 1 << layout.bits.shape[1]
    codes = np.repeat(np.arange(count, dtype=np.int64)[:, None], n, 1)
    values = dequantize_rows(qtype, layout.write(np.repeat(block, count, 0), codes), n).astype(np.float64)
    step = values[1] - values[0]
    live = step != 0
    ratios = (values[:, live] - values[0, live]) / step[live]  # [count, live weights]
    levels = ratios[:, 0]
    if not live.any() or not np.allclose(ratios, levels[:, None], rtol=1e-5, atol=1e-5):
        raise QuantTypeError(f"could not learn {qtype.name}'s code levels (not one table for every weight); "
                             "this is a qconvert bug, please report it.")
    return levels


def block_grid(qtype: GGMLType, blocks: np.ndarray, layout: CodeLayout) -> tuple[np.ndarray, np.ndarray]:
    """``(base, step)`` f32[n, block] of encoded ``blocks`` u8[n, block_bytes]: weight p decodes to
    ``base[p] + step[p] · levels[code[p] - lo]`` for any code (``code[p]`` for the affine types), the scale bytes
    as they are."""
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
                n, level = layout.nearest((w - base[c]) * inv[c])
                n = torch.where(live[c], n, keep[c])
                e = (w - (base[c] + step[c] * level)) / Ub[c, c]  # a dead weight (step 0) decodes to base
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


def encode_with_block_feedback(qtype: GGMLType, W: np.ndarray, Hinv: torch.Tensor, imatrix: np.ndarray | None = None
                               ) -> np.ndarray:
    """``W`` f32[rows, cols] as ggml ``qtype`` bytes, each block column encoded by llama.cpp's quantizer (scales and
    codes, with ``imatrix``) on the weights the earlier blocks' errors were fed into; ``Hinv`` as for
    ``encode_with_feedback``. For any type; ``encode_with_feedback`` does better where codes are per weight.

    With the codes of block columns [b, b + B) fixed, GPTQ's column updates are E = U_bbᵀ⁻¹ (W_b - Q_b) (U_bb the
    block's diagonal part of the upper factor: a triangular solve) and W_rest -= U_b,restᵀ E."""
    rows, cols = W.shape
    B = qtype.block_size
    if cols % B:
        raise QuantTypeError(f"rows of {cols} weights cannot be stored as {qtype.name} (blocks of {B}).")
    WT = torch.from_numpy(np.array(W, dtype=np.float32, copy=True).T.copy())  # [cols, rows]
    U = Hinv.float().cpu()
    out = np.empty((rows, cols // B, qtype.block_bytes), np.uint8)
    for b in range(0, cols, B):
        block = WT[b:b + B]
        data = quantize_rows(qtype, np.ascontiguousarray(block.numpy().T),
                             None if imatrix is None else np.ascontiguousarray(imatrix[b:b + B]))
        out[:, b // B] = data
        if b + B < cols:
            Q = torch.from_numpy(dequantize_rows(qtype, data, B)).T  # [B, rows]
            E = torch.linalg.solve_triangular(U[b:b + B, b:b + B].T, block - Q, upper=False)
            WT[b + B:] -= U[b:b + B, b + B:].T @ E
    return out.reshape(rows, -1)
