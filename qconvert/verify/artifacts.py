"""Which runtime runs an artifact, and the runtimes themselves, each yielding the reference's scored logits.

    GGUF file                -> llama.cpp (libllama from llama-cpp-py-sync, CPU)
    ONNX file or directory   -> onnxruntime (qconvert.runtimes.onnxrt: CPU EP, CUDA EP with --device cuda)
    GPTQ / AWQ directory     -> qconvert-dequant: qconvert's exact dequantize-then-matmul forward (always there)
                                gptqmodel: transformers with GPTQModel's kernels (only where gptqmodel imports)
    compressed-tensors dir   -> qconvert-dequant (as GPTQ/AWQ); transformers: with the compressed-tensors package
                                (only where it imports), weights decompressed while loading
    float HF directory       -> transformers (same as the reference)

The kind is read from the content (GGUF magic, config.json's quantization_config, ONNX protobuf), never from a
file name; a name that promises another kind is an error. Every runtime gets the same int32 windows and returns
float32 logits [n_scored, vocab] for positions ``first .. ctx - 2`` of each window.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.errors import CheckpointError, RuntimeMissingError, TokenizerError
from qconvert.verify import metrics
from qconvert.verify.reference import (
    Reference,
    VerifyError,
    check_ctx,
    reference_dtype,
    resolve_device,
)
from qconvert.verify.result import ArtifactResult, aggregate

if TYPE_CHECKING:
    import torch

GGUF_MAGIC = b"GGUF"
CT_KIND = "compressed-tensors"
KINDS = ("gguf", "onnx", "gptq", "awq", CT_KIND, "hf")
DEFAULT_RUNTIME = {"gguf": "llama.cpp", "onnx": "onnxruntime", "gptq": "qconvert-dequant", "awq": "qconvert-dequant",
                   CT_KIND: "qconvert-dequant", "hf": "transformers"}
ORACLE_HINT = ("GPTQModel is not importable here (it lives in a separate environment, e.g. .venv-oracle); run "
               "qconvert verify from that environment for the kernel path. qconvert's dequantize-then-matmul path "
               "still verifies the checkpoint.")


@dataclass(frozen=True)
class Artifact:
    path: Path
    kind: str
    format: str
    config: dict[str, Any] | None = None  # config.json of a directory
    gguf: Any = None  # the parsed GGUF header (qconvert.gguf.reader.GGUFFile) of a GGUF file


def runtimes_for(kind: str) -> tuple[str, ...]:
    """Every runtime that can verify ``kind``, default first."""
    if kind == CT_KIND:
        return ("qconvert-dequant", "transformers") if compressed_tensors_available() else ("qconvert-dequant",)
    return ("qconvert-dequant", "gptqmodel") if kind in ("gptq", "awq") else (DEFAULT_RUNTIME[kind],)


def compressed_tensors_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("compressed_tensors") is not None


def gptqmodel_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("gptqmodel") is not None


def detect(path: Path) -> Artifact:
    """The artifact's kind and format from its content; errors say what the file is instead."""
    path = Path(path)
    if not path.exists():
        raise VerifyError(f"artifact {path} does not exist.")
    if path.is_dir():
        return _detect_dir(path)
    with path.open("rb") as f:
        head = f.read(8)
    if head[:4] == GGUF_MAGIC:
        from qconvert.gguf.reader import (
            read_gguf,  # checks that every tensor lies inside the file
        )

        g = read_gguf(path)
        return Artifact(path, "gguf", _gguf_format(g.metadata.get("general.file_type")), gguf=g)
    if path.suffix == ".gguf":
        raise CheckpointError(f"{path} ends in .gguf but does not start with the GGUF magic (it starts with "
                              f"{head[:4]!r}); it is not a GGUF file. Re-create it with qconvert gguf.")
    if path.suffix == ".onnx":
        if not head or head[0] != 0x08:  # an ONNX ModelProto starts with field 1 (ir_version), varint
            raise CheckpointError(f"{path} ends in .onnx but is not an ONNX model (no ModelProto header); "
                                  "re-export it.")
        return Artifact(path, "onnx", "onnx")
    raise VerifyError(f"{path}: not a GGUF file, an .onnx model or a checkpoint directory; qconvert verify takes "
                      "GGUF files, ONNX models and GPTQ/AWQ/float Hugging Face directories.")


