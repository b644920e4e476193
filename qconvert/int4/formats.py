"""The checkpoint layouts qconvert writes — GPTQ v1, AWQ GEMM, compressed-tensors pack-quantized — and their table.

All facts come from ``reference/gptq-awq-onnx-anchor.md`` §2–§3; they are spelled once, here. Shapes below are
for a linear with weight ``W [N = out, K = in]``, ``bits`` b and group size g (G = K / g groups).

GPTQ v1 (``checkpoint_format = "gptq"``; AutoGPTQ ``qlinear_exllama.pack``, GPTQModel ``FORMAT.GPTQ``)::

    qweight int32 [K·b/32, N]   codes packed along the *input* dim, LSB first: word r of column n holds
                                q[n, 32r/b + j] at bits b·j   (3-bit: one continuous bit stream, 32 codes in 3 words)
    qzeros  int32 [G, N·b/32]   (z - 1) packed the same way along the *output* dim   (sym 4-bit: 0x77777777)
    scales  fp16  [G, N]
    g_idx   int32 [K]           group of each input column (k // g unless act-order)
    W[n, k] = scales[g_idx[k], n] · (q[n, k] - (qzeros'[g_idx[k], n] + 1))

AWQ GEMM (AutoAWQ ``WQLinear_GEMM``; 4-bit only, no g_idx)::

    qweight int32 [K, N/8]      codes packed along the *output* dim; word c holds q[., 8c + AWQ_ORDER[i]] at 4i
    qzeros  int32 [G, N/8]      z as-is (no -1), packed like qweight
    scales  fp16  [G, N]
    W[n, k] = scales[k // g, n] · (q[n, k] - z[k // g, n])

compressed-tensors ``pack-quantized`` (llm-compressor's W4A16/W8A16; compressed-tensors 0.20's
``compressors/pack_quantized`` and ``quantization/quant_args``, anchor §3.3; strategy ``channel``: G = 1)::

    weight_packed      int32 [N, K·b/32]   codes packed along the *input* dim, LSB first: one dense bit stream per
                                           row, i.e. the GPTQ v1 ``qweight`` bit stream transposed
    weight_scale       fp16  [N, G]
    weight_zero_point  int32 [N·b/32, G]   asymmetric only: zero points packed the same way along the *output* dim
    weight_shape       int32 [2]           (N, K)   (llm-compressor writes int64; see CT_SHAPE_DTYPE)
    W[n, k] = weight_scale[n, k // g] · (q[n, k] − z[n, k // g])

compressed-tensors quantizes to signed integers ``q_s ∈ [−2^(b−1), 2^(b−1) − 1]`` with signed zero points ``zp_s``
and packs ``q_s + 2^(b−1)`` (and ``zp_s + 2^(b−1)``). qconvert's unsigned codes ``u`` and zero points ``z`` are
exactly those offset values, so they are stored as they are: ``q_s − zp_s = (u − 2^(b−1)) − (z − 2^(b−1)) = u − z``.
Symmetric means ``zp_s = 0``, i.e. every ``z = 2^(b−1)``, and no ``weight_zero_point`` tensor is written.

compressed-tensors ``int-quantized`` (llm-compressor's W8A8 INT8: ``compressors/naive_quantized``, the
``INT8_W8A8`` preset of ``quantization/quant_scheme``)::

    weight             int8  [N, K]        q_s = u − 128: signed codes, one per weight (no packing)
    weight_scale       fp16  [N, 1]        one scale per output row (strategy ``channel``, symmetric)
    W[n, k] = weight_scale[n, 0] · weight[n, k]
    y = W · Q_tok(x)                       Q_tok: per-token dynamic int8 of the input, at run time (``smoothquant``)

What the pack-quantized layout cannot hold, and qconvert refuses rather than approximates:

* widths other than 4 and 8 bits: vLLM's compressed-tensors WNA16 kernels load ``uint4b8``/``uint8b128`` only;
* act-order group indices (GPTQ ``desc_act`` without static groups): compressed-tensors 0.20 removed ``actorder
  "group"`` and its ``weight_g_idx``, so a permuted ``g_idx`` has nowhere to go.

Packers take a ``QuantizedLinear`` and return ``{suffix: tensor}`` on its device (the writer prefixes
``model.layers.{i}.self_attn.q_proj.`` etc.); unpackers invert them exactly. ``LAYOUTS`` (keyed on
``quantization_config.quant_method``; compressed-tensors' int-quantized W8A8 on its ``format``) gives each layout's
packer, unpacker and shapes; ``layout_scheme`` reads a checkpoint's config into (layout, bits/group/sym).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Container, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from qconvert import __version__
from qconvert.errors import CheckpointError, QuantTypeError
from qconvert.int4.awq import AWQConfig
from qconvert.int4.gptq import GPTQConfig
from qconvert.int4.rtn import SCALE_DTYPE, QuantizedLinear, check_scheme, default_g_idx, n_groups

if TYPE_CHECKING:
    from qconvert.io.safetensors import SafetensorsCheckpoint

WORD_BITS = 32  # pack_dtype int32
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble i of a word holds column 8c + AWQ_ORDER[i]
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # its inverse: column 8c + j sits in nibble AWQ_REVERSE_ORDER[j]
AWQ_BITS = 4
GPTQ_V1_ZERO_OFFSET = 1  # v1 stores z - 1
GPTQ_TENSORS = ("qweight", "qzeros", "scales", "g_idx")
AWQ_TENSORS = ("qweight", "qzeros", "scales")
QUANTIZER_TAG = f"qconvert:{__version__}"
CT_METHOD = "compressed-tensors"  # quantization_config.quant_method
CT_FORMAT = "pack-quantized"  # quantization_config.format (and the config group's)
CT_VERSION = "0.20.0"  # the compressed-tensors release whose layout this module writes
CT_BITS = (4, 8)  # W4A16 and W8A16: the widths vLLM's compressed-tensors WNA16 kernels load
CT_TARGETS = ("Linear",)
CT_IGNORE = ("lm_head",)
CT_TENSORS = ("weight_packed", "weight_scale", "weight_zero_point", "weight_shape")
# llm-compressor stores weight_shape as int64; every loader copies it into its own int64 buffer (vLLM) or reads its
# values (compressed-tensors), so int32 loads the same. qconvert writes int32 because its own safetensors reader
# (qconvert.io.safetensors.DTYPES) has no I64 yet and must read these checkpoints back (verify, convert-format).
CT_SHAPE_DTYPE = torch.int32
CT_STRATEGIES = ("group", "channel")  # weights.strategy: group_size > 0, or one scale per output row (-1)
CT_INT_FORMAT = "int-quantized"  # quantization_config.format of W8A8 INT8 (weights stored unpacked as int8)
INT8_TENSORS = ("weight", "weight_scale")
INT8_OFFSET = 128  # qconvert's unsigned 8-bit code u is the signed int8 value u - 128 (zero point 128 = symmetric)
# W8A8's schemes, as compressed-tensors' QuantizationArgs: int8 weights per output channel, int8 activations per
# token computed at run time (no input_scale tensor); the INT8_W8A8 preset of compressed-tensors 0.20
W8A8_WEIGHTS = MappingProxyType({"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                 "strategy": "channel", "dynamic": False})
W8A8_ACTIVATIONS = MappingProxyType({"num_bits": 8, "type": "int", "symmetric": True, "group_size": None,
                                     "strategy": "token", "dynamic": True})
# bytes per element of every packed tensor qconvert writes (scales fp16, weight_shape CT_SHAPE_DTYPE, W8A8's weight
# int8, the rest int32)
ITEMSIZE = MappingProxyType({"scales": 2, "weight_scale": 2, "weight_shape": CT_SHAPE_DTYPE.itemsize, "weight": 1})


@dataclass(frozen=True)
class Scheme:
    """What every layout's config states about its weights: width, group size (-1: one per row), symmetry."""

    bits: int
    group_size: int
    sym: bool


