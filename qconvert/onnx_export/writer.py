"""Initializers written as a stream: one tensor at a time, inline or into ``model.onnx.data``.

A protobuf message cannot exceed 2 GiB, so larger models keep their weights in an external data file that
``model.onnx`` points into (``location``/``offset``/``length``, the ONNX external-data convention). The exporter
knows every tensor's size before it writes one (``planned_bytes``), so it picks the mode up front: models whose
weights exceed ``INLINE_LIMIT`` stream each tensor straight to the data file as it is produced (peak memory about
one layer), smaller ones are embedded in ``model.onnx``. Large tensors start on a page boundary so onnxruntime can
memory-map them.

The store is strict: a duplicate name, a non-contiguous or unsupported dtype, or a call after ``close`` raises.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

INLINE_LIMIT = 256 << 20  # weights above this go to model.onnx.data (streamed; protobuf's hard limit is 2 GiB)
INLINE_BELOW = 1024  # smaller tensors (shapes, axes, scalars) always stay in model.onnx
DATA_FILE = "model.onnx.data"
PAGE = 4096
PAGE_ALIGN_FROM = 1 << 20  # tensors this large start on a page (onnxruntime can map them); smaller ones on 64 bytes
SMALL_ALIGN = 64
ONNX_TYPES: MappingProxyType[np.dtype, int] = MappingProxyType({
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.uint8): TensorProto.UINT8,
    np.dtype(np.int64): TensorProto.INT64,
})


class InitializerStore:
    """Collects the graph's initializers; ``external=True`` writes their bytes to ``dir/model.onnx.data`` at once."""

    def __init__(self, directory: Path, *, external: bool) -> None:
        self.external = external
        self.tensors: list[TensorProto] = []
        self.names: set[str] = set()
        self.offset = 0
        self.nbytes = 0
        self.closed = False
        self._file = open(Path(directory) / DATA_FILE, "wb") if external else None  # noqa: SIM115 (closed in close())

    def add(self, name: str, array: np.ndarray) -> str:
        """Store ``array`` under ``name`` and return the name (for use as a node input)."""
        if self.closed:
            raise RuntimeError(f"initializer {name!r} added after the store was closed")
        if name in self.names:
            raise ValueError(f"initializer {name!r} added twice")
        if array.dtype not in ONNX_TYPES:
            raise TypeError(f"initializer {name!r} has dtype {array.dtype}; the exporter writes {list(ONNX_TYPES)}")
        array = np.ascontiguousarray(array)
        self.names.add(name)
        self.nbytes += array.nbytes
        if not self.external or array.nbytes < INLINE_BELOW:  # shape inference reads small constants
            self.tensors.append(numpy_helper.from_array(array, name))
            return name
        assert self._file is not None
        align = PAGE if array.nbytes >= PAGE_ALIGN_FROM else SMALL_ALIGN
        pad = -self.offset % align
        self._file.write(b"\0" * pad)
        self.offset += pad
        self._file.write(array.data)  # no bytes copy of a large tensor
        t = TensorProto(name=name, data_type=ONNX_TYPES[array.dtype], dims=list(array.shape))
        t.data_location = TensorProto.EXTERNAL
        for key, value in (("location", DATA_FILE), ("offset", str(self.offset)), ("length", str(array.nbytes))):
            t.external_data.add(key=key, value=value)
        self.offset += array.nbytes
        self.tensors.append(t)
        return name

    def mark(self) -> tuple[int, int, int]:
        """Where the store is now, for ``rollback``."""
        return len(self.tensors), self.offset, self.nbytes

    def rollback(self, mark: tuple[int, int, int]) -> None:
        """Drop every initializer added since ``mark`` (their external bytes too)."""
        if self.closed:
            raise RuntimeError("rollback after the store was closed")
        n, self.offset, self.nbytes = mark
        for t in self.tensors[n:]:
            self.names.discard(t.name)
        del self.tensors[n:]
        if self._file is not None:
            self._file.seek(self.offset)
            self._file.truncate()

    def close(self) -> None:
        self.closed = True
        if self._file is not None:
            self._file.close()
            self._file = None

    def save(self, model: onnx.ModelProto, path: Path) -> None:
        """Attach the initializers to ``model``'s graph and write ``model.onnx`` (without re-writing the data)."""
        self.close()
        model.graph.initializer.extend(self.tensors)
        with open(path, "wb") as f:
            f.write(model.SerializeToString())
