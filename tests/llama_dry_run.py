"""Oracle harness: run the real llama.cpp ``llama_model_quantize`` in dry-run mode and read back its choices.

The input is a *header-only* GGUF: real Qwen2 metadata and tensor infos, with the data section made a sparse
file of the right length (``truncate``), so even a 72B-shaped file costs no disk and no reads (a dry run never
touches tensor data). llama.cpp's log is captured through ``llama_log_set`` with a CFFI callback and parsed
into per-tensor target types, fallback warnings and override notices.

Used by ``tests/test_plan.py``; needs ``llama_cpp_py_sync`` (llama.cpp b11739) and gguf-py.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from qconvert.constants import FileType, GGMLType

# "[  12/ 290] blk.0.attn_q.weight   - [  896,   896,     1,     1], type =    f16, size = ... (q5_1)"
_TENSOR_LINE = re.compile(
    r"\[\s*(\d+)/\s*(\d+)\]\s+(\S+)\s+-\s+\[([^\]]*)\], type =\s*(\S+), "
    r"size =\s*([\d.]+) MiB(?: ->\s*([\d.]+) MiB \((\S+)\))?"
)
_QUANT_SIZE = re.compile(r"quant size  =\s*([\d.]+) MiB \(([\d.]+) BPW\)")


@dataclass(frozen=True)
class DryRun:
    """What llama.cpp printed: target type label per tensor (in its order), warning lines, total size."""

    types: dict[str, str]
    order: list[str]
    warnings: list[str]
    quant_size_mib: str
    log: str


def write_header_only_gguf(
    path: Path, config: dict[str, Any], tensors: Sequence[tuple[str, tuple[int, ...]]],
    matrix_type: GGMLType = GGMLType.F16,
) -> None:
    """A Qwen2 GGUF with metadata and tensor infos only; 1-D tensors are F32, matrices ``matrix_type``.

    llama-quantize's loader needs the ``qwen2.*`` hparams (no tokenizer: quantization never loads the vocab)
    and checks that every tensor's data lies within the file, hence the sparse data section.
    """
    import gguf  # gguf-py: only the tests write oracle inputs with it

    w = gguf.GGUFWriter(path, "qwen2")
    w.add_block_count(config["num_hidden_layers"])
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_freq_base(config["rope_theta"])
    w.add_layer_norm_rms_eps(config["rms_norm_eps"])
    w.add_file_type(FileType.MOSTLY_F16 if matrix_type == GGMLType.F16 else FileType.MOSTLY_BF16)
    data_bytes = 0
    for name, shape in tensors:
        ggml_type = GGMLType.F32 if len(shape) == 1 else matrix_type
        nbytes = ggml_type.tensor_bytes(shape)
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes, raw_dtype=gguf.GGMLQuantizationType(ggml_type))
        data_bytes += -(-nbytes // w.data_alignment) * w.data_alignment
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    size = path.stat().st_size
    data_start = -(-size // w.data_alignment) * w.data_alignment
    with open(path, "r+b") as f:
        f.truncate(data_start + data_bytes)  # sparse: no blocks are allocated for the data section


def load_libllama() -> tuple[Any, Any]:
    """(ffi, lib) of the packaged libllama (see qconvert.runtimes.native for the glibc < 2.38 loader)."""
    from qconvert.runtimes.native import libllama

    return libllama()


class LlamaQuantizeOracle:
    """Thin CFFI wrapper around ``llama_model_quantize(dry_run=True)`` with log capture. One per process."""

    _lock = threading.Lock()

    def __init__(self) -> None:
        self.ffi, self.lib = load_libllama()
        self._chunks: list[str] = []

        @self.ffi.callback("void(enum ggml_log_level, const char *, void *)")
        def _log(level: int, text: Any, user_data: Any) -> None:
            self._chunks.append(self.ffi.string(text).decode("utf-8", "replace"))

        self._callback = _log  # keep alive
        self.lib.llama_backend_init()

    def dry_run(
        self, path: Path, ftype: FileType, *, pure: bool = False, output_tensor_type: GGMLType | None = None,
        token_embedding_type: GGMLType | None = None, tensor_types: Sequence[tuple[str, GGMLType]] = (),
        leave_output_tensor: bool = False, imatrix: dict[str, int] | None = None,
    ) -> DryRun:
        """Run a dry-run quantization of ``path`` to ``ftype`` and parse what llama.cpp logged.

        ``imatrix`` maps tensor names to their ``ne[0]``; a dummy all-ones importance matrix is passed so that
        llama.cpp takes its has-imatrix branches.
        """
        ffi, lib = self.ffi, self.lib
        params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
        params.nthread = 1
        params.ftype = int(ftype)
        params.dry_run = True
        params.pure = pure
        params.quantize_output_tensor = not leave_output_tensor
        if output_tensor_type is not None:
            params.output_tensor_type = int(output_tensor_type)
        if token_embedding_type is not None:
            params.token_embedding_type = int(token_embedding_type)
        keep: list[Any] = []
        if tensor_types:
            tt = ffi.new("struct llama_model_tensor_override[]", len(tensor_types) + 1)
            for i, (pattern, ggml_type) in enumerate(tensor_types):
                keep.append(ffi.new("char[]", pattern.encode()))
                tt[i].pattern = keep[-1]
                tt[i].type = int(ggml_type)
            tt[len(tensor_types)].pattern = ffi.NULL
            params.tt_overrides = tt
            keep.append(tt)
        if imatrix is not None:
            im = ffi.new("struct llama_model_imatrix_data[]", len(imatrix) + 1)
            for i, (name, n) in enumerate(imatrix.items()):
                keep.append(ffi.new("char[]", name.encode()))
                keep.append(ffi.new("float[]", [1.0] * n))
                im[i].name, im[i].data, im[i].size = keep[-2], keep[-1], n
            im[len(imatrix)].name = ffi.NULL
            params.imatrix = im
            keep.append(im)
        with self._lock:
            self._chunks = []
            lib.llama_log_set(self._callback, ffi.NULL)
            try:
                rc = lib.llama_model_quantize(str(path).encode(), str(path.with_suffix(".out")).encode(), params)
            finally:
                lib.llama_log_set(ffi.NULL, ffi.NULL)
            log = "".join(self._chunks)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed (rc={rc}):\n{log[-3000:]}")
        return parse_log(log)


def parse_log(log: str) -> DryRun:
    types: dict[str, str] = {}
    order: list[str] = []
    for m in _TENSOR_LINE.finditer(log):
        name, src, target = m.group(3), m.group(5), m.group(8)
        types[name] = target or src
        order.append(name)
    warnings = [line for line in log.splitlines()
                if line.startswith("warning: ") or "WARNING:" in line or "applying manual override" in line]
    quant = _QUANT_SIZE.search(log)
    return DryRun(types, order, warnings, quant.group(1) if quant else "", log)