# ------------------------------------------------------------------------------------------------------------
# Bit streams


def _cycle(bits: int) -> tuple[int, int]:
    """(codes, words) of the shortest run that fills whole int32 words: 4-bit 8→1, 3-bit 32→3, 8-bit 4→1."""
    span = math.lcm(bits, WORD_BITS)
    return span // bits, span // WORD_BITS


def pack_bits(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integer codes [M, L] along dim 0 into int32 words [M·bits/32, L], LSB first, as one bit stream."""
    per, words = _cycle(bits)
    m, cols = codes.shape
    if m % per:
        raise QuantTypeError(f"cannot pack {m} {bits}-bit codes into int32 words: need a multiple of {per}.")
    v = codes.to(torch.int64).reshape(m // per, per, cols)
    out = torch.zeros(m // per, words, cols, dtype=torch.int64, device=codes.device)
    for j in range(per):
        word, shift = divmod(j * bits, WORD_BITS)
        out[:, word] |= (v[:, j] << shift) & 0xFFFFFFFF
        if shift + bits > WORD_BITS:  # 3-bit: this code straddles two words
            out[:, word + 1] |= v[:, j] >> (WORD_BITS - shift)
    out = out.reshape(-1, cols)
    return torch.where(out >= 2**31, out - 2**32, out).to(torch.int32)


def unpack_bits(words: torch.Tensor, bits: int) -> torch.Tensor:
    """Inverse of ``pack_bits``: int32 [R, L] -> int64 codes [R·32/bits, L]."""
    per, n_words = _cycle(bits)
    r, cols = words.shape
    w = (words.to(torch.int64) & 0xFFFFFFFF).reshape(r // n_words, n_words, cols)
    mask = (1 << bits) - 1
    out = torch.empty(r // n_words, per, cols, dtype=torch.int64, device=words.device)
    for j in range(per):
        word, shift = divmod(j * bits, WORD_BITS)
        v = w[:, word] >> shift
        if shift + bits > WORD_BITS:
            v = v | (w[:, word + 1] << (WORD_BITS - shift))
        out[:, j] = v & mask
    return out.reshape(-1, cols)


# ------------------------------------------------------------------------------------------------------------
# GPTQ v1


def pack_gptq(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """``QuantizedLinear`` -> GPTQ v1 tensors ``qweight, qzeros, scales, g_idx`` (shapes in the module docstring)."""
    if int(q.zeros.min()) < GPTQ_V1_ZERO_OFFSET:
        raise QuantTypeError("GPTQ v1 stores zero points minus one and cannot hold zero point 0; quantize "
                             "asymmetric GPTQ weights with min_zero=1 (GPTQConfig does), or use sym=True.")
    return {
        "qweight": pack_bits(q.codes.T, q.bits),  # [K, N] -> [K·b/32, N]
        "qzeros": _pack_cols(q.zeros.to(torch.int64).T - GPTQ_V1_ZERO_OFFSET, q.bits),  # [G, N·b/32]
        "scales": q.scales.T.to(SCALE_DTYPE).contiguous(),  # [G, N]
        "g_idx": q.g_idx.to(torch.int32).contiguous(),
    }


def _pack_cols(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack [R, C] along dim 1: [R, C·bits/32]."""
    return pack_bits(x.T, bits).T.contiguous()


def _unpack_cols(words: torch.Tensor, bits: int) -> torch.Tensor:
    return unpack_bits(words.T, bits).T


def unpack_gptq(t: Mapping[str, torch.Tensor], bits: int, group_size: int, sym: bool) -> QuantizedLinear:
    """GPTQ v1 tensors -> ``QuantizedLinear`` (exact inverse of ``pack_gptq``)."""
    codes = unpack_bits(t["qweight"], bits).T  # [K, N] -> [N, K]
    zeros = _unpack_cols(t["qzeros"], bits)[:, : codes.shape[0]] + GPTQ_V1_ZERO_OFFSET  # [G, N]
    return QuantizedLinear(codes.to(torch.uint8).contiguous(), t["scales"].float().T.contiguous(),
                           zeros.T.to(torch.uint8).contiguous(), t["g_idx"].to(torch.int32), bits, group_size, sym)


def dequantize_gptq(t: Mapping[str, torch.Tensor], bits: int) -> torch.Tensor:
    """The f32 weight [N, K] that GPTQ v1 tensors represent (the formula in the module docstring)."""
    codes = unpack_bits(t["qweight"], bits)  # [K, N]
    zeros = _unpack_cols(t["qzeros"], bits)[:, : codes.shape[1]] + GPTQ_V1_ZERO_OFFSET  # [G, N]
    g = t["g_idx"].long()
    return (t["scales"].float()[g] * (codes - zeros[g]).float()).T.contiguous()


# ------------------------------------------------------------------------------------------------------------
# AWQ GEMM


def _awq_interleave(x: torch.Tensor, order: tuple[int, ...]) -> torch.Tensor:
    """Permute columns within each run of 8: out[:, 8c + i] = x[:, 8c + order[i]]."""
    r, c = x.shape
    return x.reshape(r, c // 8, 8)[:, :, list(order)].reshape(r, c)


def pack_awq(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """``QuantizedLinear`` (4-bit, no act-order) -> AWQ GEMM tensors ``qweight, qzeros, scales``."""
    n = q.shape[0]
    if q.bits != AWQ_BITS or q.group_size == -1 or n % 8:
        raise QuantTypeError(f"AWQ GEMM holds 4-bit group-wise weights with out_features % 8 == 0; got "
                             f"{q.bits}-bit, group {q.group_size}, out {n}. Use GPTQ for other schemes.")
    if q.act_order:
        raise QuantTypeError("AWQ GEMM has no g_idx, so act-order (desc_act) weights cannot be stored; "
                             "use GPTQ with desc_act, or static_groups=True.")
    return {
        "qweight": _pack_cols(_awq_interleave(q.codes.T.to(torch.int64), AWQ_ORDER), AWQ_BITS),  # [K, N/8]
        "qzeros": _pack_cols(_awq_interleave(q.zeros.T.to(torch.int64), AWQ_ORDER), AWQ_BITS),  # [G, N/8]
        "scales": q.scales.T.to(SCALE_DTYPE).contiguous(),  # [G, N]
    }


def unpack_awq(t: Mapping[str, torch.Tensor], group_size: int) -> QuantizedLinear:
    """AWQ GEMM tensors -> ``QuantizedLinear`` (exact inverse of ``pack_awq``)."""
    codes = _awq_interleave(_unpack_cols(t["qweight"], AWQ_BITS), AWQ_REVERSE_ORDER)  # [K, N]
    zeros = _awq_interleave(_unpack_cols(t["qzeros"], AWQ_BITS), AWQ_REVERSE_ORDER)  # [G, N]
    g_idx = default_g_idx(codes.shape[0], group_size, codes.device)
    return QuantizedLinear(codes.T.to(torch.uint8).contiguous(), t["scales"].float().T.contiguous(),
                           zeros.T.to(torch.uint8).contiguous(), g_idx, AWQ_BITS, group_size, False)


def dequantize_awq(t: Mapping[str, torch.Tensor], group_size: int) -> torch.Tensor:
    """The f32 weight [N, K] that AWQ GEMM tensors represent."""
    return unpack_awq(t, group_size).dequantize()


# ------------------------------------------------------------------------------------------------------------
# compressed-tensors pack-quantized


def _pack_rows(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Pack integers [R, C] along dim 0 into int32 [ceil(R·bits/32), C], zero-padding R to whole words."""
    pad = -x.shape[0] % _cycle(bits)[0]
    if pad:
        x = torch.cat([x, x.new_zeros(pad, x.shape[1])])
    return pack_bits(x, bits)


def check_compressed(q: QuantizedLinear, where: str = "this layer") -> None:
    """Raise ``QuantTypeError`` unless ``q`` is expressible as compressed-tensors pack-quantized (see module doc)."""
    if q.bits not in CT_BITS:
        raise QuantTypeError(f"{where} is {q.bits}-bit; compressed-tensors pack-quantized is written for "
                             f"{' and '.join(map(str, CT_BITS))}-bit weights only (W4A16, W8A16: what vLLM loads). "
                             "Keep the GPTQ layout (--format gptq) for other widths, or quantize with --bits 4 or 8.")
    if q.act_order:
        raise QuantTypeError(f"{where} uses act-order group indices (desc_act); compressed-tensors 0.20 has no "
                             "g_idx (actorder 'group' was removed). Keep the GPTQ layout for it, or requantize with "
                             "--static-groups or --group-aware, which keep the plain group order.")
    if q.sym and not bool((q.zeros.long() == 2 ** (q.bits - 1)).all()):
        raise QuantTypeError(f"{where} is marked symmetric but has zero points other than {2 ** (q.bits - 1)}; "
                             "the source checkpoint is inconsistent: re-export it (or declare it asymmetric).")


def pack_compressed(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """``QuantizedLinear`` -> ``weight_packed, weight_scale, weight_shape`` (+ ``weight_zero_point`` when asym)."""
    check_compressed(q)
    out = {
        "weight_packed": _pack_rows(q.codes.T.to(torch.int64), q.bits).T.contiguous(),  # [K, N] -> [N, K·b/32]
        "weight_scale": q.scales.to(SCALE_DTYPE).contiguous(),  # [N, G]
        "weight_shape": torch.tensor(q.shape, dtype=CT_SHAPE_DTYPE),
    }
    if not q.sym:
        out["weight_zero_point"] = _pack_rows(q.zeros.to(torch.int64), q.bits)  # [N, G] -> [N·b/32, G]
    return out


def compressed_weight_shape(t: Mapping[str, torch.Tensor], bits: int, group_size: int) -> tuple[int, int]:
    """(out, in) of a packed linear: ``weight_shape`` when given, else from the packed and scale shapes (exact for
    groups; for channel strategy exact whenever in·bits is a multiple of 32, as in every Qwen2.5 linear)."""
    if "weight_shape" in t:
        n, k = (int(v) for v in t["weight_shape"].tolist())
        return n, k
    packed, scale = t["weight_packed"], t["weight_scale"]
    k = scale.shape[1] * group_size if group_size > 0 else packed.shape[1] * WORD_BITS // bits
    return packed.shape[0], k


def unpack_compressed(t: Mapping[str, torch.Tensor], bits: int, group_size: int, sym: bool) -> QuantizedLinear:
    """pack-quantized tensors -> ``QuantizedLinear`` (exact inverse of ``pack_compressed``)."""
    n, k = compressed_weight_shape(t, bits, group_size)
    want = {name: s for name, s in compressed_shapes(n, k, bits, group_size, sym).items()
            if name in t or name != "weight_shape"}
    got = {name: tuple(v.shape) for name, v in t.items() if name in want}
    if got != want:
        raise CheckpointError(f"pack-quantized tensors {got} do not match a W{bits} group {group_size} "
                              f"{'symmetric' if sym else 'asymmetric'} [{n}, {k}] linear {want}: the tensors and "
                              "quantization_config disagree (mismatched group size or bits?); re-export the checkpoint.")
    codes = unpack_bits(t["weight_packed"].T.contiguous(), bits)[:k].T  # [N, K·b/32] -> [N, K]
    scales = t["weight_scale"].float()
    if sym:
        zeros = torch.full_like(scales, 2 ** (bits - 1))
    else:
        zeros = unpack_bits(t["weight_zero_point"], bits)[:n].float()  # [N, G]
    return QuantizedLinear(codes.to(torch.uint8).contiguous(), scales.contiguous(), zeros.to(torch.uint8).contiguous(),
                           default_g_idx(k, group_size, codes.device), bits, group_size, sym)


def dequantize_compressed(t: Mapping[str, torch.Tensor], bits: int, group_size: int, sym: bool) -> torch.Tensor:
    """The f32 weight [N, K] that pack-quantized tensors represent (the formula in the module docstring)."""
    return unpack_compressed(t, bits, group_size, sym).dequantize()


def compressed_shapes(out_features: int, in_features: int, bits: int, group_size: int, sym: bool
                      ) -> dict[str, tuple[int, ...]]:
    """Shapes of the pack-quantized tensors of one linear, for validating before anything is written."""
    groups = n_groups(in_features, group_size)
    shapes: dict[str, tuple[int, ...]] = {
        "weight_packed": (out_features, math.ceil(in_features * bits / WORD_BITS)),
        "weight_scale": (out_features, groups), "weight_shape": (2,)}
    if not sym:
        shapes["weight_zero_point"] = (math.ceil(out_features * bits / WORD_BITS), groups)
    return shapes


# ------------------------------------------------------------------------------------------------------------
# compressed-tensors int-quantized (W8A8 INT8)


def check_int8(q: QuantizedLinear, where: str = "this layer") -> None:
    """Raise ``QuantTypeError`` unless ``q`` is 8-bit, symmetric, one scale per output row (W8A8's weights)."""
    if (q.bits, q.group_size, q.sym) != (8, -1, True) or q.act_order:
        raise QuantTypeError(f"{where} is {q.bits}-bit, group size {q.group_size}, "
                             f"{'symmetric' if q.sym else 'with zero points'}; W8A8 (int-quantized) stores symmetric "
                             "8-bit weights with one scale per output row. Quantize with bits=8, group_size=-1, "
                             "sym=True (qconvert w8a8 does), or write a weight-only layout (--format gptq).")
    if not bool((q.zeros.long() == INT8_OFFSET).all()):
        raise QuantTypeError(f"{where} is marked symmetric but has zero points other than {INT8_OFFSET}; the "
                             "result is inconsistent: requantize it.")


def pack_int8(q: QuantizedLinear) -> dict[str, torch.Tensor]:
    """``QuantizedLinear`` (8-bit, per channel, symmetric) -> ``weight`` int8 [N, K], ``weight_scale`` fp16 [N, 1]."""
    check_int8(q)
    return {"weight": (q.codes.to(torch.int16) - INT8_OFFSET).to(torch.int8).contiguous(),
            "weight_scale": q.scales.to(SCALE_DTYPE).contiguous()}


def int8_shapes(out_features: int, in_features: int) -> dict[str, tuple[int, ...]]:
    """Shapes of the int-quantized tensors of one linear."""
    return {"weight": (out_features, in_features), "weight_scale": (out_features, 1)}


def unpack_int8(t: Mapping[str, torch.Tensor]) -> QuantizedLinear:
    """int-quantized tensors -> ``QuantizedLinear`` (exact inverse of ``pack_int8``); refuses other shapes/dtypes."""
    w, scale = t["weight"], t["weight_scale"]
    want = int8_shapes(*w.shape) if w.ndim == 2 else {}
    if w.dtype != torch.int8 or tuple(scale.shape) != want.get("weight_scale"):
        raise CheckpointError(f"int-quantized tensors weight {w.dtype}{list(w.shape)}, weight_scale "
                              f"{list(scale.shape)} are not W8A8's int8 [N, K] and [N, 1] (one scale per output "
                              "row); the tensors and quantization_config disagree: re-export the checkpoint.")
    codes = (w.to(torch.int16) + INT8_OFFSET).to(torch.uint8)
    scales = scale.float().contiguous()
    return QuantizedLinear(codes.contiguous(), scales, torch.full_like(scales, INT8_OFFSET).to(torch.uint8),
                           default_g_idx(w.shape[1], -1, w.device), 8, -1, True)


def w8a8_quantization_config(provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` llm-compressor writes for W8A8 INT8 (``int-quantized``): int8 weights per output
    channel, dynamic per-token int8 activations, every ``Linear`` but ``lm_head``. ``provenance`` (how the weights
    were made: RTN or GPTQ, SmoothQuant's alpha) goes under the top-level ``qconvert`` key."""
    return {
        "quant_method": CT_METHOD, "format": CT_INT_FORMAT, "quantization_status": "compressed",
        "version": CT_VERSION,
        "config_groups": {"group_0": {"targets": list(CT_TARGETS), "weights": dict(W8A8_WEIGHTS),
                                      "input_activations": dict(W8A8_ACTIVATIONS), "output_activations": None,
                                      "format": CT_INT_FORMAT}},
        "ignore": list(CT_IGNORE), "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}, "transform_config": {},
        "qconvert": {"quantizer": QUANTIZER_TAG, **(provenance or {})},
    }


def _int8_scheme(qcfg: Mapping[str, Any]) -> Scheme:
    """The scheme of an int-quantized config: only W8A8 INT8 as written above (else a ``QuantTypeError``)."""
    groups = qcfg.get("config_groups")
    group = next(iter(groups.values())) if isinstance(groups, dict) and len(groups) == 1 else None
    if not isinstance(group, dict):
        raise QuantTypeError("an int-quantized quantization_config needs exactly one config group; qconvert reads "
                             "W8A8 INT8 (llm-compressor's W8A8 preset) only.")
    w, a = group.get("weights") or {}, group.get("input_activations") or {}
    keys = ("num_bits", "type", "symmetric", "strategy", "dynamic")
    if any(w.get(k) != W8A8_WEIGHTS[k] for k in keys) or any(a.get(k) != W8A8_ACTIVATIONS[k] for k in keys):
        raise QuantTypeError(f"config group {group!r} is not W8A8 INT8 (weights: 8-bit symmetric int per channel; "
                             "activations: 8-bit symmetric int per token, dynamic); qconvert reads and writes only "
                             "that int-quantized scheme (static or per-tensor activation scales are not supported).")
    return Scheme(8, -1, True)


# ------------------------------------------------------------------------------------------------------------
# Reading any layout back; quantization_config dicts (written to config.json and quantize_config.json)


def dequantized_tensors(ckpt: SafetensorsCheckpoint, prefix: str, quantization_config: Mapping[str, Any] | None,
                        device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a GPTQ/AWQ/compressed-tensors checkpoint whose name starts with ``prefix`` (e.g. one decoder
    layer's ``model.layers.3.``; ``""`` for all), names relative to it, as float32 on ``device``: each packed linear
    dequantized (qweight/qzeros/scales/g_idx, or weight_packed/weight_scale/weight_zero_point) into
    ``<module>.weight`` (the weights the loaders multiply with), every other tensor widened.
    ``quantization_config`` is the checkpoint's config.json entry (None for a float checkpoint).
    """
    names = set(ckpt.names())
    layout = scheme = None
    out: dict[str, torch.Tensor] = {}
    for name in ckpt.names():
        module, _, suffix = name.rpartition(".")
        if not name.startswith(prefix):
            continue
        if not is_packed(name, names):
            out[name[len(prefix):]] = torch.from_numpy(ckpt.read_f32(name)).to(device)
            continue
        if quantization_config is None:
            raise QuantTypeError(f"{name} is a packed tensor but config.json has no quantization_config: the "
                                 "checkpoint is incomplete; re-export it.")
        if layout is None:
            layout, scheme = layout_scheme(quantization_config)
        if suffix == layout.suffixes[0]:
            assert scheme is not None
            q = read_linear(lambda n: torch.from_numpy(ckpt.read_raw(n)).to(device), names, module, layout, scheme)
            out[module[len(prefix):] + ".weight"] = q.dequantize().float()
    return out


def gptq_quantization_config(cfg: GPTQConfig) -> dict[str, Any]:
    """The GPTQ v1 ``quantization_config`` (anchor §2.2). Never ``is_marlin_format``: GPTQModel rejects it."""
    meta: dict[str, Any] = {"quantizer": [QUANTIZER_TAG]}
    if cfg.group_aware:  # informational (GPTQModel's key): the layout is the plain one, loaders need nothing
        meta["act_group_aware"] = True
    return {
        "quant_method": "gptq", "bits": cfg.bits, "group_size": cfg.group_size, "desc_act": cfg.desc_act,
        "sym": cfg.sym, "true_sequential": cfg.true_sequential, "damp_percent": cfg.damp_percent,
        "static_groups": cfg.static_groups, "lm_head": False, "checkpoint_format": "gptq", "format": "gptq",
        "pack_dtype": "int32", "meta": meta,
    }


def awq_quantization_config(cfg: AWQConfig) -> dict[str, Any]:
    """AutoAWQ's ``quantization_config`` for GEMM checkpoints with zero points (anchor §3.2)."""
    return {"quant_method": "awq", "zero_point": cfg.zero_point, "group_size": cfg.group_size, "bits": cfg.bits,
            "version": "gemm", "modules_to_not_convert": None}


def compressed_quantization_config(bits: int, group_size: int, sym: bool,
                                   provenance: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The ``quantization_config`` llm-compressor writes for a W{bits}A16 pack-quantized model.

    One config group targets every ``Linear`` but ``lm_head`` (embeddings are not Linear, so they stay float).
    ``provenance`` (e.g. the GPTQ/AWQ settings the codes came from) is kept under the top-level ``qconvert`` key,
    which compressed-tensors and vLLM ignore.
    """
    check_scheme(bits, group_size, max(group_size, 1), "compressed-tensors")
    if bits not in CT_BITS:
        raise QuantTypeError(f"compressed-tensors pack-quantized is written for {' and '.join(map(str, CT_BITS))}-bit "
                             f"weights (W4A16, W8A16), not {bits}-bit; use --format gptq for {bits}-bit.")
    weights = {"num_bits": bits, "type": "int", "symmetric": sym,
               "group_size": None if group_size == -1 else group_size,
               "strategy": CT_STRATEGIES[group_size == -1], "dynamic": False}
    return {
        "quant_method": CT_METHOD, "format": CT_FORMAT, "quantization_status": "compressed", "version": CT_VERSION,
        "config_groups": {"group_0": {"targets": list(CT_TARGETS), "weights": weights, "input_activations": None,
                                      "output_activations": None, "format": CT_FORMAT}},
        "ignore": list(CT_IGNORE), "kv_cache_scheme": None, "global_compression_ratio": None,
        "sparsity_config": {}, "transform_config": {},
        "qconvert": {"quantizer": QUANTIZER_TAG, **(provenance or {})},
    }


def _compressed_scheme(qcfg: Mapping[str, Any]) -> Scheme:
    """(bits, group_size, sym) of a compressed-tensors config, refusing what qconvert cannot read or write."""
    fix = ("qconvert reads one config group of int weights (W4A16/W8A16, group or channel strategy, no activation "
           "quantization) in the pack-quantized format, as llm-compressor's W4A16/W8A16 recipes write.")
    if qcfg.get("format") != CT_FORMAT:
        raise QuantTypeError(f"compressed-tensors format {qcfg.get('format')!r} is neither {CT_FORMAT!r} nor "
                             f"{CT_INT_FORMAT!r} (W8A8 INT8). {fix}")
    groups = qcfg.get("config_groups")
    if not isinstance(groups, dict) or len(groups) != 1:
        raise QuantTypeError(f"quantization_config has {len(groups) if isinstance(groups, dict) else 'no'} config "
                             f"groups. {fix}")
    group = next(iter(groups.values()))
    w = group.get("weights") if isinstance(group, dict) else None
    if not isinstance(w, dict) or group.get("input_activations") or w.get("type", "int") != "int" \
            or w.get("strategy") not in CT_STRATEGIES or w.get("dynamic") or w.get("actorder") not in (None, "weight", "static"):
        raise QuantTypeError(f"quantization_config's config group {group!r} is not a static int weight-only scheme. "
                             f"{fix}")
    if group.get("format") not in (None, CT_FORMAT):
        raise QuantTypeError(f"config group format {group.get('format')!r} is not {CT_FORMAT!r}. {fix}")
    bits, strategy = w.get("num_bits"), w.get("strategy")
    size = -1 if strategy == "channel" else w.get("group_size")
    if not isinstance(bits, int) or not isinstance(size, int) or bits not in CT_BITS:
        raise QuantTypeError(f"weights num_bits {bits!r}, group_size {size!r}: {fix}")
    return Scheme(bits, size, bool(w.get("symmetric", True)))


def packed_shapes(method: str, out_features: int, in_features: int, bits: int, group_size: int
                  ) -> dict[str, tuple[int, ...]]:
    """Shapes of the packed tensors of one linear, for validating before anything is written."""
    groups = n_groups(in_features, group_size)
    if method == "gptq":
        return {"qweight": (in_features * bits // WORD_BITS, out_features),
                "qzeros": (groups, out_features * bits // WORD_BITS), "scales": (groups, out_features),
                "g_idx": (in_features,)}
    return {"qweight": (in_features, out_features // 8), "qzeros": (groups, out_features // 8),
            "scales": (groups, out_features)}


# ------------------------------------------------------------------------------------------------------------
# Every layout qconvert writes


@dataclass(frozen=True)
class Layout:
    """One checkpoint layout: its packer, its unpacker, the tensor suffixes it may write and their shapes."""

    name: str
    pack: Callable[[QuantizedLinear], dict[str, torch.Tensor]]
    unpack: Callable[[Mapping[str, torch.Tensor], Scheme], QuantizedLinear]
    suffixes: tuple[str, ...]
    shapes: Callable[[int, int, Scheme], dict[str, tuple[int, ...]]]
    sidecar: bool  # also write quantize_config.json (AutoGPTQ/GPTQModel/vLLM's fallback for GPTQ and AWQ)
    dynamic_activations: bool = False  # inputs are quantized per token at run time (W8A8): verify must do the same

    def nbytes(self, out_features: int, in_features: int, scheme: Scheme) -> int:
        """Bytes of the packed tensors of one linear."""
        return sum(math.prod(s) * ITEMSIZE.get(part, 4) for part, s in self.shapes(out_features, in_features,
                                                                                    scheme).items())


LAYOUTS: MappingProxyType[str, Layout] = MappingProxyType({
    "gptq": Layout("gptq", pack_gptq, lambda t, s: unpack_gptq(t, s.bits, s.group_size, s.sym),
                   GPTQ_TENSORS, lambda n, k, s: packed_shapes("gptq", n, k, s.bits, s.group_size), True),
    "awq": Layout("awq", pack_awq, lambda t, s: unpack_awq(t, s.group_size),
                  AWQ_TENSORS, lambda n, k, s: packed_shapes("awq", n, k, s.bits, s.group_size), True),
    CT_METHOD: Layout(CT_METHOD, pack_compressed,
                      lambda t, s: unpack_compressed(t, s.bits, s.group_size, s.sym),
                      CT_TENSORS, lambda n, k, s: compressed_shapes(n, k, s.bits, s.group_size, s.sym), False),
    CT_INT_FORMAT: Layout(CT_INT_FORMAT, pack_int8, lambda t, s: unpack_int8(t), INT8_TENSORS,
                          lambda n, k, s: int8_shapes(n, k), False, dynamic_activations=True),
})
# suffixes that only packed linears have ("weight" is every float tensor's too: W8A8's int8 weight is told apart by
# its module's weight_scale, see ``is_packed``)
QUANT_METHODS = ("gptq", "awq", CT_METHOD)  # quantization_config.quant_method values (CT: two layouts by format)
PACKED_SUFFIXES = tuple(dict.fromkeys(s for layout in LAYOUTS.values() for s in layout.suffixes if s != "weight"))


def is_packed(name: str, names: Container[str]) -> bool:
    """Whether tensor ``name`` of a checkpoint holding ``names`` is part of a quantized linear (any layout)."""
    module, _, suffix = name.rpartition(".")
    return suffix in PACKED_SUFFIXES or (suffix == "weight" and f"{module}.weight_scale" in names)


def read_linear(read: Callable[[str], torch.Tensor], names: Container[str], module: str, layout: Layout,
                scheme: Scheme) -> QuantizedLinear:
    """Unpack ``module``'s packed tensors (``read(name)`` gives one as a tensor) into a ``QuantizedLinear``.

    ``weight_shape`` is not read: its value is implied by ``weight_packed``/``weight_scale`` (and the caller checks
    every tensor's shape against config.json before reading).
    """
    t = {s: read(f"{module}.{s}") for s in layout.suffixes if s != "weight_shape" and f"{module}.{s}" in names}
    if layout.suffixes[0] not in t:
        raise CheckpointError(f"{module}.{layout.suffixes[0]} is missing: a {layout.name} checkpoint stores every "
                              "quantized linear packed. The checkpoint is incomplete; re-export it.")
    return layout.unpack(t, scheme)


def layout_scheme(qcfg: Mapping[str, Any] | None, where: str = "quantization_config") -> tuple[Layout, Scheme]:
    """The layout (by ``quant_method``, and ``format`` for compressed-tensors) and weight scheme a checkpoint's
    ``quantization_config`` declares."""
    method = None if not isinstance(qcfg, Mapping) else qcfg.get("quant_method")
    if qcfg is None or method not in QUANT_METHODS:
        raise QuantTypeError(f"{where}: quant_method {method!r} is not a layout qconvert reads or writes "
                             f"({', '.join(QUANT_METHODS)}); a float checkpoint has no quantization_config.")
    if method == CT_METHOD and qcfg.get("format") == CT_INT_FORMAT:
        return LAYOUTS[CT_INT_FORMAT], _int8_scheme(qcfg)
    try:
        if method == CT_METHOD:
            scheme = _compressed_scheme(qcfg)
        elif method == "awq":
            scheme = Scheme(int(qcfg["bits"]), int(qcfg["group_size"]), not qcfg.get("zero_point", True))
        else:
            scheme = Scheme(int(qcfg["bits"]), int(qcfg["group_size"]), bool(qcfg.get("sym", True)))
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{where}: the {method} quantization_config lacks or garbles {e}; re-export the "
                              "checkpoint.") from e
    return LAYOUTS[str(method)], scheme
