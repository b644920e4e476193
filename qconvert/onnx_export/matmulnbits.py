"""GPTQ / AWQ / RTN weights -> ``com.microsoft.MatMulNBits`` initializers, without requantization.

MatMulNBits (onnxruntime contrib op; anchor §6.1) computes ``Y = A · dequant(B)ᵀ`` for a weight ``W [N = out,
K = in]`` cut into blocks of ``block_size`` consecutive input columns (n_blocks = K / block_size)::

    B            uint8 [N, n_blocks, block_size/2]   two 4-bit codes per byte, low nibble = even column
    scales       float [N · n_blocks]                in the graph's float type
    zero_points  uint8 [N · ceil(n_blocks/2)]        4-bit, low nibble = even block; absent -> zero point 8
    W[n, k] = scales[n, k // bs] · (B[n, k] - zero_points[n, k // bs])

This is exactly the grid of ``QuantizedLinear`` (``qconvert.int4.rtn``) when ``g_idx[k] == k // group_size`` and
``block_size == group_size``: the codes, the fp16-exact scales and the integer zero points are copied, so
``dequant(MatMulNBits) == dequant(GPTQ/AWQ)`` bit for bit. Symmetric GPTQ (every zero point 8, stored as v1's
``0x77777777``) omits ``zero_points`` and relies on onnxruntime's default of ``2^(bits-1) = 8``.

Act-order (``desc_act``) GPTQ whose ``g_idx`` is not ``k // g`` cannot map: MatMulNBits groups consecutive
columns only (its ``g_idx`` input is deprecated and unsupported by most kernels).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qconvert.errors import CheckpointError, QuantTypeError
from qconvert.int4.rtn import QuantizedLinear

BITS = 4
DEFAULT_ZERO_POINT = 2 ** (BITS - 1)  # onnxruntime's zero point when the input is absent
MIN_BLOCK_SIZE = 16  # MatMulNBits: a power of two >= 16
BLOCK_SIZES = (32, 64, 128)  # what the CLI offers (= the group sizes qconvert's quantizers support)


@dataclass(frozen=True)
class MatMulNBitsWeight:
    """The initializers of one MatMulNBits node (shapes in the module docstring) and its attributes."""

    b: np.ndarray
    scales: np.ndarray  # float32; cast to the graph's float type by the writer (fp16-exact values)
    zero_points: np.ndarray | None
    n: int
    k: int
    block_size: int

    @property
    def n_blocks(self) -> int:
        return self.k // self.block_size


def check_block_size(block_size: int, k: int, where: str) -> None:
    """Refuse a block size MatMulNBits cannot use, or one that does not tile ``k`` input columns."""
    if block_size < MIN_BLOCK_SIZE or block_size & (block_size - 1):
        raise QuantTypeError(f"block size {block_size} cannot be used for {where}: MatMulNBits needs a power of two "
                             f">= {MIN_BLOCK_SIZE}; use --block-size 32, 64 or 128.")
    if k % block_size:
        raise QuantTypeError(f"{where} has {k} input columns, not a multiple of block size {block_size}; choose a "
                             f"block size that divides it ({', '.join(str(b) for b in BLOCK_SIZES if k % b == 0) or 'none of 32/64/128'}).")


def _pack_nibbles(x: np.ndarray) -> np.ndarray:
    """uint8 [..., 2m] codes in [0, 15] -> [..., m] bytes, even index in the low nibble."""
    return (x[..., 0::2] | (x[..., 1::2] << 4)).astype(np.uint8)


def _unpack_nibbles(x: np.ndarray) -> np.ndarray:
    """Inverse of ``_pack_nibbles``: [..., m] -> [..., 2m]."""
    return np.stack([x & 0xF, x >> 4], axis=-1).reshape(*x.shape[:-1], -1)


def from_quantized(q: QuantizedLinear, where: str = "this linear") -> MatMulNBitsWeight:
    """``QuantizedLinear`` (4-bit, group-wise, consecutive groups) -> MatMulNBits initializers, values copied."""
    n, k = q.shape
    if q.bits != BITS:
        raise QuantTypeError(f"{where} is {q.bits}-bit; qconvert's ONNX export writes 4-bit MatMulNBits only. "
                             "Quantize with --bits 4.")
    bs = k if q.group_size == -1 else q.group_size
    if q.group_size == -1 and (k < MIN_BLOCK_SIZE or k & (k - 1)):
        raise QuantTypeError(f"{where} has per-row scales (group size -1) over {k} columns; MatMulNBits blocks must be "
                             "a power of two >= 16, so this cannot map without requantization. Quantize with "
                             "--group-size 128 (or 32/64).")
    check_block_size(bs, k, where)
    g_idx = q.g_idx.cpu().numpy().astype(np.int64)
    if not np.array_equal(g_idx, np.arange(k) // bs):
        raise QuantTypeError(f"{where} uses act-order (desc_act) group indices: its columns are not grouped in "
                             "consecutive blocks, which is all MatMulNBits can express. Re-quantize with "
                             "--static-groups (act-order with inference-transparent groups) or without --act-order.")
    codes = q.codes.cpu().numpy().astype(np.uint8)  # [N, K]
    scales = q.scales.cpu().numpy().astype(np.float32)  # [N, G]
    zeros = q.zeros.cpu().numpy().astype(np.uint8)  # [N, G]
    b = _pack_nibbles(codes.reshape(n, k // bs, bs))  # [N, G, bs] -> [N, G, bs/2]
    zp = None
    if not np.all(zeros == DEFAULT_ZERO_POINT):
        if zeros.shape[1] % 2:  # pad the last byte's high nibble (never read)
            zeros = np.concatenate([zeros, np.full((n, 1), DEFAULT_ZERO_POINT, np.uint8)], axis=1)
        zp = _pack_nibbles(zeros).reshape(-1)
    return MatMulNBitsWeight(b, scales.reshape(-1), zp, n, k, bs)


def dequantize(w: MatMulNBitsWeight) -> np.ndarray:
    """The float32 weight [N, K] that MatMulNBits computes with (the formula in the module docstring)."""
    codes = _unpack_nibbles(w.b).reshape(w.n, w.n_blocks, w.block_size).astype(np.float32)
    if w.zero_points is None:
        zeros = np.full((w.n, w.n_blocks), DEFAULT_ZERO_POINT, np.float32)
    else:
        zeros = _unpack_nibbles(w.zero_points.reshape(w.n, -1))[:, :w.n_blocks].astype(np.float32)
    scales = w.scales.astype(np.float32).reshape(w.n, w.n_blocks)
    return (scales[..., None] * (codes - zeros[..., None])).reshape(w.n, w.k)


# ------------------------------------------------------------------------------------------------------------
# Pre-quantized checkpoints (--from DIR)


@dataclass(frozen=True)
class PrequantizedScheme:
    """What a GPTQ/AWQ checkpoint's ``quantization_config`` says, checked to map onto MatMulNBits."""

    method: str  # gptq | awq
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
    if bits != BITS:
        raise CheckpointError(f"--from {from_dir}: {bits}-bit {method.upper()} weights; the ONNX export maps 4-bit "
                              "weights to MatMulNBits only. Quantize with --bits 4.")
    if method == "gptq":
        fmt = qcfg.get("checkpoint_format", qcfg.get("format", "gptq"))
        if fmt != "gptq":
            raise CheckpointError(f"--from {from_dir}: GPTQ checkpoint format {fmt!r}; qconvert reads the v1 'gptq' "
                                  "layout (zero points stored minus one). Save it with format='gptq'.")
        return PrequantizedScheme("gptq", group, bool(qcfg.get("sym", True)), bool(qcfg.get("desc_act", False)))
    if qcfg.get("version", qcfg.get("format", "gemm")).lower() != "gemm":
        raise CheckpointError(f"--from {from_dir}: AWQ version {qcfg.get('version')!r}; qconvert reads the GEMM layout.")
    return PrequantizedScheme("awq", group, not qcfg.get("zero_point", True), False)


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
        return unpack_gptq(t, BITS, scheme.group_size, scheme.sym)
    return unpack_awq(t, scheme.group_size)
