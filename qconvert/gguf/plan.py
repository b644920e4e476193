"""Per-tensor type selection of ``llama-quantize`` (the "mixture") for dense Qwen2, with sizes and warnings.

A readable port of ``llama_tensor_get_type`` (llama.cpp ``src/llama-quant.cpp``, checked against the b11739
library that ``llama-cpp-py-sync`` ships; see ``tests/test_plan.py``). The decision for one tensor is, in
llama.cpp's order:

1. tensors that are never quantized (1-D, ``*_norm.weight``, not ending in ``weight``, ``output.weight`` with
   ``leave_output_tensor``) keep their source type;
2. ``token_embedding_type`` / ``output_tensor_type`` overrides win outright (no shape fallback);
3. presets whose default type is not quantized (F32/F16/BF16) use it for every matrix;
4. otherwise the first ``tensor_types`` regex that matches, else (unless ``pure``) the mixture rule
   (``mixture_type``), and finally the shape fallback (``shape_fallback``) when the row length ``ne[0]`` (the HF
   *input* dimension, ``shape[-1]``) is not a multiple of the type's block size.

Shapes are numpy / HF ``[out, in]``; GGUF's ``ne`` is the reverse.
"""

from __future__ import annotations

import enum
import re
from collections import Counter
from collections.abc import Collection, Iterator, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from qconvert.constants import GGUF_DEFAULT_ALIGNMENT, FileType, GGMLType
from qconvert.errors import QuantTypeError


@dataclass(frozen=True)
class Preset:
    """A llama-quantize file type: the ``general.file_type`` it writes and the default tensor type."""

    name: str
    file_type: FileType
    default_type: GGMLType


_T, _F = GGMLType, FileType
PRESETS: MappingProxyType[str, Preset] = MappingProxyType({p.name: p for p in (
    Preset("F32", _F.ALL_F32, _T.F32),
    Preset("F16", _F.MOSTLY_F16, _T.F16),
    Preset("BF16", _F.MOSTLY_BF16, _T.BF16),
    Preset("Q8_0", _F.MOSTLY_Q8_0, _T.Q8_0),
    Preset("Q4_0", _F.MOSTLY_Q4_0, _T.Q4_0),
    Preset("Q4_1", _F.MOSTLY_Q4_1, _T.Q4_1),
    Preset("Q5_0", _F.MOSTLY_Q5_0, _T.Q5_0),
    Preset("Q5_1", _F.MOSTLY_Q5_1, _T.Q5_1),
    Preset("Q2_K", _F.MOSTLY_Q2_K, _T.Q2_K),
    Preset("Q2_K_S", _F.MOSTLY_Q2_K_S, _T.Q2_K),
    Preset("Q3_K_S", _F.MOSTLY_Q3_K_S, _T.Q3_K),
    Preset("Q3_K_M", _F.MOSTLY_Q3_K_M, _T.Q3_K),
    Preset("Q3_K_L", _F.MOSTLY_Q3_K_L, _T.Q3_K),
    Preset("Q4_K_S", _F.MOSTLY_Q4_K_S, _T.Q4_K),
    Preset("Q4_K_M", _F.MOSTLY_Q4_K_M, _T.Q4_K),
    Preset("Q5_K_S", _F.MOSTLY_Q5_K_S, _T.Q5_K),
    Preset("Q5_K_M", _F.MOSTLY_Q5_K_M, _T.Q5_K),
    Preset("Q6_K", _F.MOSTLY_Q6_K, _T.Q6_K),
    Preset("IQ4_NL", _F.MOSTLY_IQ4_NL, _T.IQ4_NL),
    Preset("IQ4_XS", _F.MOSTLY_IQ4_XS, _T.IQ4_XS),
    Preset("IQ3_XS", _F.MOSTLY_IQ3_XS, _T.IQ3_S),
    Preset("IQ3_S", _F.MOSTLY_IQ3_S, _T.IQ3_S),
    Preset("IQ3_M", _F.MOSTLY_IQ3_M, _T.IQ3_S),
    Preset("IQ3_XXS", _F.MOSTLY_IQ3_XXS, _T.IQ3_XXS),
    Preset("IQ2_M", _F.MOSTLY_IQ2_M, _T.IQ2_S),
    Preset("IQ2_S", _F.MOSTLY_IQ2_S, _T.IQ2_XS),
    Preset("IQ2_XS", _F.MOSTLY_IQ2_XS, _T.IQ2_XS),
    Preset("IQ2_XXS", _F.MOSTLY_IQ2_XXS, _T.IQ2_XXS),
    Preset("IQ1_M", _F.MOSTLY_IQ1_M, _T.IQ1_M),
    Preset("IQ1_S", _F.MOSTLY_IQ1_S, _T.IQ1_S),
)})

