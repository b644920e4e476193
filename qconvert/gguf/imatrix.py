"""llama.cpp importance-matrix files (the GGUF format ``llama-imatrix`` writes since 2025).

An imatrix holds, per weight matrix, the sum of squared inputs of each column over the calibration tokens
(``<name>.in_sum2``, f32[n_in]) and how many tokens were summed (``<name>.counts``, f32[1]). llama-quantize
divides one by the other and hands the per-column mean to the weighted quantizers; qconvert does the same, so
the same file gives the same bytes.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np

from qconvert.constants import GGMLType, ValueType
from qconvert.errors import CheckpointError
from qconvert.gguf.reader import read_gguf
from qconvert.gguf.writer import GGUFWriter
from qconvert.io.atomic import atomic_output

SUMS, COUNTS = ".in_sum2", ".counts"


def read_imatrix(path: Path) -> dict[str, np.ndarray]:
    """Tensor name -> f32[n_in] per-column mean of x², as llama-quantize computes it from the file."""
    g = read_gguf(Path(path))
    if g.metadata.get("general.type") != "imatrix":
        raise CheckpointError(
            f"{path} is not an imatrix GGUF (general.type is {g.metadata.get('general.type')!r}). Legacy .dat "
            "imatrix files can be converted with: llama-imatrix --in-file OLD.dat -o NEW.gguf"
        )
    out = {}
    for name in g.tensors:
        if not name.endswith(SUMS):
            continue
        base = name[: -len(SUMS)]
        if base + COUNTS not in g.tensors:
            raise CheckpointError(f"{path}: {base} has sums but no counts; the imatrix file is corrupt.")
        sums = g.read_tensor_bytes(name).view(np.float32)
        counts = np.rint(g.read_tensor_bytes(base + COUNTS).view(np.float32)).astype(np.int64)
        per = sums.reshape(len(counts), -1)
        mean = np.ones_like(per)  # llama-quantize uses 1 where a count is zero
        for j, c in enumerate(counts):
            if c > 0:
                mean[j] = per[j] / np.float32(c)
        if not np.isfinite(mean).all():
            raise CheckpointError(f"{path}: the imatrix entry for {base} has NaN or Inf; recompute the imatrix.")
        out[base] = mean.reshape(-1).astype(np.float32)
    return out


def write_imatrix(path: Path, sums: Mapping[str, np.ndarray], counts: Mapping[str, int], *, datasets: list[str],
                  chunk_count: int, chunk_size: int, force: bool = False) -> None:
    """Write per-tensor column sums of x² and token counts in llama.cpp's imatrix GGUF format (atomically)."""
    with atomic_output(Path(path), force=force) as tmp:
        w = GGUFWriter(tmp)
        w.add("general.type", ValueType.STRING, "imatrix")
        w.add("imatrix.datasets", ValueType.ARRAY, datasets, ValueType.STRING)
        w.add("imatrix.chunk_count", ValueType.UINT32, chunk_count)
        w.add("imatrix.chunk_size", ValueType.UINT32, chunk_size)
        for name in sorted(sums):
            w.add_tensor_info(name + SUMS, (len(sums[name]),), GGMLType.F32)
            w.add_tensor_info(name + COUNTS, (1,), GGMLType.F32)
        w.write_header()
        for name in sorted(sums):
            w.write_tensor(name + SUMS, np.asarray(sums[name], dtype=np.float32))
            w.write_tensor(name + COUNTS, np.array([counts[name]], dtype=np.float32))
        w.close()
