"""Checkpoint -> GGUF in one streaming pass: plan the types, write the header, quantize and write tensor by tensor.

Peak memory is about one tensor: its float32 copy plus its encoded bytes (the reader never maps the whole file),
and the next tensor's read overlaps the current one's quantization.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from qconvert.constants import GGMLType
from qconvert.errors import CheckpointError
from qconvert.family import tensor_shapes
from qconvert.gguf.metadata import KV, gguf_metadata
from qconvert.gguf.plan import Plan, get_preset, plan_tensors
from qconvert.gguf.vocab import read_vocab
from qconvert.gguf.writer import GGUFWriter
from qconvert.io.atomic import atomic_output
from qconvert.io.safetensors import SafetensorsCheckpoint
from qconvert.names import quantize_order_key
from qconvert.quant import quantize_rows
from qconvert.registry import ArchSpec, read_model_config, spec_for_config

if TYPE_CHECKING:
    from qconvert.gguf.optimize import HessianSource

FLOAT_PRESETS = frozenset({"F32", "F16", "BF16"})
OPTIMIZE_KEY = "qconvert.optimize"  # what --optimize did (llama.cpp ignores keys it does not know)


@dataclass(frozen=True)
class PlanOptions:
    """llama-quantize's knobs: ``--pure``, ``--output-tensor-type``, ``--token-embedding-type``, ``--tensor-type``."""

    pure: bool = False
    output_tensor_type: GGMLType | None = None
    token_embedding_type: GGMLType | None = None
    tensor_types: tuple[tuple[str, GGMLType], ...] = ()


@dataclass
class ExportResult:
    path: Path | None
    plan: Plan
    bytes_written: int = 0
    seconds: float = 0.0
    warnings: list[str] = field(default_factory=list)
    optimized: dict[str, int] = field(default_factory=dict)  # --optimize: tensors per encoding kept (``KEPT``)


def load_config(model_dir: Path) -> dict[str, Any]:
    config = read_model_config(Path(model_dir))
    quant = (config.get("quantization_config") or {}).get("quant_method")
    if quant:
        raise CheckpointError(f"{model_dir} is an already quantized ({quant}) checkpoint; GGUF conversion needs the "
                              "float (bf16/fp16) checkpoint it was made from. Point --model at that one.")
    return config


def _mapped_tensors(spec: ArchSpec, config: dict, ckpt: SafetensorsCheckpoint) -> dict[str, str]:
    """GGUF name -> checkpoint name, checked against the shapes config.json implies (nothing missing or extra)."""
    names = spec.name_map
    mapped = {names.gguf_name(hf): hf for hf in ckpt.names()}
    if not config.get("tie_word_embeddings", False) and "output.weight" not in mapped:
        raise CheckpointError("config.json says tie_word_embeddings=false but the checkpoint has no lm_head.weight.")
    expected = dict(tensor_shapes(config))
    for gguf_name, shape in expected.items():
        if gguf_name not in mapped:
            raise CheckpointError(f"checkpoint lacks {gguf_name} (HF name for block/role as in config.json); it is incomplete.")
        got = ckpt.entries[mapped[gguf_name]].shape
        if tuple(got) != tuple(shape):
            raise CheckpointError(
                f"tensor {mapped[gguf_name]} has shape {list(got)} but config.json implies {list(shape)}; "
                "the config does not belong to these weights."
            )
    extra = sorted(set(mapped) - set(expected))
    if extra:
        raise CheckpointError(f"checkpoint has tensors config.json does not account for: {', '.join(extra[:5])}.")
    return mapped


def build_plan(config: dict, preset: str, options: PlanOptions, shapes: list[tuple[str, tuple[int, ...]]],
               has_imatrix: bool = False) -> Plan:
    return plan_tensors(
        shapes, preset,
        n_layer=int(config["num_hidden_layers"]), n_head=int(config["num_attention_heads"]),
        n_head_kv=int(config["num_key_value_heads"]),
        pure=options.pure, output_tensor_type=options.output_tensor_type,
        token_embedding_type=options.token_embedding_type, tensor_types=options.tensor_types,
        has_imatrix=has_imatrix,
    )


