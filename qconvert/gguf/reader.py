"""A small validating GGUF reader: metadata and tensor infos eagerly, tensor bytes on demand."""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from qconvert.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGMLType, ValueType
from qconvert.errors import CheckpointError
from qconvert.gguf.writer import SCALAR_FORMATS, TensorInfo


@dataclass(frozen=True)
class GGUFFile:
    path: Path
    version: int
    metadata: dict[str, Any]  # key -> python value, in file order
    value_types: dict[str, ValueType]
    tensors: dict[str, TensorInfo]  # name -> info, in file order; offsets relative to data_start
    data_start: int

    def read_tensor_bytes(self, name: str) -> np.ndarray:
        """The raw encoded bytes of one tensor (uint8)."""
        t = self.tensors[name]
        with self.path.open("rb") as f:
            f.seek(self.data_start + t.offset)
            return np.frombuffer(f.read(t.nbytes), dtype=np.uint8)


class _Cursor:
    def __init__(self, f: BinaryIO, path: Path) -> None:
        self.f, self.path = f, path

    def take(self, fmt: str) -> Any:
        n = struct.calcsize(fmt)
        raw = self.f.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{self.path}: GGUF header ends early; the file is truncated. Re-create or re-download it.")
        return struct.unpack(fmt, raw)[0]

    def string(self) -> str:
        n = self.take("<Q")
        if n > 1 << 30:
            raise CheckpointError(f"{self.path}: GGUF string length {n} is absurd; the file is corrupt.")
        raw = self.f.read(n)
        if len(raw) != n:
            raise CheckpointError(f"{self.path}: GGUF header ends early; the file is truncated.")
        return raw.decode("utf-8", errors="replace")

    def value(self, vtype: ValueType) -> Any:
        if vtype == ValueType.STRING:
            return self.string()
        if vtype == ValueType.ARRAY:
            elem, n = ValueType(self.take("<I")), self.take("<Q")
            if elem == ValueType.STRING:
                return [self.string() for _ in range(n)]
            dtype = np.dtype(SCALAR_FORMATS[elem])
            raw = self.f.read(n * dtype.itemsize)
            if len(raw) != n * dtype.itemsize:
                raise CheckpointError(f"{self.path}: GGUF header ends early; the file is truncated.")
            return np.frombuffer(raw, dtype=dtype).tolist()
        return self.take(SCALAR_FORMATS[vtype])


def read_gguf(path: Path) -> GGUFFile:
    """Parse header, metadata and tensor infos; check that every tensor lies inside the file."""
    path = Path(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        cur = _Cursor(f, path)
        if size < 24 or cur.take("<I") != GGUF_MAGIC:
            raise CheckpointError(f"{path}: not a GGUF file (bad magic); check the path or re-create the file.")
        version = cur.take("<I")
        if version not in (2, 3):
            raise CheckpointError(f"{path}: GGUF version {version} is not supported (2 or 3 expected).")
        n_tensors, n_kv = cur.take("<Q"), cur.take("<Q")
        metadata, vtypes = {}, {}
        for _ in range(n_kv):
            key = cur.string()
            try:
                vtype = ValueType(cur.take("<I"))
            except ValueError:
                raise CheckpointError(f"{path}: metadata key {key!r} has an unknown value type; the file is corrupt.")
            metadata[key], vtypes[key] = cur.value(vtype), vtype
        tensors = {}
        for _ in range(n_tensors):
            name = cur.string()
            ne = [cur.take("<Q") for _ in range(cur.take("<I"))]
            try:
                gtype = GGMLType(cur.take("<I"))
            except ValueError as e:
                raise CheckpointError(f"{path}: tensor {name!r} has a ggml type qconvert does not know ({e}).")
            tensors[name] = TensorInfo(name, tuple(ne[::-1]), gtype, cur.take("<Q"))
        align = int(metadata.get("general.alignment", GGUF_DEFAULT_ALIGNMENT))
        here = f.tell()
        data_start = here + (align - here % align) % align
    for t in tensors.values():
        if data_start + t.offset + t.nbytes > size:
            raise CheckpointError(
                f"{path}: tensor {t.name!r} ends past the end of the file ({size} bytes): the file is truncated. "
                "Re-create or re-download it."
            )
    return GGUFFile(path, version, metadata, vtypes, tensors, data_start)