def _gguf_format(file_type: Any) -> str:
    from qconvert.constants import FileType

    try:
        return FileType(int(file_type)).name.removeprefix("MOSTLY_").removeprefix("ALL_")
    except (TypeError, ValueError):
        return "unknown"


def _detect_dir(path: Path) -> Artifact:
    cfg_path = path / "config.json"
    if not cfg_path.is_file():
        if any(path.glob("*.onnx")):
            return Artifact(path, "onnx", "onnx")
        raise VerifyError(f"{path} is a directory without config.json or *.onnx; it is no artifact qconvert can verify.")
    config = json.loads(cfg_path.read_text())
    if any(path.glob("*.onnx")):  # an ONNX export may carry its source's config.json
        return Artifact(path, "onnx", "onnx", config)
    q = config.get("quantization_config") or {}
    method = q.get("quant_method")
    if method in ("gptq", "awq"):
        return Artifact(path, method, f"int{q.get('bits')}-g{q.get('group_size')}", config)
    if method == CT_KIND:
        from qconvert.int4.formats import layout_scheme

        layout, scheme = layout_scheme(q, f"{cfg_path}")  # refuses schemes qconvert cannot run, saying which
        group = "channel" if scheme.group_size == -1 else f"g{scheme.group_size}"
        acts = "a8" if layout.dynamic_activations else "a16"
        return Artifact(path, CT_KIND, f"w{scheme.bits}{acts}-{group}{'' if scheme.sym else '-zp'}", config)
    if method:
        raise VerifyError(f"{path} is a {method} checkpoint; qconvert verify knows GPTQ, AWQ and compressed-tensors "
                          "(pack-quantized) directories.")
    return Artifact(path, "hf", str(config.get("torch_dtype") or config.get("dtype") or "float"), config)


# ------------------------------------------------------------------------------------------------------------
# vocabulary checks: an artifact must use the reference's token ids


def _describe_diff(ours: list[str], theirs: list[str], what: str) -> str:
    diff = [i for i in range(min(len(ours), len(theirs))) if ours[i] != theirs[i]]
    shown = ", ".join(f"id {i}: {theirs[i]!r} vs reference {ours[i]!r}" for i in diff[:5])
    return (f"{what} has a different vocabulary from the reference: {len(diff)} token ids differ ({shown}"
            f"{', ...' if len(diff) > 5 else ''}). Token ids would mean different text; verify it against the "
            "checkpoint it was converted from.")


@functools.lru_cache(maxsize=4)
def _reference_tokens(reference_dir: Path, fingerprint: str) -> list[str]:
    """The token strings a GGUF of the reference holds (padded to vocab_size), once per reference."""
    from qconvert.gguf.vocab import read_vocab

    config = json.loads((reference_dir / "config.json").read_text())
    return read_vocab(reference_dir, config).tokens


def check_gguf_vocab(art: Artifact, reference: Reference) -> None:
    path = art.path
    theirs = list(art.gguf.metadata.get("tokenizer.ggml.tokens") or [])
    ours = _reference_tokens(reference.reference_dir, reference.meta.get("cache", ""))
    if len(theirs) != len(ours):
        raise TokenizerError(f"{path.name} has {len(theirs)} tokens but the reference has {len(ours)} (vocab_size); "
                             "it was not converted from this reference. Pass the matching --reference.")
    if theirs != ours:
        raise TokenizerError(_describe_diff(ours, theirs, path.name))


def check_dir_vocab(path: Path, reference: Reference) -> None:
    if not (path / "tokenizer.json").is_file():
        return
    def tokens(d: Path) -> list[str]:
        tok = json.loads((d / "tokenizer.json").read_text())
        by_id = {i: t for t, i in tok["model"]["vocab"].items()} | {t["id"]: t["content"] for t in tok.get("added_tokens", [])}
        return [by_id.get(i, "") for i in range(max(by_id) + 1)]

    ours, theirs = tokens(reference.reference_dir), tokens(path)
    if ours != theirs:
        if len(ours) != len(theirs):
            raise TokenizerError(f"{path.name}'s tokenizer has {len(theirs)} tokens, the reference's {len(ours)}; "
                                 "verify it against the checkpoint it was made from.")
        raise TokenizerError(_describe_diff(ours, theirs, path.name))


