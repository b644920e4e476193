"""Write a GPTQ, AWQ or compressed-tensors checkpoint directory that transformers and vLLM load; Qwen's padding.

``QuantizedCheckpointWriter`` is a strict streaming state machine: the calibration driver hands it one quantized
linear at a time (``add_linear``), optionally replaced float tensors (``add_float``: AWQ's rescaled RMSNorm
gains), and calls ``finish()``, which copies every remaining float tensor from the source checkpoint. Every
call is checked before a byte is written (unknown or duplicate names, wrong shapes, a scheme that disagrees with
``quantization_config``), and ``finish`` refuses an incomplete model. Tensors are buffered up to
``max_shard_bytes`` and flushed to a shard, so memory stays at about one shard (use the default 2 GiB for 72B).

The directory is built in a temporary sibling (``.<name>.partial-*``) and renamed into place only at the end: a
failed run leaves nothing under the final name. Layout (anchor §2.2, §3.2, §10.4)::

    config.json              source config + quantization_config, torch_dtype float16
    quantize_config.json     the same quantization_config dict (AutoGPTQ/GPTQModel/vLLM fallback read it; GPTQ and
                             AWQ only: llm-compressor writes none for compressed-tensors)
    model.safetensors | model-0000i-of-0000N.safetensors + model.safetensors.index.json
    tokenizer files, generation_config.json (copied)

Quantized linears become ``<module>.qweight/.qzeros/.scales(/.g_idx)`` (GPTQ, AWQ), ``<module>.weight_packed/
.weight_scale/.weight_shape(/.weight_zero_point)`` (compressed-tensors pack-quantized) or int8 ``<module>.weight``
+ ``.weight_scale`` (int-quantized W8A8; ``int4.formats.LAYOUTS`` has every layout's packer and shapes); embeddings, norms, biases and
``lm_head`` are float16. With ``tie_word_embeddings`` no ``lm_head.weight`` is written, so the tie survives.

vLLM's Marlin kernels shard GPTQ/AWQ weights under tensor parallelism only when each partition keeps whole
128-column tiles and groups (anchor §1); ``tensor_parallel_problems`` applies those rules and the writer warns.
Qwen2.5-72B's intermediate size 29568 = 128·231 fails at TP ≥ 2; Qwen's published recipe zero-pads it to
29696 (``pad_intermediate``): the extra gate/up rows output 0, silu(0)·0 = 0, and the extra down_proj columns
multiply those zeros, so the model computes exactly the same function.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Any, TypeVar

import numpy as np
import torch
from safetensors.numpy import save_file

from qconvert.errors import CheckpointError, QuantTypeError
from qconvert.int4.formats import PACKED_SUFFIXES, layout_scheme
from qconvert.int4.rtn import QuantizedLinear
from qconvert.io.atomic import StagedDirectory
from qconvert.io.safetensors import INDEX_FILE, SINGLE_FILE, SafetensorsCheckpoint
from qconvert.registry import read_model_config, spec_for_config

DEFAULT_SHARD_BYTES = 2 * 1024**3
COPIED_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                "added_tokens.json", "chat_template.jinja", "chat_template.json", "generation_config.json")
FP16_MAX = 65504.0
MARLIN_TILE_K = 128  # row-parallel input partition must be a multiple of this (and of the group size)
MARLIN_TILE_N = 64  # column-parallel output partition must be a multiple of this
ROW_PARALLEL = frozenset({"self_attn.o_proj", "mlp.down_proj"})
KV_PROJ = frozenset({"self_attn.k_proj", "self_attn.v_proj"})
MLP_PROJ = frozenset({"mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"})


class TensorParallelWarning(UserWarning):
    """The checkpoint's shapes break vLLM's tensor-parallel rules for quantized weights at some TP size."""


# ------------------------------------------------------------------------------------------------------------
# Shapes and tensor-parallel rules


def qwen2_linear_shapes(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``[out, in]`` of each decoder-layer linear (names relative to the layer) from a Qwen2 config.json."""
    h, nh, kv = config["hidden_size"], config["num_attention_heads"], config["num_key_value_heads"]
    hd, i = config.get("head_dim") or h // nh, config["intermediate_size"]
    return {"self_attn.q_proj": (nh * hd, h), "self_attn.k_proj": (kv * hd, h), "self_attn.v_proj": (kv * hd, h),
            "self_attn.o_proj": (h, nh * hd), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
            "mlp.down_proj": (h, i)}


