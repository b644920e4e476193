"""GPTQ / AWQ / RTN weights -> ``com.microsoft`` block-quantized initializers, without requantization.

A weight ``W [rows, cols]`` is cut into blocks of ``block_size`` consecutive columns (n_blocks = cols / block_size),
each with a scale and a ``bits``-bit zero point (4 or 8 bits). Two onnxruntime contrib ops read that grid (anchor
§6.1; onnxruntime's ``docs/ContribOperators.md``), and both pack it the same way::

    data         uint8  codes along a row, a row's blocks in order; 4-bit: two per byte, low nibble = even column
    scales       float  [rows, n_blocks]                     in the graph's float type (= the op's output type)
    zero_points  uint8  [rows, ceil(n_blocks · bits / 8)]    packed like the codes; absent -> 2^(bits-1) (8 / 128)
    W[r, c] = scales[r, c // bs] · (code[r, c] - zero_point[r, c // bs])

* ``MatMulNBits`` (linears, the lm_head): ``Y = A · Wᵀ`` for ``W [N = out, K = in]``; ``data`` is ``B [N, n_blocks,
  bs · bits / 8]`` and must be an initializer of exactly that shape (the CPU kernel prepacks it at load).
* ``GatherBlockQuantized`` (the embedding): ``Y = W[ids]`` for ``W [vocab, hidden]`` with ``gather_axis`` 0 and
  ``quantize_axis`` 1; ``data`` is ``[vocab, hidden · bits / 8]`` (uint8 data is packed along the last axis, and the
  scales must have the data's rank). Its default zero point for uint8 data is also ``2^(bits-1)``.

onnxruntime 1.31's CPU kernels take ``bits`` 4 and 8 for both ops and any power-of-two block >= 16 (checked node by
node in ``tests/test_onnx.py``). So the two differ only in the shape of ``data`` (``DATA_SHAPES``): the bytes,
scales and zero points of a tied embedding / lm_head are the same tensors (stored once as MatMulNBits', reshaped in
the graph for the Gather), at either width.

The grid is exactly that of ``QuantizedLinear`` (``qconvert.int4.rtn``) when ``g_idx[k] == k // group_size`` and
``block_size == group_size``: the codes, the fp16-exact scales and the integer zero points are copied, so
``dequantize(BlockWeight) == dequant(GPTQ/AWQ/RTN)`` bit for bit. Symmetric weights (every zero point 2^(bits-1),
stored by GPTQ v1 as ``0x77777777`` for 4 bits) omit ``zero_points`` and rely on onnxruntime's default.

Act-order (``desc_act``) GPTQ whose ``g_idx`` is not ``k // g`` cannot map: both ops group consecutive columns only
(MatMulNBits' ``g_idx`` input is deprecated and unsupported by most kernels).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import Any

import numpy as np

from qconvert.errors import CheckpointError, QuantTypeError, UsageError
from qconvert.int4.rtn import QuantizedLinear

BITS = (4, 8)  # code widths both ops read (uint8 data)
PRECISION_BITS: Mapping[str, int] = MappingProxyType({"int4": 4, "int8": 8})  # --precision -> decoder linears' bits
MIN_BLOCK_SIZE = 16  # both ops: a power of two >= 16
BLOCK_SIZES = (32, 64, 128)  # linears (= the group sizes qconvert's quantizers support)
TABLE_BLOCK_SIZES = (16, 32, 64, 128)  # embedding / lm_head (RTN here, any power of two the ops take)
MATMUL, GATHER = "MatMulNBits", "GatherBlockQuantized"
GATHER_AXIS, QUANTIZE_AXIS = 0, 1  # GatherBlockQuantized: gather rows (token ids), blocks run along a row


def default_zero_point(bits: int) -> int:
    """onnxruntime's zero point when the input is absent (both ops, uint8 data): the middle code."""
    return 2 ** (bits - 1)


