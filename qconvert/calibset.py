"""Calibration data: the built-in multilingual set, local .txt/.jsonl files, ChatML rendering, sampling.

Offline by default. The built-in set (``qconvert/data/calib/``: 198 documents, 420 KB, ~118k Qwen2.5 tokens)
is natural text written for this project: English and Chinese prose in many registers, 19 other languages, code
in a dozen languages with explanations, and worked math (English and Chinese), as (request, answer) documents.
It is distinct from the evaluation text and the fixtures' corpus and needs no download. For Instruct models each
document is rendered as a ChatML conversation (a user request, the document as the assistant's answer), because
that is the text the deployed model sees; base models get raw text.

Sampling (as GPTQ's c4 loader): all documents are joined (end-of-text separated), tokenized once, and
``n_samples`` windows of ``seq_len`` tokens are drawn with a seeded generator. Same inputs + seed -> same tokens.
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import torch

from qconvert.errors import QConvertError

BUILTIN = "builtin"
SYSTEM_PROMPT = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."  # Qwen2.5's default
BUILTIN_VERSION = "qconvert-calib-v2"
# qconvert/data/calib/: original documents written for this project (none copied from elsewhere), disjoint from
# the evaluation text (qconvert.fixtures.corpus.eval_text) and from the demo model's training text.
BUILTIN_FILES = ("en.txt", "zh.txt", "multi.txt", "code.txt", "math.txt")


class CalibrationDataError(QConvertError):
    """Calibration text is missing, too short, or names a source that cannot be used offline."""


@dataclass(frozen=True)
class CalibrationSet:
    """Token windows ids int64 [n_samples, seq_len] and where they came from (for the model card)."""

    ids: torch.Tensor
    source: str
    chat: bool
    seed: int
    n_documents: int
    n_source_tokens: int

    @property
    def n_tokens(self) -> int:
        return int(self.ids.numel())

    def describe(self) -> str:
        n, t = self.ids.shape
        fmt = "ChatML-rendered" if self.chat else "raw"
        return (f"{self.source} ({fmt}, {self.n_documents} documents, {self.n_source_tokens:,} tokens): "
                f"{n} samples x {t} tokens = {self.n_tokens:,} tokens, seed {self.seed}")


# -- the built-in set -----------------------------------------------------------------------------------------

def _authored(name: str) -> list[tuple[str, str]]:
    """(request, answer) pairs of one file of the built-in set: each document opens with a ``### request`` line."""
    text = resources.files("qconvert").joinpath("data", "calib", name).read_text(encoding="utf-8")
    docs = []
    for block in re.split(r"(?m)^### ", text)[1:]:
        request, _, body = block.partition("\n")
        docs.append((request.strip(), body.strip()))
    return docs


@functools.lru_cache(maxsize=1)
def _builtin() -> tuple[tuple[str, str], ...]:
    return tuple(doc for name in BUILTIN_FILES for doc in _authored(name))


def builtin_documents() -> list[tuple[str, str]]:
    """The built-in calibration set as (request, answer) pairs, in a fixed order (see ``BUILTIN_FILES``)."""
    return list(_builtin())


# -- sources --------------------------------------------------------------------------------------------------

def render_chatml(request: str, answer: str, system: str = SYSTEM_PROMPT) -> str:
    """A Qwen2.5 ChatML conversation: system, user request, assistant answer."""
    return (f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n{request}<|im_end|>\n"
            f"<|im_start|>assistant\n{answer}<|im_end|>\n")


def _file_documents(path: Path) -> list[tuple[str | None, str]]:
    """.txt: paragraphs (blank-line separated); .jsonl: one object per line with "text" (or "messages")."""
    if not path.is_file():
        raise CalibrationDataError(f"calibration file {path} does not exist; pass a .txt or .jsonl file, or "
                                   f"'{BUILTIN}' for the built-in set.")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        docs: list[tuple[str | None, str]] = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise CalibrationDataError(f"{path}:{i} is not valid JSON ({e.msg}); each line must be an object "
                                           'like {"text": "..."}.') from None
            if isinstance(obj, dict) and isinstance(obj.get("text"), str):
                docs.append((None, obj["text"]))
            elif isinstance(obj, dict) and isinstance(obj.get("messages"), list):
                user = " ".join(m.get("content", "") for m in obj["messages"] if m.get("role") == "user")
                reply = " ".join(m.get("content", "") for m in obj["messages"] if m.get("role") == "assistant")
                docs.append((user, reply))
            else:
                raise CalibrationDataError(f'{path}:{i} has no "text" string (or "messages" list).')
        return docs
    if path.suffix != ".txt":
        raise CalibrationDataError(f"calibration file {path} must end in .txt or .jsonl.")
    return [(None, para.strip()) for para in text.split("\n\n") if para.strip()]


def documents(source: str) -> list[tuple[str | None, str]]:
    """(request or None, text) pairs of ``source``: ``builtin``, a .txt/.jsonl path, or a hub dataset name."""
    if source == BUILTIN:
        return list(builtin_documents())
    from qconvert.hubdata import HubDataError, load_hub_texts, parse_hub_name

    try:
        if parse_hub_name(source) is not None:
            return [(None, t) for t in load_hub_texts(source)]
    except HubDataError as e:
        raise CalibrationDataError(f"{e} Calibration is offline by default: --calib {BUILTIN} is a multilingual "
                                   "set (prose, code, math).") from None
    return _file_documents(Path(source).expanduser())


def render(docs: Sequence[tuple[str | None, str]], chat: bool, eos: str) -> str:
    """One text: ChatML conversations (chat) or raw documents, each followed by ``eos``."""
    parts = []
    for request, text in docs:
        if chat:
            parts.append(render_chatml(request or "Continue the text.", text))
        else:
            parts.append(text + eos)
    return "".join(parts)


def load_calibration(source: str, model_dir: Path, *, chat: bool, n_samples: int = 128, seq_len: int = 512,
                     seed: int = 0) -> CalibrationSet:
    """Tokenize ``source`` with the model's tokenizer.json and draw ``n_samples`` windows of ``seq_len`` tokens."""
    if n_samples < 1 or seq_len < 2:
        raise CalibrationDataError(f"--calib-samples ({n_samples}) must be >= 1 and --calib-seqlen ({seq_len}) >= 2.")
    from tokenizers import Tokenizer

    tok_file = model_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise CalibrationDataError(f"{model_dir} has no tokenizer.json; calibration needs the model's tokenizer.")
    docs = documents(source)
    text = render(docs, chat, "<|endoftext|>")
    ids = torch.tensor(Tokenizer.from_file(str(tok_file)).encode(text).ids, dtype=torch.long)
    if len(ids) < seq_len:
        raise CalibrationDataError(f"calibration text {source!r} has {len(ids)} tokens, fewer than one sample of "
                                   f"--calib-seqlen {seq_len}. Give more text or a smaller --calib-seqlen.")
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seq_len + 1, (n_samples,), generator=gen)
    windows = torch.stack([ids[s:s + seq_len] for s in starts.tolist()])
    return CalibrationSet(windows, source, chat, seed, len(docs), len(ids))
