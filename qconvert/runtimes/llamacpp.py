"""llama.cpp as an independent runtime, through the prebuilt CPU libllama of ``llama-cpp-py-sync`` (CFFI).

Used as the oracle of the GGUF path: it loads what qconvert writes, tokenizes, returns logits for every
position, generates greedily, and runs llama.cpp's own quantizer (``llama_model_quantize``) for byte comparisons.

llama.cpp asserts (aborting the whole process) on some malformed files, so every GGUF passes qconvert's validating
reader (``read_gguf``) before llama.cpp opens it; ``qconvert.runtimes.native`` makes a remaining abort say why.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.errors import CheckpointError
from qconvert.gguf.reader import read_gguf
from qconvert.runtimes.native import libllama

if TYPE_CHECKING:
    from typing import Self  # only for annotations: typing.Self is Python 3.11+

_LOCK = threading.Lock()
_STATE: dict[str, Any] = {}


def _lib() -> tuple[Any, Any]:
    """(ffi, lib), loaded once; llama.cpp's log goes to a buffer instead of stderr."""
    with _LOCK:
        if "lib" not in _STATE:
            ffi, lib = libllama()
            lib.llama_backend_init()
            _STATE["log"] = []

            @ffi.callback("void(enum ggml_log_level, const char *, void *)")
            def on_log(level: int, text: Any, user_data: Any) -> None:
                _STATE["log"].append(ffi.string(text).decode("utf-8", errors="replace"))

            _STATE["on_log"] = on_log  # keep the callback alive
            lib.llama_log_set(on_log, ffi.NULL)
            _STATE["ffi"], _STATE["lib"] = ffi, lib
        return _STATE["ffi"], _STATE["lib"]


@contextmanager
def captured_log() -> Iterator[list[str]]:
    """Collect llama.cpp's log lines printed inside the block (joined pieces, split into lines at the end)."""
    _lib()
    start = len(_STATE["log"])
    lines: list[str] = []
    try:
        yield lines
    finally:
        lines.extend("".join(_STATE["log"][start:]).splitlines())


def llama_quantize(src: Path, dst: Path, ftype: int, *, nthread: int = 0, pure: bool = False,
                   output_tensor_type: int | None = None, token_embedding_type: int | None = None,
                   dry_run: bool = False, imatrix: dict[str, np.ndarray] | None = None) -> list[str]:
    """Run llama.cpp's ``llama_model_quantize``; returns its log lines. Raises when it fails.

    ``imatrix`` maps tensor names to their per-column mean of x² (what llama-quantize loads from a file).
    """
    read_gguf(src)  # refuse what llama.cpp would assert on, before it sees the file
    ffi, lib = _lib()
    params = ffi.new("llama_model_quantize_params *", lib.llama_model_quantize_default_params())
    params.nthread = nthread or (os.cpu_count() or 1)
    params.ftype = ftype
    params.pure = pure
    params.dry_run = dry_run
    if output_tensor_type is not None:
        params.output_tensor_type = output_tensor_type
    if token_embedding_type is not None:
        params.token_embedding_type = token_embedding_type
    keep = []  # CFFI buffers must outlive the call
    if imatrix:
        entries = ffi.new("struct llama_model_imatrix_data[]", len(imatrix) + 1)
        for i, (name, values) in enumerate(imatrix.items()):
            keep += [ffi.new("char[]", name.encode()), ffi.new("float[]", [float(v) for v in values])]
            entries[i].name, entries[i].data, entries[i].size = keep[-2], keep[-1], len(values)
        entries[len(imatrix)].name = ffi.NULL
        params.imatrix = entries
        keep.append(entries)
    with captured_log() as log:
        rc = lib.llama_model_quantize(str(src).encode(), str(dst).encode(), params)
    if rc != 0:
        if not dry_run:
            Path(dst).unlink(missing_ok=True)  # what it wrote before failing is not a GGUF
        raise CheckpointError(f"llama_model_quantize failed (rc={rc}) on {src}:\n" + "\n".join(log[-20:]))
    return log