# op -> shape of its uint8 data for a weight [rows, cols] in blocks of bs columns of `bits` (same bytes for both ops)
DATA_SHAPES: Mapping[str, Callable[[int, int, int, int], tuple[int, ...]]] = MappingProxyType({
    MATMUL: lambda rows, cols, bs, bits: (rows, cols // bs, bs * bits // 8),  # B [N, k_blocks, blob_size]
    GATHER: lambda rows, cols, bs, bits: (rows, cols * bits // 8),  # data [vocab, hidden·bits/8], along quantize_axis
})

# MatMulNBits ``accuracy_level``: the lowest precision the kernel may convert the activations A to. 3 (bf16) is left
# out: it is meant for bf16 activations, and qconvert's graphs feed float32 ones.
ACCURACY_LEVELS: Mapping[int, str] = MappingProxyType({
    0: "unset: float32 math on exactly the dequantized weights",
    1: "fp32",
    2: "fp16",
    4: "int8: A quantized to int8 per block (onnxruntime-genai's CPU choice; faster, slightly less exact)",
})
DEFAULT_ACCURACY_LEVEL = 4
# embedding / lm_head defaults: 4-bit, blocks of 16 (docs/onnx-measurements.md, 2026-12-02: the lowest KL among the
# variants below the genai builder's 318 MB on the real 0.5B; 8-bit tables are more accurate but above it)
DEFAULT_TABLE_BITS = 4
DEFAULT_TABLE_BLOCK_SIZE = 16


@dataclass(frozen=True)
class BlockWeight:
    """The initializers of one ``op`` node (MatMulNBits or GatherBlockQuantized) for a weight [rows, cols]."""

    op: str
    data: np.ndarray  # uint8, DATA_SHAPES[op](rows, cols, block_size, bits)
    scales: np.ndarray  # float32 [rows, n_blocks]; cast to the graph's float type by the writer (fp16-exact values)
    zero_points: np.ndarray | None  # uint8 [rows, ceil(n_blocks · bits / 8)]
    rows: int
    cols: int
    block_size: int
    bits: int

    @property
    def n_blocks(self) -> int:
        return self.cols // self.block_size


def check_block_size(block_size: int, k: int, where: str, offered: Sequence[int] = BLOCK_SIZES,
                     flag: str = "--block-size") -> None:
    """Refuse a block size MatMulNBits / GatherBlockQuantized cannot use, or one that does not tile ``k`` columns."""
    if isinstance(block_size, bool) or block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise QuantTypeError(f"block size {block_size!r} cannot be used for {where}: MatMulNBits and "
                             f"GatherBlockQuantized need a power of two >= {MIN_BLOCK_SIZE}; use {flag} "
                             f"{', '.join(str(b) for b in offered)}.")
    if k % block_size:
        fits = ", ".join(str(b) for b in offered if k % b == 0) or "none of " + "/".join(str(b) for b in offered)
        raise QuantTypeError(f"{where} has {k} input columns, not a multiple of block size {block_size}; choose a "
                             f"block size that divides it ({fits}).")


def check_bits(bits: int, where: str, flag: str) -> None:
    """Refuse a code width the two ops do not read."""
    if isinstance(bits, bool) or bits not in BITS:
        raise UsageError(f"{bits!r}-bit {where} cannot be written: MatMulNBits / GatherBlockQuantized read "
                         f"{' or '.join(str(b) for b in BITS)}-bit codes; use {flag} {' or '.join(str(b) for b in BITS)}.")


def check_accuracy_level(level: int) -> None:
    """Refuse a MatMulNBits ``accuracy_level`` outside ``ACCURACY_LEVELS``."""
    if isinstance(level, bool) or level not in ACCURACY_LEVELS:
        offered = "; ".join(f"{k} = {v}" for k, v in ACCURACY_LEVELS.items())
        raise UsageError(f"accuracy level {level!r} is not supported; use one of {offered}. "
                         f"Default {DEFAULT_ACCURACY_LEVEL}; 0 computes with exactly the dequantized weights.")


def _pack(x: np.ndarray, bits: int) -> np.ndarray:
    """uint8 [..., m] codes in [0, 2^bits - 1] -> [..., m · bits / 8] bytes (4-bit: even index in the low nibble)."""
    if bits == 8:
        return x.astype(np.uint8)
    return (x[..., 0::2] | (x[..., 1::2] << 4)).astype(np.uint8)


def _unpack(x: np.ndarray, bits: int) -> np.ndarray:
    """Inverse of ``_pack``: [..., m · bits / 8] -> [..., m]."""
    if bits == 8:
        return x
    return np.stack([x & 0xF, x >> 4], axis=-1).reshape(*x.shape[:-1], -1)


def from_codes(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, bits: int, block_size: int,
               op: str = MATMUL) -> BlockWeight:
    """Unpacked grid (codes uint8 [rows, cols], scales f32 [rows, n_blocks], zeros uint8 [rows, n_blocks], consecutive
    blocks) -> ``op``'s initializers; zero points are left out when they are all onnxruntime's default."""
    n, k = codes.shape
    data = _pack(codes.astype(np.uint8), bits).reshape(DATA_SHAPES[op](n, k, block_size, bits))
    zp, default = None, default_zero_point(bits)
    zeros = zeros.astype(np.uint8)
    if not np.all(zeros == default):
        if bits == 4 and zeros.shape[1] % 2:  # pad the last byte's high nibble (never read)
            zeros = np.concatenate([zeros, np.full((n, 1), default, np.uint8)], axis=1)
        zp = _pack(zeros, bits)  # [N, ceil(G · bits / 8)]
    return BlockWeight(op, data, scales.astype(np.float32), zp, n, k, block_size, bits)


def from_quantized(q: QuantizedLinear, where: str = "this linear", op: str = MATMUL) -> BlockWeight:
    """``QuantizedLinear`` (4- or 8-bit, group-wise, consecutive groups) -> ``op``'s initializers, values copied."""
    k = q.shape[1]
    if q.bits not in BITS:
        raise QuantTypeError(f"{where} is {q.bits}-bit; qconvert's ONNX export writes 4- or 8-bit {op} only. "
                             "Quantize with --bits 4 (or 8).")
    bs = k if q.group_size == -1 else q.group_size
    if q.group_size == -1 and (k < MIN_BLOCK_SIZE or k & (k - 1)):
        raise QuantTypeError(f"{where} has per-row scales (group size -1) over {k} columns; {op} blocks must be "
                             "a power of two >= 16, so this cannot map without requantization. Quantize with "
                             "--group-size 128 (or 32/64).")
    check_block_size(bs, k, where)
    g_idx = q.g_idx.cpu().numpy().astype(np.int64)
    if not np.array_equal(g_idx, np.arange(k) // bs):
        raise QuantTypeError(f"{where} uses act-order (desc_act) group indices: its columns are not grouped in "
                             f"consecutive blocks, which is all {op} can express. Re-quantize with "
                             "--static-groups (act-order with inference-transparent groups) or without --act-order.")
    return from_codes(q.codes.cpu().numpy(), q.scales.cpu().numpy(), q.zeros.cpu().numpy(), q.bits, bs, op)


def concat_rows(parts: Sequence[BlockWeight]) -> BlockWeight:
    """Row slices of one weight, converted apart, -> the whole weight (exact: a block never spans two rows)."""
    first, zero_points = parts[0], None
    if any(p.zero_points is not None for p in parts):  # a slice without them has the default in every block
        z = default_zero_point(first.bits)
        default = np.uint8(z | z << 4 if first.bits == 4 else z)
        zero_points = np.concatenate([np.full((p.rows, -(-p.n_blocks * p.bits // 8)), default)
                                      if p.zero_points is None else p.zero_points for p in parts])
    return BlockWeight(first.op, np.concatenate([p.data for p in parts]), np.concatenate([p.scales for p in parts]),
                       zero_points, sum(p.rows for p in parts), first.cols, first.block_size, first.bits)


def dequantize(w: BlockWeight) -> np.ndarray:
    """The float32 weight [rows, cols] that MatMulNBits / GatherBlockQuantized compute with (module docstring)."""
    codes = _unpack(w.data.reshape(w.rows, -1), w.bits).reshape(w.rows, w.n_blocks, w.block_size).astype(np.float32)
    if w.zero_points is None:
        zeros = np.full((w.rows, w.n_blocks), default_zero_point(w.bits), np.float32)
    else:
        zeros = _unpack(w.zero_points.reshape(w.rows, -1), w.bits)[:, :w.n_blocks].astype(np.float32)
    scales = w.scales.astype(np.float32).reshape(w.rows, w.n_blocks)
    return (scales[..., None] * (codes - zeros[..., None])).reshape(w.rows, w.cols)


# ------------------------------------------------------------------------------------------------------------
# Pre-quantized checkpoints (--from DIR)


@dataclass(frozen=True)
class PrequantizedScheme:
    """What a GPTQ/AWQ checkpoint's ``quantization_config`` says, checked to map onto MatMulNBits."""

    method: str  # gptq | awq
    bits: int  # 4 (GPTQ, AWQ) or 8 (GPTQ)
    group_size: int
    sym: bool
    desc_act: bool


def read_scheme(from_dir: Path) -> PrequantizedScheme:
    """Read and check the quantization config of a GPTQ (v1) / AWQ (GEMM) checkpoint directory."""
    from_dir = Path(from_dir)
    cfg_file = from_dir / "config.json"
    if not cfg_file.is_file():
        raise CheckpointError(f"--from {from_dir}: no config.json; give the directory `qconvert gptq`/`qconvert awq` "
                              "(or AutoGPTQ/AutoAWQ/GPTQModel) wrote.")
    qcfg: dict[str, Any] | None = json.loads(cfg_file.read_text()).get("quantization_config")
    if qcfg is None and (from_dir / "quantize_config.json").is_file():
        qcfg = json.loads((from_dir / "quantize_config.json").read_text())
    if not qcfg or qcfg.get("quant_method") not in ("gptq", "awq"):
        method = None if not qcfg else qcfg.get("quant_method")
        raise CheckpointError(f"--from {from_dir} is not a GPTQ or AWQ checkpoint (quantization_config.quant_method is "
                              f"{method!r}). For a float checkpoint use --model/--size with --algo rtn|gptq|awq.")
    method = qcfg["quant_method"]
    bits = int(qcfg.get("bits", qcfg.get("w_bit", 0)))
    group = int(qcfg.get("group_size", qcfg.get("q_group_size", 0)))
    if bits not in BITS or (method == "awq" and bits != 4):
        raise CheckpointError(f"--from {from_dir}: {bits}-bit {method.upper()} weights; the ONNX export maps 4-bit "
                              "GPTQ/AWQ and 8-bit GPTQ weights to MatMulNBits only. Quantize with --bits 4 or 8.")
    if method == "gptq":
        fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
        if fmt != "gptq":
            raise CheckpointError(f"--from {from_dir}: GPTQ checkpoint format {fmt!r}; qconvert reads the v1 'gptq' "
                                  "layout (zero points stored minus one). Save it with format='gptq'.")
        return PrequantizedScheme("gptq", bits, group, bool(qcfg.get("sym", True)), bool(qcfg.get("desc_act", False)))
    if qcfg.get("version", qcfg.get("format", "gemm")).lower() != "gemm":
        raise CheckpointError(f"--from {from_dir}: AWQ version {qcfg.get('version')!r}; qconvert reads the GEMM layout.")
    return PrequantizedScheme("awq", bits, group, not qcfg.get("zero_point", True), False)


def read_prequantized(ckpt: Any, module: str, scheme: PrequantizedScheme) -> QuantizedLinear:
    """One linear of a GPTQ/AWQ checkpoint (``ckpt`` a ``SafetensorsCheckpoint``) as an unpacked ``QuantizedLinear``."""
    import torch

    from qconvert.int4 import unpack_awq, unpack_gptq
    from qconvert.int4.formats import AWQ_TENSORS, GPTQ_TENSORS

    suffixes = GPTQ_TENSORS if scheme.method == "gptq" else AWQ_TENSORS
    missing = [s for s in suffixes if f"{module}.{s}" not in ckpt.entries]
    if missing:
        raise CheckpointError(f"{ckpt.dir}: {module} has no {', '.join(missing)}; the checkpoint does not hold "
                              f"{scheme.method.upper()} tensors where its config says so. Re-quantize it.")
    t = {}
    for s in suffixes:  # scales are fp16 (widened exactly); qweight/qzeros/g_idx int32
        name = f"{module}.{s}"
        t[s] = torch.from_numpy(ckpt.read_f32(name) if s == "scales" else ckpt.read_raw(name).copy())
    if scheme.method == "gptq":
        return unpack_gptq(t, scheme.bits, scheme.group_size, scheme.sym)
    return unpack_awq(t, scheme.group_size)
