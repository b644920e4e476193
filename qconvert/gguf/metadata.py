"""The GGUF metadata llama.cpp writes for a Qwen2 checkpoint, in llama.cpp's key order.

Order: general.architecture, general.type, the model card keys (sampling settings, name, basename, size_label,
license, base models, tags, languages: gguf-py's ``Metadata``, the code llama.cpp's converter runs), the
``qwen2.*`` hyper-parameters from config.json, then the tokenizer. ``general.file_type`` and
``general.quantization_version`` go last, where llama-quantize leaves them (it re-sets both, which moves them
to the end), so a direct quantized export and "convert + llama-quantize" agree byte for byte.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf

from qconvert.constants import GGML_QUANT_VERSION, FileType, ValueType
from qconvert.errors import CheckpointError
from qconvert.gguf.vocab import GGUF_SPECIAL_KEY, GGUFVocab
from qconvert.registry import ArchSpec, rope_theta

V = ValueType


@dataclass(frozen=True)
class KV:
    key: str
    vtype: ValueType
    value: Any
    elem_type: ValueType | None = None


# The general.* fields llama.cpp's naming heuristics derive from a checkpoint's directory name.
NAME_FIELDS = ("name", "organization", "basename", "finetune", "version", "size_label")


def card_metadata(model_dir: Path, dir_name: str, n_params: int) -> gguf.Metadata:
    """What ``convert_hf_to_gguf.py`` knows about a checkpoint before it writes: gguf-py's ``Metadata``.

    The converter calls ``gguf.Metadata.load(None, dir_model, None, total_params)``: README.md front matter
    (PyYAML), ``_name_or_path`` from config.json, generation_config.json's sampling settings, then its naming
    heuristics on the directory name (``qwen2.5-coder-1.5b`` -> name ``Qwen2.5 Coder 1.5b``, basename
    ``qwen2.5-coder``, size label ``1.5B``); afterwards it falls back to the directory name and to a size label
    from the parameter count. ``dir_name`` is the name the heuristics read: ``model_dir.name`` for a local
    directory; for a hub-cache snapshot (a commit-hash directory) the repo's own name, as the converter sees
    the same files after ``huggingface-cli download ID --local-dir NAME``. ``n_params``: elements of the
    tensors the GGUF holds (a tied lm_head is not one of them).
    """
    md = gguf.Metadata.load(None, model_dir, None, n_params)
    named = gguf.Metadata.apply_metadata_heuristic(
        gguf.Metadata(), gguf.Metadata.load_model_card(model_dir), gguf.Metadata.load_hf_parameters(model_dir),
        Path(dir_name), n_params)
    for field in NAME_FIELDS:
        setattr(md, field, getattr(named, field))
    if md.sampling_penalty_repeat is None:
        # the converter's own gguf-py (llama.cpp's tree, newer than PyPI's 0.19.0) also reads transformers'
        # spelling; a no-op once the installed gguf does the same
        penalty = gguf.Metadata.load_generation_config(model_dir).get("repetition_penalty")
        md.sampling_penalty_repeat = penalty
    if md.name is None:
        md.name = dir_name
    if md.size_label is None and n_params > 0:
        md.size_label = gguf.size_label(n_params, n_params, 0, 0)  # a dense model: every parameter shared
    return md


def _kv(key: str, value: gguf.GGUFValue) -> KV:
    vtype = V(int(value.type))
    if vtype == V.ARRAY:
        items = list(value.value)
        elem = V(int(value.sub_type)) if value.sub_type is not None else V(int(gguf.GGUFValueType.get_type(items[0])))
        if elem == V.STRING and not all(isinstance(x, str) for x in items):
            raise CheckpointError(f"README.md front matter gives {key} as {items!r}; GGUF needs a list of strings. "
                                  "Quote the entries in the model card.")
        return KV(key, vtype, items, elem)
    if vtype == V.STRING and not isinstance(value.value, str):
        raise CheckpointError(f"README.md front matter gives {key} as {value.value!r} ({type(value.value).__name__}); "
                              "GGUF needs a string there. Quote it in the model card.")
    return KV(key, vtype, value.value)


def general_metadata(arch: str, model_dir: Path, dir_name: str, n_params: int) -> list[KV]:
    """general.architecture, general.type, then the model card keys, as the converter's writer holds them.

    gguf-py's own ``Metadata.set_gguf_meta_model`` fills a gguf-py writer that never opens a file, so key names,
    order (sampling, name, author, ..., base models, datasets, tags, languages) and value types are llama.cpp's.
    """
    collector = gguf.GGUFWriter(None, arch)  # holds key/value pairs only; adds general.architecture
    collector.add_type(gguf.GGUFType.MODEL)
    card_metadata(model_dir, dir_name, n_params).set_gguf_meta_model(collector)
    return [_kv(key, value) for key, value in collector.kv_data[0].items()]


def model_card_metadata(model_name: str, model_dir: Path, n_params: int) -> list[KV]:
    """The model card keys (general.name ... general.languages), without general.architecture / general.type.

    ``model_name``: the hub id (``Qwen/Qwen2.5-1.5B-Instruct``) or the directory name; the heuristics read its
    last path component. (The architecture name only fills general.architecture, which is left out.)
    """
    return [kv for kv in general_metadata("qwen2", model_dir, model_name.rstrip("/").split("/")[-1], n_params)
            if kv.key not in ("general.architecture", "general.type")]


def hparam_metadata(spec: ArchSpec, config: dict[str, Any]) -> list[KV]:
    """``<arch>.*`` keys from config.json, never hard-coded (rms_norm_eps differs between checkpoints)."""
    kvs = []
    for suffix, cfg_key in spec.hparam_keys:
        if suffix == "rope.freq_base":
            kvs += rope_scaling_metadata(spec.gguf_arch, config)
            kvs.append(KV(f"{spec.gguf_arch}.{suffix}", V.FLOAT32, rope_theta(config)))
            continue
        if cfg_key not in config:
            raise CheckpointError(f"config.json lacks {cfg_key!r}, which GGUF needs for {spec.gguf_arch}.{suffix}.")
        vtype = V.FLOAT32 if suffix in spec.float_hparams else V.UINT32
        kvs.append(KV(f"{spec.gguf_arch}.{suffix}", vtype, float(config[cfg_key]) if vtype == V.FLOAT32 else int(config[cfg_key])))
    if "head_dim" in config:
        kvs.append(KV(f"{spec.gguf_arch}.attention.key_length", V.UINT32, int(config["head_dim"])))
        kvs.append(KV(f"{spec.gguf_arch}.attention.value_length", V.UINT32, int(config["head_dim"])))
    return kvs


def rope_scaling_metadata(arch: str, config: dict[str, Any]) -> list[KV]:
    """YaRN keys, only when config.json sets ``rope_scaling`` (stock Qwen2.5 has none: 32K context)."""
    rs = config.get("rope_scaling") or {}
    kind = rs.get("rope_type", rs.get("type"))
    if kind != "yarn" or rs.get("factor") is None:
        return []
    kvs = [
        KV(f"{arch}.rope.scaling.type", V.STRING, "yarn"),
        KV(f"{arch}.rope.scaling.factor", V.FLOAT32, float(rs["factor"])),
        KV(f"{arch}.rope.scaling.original_context_length", V.UINT32, int(rs["original_max_position_embeddings"])),
    ]
    for cfg_key, suffix in (("extrapolation_factor", "yarn_ext_factor"), ("attention_factor", "yarn_attn_factor"),
                            ("beta_fast", "yarn_beta_fast"), ("beta_slow", "yarn_beta_slow")):
        if rs.get(cfg_key) is not None:
            kvs.append(KV(f"{arch}.rope.scaling.{suffix}", V.FLOAT32, float(rs[cfg_key])))
    return kvs


def tokenizer_metadata(vocab: GGUFVocab) -> list[KV]:
    kvs = [
        KV("tokenizer.ggml.model", V.STRING, "gpt2"),
        KV("tokenizer.ggml.pre", V.STRING, "qwen2"),
        KV("tokenizer.ggml.tokens", V.ARRAY, vocab.tokens, V.STRING),
        KV("tokenizer.ggml.token_type", V.ARRAY, vocab.token_types, V.INT32),
        KV("tokenizer.ggml.merges", V.ARRAY, vocab.merges, V.STRING),
    ]
    kvs += [KV(f"tokenizer.ggml.{GGUF_SPECIAL_KEY[k]}_token_id", V.UINT32, i) for k, i in vocab.special_ids.items()]
    kvs += [KV(f"tokenizer.ggml.add_{k}_token", V.BOOL, b) for k, b in vocab.add_special.items()]
    if vocab.chat_template is not None:
        kvs.append(KV("tokenizer.chat_template", V.STRING, vocab.chat_template))
    return kvs


def gguf_metadata(spec: ArchSpec, config: dict[str, Any], vocab: GGUFVocab, *, model_name: str, model_dir: Path,
                  n_params: int, file_type: FileType) -> list[KV]:
    """Every metadata key of the output file, in order."""
    return [
        *general_metadata(spec.gguf_arch, model_dir, model_name.rstrip("/").split("/")[-1], n_params),
        *hparam_metadata(spec, config),
        *tokenizer_metadata(vocab),
        KV("general.quantization_version", V.UINT32, GGML_QUANT_VERSION),
        KV("general.file_type", V.UINT32, int(file_type)),
    ]
