"""A strict, streaming GGUF v3 writer.

States: collect metadata and tensor infos -> ``write_header`` -> ``write_tensor`` once per tensor, in the order
declared -> ``close``. Every check (duplicate keys or tensors, wrong value types, shapes that do not fit the
type's block size, wrong byte counts, out-of-order calls) happens before the bytes it concerns are written.
Tensor data is streamed: the writer never holds more than the tensor being written.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from qconvert.constants import GGUF_DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUF_VERSION, GGMLType, ValueType

SCALAR_FORMATS = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}


class State(enum.Enum):
    COLLECTING = 1
    HEADER_WRITTEN = 2
    CLOSED = 3


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as GGUF records it: numpy ``shape`` (GGUF stores it reversed as ``ne``), type, data offset."""

    name: str
    shape: tuple[int, ...]
    type: GGMLType
    offset: int

    @property
    def nbytes(self) -> int:
        return self.type.tensor_bytes(self.shape)


def _pad(n: int, align: int) -> int:
    return (align - n % align) % align


def _encode_string(s: str) -> bytes:
    raw = s.encode("utf-8")
    return struct.pack("<Q", len(raw)) + raw


def encode_value(vtype: ValueType, value: object, elem_type: ValueType | None = None) -> bytes:
    """Bytes of one metadata value (without its type tag); arrays carry their element type and length."""
    if vtype == ValueType.STRING:
        if not isinstance(value, str):
            raise TypeError(f"GGUF string value expected, got {type(value).__name__}")
        return _encode_string(value)
    if vtype == ValueType.ARRAY:
        if elem_type is None or elem_type == ValueType.ARRAY:
            raise TypeError("GGUF arrays need a scalar or string element type")
        items = list(value)  # type: ignore[call-overload]
        head = struct.pack("<IQ", elem_type, len(items))
        if elem_type == ValueType.STRING:
            return head + b"".join(_encode_string(s) for s in items)
        return head + np.asarray(items, dtype=np.dtype(SCALAR_FORMATS[elem_type])).tobytes()
    return struct.pack(SCALAR_FORMATS[vtype], value)


class GGUFWriter:
    """Writes one GGUF file to ``path`` (callers pass a temporary path; see ``qconvert.io.atomic``)."""

    def __init__(self, path: Path, alignment: int = GGUF_DEFAULT_ALIGNMENT) -> None:
        self.path = Path(path)
        self.alignment = alignment
        self.kv: dict[str, bytes] = {}  # key -> type tag + encoded value, in insertion order
        self.tensors: dict[str, TensorInfo] = {}
        self._data_bytes = 0
        self._state = State.COLLECTING
        self._next = 0  # index of the next tensor write_tensor expects
        self._file: BinaryIO | None = None

    def _expect(self, state: State, action: str) -> None:
        if self._state != state:
            raise RuntimeError(f"GGUFWriter: cannot {action} in state {self._state.name} (expected {state.name})")

    def add(self, key: str, vtype: ValueType, value: object, elem_type: ValueType | None = None) -> None:
        """Add one metadata key; keys are written in the order they are added."""
        self._expect(State.COLLECTING, f"add key {key!r}")
        if key in self.kv:
            raise ValueError(f"GGUFWriter: duplicate metadata key {key!r}")
        self.kv[key] = struct.pack("<I", vtype) + encode_value(vtype, value, elem_type)

    def add_tensor_info(self, name: str, shape: tuple[int, ...], ggml_type: GGMLType) -> TensorInfo:
        """Declare a tensor; its data must later be written with ``write_tensor`` in declaration order."""
        self._expect(State.COLLECTING, f"add tensor {name!r}")
        if name in self.tensors:
            raise ValueError(f"GGUFWriter: duplicate tensor name {name!r}")
        if not shape or any(d <= 0 for d in shape):
            raise ValueError(f"GGUFWriter: tensor {name!r} has an invalid shape {shape}")
        info = TensorInfo(name, tuple(int(d) for d in shape), GGMLType(ggml_type), self._data_bytes)
        nbytes = info.nbytes  # raises if the row length is not a multiple of the type's block size
        self.tensors[name] = info
        self._data_bytes += nbytes + _pad(nbytes, self.alignment)
        return info

    def header_bytes(self) -> bytes:
        """Header, metadata and tensor infos, padded so the data section starts aligned."""
        parts = [struct.pack("<IIQQ", GGUF_MAGIC, GGUF_VERSION, len(self.tensors), len(self.kv))]
        parts += [_encode_string(k) + v for k, v in self.kv.items()]
        for t in self.tensors.values():
            ne = t.shape[::-1]
            parts.append(_encode_string(t.name) + struct.pack(f"<I{len(ne)}QIQ", len(ne), *ne, t.type, t.offset))
        head = b"".join(parts)
        return head + bytes(_pad(len(head), self.alignment))

    def write_header(self) -> None:
        self._expect(State.COLLECTING, "write the header")
        self._file = open(self.path, "wb")  # noqa: SIM115 - kept open across write_tensor calls, closed by finish()
        self._file.write(self.header_bytes())
        self._state = State.HEADER_WRITTEN

    def write_tensor(self, name: str, data: np.ndarray) -> None:
        """Write the next tensor's bytes (``data`` is the already-encoded tensor, any dtype, C order)."""
        self._expect(State.HEADER_WRITTEN, f"write tensor {name!r}")
        order = list(self.tensors)
        if self._next >= len(order) or order[self._next] != name:
            want = order[self._next] if self._next < len(order) else "nothing"
            raise RuntimeError(f"GGUFWriter: tensor {name!r} written out of order; expected {want}")
        info = self.tensors[name]
        raw = np.ascontiguousarray(data).view(np.uint8).reshape(-1)
        if raw.nbytes != info.nbytes:
            raise ValueError(f"GGUFWriter: tensor {name!r} has {raw.nbytes} bytes, {info.type.name}{list(info.shape)} needs {info.nbytes}")
        assert self._file is not None
        # numpy's stubs give ndarray __buffer__ (typing's Buffer) on Python >= 3.12 only
        self._file.write(memoryview(raw))  # type: ignore[arg-type]
        self._file.write(bytes(_pad(info.nbytes, self.alignment)))
        self._next += 1

    def close(self) -> None:
        self._expect(State.HEADER_WRITTEN, "close")
        if self._next != len(self.tensors):
            missing = list(self.tensors)[self._next]
            raise RuntimeError(f"GGUFWriter: closed before all tensors were written (next: {missing!r})")
        assert self._file is not None
        self._file.close()
        self._state = State.CLOSED

    def abort(self) -> None:
        """Close the file handle without checks (the caller deletes the temporary file)."""
        if self._file is not None and not self._file.closed:
            self._file.close()
        self._state = State.CLOSED
