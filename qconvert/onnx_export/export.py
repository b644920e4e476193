"""``export_onnx``: a Qwen2 checkpoint -> an onnxruntime / onnxruntime-genai model directory.

    checkpoint (lazy) ──> [int4/int8: rtn | calibrate(gptq|awq) | --from GPTQ/AWQ dir] ──> MatMulNBits initializers
                     └──> float tensors (embedding, norms, biases, lm_head, fp32/fp16 linears)
    graph.build_model pulls each initializer as it needs it (InitializerStore: inline or model.onnx.data)
    + genai_config.json, tokenizer files, config.json, README.md (qconvert.card); built in a temporary sibling,
    renamed at the end

Output directory ``<model>-onnx-<precision>/``::

    model.onnx [+ model.onnx.data]   the decoder (graph.py documents inputs/outputs)
    genai_config.json                onnxruntime-genai's description of it
    tokenizer.json, tokenizer_config.json, vocab.json, merges.txt, ... (copied), config.json (without
    quantization_config), README.md (model card)

Layout of weights: fp32/fp16 store every float tensor in that type; int4 / int8 store the decoder linears as 4- /
8-bit MatMulNBits (block size = group size; symmetric weights without zero points), the embedding as
GatherBlockQuantized and the lm_head as MatMulNBits (symmetric RTN, ``table_bits`` 4 or 8 in blocks of
``table_block_size``; tied: one set of initializers for both), and keep norms and biases float32.
``quantize_embedding=False`` (CLI ``--keep-embedding-float``) keeps the embedding and lm_head float32 (a tied one is
one initializer for Gather and Gemm). MatMulNBits runs at ``accuracy_level`` (default 4, int8 activations, as
onnxruntime-genai's builder on CPU; 0 computes with exactly the dequantized weights). ``attention`` picks the graph's
attention (``graph.ATTENTIONS``): fused GroupQueryAttention (default; genai_config shares the past and present
buffers) or explicit ops.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert import __version__
from qconvert.card import onnx_card
from qconvert.errors import CheckpointError, UsageError
from qconvert.io.atomic import StagedDirectory
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.onnx_export import graph, matmulnbits
from qconvert.onnx_export.graph import Dims, FloatLinear, QuantEmbedding, QuantLinear
from qconvert.onnx_export.writer import INLINE_LIMIT, InitializerStore
from qconvert.registry import read_model_config, spec_for_config

if TYPE_CHECKING:
    from qconvert.calibration.quantize import CalibrationSettings
    from qconvert.calibset import CalibrationSet
    from qconvert.int4.rtn import QuantizedLinear

PRECISIONS = ("fp32", "fp16", "int4", "int8")
ALGOS = ("rtn", "gptq", "awq")
MODEL_FILE = "model.onnx"
GENAI_CONFIG = "genai_config.json"
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
TABLE_CHUNK = 1 << 24  # weights of the embedding / lm_head quantized per RTN call (64 MB of float32)
Progress = Callable[[int, int], None]


def output_dir_name(model: str, precision: str) -> str:
    """``Qwen/Qwen2.5-0.5B-Instruct`` + int4 -> ``qwen2.5-0.5b-instruct-onnx-int4`` (a GPTQ/AWQ suffix is dropped)."""
    base = model.rstrip("/").split("/")[-1].lower()
    for suffix in ("-gptq-int4", "-gptq-int8", "-awq"):
        base = base.removesuffix(suffix)
    return f"{base}-onnx-{precision}"


@dataclass(frozen=True)
class Tables:
    """How the embedding / lm_head are quantized: symmetric RTN, ``bits`` 4 or 8, blocks of ``block_size`` columns."""

    bits: int
    block_size: int


class Weights:
    """The graph's ``WeightSource``: float tensors read lazily from the checkpoint, quantized linears given up front."""

    def __init__(self, ckpt: SafetensorsCheckpoint, store: InitializerStore, dims: Dims, weight_type: np.dtype,
                 quantized: Mapping[str, QuantLinear], floats: Mapping[str, np.ndarray], *,
                 accuracy_level: int = matmulnbits.DEFAULT_ACCURACY_LEVEL, tables: Tables | None = None) -> None:
        self.ckpt, self.store, self.dims = ckpt, store, dims
        self.weight_type = np.dtype(weight_type)
        self.accuracy_level = accuracy_level
        self.quantized = quantized
        self.floats = floats  # replacements (AWQ's rescaled norm gains), HF names
        self.tables = tables  # embedding / lm_head quantization; None: keep them float
        self._tied_head: QuantLinear | None = None

    def _read(self, name: str) -> np.ndarray:
        if name in self.floats:
            return np.asarray(self.floats[name], np.float32)
        if name not in self.ckpt.entries:
            raise CheckpointError(f"{self.ckpt.dir}: tensor {name!r} is missing; the checkpoint is incomplete or not "
                                  "a Qwen2 model. Re-download or re-save it.")
        return self.ckpt.read_f32(name)

    def linear(self, module: str) -> FloatLinear | QuantLinear:
        if module in self.quantized:
            return self.quantized[module]
        w = self._read(f"{module}.weight")  # [N, K] -> MatMul's [K, N]
        return FloatLinear(self.store.add(f"{module}.weight_T", w.T.astype(self.weight_type)))

    def qkv(self, prefix: str) -> FloatLinear | QuantLinear | None:
        """q, k and v of the attention block ``prefix`` as one linear (rows q, k, v), or None when they stay apart
        (quantized with different bits). Float weights are concatenated here, quantized ones by QuantizedLinears."""
        packed = f"{prefix}.{QKV_PROJ}"
        if packed in self.quantized:
            return self.quantized[packed]
        if any(f"{prefix}.{r}" in self.quantized for r in QKV):
            return None
        w = np.concatenate([self._read(f"{prefix}.{r}.weight") for r in QKV])  # [N_q + 2 N_kv, K]
        return FloatLinear(self.store.add(f"{packed}.weight_T", w.T.astype(self.weight_type)))

    def bias(self, module: str) -> str | None:
        prefix, _, role = module.rpartition(".")
        parts = [f"{prefix}.{r}.bias" for r in QKV] if role == QKV_PROJ else [f"{module}.bias"]
        present = [n for n in parts if n in self.ckpt.entries]
        if not present:
            return None
        if len(present) < len(parts):  # a packed q/k/v with some biases: the others are zero
            raise CheckpointError(f"{self.ckpt.dir}: {prefix} has biases for {', '.join(present)} only; a Qwen2 "
                                  "checkpoint has q, k and v biases. Re-download or re-save it.")
        return self.store.add(f"{module}.bias", np.concatenate([self._read(n) for n in parts]))

    def norm(self, name: str) -> str:
        return self.store.add(name, self._read(name))

    def embedding(self) -> str | QuantEmbedding:
        name = "model.embed_tokens.weight"
        if self.tables is None:
            return self.store.add(name, self._read(name).astype(self.weight_type, copy=False))
        if self.dims.tie_word_embeddings:
            h = self._tied_table()
            return QuantEmbedding(h.b, h.scales, h.zero_points, h.n, h.k, h.block_size, h.bits, tied=True)
        w = _rtn_table(self._read(name), self.tables, matmulnbits.GATHER, name)
        zp = None if w.zero_points is None else self.store.add("model.embed_tokens.zero_points", w.zero_points)
        return QuantEmbedding(self.store.add("model.embed_tokens.qweight_nbits", w.data),
                              self.store.add("model.embed_tokens.scales", w.scales), zp, w.rows, w.cols, w.block_size,
                              w.bits, tied=False)

    def lm_head(self) -> str | QuantLinear:
        if self.dims.tie_word_embeddings:
            return "model.embed_tokens.weight" if self.tables is None else self._tied_table()
        head = self._read("lm_head.weight")
        if self.tables is None:
            return self.store.add("lm_head.weight", head.astype(self.weight_type, copy=False))
        return store_block(self.store, "lm_head", _rtn_table(head, self.tables, matmulnbits.MATMUL, "lm_head"))

    def _tied_table(self) -> QuantLinear:
        """The tied embedding / lm_head, quantized and stored once in MatMulNBits' layout; the embedding's
        GatherBlockQuantized reads the same initializers through a Reshape (graph.QuantEmbedding says why). onnxruntime
        1.31 accepts that for every table width and block size offered (4 / 8 bits, blocks 16-128)."""
        if self._tied_head is None:
            assert self.tables is not None
            table = _rtn_table(self._read("model.embed_tokens.weight"), self.tables, matmulnbits.MATMUL,
                               "the tied embedding / lm_head")
            self._tied_head = store_block(self.store, "lm_head", table)
        return self._tied_head

    def const(self, name: str, value: np.ndarray) -> str:
        return name if name in self.store.names else self.store.add(name, value)