# ------------------------------------------------------------------------------------------------------------
# runtimes: each yields logits [n_scored, V] per window and counts its forward seconds


class Runner:
    """Base: ``scored(windows, first)`` yields one window's logits at a time; ``seconds`` is forward time."""

    name = ""

    def __init__(self) -> None:
        self.seconds = 0.0

    def scored(self, windows: np.ndarray, first: int, progress: bool) -> Iterator[Any]:
        from tqdm import tqdm

        for w in tqdm(range(len(windows)), desc=self.name, unit="window", disable=not progress, file=sys.stderr):
            start = time.perf_counter()
            out = self.window(windows[w], first)
            self.seconds += time.perf_counter() - start
            yield out

    def window(self, ids: np.ndarray, first: int) -> Any:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LlamaCppRunner(Runner):
    """One llama.cpp context of ``ctx`` tokens; each window is one llama_decode with outputs on scored rows only."""

    name = "llama.cpp"

    def __init__(self, path: Path, ctx: int, n_threads: int = 0) -> None:
        super().__init__()
        from qconvert.runtimes.llamacpp import LlamaCppModel

        self.model = LlamaCppModel(path, n_ctx=ctx, n_threads=n_threads)
        lib = self.model.lib
        self.batch = lib.llama_batch_init(ctx, 0, 1)

    def window(self, ids: np.ndarray, first: int) -> Any:
        import torch

        m, lib, ffi, b = self.model, self.model.lib, self.model.ffi, self.batch
        n = len(ids)
        lib.llama_memory_clear(lib.llama_get_memory(m.ctx), True)
        for i, t in enumerate(ids.tolist()):
            b.token[i], b.pos[i], b.n_seq_id[i], b.seq_id[i][0] = t, i, 1, 0
            b.logits[i] = first <= i < n - 1
        b.n_tokens = n
        rc = lib.llama_decode(m.ctx, b)
        if rc != 0:
            raise VerifyError(f"llama_decode failed with {rc} on {m.path.name}")
        out = np.empty((n - 1 - first, m.n_vocab), dtype=np.float32)
        for r, i in enumerate(range(first, n - 1)):
            out[r] = np.frombuffer(ffi.buffer(lib.llama_get_logits_ith(m.ctx, i), 4 * m.n_vocab), dtype=np.float32)
        return torch.from_numpy(out)

    def close(self) -> None:
        self.model.lib.llama_batch_free(self.batch)
        self.model.close()


def load_hf(model_dir: Path, device: str, dtype: Any, **options: Any) -> Any:  # a transformers PreTrainedModel
    """The checkpoint in transformers, after qconvert's own reader has checked that its weights are safetensors
    (a pickle-only directory is refused before transformers could unpickle anything). ``options`` go to
    ``from_pretrained`` (e.g. a ``quantization_config`` with loading attributes)."""
    import transformers

    from qconvert.io.safetensors import SafetensorsCheckpoint

    SafetensorsCheckpoint(Path(model_dir))  # validates every header; refuses .bin/.pt-only checkpoints
    model = transformers.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype, use_safetensors=True,
                                                              **options)
    model.eval()
    return model.to(device)  # type: ignore[arg-type]  # transformers' stubs type .to() for modules, not devices


def hf_scored_logits(model: Any, window: np.ndarray, first: int, device: str) -> torch.Tensor:  # [n_scored, V]
    """Logits of positions ``first .. len - 2`` of one window, through a transformers causal LM."""
    import torch

    ids = torch.from_numpy(window.astype(np.int64))[None].to(device)
    with torch.no_grad():
        out = model(input_ids=ids, logits_to_keep=len(window) - first, use_cache=False)
    return out.logits[0, :-1].float()


class TransformersRunner(Runner):
    name = "transformers"

    def __init__(self, path: Path, device: str, dtype: Any, **options: Any) -> None:
        super().__init__()
        self.device = device
        self.model = load_hf(path, device, dtype, **options)

    def window(self, ids: np.ndarray, first: int) -> Any:
        import torch

        out = hf_scored_logits(self.model, ids, first, self.device)
        if self.device.startswith("cuda"):
            torch.cuda.synchronize()
        return out


