"""Lazy, validating reader of (sharded) safetensors checkpoints.

Only headers are read up front. Each tensor is read on demand with one positioned read into a fresh buffer, so
peak memory is one tensor (plus its float32 copy), whatever the model size: no mmap whose touched pages would
pile up in RSS while a 72B checkpoint streams through. Every header offset is checked against the file size
before any tensor is read, so a truncated download fails at open time with the shard's name.
"""

from __future__ import annotations

import json
import math
import os
import stat
import struct
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, TypeGuard

import numpy as np

from qconvert.errors import CheckpointError

# safetensors dtype -> (numpy storage dtype, bytes per element). bf16 is stored as uint16 and widened on read.
DTYPES: MappingProxyType[str, tuple[np.dtype, int]] = MappingProxyType({
    "BF16": (np.dtype("<u2"), 2),
    "F16": (np.dtype("<f2"), 2),
    "F32": (np.dtype("<f4"), 4),
    "I32": (np.dtype("<i4"), 4),  # packed GPTQ/AWQ weights and g_idx (read with read_raw)
    "I8": (np.dtype("<i1"), 1),  # W8A8 (compressed-tensors int-quantized) weights (read with read_raw)
})
FLOAT_DTYPES = frozenset({"BF16", "F16", "F32"})
# Every dtype the safetensors format defines: another name is damage, one of these a checkpoint to convert.
SAFETENSORS_DTYPES = frozenset({"BOOL", "U8", "I8", "F8_E5M2", "F8_E4M3", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2",
                                "I16", "U16", "F16", "BF16", "I32", "U32", "F32", "F64", "I64", "U64"})
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
READ_CHUNK = 1 << 30
CONVERT_CHUNK = 1 << 26  # bytes of stored data converted to float32 at a time


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives: file, dtype, numpy shape and absolute byte range."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


REDOWNLOAD = "The file is corrupt or hostile: re-download it (huggingface-cli download --force-download ...) or re-create it."


def _refuse_constant(literal: str) -> None:
    raise ValueError(f"non-standard literal {literal} (JSON has no NaN or Infinity)")


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:  # json would keep the last one silently: one tensor could hide another
            raise ValueError(f"key {key!r} appears twice")
        out[key] = value
    return out


def strict_json(raw: bytes | str, what: str) -> Any:
    """Parse JSON as strictly as serde_json: no NaN/Infinity literals, no duplicate keys, bounded nesting.

    Python's json accepts ``NaN`` and keeps the last of duplicate keys; nesting deeper than the interpreter's
    recursion limit raises RecursionError. All of these become a ``CheckpointError`` naming ``what``.
    """
    try:
        return json.loads(raw, parse_constant=_refuse_constant, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise CheckpointError(f"{what} nests JSON arrays/objects too deeply to be a real file. {REDOWNLOAD}") from None
    except ValueError as e:  # JSONDecodeError, UnicodeDecodeError, the hooks above, over-long integers
        raise CheckpointError(f"{what} is not valid JSON ({e}). {REDOWNLOAD}") from None


def _check_regular(path: Path) -> None:
    if not stat.S_ISREG(path.stat().st_mode):  # opening a FIFO or a device would block or never end
        raise CheckpointError(f"{path} is not a regular file (a FIFO, device, socket or directory); a checkpoint's "
                              "files must be regular files. Replace it with the downloaded file.")


def _header(path: Path) -> tuple[dict, int]:
    """Parse a safetensors header; returns (header dict, absolute offset of the data section)."""
    _check_regular(path)
    size = path.stat().st_size
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise CheckpointError(f"{path}: file is {size} bytes, too short to be safetensors; re-download it.")
        (n,) = struct.unpack("<Q", raw)
        if n > MAX_HEADER_BYTES or 8 + n > size:
            raise CheckpointError(
                f"{path}: header length {n} does not fit in a {size}-byte file; the file is truncated or not "
                "safetensors. Re-download it (huggingface-cli download --force-download ...)."
            )
        header = strict_json(f.read(n), f"{path}: header")
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: header is not a JSON object; the file is corrupt, re-download it.")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__ must map strings to strings (safetensors' rule), got "
                              f"{str(meta)[:80]}. {REDOWNLOAD}")
    return header, 8 + n


