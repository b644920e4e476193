"""Format facts, spelled once: ggml tensor types, their block layouts, llama.cpp file types, GGUF value types.

Sources: llama.cpp ``ggml/include/ggml.h`` (type ids), ``ggml/src/ggml-common.h`` (block structs),
``include/llama.h`` (``llama_ftype``), ``ggml/src/gguf.cpp`` (container). Block byte sizes are written as the
sum of their struct fields so they can be checked against the C headers by eye.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from types import MappingProxyType

GGUF_MAGIC = 0x46554747  # b"GGUF" little-endian
GGUF_VERSION = 3
GGUF_DEFAULT_ALIGNMENT = 32
GGML_QUANT_VERSION = 2  # general.quantization_version written by llama.cpp since 2023
QK_K = 256  # super-block size of the K-quants


class GGMLType(enum.IntEnum):
    """ggml tensor type ids (ggml.h ``enum ggml_type``); only the ones qconvert reads or writes."""

    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q5_0 = 6
    Q5_1 = 7
    Q8_0 = 8
    Q2_K = 10
    Q3_K = 11
    Q4_K = 12
    Q5_K = 13
    Q6_K = 14
    IQ2_XXS = 16
    IQ2_XS = 17
    IQ3_XXS = 18
    IQ1_S = 19
    IQ4_NL = 20
    IQ3_S = 21
    IQ2_S = 22
    IQ4_XS = 23
    IQ1_M = 29
    BF16 = 30

    @property
    def block_size(self) -> int:
        """Weights per block along a row (``ggml_blck_size``)."""
        return TYPE_LAYOUT[self].block_size

    @property
    def block_bytes(self) -> int:
        """Bytes per block (``ggml_type_size``)."""
        return TYPE_LAYOUT[self].block_bytes

    @property
    def is_quantized(self) -> bool:
        return self not in (GGMLType.F32, GGMLType.F16, GGMLType.BF16)

    def row_bytes(self, n: int) -> int:
        """Bytes of one row of ``n`` weights (``ggml_row_size``); ``n`` must be a multiple of the block size."""
        if n % self.block_size:
            raise ValueError(f"{self.name}: row length {n} is not a multiple of its block size {self.block_size}")
        return n // self.block_size * self.block_bytes

    def tensor_bytes(self, shape: tuple[int, ...]) -> int:
        """Bytes of a tensor with numpy ``shape`` (rows run along the last axis)."""
        rows = 1
        for d in shape[:-1]:
            rows *= d
        return rows * self.row_bytes(shape[-1])

    @property
    def label(self) -> str:
        """The lower-case name llama.cpp prints (``q5_K``, ``bf16``)."""
        return self.name.lower().replace("_k", "_K")


@dataclass(frozen=True)
class Layout:
    block_size: int
    block_bytes: int


F16_BYTES = 2
# One entry per type: weights per block and bytes per block as the sum of the C struct's fields.
TYPE_LAYOUT: MappingProxyType[GGMLType, Layout] = MappingProxyType({
    GGMLType.F32: Layout(1, 4),
    GGMLType.F16: Layout(1, 2),
    GGMLType.BF16: Layout(1, 2),
    GGMLType.Q4_0: Layout(32, F16_BYTES + 16),  # d, qs[16]
    GGMLType.Q4_1: Layout(32, 2 * F16_BYTES + 16),  # d, m, qs[16]
    GGMLType.Q5_0: Layout(32, F16_BYTES + 4 + 16),  # d, qh u32, qs[16]
    GGMLType.Q5_1: Layout(32, 2 * F16_BYTES + 4 + 16),  # d, m, qh u32, qs[16]
    GGMLType.Q8_0: Layout(32, F16_BYTES + 32),  # d, qs int8[32]
    GGMLType.Q2_K: Layout(QK_K, QK_K // 16 + QK_K // 4 + 2 * F16_BYTES),  # scales, qs, d, dmin
    GGMLType.Q3_K: Layout(QK_K, QK_K // 8 + QK_K // 4 + 12 + F16_BYTES),  # hmask, qs, scales, d
    GGMLType.Q4_K: Layout(QK_K, 2 * F16_BYTES + 12 + QK_K // 2),  # d, dmin, scales, qs
    GGMLType.Q5_K: Layout(QK_K, 2 * F16_BYTES + 12 + QK_K // 8 + QK_K // 2),  # d, dmin, scales, qh, qs
    GGMLType.Q6_K: Layout(QK_K, QK_K // 2 + QK_K // 4 + QK_K // 16 + F16_BYTES),  # ql, qh, scales, d
    GGMLType.IQ2_XXS: Layout(QK_K, F16_BYTES + QK_K // 4),  # d, u32[16]: grid indices, signs + scales
    GGMLType.IQ2_XS: Layout(QK_K, F16_BYTES + QK_K // 4 + QK_K // 32),  # d, u16[32] (index | signs << 9), scales
    GGMLType.IQ3_XXS: Layout(QK_K, F16_BYTES + QK_K // 4 + QK_K // 8),  # d, grid indices, scales+signs u32[8]
    GGMLType.IQ1_S: Layout(QK_K, F16_BYTES + QK_K // 8 + QK_K // 16),  # d, qs[32], qh u16[8]
    GGMLType.IQ4_NL: Layout(32, F16_BYTES + 16),  # d, qs[16] (indices into IQ4_NL_VALUES)
    GGMLType.IQ3_S: Layout(QK_K, F16_BYTES + QK_K // 4 + QK_K // 32 + QK_K // 8 + QK_K // 64),  # d, qs, qh, signs, scales
    GGMLType.IQ2_S: Layout(QK_K, F16_BYTES + QK_K // 4 + QK_K // 32 + QK_K // 32),  # d, qs+signs, qh, scales
    GGMLType.IQ1_M: Layout(QK_K, QK_K // 8 + QK_K // 16 + QK_K // 32),  # qs[32], qh[16], scales u16[4] (+ d)
    GGMLType.IQ4_XS: Layout(QK_K, F16_BYTES + 2 + QK_K // 64 + QK_K // 2),  # d, scales_h u16, scales_l, qs
})

# The 16 non-linear levels of IQ4_NL / IQ4_XS (ggml-common.h ``kvalues_iq4nl``; gguf-py's ``IQ4_NL.kvalues``).
IQ4_NL_VALUES: tuple[int, ...] = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)


class FileType(enum.IntEnum):
    """llama.cpp ``enum llama_ftype`` values written to ``general.file_type``."""

    ALL_F32 = 0
    MOSTLY_F16 = 1
    MOSTLY_Q4_0 = 2
    MOSTLY_Q4_1 = 3
    MOSTLY_Q8_0 = 7
    MOSTLY_Q5_0 = 8
    MOSTLY_Q5_1 = 9
    MOSTLY_Q2_K = 10
    MOSTLY_Q3_K_S = 11
    MOSTLY_Q3_K_M = 12
    MOSTLY_Q3_K_L = 13
    MOSTLY_Q4_K_S = 14
    MOSTLY_Q4_K_M = 15
    MOSTLY_Q5_K_S = 16
    MOSTLY_Q5_K_M = 17
    MOSTLY_Q6_K = 18
    MOSTLY_IQ2_XXS = 19
    MOSTLY_IQ2_XS = 20
    MOSTLY_Q2_K_S = 21
    MOSTLY_IQ3_XS = 22
    MOSTLY_IQ3_XXS = 23
    MOSTLY_IQ1_S = 24
    MOSTLY_IQ4_NL = 25
    MOSTLY_IQ3_S = 26
    MOSTLY_IQ3_M = 27
    MOSTLY_IQ2_S = 28
    MOSTLY_IQ2_M = 29
    MOSTLY_IQ4_XS = 30
    MOSTLY_IQ1_M = 31
    MOSTLY_BF16 = 32


class ValueType(enum.IntEnum):
    """GGUF metadata value types (``enum gguf_type``)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