class GPTQModelRunner(TransformersRunner):
    """transformers + GPTQModel's kernels (GPTQ and AWQ checkpoints load through gptqmodel in transformers 5)."""

    name = "gptqmodel"

    def __init__(self, path: Path, device: str) -> None:
        if not gptqmodel_available():
            raise RuntimeMissingError(ORACLE_HINT)
        import torch

        super().__init__(path, device, torch.float16 if device.startswith("cuda") else torch.bfloat16)


class OnnxRunner(Runner):
    name = "onnxruntime"

    def __init__(self, path: Path, device: str) -> None:
        super().__init__()
        try:
            from qconvert.runtimes.onnxrt import OnnxModel
        except ImportError as e:
            raise RuntimeMissingError(f"the ONNX runtime wrapper qconvert.runtimes.onnxrt is not available ({e}); "
                                      "ONNX artifacts cannot be verified by this build of qconvert yet.") from None
        self.model = OnnxModel(path, device=device)

    def window(self, ids: np.ndarray, first: int) -> Any:
        import torch

        return torch.from_numpy(np.asarray(self.model.logits(ids), dtype=np.float32)[first:-1])


class DequantRunner(Runner):
    """GPTQ/AWQ through qconvert's streaming driver with each linear's exact dequantized weight (float32); a W8A8
    checkpoint (compressed-tensors int-quantized) also quantizes every linear's input per token to int8, as its
    kernels do (``qconvert.w8a8.w8a8_logits``).

    Streams layer by layer over all windows at once (one layer's weights in memory, plus the hidden states
    [n_windows, ctx, hidden]), so ``scored`` runs every layer before it yields the first window.
    """

    name = "qconvert-dequant"

    def __init__(self, art: Artifact, device: str) -> None:
        super().__init__()
        from qconvert.io.safetensors import SafetensorsCheckpoint

        assert art.config is not None
        self.art, self.device = art, device
        self.ckpt = SafetensorsCheckpoint(art.path)

    def scored(self, windows: np.ndarray, first: int, progress: bool) -> Iterator[Any]:
        import torch

        from qconvert.calibration.driver import CalibrationSettings, streamed_logits
        from qconvert.int4.formats import layout_scheme
        from qconvert.w8a8 import w8a8_logits

        config = self.art.config
        assert config is not None
        ids = torch.from_numpy(windows.astype(np.int64))
        settings = CalibrationSettings(self.device, torch.float32, 4)
        layout, _ = layout_scheme(config["quantization_config"])
        if layout.dynamic_activations:
            logits = w8a8_logits(self.ckpt, config, ids, first, settings, progress=self.name if progress else None)
        else:
            logits = streamed_logits(self.ckpt, config, ids, first, settings,
                                     quantization_config=config["quantization_config"],
                                     progress=self.name if progress else None)
        while True:
            start = time.perf_counter()
            out = next(logits, None)
            self.seconds += time.perf_counter() - start
            if out is None:
                return
            yield out


def compressed_tensors_options(art: Artifact | None = None) -> dict[str, Any]:
    """How transformers loads a compressed-tensors checkpoint. Weight-only (pack-quantized): the route that
    decompresses each weight while loading (``dequantize=True``), since the default route drops asymmetric
    checkpoints' packed zero points as a size mismatch (transformers 5.23 with compressed-tensors 0.20;
    llm-compressor#1618). W8A8 (int-quantized): the default route, the only one that keeps the per-token activation
    quantization (``dequantize=True`` removes the scheme and would run W8A16)."""
    if not compressed_tensors_available():
        raise RuntimeMissingError("transformers needs the compressed-tensors package for these checkpoints: pip "
                                  "install compressed-tensors==0.20.0 (or use --runtime qconvert-dequant).")
    from transformers import CompressedTensorsConfig

    from qconvert.int4.formats import layout_scheme

    if art is not None and layout_scheme((art.config or {}).get("quantization_config"))[0].dynamic_activations:
        return {}
    return {"quantization_config": CompressedTensorsConfig(dequantize=True)}