def metadata_order(kvs: list[KV], preset: str) -> list[KV]:
    """Float files keep the converter's order (file_type and quantization_version after the hparams)."""
    if preset not in FLOAT_PRESETS:
        return kvs
    tail = {kv.key: kv for kv in kvs if kv.key in ("general.file_type", "general.quantization_version")}
    rest = [kv for kv in kvs if kv.key not in tail]
    first_tok = next(i for i, kv in enumerate(rest) if kv.key.startswith("tokenizer."))
    return rest[:first_tok] + [tail["general.file_type"], tail["general.quantization_version"]] + rest[first_tok:]


@dataclass
class Prepared:
    """What a conversion knows before any tensor is encoded: the checkpoint, the name map, the plan, the metadata."""

    ckpt: SafetensorsCheckpoint
    mapped: dict[str, str]  # GGUF name -> checkpoint name
    plan: Plan
    config: dict[str, Any]
    spec: ArchSpec
    model_name: str

    def metadata(self, model_dir: Path, preset: str, extra: Sequence[KV] = ()) -> list[KV]:
        n_params = sum(int(np.prod(self.ckpt.entries[h].shape)) for h in self.mapped.values())
        vocab = read_vocab(model_dir, self.config)  # fail on tokenizer problems before writing anything
        kvs = gguf_metadata(self.spec, self.config, vocab, model_name=self.model_name, model_dir=model_dir,
                            n_params=n_params, file_type=get_preset(preset).file_type)
        return metadata_order(kvs, preset) + list(extra)

    def header_bytes(self, kvs: Sequence[KV]) -> int:
        """The size of the file's header (metadata, tensor infos, padding): independent of the tensors' types."""
        writer = GGUFWriter(Path("/nonexistent/header-only"))
        for kv in kvs:
            writer.add(kv.key, kv.vtype, kv.value, kv.elem_type)
        for entry in self.plan.entries:
            writer.add_tensor_info(entry.name, entry.shape, entry.type)
        return len(writer.header_bytes())


def prepare(model_dir: Path, preset: str, options: PlanOptions = PlanOptions(), *, model_name: str | None = None,
            imatrix: Mapping[str, np.ndarray] | None = None) -> Prepared:
    """Read the checkpoint's config and tensor index, map names, plan the types (no tensor is read)."""
    model_dir = Path(model_dir)
    preset = get_preset(preset).name
    config = load_config(model_dir)
    spec = spec_for_config(config)
    ckpt = SafetensorsCheckpoint(model_dir)
    mapped = _mapped_tensors(spec, config, ckpt)
    order = sorted(mapped, key=quantize_order_key) if preset not in FLOAT_PRESETS else list(mapped)
    plan = build_plan(config, preset, options, [(g, ckpt.entries[mapped[g]].shape) for g in order], bool(imatrix))
    _check_imatrix(imatrix or {}, plan)
    return Prepared(ckpt, {g: mapped[g] for g in order}, plan, config, spec, model_name or model_dir.name)