QKV = ("q_proj", "k_proj", "v_proj")
QKV_PROJ = "qkv_proj"  # the packed q/k/v linear of one attention block: rows q, then k, then v


class QuantizedLinears:
    """MatMulNBits weights written as they come (streaming). q, k and v of one attention block are held until all
    three are there and written as one ``<prefix>.qkv_proj`` weight (rows q, k, v; one MatMulNBits node instead of
    three, as onnxruntime-genai's builder does) when they share bits and block size (not so for ``mixed_precision``,
    whose v_proj may be 8-bit): then ``refs`` holds the packed weight, else each."""

    def __init__(self, store: InitializerStore) -> None:
        self.store = store
        self.refs: dict[str, QuantLinear] = {}
        self._pending: dict[str, dict[str, matmulnbits.BlockWeight]] = {}

    def add(self, module: str, w: matmulnbits.BlockWeight) -> None:
        prefix, _, role = module.rpartition(".")
        if role not in QKV:
            self.refs[module] = store_block(self.store, module, w)
            return
        group = self._pending.setdefault(prefix, {})
        group[role] = w
        if len(group) < len(QKV):
            return
        del self._pending[prefix]
        parts = [group[r] for r in QKV]
        if len({(p.bits, p.block_size, p.cols) for p in parts}) == 1:
            self.refs[f"{prefix}.{QKV_PROJ}"] = store_block(self.store, f"{prefix}.{QKV_PROJ}",
                                                            matmulnbits.concat_rows(parts))
        else:
            for r, part in zip(QKV, parts, strict=True):
                self.refs[f"{prefix}.{r}"] = store_block(self.store, f"{prefix}.{r}", part)

    def add_quantized(self, module: str, q: QuantizedLinear) -> None:
        """Convert one ``QuantizedLinear`` to MatMulNBits and add it."""
        self.add(module, matmulnbits.from_quantized(q, module))

    def clear(self) -> None:
        self.refs.clear()
        self._pending.clear()