def tensor_parallel_problems(config: Mapping[str, Any], group_size: int, tp: int) -> dict[str, str]:
    """``{linear: why}`` for the linears vLLM's Marlin kernels cannot shard ``tp`` ways (empty: TP ``tp`` works)."""
    hd = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv = config["num_key_value_heads"]
    problems = {}
    for name, (n, k) in qwen2_linear_shapes(config).items():
        if name in ROW_PARALLEL:
            tile = MARLIN_TILE_K if group_size == -1 else math.lcm(MARLIN_TILE_K, group_size)
            if k % (tp * tile):
                problems[name] = f"input {k}/{tp} is not a multiple of {tile}"
        else:
            part = hd * max(1, kv // tp) if name in KV_PROJ else n / tp  # vLLM replicates kv heads when tp > kv
            if part % MARLIN_TILE_N:
                problems[name] = f"output {n}/{tp} is not a multiple of {MARLIN_TILE_N}"
    return problems


def padded_intermediate_size(intermediate_size: int, group_size: int = 128, max_tp: int = 8) -> int:
    """Smallest size ≥ ``intermediate_size`` that shards into whole Marlin tiles and groups up to ``max_tp`` ways
    (29568 -> 29696, Qwen's documented value for Qwen2.5-72B)."""
    step = max_tp * math.lcm(MARLIN_TILE_K, max(group_size, 1))
    return -(-intermediate_size // step) * step


def tensor_parallel_warning(config: Mapping[str, Any], group_size: int, tp_sizes: Sequence[int] = (2, 4, 8)
                            ) -> str | None:
    """The warning text for the TP sizes (dividing the head count) that fail, or None when all work."""
    heads = config["num_attention_heads"]
    failing = {tp: p for tp in tp_sizes if heads % tp == 0 and (p := tensor_parallel_problems(config, group_size, tp))}
    if not failing:
        return None
    detail = "; ".join(f"TP {tp}: " + ", ".join(f"{m} {why}" for m, why in p.items()) for tp, p in failing.items())
    msg = f"these quantized shapes cannot be served with vLLM tensor parallelism at TP {sorted(failing)} ({detail})."
    i = config["intermediate_size"]
    padded = padded_intermediate_size(i, group_size, max(failing))
    fixed = {**config, "intermediate_size": padded}
    if all(set(p) <= MLP_PROJ for p in failing.values()) and not any(
            tensor_parallel_problems(fixed, group_size, tp) for tp in failing):
        return msg + (f" Pass --pad-intermediate to zero-pad intermediate_size {i} -> {padded} before quantizing "
                      "(Qwen's recipe for Qwen2.5-72B; the model's outputs do not change).")
    return msg + " Padding intermediate_size does not fix this; serve with a TP size that works (TP 1 always does)."


Array = TypeVar("Array", np.ndarray, torch.Tensor)


def pad_intermediate(gate: Array, up: Array, down: Array, new_size: int) -> tuple[Array, Array, Array]:
    """Zero-pad one MLP to ``new_size``: gate/up [i, h] -> [new, h] (rows), down [h, i] -> [h, new] (columns).

    Apply to the float weights before calibration and set ``config_updates={"intermediate_size": new_size}`` on
    the writer. The padded down_proj columns see only zero inputs (GPTQ treats them as dead columns).
    """
    extra = new_size - gate.shape[0]
    if extra < 0 or up.shape[0] != gate.shape[0] or down.shape[1] != gate.shape[0]:
        raise QuantTypeError(f"cannot pad an MLP with gate {tuple(gate.shape)}, up {tuple(up.shape)}, down "
                             f"{tuple(down.shape)} to intermediate size {new_size}; it must not shrink.")
    if isinstance(gate, torch.Tensor):
        pad = torch.nn.functional.pad
        return pad(gate, (0, 0, 0, extra)), pad(up, (0, 0, 0, extra)), pad(down, (0, extra))
    return np.pad(gate, ((0, extra), (0, 0))), np.pad(up, ((0, extra), (0, 0))), np.pad(down, ((0, 0), (0, extra)))


# ------------------------------------------------------------------------------------------------------------
# The writer


class QuantizedCheckpointWriter:
    """Streams a quantized checkpoint of ``src_dir`` into ``out_dir`` (see the module docstring).

    ``quantization_config`` comes from ``formats.gptq_quantization_config`` / ``awq_quantization_config`` /
    ``compressed.compressed_quantization_config``; its ``quant_method`` picks the layout (packer and shapes).
    ``src_dir`` may itself be quantized (``qconvert convert-format``): its packed tensors are never copied.
    ``config_updates`` are merged into config.json (e.g. a padded ``intermediate_size``). Use as a context manager:
    an exception inside the block removes the partial output.
    """

    def __init__(self, src_dir: str | Path, out_dir: str | Path, quantization_config: Mapping[str, Any], *,
                 force: bool = False, max_shard_bytes: int = DEFAULT_SHARD_BYTES,
                 config_updates: Mapping[str, Any] | None = None, tp_sizes: Sequence[int] = (2, 4, 8)) -> None:
        self.src_dir, self.out_dir, self.force = Path(src_dir), Path(out_dir), force
        self.qcfg = MappingProxyType(dict(quantization_config))
        self.layout, self.scheme = layout_scheme(self.qcfg, "the quantization_config to write")
        self.method = self.layout.name
        self.config = {**read_model_config(self.src_dir), **(config_updates or {})}
        self.src = SafetensorsCheckpoint(self.src_dir)
        self.linears = _expected_linears(self.config)
        self.floats = self._float_names()
        if not self.layout.dynamic_activations and \
                (msg := tensor_parallel_warning(self.config, self.scheme.group_size, tp_sizes)) is not None:
            warnings.warn(msg, TensorParallelWarning, stacklevel=2)
        self.max_shard_bytes = max_shard_bytes
        self.staged = StagedDirectory(self.out_dir, force=force, needed=self.data_bytes(), inputs=(self.src_dir,))
        self.tmp = self.staged.tmp
        self.state = "open"
        self.pending: dict[str, np.ndarray] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []
        self.done: set[str] = set()

    def _float_names(self) -> dict[str, tuple[int, ...]]:
        """Source tensors written as fp16: everything but the quantized weights (and a tied lm_head); a quantized
        source's packed tensors of those linears are skipped too."""
        quantized = {f"{m}.{s}" for m in self.linears for s in ("weight", *PACKED_SUFFIXES)}
        tied = bool(self.config.get("tie_word_embeddings"))
        return {n: self.src.entries[n].shape for n in self.src.names()
                if n not in quantized and not (tied and n == "lm_head.weight")}

    def data_bytes(self) -> int:
        """Bytes of tensor data the finished checkpoint holds (packed linears, fp16 floats; headers aside)."""
        packed = sum(self.layout.nbytes(out_f, in_f, self.scheme) for out_f, in_f in self.linears.values())
        return packed + 2 * sum(math.prod(shape) for shape in self.floats.values())

    # -- calls the driver makes ------------------------------------------------------------------------------

    def add_linear(self, module: str, q: QuantizedLinear) -> None:
        """Pack and buffer the quantized weight of ``module`` (e.g. ``model.layers.3.mlp.down_proj``)."""
        self._check_linear(module, q)
        packed = {k: v.detach().cpu().numpy() for k, v in self.layout.pack(q).items()}
        shapes = self.layout.shapes(*q.shape, self.scheme)
        if {k: v.shape for k, v in packed.items()} != shapes:
            raise QuantTypeError(f"{module}: packed tensors {({k: v.shape for k, v in packed.items()})} do not "
                                 f"have the {self.method} layout {shapes}; this is a qconvert bug, please report it.")
        self.done.add(module)
        for suffix, array in packed.items():
            self._put(f"{module}.{suffix}", array)

    def _check_linear(self, module: str, q: QuantizedLinear) -> None:
        """Refuse unknown, repeated, mis-shaped or differently quantized linears before anything is packed."""
        self._check_open()
        if module not in self.linears:
            raise CheckpointError(f"{module} is not a quantizable linear of this model; expected names like "
                                  f"{next(iter(self.linears))}.")
        if module in self.done:
            raise CheckpointError(f"{module} was already written; each linear is added once.")
        if q.shape != self.linears[module]:
            raise CheckpointError(f"{module}: quantized weight is {list(q.shape)} but config.json implies "
                                  f"{list(self.linears[module])}; was the model padded without config_updates?")
        want = (self.scheme.bits, self.scheme.group_size, self.scheme.sym)
        if (q.bits, q.group_size, q.sym) != want:
            raise QuantTypeError(f"{module}: quantized as (bits, group_size, sym) = {(q.bits, q.group_size, q.sym)} "
                                 f"but the checkpoint declares {want}; quantize every linear with one config.")
        if self.method == "gptq" and q.act_order and not self.qcfg.get("desc_act"):  # other layouts' packers refuse
            raise QuantTypeError(f"{module} uses act-order group indices but quantization_config has desc_act "
                                 "false; set desc_act=True (or use static_groups) consistently.")

    def add_float(self, name: str, value: np.ndarray | torch.Tensor) -> None:
        """Buffer a float tensor that replaces the source's (written as fp16), e.g. an AWQ-rescaled norm gain."""
        self._check_open()
        if name not in self.floats:
            raise CheckpointError(f"{name} is not a float tensor of this checkpoint (quantized weights go through "
                                  "add_linear; a tied lm_head is not written).")
        if name in self.done:
            raise CheckpointError(f"{name} was already written; each tensor is added once.")
        array = value.detach().float().cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
        if array.shape != self.floats[name]:
            raise CheckpointError(f"{name}: shape {list(array.shape)} differs from the source's "
                                  f"{list(self.floats[name])}.")
        if np.abs(array).max(initial=0.0) > FP16_MAX:
            raise CheckpointError(f"{name} has values beyond float16's range (±65504) and would become inf; "
                                  "this tensor cannot be stored in a GPTQ/AWQ (fp16) checkpoint.")
        self.done.add(name)
        self._put(name, array.astype(np.float16))

    def finish(self) -> Path:
        """Copy the remaining float tensors, write shards, index, configs and tokenizer; move into place."""
        self.complete()
        return self.commit()

    def complete(self) -> None:
        """Everything ``finish`` writes, still under the temporary name: ``tmp`` is then a whole checkpoint that
        can be read (a model card's quality measured on it) before ``commit`` moves it into place."""
        self._check_open()
        missing = [m for m in self.linears if m not in self.done]
        if missing:
            self.abort()
            raise CheckpointError(f"{len(missing)} linear(s) were never added, e.g. {missing[0]}; the checkpoint "
                                  "would be incomplete, so nothing was written.")
        for name in self.floats:
            if name not in self.done:
                self.add_float(name, self.src.read_f32(name))
        self._flush()
        self._name_shards()
        self._write_configs()
        for f in COPIED_FILES:
            if (self.src_dir / f).exists():
                shutil.copy2(self.src_dir / f, self.tmp / f)
        self.state = "complete"

    def commit(self) -> Path:
        """Move the completed checkpoint into place (after ``complete``)."""
        if self.state != "complete":
            raise CheckpointError("QuantizedCheckpointWriter.commit() before complete(); nothing was written.")
        self.staged.commit()
        self.state = "finished"
        return self.out_dir

    def restart(self) -> None:
        """Forget every tensor added so far (the calibration's model-level check re-sends them all)."""
        self._check_open()
        for i in range(len(self.shards)):
            (self.tmp / f"shard-{i}.tmp").unlink(missing_ok=True)
        self.pending, self.pending_bytes, self.shards, self.done = {}, 0, [], set()

    def abort(self) -> None:
        """Discard everything written so far (idempotent)."""
        if self.state in ("open", "complete"):
            self.staged.discard()
            self.state = "aborted"

    def __enter__(self) -> QuantizedCheckpointWriter:  # noqa: PYI034 (Python 3.10 has no typing.Self)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if exc_type is not None:
            self.abort()
        elif self.state in ("open", "complete"):
            self.abort()
            raise CheckpointError("QuantizedCheckpointWriter left without finish() or commit(); nothing was written.")

    # -- internals -------------------------------------------------------------------------------------------

    def _check_open(self) -> None:
        if self.state != "open":
            raise CheckpointError(f"the checkpoint writer is {self.state}; create a new one to write again.")

    def _put(self, name: str, array: np.ndarray) -> None:
        self.pending[name] = np.ascontiguousarray(array)
        self.pending_bytes += array.nbytes
        if self.pending_bytes >= self.max_shard_bytes:
            self._flush()

    def _flush(self) -> None:
        if self.pending:
            save_file(self.pending, str(self.tmp / f"shard-{len(self.shards)}.tmp"), metadata={"format": "pt"})
            self.shards.append(sorted(self.pending))
            self.pending, self.pending_bytes = {}, 0

    def _name_shards(self) -> None:
        """Rename shards to HF's names; write the index when there is more than one."""
        if len(self.shards) == 1:
            os.replace(self.tmp / "shard-0.tmp", self.tmp / SINGLE_FILE)
            return
        weight_map, total = {}, 0
        for i, names in enumerate(self.shards):
            final = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            total += (self.tmp / f"shard-{i}.tmp").stat().st_size
            os.replace(self.tmp / f"shard-{i}.tmp", self.tmp / final)
            weight_map.update({n: final for n in names})
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (self.tmp / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")

    def _write_configs(self) -> None:
        config = {**self.config, "quantization_config": dict(self.qcfg), "torch_dtype": "float16"}
        if "dtype" in config:
            config["dtype"] = "float16"
        (self.tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        if self.layout.sidecar:
            (self.tmp / "quantize_config.json").write_text(json.dumps(dict(self.qcfg), indent=2) + "\n")


def _expected_linears(config: Mapping[str, Any]) -> dict[str, tuple[int, int]]:
    """``{"model.layers.{i}.<sub>": (out, in)}`` for every linear the architecture's spec quantizes."""
    spec = spec_for_config(dict(config))
    shapes = qwen2_linear_shapes(config)
    subs = [s for group in spec.sequential for s in group]
    return {f"{spec.block_prefix}.{i}.{s}": shapes[s] for i in range(config["num_hidden_layers"]) for s in subs}


def write_quantized_checkpoint(src_dir: str | Path, out_dir: str | Path, linears: Mapping[str, QuantizedLinear],
                               quantization_config: Mapping[str, Any], *,
                               floats: Mapping[str, np.ndarray | torch.Tensor] | None = None,
                               **writer_options: Any) -> Path:
    """One-shot form of ``QuantizedCheckpointWriter`` for models whose quantized layers fit in memory."""
    with QuantizedCheckpointWriter(src_dir, out_dir, quantization_config, **writer_options) as w:
        for module, q in linears.items():
            w.add_linear(module, q)
        for name, value in (floats or {}).items():
            w.add_float(name, value)
        return w.finish()
