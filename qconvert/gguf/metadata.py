"""The GGUF metadata llama.cpp writes for a Qwen2 checkpoint, in llama.cpp's key order.

Order: general.architecture, general.type, the model card keys (name, finetune, basename, size_label, license,
tags, languages), the ``qwen2.*`` hyper-parameters from config.json, then the tokenizer. ``general.file_type``
and ``general.quantization_version`` go last, where llama-quantize leaves them (it re-sets both, which moves them
to the end), so a direct quantized export and "convert + llama-quantize" agree byte for byte.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


def _size_label_from_params(n: int) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n > scale or suffix == "K":
            x = n / scale
            digits = max(2 - len(str(round(x)).lstrip("0")), 0)
            return f"{x:.{digits}f}{suffix}"
    raise AssertionError("unreachable")


def _readme_front_matter(model_dir: Path) -> dict[str, Any]:
    """license / license_link / tags / language / base_model from the model card's YAML front matter."""
    readme = model_dir / "README.md"
    if not readme.exists():
        return {}
    m = re.match(r"---\n(.*?)\n---", readme.read_text(encoding="utf-8", errors="replace"), re.DOTALL)
    if not m:
        return {}
    out: dict[str, Any] = {}
    key = None
    for line in m.group(1).splitlines():  # the simple "key: value" / "- item" subset model cards use
        if re.match(r"^[A-Za-z_]+:", line):
            key, _, value = line.partition(":")
            value = value.strip().strip("'\"")
            out[key] = value if value else []
        elif key and line.strip().startswith("- ") and isinstance(out.get(key), list):
            out[key].append(line.strip()[2:].strip().strip("'\""))
    return out


def model_card_metadata(model_name: str, model_dir: Path, n_params: int) -> list[KV]:
    """general.name / finetune / basename / size_label / license / tags / languages.

    ``model_name`` is the hub id or directory name (``Qwen/Qwen2.5-1.5B-Instruct``): the part before the size
    label is the basename, the words after it the finetune, as llama.cpp's naming heuristics read Qwen's ids.
    """
    tail = model_name.rstrip("/").split("/")[-1]
    parts = [p for p in tail.split("-") if p]
    size_at = next((i for i, p in enumerate(parts) if i > 0 and re.fullmatch(r"\d+(\.\d+)?[KMBT]", p, re.IGNORECASE)), None)
    kvs = [KV("general.name", V.STRING, " ".join(parts) if parts else tail)]
    if size_at is not None:
        finetune = "-".join(parts[size_at + 1:])
        if finetune:
            kvs.append(KV("general.finetune", V.STRING, finetune))
        kvs.append(KV("general.basename", V.STRING, "-".join(parts[:size_at])))
        kvs.append(KV("general.size_label", V.STRING, parts[size_at].upper()))
    else:
        kvs.append(KV("general.size_label", V.STRING, _size_label_from_params(n_params)))
    card = _readme_front_matter(model_dir)
    if isinstance(card.get("license"), str) and card["license"]:
        kvs.append(KV("general.license", V.STRING, card["license"]))
    if isinstance(card.get("license_link"), str) and card["license_link"]:
        kvs.append(KV("general.license.link", V.STRING, card["license_link"]))
    bases = card.get("base_model")
    bases = [bases] if isinstance(bases, str) and bases else bases if isinstance(bases, list) else []
    if bases:
        kvs.append(KV("general.base_model.count", V.UINT32, len(bases)))
    for i, repo in enumerate(bases):  # "Qwen/Qwen2.5-1.5B" -> name "Qwen2.5 1.5B", organization "Qwen"
        org, _, tail = repo.rpartition("/")
        kvs.append(KV(f"general.base_model.{i}.name", V.STRING, tail.replace("-", " ")))
        if org:
            kvs.append(KV(f"general.base_model.{i}.organization", V.STRING, org))
        kvs.append(KV(f"general.base_model.{i}.repo_url", V.STRING, f"https://huggingface.co/{repo}"))
    for key, gkey in (("tags", "general.tags"), ("language", "general.languages")):
        if isinstance(card.get(key), list) and card[key]:
            kvs.append(KV(gkey, V.ARRAY, card[key], V.STRING))
    return kvs


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
        KV("general.architecture", V.STRING, spec.gguf_arch),
        KV("general.type", V.STRING, "model"),
        *model_card_metadata(model_name, model_dir, n_params),
        *hparam_metadata(spec, config),
        *tokenizer_metadata(vocab),
        KV("general.quantization_version", V.UINT32, GGML_QUANT_VERSION),
        KV("general.file_type", V.UINT32, int(file_type)),
    ]
