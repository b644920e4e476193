"""The one validating GGUF reader: metadata and tensor infos eagerly, tensor bytes on demand.

Every GGUF qconvert hands to llama.cpp passes ``read_gguf`` first. llama.cpp's container parser refuses most bad
files cleanly, but its model loader ``GGML_ASSERT``s on some (``block_count = 0``, duplicate vocabulary tokens)
and an assert aborts the whole process. So the reader refuses, with a ``CheckpointError`` that names the problem:
counts and lengths larger than what is left of the file (so nothing larger than the file is ever allocated),
unknown or nested value types, a bad ``general.alignment``, unknown tensor types, impossible shapes, tensors that
are misaligned, overlap or lie outside the file, and, for an architecture of ``qconvert.registry``, hyper-parameters
and a vocabulary that llama.cpp would assert on.
"""

from __future__ import annotations

import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from qconvert.constants import (
    GGML_MAX_DIMS,
    GGML_MAX_NAME,
    GGUF_DEFAULT_ALIGNMENT,
    GGUF_MAGIC,
    GGUF_MAX_ARRAY_ELEMENTS,
    GGUF_MAX_STRING_LENGTH,
    INT64_MAX,
    LLAMA_MAX_LAYERS,
    GGMLType,
    ValueType,
)
from qconvert.errors import CheckpointError
from qconvert.gguf.writer import SCALAR_FORMATS, TensorInfo
from qconvert.registry import REGISTRY, ArchSpec

FIX = "Re-create the file (qconvert gguf) or re-download it."
KV_MIN_BYTES = 8 + 1 + 4 + 1  # key length, a 1-byte key, value type, the smallest value
TENSOR_INFO_MIN_BYTES = 8 + 1 + 4 + 8 + 4 + 8  # name length, a 1-byte name, n_dims, one dim, type, offset
INTEGER_TYPES = frozenset({ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16, ValueType.UINT32,
                           ValueType.INT32, ValueType.UINT64, ValueType.INT64})
BLOCK_NAME = re.compile(r"blk\.(\d+)\.")


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]  # key -> python value, in file order
    value_types: dict[str, ValueType]
    tensors: dict[str, TensorInfo]  # name -> info, in file order; offsets relative to data_start
    data_start: int
    elem_types: dict[str, ValueType] = field(default_factory=dict)  # array key -> its element type

    def read_tensor_bytes(self, name: str) -> np.ndarray:
        """The raw encoded bytes of one tensor (uint8)."""
        t = self.tensors[name]
        with self.path.open("rb") as f:
            f.seek(self.data_start + t.offset)
            return np.frombuffer(f.read(t.nbytes), dtype=np.uint8)


def _corrupt(path: Path, problem: str) -> CheckpointError:
    return CheckpointError(f"{path}: {problem}; the GGUF file is corrupt. {FIX}")