def store_block(store: InitializerStore, module: str, w: matmulnbits.BlockWeight) -> QuantLinear:
    """Write one MatMulNBits weight's initializers now (streaming)."""
    zp = None if w.zero_points is None else store.add(f"{module}.zero_points", w.zero_points)
    return QuantLinear(store.add(f"{module}.qweight_nbits", w.data), store.add(f"{module}.scales", w.scales), zp,
                       w.rows, w.cols, w.block_size, w.bits)


def _rtn_table(w: np.ndarray, tables: Tables, op: str, where: str) -> matmulnbits.BlockWeight:
    """Symmetric RTN of an embedding / lm_head [vocab, hidden] (``where``) in blocks of ``tables.block_size`` hidden
    columns, as ``op``'s initializers. Quantized TABLE_CHUNK weights at a time: RTN's float temporaries are several
    times their input, and a 72B table alone is 5 GB of float32 (exact: blocks never span rows)."""
    rows = max(1, TABLE_CHUNK // w.shape[1])
    return matmulnbits.concat_rows([_rtn_blocks(np.ascontiguousarray(w[i:i + rows], np.float32), tables, op)
                                    for i in range(0, w.shape[0], rows)])


def _rtn_blocks(w: np.ndarray, tables: Tables, op: str) -> matmulnbits.BlockWeight:
    """w f32 [rows, cols] -> symmetric RTN per block of ``tables.block_size`` columns. RTN with one group per row of
    the [rows · n_blocks, bs] view is exactly group-wise RTN, also for blocks of 16 (below qconvert's group sizes)."""
    import torch

    from qconvert.int4 import rtn

    rows, cols, bs = w.shape[0], w.shape[1], tables.block_size
    q = rtn(torch.from_numpy(w.reshape(-1, bs)), tables.bits, -1, sym=True)  # [rows·n_blocks, bs]
    nb = cols // bs
    return matmulnbits.from_codes(q.codes.numpy().reshape(rows, cols), q.scales.numpy().reshape(rows, nb),
                                  q.zeros.numpy().reshape(rows, nb), tables.bits, bs, op)


@dataclass(frozen=True)
class _Plan:
    """Checked inputs of one export."""

    src: Path  # where config, float tensors and tokenizer come from (from_dir for --from)
    config: dict[str, Any]
    dims: Dims
    linears: dict[str, tuple[int, int]]  # module -> (out, in)
    scheme: matmulnbits.PrequantizedScheme | None
    block_size: int  # linears' block size: as asked, else the --from checkpoint's group size, else 128
    bits: int | None  # decoder linears' MatMulNBits bits (int4: 4, int8: 8); None: float linears
    tables: Tables | None  # embedding / lm_head quantization; None: float32
    wide: frozenset[str] = frozenset()  # int4 mixed precision: the linears written at 8 bits

    def linear_bits(self, module: str) -> int:
        assert self.bits is not None
        return 8 if module in self.wide else self.bits


MIXED_ROLES = ("self_attn.v_proj", "mlp.down_proj")  # llama.cpp's attn_v / ffn_down


def mixed_precision_layers(n_layers: int) -> list[int]:
    """The layers whose v_proj and down_proj an int4 ``mixed_precision`` export writes at 8 bits: llama.cpp's
    ``use_more_bits`` layers (first and last eighth, every third in between), where Q4_K_M gives attn_v / ffn_down
    Q6_K (the onnxruntime-genai builder's ``mixed_layers`` selector picks the same layers)."""
    from qconvert.gguf.plan import use_more_bits

    return [i for i in range(n_layers) if use_more_bits(i, n_layers)]


def _check(model_dir: Path, precision: str, algo: str, from_dir: Path | None, block_size: int | None,
           accuracy_level: int, quantize_embedding: bool, table_bits: int, table_block_size: int,
           mixed_precision: bool = False) -> _Plan:
    """Every refusal that does not need weights, before anything is created."""
    from qconvert.int4.writer import qwen2_linear_shapes

    matmulnbits.check_accuracy_level(accuracy_level)
    if not isinstance(mixed_precision, bool):
        raise UsageError(f"mixed_precision must be True or False (got {mixed_precision!r}).")
    if mixed_precision and precision != "int4":
        raise UsageError(f"--mixed-precision writes some int4 linears at 8 bits; it applies to --precision int4 only "
                         f"(got {precision}).")
    if mixed_precision and (from_dir is not None or algo != "rtn"):
        what = "--from" if from_dir is not None else f"--algo {algo}"
        raise UsageError(f"--mixed-precision re-quantizes v_proj / down_proj of some layers with 8-bit round-to-nearest; "
                         f"it works with --algo rtn only, not {what} (whose 4-bit weights would be replaced). Drop "
                         "--mixed-precision, or use --algo rtn.")
    if not isinstance(quantize_embedding, bool):
        raise UsageError(f"quantize_embedding must be True or False (got {quantize_embedding!r}).")
    if precision not in PRECISIONS:
        raise UsageError(f"precision {precision!r} is not supported; use one of {', '.join(PRECISIONS)}.")
    if algo not in ALGOS:
        raise UsageError(f"algorithm {algo!r} is not supported; use one of {', '.join(ALGOS)}.")
    bits = matmulnbits.PRECISION_BITS.get(precision)
    if bits is None and (from_dir is not None or algo != "rtn"):
        what = "--from" if from_dir is not None else f"--algo {algo}"
        raise UsageError(f"{what} quantizes to 4 or 8 bits and cannot give a {precision} model; use --precision int4 "
                         f"(or int8), or drop {what} for a {precision} export.")
    if bits == 8 and algo == "awq":
        raise UsageError("--algo awq writes 4-bit weights only (AWQ checkpoints are 4-bit); use --precision int4 "
                         "with AWQ, or --algo rtn / gptq for an int8 export.")
    matmulnbits.check_bits(table_bits, "embedding / lm_head tables", "--table-bits")
    src = Path(from_dir) if from_dir is not None else Path(model_dir)
    config_file = src / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{src} has no config.json; is this a Hugging Face model directory?")
    config = read_model_config(src)
    spec = spec_for_config(config)
    dims = Dims.from_config(config)
    shapes = qwen2_linear_shapes(config)
    linears = {f"{spec.block_prefix}.{i}.{sub}": shapes[sub] for i in range(dims.num_layers)
               for group in spec.sequential for sub in group}
    scheme = None
    if from_dir is not None:
        scheme = matmulnbits.read_scheme(src)
        if scheme.bits != bits:
            raise UsageError(f"--from {src} holds {scheme.bits}-bit {scheme.method.upper()} weights and --precision "
                             f"{precision} writes {bits}-bit MatMulNBits; the export never requantizes. Use --precision "
                             f"int{scheme.bits}, or quantize the float model with --precision {precision} (no --from).")
        block_size = scheme.group_size if block_size is None else block_size
        if scheme.group_size != block_size:
            raise UsageError(f"--from {src} has group size {scheme.group_size}; MatMulNBits' block size must equal it "
                             f"(no requantization). Pass --block-size {scheme.group_size} (or leave it out).")
        if scheme.desc_act:
            ckpt = SafetensorsCheckpoint(src)
            first = next(iter(linears))
            g_idx = ckpt.read_raw(f"{first}.g_idx").astype(np.int64) if f"{first}.g_idx" in ckpt.entries else None
            if g_idx is not None and not np.array_equal(g_idx, np.arange(len(g_idx)) // block_size):
                raise CheckpointError(f"--from {src} was quantized with act-order (desc_act) and its group indices are "
                                      "permuted; MatMulNBits groups consecutive columns only, so it cannot map without "
                                      "requantization. Re-quantize with --static-groups or without --act-order.")
    block_size = 128 if block_size is None else block_size
    tables = None
    if bits is not None:
        if quantize_embedding:  # GatherBlockQuantized / MatMulNBits blocks run along the hidden axis
            matmulnbits.check_block_size(table_block_size, dims.hidden_size,
                                         f"the embedding / lm_head [{dims.vocab_size}, {dims.hidden_size}] "
                                         "(--keep-embedding-float keeps them float32)",
                                         matmulnbits.TABLE_BLOCK_SIZES, "--table-block-size")
            tables = Tables(table_bits, table_block_size)
        for sub in (s for group in spec.sequential for s in group):
            matmulnbits.check_block_size(block_size, shapes[sub][1], f"{spec.block_prefix}.*.{sub} {list(shapes[sub])}")
    wide = frozenset(f"{spec.block_prefix}.{i}.{role}" for i in mixed_precision_layers(dims.num_layers)
                     for role in MIXED_ROLES) if mixed_precision else frozenset()
    return _Plan(src, config, dims, linears, scheme, block_size, bits, tables, wide)


def _planned_bytes(plan: _Plan, precision: str, attention: str) -> int:
    """Bytes of initializers the export will write (decides inline vs external data; zero points counted)."""
    ckpt = SafetensorsCheckpoint(plan.src)
    per = 2 if precision == "fp16" else 4
    floats = sum(int(np.prod(e.shape)) for n, e in ckpt.entries.items() if not n.endswith(("qweight", "qzeros", "g_idx", "scales")))
    if attention == graph.GQA:  # the rotary cos / sin tables
        floats += plan.dims.max_positions * plan.dims.head_dim
    if plan.bits is None:
        return floats * per
    bs = plan.block_size
    quant = sum(n * k * plan.linear_bits(m) // 8 + 4 * n * k // bs + n * k // bs for m, (n, k) in plan.linears.items())
    quantized_floats = sum(n * k for n, k in plan.linears.values()) if plan.scheme is None else 0
    if plan.tables is not None:  # the embedding and an untied lm_head, RTN-quantized here (symmetric: no zero points)
        tables, v, h = 1 if plan.dims.tie_word_embeddings else 2, plan.dims.vocab_size, plan.dims.hidden_size
        quant += tables * (v * h * plan.tables.bits // 8 + 4 * v * h // plan.tables.block_size)
        quantized_floats += tables * v * h
    return (floats - quantized_floats) * per + quant


def export_onnx(model_dir: Path, out_dir: Path, *, precision: str, algo: str = "rtn", from_dir: Path | None = None,
                block_size: int | None = None, calib: CalibrationSet | None = None,
                settings: CalibrationSettings | None = None,
                model_name: str | None = None, force: bool = False, progress: Progress | None = None,
                inline_limit: int = INLINE_LIMIT, accuracy_level: int = matmulnbits.DEFAULT_ACCURACY_LEVEL,
                quantize_embedding: bool = True, table_bits: int = matmulnbits.DEFAULT_TABLE_BITS,
                table_block_size: int = matmulnbits.DEFAULT_TABLE_BLOCK_SIZE,
                attention: str = graph.DEFAULT_ATTENTION, mixed_precision: bool = False) -> Path:
    """Export ``model_dir`` (or the GPTQ/AWQ checkpoint ``from_dir``) to ``out_dir/<model>-onnx-<precision>/``.

    ``precision``: fp32 | fp16 | int4 | int8. For int4 / int8 (4- / 8-bit MatMulNBits linears), ``algo`` rtn needs
    nothing else; gptq (and awq, int4 only) need ``calib`` (and run on ``settings.device``); ``from_dir`` converts an
    existing checkpoint of that width without requantization (``block_size`` must equal its group size; None: that
    group size, else 128). int4 / int8 also quantize the embedding (GatherBlockQuantized) and lm_head (MatMulNBits)
    with symmetric RTN, ``table_bits`` 4 or 8 in blocks of ``table_block_size`` (a power of two >= 16 dividing the
    hidden size), unless ``quantize_embedding`` is False, and run MatMulNBits at ``accuracy_level`` (0, 1, 2 or 4; see
    ``matmulnbits.ACCURACY_LEVELS``); all are ignored for fp32/fp16. ``attention``: ``gqa`` (GroupQueryAttention, the
    default) or ``plain`` (``graph.ATTENTIONS``), for every precision. ``mixed_precision`` (int4 RTN only) writes
    v_proj and down_proj of ``mixed_precision_layers`` at 8 bits, as llama.cpp's Q4_K_M protects attn_v / ffn_down. ``model_name`` (default: the source directory's
    name) names the output. Returns the output directory. Built in a temporary sibling, renamed into place when
    complete; an existing output is replaced only with ``force``.
    """
    if attention not in graph.ATTENTIONS:
        raise UsageError(f"attention {attention!r} is not supported; use one of "
                         + ", ".join(f"{k} ({v})" for k, v in graph.ATTENTIONS.items()) + ".")
    plan = _check(model_dir, precision, algo, from_dir, block_size, accuracy_level, quantize_embedding, table_bits,
                  table_block_size, mixed_precision)
    calibrated = plan.bits is not None and from_dir is None and algo != "rtn"
    if calibrated and calib is None:
        raise UsageError(f"--algo {algo} needs calibration data; pass a CalibrationSet (CLI: --calib builtin).")
    name = model_name or plan.src.name
    final = Path(out_dir) / output_dir_name(name, precision)
    staged = StagedDirectory(final, force=force, inputs=(model_dir, from_dir))
    tmp = staged.tmp
    try:
        start = time.perf_counter()
        external = _planned_bytes(plan, precision, attention) > inline_limit
        store = InitializerStore(tmp, external=external)
        weights = _weights(plan, store, precision, algo, calib, settings, progress, accuracy_level)
        meta = {"qconvert.version": __version__, "qconvert.source": name, "qconvert.precision": precision,
                "qconvert.algo": _algo_label(algo, plan), "qconvert.block_size": str(plan.block_size),
                "qconvert.attention": attention}
        if plan.bits is not None:
            t = plan.tables
            meta |= {"qconvert.accuracy_level": str(accuracy_level),
                     "qconvert.embedding": "float32" if t is None else _table_label(t, matmulnbits.GATHER),
                     "qconvert.lm_head": "float32" if t is None else _table_label(t, matmulnbits.MATMUL)}
            if plan.wide:
                meta["qconvert.mixed_precision"] = _mixed_label(plan)
        model = graph.build_model(plan.dims, weights, None if calibrated else progress, meta, attention)
        store.save(model, tmp / MODEL_FILE)
        _write_side_files(tmp, plan, name, precision, algo, external, time.perf_counter() - start, store.nbytes,
                          calib, settings, accuracy_level, attention)
        staged.commit()
    finally:
        staged.discard()
    return final


def _table_label(t: Tables, op: str) -> str:
    """``int4 GatherBlockQuantized (RTN sym, block 32)``: the metadata value of a quantized table."""
    return f"int{t.bits} {op} (RTN sym, block {t.block_size})"


def _mixed_label(plan: _Plan) -> str:
    """``int8 v_proj, down_proj in layers 0, 1, 4, ...``: the metadata / card text of a mixed-precision export."""
    layers = mixed_precision_layers(plan.dims.num_layers)
    return (f"int8 {', '.join(r.split('.')[-1] for r in MIXED_ROLES)} in layers {', '.join(map(str, layers))} "
            f"({len(layers)} of {plan.dims.num_layers})")


def _algo_label(algo: str, plan: _Plan) -> str:
    if plan.bits is None:
        return "none"
    return f"{plan.scheme.method} (--from)" if plan.scheme is not None else algo


def _weights(plan: _Plan, store: InitializerStore, precision: str, algo: str, calib: CalibrationSet | None,
             settings: CalibrationSettings | None, progress: Progress | None, accuracy_level: int) -> Weights:
    """Quantize (or read) the int4 / int8 linears into ``store`` first; float tensors are pulled later by the graph."""
    ckpt = SafetensorsCheckpoint(plan.src)
    weight_type = np.dtype(np.float16 if precision == "fp16" else np.float32)
    quantized = QuantizedLinears(store)
    floats: dict[str, np.ndarray] = {}
    if plan.bits is not None:
        if plan.scheme is not None:
            for module in plan.linears:
                quantized.add_quantized(module, matmulnbits.read_prequantized(ckpt, module, plan.scheme))
        elif algo == "rtn":
            _rtn(ckpt, plan, quantized)
        else:
            _calibrated(plan, store, algo, calib, settings, progress, quantized, floats)
    return Weights(ckpt, store, plan.dims, weight_type, quantized.refs, floats, accuracy_level=accuracy_level,
                   tables=plan.tables)


def _rtn(ckpt: SafetensorsCheckpoint, plan: _Plan, quantized: QuantizedLinears) -> None:
    """Symmetric round-to-nearest, one weight at a time (no forward pass): zero point 2^(bits-1), so no zero_points."""
    import torch

    from qconvert.int4 import rtn

    assert plan.bits is not None
    for module in plan.linears:
        w = torch.from_numpy(ckpt.read_f32(f"{module}.weight"))
        quantized.add_quantized(module, rtn(w, plan.linear_bits(module), plan.block_size, sym=True))


def _calibrated(plan: _Plan, store: InitializerStore, algo: str, calib: CalibrationSet | None,
                settings: CalibrationSettings | None, progress: Progress | None, quantized: QuantizedLinears,
                floats: dict[str, np.ndarray]) -> None:
    """GPTQ (symmetric, no act-order; 4 or 8 bits) or AWQ (4-bit, zero points) through the calibration driver."""
    from qconvert.calibration.quantize import CalibrationSettings, calibrate
    from qconvert.constants import DEFAULT_HOLDOUT
    from qconvert.int4 import AWQConfig, GPTQConfig

    assert calib is not None and plan.bits is not None
    cfg = (GPTQConfig(bits=plan.bits, group_size=plan.block_size) if algo == "gptq"
           else AWQConfig(group_size=plan.block_size))

    def on_linear(module: str, q: QuantizedLinear) -> None:
        quantized.add_quantized(module, q)

    def on_float(name: str, t: Any) -> None:
        floats[name] = t.detach().float().cpu().numpy()

    mark = store.mark()

    def on_restart() -> None:  # the guard's model-level check chose round-to-nearest: everything comes again
        store.rollback(mark)
        quantized.clear()
        floats.clear()

    calibrate(plan.src, calib.ids, algo, cfg, on_linear, on_float, settings or CalibrationSettings(), progress,
              holdout=DEFAULT_HOLDOUT, on_restart=on_restart)  # the held-out guard, as for the GPTQ/AWQ checkpoints


# ------------------------------------------------------------------------------------------------------------
# Side files


def genai_config(config: Mapping[str, Any], generation: Mapping[str, Any], dims: Dims, precision: str,
                 device: str = "cpu", attention: str = graph.DEFAULT_ATTENTION) -> dict[str, Any]:
    """onnxruntime-genai's ``genai_config.json`` for the graph's decoder contract (graph.py).

    ``gqa``: GroupQueryAttention writes into a past buffer of the generation's full length, so past and present share
    it (``past_present_share_buffer``) and there is no ``position_ids`` input. ``plain``: the KV cache grows by
    concatenation (present = past + new), so the buffers are not shared.
    """
    fused = attention == graph.GQA
    inputs = {"input_ids": graph.INPUT_IDS, "attention_mask": graph.ATTENTION_MASK,
              "position_ids": graph.POSITION_IDS, "past_key_names": graph.PAST_KEY, "past_value_names": graph.PAST_VALUE}
    if fused:
        del inputs["position_ids"]
    eos = generation.get("eos_token_id", config.get("eos_token_id"))
    eos_list = eos if isinstance(eos, list) else [eos]
    pad = generation.get("pad_token_id", config.get("pad_token_id")) or eos_list[0]
    providers: list[dict[str, dict[str, str]]] = [{"cuda": {}}] if device.startswith("cuda") else []
    return {
        "model": {
            "bos_token_id": config.get("bos_token_id", generation.get("bos_token_id")),
            "context_length": int(config.get("max_position_embeddings", 32768)),
            "decoder": {
                "session_options": {"log_id": "onnxruntime-genai", "provider_options": providers},
                "filename": MODEL_FILE,
                "head_size": dims.head_dim,
                "hidden_size": dims.hidden_size,
                "inputs": inputs,
                "outputs": {"logits": graph.LOGITS, "present_key_names": graph.PRESENT_KEY,
                            "present_value_names": graph.PRESENT_VALUE},
                "num_attention_heads": dims.num_heads,
                "num_hidden_layers": dims.num_layers,
                "num_key_value_heads": dims.num_kv_heads,
            },
            "eos_token_id": eos_list if len(eos_list) > 1 else eos_list[0],
            "pad_token_id": pad,
            "type": "qwen2",
            "vocab_size": dims.vocab_size,
        },
        "search": {"diversity_penalty": 0.0, "do_sample": False, "early_stopping": True, "length_penalty": 1.0,
                   "max_length": int(config.get("max_position_embeddings", 32768)), "min_length": 0,
                   "no_repeat_ngram_size": 0, "num_beams": 1, "num_return_sequences": 1,
                   "past_present_share_buffer": fused, "repetition_penalty": 1.0, "temperature": 1.0, "top_k": 1,
                   "top_p": 1.0},
    }


def _write_side_files(tmp: Path, plan: _Plan, name: str, precision: str, algo: str, external: bool, seconds: float,
                      nbytes: int, calib: CalibrationSet | None, settings: CalibrationSettings | None,
                      accuracy_level: int, attention: str) -> None:
    gen_file = plan.src / "generation_config.json"
    generation = json.loads(gen_file.read_text()) if gen_file.is_file() else {}
    device = settings.device if settings is not None else "cpu"
    cfg = genai_config(plan.config, generation, plan.dims, precision, device, attention)
    (tmp / GENAI_CONFIG).write_text(json.dumps(cfg, indent=2) + "\n")
    config = {k: v for k, v in plan.config.items() if k != "quantization_config"}
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in COPIED_FILES:
        if (plan.src / f).is_file():
            shutil.copy2(plan.src / f, tmp / f)
    if not (tmp / "tokenizer.json").is_file():
        raise CheckpointError(f"{plan.src} has no tokenizer.json; onnxruntime-genai needs it next to the model. "
                              "Copy the tokenizer files of the source model into it.")
    label = _algo_label(algo, plan)
    calib_desc = calib.describe() if calib is not None and label in ("gptq", "awq") else None
    final = tmp.name.split(".partial-")[0].lstrip(".")
    tables = None if plan.tables is None else (plan.tables.bits, plan.tables.block_size)
    (tmp / "README.md").write_text(onnx_card(final, name, precision, label, plan.block_size, external, seconds, nbytes,
                                             plan.dims, calib_desc,
                                             accuracy_level=None if plan.bits is None else accuracy_level,
                                             tables=tables, attention=attention,
                                             mixed=_mixed_label(plan) if plan.wide else None))