def export_gguf(model_dir: Path, out_path: Path | None, preset: str, *, options: PlanOptions = PlanOptions(),
                model_name: str | None = None, force: bool = False, imatrix: Mapping[str, np.ndarray] | None = None,
                progress: Callable[[int, int, str], None] | None = None, hessians: HessianSource | None = None,
                optimize_note: str = "", extra_metadata: Sequence[KV] = ()) -> ExportResult:
    """Convert ``model_dir`` to ``out_path`` with llama-quantize's ``preset`` mixture.

    ``out_path=None`` plans only (``--dry-run``). ``imatrix`` (GGUF tensor name -> f32[n_in] mean of x², see
    ``qconvert.gguf.imatrix``) switches to llama.cpp's weighted quantizers for the tensors it covers.
    ``progress(done, total, name)`` is called after each tensor. ``model_name``: the hub id a hub-cache snapshot
    was resolved from (``Qwen/Qwen2.5-1.5B-Instruct``), or None for a local directory; llama.cpp's naming
    heuristics read its last component as the directory name (see ``qconvert.gguf.metadata.card_metadata``).
    ``hessians`` (``--optimize``, ``qconvert.gguf.optimize``): the decoder linears' input Hessians by checkpoint
    tensor name; each such tensor of an affine type gets error-feedback codes where they beat llama.cpp's on the
    held-out tokens (same types, same size). ``optimize_note`` is stored as ``qconvert.optimize``;
    ``extra_metadata``: more ``qconvert.*`` keys (a size budget's record).
    """
    model_dir = Path(model_dir)
    preset = get_preset(preset).name
    prep = prepare(model_dir, preset, options, model_name=model_name, imatrix=imatrix)
    plan = prep.plan
    result = ExportResult(None, plan, warnings=plan.warnings())
    if out_path is None:
        return result
    plan.check_imatrix(set(imatrix) if imatrix else None)  # Q2_K_S and the like: refused without one, as llama.cpp
    extra = list(extra_metadata)
    if hessians is not None:
        from qconvert.gguf.metadata import V

        extra.append(KV(OPTIMIZE_KEY, V.STRING, optimize_note or "error-feedback codes (qconvert gguf --optimize)"))
    kvs = prep.metadata(model_dir, preset, extra)
    start = time.perf_counter()
    with atomic_output(Path(out_path), force=force, needed=plan.data_section_bytes(), inputs=(model_dir,)) as tmp:
        writer = GGUFWriter(tmp)
        try:
            for kv in kvs:
                writer.add(kv.key, kv.vtype, kv.value, kv.elem_type)
            for entry in plan.entries:
                writer.add_tensor_info(entry.name, entry.shape, entry.type)
            writer.write_header()
            _stream_tensors(writer, prep.ckpt, prep.mapped, plan, imatrix or {}, progress, hessians, result.optimized)
            writer.close()
        finally:
            writer.abort()
        result.bytes_written = tmp.stat().st_size
    result.path, result.seconds = Path(out_path), time.perf_counter() - start
    return result


def _check_finite(x: np.ndarray, name: str, chunk: int = 1 << 24) -> None:
    """Refuse NaN/Inf weights (llama.cpp would quantize them silently into garbage); chunked to bound memory."""
    flat = x.reshape(-1)
    for start in range(0, flat.size, chunk):
        if not np.isfinite(flat[start:start + chunk]).all():
            raise CheckpointError(f"tensor {name} contains NaN or Inf; the checkpoint is damaged. Re-download it.")


def _check_imatrix(imatrix: Mapping[str, np.ndarray], plan: Plan) -> None:
    for entry in plan.entries:
        values = imatrix.get(entry.name)
        if values is not None and values.shape != (entry.shape[-1],):
            raise CheckpointError(
                f"imatrix entry for {entry.name} has {values.size} values but the tensor's rows have "
                f"{entry.shape[-1]}; the imatrix was computed for another model."
            )


def _stream_tensors(writer: GGUFWriter, ckpt: SafetensorsCheckpoint, mapped: dict[str, str], plan: Plan,
                    imatrix: Mapping[str, np.ndarray], progress: Callable[[int, int, str], None] | None,
                    hessians: HessianSource | None = None, kept: dict[str, int] | None = None) -> None:
    """Quantize and write each tensor; a reader thread fetches the next one meanwhile. With ``hessians`` the
    tensors that have them go through ``optimized_rows``; ``kept`` counts what each kept."""
    entries = plan.entries
    encode: Callable[[GGMLType, np.ndarray, str], np.ndarray | None] = lambda qtype, rows, name: None
    if hessians is not None:  # torch and the GPTQ solver load only for --optimize
        from qconvert.gguf.optimize import can_optimize, optimized_rows

        def encode(qtype: GGMLType, rows: np.ndarray, name: str) -> np.ndarray | None:
            h = hessians(mapped[name]) if can_optimize(qtype) else None
            if h is None:
                return None
            data, which = optimized_rows(qtype, rows, h, imatrix.get(name))
            if kept is not None:
                kept[which] = kept.get(which, 0) + 1
            return data
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = pool.submit(ckpt.read_f32, mapped[entries[0].name]) if entries else None
        for i, entry in enumerate(entries):
            assert pending is not None
            x = pending.result()
            pending = pool.submit(ckpt.read_f32, mapped[entries[i + 1].name]) if i + 1 < len(entries) else None
            _check_finite(x, mapped[entry.name])
            rows = np.ascontiguousarray(x.reshape(-1, x.shape[-1]))
            data = encode(entry.type, rows, entry.name)
            if data is None:
                data = quantize_rows(entry.type, rows, imatrix.get(entry.name))
            writer.write_tensor(entry.name, data)
            if progress:
                progress(i + 1, len(entries), entry.name)
            del x, data