class _Cursor:
    """Reads the header front to back; every declared count is checked against the bytes left before use."""

    def __init__(self, f: BinaryIO, path: Path, size: int) -> None:
        self.f, self.path, self.size = f, path, size

    def left(self) -> int:
        return self.size - self.f.tell()

    def need(self, what: str, count: int, bytes_each: int) -> int:
        """``count`` after checking that ``count`` items of at least ``bytes_each`` bytes fit in the file."""
        if count * bytes_each > self.left():
            raise CheckpointError(
                f"{self.path}: {what} is {count}, which needs at least {count * bytes_each} bytes, but only "
                f"{self.left()} bytes are left in the file: it is truncated or corrupt. {FIX}")
        return count

    def raw(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CheckpointError(f"{self.path}: GGUF header ends early; the file is truncated. {FIX}")
        return data

    def take(self, fmt: str) -> Any:
        return struct.unpack(fmt, self.raw(struct.calcsize(fmt)))[0]

    def string(self, what: str) -> str:
        n = self.take("<Q")
        if n > GGUF_MAX_STRING_LENGTH:
            raise _corrupt(self.path, f"{what} has a length of {n} bytes, over llama.cpp's limit of 2^30")
        return self.raw(self.need(f"the length of {what}", n, 1)).decode("utf-8", errors="replace")

    def value_type(self, key: str, what: str) -> ValueType:
        code = self.take("<I")
        try:
            return ValueType(code)
        except ValueError:
            raise _corrupt(self.path, f"metadata key {key!r} has an unknown {what} {code} "
                                      f"(GGUF defines 0..{max(ValueType)})") from None

    def value(self, key: str, vtype: ValueType) -> tuple[Any, ValueType | None]:
        """(value, element type for arrays else None)."""
        if vtype == ValueType.STRING:
            return self.string(f"the value of {key!r}"), None
        if vtype != ValueType.ARRAY:
            return self.take(SCALAR_FORMATS[vtype]), None
        elem = self.value_type(key, "array element type")
        if elem == ValueType.ARRAY:
            raise _corrupt(self.path, f"metadata key {key!r} is an array of arrays, which GGUF does not allow")
        n = self.take("<Q")
        if n > GGUF_MAX_ARRAY_ELEMENTS:
            raise _corrupt(self.path, f"metadata array {key!r} declares {n} elements, over llama.cpp's limit of 2^30")
        if elem == ValueType.STRING:
            self.need(f"the length of array {key!r}", n, 8)
            return [self.string(f"element {i} of {key!r}") for i in range(n)], elem
        dtype = np.dtype(SCALAR_FORMATS[elem])
        raw = self.raw(self.need(f"the length of array {key!r}", n, dtype.itemsize) * dtype.itemsize)
        return np.frombuffer(raw, dtype=dtype).tolist(), elem


def read_gguf(path: Path) -> GGUFFile:
    """Parse and validate header, metadata and tensor infos; raise ``CheckpointError`` on anything llama.cpp
    would refuse or assert on. Allocates at most a small multiple of the file's size."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        cur = _Cursor(f, path, size)
        if size < 24 or cur.take("<I") != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (bad magic); check the path or re-create the file.")
        version = cur.take("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3 expected). {FIX}")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        cur.need("the tensor count", n_tensors, TENSOR_INFO_MIN_BYTES)
        metadata, vtypes, etypes = _read_metadata(cur, cur.need("the metadata key count", n_kv, KV_MIN_BYTES))
        align = _alignment(path, metadata, vtypes)
        tensors = _read_tensor_infos(cur, n_tensors)
        here = f.tell()
    data_start = here + (align - here % align) % align
    _check_placement(path, tensors, data_start, align, size)
    g = GGUFFile(path, version, metadata, vtypes, tensors, data_start, etypes)
    _check_vocab(g)
    spec = next((s for s in REGISTRY.values() if s.gguf_arch == metadata.get("general.architecture")), None)
    if spec is not None:
        _check_hparams(g, spec)
    return g


def _read_metadata(cur: _Cursor, n_kv: int) -> tuple[dict[str, Any], dict[str, ValueType], dict[str, ValueType]]:
    metadata: dict[str, Any] = {}
    vtypes: dict[str, ValueType] = {}
    etypes: dict[str, ValueType] = {}
    for i in range(n_kv):
        key = cur.string(f"metadata key {i}")
        if not key:
            raise _corrupt(cur.path, f"metadata key {i} is empty")
        if key in metadata:
            raise _corrupt(cur.path, f"metadata key {key!r} appears twice")
        vtypes[key] = cur.value_type(key, "value type")
        metadata[key], elem = cur.value(key, vtypes[key])
        if elem is not None:
            etypes[key] = elem
    return metadata, vtypes, etypes


def _alignment(path: Path, metadata: dict[str, Any], vtypes: dict[str, ValueType]) -> int:
    """``general.alignment``: a uint32 power of two (gguf.cpp's rule), 32 when absent."""
    if "general.alignment" not in metadata:
        return GGUF_DEFAULT_ALIGNMENT
    align = metadata["general.alignment"]
    if vtypes["general.alignment"] != ValueType.UINT32:
        raise _corrupt(path, f"general.alignment is a {vtypes['general.alignment'].name} ({align!r}); "
                             "GGUF requires a uint32 power of two")
    if align <= 0 or align & (align - 1):
        raise _corrupt(path, f"general.alignment is {align}, not a power of two")
    return int(align)


def _read_tensor_infos(cur: _Cursor, n_tensors: int) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for i in range(n_tensors):
        name = cur.string(f"the name of tensor {i}")
        if not name or len(name.encode()) >= GGML_MAX_NAME or name in tensors:
            problem = "is empty" if not name else "appears twice" if name in tensors else \
                f"is {len(name.encode())} bytes long; llama.cpp allows at most {GGML_MAX_NAME - 1}"
            raise _corrupt(cur.path, f"the name of tensor {i} ({name!r}) {problem}")
        n_dims = cur.take("<I")
        if not 1 <= n_dims <= GGML_MAX_DIMS:
            raise _corrupt(cur.path, f"tensor {name!r} has {n_dims} dimensions; ggml allows 1 to {GGML_MAX_DIMS}")
        ne = [cur.take("<Q") for _ in range(n_dims)]
        code = cur.take("<I")
        try:
            gtype = GGMLType(code)
        except ValueError:
            raise _corrupt(cur.path, f"tensor {name!r} has ggml type {code}, which qconvert does not know "
                                     f"(known: {', '.join(t.name for t in GGMLType)})") from None
        _check_shape(cur.path, name, ne, gtype)
        tensors[name] = TensorInfo(name, tuple(ne[::-1]), gtype, cur.take("<Q"))
    return tensors


def _check_shape(path: Path, name: str, ne: list[int], gtype: GGMLType) -> None:
    """ne = GGUF's dims, fastest first: each in 1..INT64_MAX, their product too, rows of whole blocks."""
    count = 1
    for d in ne:
        if not 1 <= d <= INT64_MAX:
            raise _corrupt(path, f"tensor {name!r} has a dimension of {d} (shape {ne}); every dimension must be >= 1")
        count *= d
    if count > INT64_MAX:
        raise _corrupt(path, f"tensor {name!r} has shape {ne}, whose element count {count} overflows int64")
    if ne[0] % gtype.block_size:
        raise _corrupt(path, f"tensor {name!r} has rows of {ne[0]} weights, not a multiple of {gtype.name}'s "
                             f"block size {gtype.block_size}")


def _check_placement(path: Path, tensors: dict[str, TensorInfo], data_start: int, align: int, size: int) -> None:
    """Each tensor's data is aligned, inside the file, and overlaps no other tensor."""
    for t in tensors.values():
        if t.offset % align:
            raise _corrupt(path, f"tensor {t.name!r} starts at data offset {t.offset}, not a multiple of the "
                                 f"alignment {align}")
        if data_start + t.offset + t.nbytes > size:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} ends past the end of the file ({size} bytes): the file is truncated "
                f"or its tensor offset {t.offset} is corrupt. {FIX}")
    ordered = sorted(tensors.values(), key=lambda t: t.offset)
    for a, b in pairwise(ordered):
        if a.offset + a.nbytes > b.offset:
            raise _corrupt(path, f"tensors {a.name!r} and {b.name!r} overlap (data offsets {a.offset} + "
                                 f"{a.nbytes} bytes > {b.offset})")


