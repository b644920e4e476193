"""``qconvert info``: what a GGUF file or a checkpoint directory holds."""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import numpy as np

from qconvert.constants import FileType
from qconvert.errors import CheckpointError


def _fmt_bytes(n: int) -> str:
    return f"{n / 1e9:.3f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def info_gguf(path: Path, list_tensors: bool) -> list[str]:
    from qconvert.gguf.reader import read_gguf

    g = read_gguf(path)
    md = g.metadata
    arch = md.get("general.architecture", "?")
    n = sum(int(np.prod(t.shape)) for t in g.tensors.values())
    data = sum(t.nbytes for t in g.tensors.values())
    ftype = md.get("general.file_type")
    ftype_name = FileType(ftype).name if isinstance(ftype, int) and ftype in FileType._value2member_map_ else str(ftype)
    lines = [
        f"file:        {path} ({_fmt_bytes(path.stat().st_size)}, GGUF v{g.version})",
        f"model:       {md.get('general.name', '?')} (architecture {arch})",
        f"file type:   {ftype_name}",
        (f"layers:      {md.get(f'{arch}.block_count', '?')}, hidden {md.get(f'{arch}.embedding_length', '?')}, "
         f"ffn {md.get(f'{arch}.feed_forward_length', '?')}, heads {md.get(f'{arch}.attention.head_count', '?')}"
         f"/{md.get(f'{arch}.attention.head_count_kv', '?')}, context {md.get(f'{arch}.context_length', '?')}"),
        (f"vocabulary:  {len(md.get('tokenizer.ggml.tokens', []))} tokens ({md.get('tokenizer.ggml.model', '?')}, pre "
         f"{md.get('tokenizer.ggml.pre', '?')}), chat template: {'yes' if 'tokenizer.chat_template' in md else 'no'}"),
        f"tensors:     {len(g.tensors)}, {n:,} weights, {_fmt_bytes(data)} of data, {8 * data / max(n, 1):.2f} bits per weight",
        "types:       " + ", ".join(f"{c}x {t}" for t, c in Counter(t.type.name for t in g.tensors.values()).most_common()),
    ]
    if list_tensors:
        lines += [f"  {t.name:<32} {t.type.name:<5} {list(t.shape)!s:<16} {t.nbytes:>12,}" for t in g.tensors.values()]
    return lines


def info_checkpoint(path: Path, list_tensors: bool) -> list[str]:
    from qconvert.gguf.export import load_config
    from qconvert.io.safetensors import SafetensorsCheckpoint
    from qconvert.registry import spec_for_config

    config = load_config(path)
    spec = spec_for_config(config)
    ckpt = SafetensorsCheckpoint(path)
    entries = list(ckpt.entries.values())
    n = sum(int(np.prod(e.shape)) for e in entries)
    size = sum(e.nbytes for e in entries)
    lines = [
        f"checkpoint:  {path} ({len({e.file for e in entries})} safetensors file(s), {_fmt_bytes(size)})",
        f"model:       {spec.hf_arch} -> GGUF architecture {spec.gguf_arch}",
        (f"layers:      {config.get('num_hidden_layers')}, hidden {config.get('hidden_size')}, ffn "
         f"{config.get('intermediate_size')}, heads {config.get('num_attention_heads')}/"
         f"{config.get('num_key_value_heads')}, vocab {config.get('vocab_size')}, "
         f"tied embeddings: {config.get('tie_word_embeddings', False)}"),
        f"tensors:     {len(entries)}, {n:,} weights, {8 * size / max(n, 1):.2f} bits per weight",
        "dtypes:      " + ", ".join(f"{c}x {d}" for d, c in Counter(e.dtype for e in entries).most_common()),
    ]
    if list_tensors:
        lines += [f"  {e.name:<52} {e.dtype:<5} {list(e.shape)}" for e in entries]
    return lines


def run_info(args: argparse.Namespace) -> int:
    path: Path = args.path
    if path.is_dir():
        lines = info_checkpoint(path, args.tensors)
    elif path.is_file():
        lines = info_gguf(path, args.tensors)
    else:
        raise CheckpointError(f"{path} does not exist; give a .gguf file or a checkpoint directory.")
    print("\n".join(lines))
    return 0