# llama-quantize's own aliases ("Q4_K" means Q4_K_M).
PRESET_ALIASES: MappingProxyType[str, str] = MappingProxyType({"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"})

# qconvert's ``--bits N`` shorthand -> preset.
BITS_PRESETS: MappingProxyType[int, str] = MappingProxyType({
    2: "Q2_K", 3: "Q3_K_M", 4: "Q4_K_M", 5: "Q5_K_M", 6: "Q6_K", 8: "Q8_0", 16: "F16",
})

# tensor_type_fallback: a 256-block type whose rows do not fit -> the 32-block type llama.cpp uses instead.
# (Builds before 2025 sent Q2_K/Q3_K to IQ4_NL; the current source and b11739 use Q4_0. The 256-block I-quants
# go to IQ4_NL.)
FALLBACK: MappingProxyType[GGMLType, GGMLType] = MappingProxyType({
    _T.Q2_K: _T.Q4_0, _T.Q3_K: _T.Q4_0, _T.Q4_K: _T.Q5_0, _T.Q5_K: _T.Q5_1, _T.Q6_K: _T.Q8_0,
    _T.IQ4_XS: _T.IQ4_NL, _T.IQ3_XXS: _T.IQ4_NL, _T.IQ3_S: _T.IQ4_NL, _T.IQ2_S: _T.IQ4_NL,
    _T.IQ2_XS: _T.IQ4_NL, _T.IQ2_XXS: _T.IQ4_NL, _T.IQ1_S: _T.IQ4_NL, _T.IQ1_M: _T.IQ4_NL,
})

# tensor_requires_imatrix: the types llama-quantize refuses to write without an importance matrix, in any preset
# (the grid I-quants; IQ2_*/IQ1_* join when their kernels do) and in some presets only (Q2_K in a Q2_K_S file).
# token_embd and output are exempt.
IMATRIX_REQUIRED_TYPES: frozenset[GGMLType] = frozenset({_T.IQ3_XXS, _T.IQ2_S, _T.IQ2_XS, _T.IQ2_XXS, _T.IQ1_S,
                                                         _T.IQ1_M})
IMATRIX_REQUIRED_IN_PRESET: MappingProxyType[str, frozenset[GGMLType]] = MappingProxyType({
    "Q2_K_S": frozenset({_T.Q2_K}),
})
_IMATRIX_EXEMPT = frozenset({"token_embd.weight", "output.weight"})


def get_preset(name: str) -> Preset:
    """The preset called ``name`` (case-insensitive, e.g. ``"q5_k_m"``; ``"Q4_K"`` is Q4_K_M as in llama-quantize)."""
    key = name.strip().upper()
    preset = PRESETS.get(PRESET_ALIASES.get(key, key))
    if preset is None:
        raise QuantTypeError(f"unknown quantization preset {name!r}; choose one of {', '.join(PRESETS)}.")
    return preset


def preset_for_bits(bits: int) -> Preset:
    """``--bits`` shorthand: 2 -> Q2_K, 3 -> Q3_K_M, 4 -> Q4_K_M, 5 -> Q5_K_M, 6 -> Q6_K, 8 -> Q8_0, 16 -> F16."""
    if bits not in BITS_PRESETS:
        choices = ", ".join(f"{b} ({p})" for b, p in BITS_PRESETS.items())
        raise QuantTypeError(f"--bits {bits} is not supported; valid values: {choices}.")
    return PRESETS[BITS_PRESETS[bits]]


def parse_type(value: GGMLType | str) -> GGMLType:
    """A tensor type from a ``GGMLType`` or a name as llama.cpp prints it, case-insensitive (``"q8_0"``)."""
    if isinstance(value, GGMLType):
        return value
    try:
        return GGMLType[value.strip().upper()]
    except KeyError:
        names = ", ".join(t.label for t in GGMLType)
        raise QuantTypeError(f"unknown tensor type {value!r}; qconvert can write {names}.") from None