def _check_vocab(g: GGUFFile) -> None:
    """The arrays llama.cpp's vocabulary loader indexes without bounds checks, or asserts on."""
    md = g.metadata
    if "tokenizer.ggml.tokens" not in md:
        return
    tokens = md["tokenizer.ggml.tokens"]
    if g.elem_types.get("tokenizer.ggml.tokens") != ValueType.STRING:
        raise _corrupt(g.path, "tokenizer.ggml.tokens is not an array of strings")
    if len(set(tokens)) != len(tokens):
        dup = next(t for t, n in Counter(tokens).items() if n > 1)
        raise _corrupt(g.path, f"tokenizer.ggml.tokens holds {dup!r} twice (llama.cpp asserts on duplicate tokens)")
    wanted = {"tokenizer.ggml.scores": (ValueType.FLOAT32, ValueType.INT32),
              "tokenizer.ggml.token_type": (ValueType.INT32,)}
    for key, elems in wanted.items():
        if key in md and (g.elem_types.get(key) not in elems or len(md[key]) < len(tokens)):
            got = f"{len(md[key])} x {g.elem_types[key].name}" if key in g.elem_types else g.value_types[key].name
            raise _corrupt(g.path, f"{key} holds {got}; llama.cpp reads one {' or '.join(e.name for e in elems)} "
                                   f"per token ({len(tokens)})")


def _hparam(g: GGUFFile, key: str) -> list[int]:
    """A positive integer hyper-parameter (or llama.cpp's per-layer array of them), as a list."""
    value = g.metadata[key]
    elem = g.elem_types.get(key, g.value_types[key])
    values = value if isinstance(value, list) else [value]
    if elem not in INTEGER_TYPES or not values or any(v <= 0 for v in values):
        raise _corrupt(g.path, f"{key} is {value!r} ({elem.name}); it must be a positive integer")
    return [int(v) for v in values]


def _check_hparams(g: GGUFFile, spec: ArchSpec) -> None:
    """The hyper-parameters llama.cpp's loader asserts on or divides by, for an architecture qconvert knows.

    A missing key is left to llama.cpp, which refuses it cleanly ("key not found"); a present one must be sane.
    """
    arch = spec.gguf_arch
    ints = {suffix: _hparam(g, f"{arch}.{suffix}") for suffix, _ in spec.hparam_keys
            if suffix not in spec.float_hparams and f"{arch}.{suffix}" in g.metadata}
    n_layers = ints.get("block_count", [1])
    n_layer = n_layers[0]
    if len(n_layers) != 1 or n_layer > LLAMA_MAX_LAYERS:
        raise _corrupt(g.path, f"{arch}.block_count is {g.metadata[f'{arch}.block_count']!r}; llama.cpp needs one "
                               f"integer from 1 to {LLAMA_MAX_LAYERS}")
    blocks = {int(m[1]) for name in g.tensors if (m := BLOCK_NAME.match(name))}
    if blocks and blocks != set(range(n_layer)):
        raise _corrupt(g.path, f"{arch}.block_count is {n_layer}, but the file holds tensors of blocks "
                               f"{min(blocks)}..{max(blocks)} ({len(blocks)} blocks)")
    n_embd = ints.get("embedding_length", [1])[0]
    heads, kv_heads = ints.get("attention.head_count", [1]), ints.get("attention.head_count_kv", [1])
    # per layer when both are per-layer arrays, else every combination (a scalar applies to all layers)
    same = len(heads) == len(kv_heads)
    for h, kv in zip(heads, kv_heads) if same else ((h, kv) for h in heads for kv in kv_heads):
        if n_embd % h:
            raise _corrupt(g.path, f"{arch}.embedding_length {n_embd} is not divisible by "
                                   f"{arch}.attention.head_count {h}")
        if h % kv:
            raise _corrupt(g.path, f"{arch}.attention.head_count {h} is not divisible by "
                                   f"{arch}.attention.head_count_kv {kv}")