class LlamaCppModel:
    """A GGUF loaded by llama.cpp on the CPU, with one context of ``n_ctx`` tokens."""

    def __init__(self, path: Path, *, n_ctx: int = 512, n_threads: int = 0, vocab_only: bool = False) -> None:
        self.path = Path(path)
        read_gguf(self.path)  # refuse what llama.cpp would assert on, before it sees the file
        self.ffi, self.lib = _lib()
        mparams = self.lib.llama_model_default_params()
        mparams.vocab_only = vocab_only
        mparams.n_gpu_layers = 0
        with captured_log() as log:
            self.model = self.lib.llama_model_load_from_file(str(self.path).encode(), mparams)
        if self.model == self.ffi.NULL:
            raise CheckpointError(f"llama.cpp could not load {self.path}:\n" + "\n".join(log[-15:]))
        self.vocab = self.lib.llama_model_get_vocab(self.model)
        self.n_vocab = self.lib.llama_vocab_n_tokens(self.vocab)
        self.ctx = self.ffi.NULL
        if not vocab_only:
            cparams = self.lib.llama_context_default_params()
            cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = n_ctx
            cparams.n_threads = cparams.n_threads_batch = n_threads or (os.cpu_count() or 1)
            cparams.no_perf = True
            self.ctx = self.lib.llama_init_from_model(self.model, cparams)
            if self.ctx == self.ffi.NULL:
                raise CheckpointError(f"llama.cpp could not create a context for {self.path}")
        self.n_ctx = n_ctx

    def close(self) -> None:
        if self.ctx != self.ffi.NULL:
            self.lib.llama_free(self.ctx)
            self.ctx = self.ffi.NULL
        if self.model != self.ffi.NULL:
            self.lib.llama_model_free(self.model)
            self.model = self.ffi.NULL

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def meta(self, key: str) -> str | None:
        buf = self.ffi.new("char[]", 1 << 16)
        n = self.lib.llama_model_meta_val_str(self.model, key.encode(), buf, 1 << 16)
        return None if n < 0 else self.ffi.string(buf).decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        raw = text.encode("utf-8")
        cap = len(raw) + 16
        buf = self.ffi.new("llama_token[]", cap)
        n = self.lib.llama_tokenize(self.vocab, raw, len(raw), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} tokens")
        return [buf[i] for i in range(n)]

    def logits(self, tokens: list[int]) -> np.ndarray:
        """float32 [len(tokens), n_vocab]: the logits after each token, from an empty KV cache."""
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        batch = self.lib.llama_batch_init(len(tokens), 0, 1)
        try:
            for i, t in enumerate(tokens):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, i, 1
                batch.seq_id[i][0], batch.logits[i] = 0, 1
            batch.n_tokens = len(tokens)
            rc = self.lib.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode failed with {rc}")
            out = np.empty((len(tokens), self.n_vocab), dtype=np.float32)
            for i in range(len(tokens)):
                ptr = self.lib.llama_get_logits_ith(self.ctx, i)
                out[i] = np.frombuffer(self.ffi.buffer(ptr, 4 * self.n_vocab), dtype=np.float32)
            return out
        finally:
            self.lib.llama_batch_free(batch)

    def greedy(self, tokens: list[int], n_new: int) -> list[int]:
        """Greedy continuation of ``tokens`` by ``n_new`` tokens (recomputes the prefix each step: tiny models)."""
        seq = list(tokens)
        for _ in range(n_new):
            seq.append(int(np.argmax(self.logits(seq)[-1])))
        return seq[len(tokens):]

    def detokenize(self, tokens: list[int]) -> str:
        pieces = []
        buf = self.ffi.new("char[]", 256)
        for t in tokens:
            n = self.lib.llama_token_to_piece(self.vocab, t, buf, 256, 0, False)
            pieces.append(self.ffi.buffer(buf, max(n, 0))[:])
        return b"".join(pieces).decode("utf-8", errors="replace")
