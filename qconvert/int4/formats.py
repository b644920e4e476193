"""The GPTQ (v1) and AWQ (GEMM) checkpoint layouts: packing, unpacking, dequantization, config dicts.

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

Packers take a ``QuantizedLinear`` and return ``{suffix: tensor}`` on its device (the writer prefixes
``model.layers.{i}.self_attn.q_proj.`` etc.); unpackers invert them exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from qconvert import __version__
from qconvert.errors import QuantTypeError
from qconvert.int4.awq import AWQConfig
from qconvert.int4.gptq import GPTQConfig
from qconvert.int4.rtn import SCALE_DTYPE, QuantizedLinear, default_g_idx, n_groups

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
# quantization_config dicts (written to config.json and quantize_config.json)


PACKED_SUFFIXES = ("qweight", "qzeros", "scales", "g_idx")


def dequantized_tensors(ckpt: SafetensorsCheckpoint, prefix: str, quantization_config: Mapping[str, Any] | None,
                        device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every tensor of a GPTQ/AWQ checkpoint whose name starts with ``prefix`` (e.g. one decoder layer's
    ``model.layers.3.``; ``""`` for all), names relative to it, as float32 on ``device``: each packed linear
    dequantized from its qweight/qzeros/scales/g_idx into ``<module>.weight`` (the weights the loaders multiply
    with), every other tensor widened. ``quantization_config`` is the checkpoint's config.json entry (None for
    a float checkpoint).
    """
    q = quantization_config
    out: dict[str, torch.Tensor] = {}
    for name in ckpt.names():
        if not name.startswith(prefix) or name.endswith(PACKED_SUFFIXES[1:]):
            continue
        rel = name[len(prefix):]
        if rel.endswith(".qweight"):
            module = name[: -len(".qweight")]
            if q is None:
                raise QuantTypeError(f"{module} is packed (qweight) but config.json has no quantization_config: "
                                     "the checkpoint is incomplete; re-export it.")
            t = {k: torch.from_numpy(ckpt.read_raw(f"{module}.{k}")).to(device)
                 for k in PACKED_SUFFIXES if f"{module}.{k}" in ckpt.entries}
            w = dequantize_awq(t, int(q["group_size"])) if q["quant_method"] == "awq" else \
                dequantize_gptq(t, int(q["bits"]))
            out[rel[: -len("qweight")] + "weight"] = w.float()
        else:
            out[rel] = torch.from_numpy(ckpt.read_f32(name)).to(device)
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


# method -> (packer, tensor suffixes)
PACKERS = MappingProxyType({"gptq": (pack_gptq, GPTQ_TENSORS), "awq": (pack_awq, AWQ_TENSORS)})


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