def _ints(value: object) -> TypeGuard[list[int]]:
    """A JSON list of non-negative integers (bools are ints in Python, floats are not sizes)."""
    return isinstance(value, list) and all(type(v) is int and v >= 0 for v in value)


def _entry(path: Path, name: str, info: Any, data_start: int) -> TensorEntry:
    """One header entry, checked: a dict with a known dtype, an integer shape and offsets spanning its bytes."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where} is {type(info).__name__}, not an object with dtype/shape/data_offsets. {REDOWNLOAD}")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPES:
        raise CheckpointError(f"{where} has dtype {str(dtype)[:40]}, which is not a safetensors dtype. {REDOWNLOAD}")
    if dtype not in DTYPES:
        raise CheckpointError(
            f"{where} has dtype {dtype}; qconvert reads {', '.join(sorted(FLOAT_DTYPES))} checkpoints. "
            "Convert the checkpoint to bf16/fp16 with transformers (model.save_pretrained) first."
        )
    if not _ints(shape):
        raise CheckpointError(f"{where} has shape {str(shape)[:80]}; a shape is a list of non-negative integers. "
                              f"{REDOWNLOAD}")
    if not (_ints(offsets) and len(offsets) == 2 and offsets[0] <= offsets[1]):
        raise CheckpointError(f"{where} has data_offsets {str(offsets)[:80]}; they must be [begin, end] integers with "
                              f"0 <= begin <= end. {REDOWNLOAD}")
    begin, end = offsets
    want = DTYPES[dtype][1] * math.prod(shape)  # Python ints: a hostile shape cannot overflow the check
    if end - begin != want:
        raise CheckpointError(f"{where} {dtype}{shape} needs {want} bytes but its offsets span {end - begin}; the "
                              f"header is corrupt. {REDOWNLOAD}")
    return TensorEntry(name, dtype, tuple(shape), path, data_start + begin, data_start + end)


def _check_layout(path: Path, entries: list[TensorEntry], data_start: int, size: int) -> None:
    """Tensors must tile the data section exactly, as the safetensors library checks: no byte read twice
    (overlapping or aliased offsets), no gap, no tensor past the end of the file, no trailing bytes."""
    pos = data_start
    for e in sorted(entries, key=lambda e: (e.start, e.end)):
        if e.end > size:
            raise CheckpointError(
                f"{path}: tensor {e.name!r} ends at byte {e.end} but the file has {size} bytes: the file is truncated "
                "(an interrupted download?). Re-download it."
            )
        if e.start != pos:
            what = "overlaps the tensor before it" if e.start < pos else f"leaves a gap of {e.start - pos} bytes"
            raise CheckpointError(f"{path}: tensor {e.name!r} (bytes {e.start - data_start}..{e.end - data_start} of "
                                  f"the data section) {what}; tensors must not share or skip bytes. {REDOWNLOAD}")
        pos = e.end
    if pos != size:
        raise CheckpointError(f"{path}: {size - pos} bytes follow the last tensor; the header does not describe the "
                              f"whole file. {REDOWNLOAD}")


def _entries(path: Path) -> list[TensorEntry]:
    header, data_start = _header(path)
    out = [_entry(path, name, info, data_start) for name, info in header.items() if name != "__metadata__"]
    _check_layout(path, out, data_start, path.stat().st_size)
    return out


def _shard_files(model_dir: Path) -> list[Path]:
    index = model_dir / INDEX_FILE
    if index.exists():
        _check_regular(index)
        data = strict_json(index.read_bytes(), str(index))
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise CheckpointError(f"{index}: not a valid safetensors index ('weight_map' must map tensor names to "
                                  "shard file names); re-download it.")
        files = sorted(set(weight_map.values()))
        # a shard is named by a relative path without "..": checked on the name, not by resolving it, since the
        # shards of a Hugging Face cache snapshot are symlinks into its blobs/ directory
        outside = [f for f in files if not f or PurePosixPath(f).is_absolute() or ".." in PurePosixPath(f).parts
                   or "\\" in f]
        if outside:
            raise CheckpointError(f"{index}: shard name(s) {outside[:3]} point outside {model_dir}; a shard must be "
                                  "a file inside the model directory. The index is damaged or hostile: re-download it.")
        missing = [f for f in files if not (model_dir / f).exists()]
        if missing:
            raise CheckpointError(
                f"{model_dir}: shard(s) {', '.join(missing)} named in {INDEX_FILE} are missing; "
                "the download is incomplete. Download the missing files and retry."
            )
        return [model_dir / f for f in files]
    if (model_dir / SINGLE_FILE).exists():
        return [model_dir / SINGLE_FILE]
    singles = sorted(model_dir.glob("*.safetensors"))
    if singles:
        return singles
    if list(model_dir.glob("*.bin")) or list(model_dir.glob("*.pt")) or list(model_dir.glob("*.pth")):
        raise CheckpointError(
            f"{model_dir} holds only pickle (.bin/.pt) weights. qconvert never unpickles checkpoints (torch.load "
            "can run arbitrary code). Convert it once in a trusted environment: "
            "AutoModelForCausalLM.from_pretrained(DIR).save_pretrained(OUT, safe_serialization=True)."
        )
    raise CheckpointError(f"{model_dir} has no *.safetensors weights; is this a Hugging Face model directory?")


class SafetensorsCheckpoint:
    """All tensors of a checkpoint directory, indexed by name, read lazily one at a time."""

    def __init__(self, model_dir: Path) -> None:
        self.dir = Path(model_dir)
        entries: dict[str, TensorEntry] = {}
        for shard in _shard_files(self.dir):
            for e in _entries(shard):
                if e.name in entries:
                    raise CheckpointError(f"{self.dir}: tensor {e.name!r} appears in two shards; the checkpoint is inconsistent.")
                entries[e.name] = e
        self.entries: MappingProxyType[str, TensorEntry] = MappingProxyType(entries)

    def names(self) -> list[str]:
        """Tensor names in file order (shard by shard, header order within a shard)."""
        return list(self.entries)

    def _read_into(self, e: TensorEntry, view: memoryview, offset: int) -> None:
        """Fill ``view`` with the tensor's bytes starting ``offset`` bytes into it."""
        done = 0
        with e.file.open("rb", buffering=0) as f:
            while done < len(view):  # Linux returns at most ~2 GiB per call; a 72B embedding is 2.5 GB
                got = os.preadv(f.fileno(), [view[done:done + READ_CHUNK]], e.start + offset + done)
                if got <= 0:
                    raise CheckpointError(
                        f"{e.file}: short read of {e.name!r} ({offset + done}/{e.nbytes} bytes); the file changed or is truncated."
                    )
                done += got

    def read_raw(self, name: str) -> np.ndarray:
        """The tensor's stored values with its numpy shape (bf16 as uint16 bit patterns)."""
        e = self.entries[name]
        buf = np.empty(e.nbytes, dtype=np.uint8)
        # numpy's stubs give ndarray __buffer__ (typing's Buffer) on Python >= 3.12 only
        self._read_into(e, memoryview(buf), 0)  # type: ignore[arg-type]
        return buf.view(DTYPES[e.dtype][0]).reshape(e.shape)

    def read_f32(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor as float32 (bf16 and f16 widen exactly); ``rows=(start, stop)``: only those rows of dim 0.

        Converted in chunks straight into the output, so the peak is the float32 copy plus one chunk, not the
        stored copy plus temporaries (a 72B embedding is 2.5 GB stored, 5 GB as float32). A row range is one
        positioned read of contiguous bytes: the streamed head and embedding read a 72B vocabulary in slices.
        """
        e = self.entries[name]
        if e.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{e.file}: tensor {name!r} is {e.dtype}, not a float tensor: this looks like an already "
                                  "quantized (GPTQ/AWQ) checkpoint. Convert from the float (bf16/fp16) checkpoint.")
        shape, first = tuple(e.shape), 0
        if rows is not None:
            start, stop = max(0, rows[0]), min(int(e.shape[0]), rows[1])
            if not e.shape or start >= stop:
                raise ValueError(f"rows {rows} are outside {name!r} of shape {list(e.shape)}")
            row = int(np.prod(e.shape[1:]))
            shape, first = (stop - start, *e.shape[1:]), start * row
        out = np.empty(shape, dtype=np.float32).reshape(-1)
        itemsize = DTYPES[e.dtype][1]
        step = CONVERT_CHUNK // itemsize
        chunk = np.empty(min(step, out.size), dtype=DTYPES[e.dtype][0])
        for start in range(0, out.size, step):
            part = chunk[: min(step, out.size - start)]
            # numpy's stubs give ndarray __buffer__ (typing's Buffer) on Python >= 3.12 only
            self._read_into(e, memoryview(part.view(np.uint8)), (first + start) * itemsize)  # type: ignore[arg-type]
            dst = out[start:start + part.size]
            if e.dtype == "BF16":  # bf16 is the top half of a float32
                bits = dst.view(np.uint32)
                np.left_shift(part, 16, out=bits, dtype=np.uint32)
            else:
                dst[:] = part
        return out.reshape(shape)


WRITE_DTYPES = MappingProxyType({**DTYPES, "F64": (np.dtype("<f8"), 8)})


class SafetensorsStreamWriter:
    """Write one safetensors file tensor by tensor, never holding more than the tensor being written.

    Every tensor's dtype and shape are declared up front (so the header's offsets are known); tensors must then
    be written in declaration order. The metadata is set at ``finish``: ``reserve`` bytes of the header are kept
    for it (the JSON is padded with spaces, which safetensors readers accept). Write into a temporary path and
    rename (``qconvert.io.atomic.atomic_output``) so a failed run leaves nothing behind.
    """

    def __init__(self, path: Path, tensors: dict[str, tuple[str, tuple[int, ...]]], reserve: int = 4096) -> None:
        self._order = list(tensors)
        self._entries: dict[str, dict] = {}
        offset = 0
        for name, (dtype, shape) in tensors.items():
            if dtype not in WRITE_DTYPES:
                raise ValueError(f"unsupported dtype {dtype} for {name}")
            n = int(np.prod(shape, dtype=np.int64)) * WRITE_DTYPES[dtype][1]
            self._entries[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        self._header_len = len(json.dumps(self._entries).encode()) + reserve
        self._header_len += -self._header_len % 8
        self._next = 0
        self._f = open(path, "wb")  # noqa: SIM115 (closed by finish/close; the caller owns the lifetime)
        self._f.seek(8 + self._header_len)

    def write(self, name: str, array: np.ndarray) -> None:
        """Write the next declared tensor (``array`` must match its dtype and shape)."""
        if self._next >= len(self._order) or self._order[self._next] != name:
            expected = self._order[self._next] if self._next < len(self._order) else "nothing"
            raise ValueError(f"tensor {name} written out of order (expected {expected})")
        e = self._entries[name]
        want = WRITE_DTYPES[e["dtype"]][0]
        if array.dtype != want or list(array.shape) != e["shape"]:
            raise ValueError(f"{name}: got {array.dtype}{list(array.shape)}, declared {e['dtype']}{e['shape']}")
        self._f.write(np.ascontiguousarray(array).tobytes())
        self._next += 1

    def finish(self, metadata: dict[str, str]) -> None:
        """Write the header (with ``metadata``) and close; every declared tensor must have been written."""
        if self._next != len(self._order):
            raise ValueError(f"{len(self._order) - self._next} declared tensors were never written")
        raw = json.dumps({"__metadata__": metadata, **self._entries}).encode()
        if len(raw) > self._header_len:
            raise ValueError(f"metadata too large for the reserved header ({len(raw)} > {self._header_len} bytes)")
        self._f.seek(0)
        self._f.write(struct.pack("<Q", self._header_len) + raw + b" " * (self._header_len - len(raw)))
        self._f.close()

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()