def parse_tensor_type_option(option: str) -> tuple[str, GGMLType]:
    """``"attn_v=q8_0"`` -> ``("attn_v", Q8_0)``, like llama-quantize's ``--tensor-type`` (pattern lower-cased)."""
    pattern, sep, type_name = option.partition("=")
    if not sep or not pattern or not type_name:
        raise QuantTypeError(f"malformed --tensor-type {option!r}: write REGEX=TYPE, e.g. 'ffn_down=q6_K'.")
    return pattern.lower(), parse_type(type_name)


class Role(enum.Enum):
    """llama.cpp's ``tensor_category`` for the tensors a dense Qwen2 has."""

    TOKEN_EMBD = "token_embd"
    OUTPUT = "output"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_OUTPUT = "attn_output"
    FFN_UP = "ffn_up"
    FFN_GATE = "ffn_gate"
    FFN_DOWN = "ffn_down"
    OTHER = "other"


# tensor_get_category: exact names first, then the first substring that occurs in the name (order matters).
_EXACT_ROLES = MappingProxyType({"output.weight": Role.OUTPUT, "token_embd.weight": Role.TOKEN_EMBD})
_SUBSTRING_ROLES: tuple[tuple[str, Role], ...] = (
    ("attn_v.weight", Role.ATTN_V),
    ("attn_k.weight", Role.ATTN_K),
    ("attn_q.weight", Role.ATTN_Q),
    ("attn_output.weight", Role.ATTN_OUTPUT),
    ("ffn_up", Role.FFN_UP),
    ("ffn_gate", Role.FFN_GATE),
    ("ffn_down", Role.FFN_DOWN),
)


def tensor_role(name: str) -> Role:
    """Role of a GGUF tensor name (``blk.3.attn_v.weight`` -> ``ATTN_V``)."""
    if name in _EXACT_ROLES:
        return _EXACT_ROLES[name]
    return next((role for key, role in _SUBSTRING_ROLES if key in name), Role.OTHER)


def ggml_n_dims(shape: tuple[int, ...]) -> int:
    """``ggml_n_dims``: dimensions ignoring trailing ``ne`` of 1 (= leading numpy axes of 1)."""
    n = len(shape)
    while n > 1 and shape[len(shape) - n] == 1:
        n -= 1
    return max(n, 1)


def is_quantizable(name: str, shape: tuple[int, ...], *, leave_output_tensor: bool = False) -> bool:
    """``tensor_allows_quantization`` for Qwen2: matrices whose name ends in ``weight``, norms excluded."""
    return (ggml_n_dims(shape) >= 2 and name.endswith("weight") and "_norm.weight" not in name
            and not (leave_output_tensor and name == "output.weight"))


def use_more_bits(i_layer: int, n_layers: int) -> bool:
    """The layers that get one more step of precision: the first and last eighth, and every third in between."""
    return i_layer < n_layers // 8 or i_layer >= 7 * n_layers // 8 or (i_layer - n_layers // 8) % 3 == 2


@dataclass(frozen=True)
class Model:
    """The hparams the mixture depends on. ``is_70b``: llama.cpp types an 80-layer qwen2 as ``LLM_TYPE_70B``."""

    n_layer: int
    n_head: int
    n_head_kv: int
    tied_embeddings: bool
    has_imatrix: bool = False

    @property
    def n_gqa(self) -> int:
        return self.n_head // self.n_head_kv if self.n_head_kv else 0

    @property
    def is_70b(self) -> bool:
        return self.n_layer == 80


