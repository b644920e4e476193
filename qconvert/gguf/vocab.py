"""Tokenizer metadata for GGUF, read straight from ``tokenizer.json`` / ``tokenizer_config.json`` / ``config.json``.

Produces what llama.cpp's converter writes for a GPT-2-style byte-level BPE (``tokenizer.ggml.model = gpt2``):
tokens padded to ``vocab_size`` with ``[PAD{i}]`` (UNUSED), token types (CONTROL for special or special-looking
added tokens, USER_DEFINED for other added tokens), merges, special token ids, add_*_token flags and the chat
template. Reading the JSON directly (rather than through transformers) keeps the output independent of the
installed transformers version.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from qconvert.constants import TokenType
from qconvert.errors import TokenizerError

# The order llama.cpp's SpecialVocab scans special token kinds; ids found in tokenizer_config come first, then
# those only config.json knows (Qwen's bos), which is why Qwen GGUFs list eos, pad, then bos.
SPECIAL_KINDS = ("bos", "eos", "unk", "sep", "pad", "cls", "mask")
GGUF_SPECIAL_KEY = {"bos": "bos", "eos": "eos", "unk": "unknown", "sep": "seperator", "pad": "padding", "cls": "cls", "mask": "mask"}
# The Qwen2 pre-tokenizer regex llama.cpp implements as pre = "qwen2".
QWEN2_PRETOKENIZER_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class GGUFVocab:
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]  # "eos" -> id, in the order they are written
    add_special: dict[str, bool]  # "bos" -> False, in the order they are written
    chat_template: str | None


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise TokenizerError(
            f"{path.name} is missing from {path.parent}. GGUF embeds the tokenizer; copy tokenizer.json and "
            "tokenizer_config.json from the base model's repository into the checkpoint directory."
        )
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON ({e}); re-download it.")


def looks_special(token: str) -> bool:
    """llama.cpp's converter treats ``<|...|>`` added tokens as CONTROL even when not flagged special."""
    return (token.startswith("<|") and token.endswith("|>")) or token in ("<pad>", "<mask>")


def _check_qwen2_pretokenizer(tok: dict, path: Path) -> None:
    pre = json.dumps(tok.get("pre_tokenizer"))
    model = tok.get("model", {})
    if model.get("type") != "BPE" or QWEN2_PRETOKENIZER_REGEX.replace("\\", "\\\\") not in pre:
        raise TokenizerError(
            f"{path}: not a Qwen2 byte-level BPE tokenizer (model type {model.get('type')!r}, pre-tokenizer "
            "regex differs). llama.cpp would tokenize differently; use the tokenizer files of the Qwen2.5 base model."
        )


def _merges(model: dict) -> list[str]:
    merges = model.get("merges") or []
    if merges and isinstance(merges[0], list):  # tokenizers >= 0.20 writes pairs; spaces inside become U+0120
        return [" ".join(part.replace(" ", "\u0120") for part in pair) for pair in merges]
    return list(merges)


def _chat_template(model_dir: Path, tok_config: dict) -> str | None:
    if isinstance(tok_config.get("chat_template"), str):
        return tok_config["chat_template"]
    jinja = model_dir / "chat_template.jinja"
    if jinja.exists():
        return jinja.read_text(encoding="utf-8")
    alt = model_dir / "chat_template.json"
    if alt.exists():
        value = _load_json(alt).get("chat_template")
        return value if isinstance(value, str) else None
    return None


def _special_ids(tok_config: dict, config: dict, added: dict[str, int], n_vocab: int) -> dict[str, int]:
    ids: dict[str, int] = {}
    for kind in SPECIAL_KINDS:  # first pass: tokens named in tokenizer_config.json
        entry = tok_config.get(f"{kind}_token")
        content = entry.get("content") if isinstance(entry, dict) else entry
        if isinstance(content, str) and content in added and added[content] < n_vocab:
            ids[kind] = added[content]
    for kind in SPECIAL_KINDS:  # second pass: ids only config.json gives
        tid = config.get(f"{kind}_token_id")
        if isinstance(tid, int) and 0 <= tid < n_vocab and kind not in ids:
            ids[kind] = tid
    return ids


def _add_special(tok: dict, tok_config: dict) -> dict[str, bool]:
    flags: dict[str, bool] = {}
    post = tok.get("post_processor") or {}
    for proc in post.get("processors", [post]):
        if proc.get("type") == "ByteLevel":
            flags.setdefault("bos", False)
            flags.setdefault("eos", False)
    for kind in SPECIAL_KINDS:
        value = tok_config.get(f"add_{kind}_token")
        if isinstance(value, bool) and kind not in flags:
            flags[kind] = value
    return flags


def read_vocab(model_dir: Path, config: dict) -> GGUFVocab:
    """Build the GGUF tokenizer content from a Qwen2-style tokenizer directory."""
    model_dir = Path(model_dir)
    tok = _load_json(model_dir / "tokenizer.json")
    tok_config = _load_json(model_dir / "tokenizer_config.json")
    _check_qwen2_pretokenizer(tok, model_dir / "tokenizer.json")
    vocab: dict[str, int] = dict(tok["model"]["vocab"])
    added = {t["content"]: t["id"] for t in tok.get("added_tokens", [])}
    special = {t["id"]: bool(t.get("special")) for t in tok.get("added_tokens", [])}
    by_id = {i: t for t, i in vocab.items()} | {i: t for t, i in added.items()}
    n_vocab = int(config.get("vocab_size") or (max(by_id) + 1))
    if max(by_id) >= n_vocab:
        raise TokenizerError(
            f"tokenizer has token id {max(by_id)} but config.json vocab_size is {n_vocab}; the tokenizer does not "
            "belong to this checkpoint."
        )
    tokens, types = [], []
    for i in range(n_vocab):
        token = by_id.get(i)
        if token is None:
            tokens.append(f"[PAD{i}]")
            types.append(TokenType.UNUSED)
        elif i in special:
            tokens.append(token)
            types.append(TokenType.CONTROL if special[i] or looks_special(token) else TokenType.USER_DEFINED)
        else:
            tokens.append(token)
            types.append(TokenType.NORMAL)
    return GGUFVocab(
        tokens=tokens,
        token_types=[int(t) for t in types],
        merges=_merges(tok["model"]),
        special_ids=_special_ids(tok_config, config, added, n_vocab),
        add_special=_add_special(tok, tok_config),
        chat_template=_chat_template(model_dir, tok_config),
    )