def open_runner(art: Artifact, runtime: str, reference: Reference, device: str) -> Runner:
    if runtime == "llama.cpp":
        return LlamaCppRunner(art.path, reference.ctx, int(os.environ.get("QCONVERT_THREADS", "0")))
    if runtime == "onnxruntime":
        return OnnxRunner(art.path, device)
    if runtime == "qconvert-dequant":
        return DequantRunner(art, device)
    if runtime == "gptqmodel":
        return GPTQModelRunner(art.path, device)
    if runtime == "transformers":
        dtype = reference_dtype(device, reference.dtype if reference.device == device else None)
        if art.kind == CT_KIND:
            return TransformersRunner(art.path, device, dtype, **compressed_tensors_options(art))
        return TransformersRunner(art.path, device, dtype)
    raise VerifyError(f"unknown runtime {runtime!r}; one of llama.cpp, onnxruntime, qconvert-dequant, gptqmodel, "
                      "transformers.")


# ------------------------------------------------------------------------------------------------------------
# size and bits per weight


def artifact_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def bits_per_weight(art: Artifact, reference: Reference) -> float:
    """Stored bits per weight of the decoder-layer matrices (embedding, output projection and norms excluded)."""
    if art.kind == "gguf":
        ts = [t for t in art.gguf.tensors.values() if t.name.startswith("blk.") and len(t.shape) == 2]
        return 8.0 * sum(t.nbytes for t in ts) / max(1, sum(int(np.prod(t.shape)) for t in ts))
    if art.kind == CT_KIND:
        return _compressed_bits_per_weight(art)
    if art.kind in ("gptq", "awq", "hf"):
        from qconvert.io.safetensors import SafetensorsCheckpoint

        entries = SafetensorsCheckpoint(art.path).entries
        q = (art.config or {}).get("quantization_config") or {}
        bits, n_bytes, n_weights = int(q.get("bits") or 16), 0, 0
        for name, e in entries.items():
            if not name.startswith("model.layers."):
                continue
            if name.endswith(".qweight"):
                module = name[: -len(".qweight")]
                rows, cols = e.shape
                n_weights += rows * 32 // bits * cols if art.kind == "gptq" else rows * cols * 8
                n_bytes += sum(entries[f"{module}.{k}"].nbytes for k in ("qweight", "qzeros", "scales", "g_idx")
                               if f"{module}.{k}" in entries)
            elif name.endswith(".weight") and len(e.shape) == 2:
                n_weights += int(np.prod(e.shape))
                n_bytes += e.nbytes
        return 8.0 * n_bytes / max(1, n_weights)
    return _onnx_bits_per_weight(art.path, reference.n_vocab)


def _compressed_bits_per_weight(art: Artifact) -> float:
    """Stored bits per weight of a compressed-tensors checkpoint's decoder matrices (packed codes, scales, zero
    points and shapes over the weights they hold)."""
    from qconvert.int4.formats import CT_TENSORS, layout_scheme
    from qconvert.io.safetensors import SafetensorsCheckpoint

    entries = SafetensorsCheckpoint(art.path).entries
    _, scheme = layout_scheme((art.config or {}).get("quantization_config"))
    n_bytes = n_weights = 0
    for name, e in entries.items():
        if name.startswith("model.layers.") and name.endswith(".weight_packed"):
            module = name[: -len(".weight_packed")]
            n_weights += e.shape[0] * e.shape[1] * 32 // scheme.bits
            n_bytes += sum(entries[f"{module}.{k}"].nbytes for k in CT_TENSORS if f"{module}.{k}" in entries)
        elif name.startswith("model.layers.") and name.endswith(".weight") and len(e.shape) == 2:
            n_weights += int(np.prod(e.shape))
            n_bytes += e.nbytes
        elif name.startswith("model.layers.") and name.endswith(".weight_scale") and \
                name.removesuffix("_scale") in entries:  # W8A8: an int8 weight's scales
            n_bytes += e.nbytes
    return 8.0 * n_bytes / max(1, n_weights)