# The 2-bit and smaller presets (llama.cpp's IQ1/IQ2 branch: its own attn_v/ffn_down/attn_output rules, no 70B
# attn_v rule).
_LOW_BIT_PRESETS = frozenset({"IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "IQ1_S", "IQ1_M"})
# Presets whose output (or tied embedding) gets Q5_K instead of Q6_K.
_OUTPUT_Q5_K_PRESETS = frozenset({"IQ3_XXS", *_LOW_BIT_PRESETS})
# Untied token_embd, where a preset does not use its default type.
_TOKEN_EMBD_TYPES = MappingProxyType({"IQ3_XXS": _T.IQ3_S, "IQ2_S": _T.IQ3_S, "IQ2_M": _T.IQ3_S,
                                      "IQ2_XXS": _T.Q2_K, "IQ2_XS": _T.Q2_K, "IQ1_S": _T.Q2_K, "IQ1_M": _T.Q2_K})


def _output_type(preset: Preset, ne0: int) -> GGMLType:
    """``output.weight`` (or a tied ``token_embd``): Q6_K (Q5_K for the lowest-bit presets), or Q8_0 when the
    default type does not fit the row."""
    if ne0 % preset.default_type.block_size:
        return _T.Q8_0
    if preset.name in _OUTPUT_Q5_K_PRESETS:
        return _T.Q5_K
    return preset.default_type if preset.default_type == _T.Q8_0 else _T.Q6_K


def _low_bit_type(preset: Preset, role: Role, i: int, n: int, model: Model) -> GGMLType:
    """The IQ1/IQ2 presets' rules for attn_v, ffn_down (first eighth) and attn_output."""
    iq3_s = preset.name in ("IQ2_S", "IQ2_M")
    if role is Role.ATTN_OUTPUT and preset.name in ("IQ1_S", "IQ1_M"):
        return _T.IQ2_XXS
    if role is Role.ATTN_V:
        return _T.Q4_K if model.n_gqa >= 4 else (_T.IQ3_S if iq3_s else _T.Q2_K)
    if role is Role.FFN_DOWN and i < n // 8:
        return _T.IQ3_S if iq3_s else _T.Q2_K
    if role is Role.ATTN_OUTPUT and iq3_s:
        return _T.IQ3_S
    return preset.default_type


def _attn_v_type(preset: Preset, i: int, n: int, model: Model) -> GGMLType:
    """``attn_v`` number ``i`` of ``n``: more bits for the small, GQA-shared value projection."""
    name, new = preset.name, preset.default_type
    if name == "Q2_K":
        new = _T.Q4_K if model.n_gqa >= 4 else _T.Q3_K
    elif name == "Q2_K_S" and model.n_gqa >= 4:
        new = _T.Q4_K
    elif name in ("IQ4_NL", "IQ4_XS") and model.n_gqa >= 4:
        new = _T.Q5_K
    elif (name in ("IQ3_XS", "IQ3_S") and model.n_gqa >= 4) or name == "IQ3_M":
        new = _T.Q4_K
    elif name == "IQ3_XXS":
        new = _T.Q4_K if model.n_gqa >= 4 else _T.IQ3_XXS if model.has_imatrix else _T.IQ3_S
    elif name == "Q3_K_M":
        new = _T.Q5_K if i < 2 else _T.Q4_K
    elif name == "Q3_K_L":
        new = _T.Q5_K
    elif name in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        new = _T.Q6_K
    elif name == "Q4_K_S" and i < 4:
        new = _T.Q5_K
    if model.is_70b and new in (_T.Q3_K, _T.Q4_K):  # the 70B rule: 8 heads share attn_v, so it is cheap
        new = _T.Q5_K
    return new


def _ffn_down_type(preset: Preset, i: int, n: int, model: Model) -> GGMLType:
    """``ffn_down`` of layer ``i`` of ``n``."""
    name = preset.name
    if name == "Q2_K":
        return _T.Q3_K
    if name == "Q2_K_S":
        return _T.Q4_K if i < n // 8 else _T.Q2_K
    if name == "IQ3_XXS" and not model.has_imatrix:
        return _T.Q4_K if i < n // 8 else _T.Q3_K
    if name == "Q3_K_M":
        return _T.Q5_K if i < n // 16 else _T.Q4_K
    if name == "Q3_K_L":
        return _T.Q5_K
    if name in ("Q4_K_M", "Q5_K_M") and use_more_bits(i, n):
        return _T.Q6_K
    if name in ("IQ4_NL", "IQ4_XS") and i < n // 8 and not model.has_imatrix:
        return _T.Q5_K  # without an imatrix the first eighth gets a K-quant
    if name == "IQ3_M" and i < n // 8:
        return _T.Q4_K
    if name == "Q4_K_S" and i < n // 8:
        return _T.Q5_K
    if name in ("Q4_0", "Q5_0") and model.has_imatrix and i < n // 8:
        return _T.Q4_1 if name == "Q4_0" else _T.Q5_1  # guards the first layers; only with an imatrix
    return preset.default_type


_ATTN_OUTPUT_TYPES = MappingProxyType({"Q2_K": _T.Q3_K, "Q3_K_M": _T.Q4_K, "Q3_K_L": _T.Q5_K, "IQ3_M": _T.Q4_K,
                                       "IQ3_XXS": _T.IQ3_S})
# attn_q and attn_k one step down: IQ3_XS to IQ3_XXS, IQ3_XXS to IQ2_S. IQ3_XS's ffn_gate/ffn_up outside the
# first and last eighth too.
_ATTN_QK_TYPES = MappingProxyType({"IQ3_XS": _T.IQ3_XXS, "IQ3_XXS": _T.IQ2_S})
_FFN_MIDDLE_TYPES = MappingProxyType({"IQ3_XS": _T.IQ3_XXS})


def mixture_type(preset: Preset, role: Role, i: int, n: int, ne0: int, model: Model) -> GGMLType:
    """The preset's type for a quantizable tensor, before the shape fallback (``llama_tensor_get_type_impl``).

    ``i``/``n``: for ``ATTN_V`` the running count of attn_v tensors seen and their total, for ``FFN_DOWN``,
    ``FFN_GATE`` and ``FFN_UP`` the running count of those tensors and ``n_layer``; in llama-quantize's sorted
    order the counts equal the layer index. ``ne0`` is the row length (``shape[-1]``). Only ``preset.default_type`` quantized is meaningful.
    """
    if role is Role.OUTPUT or (role is Role.TOKEN_EMBD and model.tied_embeddings):
        return _output_type(preset, ne0)
    if role is Role.TOKEN_EMBD:
        return _TOKEN_EMBD_TYPES.get(preset.name, preset.default_type)
    if preset.name in _LOW_BIT_PRESETS:
        return _low_bit_type(preset, role, i, n, model)
    if role is Role.ATTN_V:
        return _attn_v_type(preset, i, n, model)
    if role is Role.FFN_DOWN:
        return _ffn_down_type(preset, i, n, model)
    if role is Role.ATTN_OUTPUT:
        return _ATTN_OUTPUT_TYPES.get(preset.name, preset.default_type)
    if role in (Role.ATTN_Q, Role.ATTN_K):
        return _ATTN_QK_TYPES.get(preset.name, preset.default_type)
    if role in (Role.FFN_GATE, Role.FFN_UP) and n // 8 <= i < 7 * n // 8:
        return _FFN_MIDDLE_TYPES.get(preset.name, preset.default_type)
    return preset.default_type


def shape_fallback(target: GGMLType, ne0: int) -> GGMLType | None:
    """``tensor_type_fallback``: the type used when rows of ``ne0`` weights do not fit ``target``, else None.

    256-block K-quants go to their 32-block stand-in (``FALLBACK``); if even that does not fit, F16.
    """
    if ne0 % target.block_size == 0:
        return None
    fallback = FALLBACK.get(target, target)
    return fallback if ne0 % fallback.block_size == 0 else _T.F16


def requires_imatrix(preset: Preset, name: str, qtype: GGMLType) -> bool:
    """``tensor_requires_imatrix``: would llama-quantize refuse ``name`` as ``qtype`` in ``preset`` without an
    importance matrix (token_embd and output never need one)."""
    return name not in _IMATRIX_EXEMPT and (
        qtype in IMATRIX_REQUIRED_TYPES or qtype in IMATRIX_REQUIRED_IN_PRESET.get(preset.name, frozenset()))


@dataclass(frozen=True)
class TensorPlan:
    """One tensor's decision. ``fallback_from``: the type the rules chose before the shape fallback;
    ``override_from``: the type a ``tensor_types`` regex replaced; ``note``: why, for humans;
    ``requires_imatrix``: llama-quantize will not write this tensor without importance-matrix data for it."""

    name: str
    shape: tuple[int, ...]
    type: GGMLType
    fallback_from: GGMLType | None = None
    override_from: GGMLType | None = None
    note: str = ""
    requires_imatrix: bool = False

    @property
    def nbytes(self) -> int:
        return self.type.tensor_bytes(self.shape)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    def warning_lines(self) -> list[str]:
        """What llama-quantize logs for this tensor (manual override, then fallback), without newlines."""
        lines = []
        if self.override_from is not None:
            lines.append(f"llama_tensor_get_type: {self.name:<36} - applying manual override: "
                         f"{self.override_from.label} -> {(self.fallback_from or self.type).label}")
        if self.fallback_from is not None:
            wanted = self.fallback_from
            f16 = "(WARNING: must use F16 due to unusual shape) " if self.type == _T.F16 else ""
            lines.append(f"warning: {self.name:<36} - ncols {self.shape[-1]:>6} not divisible by "
                         f"{wanted.block_size:>3} (required for type {wanted.label:>7}) {f16}"
                         f"-> falling back to {self.type.label:>7}")
        return lines


@dataclass(frozen=True)
class Plan:
    """The per-tensor types of one quantization, in llama-quantize's tensor order. ``has_imatrix``: planned
    for an importance matrix (llama.cpp's has-imatrix rules)."""

    preset: Preset
    entries: tuple[TensorPlan, ...]
    has_imatrix: bool = False

    def __iter__(self) -> Iterator[TensorPlan]:
        return iter(self.entries)

    def __getitem__(self, name: str) -> TensorPlan:
        for entry in self.entries:
            if entry.name == name:
                return entry
        raise KeyError(name)

    def type_counts(self) -> dict[GGMLType, int]:
        """Number of tensors of each type (F32 norms and biases included), by type id."""
        return dict(sorted(Counter(e.type for e in self.entries).items()))

    def tensor_bytes(self) -> int:
        """Sum of tensor data sizes without alignment padding (llama-quantize's "quant size")."""
        return sum(e.nbytes for e in self.entries)

    def data_section_bytes(self, alignment: int = GGUF_DEFAULT_ALIGNMENT) -> int:
        """Bytes of the GGUF data section: every tensor padded to ``alignment``."""
        return sum(-(-e.nbytes // alignment) * alignment for e in self.entries)

    def n_elements(self) -> int:
        return sum(e.n_elements for e in self.entries)

    def bits_per_weight(self) -> float:
        """Tensor bits over all parameters, norms and biases included (llama-quantize's BPW)."""
        return self.tensor_bytes() * 8 / self.n_elements()

    def n_fallback(self) -> int:
        return sum(e.fallback_from is not None for e in self.entries)

    def imatrix_required(self) -> list[str]:
        """Names of the tensors llama-quantize refuses to quantize without importance-matrix data for them."""
        return [e.name for e in self.entries if e.requires_imatrix]

    def check_imatrix(self, covered: Collection[str] | None) -> None:
        """Refuse, as llama-quantize does, a plan whose low-bit tensors have no importance-matrix data.

        ``covered``: the tensor names the importance matrix has entries for; None when there is none.
        """
        missing = [n for n in self.imatrix_required() if covered is None or n not in covered]
        if not missing:
            return
        kinds = sorted({self[n].type.label for n in missing})
        if covered is None:
            raise QuantTypeError(
                f"preset {self.preset.name} needs an importance matrix: llama.cpp refuses to quantize "
                f"{len(missing)} tensor(s) ({missing[0]}, ...) to {', '.join(kinds)} without one, as the result "
                "would be garbage. Add --calib builtin (or another --calib SOURCE) to compute one, or --imatrix FILE to "
                "use a llama-imatrix file; --dry-run plans without one."
            )
        raise QuantTypeError(
            f"the importance matrix has no entry for {len(missing)} tensor(s) that preset {self.preset.name} "
            f"quantizes to {', '.join(kinds)} ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); "
            "llama.cpp refuses those without one. Use an imatrix computed for this model (--calib builtin "
            "computes one)."
        )

    def warnings(self) -> list[str]:
        """Exactly the warning lines llama-quantize logs for this plan, in its order, summary last."""
        lines = [line for e in self.entries for line in e.warning_lines()]
        if self.imatrix_required() and not self.has_imatrix:  # what its --dry-run says; a real run refuses
            lines.append("llama_model_quantize_impl: WARNING: dry run completed successfully, but actually "
                         "completing this quantization will require an imatrix!")
        if self.n_fallback():
            lines.append(f"llama_model_quantize_impl: WARNING: {self.n_fallback()} of {len(self.entries)} "
                         f"tensor(s) required fallback quantization")
        return lines

    def format_table(self) -> str:
        """A human ``--dry-run`` listing: one row per tensor, then type counts and totals."""
        rows = [f"{'tensor':<36} {'shape [out, in]':>16} {'type':>6} {'MiB':>9}  note"]
        for e in self.entries:
            shape = " x ".join(str(d) for d in e.shape)
            rows.append(f"{e.name:<36} {shape:>16} {e.type.label:>6} {e.nbytes / 2**20:>9.3f}  {e.note}")
        counts = ", ".join(f"{n}x {t.label}" for t, n in self.type_counts().items())
        total = self.tensor_bytes()
        rows += [
            "",
            f"preset {self.preset.name}: {len(self.entries)} tensors ({counts})",
            (f"tensor data {total / 2**20:.2f} MiB = {total / 1e9:.3f} GB, "
             f"{self.n_elements() / 1e9:.3f} B weights, {self.bits_per_weight():.2f} bits per weight"),
        ]
        if self.n_fallback():
            rows.append(f"{self.n_fallback()} of {len(self.entries)} tensor(s) required fallback quantization "
                        "(row length not a multiple of the type's block size); see the notes above")
        return "\n".join(rows)


@dataclass(frozen=True)
class _Options:
    """The user's overrides, parsed and compiled once."""

    pure: bool
    output_tensor_type: GGMLType | None
    token_embedding_type: GGMLType | None
    tensor_types: tuple[tuple[re.Pattern[str], GGMLType], ...]
    leave_output_tensor: bool
    source_type: GGMLType


@dataclass
class _Counters:
    """llama.cpp's running ``i_attention_wv`` / ``i_ffn_down`` / ``i_ffn_gate`` / ``i_ffn_up``: advanced only
    when the mixture rule runs."""

    attn_v: int = 0
    ffn_down: int = 0
    ffn_gate: int = 0
    ffn_up: int = 0


def _explicit_type(name: str, shape: tuple[int, ...], qtype: GGMLType, option: str) -> GGMLType:
    """An ``--output-tensor-type``/``--token-embedding-type``: llama.cpp applies it with no shape fallback."""
    if shape[-1] % qtype.block_size:
        raise QuantTypeError(
            f"{option} {qtype.label} cannot be used for {name}: its rows of {shape[-1]} weights are not a "
            f"multiple of {qtype.block_size}, and llama.cpp applies {option} without a fallback. Choose a type "
            f"with a block size dividing {shape[-1]} (e.g. q8_0, f16)."
        )
    return qtype


def _plan_one(
    name: str, shape: tuple[int, ...], preset: Preset, model: Model, counters: _Counters, n_attn_v: int,
    opts: _Options,
) -> TensorPlan:
    role = tensor_role(name)
    if not is_quantizable(name, shape, leave_output_tensor=opts.leave_output_tensor):
        source = _T.F32 if ggml_n_dims(shape) < 2 else opts.source_type
        return TensorPlan(name, shape, source, note="not quantized")
    if opts.token_embedding_type is not None and role is Role.TOKEN_EMBD:
        qtype = _explicit_type(name, shape, opts.token_embedding_type, "--token-embedding-type")
        return TensorPlan(name, shape, qtype, note="--token-embedding-type")
    if opts.output_tensor_type is not None and role is Role.OUTPUT:
        qtype = _explicit_type(name, shape, opts.output_tensor_type, "--output-tensor-type")
        return TensorPlan(name, shape, qtype, note="--output-tensor-type")
    if not preset.default_type.is_quantized:
        return TensorPlan(name, shape, preset.default_type)

    chosen, override_from, note = preset.default_type, None, ""
    manual = next((t for pattern, t in opts.tensor_types if pattern.search(name)), None)
    if manual is not None:
        override_from = chosen if manual != chosen else None
        chosen, note = manual, "--tensor-type"
    elif opts.pure:
        note = "--pure"
    else:
        chosen, note = _mixture_step(name, shape, role, preset, model, counters, n_attn_v, opts)
    fallback = shape_fallback(chosen, shape[-1])
    if fallback is None:
        return TensorPlan(name, shape, chosen, override_from=override_from, note=note,
                          requires_imatrix=requires_imatrix(preset, name, chosen))
    why = f"ncols {shape[-1]} not divisible by {chosen.block_size}: {chosen.label} -> {fallback.label}"
    return TensorPlan(name, shape, fallback, fallback_from=chosen, override_from=override_from,
                      note=f"{note}; {why}" if note else why,
                      requires_imatrix=requires_imatrix(preset, name, fallback))


def _mixture_step(
    name: str, shape: tuple[int, ...], role: Role, preset: Preset, model: Model, counters: _Counters,
    n_attn_v: int, opts: _Options,
) -> tuple[GGMLType, str]:
    """Run the mixture rule for one tensor, advancing llama.cpp's counters; returns (type, note)."""
    tied_embd = role is Role.TOKEN_EMBD and model.tied_embeddings
    if (role is Role.OUTPUT or tied_embd) and opts.output_tensor_type is not None:
        return opts.output_tensor_type, "tied: --output-tensor-type"
    if role is Role.ATTN_V:
        i, n = counters.attn_v, n_attn_v
        counters.attn_v += 1
    elif role is Role.FFN_DOWN:
        i, n = counters.ffn_down, model.n_layer
        counters.ffn_down += 1
    elif role is Role.FFN_GATE:
        i, n = counters.ffn_gate, model.n_layer
        counters.ffn_gate += 1
    elif role is Role.FFN_UP:
        i, n = counters.ffn_up, model.n_layer
        counters.ffn_up += 1
    else:
        i, n = 0, model.n_layer
    chosen = mixture_type(preset, role, i, n, shape[-1], model)
    if role is Role.OUTPUT or tied_embd:
        return chosen, "output (tied token_embd)" if tied_embd else "output"
    if chosen != preset.default_type:
        return chosen, f"{role.value} rule"
    return chosen, ""


def _compile(tensor_types: Sequence[tuple[str, GGMLType | str]]) -> tuple[tuple[re.Pattern[str], GGMLType], ...]:
    compiled = []
    for pattern, qtype in tensor_types:
        try:
            compiled.append((re.compile(pattern), parse_type(qtype)))
        except re.error as e:
            raise QuantTypeError(f"--tensor-type pattern {pattern!r} is not a valid regular expression: {e}") from e
    return tuple(compiled)


def plan_tensors(
    tensors: Sequence[tuple[str, tuple[int, ...]]],
    preset: str | Preset,
    *,
    n_layer: int,
    n_head: int,
    n_head_kv: int,
    pure: bool = False,
    output_tensor_type: GGMLType | str | None = None,
    token_embedding_type: GGMLType | str | None = None,
    tensor_types: Sequence[tuple[str, GGMLType | str]] = (),
    has_imatrix: bool = False,
    leave_output_tensor: bool = False,
    source_type: GGMLType = GGMLType.BF16,
) -> Plan:
    """Choose every tensor's type as ``llama-quantize`` would for a dense Qwen2 model.

    ``tensors``: GGUF names and numpy shapes, in llama-quantize's order (``qconvert.family.tensor_shapes``
    gives it; the order matters because attn_v/ffn_down rules use running counters). ``tensor_types``:
    ``(regex, type)`` pairs, first ``re.search`` match wins, then the shape fallback still applies.
    ``source_type``: type of the matrices in the unquantized GGUF llama-quantize would read (convert's outtype;
    BF16 for Qwen2.5), kept by tensors that are not quantized (``leave_output_tensor``).
    """
    preset = preset if isinstance(preset, Preset) else get_preset(preset)
    opts = _Options(
        pure=pure,
        output_tensor_type=None if output_tensor_type is None else parse_type(output_tensor_type),
        token_embedding_type=None if token_embedding_type is None else parse_type(token_embedding_type),
        tensor_types=_compile(tensor_types),
        leave_output_tensor=leave_output_tensor,
        source_type=source_type,
    )
    names = [name for name, _ in tensors]
    model = Model(n_layer, n_head, n_head_kv, tied_embeddings="output.weight" not in names, has_imatrix=has_imatrix)
    n_attn_v = sum(tensor_role(name) is Role.ATTN_V for name in names)
    counters = _Counters()
    entries = tuple(_plan_one(name, tuple(shape), preset, model, counters, n_attn_v, opts)
                    for name, shape in tensors)
    return Plan(preset, entries, has_imatrix)


def plan_for_config(config: dict[str, Any], preset: str | Preset, **options: Any) -> Plan:
    """``plan_tensors`` for a Qwen2 ``config.json`` dict (no checkpoint needed): shapes from the config."""
    from qconvert.family import tensor_shapes

    return plan_tensors(tensor_shapes(config), preset, n_layer=int(config["num_hidden_layers"]),
                        n_head=int(config["num_attention_heads"]),
                        n_head_kv=int(config["num_key_value_heads"]), **options)