class TokenType(enum.IntEnum):
    """``llama_token_type`` values stored in ``tokenizer.ggml.token_type``."""

    NORMAL = 1
    UNKNOWN = 2
    CONTROL = 3
    USER_DEFINED = 4
    UNUSED = 5
    BYTE = 6

# Container and loader limits llama.cpp enforces (gguf.cpp, ggml.h, llama-hparams.h): a file past them is refused
# by gguf_init (a clean error) or trips a GGML_ASSERT in the model loader (an abort), so qconvert checks them first.
GGML_MAX_DIMS = 4  # tensor ranks 1..4
GGML_MAX_NAME = 64  # tensor names hold at most 63 bytes
GGUF_MAX_STRING_LENGTH = 1 << 30  # bytes
GGUF_MAX_ARRAY_ELEMENTS = 1 << 30
LLAMA_MAX_LAYERS = 512  # block_count must lie in 1..512 (GGML_ASSERT in llama_model::load_hparams)
INT64_MAX = (1 << 63) - 1  # ggml's ne[] and element counts are int64

# The held-out guard of GPTQ/AWQ (qconvert.int4.guard): the fraction of calibration windows held out (at least
# one), and the most that may be (more leaves the algorithm fewer tokens than it is judged on).
DEFAULT_HOLDOUT = 0.25
MAX_HOLDOUT = 0.5