def _onnx_bits_per_weight(path: Path, n_vocab: int) -> float:
    """Bits per weight of the MatMul / MatMulNBits weights (initializers) of an ONNX graph, lm_head excluded."""
    import onnx

    model = path / "model.onnx" if path.is_dir() else path
    g = onnx.load(str(model), load_external_data=False).graph
    inits = {t.name: t for t in g.initializer}

    def nbytes(t: Any) -> int:
        return int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize

    n_bytes = n_weights = 0
    for node in g.node:
        weights = [inits[i] for i in node.input if i in inits]
        if not weights:
            continue
        attr: dict[str, int] = {}
        if node.op_type == "MatMulNBits":
            attr = {a.name: a.i for a in node.attribute}
            count = attr["K"] * attr["N"]
        elif node.op_type == "MatMul" and len(weights) == 1 and len(weights[0].dims) == 2:
            count = int(np.prod(weights[0].dims))
        else:
            continue
        if n_vocab in (attr.get("N"), *weights[0].dims):
            continue  # the output projection, like the embedding, is not a decoder matrix
        n_bytes, n_weights = n_bytes + sum(nbytes(t) for t in weights), n_weights + count
    return 8.0 * n_bytes / max(1, n_weights)


# ------------------------------------------------------------------------------------------------------------


def verify_artifact(artifact: Path, reference: Reference, *, device: str = "cpu", runtime: str | None = None,
                    name: str | None = None, progress: bool = True,
                    on_window: Callable[[int], None] | None = None,
                    on_scored: Callable[[int, metrics.PositionStats], None] | None = None) -> ArtifactResult:
    """Run ``artifact`` in its runtime over the reference's windows and compare with the cached reference.

    ``on_window(w)`` after each window (progress); ``on_scored(w, stats)`` gets each window's per-position
    statistics (NLL, KL, ...), e.g. for paired comparisons of two artifacts on the same tokens."""
    import torch

    art = detect(Path(artifact))
    runtime = runtime or DEFAULT_RUNTIME[art.kind]
    if runtime not in runtimes_for(art.kind):
        raise VerifyError(f"{art.path.name} is a {art.kind} artifact; it runs in {', '.join(runtimes_for(art.kind))}, "
                          f"not {runtime}.")
    device = resolve_device(device)
    notes: list[str] = []
    if art.kind == "gguf":
        check_gguf_vocab(art, reference)
        limit = art.gguf.metadata.get("qwen2.context_length")
        if limit and reference.ctx > int(limit):
            raise VerifyError(f"--ctx {reference.ctx} is longer than {art.path.name} supports ({limit} tokens).")
        if device != "cpu":
            notes.append("llama.cpp ran on the CPU: the llama-cpp-py-sync wheel has no CUDA backend")
            device = "cpu"
    elif art.path.is_dir():
        check_dir_vocab(art.path, reference)
        if art.config:
            check_ctx(art.config, reference.ctx, art.path.name)
            if int(art.config.get("vocab_size", reference.n_vocab)) != reference.n_vocab:
                raise TokenizerError(f"{art.path.name} has vocab_size {art.config['vocab_size']}, the reference "
                                     f"{reference.n_vocab}; verify it against the checkpoint it was made from.")
    runner = open_runner(art, runtime, reference, device)
    stats = []
    try:
        for w, logits in enumerate(runner.scored(reference.windows, reference.first, progress)):
            if logits.shape != (reference.n_scored, reference.n_vocab):
                raise VerifyError(f"{art.path.name} returned logits {tuple(logits.shape)}, expected "
                                  f"{(reference.n_scored, reference.n_vocab)}; its vocabulary differs from the "
                                  "reference's.")
            tgt = torch.from_numpy(reference.targets(w)).to(logits.device)
            stats.append(metrics.compare(logits, tgt, reference.window_topk(w)))
            if on_scored is not None:
                on_scored(w, stats[-1])
            if on_window is not None:
                on_window(w)
    finally:
        runner.close()
    return aggregate(stats, ppl_ref=reference.ppl, top_k=reference.topk.ids.shape[1], name=name or art.path.name,
                     kind=art.kind, bits_per_weight=bits_per_weight(art, reference),
                     size_bytes=artifact_size(art.path), tokens_per_s=reference.windows.size / max(runner.seconds, 1e-9),
                     tokens_sha256=reference.tokens_sha256, runtime=runtime, format=art.format, device=device,
                     ctx=reference.ctx, n_windows=len(reference.windows), n_params=reference.n_params,
                     path=str(art.path), notes=tuple(notes))
